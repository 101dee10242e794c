"""The pieces of a COCO instances dict that every converter writes (VOC, YOLO, CrowdHuman, CSV), and the error for a
class a converter does not know."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lgd.errors import DatasetError, count


def unknown_class(where: str, name: str, class_names: Sequence[str], names_file: str) -> DatasetError:
    """The error for an object of class ``name`` outside ``class_names``, where ``names_file`` gave them ("" = the
    format's defaults): it says how to add or map the class."""
    shown = ", ".join(class_names[:5]) + (", ..." if len(class_names) > 5 else "")
    fix = (f"add it to the names file {names_file}" if names_file
           else "give your classes in data.names_file / --names")
    return DatasetError(f"{where}: class '{name}' is not among the {count(len(class_names), 'class name')} ({shown}); "
                        f"{fix}, or map it in data.class_map (e.g. {{{name}: OTHER}}, or {{{name}: null}} to drop it)")


def coco_categories(names: list[str], first_id: int) -> list[dict[str, Any]]:
    """COCO category records for ``names``, with ids from ``first_id`` on."""
    return [{"id": first_id + i, "name": name} for i, name in enumerate(names)]


def annotation(ann_id: int, image_id: int, category_id: int, xywh: list[float], iscrowd: bool = False,
               **extra: Any) -> dict[str, Any]:
    """One COCO annotation; ``iscrowd`` marks a region kept out of training and ignored in evaluation."""
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in xywh],
            "area": float(xywh[2] * xywh[3]), "iscrowd": int(iscrowd), **extra}
