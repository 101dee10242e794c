"""CSV box annotations, keras-retinanet's format, to a COCO instances dict.

One row per box, ``image_path,xmin,ymin,xmax,ymax,label``: pixel corners of the image as displayed (EXIF
orientation applied), ``label`` a class name. A row with the image path and the five other fields empty
(``a.jpg,,,,,``) is an image without objects, keras-retinanet's convention for background images; an image
listed on no row is not part of the split. ``image_path`` is relative to the image root (keras-retinanet's
default root is the CSV's folder) or absolute. An optional header row is recognised by its coordinate
fields, none of which is a number (``image_path,xmin,ymin,xmax,ymax,label``). Read with Python's ``csv``
module, so quoted fields (a comma in a file name) work.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from lgd.data.image_io import read_image_size
from lgd.data.records import annotation, coco_categories, unknown_class
from lgd.data.text_io import read_text
from lgd.errors import DatasetError

FIELDS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")
_BOX_FIELDS = FIELDS[1:]


def _float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _number(text: str, name: str, where: str) -> float:
    value = _float(text)
    if value is None or not math.isfinite(value):
        raise DatasetError(f"{where}: field '{name}' is {text!r}, not a number")
    return value


def _is_header(row: list[str]) -> bool:
    """Whether a first row names the columns: every coordinate field filled, none a number."""
    coordinates = row[1:5]
    return len(row) == len(FIELDS) and all(coordinates) and all(_float(v) is None for v in coordinates)


def parse_row(row: list[str], where: str) -> tuple[str, Optional[tuple[float, float, float, float, str]]]:
    """(image path, (xmin, ymin, xmax, ymax, label) or None for a background row) of one row, fields stripped.

    Raises:
        DatasetError: naming ``where`` (file and line) and the field, for a row without 6 fields, an empty image
            path, some box fields empty but not all, a coordinate that is not a number, xmax < xmin or ymax < ymin.
    """
    fields = [v.strip() for v in row]
    if len(fields) != len(FIELDS):
        raise DatasetError(f"{where}: expected {len(FIELDS)} fields {','.join(FIELDS)}, found {len(fields)}")
    image_path, *box = fields
    if not image_path:
        raise DatasetError(f"{where}: field 'image_path' is empty")
    empty = [name for name, value in zip(_BOX_FIELDS, box) if not value]
    if len(empty) == len(_BOX_FIELDS):
        return image_path, None
    if empty:
        raise DatasetError(f"{where}: field{'s' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} "
                           f"{'are' if len(empty) > 1 else 'is'} empty; a background image leaves all five box "
                           f"fields empty ({image_path},,,,,)")
    x1, y1, x2, y2 = (_number(value, name, where) for name, value in zip(_BOX_FIELDS[:4], box))
    if x2 < x1 or y2 < y1:
        raise DatasetError(f"{where}: xmax < xmin or ymax < ymin: {x1:g},{y1:g},{x2:g},{y2:g}")
    return image_path, (x1, y1, x2, y2, box[4])


def to_coco(root: Path, csv_file: Path, class_names: Sequence[str], names_file: str = "") -> dict[str, Any]:
    """The images and boxes of a CSV file, as a COCO instances dict.

    Images are in the order of their first row; ``file_name``s are the paths as written (relative to ``root``, or
    absolute); category ids are 1..K in ``class_names`` order. ``names_file`` names where ``class_names`` came from,
    for messages.

    Raises:
        DatasetError: the file is missing or not UTF-8, holds no row, or a row is bad (see :func:`parse_row`) or of a
            class not in ``class_names``, or an image is missing or unreadable. Messages name file, line and field.
    """
    root, csv_file = Path(root), Path(csv_file)
    reader = csv.reader(io.StringIO(read_text(csv_file, "CSV annotation file"), newline=""))
    category = {name: i + 1 for i, name in enumerate(class_names)}
    images: dict[str, dict[str, Any]] = {}  # normalised path -> image record
    annotations: list[dict[str, Any]] = []
    for row in reader:
        if not "".join(row).strip() or (reader.line_num == 1 and _is_header([v.strip() for v in row])):
            continue
        where = f"{csv_file}, line {reader.line_num}"
        image_path, box = parse_row(row, where)
        key = os.path.normpath(image_path)
        if key not in images:
            width, height = read_image_size(root / image_path, where)
            images[key] = {"id": len(images) + 1, "file_name": image_path, "width": width, "height": height}
        if box is None:
            continue
        x1, y1, x2, y2, label = box
        if label not in category:
            raise unknown_class(f"{where}, field 'label'", label, list(category), names_file)
        xywh = [x1, y1, x2 - x1, y2 - y1]
        annotations.append(annotation(len(annotations) + 1, images[key]["id"], category[label], xywh))
    if not images:
        raise DatasetError(f"CSV annotation file {csv_file} holds no row")
    return {"images": list(images.values()), "annotations": annotations,
            "categories": coco_categories(list(class_names), 1)}
