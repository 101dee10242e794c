"""Pascal VOC, YOLO and CrowdHuman annotations, converted once to a cached COCO instances JSON.

Training and evaluation only ever read COCO JSON (``CocoDetection``); each other format has a
converter (``lgd.data.voc``, ``lgd.data.yolo``, ``lgd.data.crowdhuman``) whose ``to_coco`` returns a
COCO instances dict. Objects that must be neither learnt nor counted in evaluation (VOC
``difficult``, CrowdHuman ignore regions) become ``iscrowd=1`` annotations, which ``CocoDetection``
leaves out of training targets and every metric here ignores.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from lgd.atomic import atomic_write_text
from lgd.data.text_io import read_text
from lgd.errors import DatasetError

FORMATS = ("coco", "voc", "yolo", "crowdhuman")
# Bumped whenever a converter's output changes, so older cached conversions are not reused.
CONVERTER_VERSION = 1


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file (one per line, blank lines skipped) or a YOLO ``data.yaml``.

    In a YAML file, ``names`` is a list or a mapping ``{class id: name}`` with ids 0..K-1.
    """
    path = Path(path)
    text = read_text(path, "class names file")
    if path.suffix.lower() not in (".yaml", ".yml"):
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


def coco_categories(names: list[str], first_id: int) -> list[dict[str, Any]]:
    return [{"id": first_id + i, "name": name} for i, name in enumerate(names)]


def annotation(ann_id: int, image_id: int, category_id: int, xywh: list[float], iscrowd: bool = False,
               **extra: Any) -> dict[str, Any]:
    """One COCO annotation; ``iscrowd`` marks a region kept out of training and ignored in evaluation."""
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in xywh],
            "area": float(xywh[2] * xywh[3]), "iscrowd": int(iscrowd), **extra}


def convert(fmt: str, root: Path, ann: str, names_file: str = "", box: str = "full") -> tuple[Path, dict[str, Any]]:
    """(image root the COCO ``file_name``s are relative to, COCO instances dict) of one split.

    ``root`` and ``ann`` mean what ``data.<split>.root/ann`` mean for that format (see the config).
    """
    from lgd.data import crowdhuman, voc, yolo  # the converters import this module's helpers

    root = Path(root)
    names = read_class_names(Path(names_file)) if names_file else None
    if fmt == "voc":
        data = voc.to_coco(root, ann, names or voc.VOC_CLASSES)
    elif fmt == "yolo":
        if names is None:
            raise DatasetError("YOLO labels need a class names file (data.names_file / --names)")
        data = yolo.to_coco(root, Path(ann), names)
    elif fmt == "crowdhuman":
        data = crowdhuman.to_coco(root, Path(ann), box)
    else:
        raise DatasetError(f"cannot convert from format '{fmt}'; expected one of {', '.join(FORMATS[1:])}")
    return image_root(fmt, root), data


def image_root(fmt: str, root: Path) -> Path:
    """The folder COCO ``file_name``s of a converted split are relative to."""
    return Path(root) / "JPEGImages" if fmt == "voc" else Path(root)


def _sources(fmt: str, root: Path, ann: str, names_file: str) -> list[Path]:
    """The annotation files a conversion reads; a change to any of them invalidates the cache."""
    from lgd.data import voc

    if fmt == "voc":
        paths = [voc.split_file(root, ann), root / "Annotations"]
    elif fmt == "yolo":
        paths = [Path(ann), root]  # the image folder: images without a label file are part of the dataset
    else:
        paths = [Path(ann)]
    return paths + ([Path(names_file)] if names_file else [])


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
                      cache_dir: Path) -> tuple[Path, Path]:
    """(image root, COCO JSON) of a split, converting only when no conversion of these exact files is cached.

    The cache key covers the format, the options, and the path, size and modification time of every
    annotation file read (and, for YOLO, of the image folder's files, which define the image list), so
    editing a label file triggers a new conversion. Written atomically: parallel processes may race safely.
    """
    root = Path(root).resolve()
    ann_path = ann if fmt == "voc" and not ann.endswith(".txt") else str(Path(ann).resolve())
    names_file = str(Path(names_file).resolve()) if names_file else ""
    key = json.dumps([CONVERTER_VERSION, fmt, str(root), ann_path, names_file, box if fmt == "crowdhuman" else "",
                      _fingerprint(_sources(fmt, root, ann_path, names_file))])
    out = Path(cache_dir) / "converted" / f"{fmt}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if not out.is_file():
        write_coco(convert(fmt, root, ann_path, names_file, box)[1], out)
    return image_root(fmt, root), out


def write_coco(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(data))


def describe(data: dict[str, Any]) -> str:
    """"N images, M objects + I ignored (iscrowd), K categories" for messages."""
    ignored = sum(a["iscrowd"] for a in data["annotations"])
    return (f"{len(data['images'])} images, {len(data['annotations']) - ignored} objects + {ignored} ignored "
            f"(difficult / ignore regions, as iscrowd), {len(data['categories'])} categories")
