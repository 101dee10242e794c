"""Pascal VOC, YOLO, CrowdHuman and CSV box annotations, converted once to a cached COCO instances JSON.

Training and evaluation only ever read COCO JSON (``CocoDetection``); each other format has a
converter (``lgd.data.voc``, ``lgd.data.yolo``, ``lgd.data.crowdhuman``, ``lgd.data.csv_boxes``) whose
``to_coco`` returns a COCO instances dict. A class map (``data.class_map``) is applied to that dict in
:func:`convert`, for every format (a COCO split with a class map is converted too). Objects that must
be neither learnt nor counted in evaluation (VOC ``difficult``, CrowdHuman ignore regions) become
``iscrowd=1`` annotations, which ``CocoDetection`` leaves out of training targets and every metric
here ignores.
"""
from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from lgd.choices import FORMATS
from lgd.data import coco, crowdhuman, csv_boxes, voc, yolo
from lgd.data.text_io import read_text
from lgd.errors import DatasetError, count
from lgd.utils.atomic import atomic_write_text

# Bumped whenever a converter's output changes, so older cached conversions are not reused.
CONVERTER_VERSION = 2
ClassMap = Mapping[str, Optional[str]]


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file (one per line, blank lines skipped), a YOLO ``data.yaml`` or a keras-retinanet
    classes ``.csv``.

    In a YAML file, ``names`` is a list or a mapping ``{class id: name}`` with ids 0..K-1; a ``.csv`` has rows
    ``name,id`` with ids 0..K-1, in any order.
    """
    path = Path(path)
    text = read_text(path, "class names file")
    if path.suffix.lower() == ".csv":
        names = _read_class_csv(text, path)
    elif path.suffix.lower() not in (".yaml", ".yml"):
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            names = (yaml.safe_load(text) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as exc:
            raise DatasetError(f"class names file {path} is not a YAML mapping with 'names': {exc}") from None
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise DatasetError(f"class names file {path}: 'names' keys must be the class ids 0..{len(names) - 1}")
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list):
            raise DatasetError(f"class names file {path} has no 'names' list or mapping")
        names = [str(n) for n in names]
    if not names:
        raise DatasetError(f"class names file {path} names no class")
    if len(set(names)) != len(names):
        raise DatasetError(f"class names file {path} repeats a class name")
    return names


def _read_class_csv(text: str, path: Path) -> list[str]:
    """The names of a keras-retinanet classes file (``name,id`` rows), in id order."""
    by_id: dict[int, str] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not "".join(row).strip():
            continue
        try:
            name, class_id = (field.strip() for field in row)
            by_id[int(class_id)] = name
        except ValueError:
            raise DatasetError(f"class names file {path}, row {n}: expected 'name,id' with an integer id, found "
                               f"{','.join(row)!r}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise DatasetError(f"class names file {path}: the ids must be 0..{len(by_id) - 1}, each once")
    return [by_id[i] for i in range(len(by_id))]


def source_names(class_names: Sequence[str], class_map: ClassMap) -> list[str]:
    """The class names a reader of named classes (VOC, CSV) accepts: ``class_names``, then each class map key not
    among them (:func:`apply_class_map` then renames, merges or drops those)."""
    return [*class_names, *(name for name in class_map if name not in class_names)]


def apply_class_map(data: dict[str, Any], class_map: ClassMap, where: str) -> dict[str, Any]:
    """A COCO instances dict with its categories renamed by ``class_map`` (category name -> new name, or None to drop
    the category and its annotations); categories that end with one name become one.

    A merged category keeps the id of the category already bearing the new name, else of the first one mapped to it,
    so results files keep ids of the source; images stay, also those left without objects. Dropped annotations are
    reported in one counted warning.

    Raises:
        DatasetError: a class map key is no category name of ``data`` (``where`` names the annotations).
    """
    if not class_map:
        return data
    names = [str(c.get("name")) for c in data["categories"]]
    unknown = [name for name in class_map if name not in names]
    if unknown:
        raise DatasetError(f"data.class_map maps {', '.join(map(repr, unknown))}, not among the "
                           f"{count(len(names), 'category')} of {where} ({', '.join(names[:8])}"
                           f"{', ...' if len(names) > 8 else ''})")
    kept = {name: c["id"] for name, c in zip(names, data["categories"]) if name not in class_map}
    new_id: dict[int, Optional[int]] = {}
    record_of = {c["id"]: c for c in data["categories"]}
    for name, category in zip(names, data["categories"]):
        target = class_map[name] if name in class_map else name
        new_id[category["id"]] = None if target is None else kept.setdefault(target, category["id"])
    categories = [{**record_of[i], "name": name} for name, i in sorted(kept.items(), key=lambda item: item[1])]
    annotations = [{**a, "category_id": new_id.get(a["category_id"], a["category_id"])} for a in data["annotations"]
                   if new_id.get(a["category_id"], 0) is not None]
    dropped = len(data["annotations"]) - len(annotations)
    if dropped:
        gone = [name for name, target in class_map.items() if target is None]
        warnings.warn(f"data.class_map dropped {count(dropped, 'annotation')} of {', '.join(gone)} in {where}",
                      stacklevel=3)
    return {**data, "categories": categories, "annotations": annotations}


def convert(fmt: str, root: Path, ann: str, names_file: str = "", box: str = "full",
            class_map: Optional[ClassMap] = None) -> tuple[Path, dict[str, Any]]:
    """(image root the COCO ``file_name``s are relative to, COCO instances dict) of one split, ``class_map`` applied.

    ``root`` and ``ann`` mean what ``data.<split>.root/ann`` mean for that format (see the config); "coco" reads the
    instances JSON itself (converted only to apply a class map).
    """
    root = Path(root)
    class_map = class_map or {}
    names = read_class_names(Path(names_file)) if names_file else None
    if fmt in ("yolo", "csv") and names is None:
        raise DatasetError(f"{fmt.upper()} labels need a class names file (data.names_file / --names)")
    if fmt == "voc":
        data = voc.to_coco(root, ann, source_names(names or voc.VOC_CLASSES, class_map), names_file)
    elif fmt == "csv":
        data = csv_boxes.to_coco(root, Path(ann), source_names(names, class_map), names_file)
    elif fmt == "yolo":
        data = yolo.to_coco(root, Path(ann), names)
    elif fmt == "crowdhuman":
        data = crowdhuman.to_coco(root, Path(ann), box)
    elif fmt == "coco":
        data = coco.load_instances(Path(ann))
    else:
        raise DatasetError(f"cannot convert from format '{fmt}'; expected one of {', '.join(FORMATS)}")
    return image_root(fmt, root, ann), apply_class_map(data, class_map, ann)


def image_root(fmt: str, root: Path, ann: str) -> Path:
    """The folder COCO ``file_name``s of a converted split are relative to."""
    return voc.image_folder(root, ann) if fmt == "voc" else Path(root)


def _sources(fmt: str, root: Path, ann: str, names_file: str) -> list[Path]:
    """The annotation files a conversion reads; a change to any of them invalidates the cache."""
    if fmt == "voc" and voc.is_folder_split(root, ann):
        paths = [Path(ann), root]  # the image folder: images are found there by name or stem
    elif fmt == "voc":
        paths = [voc.split_file(root, ann), root / "Annotations"]
    elif fmt == "yolo":
        paths = [Path(ann), root]  # the image folder: images without a label file are part of the dataset
    else:
        paths = [Path(ann)]
    return list(dict.fromkeys(paths + ([Path(names_file)] if names_file else [])))


def _fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
        except FileNotFoundError:  # reported properly by the converter
            out.append((str(f), -1, -1))
    return out


def cached_conversion(fmt: str, root: Path, ann: str, names_file: str, box: str,
                      cache_dir: Path, class_map: Optional[ClassMap] = None) -> tuple[Path, Path]:
    """(image root, COCO JSON) of a split, converting only when no conversion of these exact files is cached.

    The cache key covers the format, the options (the class map too), and the path, size and modification time of
    every annotation file read (and, for YOLO and VOC folders of XML files, of the image folder's files, which
    define the image list), so editing a label file triggers a new conversion. Written atomically: parallel
    processes may race safely.
    """
    root = Path(root).resolve()
    split_name = fmt == "voc" and not ann.endswith(".txt") and not voc.is_folder_split(root, ann)
    ann_path = ann if split_name else str(Path(ann).resolve())
    names_file = str(Path(names_file).resolve()) if names_file else ""
    key = json.dumps([CONVERTER_VERSION, fmt, str(root), ann_path, names_file, box if fmt == "crowdhuman" else "",
                      sorted((class_map or {}).items()), _fingerprint(_sources(fmt, root, ann_path, names_file))])
    out = Path(cache_dir) / "converted" / f"{fmt}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if not out.is_file():
        write_coco(convert(fmt, root, ann_path, names_file, box, class_map)[1], out)
    return image_root(fmt, root, ann_path), out


def write_coco(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(data))


def describe(data: dict[str, Any]) -> str:
    """"N images, M objects + I ignored (iscrowd), K categories" for messages."""
    ignored = sum(a["iscrowd"] for a in data["annotations"])
    return (f"{count(len(data['images']), 'image')}, {count(len(data['annotations']) - ignored, 'object')} + "
            f"{ignored} ignored (difficult / ignore regions, as iscrowd), {count(len(data['categories']), 'category')}")
