"""From a config to what a run works with: the device and seeds, the datasets (built-in or converted), the model
(LGD, FGFI, or Baseline: ``distill.method``), a trained model read back; and batches moved onto the device."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lgd.checkpoint import FINAL, load_checkpoint, load_model_weights
from lgd.config import Config, distill_method
from lgd.data import CocoDetection, build_transforms, ensure_builtin_dataset
from lgd.data.formats import cached_conversion
from lgd.data.synthetic import Difficulty, default_cache_dir
from lgd.detectors import VIEWS, build_detector
from lgd.distiller import LGD
from lgd.errors import ConfigError, LGDError
from lgd.fgfi import FGFI, load_teacher
from lgd.evaluation import Categories, check_categories, read_categories
from lgd.trainable import Baseline, Trainable

def resolve_device(name: str) -> torch.device:
    """The ``device`` setting as a torch device ("auto": CUDA when there is one). Raises LGDError for CUDA
    requested where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LGDError(f"device={name} was requested but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: initialisation and augmentation follow ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def build_model(cfg: Config, num_classes: int, teacher: bool = True) -> Trainable:
    """The student wrapped as ``distill.method`` says: in LGD, in FGFI (with its frozen teacher read from
    ``fgfi.teacher``), or in Baseline.

    ``teacher=False`` builds an FGFI run's student as a Baseline, without reading the teacher: what evaluation,
    export and pictures of a trained FGFI run need (its teacher was training-only).

    Raises:
        LGDError: the FGFI teacher file is missing, corrupt or not one lgd wrote.
    """
    detector = build_detector(cfg.model, num_classes)
    method = distill_method(cfg)
    if method == "none" or (method == "fgfi" and not teacher):
        return Baseline(detector)
    if method == "fgfi":
        frozen, sha256 = load_teacher(Path(cfg.fgfi.teacher))
        return FGFI(detector, frozen, sha256, cfg.fgfi, cfg.model.anchor_sizes)
    return LGD(detector, num_classes=num_classes, config=cfg.lgd, max_iter=cfg.solver.max_iter)


def to_device(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Plain tensors on the device (tv_tensors unwrapped: torchvision's detectors expect plain ones)."""
    images = [img.as_subclass(Tensor).to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.as_subclass(Tensor).to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def load_trained_model(cfg: Config, weights: Optional[Path] = None) -> tuple[Trainable, Categories, Path]:
    """The model a run trained (``weights`` or ``output_dir/model_final.pth``), the categories it was trained on and
    the file read: no image is opened (exporting a model needs no dataset)."""
    path = Path(weights) if weights else Path(cfg.output_dir) / FINAL
    ckpt = load_checkpoint(path)
    # checkpoints written before categories were stored: the config's training split's annotation file
    categories = ckpt.get("categories") or read_categories(split_paths(cfg, "train")[1])
    model = build_model(cfg, len(categories["ids"]), teacher=False)
    load_model_weights(model, ckpt)
    return model, categories, path


def load_trained(cfg: Config, split: str, weights: Optional[Path] = None) -> tuple[Trainable, CocoDetection]:
    """The model a run trained (``weights`` or ``output_dir/model_final.pth``) and the split's evaluation dataset.

    Raises:
        DatasetError: the split's categories differ from the model's.
    """
    dataset = build_dataset(cfg, split, train=False)
    model, categories, path = load_trained_model(cfg, weights)
    check_categories(categories, dataset, split, f"checkpoint {path}")
    return model, dataset
