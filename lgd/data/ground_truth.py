"""The one validated ground truth of a split: what training learns, and what every metric and ``lgd data stats`` count.

A COCO instances file as labelling tools write it is not what a detector can be scored against: a zero-size box or
one entirely outside its image is a miss nobody can hit, a box reaching past the edge matches no prediction (which
torchvision clips to the image) at full IoU, a repeated annotation is a second object no detector finds twice, and
annotation id 0 reads as "unmatched" to pycocotools (``COCOeval.evaluateImg`` marks free ground truth with id 0).
:func:`validate_annotations` fixes each kind once, with one counted warning, and :func:`renumber` gives the
annotations ids pycocotools reads correctly; ``CocoDetection`` builds its training targets and its evaluation index
from the result, so training and evaluation see the same objects.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lgd.errors import count

# Boxes narrower or lower than this (pixels) count as zero-size: in float32 a flip (W - x) or a resize can
# collapse them to x2 == x1, which torchvision's detectors refuse in training.
MIN_BOX_SIZE = 0.01


def validate_annotations(annotations: list[dict[str, Any]], images: dict[int, dict[str, Any]],
                         path: Path) -> list[dict[str, Any]]:
    """The annotations to train on and score against, in file order, with source ids kept.

    Dropped (not made ignore regions: nothing can be detected there), each kind with one counted warning naming
    ``path`` and an example annotation id: zero-size boxes (width or height under ``MIN_BOX_SIZE`` px), boxes with
    under ``MIN_BOX_SIZE`` px left inside their image, and exact duplicates (same image, category, ``bbox`` and
    ``iscrowd`` as an earlier annotation; the first is kept, as Ultralytics keeps one of duplicate label rows).
    Boxes reaching past the image edge are clipped to it (one counted warning); their ``area`` shrinks in
    proportion, so COCO's small / medium / large split sees the object as it lies in the image.

    Args:
        annotations: records with "id", "image_id", "category_id", "bbox" [x, y, w, h] (pixels), "area" and
            "iscrowd", as ``lgd.data.coco`` validates them; not modified.
        images: image records by id, with "width" and "height".
        path: the annotation file, for the warnings.

    Returns:
        New annotation dicts (clipped ones with their new "bbox" and "area").
    """
    sizes = np.array([[images[a["image_id"]]["width"], images[a["image_id"]]["height"]] for a in annotations],
                     dtype=np.float64).reshape(-1, 2)
    xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    clipped = np.clip(xyxy, 0, np.tile(sizes, 2))
    positive = (xywh[:, 2] >= MIN_BOX_SIZE) & (xywh[:, 3] >= MIN_BOX_SIZE)
    inside = (clipped[:, 2] - clipped[:, 0] >= MIN_BOX_SIZE) & (clipped[:, 3] - clipped[:, 1] >= MIN_BOX_SIZE)
    seen: set[tuple[Any, ...]] = set()
    duplicate = np.zeros(len(annotations), dtype=bool)
    for i, a in enumerate(annotations):
        key = (a["image_id"], a["category_id"], bool(a["iscrowd"]), *xywh[i].tolist())
        duplicate[i] = key in seen
        seen.add(key)
    keep = positive & inside & ~duplicate
    was_clipped = keep & np.any(clipped != xyxy, axis=1)
    ids = np.array([a["id"] for a in annotations], dtype=np.int64)
    warn_counted(ids[~positive], "skipped {n} annotations with zero-size boxes", path)
    warn_counted(ids[positive & ~inside], "skipped {n} annotations with boxes entirely outside their image", path)
    warn_counted(ids[positive & inside & duplicate],
                 "dropped {n} exact duplicate annotations (same image, category and box as an earlier one: no "
                 "detector can find one object twice)", path)
    warn_counted(ids[was_clipped], "clipped {n} boxes that extend outside their image", path)

    out = []
    for i in np.flatnonzero(keep).tolist():
        ann = dict(annotations[i])
        if was_clipped[i]:
            x1, y1, x2, y2 = clipped[i].tolist()
            ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            ann["area"] = float(ann["area"]) * (x2 - x1) * (y2 - y1) / float(xywh[i, 2] * xywh[i, 3])
        out.append(ann)
    return out


def renumber(annotations: list[dict[str, Any]]) -> np.ndarray:
    """Give the annotations ids 1..N in list order, in place; returns (N,) int64 their source ids, in that order.

    pycocotools stores the id of each detection's matched ground truth and reads 0 as "no match", so an
    annotation numbered 0 (Label Studio, X-AnyLabeling) could never be matched; ids 1..N cannot collide with that.
    """
    source = np.array([a["id"] for a in annotations], dtype=np.int64)
    for new_id, ann in enumerate(annotations, 1):
        ann["id"] = new_id
    return source


def warn_crowd_only_classes(annotations: list[dict[str, Any]], categories: dict[int, str], path: Path) -> None:
    """One warning naming the categories whose every annotation is a crowd / ignore region (``iscrowd=1``): no
    detector is trained on them, and evaluation has nothing to score for them. Converters write VOC ``difficult``
    objects and CrowdHuman ignore regions so; CVAT's COCO export writes brush-drawn masks (RLE) so."""
    crowd = {a["category_id"] for a in annotations if a["iscrowd"]}
    objects = {a["category_id"] for a in annotations if not a["iscrowd"]}
    only = [categories[c] for c in sorted(crowd - objects)]
    if only:
        names = ", ".join(only[:8]) + (", ..." if len(only) > 8 else "")
        warnings.warn(f"{count(len(only), 'class')} of {path} ({names}) {'has' if len(only) == 1 else 'have'} only "
                      f"crowd / ignore annotations (iscrowd=1): no detector is trained on "
                      f"{'it' if len(only) == 1 else 'them'} and evaluation does not score "
                      f"{'it' if len(only) == 1 else 'them'}. CVAT's COCO export marks brush-drawn masks (RLE) "
                      f"iscrowd=1: set iscrowd=0 on the objects meant to be learnt", stacklevel=3)


def warn_counted(ann_ids: np.ndarray, text: str, path: Path) -> None:
    """One warning for a kind of fix: ``text`` with ``{n}`` the count, then the file and the first id."""
    if len(ann_ids):
        warnings.warn(f"{text.format(n=len(ann_ids))} in {path} (e.g. annotation id {ann_ids[0]})", stacklevel=4)
