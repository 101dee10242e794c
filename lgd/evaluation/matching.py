"""Ground truth and detections of one category, grouped for the VOC and CrowdHuman matchers.

Both metrics read the same inputs as ``evaluate_coco``: a pycocotools ``COCO`` ground truth and
COCO result records ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``. Ground truth
marked ``iscrowd``, ``ignore`` or ``difficult`` is an ignore region: never a miss, and a detection
it explains is neither a true nor a false positive.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO


@dataclass
class CategoryData:
    """One category over the evaluated images.

    Attributes:
        gt: image id -> (boxes (G, 4) XYXY float64, ignore (G,) bool).
        det_images: (D,) image id of each detection, highest score first.
        det_boxes: (D, 4) XYXY float64.
        det_scores: (D,) float64, descending.
    """

    gt: dict[int, tuple[np.ndarray, np.ndarray]]
    det_images: np.ndarray
    det_boxes: np.ndarray
    det_scores: np.ndarray

    @property
    def num_positives(self) -> int:
        """Ground-truth objects that count (ignore regions do not)."""
        return int(sum((~ignore).sum() for _, ignore in self.gt.values()))


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def overlaps(dets: np.ndarray, gts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over detection area), each (D, G), of XYXY boxes (continuous coordinates)."""
    lt = np.maximum(dets[:, None, :2], gts[None, :, :2])
    rb = np.minimum(dets[:, None, 2:], gts[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_d = (dets[:, 2:] - dets[:, :2]).prod(axis=1)[:, None]
    area_g = (gts[:, 2:] - gts[:, :2]).prod(axis=1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(inter > 0, inter / (area_d + area_g - inter), 0.0)
        ioa = np.where(inter > 0, inter / area_d, 0.0)
    return iou, ioa


def is_ignored(ann: dict) -> bool:
    return bool(ann.get("iscrowd", 0) or ann.get("ignore", 0) or ann.get("difficult", 0))


def per_category(
    coco_gt: COCO, results: list[dict], cat_ids: Sequence[int], image_ids: Sequence[int]
) -> Iterator[CategoryData]:
    """Ground truth and detections of each category of ``cat_ids`` on ``image_ids``, in that order.

    Detections are sorted by score, highest first (stable, so ties keep their record order).
    """
    wanted = set(image_ids)
    dets_of: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if r["image_id"] in wanted:
            dets_of[r["category_id"]].append(r)
    for cat_id in cat_ids:
        anns_of: dict[int, list[dict]] = {image_id: [] for image_id in image_ids}
        for a in coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat_id])):
            if a["image_id"] in wanted:
                anns_of[a["image_id"]].append(a)
        gt = {
            image_id: (xywh_to_xyxy([a["bbox"] for a in anns]), np.array([is_ignored(a) for a in anns], dtype=bool))
            for image_id, anns in anns_of.items()
        }
        dets = dets_of[cat_id]
        dets = [dets[i] for i in np.argsort([-r["score"] for r in dets], kind="stable")]
        yield CategoryData(
            gt=gt,
            det_images=np.array([r["image_id"] for r in dets], dtype=np.int64),
            det_boxes=xywh_to_xyxy([r["bbox"] for r in dets]),
            det_scores=np.array([r["score"] for r in dets], dtype=np.float64),
        )
