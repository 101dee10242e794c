"""Pascal VOC XML annotations (VOC2007 / VOC2012 layout) to a COCO instances dict.

Layout: ``<root>/Annotations/<id>.xml``, ``<root>/JPEGImages/<file>``, ``<root>/ImageSets/Main/<split>.txt``
(one image id per line). Boxes: VOC's ``xmin..xmax`` are 1-based inclusive pixel indices, so pixel
``x`` covers [x - 1, x) and the COCO box is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``
(detectron2's conversion). Continuous IoU on these boxes equals the VOC devkit's ``+1`` pixel IoU on
the original ones. ``difficult`` objects become ``iscrowd=1`` annotations with ``"difficult": 1``:
not trained on, and ignored in evaluation as the VOC devkit ignores them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence
from xml.parsers import expat

from lgd.data.formats import annotation, coco_categories
from lgd.data.image_io import read_image_size
from lgd.data.text_io import read_text
from lgd.errors import DatasetError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_LINE = "lgd-line"  # attribute recording each element's source line (ElementTree keeps none)


def split_file(root: Path, split: str) -> Path:
    """``split`` itself when it is a ``.txt`` path, else ``<root>/ImageSets/Main/<split>.txt``."""
    return Path(split) if split.endswith(".txt") else Path(root) / "ImageSets" / "Main" / f"{split}.txt"


def read_split(path: Path) -> list[tuple[int, str]]:
    """(line number, image id) of each non-blank line; only the first column counts (class files add ±1)."""
    text = read_text(path, "VOC split file")
    return [(n, line.split()[0]) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_xml(path: Path) -> ET.Element:
    """The XML tree of ``path``, each element carrying its source line number in attribute ``lgd-line``."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartElementHandler = lambda tag, attrs: builder.start(tag, {**attrs, _LINE: str(parser.CurrentLineNumber)})
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(path.read_bytes(), True)
    except FileNotFoundError:
        raise DatasetError(f"VOC annotation file {path} does not exist") from None
    except expat.ExpatError as exc:
        raise DatasetError(
            f"{path}, line {exc.lineno}: malformed XML ({expat.errors.messages[exc.code]}, column {exc.offset + 1})"
        ) from None
    return builder.close()


def _text(element: ET.Element, tag: str, path: Path) -> str:
    child = element.find(tag)
    if child is None or not (child.text or "").strip():
        raise DatasetError(f"{path}, line {element.get(_LINE)}: <{element.tag}> lacks <{tag}>")
    return child.text.strip()


def _number(element: ET.Element, tag: str, path: Path) -> float:
    text = _text(element, tag, path)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{path}, line {element.find(tag).get(_LINE)}: <{tag}> is '{text}', not a number") from None


def parse_objects(root: ET.Element, path: Path) -> list[dict[str, Any]]:
    """Each ``<object>``: name, difficult (0/1), box (xmin, ymin, xmax, ymax) in VOC pixels, line of its name."""
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{path}, line {obj.get(_LINE)}: <object> lacks <bndbox>")
        xyxy = tuple(_number(box, k, path) for k in ("xmin", "ymin", "xmax", "ymax"))
        if xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
            raise DatasetError(f"{path}, line {box.get(_LINE)}: <bndbox> has xmax < xmin or ymax < ymin: {xyxy}")
        difficult = obj.find("difficult")
        objects.append({
            "name": _text(obj, "name", path),
            "difficult": int(difficult is not None and (difficult.text or "0").strip() not in ("0", "")),
            "box": xyxy,
            "line": obj.find("name").get(_LINE),
        })
    return objects


def image_file(root: Path, voc_id: str, tree: ET.Element) -> str:
    """The image of annotation ``voc_id``, relative to ``<root>/JPEGImages``: ``<id>.jpg``, the devkit's rule.

    The XML's ``<filename>`` is used only when ``<id>.jpg`` does not exist: scripts that copy or augment
    annotations often leave it stale, which would put one record's boxes on another record's image.
    """
    default = f"{voc_id}.jpg"
    element = tree.find("filename")
    given = (element.text or "").strip() if element is not None else ""
    images = Path(root) / "JPEGImages"
    if given and not (images / default).is_file() and (images / given).is_file():
        return given
    return default


def to_coco(root: Path, split: str, class_names: Sequence[str] = VOC_CLASSES) -> dict[str, Any]:
    """The images listed in a VOC split file and their objects, as a COCO instances dict.

    ``file_name``s are relative to ``<root>/JPEGImages`` (see :func:`image_file`); category ids are 1..K in
    ``class_names`` order. Image sizes are read from the image files as displayed (EXIF orientation applied),
    not from ``<size>``, which hand-labelled sets often get wrong.

    Raises:
        DatasetError: the split file, an XML or an image is missing or unreadable; malformed XML; an object of
            a class not in ``class_names``; a box field missing or not a number; an id listed twice, or two
            annotations resolving to one image. Messages name file and line.
    """
    root = Path(root)
    split_path = split_file(root, split)
    category = {name: i + 1 for i, name in enumerate(class_names)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    owner: dict[str, tuple[int, Path]] = {}  # file_name -> (split line, XML) of the record that took it
    for line, voc_id in read_split(split_path):
        xml_path = root / "Annotations" / f"{voc_id}.xml"
        if not xml_path.is_file():
            raise DatasetError(f"{split_path}, line {line}: image id '{voc_id}' has no annotation file {xml_path}")
        tree = parse_xml(xml_path)
        file_name = image_file(root, voc_id, tree)
        first_line, first_xml = owner.setdefault(file_name, (line, xml_path))
        if first_xml == xml_path and first_line != line:
            raise DatasetError(f"{split_path}, lines {first_line} and {line}: image id '{voc_id}' is listed twice")
        if first_xml != xml_path:
            raise DatasetError(
                f"{first_xml} and {xml_path} (lines {first_line} and {line} of {split_path}) both resolve to image "
                f"{root / 'JPEGImages' / file_name} ({voc_id}.jpg does not exist, and its <filename> names that "
                f"image): give each annotation its own image, or remove one from the split"
            )
        width, height = read_image_size(root / "JPEGImages" / file_name, str(xml_path))
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "voc_id": voc_id})
        for obj in parse_objects(tree, xml_path):
            if obj["name"] not in category:
                raise DatasetError(
                    f"{xml_path}, line {obj['line']}: class '{obj['name']}' is not among the {len(category)} class "
                    f"names ({', '.join(list(category)[:5])}, ...); give your classes in data.names_file / --names"
                )
            x1, y1, x2, y2 = obj["box"]
            annotations.append(annotation(
                len(annotations) + 1, image_id, category[obj["name"]], [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                iscrowd=bool(obj["difficult"]), difficult=obj["difficult"],
            ))
    if not images:
        raise DatasetError(f"VOC split file {split_path} lists no image")
    return {"images": images, "annotations": annotations, "categories": coco_categories(list(class_names), 1)}
