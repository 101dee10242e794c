"""Datasets, transforms and loaders."""

from lgd.data.coco import CocoDetection
from lgd.data.loader import TrainBatchSampler, build_eval_loader, build_train_loader, collate
from lgd.data.synthetic import (
    CLASS_NAMES,
    Difficulty,
    builtin_dataset_name,
    default_cache_dir,
    ensure_builtin_dataset,
    write_synthetic,
)
from lgd.data.transforms import build_transforms

__all__ = [
    "CLASS_NAMES",
    "CocoDetection",
    "Difficulty",
    "TrainBatchSampler",
    "build_eval_loader",
    "build_train_loader",
    "build_transforms",
    "builtin_dataset_name",
    "collate",
    "default_cache_dir",
    "ensure_builtin_dataset",
    "write_synthetic",
]
