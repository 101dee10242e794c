"""CrowdHuman evaluation: AP at IoU 0.5 and the log-average miss rate MR^-2, as the CrowdHuman toolkit
(CrowdDet's ``APMRToolkits``) computes them.

Matching, per image, detections in descending score: a detection takes the unmatched object with
the highest IoU above 0.5 (true positive); failing that, if it covers an ignore region by more than
0.5 of its own area (intersection over detection area) it is ignored; otherwise it is a false
positive. Over all images, detections are then ranked by score:

- AP: trapezoidal area under the precision-recall points. The toolkit starts integrating at the first
  detection; here the curve starts at (recall 0, precision 1), which differs by at most 1 / #objects
  and keeps a perfect detector of few objects at AP 1.
- MR^-2: miss rate (1 - recall) against false positives per image (FPPI); at each of the nine
  references 10^-2, 10^-1.75, ..., 10^0 the first point with FPPI >= reference is read (the last
  point when none reaches it) and the nine miss rates are averaged in log space. Lower is better.

With several classes each is evaluated alone and the numbers are averaged over classes with ground truth.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO

from lgd.errors import count
from lgd.evaluation.coco import EvalResult, format_percent
from lgd.evaluation.matching import CategoryData, overlaps, per_category

FPPI_REFERENCES = np.logspace(-2.0, 0.0, 9)


def match_detections(data: CategoryData, iou_thresh: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(true positive, false positive) flags (D,) of the score-ordered detections; both 0 = ignored."""
    tp = np.zeros(len(data.det_scores))
    fp = np.zeros(len(data.det_scores))
    for image_id, (gt_boxes, ignore) in data.gt.items():
        rows = np.flatnonzero(data.det_images == image_id)  # already in descending score
        if len(rows) == 0:
            continue
        if len(gt_boxes) == 0:
            fp[rows] = 1
            continue
        iou, ioa = overlaps(data.det_boxes[rows], gt_boxes)
        free = ~ignore
        for k, d in enumerate(rows):
            candidates = np.where(free, iou[k], -1.0)
            j = int(candidates.argmax())
            if candidates[j] > iou_thresh:
                tp[d] = 1
                free[j] = False
            elif not (ioa[k][ignore] > iou_thresh).any():
                fp[d] = 1
    return tp, fp


def ap_and_mr(tp: np.ndarray, fp: np.ndarray, num_positives: int, num_images: int) -> tuple[float, float]:
    """(AP, MR^-2), both in [0, 1], from score-ordered flags; no detection gives AP 0 and MR 1."""
    keep = (tp + fp) > 0  # ignored detections are not points of the curves
    tp_cum, fp_cum = np.cumsum(tp[keep]), np.cumsum(fp[keep])
    if tp_cum.size == 0:
        return 0.0, 1.0
    recall = np.concatenate([[0.0], tp_cum / num_positives])
    precision = np.concatenate([[1.0], tp_cum / (tp_cum + fp_cum)])
    ap = float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))
    fppi, miss = fp_cum / num_images, 1.0 - tp_cum / num_positives
    at = [int(np.argmax(fppi >= ref)) if (fppi >= ref).any() else len(fppi) - 1 for ref in FPPI_REFERENCES]
    mr = float(np.exp(np.mean(np.log(np.maximum(miss[at], 1e-10)))))
    return ap, mr


def evaluate_crowdhuman(
    coco_gt: COCO,
    results: list[dict],
    class_names: Sequence[str] | None = None,
    cat_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
    iou_thresh: float = 0.5,
) -> EvalResult:
    """AP50 and MR^-2 (percent) of COCO result records (arguments as for ``evaluate_coco``).

    ``metrics``: "bbox/AP50" and "bbox/MR-2" (means over classes with ground truth); ``per_class``:
    AP50 per class (NaN without ground truth).
    """
    cat_ids = list(cat_ids) if cat_ids is not None else sorted(coco_gt.getCatIds())
    class_names = list(class_names) if class_names is not None else [coco_gt.cats[c]["name"] for c in cat_ids]
    image_ids = list(image_ids) if image_ids is not None else list(coco_gt.getImgIds())
    per_class: dict[str, float] = {}
    miss_rates = []
    for name, data in zip(class_names, per_category(coco_gt, results, cat_ids, image_ids)):
        if data.num_positives == 0:
            per_class[name] = math.nan
            continue
        ap, mr = ap_and_mr(*match_detections(data, iou_thresh), data.num_positives, len(image_ids))
        per_class[name] = 100.0 * ap
        miss_rates.append(100.0 * mr)
    scored = [ap for ap in per_class.values() if not math.isnan(ap)]
    metrics = {
        "bbox/AP50": float(np.mean(scored)) if scored else math.nan,
        "bbox/MR-2": float(np.mean(miss_rates)) if miss_rates else math.nan,
    }
    summary = (f" CrowdHuman AP     @ IoU={iou_thresh:.2f} = {format_percent(metrics['bbox/AP50'])}\n"
               f" CrowdHuman MR^-2  @ IoU={iou_thresh:.2f} = {format_percent(metrics['bbox/MR-2'])}  "
               f"(log-average miss rate over FPPI in [0.01, 1]; lower is better)\n"
               f" over {len(scored)} of {count(len(cat_ids), 'class')} with ground truth, "
               f"{count(len(image_ids), 'image')}; "
               f"detections in ignore regions not counted")
    return EvalResult(metrics=metrics, per_class={"bbox": per_class}, summary={"bbox": summary},
                      name="CrowdHuman", headline="bbox/AP50")
