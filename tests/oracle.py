"""A perfect detector, scored by ``lgd eval``'s own code path: its AP is 100 on any ground truth lgd scores fairly.

It reads the split's annotation file itself (not lgd's validated ground truth, which is what is under test) and
predicts what a perfect detector can: every object once, at its box as it lies in the image (clipped to the edge, as
torchvision clips predictions; nothing where no area is left), score 1; crowd regions are not objects.
"""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn

from lgd.config import Config
from lgd.data import CocoDetection
from lgd.data.build import build_dataset
from lgd.evaluation import EvalResult
from lgd.evaluation.evaluator import evaluate
from lgd.methods.trainable import Trainable


def perfect_detections(dataset: CocoDetection) -> list[dict[str, Tensor]]:
    """One output per sample of ``dataset`` in order, as torchvision detectors return them."""
    raw = json.loads(dataset.ann_file.read_text(encoding="utf-8-sig"))
    images = {img["id"]: img for img in raw["images"]}
    objects: dict[int, dict[tuple[int, tuple[float, ...]], None]] = {i: {} for i in images}
    for ann in raw["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        info = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        x1, y1 = min(max(x, 0.0), info["width"]), min(max(y, 0.0), info["height"])
        x2, y2 = min(max(x + w, 0.0), info["width"]), min(max(y + h, 0.0), info["height"])
        if x2 - x1 > 0.01 and y2 - y1 > 0.01:
            objects[ann["image_id"]][(ann["category_id"], (x1, y1, x2, y2))] = None  # dict: once, in file order
    outputs = []
    for image_id in dataset.ids:
        found = list(objects[image_id])
        outputs.append({
            "boxes": torch.tensor([box for _, box in found], dtype=torch.float64).reshape(-1, 4),
            "scores": torch.ones(len(found)),
            "labels": torch.tensor([dataset.category_id_to_label(c) for c, _ in found], dtype=torch.int64),
        })
    return outputs


class _Student(nn.Module):
    """Answers each batch with the next outputs: the evaluation loader visits the samples in order."""

    def __init__(self, outputs: list[dict[str, Tensor]]) -> None:
        super().__init__()
        self.outputs = outputs
        self.transform = SimpleNamespace(min_size=(0,))

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        batch, self.outputs = self.outputs[:len(images)], self.outputs[len(images):]
        return batch


class PerfectDetector(Trainable):
    """A ``Trainable`` whose student returns ``perfect_detections(dataset)``, one evaluation's worth."""

    def __init__(self, dataset: CocoDetection) -> None:
        super().__init__()
        self.student = _Student(perfect_detections(dataset))


def oracle_eval(cfg: Config, split: str = "val",
                caught: Optional[list[str]] = None) -> tuple[EvalResult, CocoDetection]:
    """(the perfect detector's result on ``split``, the dataset scored); the warnings raised go to ``caught``."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        dataset = build_dataset(cfg, split, train=False)
        result = evaluate(PerfectDetector(dataset), dataset, cfg, torch.device("cpu"), progress=False, split=split)
    if caught is not None:
        caught.extend(str(w.message) for w in records)
    return result, dataset
