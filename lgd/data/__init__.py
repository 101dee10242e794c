"""Datasets, transforms and loaders. Each name is imported on first use (``lgd.utils.lazy``): ``lgd.config`` reads
``lgd.data.difficulty`` without loading torch."""
from lgd.utils.lazy import lazy_exports

_EXPORTS = {
    "CocoDetection": "lgd.data.coco",
    "TrainBatchSampler": "lgd.data.loader",
    "build_eval_loader": "lgd.data.loader",
    "build_train_loader": "lgd.data.loader",
    "collate": "lgd.data.loader",
    "CLASS_NAMES": "lgd.data.difficulty",
    "Difficulty": "lgd.data.difficulty",
    "builtin_dataset_name": "lgd.data.synthetic",
    "default_cache_dir": "lgd.data.synthetic",
    "ensure_builtin_dataset": "lgd.data.synthetic",
    "write_synthetic": "lgd.data.synthetic",
    "build_transforms": "lgd.data.transforms",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
