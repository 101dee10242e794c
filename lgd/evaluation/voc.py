"""Pascal VOC mean average precision at IoU 0.5, as the VOC devkit computes it.

Per class, detections of all images are taken in descending score; each is matched to the ground
truth of its image with the highest IoU. IoU >= 0.5 with a not-yet-matched object: true positive;
with an object already matched: false positive (a duplicate); with an ignored object (``difficult``
in VOC, any crowd / ignore region here): neither. Otherwise a false positive. AP is the area under
the precision-recall curve — VOC2010+ (``voc``): exact area under its monotone envelope; VOC2007
(``voc07``): mean of the maximum precision at recall >= 0, 0.1, ..., 1 (11 points).
IoU is continuous (no devkit ``+1``): VOC boxes converted by ``lgd.data.voc`` already span whole pixels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO

from lgd.errors import count
from lgd.evaluation.coco import EvalResult, format_percent
from lgd.evaluation.matching import CategoryData, overlaps, per_category


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP in [0, 1] from the cumulative recall and precision (D,) of score-ordered detections."""
    if use_07_metric:
        points = []
        for t in np.linspace(0.0, 1.0, 11):
            above = precision[recall >= t]
            points.append(above.max() if above.size else 0.0)
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision at this recall or beyond
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def match_detections(data: CategoryData, iou_thresh: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(true positive, false positive) flags (D,) of the score-ordered detections; both 0 = ignored."""
    tp = np.zeros(len(data.det_scores))
    fp = np.zeros(len(data.det_scores))
    matched = {image_id: np.zeros(len(ignore), dtype=bool) for image_id, (_, ignore) in data.gt.items()}
    for d, (image_id, box) in enumerate(zip(data.det_images.tolist(), data.det_boxes)):
        gt_boxes, ignore = data.gt[image_id]
        if len(gt_boxes) == 0:
            fp[d] = 1
            continue
        iou = overlaps(box[None], gt_boxes)[0][0]
        j = int(iou.argmax())
        if iou[j] < iou_thresh:
            fp[d] = 1
        elif ignore[j]:
            continue
        elif matched[image_id][j]:
            fp[d] = 1
        else:
            tp[d] = 1
            matched[image_id][j] = True
    return tp, fp


def evaluate_voc(
    coco_gt: COCO,
    results: list[dict],
    class_names: Sequence[str] | None = None,
    cat_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
    use_07_metric: bool = False,
    iou_thresh: float = 0.5,
) -> EvalResult:
    """VOC mAP of COCO result records against a COCO ground truth (arguments as for ``evaluate_coco``).

    Returns an ``EvalResult`` with ``metrics["bbox/AP50"]`` (the mean over classes that have ground
    truth, in percent) and per-class AP50 (NaN for a class without ground truth).
    """
    cat_ids = list(cat_ids) if cat_ids is not None else sorted(coco_gt.getCatIds())
    class_names = list(class_names) if class_names is not None else [coco_gt.cats[c]["name"] for c in cat_ids]
    image_ids = list(image_ids) if image_ids is not None else list(coco_gt.getImgIds())
    per_class: dict[str, float] = {}
    for name, data in zip(class_names, per_category(coco_gt, results, cat_ids, image_ids)):
        npos = data.num_positives
        if npos == 0:
            per_class[name] = math.nan
            continue
        tp, fp = (np.cumsum(flags) for flags in match_detections(data, iou_thresh))
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[name] = 100.0 * voc_ap(recall, precision, use_07_metric)
    scored = [ap for ap in per_class.values() if not math.isnan(ap)]
    mean_ap = float(np.mean(scored)) if scored else math.nan
    name = "VOC2007 11-point AP50" if use_07_metric else "VOC AP50 (area)"
    summary = (f" mean AP @ IoU={iou_thresh:.2f} ({name}) = {format_percent(mean_ap)}\n"
               f" over {len(scored)} of {count(len(cat_ids), 'class')} with ground truth, "
               f"{count(len(image_ids), 'image')}; "
               f"difficult / ignore-region objects ignored")
    return EvalResult(metrics={"bbox/AP50": mean_ap}, per_class={"bbox": per_class}, summary={"bbox": summary},
                      name=name, headline="bbox/AP50")
