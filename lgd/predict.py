"""`lgd predict`: run an exported student on image files, write detections.json and one picture per image."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lgd.data.image_io import IMAGE_EXTENSIONS, find_images, read_image
from lgd.draw import draw_detections
from lgd.errors import DatasetError
from lgd.utils.files import to_json


@dataclass
class Prediction:
    """What a run did: records written to detections.json, files skipped (with why), hidden files left out."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)

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


@torch.no_grad()
def predict(
    model: nn.Module,
    meta: dict[str, Any],
    source: Path,
    out: Path,
    score_thresh: float,
    device: torch.device,
    progress: bool = True,
) -> Prediction:
    """Detect objects in ``source`` (an image or a folder) and write the results to ``out``.

    ``out/detections.json`` lists, per image read, every detection scoring at least ``score_thresh``
    (box XYXY in the image's pixels as displayed, score, category id and class name), as the detector
    outputs them; it is written even when the run stops early. ``out/<stem>.png`` draws one box per object
    (:func:`lgd.draw.draw_detections`: class-agnostic NMS for the picture only). An image that cannot
    be read is reported in ``skipped`` and the run goes on.

    Args:
        model: an exported student in eval mode; meta: its metadata (``lgd.export.load_student``).

    Raises:
        DatasetError: ``source`` holds no image (see :func:`input_images`).
    """
    paths, hidden = input_images(source)
    result = Prediction(hidden=hidden)
    offset, names, category_ids = meta["label_offset"], meta["class_names"], meta["category_ids"]
    out.mkdir(parents=True, exist_ok=True)
    try:
        for path, picture in tqdm(list(zip(paths, picture_names(paths))), desc="predict", disable=not progress,
                                  dynamic_ncols=True):
            try:
                image = read_image(path)
            except DatasetError as e:
                result.skipped.append(str(e))
                continue
            det = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
            keep = det["scores"] >= score_thresh
            det = {k: v[keep] for k, v in det.items()}
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
