"""`lgd predict`: run an exported student on image files, write detections.json and one picture per image.

Large images can be predicted sliced, as SAHI does (:class:`Slicing`): tiles of the image are predicted each at
its own resolution, their detections shifted back to the image's pixels and merged (SAHI's default merge). SAHI
itself is not used: it would install opencv-python, shapely, fire and requests for a grid of a few lines
(``lgd.data.tiling``) and one merge loop, and its torchvision wrapper builds models by torchvision constructor
name with COCO's classes, not from an lgd export.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_area
from tqdm import tqdm

from lgd.data.image_io import IMAGE_EXTENSIONS, find_images, read_image
from lgd.data.tiling import check_tiling, tile_grid
from lgd.draw import draw_detections
from lgd.errors import DatasetError, LGDError
from lgd.utils.files import to_json

# Tiles per forward pass: a batch keeps a GPU busy, and 8 tiles of ~1000 px fit in a few GB.
TILE_BATCH = 8


@dataclass(frozen=True)
class Slicing:
    """Sliced prediction: tiles of ``size`` x ``size`` px overlapping by ``overlap`` (a fraction of ``size``) on
    :func:`lgd.data.tiling.tile_grid`'s grid; same-class detections of two tiles whose intersection covers more
    than ``match_thresh`` of the smaller box (intersection over smaller, SAHI's "IOS") are one object
    (:func:`merge_tiles`)."""

    size: int
    overlap: float = 0.2
    match_thresh: float = 0.5

    def check(self) -> None:
        """Raises LGDError for a bad size, overlap (:func:`check_tiling`) or ``match_thresh`` outside (0, 1]."""
        check_tiling(self.size, self.overlap)
        if not 0 < self.match_thresh <= 1:
            raise LGDError(f"the tile merge threshold must be in (0, 1], got {self.match_thresh}")


@dataclass
class Prediction:
    """What a run did: records written to detections.json, files skipped (with why), hidden files left out, and
    one line per image whose detections reached the per-image limit (more may have been cut)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    limited: list[str] = field(default_factory=list)

    @property
    def detections(self) -> int:
        return sum(len(r["detections"]) for r in self.records)


def input_images(path: Path) -> tuple[list[Path], list[Path]]:
    """(image files to predict, hidden files left out): ``path`` itself, or a folder's top-level images.

    Extensions are matched case-insensitively against ``IMAGE_EXTENSIONS``; hidden files (names starting
    with ".", e.g. macOS's ``._name.png``) are left out of a folder.

    Raises:
        DatasetError: ``path`` does not exist, is a file without an image extension, or a folder with no image.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DatasetError(f"{path} is not an image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        return [path], []
    if not path.is_dir():
        raise DatasetError(f"no such image file or folder: {path}")
    images, hidden = find_images(path)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
    return images, hidden


def picture_names(paths: list[Path]) -> list[str]:
    """The PNG name of each input: ``<stem>.png``, or ``<name>.png`` where two inputs share a stem (a.jpg, a.png)."""
    stems = Counter(p.stem for p in paths)
    return [f"{p.stem if stems[p.stem] == 1 else p.name}.png" for p in paths]


def _limit_holder(model: nn.Module) -> Optional[nn.Module]:
    """Where a torchvision detector holds ``detections_per_img``: RetinaNet and FCOS themselves, the R-CNNs in
    their box head; None for a model without one."""
    head = model if hasattr(model, "detections_per_img") else getattr(model, "roi_heads", None)
    return head if hasattr(head, "detections_per_img") else None


def detection_limit(model: nn.Module) -> Optional[int]:
    """The detections a torchvision detector keeps per image (``detections_per_img``); None for a model
    without one."""
    head = _limit_holder(model)
    return None if head is None else int(head.detections_per_img)


@contextlib.contextmanager
def detections_per_img(model: nn.Module, limit: Optional[int]) -> Iterator[None]:
    """Let ``model`` keep ``limit`` detections per image (per tile when sliced) inside the block, then restore
    its own limits; nothing changes for ``limit`` None or a model without one.

    An R-CNN also keeps at least ``limit`` RPN proposals at test time (``model.rpn_proposals_test``, 1000 by
    default), since with one class each proposal gives at most one detection and they would be the limit.
    """
    head = _limit_holder(model)
    if limit is None or head is None:
        yield
        return
    rpn = getattr(model, "rpn", None)
    tops = [rpn._pre_nms_top_n, rpn._post_nms_top_n] if rpn is not None else []
    own = head.detections_per_img, [top["testing"] for top in tops]
    head.detections_per_img = limit
    for top in tops:
        top["testing"] = max(top["testing"], limit)
    try:
        yield
    finally:
        head.detections_per_img = own[0]
        for top, n in zip(tops, own[1]):
            top["testing"] = n


def merge_tiles(boxes: Tensor, scores: Tensor, labels: Tensor, tiles: Tensor, grid: Tensor,
                match_thresh: float) -> tuple[Tensor, Tensor]:
    """(indices of the detections kept, by decreasing score; their boxes after merging) of overlapping tiles'
    detections, by SAHI's default merge (greedy non-maximum merging, "GREEDYNMM", on intersection over smaller).

    In score order, a detection takes in every detection not yet taken of the same class from another tile whose
    intersection with it covers more than ``match_thresh`` of the smaller of the two boxes; its box becomes the
    union of theirs, its score and class stay. Suppressing instead (NMS) would keep whichever scored higher, and
    that can be the part of an object a tile cuts at its edge; IoU instead of intersection over smaller would
    keep both that part and the whole object in the next tile (a third of a box has IoU 0.33 with it).
    Detections of one tile stay as the detector's own NMS left them.

    Args:
        boxes: (N, 4) XYXY in the image's pixels; scores: (N,); labels: (N,); tiles: (N,) the tile of each, an
            index into ``grid``: (T, 4) the tiles, XYXY in the image's pixels.

    Returns:
        (K,) int64 indices into the inputs and (K, 4) XYXY merged boxes.
    """
    order = scores.argsort(descending=True, stable=True)
    boxes, labels, tiles = boxes[order], labels[order], tiles[order]
    pairs = _matches(boxes, labels, tiles, grid, match_thresh)
    merged = boxes.clone()
    taken = torch.zeros(len(order), dtype=torch.bool)
    firsts, counts = pairs[:, 0].unique_consecutive(return_counts=True)
    # only detections with a match take part; in score order, as the greedy merge visits them
    for i, group in zip(firsts.tolist(), pairs[:, 1].split(counts.tolist())):
        if taken[i]:
            continue
        group = group[~taken[group]]
        if len(group):
            merged[i, :2] = torch.minimum(boxes[i, :2], boxes[group, :2].amin(dim=0))
            merged[i, 2:] = torch.maximum(boxes[i, 2:], boxes[group, 2:].amax(dim=0))
            taken[group] = True
    return order[~taken], merged[~taken]


def _matches(boxes: Tensor, labels: Tensor, tiles: Tensor, grid: Tensor, match_thresh: float) -> Tensor:
    """(P, 2) index pairs (i, j), i < j, sorted, of same-class detections of different tiles whose intersection
    covers more than ``match_thresh`` of the smaller box. Each detection lies in its tile, so only tiles that
    overlap are compared, block by block: a large image's tens of thousands of detections need no N x N matrix.

    Args:
        boxes: (N, 4) XYXY; labels: (N,); tiles: (N,) indices into ``grid``; grid: (T, 4) XYXY of the tiles.
    """
    area = box_area(boxes)
    members = [torch.nonzero(tiles == t)[:, 0] for t in range(len(grid))]
    touching = torch.minimum(grid[:, None, 2:], grid[None, :, 2:]) - torch.maximum(grid[:, None, :2], grid[None, :, :2])
    found = [torch.zeros(0, 2, dtype=torch.int64)]
    for t, u in (touching > 0).all(dim=2).triu(diagonal=1).nonzero().tolist():
        a, b = members[t], members[u]
        if not len(a) or not len(b):
            continue
        corners = (torch.minimum(boxes[a, None, 2:], boxes[None, b, 2:])
                   - torch.maximum(boxes[a, None, :2], boxes[None, b, :2]))
        ios = corners.clamp(min=0).prod(dim=2) / torch.minimum(area[a, None], area[None, b]).clamp(min=1e-6)
        p, q = torch.nonzero((ios > match_thresh) & (labels[a, None] == labels[None, b]), as_tuple=True)
        found.append(torch.stack([torch.minimum(a[p], b[q]), torch.maximum(a[p], b[q])], dim=1))
    pairs = torch.cat(found)
    return pairs[(pairs[:, 0] * len(boxes) + pairs[:, 1]).argsort()]


def _detect(model: nn.Module, image: Tensor, score_thresh: float,
            limit: Optional[int]) -> tuple[dict[str, Tensor], bool]:
    """(the detections scoring at least ``score_thresh``, on the CPU; whether they reached ``limit``). The
    detector keeps its best ``limit``: when all of those pass the threshold, better ones may have been cut."""
    det = {k: v.cpu() for k, v in model([image])[0].items()}
    keep = det["scores"] >= score_thresh
    if limit is not None and int(keep.sum()) > limit:  # a model that does not hold the limit itself
        keep = det["scores"].argsort(descending=True)[:limit].sort().values
    det = {k: v[keep] for k, v in det.items()}
    return det, limit is not None and len(det["scores"]) >= limit


def _detect_sliced(model: nn.Module, image: Tensor, score_thresh: float, limit: Optional[int],
                   slicing: Slicing) -> tuple[dict[str, Tensor], bool]:
    """As :func:`_detect`, on the tiles of ``image`` merged by :func:`merge_tiles`, kept to the best ``limit``
    (boxes, scores, labels: masks are not pasted back). The limit counts as reached when a tile reached it
    or the merged detections exceed it."""
    grid = tile_grid(image.shape[-1], image.shape[-2], slicing.size, slicing.overlap)
    parts, reached = [], False
    for start in range(0, len(grid), TILE_BATCH):
        chunk = grid[start:start + TILE_BATCH]
        outputs = model([image[:, y1:y2, x1:x2] for x1, y1, x2, y2 in chunk])
        for n, ((x1, y1, _, _), out) in enumerate(zip(chunk, outputs), start):
            keep = out["scores"] >= score_thresh
            reached |= limit is not None and int(keep.sum()) >= limit
            shift = torch.tensor([x1, y1, x1, y1], dtype=out["boxes"].dtype, device=out["boxes"].device)
            parts.append((out["boxes"][keep] + shift, out["scores"][keep], out["labels"][keep],
                          torch.full((int(keep.sum()),), n)))
    boxes, scores, labels, tiles = (torch.cat([p[k].cpu() for p in parts]) for k in range(4))
    keep, merged = merge_tiles(boxes, scores, labels, tiles, torch.tensor(grid, dtype=boxes.dtype),
                               slicing.match_thresh)
    if limit is not None and len(keep) > limit:
        reached, keep, merged = True, keep[:limit], merged[:limit]
    return {"boxes": merged, "scores": scores[keep], "labels": labels[keep]}, reached


@torch.no_grad()
def predict(
    model: nn.Module,
    meta: dict[str, Any],
    source: Path,
    out: Path,
    score_thresh: float,
    device: torch.device,
    progress: bool = True,
    max_detections: Optional[int] = None,
    slicing: Optional[Slicing] = None,
) -> Prediction:
    """Detect objects in ``source`` (an image or a folder) and write the results to ``out``.

    ``out/detections.json`` lists, per image read, every detection scoring at least ``score_thresh``
    (box XYXY in the image's pixels as displayed, score, category id and class name), as the detector
    outputs them; it is written even when the run stops early. ``out/<stem>.png`` draws one box per object
    (:func:`lgd.draw.draw_detections`: class-agnostic NMS for the picture only). An image that cannot
    be read is reported in ``skipped`` and the run goes on.

    At most ``max_detections`` detections are kept per image (default: the model's ``detections_per_img``),
    the best-scoring; the model is let keep as many itself (per tile, when sliced) for the run. An image whose
    detections reach that limit is named in ``limited``. With ``slicing``, each image is predicted by tiles
    (:func:`_detect_sliced`), each tile at its own resolution, rather than whole at the model's input size.

    Args:
        model: an exported student in eval mode; meta: its metadata (``lgd.export.load_student``).

    Raises:
        DatasetError: ``source`` holds no image (see :func:`input_images`).
        LGDError: ``max_detections`` < 1, or bad ``slicing`` (:meth:`Slicing.check`).
    """
    if max_detections is not None and max_detections < 1:
        raise LGDError(f"the detections kept per image must be at least 1, got {max_detections}")
    if slicing is not None:
        slicing.check()
    paths, hidden = input_images(source)
    result = Prediction(hidden=hidden)
    limit = max_detections or detection_limit(model)
    offset, names, category_ids = meta["label_offset"], meta["class_names"], meta["category_ids"]
    out.mkdir(parents=True, exist_ok=True)
    with detections_per_img(model, max_detections):
        try:
            for path, picture in tqdm(list(zip(paths, picture_names(paths))), desc="predict", disable=not progress,
                                      dynamic_ncols=True):
                try:
                    image = read_image(path)
                except DatasetError as e:
                    result.skipped.append(str(e))
                    continue
                if slicing is None:
                    det, reached = _detect(model, image.to(device), score_thresh, limit)
                else:
                    det, reached = _detect_sliced(model, image.to(device), score_thresh, limit, slicing)
                if reached:
                    where = "" if len(det["scores"]) >= limit else ", and one of its tiles reached the limit"
                    result.limited.append(f"{path}: {len(det['scores'])} detections{where}; the limit is {limit} "
                                          f"per image (--max-detections): raise it to see more")
                draw_detections(image, det, names, label_offset=offset, score_thresh=score_thresh).save(out / picture)
                result.records.append({
                    "file": str(path),
                    "picture": picture,
                    "detections": [
                        {"box_xyxy": [round(float(x), 2) for x in box], "score": round(float(score), 4),
                         "category_id": category_ids[int(label) - offset], "class_name": names[int(label) - offset]}
                        for box, score, label in zip(det["boxes"], det["scores"], det["labels"])
                    ],
                })
        finally:
            (out / "detections.json").write_text(to_json(result.records, indent=1))
    return result
