"""The deployable student: the plain torchvision detector and the metadata needed to use it.

The file holds the pickled torchvision model (no LGD module inside) and plain-Python metadata, so it loads with
torch and torchvision alone::

    import torch
    exported = torch.load("student.pth", weights_only=False)
    model = exported["model"].eval()        # e.g. torchvision.models.detection.RetinaNet
    names = exported["class_names"]         # label -> name: names[label - exported["label_offset"]]
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lgd.checkpoint import atomic_save
from lgd.config import ModelConfig
from lgd.detectors import set_test_size
from lgd.errors import LGDError

FORMAT = "lgd-student/1"


def export_student(
    student: nn.Module,
    model_cfg: ModelConfig,
    class_names: list[str],
    category_ids: list[int],
    label_offset: int,
    out: Path,
) -> Path:
    """Write the student alone (a copy on the CPU, in eval mode, at the test scale)."""
    model = copy.deepcopy(student).cpu().eval()
    set_test_size(model, model_cfg)
    payload = {
        "format": FORMAT,
        "model": model,
        "arch": model_cfg.arch,
        "class_names": list(class_names),
        "category_ids": list(category_ids),
        "label_offset": label_offset,
        "model_config": dataclasses.asdict(model_cfg),
    }
    atomic_save(payload, Path(out))
    return Path(out)


def load_student(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported torchvision model (eval mode) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise LGDError(f"exported model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise LGDError(f"cannot read exported model {path}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LGDError(f"{path} is not a model written by `lgd export` (use a training checkpoint with -c instead)")
    meta = {k: v for k, v in payload.items() if k != "model"}
    return payload["model"].eval(), meta
