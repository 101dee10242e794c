"""Evaluation: COCO AP via pycocotools, VOC AP50 (11-point and area) and CrowdHuman AP / MR^-2."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pycocotools.coco import COCO

from lgd.choices import METRICS
from lgd.evaluation.categories import Categories, check_categories, dataset_categories, read_categories
from lgd.evaluation.coco import (DEFAULT_MAX_DETS, EvalResult, detections_to_coco, evaluate_coco, format_percent,
                                 save_results, teacher_ahead, warn_dense_images)
from lgd.evaluation.crowdhuman import evaluate_crowdhuman
from lgd.evaluation.voc import evaluate_voc


def auto_metric(fmt: str, root: str) -> str:
    """The metric a dataset format is reported with: VOC2007 folders get the VOC2007 11-point AP (as
    papers report VOC2007 test), other VOC the area AP, CrowdHuman its AP and MR^-2, the rest COCO AP."""
    if fmt == "voc":
        return "voc07" if "2007" in Path(root).resolve().name else "voc"
    return "crowdhuman" if fmt == "crowdhuman" else "coco"


def evaluate_detections(
    metric: str,
    coco_gt: COCO,
    results: list[dict],
    iou_types: Sequence[str] = ("bbox",),
    class_names: Sequence[str] | None = None,
    cat_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
    max_dets: int = DEFAULT_MAX_DETS,
) -> EvalResult:
    """Score COCO result records with ``metric`` (one of ``METRICS``); VOC and CrowdHuman score boxes only, every
    detection given; COCO scores at most ``max_dets`` per image and category (see ``evaluate_coco``)."""
    if metric == "coco":
        return evaluate_coco(coco_gt, results, iou_types, class_names, cat_ids, image_ids, max_dets)
    if metric in ("voc", "voc07"):
        return evaluate_voc(coco_gt, results, class_names, cat_ids, image_ids, use_07_metric=metric == "voc07")
    if metric == "crowdhuman":
        return evaluate_crowdhuman(coco_gt, results, class_names, cat_ids, image_ids)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


__all__ = [
    "METRICS", "Categories", "EvalResult", "auto_metric", "check_categories", "dataset_categories",
    "detections_to_coco", "evaluate_coco", "evaluate_crowdhuman", "evaluate_detections", "evaluate_voc",
    "format_percent", "read_categories", "save_results", "teacher_ahead", "warn_dense_images",
]
