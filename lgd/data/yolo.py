"""YOLO text labels (``class cx cy w h``, normalised to [0, 1]) to a COCO instances dict.

Layout: an image folder and a labels folder mirroring it, ``<images>/<sub>/<stem>.<ext>`` pairing with
``<labels>/<sub>/<stem>.txt``. An image without a label file has no objects (YOLO's convention for
background images); a label file without an image is skipped with one counted warning.
Category ids are the YOLO class ids (0..K-1), so COCO results carry the ids the labels use.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from lgd.data.image_io import IMAGE_EXTENSIONS, find_images, read_image_size
from lgd.data.records import annotation, coco_categories
from lgd.data.text_io import read_text
from lgd.errors import DatasetError, count


def parse_label_file(path: Path, num_classes: int) -> list[tuple[int, float, float, float, float]]:
    """(class, cx, cy, w, h) per non-blank line.

    Raises:
        DatasetError: naming file and line, for a line without exactly 5 fields (6 is taken for a predictions
            file's confidence column, more for segmentation polygons), a field that is not a
            number, a class id outside 0..num_classes-1, or a coordinate outside [0, 1].
    """
    rows = []
    for n, line in enumerate(read_text(path, "YOLO label file").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {n}"
        if len(fields) != 5:
            hint = ""
            if len(fields) == 6:
                hint = (" (it looks like a predictions file with a confidence column, as 'save_conf' writes: "
                        "labels have no confidence)")
            elif len(fields) > 6:
                hint = " (segmentation polygons are not supported)"
            raise DatasetError(f"{where}: expected 5 fields 'class cx cy w h', found {len(fields)}{hint}")
        try:
            cls_value, *coords = (float(v) for v in fields)
        except ValueError:
            raise DatasetError(f"{where}: fields must be numbers, found {line.strip()!r}") from None
        if not cls_value.is_integer() or not 0 <= cls_value < num_classes:
            raise DatasetError(f"{where}: class id {fields[0]} is not in 0..{num_classes - 1} "
                               f"(the names file lists {count(num_classes, 'class')})")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in coords):
            raise DatasetError(f"{where}: coordinates must be normalised to [0, 1], found {' '.join(fields[1:])}")
        rows.append((int(cls_value), *coords))
    return rows


def to_coco(images_dir: Path, labels_dir: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """Every image under ``images_dir`` (sorted, subfolders included) with its labels, as a COCO dict.

    ``file_name``s are relative to ``images_dir``; hidden files are skipped with one counted warning.
    Boxes: ``[(cx - w/2) W, (cy - h/2) H, w W, h H]`` in pixels of the image as displayed (EXIF orientation
    applied: labelling tools normalise by the size they show).
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder, what in ((images_dir, "image"), (labels_dir, "label")):
        if not folder.is_dir():
            raise DatasetError(f"YOLO {what} folder {folder} does not exist")
    image_files, hidden = find_images(images_dir, recursive=True)
    if hidden:
        warnings.warn(f"skipped {len(hidden)} hidden files in {images_dir} (e.g. {hidden[0]}): names starting with "
                      f"'.' (such as macOS's ._ companions) are not images", stacklevel=2)
    if not image_files:
        raise DatasetError(f"YOLO image folder {images_dir} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    label_of: dict[Path, Path] = {}
    for image in image_files:
        label = labels_dir / image.relative_to(images_dir).with_suffix(".txt")
        if label in label_of:
            raise DatasetError(f"images {label_of[label]} and {image} would share the label file {label}")
        label_of[label] = image
    orphans = sorted(p for p in labels_dir.rglob("*.txt") if p not in label_of and p.name != "classes.txt")
    if orphans:
        warnings.warn(f"skipped {len(orphans)} label files without an image in {images_dir} (e.g. {orphans[0]})",
                      stacklevel=2)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for label, image in label_of.items():
        width, height = read_image_size(image, f"YOLO images folder {images_dir}")
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": image.relative_to(images_dir).as_posix(),
                       "width": width, "height": height})
        if not label.is_file():
            continue
        for cls, cx, cy, w, h in parse_label_file(label, len(class_names)):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append(annotation(len(annotations) + 1, image_id, cls, box))
    return {"images": images, "annotations": annotations, "categories": coco_categories(list(class_names), 0)}
