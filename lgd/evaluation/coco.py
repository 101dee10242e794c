"""COCO-style evaluation with pycocotools: detector outputs -> result records -> AP.

Units: every AP here is in percent (0-100), as papers report it. Where
pycocotools reports -1 (no ground-truth object of that kind, e.g. no small objects), the
value is NaN, so that it cannot be mistaken for a real score or averaged in by accident.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lgd.errors import DatasetError
from lgd.utils.atomic import atomic_write_text
from lgd.utils.files import to_json

IOU_TYPES = ("bbox", "segm")
# Names of the first six entries of COCOeval.stats, in order.
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# COCO's per-image detection limit (COCOeval's last maxDets), the default of model.detections_per_img.
DEFAULT_MAX_DETS = 100


def detections_to_coco(
    outputs: list[dict[str, torch.Tensor]],
    image_ids: list[int],
    label_to_category_id: Callable[[int], int],
    with_masks: bool = False,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Turn torchvision detection outputs into COCO result records.

    Args:
        outputs: one dict per image with "boxes" (N, 4) XYXY in original image pixels,
            "scores" (N,), "labels" (N,) and, when `with_masks`, "masks" (N, 1, H, W) or
            (N, H, W) float probabilities.
        image_ids: the COCO image id of each output, same length as `outputs`.
        label_to_category_id: maps a model label to the dataset's category id.
        with_masks: add a "segmentation" RLE (counts as str, JSON-serialisable).
        mask_threshold: probability above which a mask pixel is foreground.

    Returns:
        One record per detection: {"image_id", "category_id", "bbox": [x, y, w, h], "score"}
        plus "segmentation" with masks.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    category_of: dict[int, int] = {}
    records: list[dict] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().to("cpu", torch.float64)
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        for label in set(labels) - category_of.keys():
            category_of[label] = int(label_to_category_id(label))
        rles: list[dict] | None = None
        if with_masks:
            rles = _encode_masks(output["masks"], mask_threshold)
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            record = {
                "image_id": int(image_id),
                "category_id": category_of[label],
                "bbox": box,
                "score": float(score),
            }
            if rles is not None:
                record["segmentation"] = rles[i]
            records.append(record)
    return records


def _encode_masks(masks: torch.Tensor, threshold: float) -> list[dict]:
    """(N, 1, H, W) or (N, H, W) probabilities -> N RLE dicts with str counts."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    binary = (masks.detach() > threshold).to("cpu", torch.uint8).numpy()
    # pycocotools encodes a whole (H, W, N) Fortran-ordered stack in one call.
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


@dataclass
class EvalResult:
    """What one evaluation (COCO, VOC or CrowdHuman) found.

    Attributes:
        metrics: "bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl"
            (and "segm/..." for masks), in percent; NaN where COCO has no such objects.
        per_class: iou type -> class name -> AP (IoU 0.50:0.95, all areas) in percent,
            NaN for a class with no ground truth.
        summary: iou type -> summary text, every number in percent and marked "%" (COCO: pycocotools' 12
            lines; other metrics: their own lines).
        name: the metric, for titles: "COCO", "VOC AP50 (area)", "VOC2007 11-point AP50", "CrowdHuman".
        headline: the key of ``metrics`` to quote as the result ("bbox/AP" for COCO, "bbox/AP50" otherwise).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, str] = field(default_factory=dict)
    name: str = "COCO"
    headline: str = "bbox/AP"

    def table(self, iou_type: str = "bbox", columns: int = 3) -> str:
        """Per-class AP as an aligned text table, `columns` (class, AP) pairs per row."""
        if iou_type not in self.per_class:
            raise ValueError(
                f"no per-class results for iou type {iou_type!r}; have {sorted(self.per_class)}"
            )
        cells = [(name, _format_ap(ap)) for name, ap in self.per_class[iou_type].items()]
        name_width = max([len("category")] + [len(name) for name, _ in cells])
        ap_width = max([len("AP %")] + [len(ap) for _, ap in cells])
        pairs_per_row = max(1, min(columns, len(cells)))

        def row(pairs: Sequence[tuple[str, str]]) -> str:
            return " | ".join(f"{n:<{name_width}} | {a:>{ap_width}}" for n, a in pairs)

        header = row([("category", "AP %")] * pairs_per_row)
        rule = "-" * len(header)
        body = [row(cells[i : i + pairs_per_row]) for i in range(0, len(cells), pairs_per_row)]
        return "\n".join([header, rule, *body])


def _format_ap(ap: float) -> str:
    return "n/a" if math.isnan(ap) else f"{ap:.2f}"


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    iou_types: Sequence[str] = ("bbox",),
    class_names: Sequence[str] | None = None,
    cat_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
    max_dets: int = DEFAULT_MAX_DETS,
) -> EvalResult:
    """Run COCOeval for each iou type and collect the numbers.

    Args:
        coco_gt: ground truth; its images may have no annotations.
        results: records as made by `detections_to_coco`; may be empty (every AP is then 0,
            or NaN where there is no ground truth either). Not modified.
        iou_types: any of "bbox", "segm" ("segm" needs "segmentation" in the records).
        class_names: names for the per-class table, one per evaluated category, in the
            order of `cat_ids` (default: the dataset's category names).
        cat_ids: categories to evaluate (default: all of coco_gt, sorted).
        image_ids: images to evaluate (default: all of coco_gt).
        max_dets: detections scored per image and category, the highest-scoring first (COCOeval's
            ``maxDets``; AP, the per-class AP and the last AR are at this limit, the other ARs at 1 and 10).
            COCO's convention is 100; lgd passes ``model.detections_per_img``, so dense images are not
            capped below what the detector may output.

    Raises:
        DatasetError: a record names an image absent from coco_gt, or class_names and the
            categories do not match in number.
    """
    unknown = set(iou_types) - set(IOU_TYPES)
    if unknown:
        raise ValueError(f"unknown iou types {sorted(unknown)}; expected some of {IOU_TYPES}")
    cat_ids = list(cat_ids) if cat_ids is not None else sorted(coco_gt.getCatIds())
    if class_names is None:
        class_names = [coco_gt.cats[c]["name"] for c in cat_ids]
    if max_dets < 1:
        raise ValueError(f"max_dets must be positive, got {max_dets}")
    if len(class_names) != len(cat_ids):
        raise DatasetError(
            f"{len(class_names)} class names given for {len(cat_ids)} categories {cat_ids}"
        )
    missing = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if missing:
        raise DatasetError(
            f"detections name image ids absent from the ground truth: {sorted(missing)[:10]}"
        )

    out = EvalResult()
    for iou_type in iou_types:
        if iou_type == "segm":
            if any("segmentation" not in r for r in results):
                raise ValueError("segm evaluation needs a 'segmentation' in every record")
            # Without "bbox", loadRes takes each detection's area from its mask rather than
            # its box, so the small/medium/large split for masks compares mask areas.
            records = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            records = [dict(r) for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(records) if records else _empty_results(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.catIds = cat_ids
            evaluator.params.maxDets = [min(1, max_dets), min(10, max_dets), max_dets]
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
        stats = summary_stats(evaluator)
        out.summary[iou_type] = "\n".join(f"{label} = {format_percent(_to_percent(value))}" for label, value in stats)
        for name, (_, value) in zip(AP_NAMES, stats):
            out.metrics[f"{iou_type}/{name}"] = _to_percent(value)
        out.per_class[iou_type] = dict(zip(class_names, _per_class_ap(evaluator)))
    return out


def summary_stats(evaluator: COCOeval) -> list[tuple[str, float]]:
    """COCOeval's 12 summary numbers (0-1, -1 where there is nothing to score), each with pycocotools' label, at
    the evaluator's own ``params.maxDets``.

    ``COCOeval.summarize`` reads the limits 1, 10 and 100 by position and prints 100 whatever was evaluated, so the
    numbers are taken from ``evaluator.eval`` here, by the same averaging (its ``_summarize``): precision over IoU
    thresholds, recall points and categories; recall over IoU thresholds and categories; entries of -1 left out.
    """
    p = evaluator.params
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]
    area = {name: i for i, name in enumerate(p.areaRngLbl)}
    last = len(p.maxDets) - 1
    rows = [("Precision", None, "all", last), ("Precision", 0.5, "all", last), ("Precision", 0.75, "all", last),
            ("Precision", None, "small", last), ("Precision", None, "medium", last), ("Precision", None, "large", last),
            ("Recall", None, "all", 0), ("Recall", None, "all", 1), ("Recall", None, "all", last),
            ("Recall", None, "small", last), ("Recall", None, "medium", last), ("Recall", None, "large", last)]
    out = []
    for kind, iou, area_name, m in rows:
        values = precision[..., area[area_name], m] if kind == "Precision" else recall[..., area[area_name], m]
        if iou is not None:
            values = values[np.flatnonzero(np.isclose(p.iouThrs, iou))]
        valid = values[values > -1]
        iou_text = f"{iou:0.2f}" if iou is not None else f"{p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}"
        label = (f" {'Average ' + kind:<18} {'(AP)' if kind == 'Precision' else '(AR)'} @[ IoU={iou_text:<9} | "
                 f"area={area_name:>6s} | maxDets={p.maxDets[m]:>3d} ]")
        out.append((label, float(valid.mean()) if valid.size else -1.0))
    return out


def warn_dense_images(coco_gt: COCO, image_ids: Sequence[int], limit: int) -> None:
    """One warning when some of ``image_ids`` hold more objects (crowd regions aside) than ``limit``, the
    detections a detector keeps per image (``model.detections_per_img``): those objects cannot all be found."""
    counts = [(sum(1 for a in coco_gt.imgToAnns.get(i, []) if not a.get("iscrowd", 0)), i) for i in image_ids]
    dense = [(n, i) for n, i in counts if n > limit]
    if dense:
        n, image_id = max(dense)
        verb = "holds" if len(dense) == 1 else "hold"
        warnings.warn(f"{len(dense)} of the {len(counts)} evaluated images {verb} more than {limit} objects (image id "
                      f"{image_id}: {n}), but the detector keeps and the evaluation scores at most {limit} detections "
                      f"per image (model.detections_per_img): raise model.detections_per_img above {n}", stacklevel=3)


def format_percent(value: float) -> str:
    """A percentage for summaries: "36.31 %", or "n/a" for NaN (nothing to score)."""
    return "n/a" if math.isnan(value) else f"{value:.2f} %"


def teacher_ahead(student_ap: float, teacher_ap: float) -> bool:
    """Whether the teacher diagnostic's AP is above the student's as printed (two decimals, in percent): a
    difference too small to show is no lead."""
    return round(teacher_ap, 2) > round(student_ap, 2)


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections; loadRes cannot build one (it reads anns[0])."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def _to_percent(value: float) -> float:
    return float("nan") if value < 0 else 100.0 * value


def _per_class_ap(evaluator: COCOeval) -> list[float]:
    """AP over IoU 0.50:0.95, all areas, the last maxDets, per category of params.catIds."""
    # precision: (iou thresholds, recall points, categories, area ranges, max dets).
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    valid = precision > -1
    counts = valid.sum(axis=(0, 1))
    sums = np.where(valid, precision, 0.0).sum(axis=(0, 1))
    return [100.0 * s / n if n else float("nan") for s, n in zip(sums, counts)]


def save_results(results: list[dict], path: Path) -> None:
    """Write result records as strict JSON, atomically: a reader never sees half a file."""
    atomic_write_text(Path(path), to_json(results))
