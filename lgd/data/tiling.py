"""Tiles of large images: the slicing grid ``lgd predict --tile`` runs on, and ``lgd data tile``, which cuts a
COCO split into tile images with their boxes clipped to each tile.

The grid follows SAHI's ``get_slice_bboxes`` (tiles of ``size`` px, neighbours overlapping by
``int(overlap * size)`` px, the last row and column shifted back to end at the image border), written here
rather than imported: SAHI installs opencv-python, shapely, fire and requests, none of which lgd needs
otherwise, for a loop of a few lines.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lgd.data.coco import CocoDetection
from lgd.data.formats import write_coco
from lgd.data.ground_truth import MIN_BOX_SIZE
from lgd.errors import LGDError, count

TILE_IMAGES = "images"  # the tile images' folder in the output folder: the split's data.<split>.root
TILE_ANNOTATIONS = "annotations.json"


def check_tiling(size: int, overlap: float) -> None:
    """Raise unless ``size`` (px) and ``overlap`` (fraction of ``size``) make a grid.

    Raises:
        LGDError: ``size`` < 1, or ``overlap`` outside [0, 1) (at 1, neighbouring tiles would never advance).
    """
    if size < 1:
        raise LGDError(f"the tile size must be at least 1 px, got {size}")
    if not 0 <= overlap < 1:
        raise LGDError(f"the tile overlap must be a fraction of the tile size in [0, 1), got {overlap}")


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    return [*range(0, length - size, step), length - size]


def tile_grid(width: int, height: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """The tiles of a ``width`` x ``height`` px image, as (x1, y1, x2, y2) pixel corners, row by row.

    Tiles are ``size`` x ``size`` px, neighbours overlap by ``int(overlap * size)`` px, and the last row and
    column are shifted to end at the image border (SAHI's convention), so every tile is full-size except
    along a side shorter than ``size``, where the tile is the whole side.

    Raises:
        LGDError: as :func:`check_tiling`.
    """
    check_tiling(size, overlap)
    step = size - int(overlap * size)
    return [(x, y, min(x + size, width), min(y + size, height))
            for y in _starts(height, size, step) for x in _starts(width, size, step)]


@dataclass
class TileReport:
    """What :func:`tile_dataset` wrote. Boxes count once per tile they were written to (a box in the overlap
    of two tiles counts twice); ``dropped`` counts box parts left out of a tile for keeping under the minimum
    fraction of their area there."""

    images: int = 0
    tiles: int = 0
    kept: int = 0
    clipped: int = 0
    dropped: int = 0
    ignored: int = 0
    annotations: Path = Path()
    root: Path = Path()

    def text(self) -> str:
        return (f"{count(self.tiles, 'tile')} of {count(self.images, 'image')} -> {self.root}: "
                f"{count(self.kept, 'box')} kept ({self.clipped} clipped at a tile edge), {self.dropped} dropped "
                f"(under the minimum fraction of their area inside the tile), {count(self.ignored, 'ignore region')}"
                f" (iscrowd)")


def clip_to_tile(xyxy: np.ndarray, tile: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(boxes clipped to ``tile``, in the tile's pixels; the fraction of each box's area inside the tile).

    Args:
        xyxy: (N, 4) float boxes, XYXY in the image's pixels.
        tile: (x1, y1, x2, y2) of the tile in the image's pixels.

    Returns:
        (N, 4) boxes, XYXY relative to the tile's top-left corner, and (N,) fractions in [0, 1]; a box
        with no area inside the tile (or a zero-size one) has fraction 0.
    """
    x1, y1, x2, y2 = tile
    clipped = np.clip(xyxy, [x1, y1, x1, y1], [x2, y2, x2, y2])
    inner = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    fraction = np.divide(inner, area, out=np.zeros_like(inner), where=area > 0)
    return clipped - [x1, y1, x1, y1], fraction


def tile_dataset(root: Path, ann_file: Path, out: Path, size: int, overlap: float, min_fraction: float,
                 progress: bool = True) -> TileReport:
    """Cut every image of a COCO split into tiles of ``size`` px (:func:`tile_grid`) and write the tiles as a
    COCO split: ``out/images/<image file path without extension>_<x1>_<y1>.png`` (with the extension where two
    images share a path without it) and ``out/annotations.json``; ``x1``, ``y1`` are the tile's top-left corner.

    The split is read as training reads it (``CocoDetection``: structure checked, images opened and checked
    against their records, unusable and duplicate boxes dropped, boxes clipped to their image). In each tile,
    a box keeps its part inside the tile when that part holds at least ``min_fraction`` of its area, else it is
    dropped from that tile (counted); ignore regions (``iscrowd=1``) keep any part inside. Every tile is
    written, also those without objects (training leaves them out by ``data.filter_empty``). Tile records
    carry ``source_image_id``, ``source_file_name`` and ``tile_xyxy`` (the tile in the source's pixels);
    categories are copied. Boxes only: segmentations are left out (with a warning), so the tiles train box
    detectors, not Mask R-CNN. Tiles are 8-bit RGB PNG (lossless; the source as ``read_image`` gives it).

    Raises:
        LGDError: bad ``size``/``overlap`` (:func:`check_tiling`) or ``min_fraction`` outside (0, 1].
        DatasetError: the split cannot be read (the message names file, record and field).
    """
    check_tiling(size, overlap)
    if not 0 < min_fraction <= 1:
        raise LGDError(f"the minimum kept fraction of a box's area must be in (0, 1], got {min_fraction}")
    dataset = CocoDetection(root, ann_file)
    coco = dataset.coco
    out = Path(out)
    report = TileReport(images=len(dataset), annotations=out / TILE_ANNOTATIONS, root=out / TILE_IMAGES)
    stems = [os.path.splitext(coco.imgs[i]["file_name"])[0] for i in dataset.ids]
    shared = Counter(stems)
    images, annotations, with_masks = [], [], 0
    for index in tqdm(range(len(dataset)), desc="tile", disable=not progress, dynamic_ncols=True):
        info = coco.imgs[dataset.ids[index]]
        pixels = dataset[index][0].mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        anns = coco.imgToAnns[info["id"]]
        with_masks += sum(bool(a.get("segmentation")) for a in anns)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        crowd = np.array([bool(a["iscrowd"]) for a in anns], dtype=bool)
        stem = stems[index] if shared[stems[index]] == 1 else info["file_name"]
        for tile in tile_grid(info["width"], info["height"], size, overlap):
            x1, y1, x2, y2 = tile
            name = f"{stem}_{x1}_{y1}.png"
            path = report.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[y1:y2, x1:x2]).save(path)
            tile_id = len(images) + 1
            images.append({"id": tile_id, "file_name": name, "width": x2 - x1, "height": y2 - y1,
                           "source_image_id": info["id"], "source_file_name": info["file_name"],
                           "tile_xyxy": list(tile)})
            boxes, fraction = clip_to_tile(xyxy, tile)
            inside = (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIZE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIZE)
            kept = inside & (crowd | (fraction >= min_fraction))
            report.dropped += int((inside & ~kept).sum())
            report.clipped += int((kept & ~crowd & (fraction < 1)).sum())
            report.kept += int((kept & ~crowd).sum())
            report.ignored += int((kept & crowd).sum())
            for i in np.flatnonzero(kept).tolist():
                bx1, by1, bx2, by2 = boxes[i].tolist()
                annotations.append({"id": len(annotations) + 1, "image_id": tile_id,
                                    "category_id": anns[i]["category_id"], "bbox": [bx1, by1, bx2 - bx1, by2 - by1],
                                    "area": (bx2 - bx1) * (by2 - by1), "iscrowd": int(crowd[i])})
    report.tiles = len(images)
    if with_masks:
        warnings.warn(f"left out the segmentations of {count(with_masks, 'annotation')} of {ann_file}: tiles carry "
                      f"boxes only", stacklevel=2)
    write_coco({"images": images, "annotations": annotations, "categories": coco.dataset["categories"]},
               report.annotations)
    return report

