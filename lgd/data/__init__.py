"""Datasets, transforms and loaders. Each name is imported on first use (``lgd.utils.lazy``): ``lgd.config`` reads
``lgd.data.difficulty`` without loading torch."""
from lgd.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "lgd.data.coco": ("CocoDetection",),
    "lgd.data.difficulty": ("CLASS_NAMES", "Difficulty"),
    "lgd.data.loader": ("TrainBatchSampler", "build_eval_loader", "build_train_loader", "collate"),
    "lgd.data.synthetic": ("builtin_dataset_name", "default_cache_dir", "ensure_builtin_dataset", "write_synthetic"),
    "lgd.data.transforms": ("build_transforms",),
})
