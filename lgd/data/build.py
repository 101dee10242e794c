"""The datasets of a config (the built-in one, the user's, or converted ones) in the detector's label convention;
and batches moved onto the device."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lgd.config import Config
from lgd.data.coco import CocoDetection
from lgd.data.difficulty import Difficulty
from lgd.data.formats import cached_conversion
from lgd.data.synthetic import default_cache_dir, ensure_builtin_dataset
from lgd.data.transforms import build_transforms
from lgd.detectors import VIEWS
from lgd.errors import ConfigError


def split_paths(cfg: Config, split: str, progress: bool = True) -> tuple[Path, Path]:
    """(image root, COCO annotation file) of a split; the built-in dataset (generated once, with a progress bar on
    a terminal unless ``progress`` is false) when none is given.

    VOC, YOLO, CrowdHuman and CSV splits, and COCO ones with a ``data.class_map``, are converted to COCO JSON once,
    cached in the cache folder.

    Raises:
        ConfigError: the split is not set but the training split is the user's own: the built-in split has
            other categories, and scoring on it would be silently wrong.
    """
    s = getattr(cfg.data, split)
    syn = cfg.data.synth
    cache_dir = Path(syn.cache_dir) if syn.cache_dir else default_cache_dir()
    if s.format != "coco":
        return cached_conversion(s.format, Path(s.root), s.ann, cfg.data.names_file, cfg.data.crowdhuman_box,
                                 cache_dir, cfg.data.class_map)
    if s.root:
        root, ann = Path(s.root), Path(s.ann)
    elif cfg.data.train.root:
        raise ConfigError(f"data.{split} is not set, and the training split is your own dataset "
                          f"({cfg.data.train.root}); lgd never uses the built-in synthetic {split} split for it. Set "
                          f"data.{split}.root and data.{split}.ann (e.g. a held-out part of your images; training "
                          "evaluates on val)")
    else:
        built = ensure_builtin_dataset(
            cache_dir,
            seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val, num_test=syn.num_test, size=syn.size,
            difficulty=Difficulty.of(syn), progress=progress,
        )
        root, ann = built / split, built / "annotations" / f"instances_{split}.json"
    if cfg.data.class_map:
        return cached_conversion("coco", root, str(ann), "", "full", cache_dir, cfg.data.class_map)
    return root, ann


def build_dataset(cfg: Config, split: str, train: bool) -> CocoDetection:
    """A split as a dataset in the detector's label convention; ``train``: augmented, images without objects
    dropped when ``data.filter_empty``."""
    root, ann = split_paths(cfg, split)
    view = VIEWS[cfg.model.arch]
    return CocoDetection(
        root,
        ann,
        transforms=build_transforms(train, cfg.data.hflip_prob),
        label_offset=view.label_offset,
        with_masks=view.has_masks,
        filter_empty=train and cfg.data.filter_empty,
    )


def to_device(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Plain tensors on the device (tv_tensors unwrapped: torchvision's detectors expect plain ones)."""
    images = [img.as_subclass(Tensor).to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.as_subclass(Tensor).to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets
