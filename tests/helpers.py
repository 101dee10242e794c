"""Tiny detectors and batches shared by the tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lgd.config import LGDConfig, ModelConfig
from lgd.detectors import VIEWS, build_detector
from lgd.methods.lgd import LGD

ARCHS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")


def tiny_overrides(synth_root: Path, output_dir: Path) -> list[str]:
    """Overrides for a tiny detector trained 4 iterations on the tiny dataset at ``synth_root`` (``tiny_config``)."""
    splits = [f"data.{s}.root={synth_root / s}" for s in ("train", "val", "test")]
    anns = [f"data.{s}.ann={synth_root / 'annotations' / f'instances_{s}.json'}" for s in ("train", "val", "test")]
    base = [
        f"output_dir={output_dir}", "model.depth=18", "model.fpn_channels=32", "model.norm=bn",
        "model.min_size=[64]", "model.max_size=128", "data.batch_size=2", "data.eval_batch_size=4",
        "data.workers=0", "solver.max_iter=4", "solver.warmup_iters=2", "solver.steps=[3]",
        "checkpoint_period=2", "log_period=1", "lgd.pre_distill_iters=1",
    ]
    return base + splits + anns


def tiny_detector(arch: str, num_classes: int = 3, channels: int = 32, size: int = 64, norm: str = "bn"):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, depth=18, fpn_channels=channels, norm=norm, min_size=[size], max_size=2 * size)
    return build_detector(cfg, num_classes)


def tiny_lgd(arch: str, num_classes: int = 3, **lgd_options) -> LGD:
    detector = tiny_detector(arch, num_classes)
    options = {"pre_distill_iters": 0, **lgd_options}
    return LGD(detector, num_classes=num_classes, config=LGDConfig(**options), max_iter=100)


def batch(arch: str, objects: tuple[int, ...] = (2, 1), size: int = 64, seed: int = 0):
    """Images and targets in the detector's label convention, with masks for Mask R-CNN."""
    g = torch.Generator().manual_seed(seed)
    offset = VIEWS[arch].label_offset
    images, targets = [], []
    for n in objects:
        images.append(torch.rand(3, size, size, generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = 4 + torch.rand(n, 2, generator=g) * size * 0.35
        boxes = torch.cat([xy, xy + wh], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(0, 3, (n,), generator=g) + offset}
        if arch == "maskrcnn":
            masks = torch.zeros(n, size, size, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
                masks[i, y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def strict_json(text: str):
    """json.loads that rejects NaN and Infinity, as strict parsers (jq, JavaScript) do."""
    def reject(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=reject)
