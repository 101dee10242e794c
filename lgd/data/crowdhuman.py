"""CrowdHuman ``.odgt`` annotations (one JSON object per line) to a COCO instances dict.

Each line: ``{"ID": ..., "gtboxes": [{"tag": "person" | "mask", "fbox" | "vbox" | "hbox": [x, y, w, h],
"extra": {"ignore": 0 | 1, ...}, "head_attr": {"ignore": 0 | 1, ...}}, ...]}``; the image is
``<images>/<ID>.jpg``. One box type is used, chosen by ``box``: full body (``fbox``), visible body
(``vbox``) or head (``hbox``). Ignore regions — tag other than "person" ("mask": crowds, reflections,
posters), ``extra.ignore`` = 1, and for heads ``head_attr.ignore`` = 1 — become ``iscrowd=1``
annotations with ``"ignore": 1``: not trained on, and in evaluation a detection inside one counts as
neither true nor false positive (the CrowdHuman toolkit's rule). Boxes are clipped to the image, as
the toolkit clips them (full-body boxes of people cut by the border reach outside it).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lgd.data.image_io import read_image_size
from lgd.data.records import annotation
from lgd.data.text_io import read_text
from lgd.errors import DatasetError

BOX_KEYS = {"full": "fbox", "visible": "vbox", "head": "hbox"}


def _ignored(gt: dict[str, Any], box: str) -> bool:
    if gt.get("tag") != "person" or (gt.get("extra") or {}).get("ignore", 0) == 1:
        return True
    return box == "head" and (gt.get("head_attr") or {}).get("ignore", 0) == 1


def _clipped_xywh(gt: dict[str, Any], key: str, width: int, height: int, where: str) -> list[float]:
    xywh = gt.get(key)
    if xywh is None and gt.get("tag") != "person":
        xywh = gt.get("fbox")  # ignore regions may carry only the full box
    if not (isinstance(xywh, list) and len(xywh) == 4 and all(isinstance(v, (int, float)) for v in xywh)):
        raise DatasetError(f"{where}: '{key}' must be 4 numbers [x, y, w, h], found {xywh!r}")
    x1, y1 = max(xywh[0], 0), max(xywh[1], 0)
    x2, y2 = min(xywh[0] + xywh[2], width), min(xywh[1] + xywh[3], height)
    return [x1, y1, x2 - x1, y2 - y1]


def to_coco(images_dir: Path, odgt: Path, box: str = "full") -> dict[str, Any]:
    """The images of an ``.odgt`` file with one box type, as a COCO dict with the one class "person" (id 1).

    ``file_name``s are relative to ``images_dir``. Boxes left with no area inside the image are dropped
    with one counted warning.

    Raises:
        DatasetError: naming file and line, for a line that is not a JSON object, a record without
            "ID" or "gtboxes", an ID already seen, a malformed box, or a missing or unreadable image.
    """
    if box not in BOX_KEYS:
        raise DatasetError(f"CrowdHuman box type must be one of {', '.join(BOX_KEYS)}; got '{box}'")
    images_dir, odgt = Path(images_dir), Path(odgt)
    key = BOX_KEYS[box]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    line_of: dict[str, int] = {}
    dropped = 0
    for n, line in enumerate(read_text(odgt, "CrowdHuman annotation file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{odgt}, line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("ID"), str) \
                or not isinstance(record.get("gtboxes"), list):
            raise DatasetError(f"{where}: expected a JSON object with a string 'ID' and a list 'gtboxes'")
        first = line_of.setdefault(record["ID"], n)
        if first != n:
            raise DatasetError(f"{where}: image ID '{record['ID']}' already has a record on line {first}; "
                               f"merge the two records' gtboxes into one")
        file_name = f"{record['ID']}.jpg"
        width, height = read_image_size(images_dir / file_name, where)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for i, gt in enumerate(record["gtboxes"]):
            if not isinstance(gt, dict):
                raise DatasetError(f"{where}: gtboxes[{i}] is not an object")
            xywh = _clipped_xywh(gt, key, width, height, f"{where}, gtboxes[{i}]")
            if xywh[2] <= 0 or xywh[3] <= 0:
                dropped += 1
                continue
            ignore = _ignored(gt, box)
            annotations.append(annotation(len(annotations) + 1, image_id, 1, xywh, iscrowd=ignore, ignore=int(ignore)))
    if not images:
        raise DatasetError(f"CrowdHuman annotation file {odgt} holds no image record")
    if dropped:
        warnings.warn(f"skipped {dropped} {key} boxes with no area inside their image in {odgt}", stacklevel=2)
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
