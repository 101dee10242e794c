"""Pascal VOC XML annotations (VOC2007 / VOC2012 layout) to a COCO instances dict.

Layouts: the devkit's, ``<root>/Annotations/<id>.xml``, ``<root>/JPEGImages/<file>``,
``<root>/ImageSets/Main/<split>.txt`` (one image id per line); or labelImg's, a folder of ``.xml`` files
(given as the split) with their images in ``root`` (often the same folder). Boxes: VOC's ``xmin..xmax`` are
1-based inclusive pixel indices, so pixel ``x`` covers [x - 1, x) and the COCO box is
``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (detectron2's conversion). Continuous IoU on these
boxes equals the VOC devkit's ``+1`` pixel IoU on the original ones. ``difficult`` objects become ``iscrowd=1``
annotations with ``"difficult": 1``: not trained on, and ignored in evaluation as the VOC devkit ignores them.
"""
from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional, Sequence
from xml.parsers import expat

from lgd.data.image_io import IMAGE_EXTENSIONS, find_images, read_image_size
from lgd.data.records import annotation, coco_categories, unknown_class
from lgd.data.text_io import read_text
from lgd.errors import DatasetError, count

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


def is_folder_split(root: Path, split: str) -> bool:
    """Whether ``split`` names a folder of XML files (labelImg's layout, each ``.xml`` beside its image) rather than a
    devkit split: an existing folder that is not also a split name under ``<root>/ImageSets/Main``."""
    return not split.endswith(".txt") and not split_file(root, split).is_file() and Path(split).is_dir()


def image_folder(root: Path, split: str) -> Path:
    """The folder a split's COCO ``file_name``s are relative to: ``<root>/JPEGImages`` in the devkit layout, ``root``
    itself for a folder of XML files."""
    return Path(root) if is_folder_split(root, split) else Path(root) / "JPEGImages"


def _missing_split(root: Path, split: str, split_path: Path) -> DatasetError:
    """The error for a split that is neither a split file nor a folder of XML files, with the layout it looks like."""
    if split.lower().endswith(".xml"):
        return DatasetError(
            f"VOC annotations '{split}' is one XML file; give a split name (ImageSets/Main/<name>.txt), a split .txt, "
            f"or a folder of XML files (labelImg's layout): here {Path(split).parent}")
    message = f"VOC split file {split_path} does not exist"
    xmls = list(Path(root).glob("*.xml")) if Path(root).is_dir() else []
    if xmls and not (Path(root) / "ImageSets").is_dir():
        message += (f"; {root} has no ImageSets/Main but holds {count(len(xmls), '.xml file')}: for XML files beside "
                    f"their images (labelImg's layout) give that folder as the annotations, data.<split>.ann={root} "
                    f"(or --ann {root})")
    return DatasetError(message)


def _annotation_files(root: Path, split: str) -> list[tuple[Optional[int], str, Path]]:
    """(line of the split file or None, image id, XML file) of each annotation of a split, in order.

    A folder of XML files: each top-level ``.xml`` (hidden ones skipped, with one counted warning), its id the stem.
    """
    if is_folder_split(root, split):
        folder = Path(split)
        xmls = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml" and p.is_file())
        hidden = [p for p in xmls if p.name.startswith(".")]
        if hidden:
            warnings.warn(f"skipped {count(len(hidden), 'hidden file')} in {folder} (e.g. {hidden[0].name}): names "
                          f"starting with '.' (such as macOS's ._ companions) are not annotations", stacklevel=3)
        records = [(None, p.stem, p) for p in xmls if not p.name.startswith(".")]
        if not records:
            raise DatasetError(f"VOC annotation folder {folder} holds no .xml file")
        return records
    split_path = split_file(root, split)
    if not split_path.exists():
        raise _missing_split(root, split, split_path)
    records = []
    for line, voc_id in read_split(split_path):
        xml_path = Path(root) / "Annotations" / f"{voc_id}.xml"
        if not xml_path.is_file():
            raise DatasetError(f"{split_path}, line {line}: image id '{voc_id}' has no annotation file {xml_path}")
        records.append((line, voc_id, xml_path))
    return records


class _ImageFinder:
    """Finds the image of an annotation in one folder: by the names it gives, else by its stem with any image
    extension (the folder is listed once, when first needed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._by_stem: Optional[dict[str, list[str]]] = None
        self.by_stem_examples: list[str] = []  # "X.xml: named a.tif, found a.png" for the counted warning

    def find(self, names: list[str], stems: list[str], xml_path: Path) -> str:
        """The first of ``names`` that exists in the folder, else the one image whose stem is one of ``stems``.

        Raises:
            DatasetError: no such image (the message lists what was tried), or several images share the stem.
        """
        for name in names:
            if (self.folder / name).is_file():
                return name
        if self._by_stem is None:
            self._by_stem = {}
            for path in find_images(self.folder)[0]:
                self._by_stem.setdefault(path.stem, []).append(path.name)
        for stem in stems:
            found = self._by_stem.get(stem, [])
            if len(found) > 1:
                raise DatasetError(f"{xml_path}: {', '.join(names)} does not exist in {self.folder}, and "
                                   f"{len(found)} images have the stem '{stem}' ({', '.join(found)}): set <filename> "
                                   f"to the right one")
            if found:
                self.by_stem_examples.append(f"{xml_path.name}: named {names[-1]}, found {found[0]}")
                return found[0]
        tried = ", ".join(str(self.folder / n) for n in names)
        raise DatasetError(
            f"{xml_path}: its image is not in {self.folder}: tried {tried}, and any image named "
            f"{' or '.join(dict.fromkeys(stems))} with an image extension ({', '.join(IMAGE_EXTENSIONS)})")


def image_names(voc_id: str, tree: ET.Element, devkit: bool) -> tuple[list[str], list[str]]:
    """(file names to try in order, stems to look for after them) for the image of annotation ``voc_id``.

    Devkit layout: ``<id>.jpg`` (the devkit's rule), then the XML's ``<filename>``: scripts that copy or augment
    annotations often leave ``<filename>`` stale, which would put one record's boxes on another record's image.
    A folder of XML files (labelImg): ``<filename>``, which labelImg writes. Then, when neither exists, the image
    with the stem of the id or of ``<filename>`` and any image extension (a ``.tif`` named, a ``.png`` there).
    """
    element = tree.find("filename")
    given = (element.text or "").strip() if element is not None else ""
    names = ([f"{voc_id}.jpg"] if devkit else []) + ([given] if given else [])
    stems = [voc_id] + ([Path(given).stem] if given else [])
    return list(dict.fromkeys(names)) or [f"{voc_id}.jpg"], list(dict.fromkeys(stems))


def to_coco(root: Path, split: str, class_names: Sequence[str] = VOC_CLASSES, names_file: str = "") -> dict[str, Any]:
    """The images of a VOC split and their objects, as a COCO instances dict.

    ``split`` is a devkit split (a name under ``<root>/ImageSets/Main`` or a split ``.txt``, annotations in
    ``<root>/Annotations``) or a folder of XML files (labelImg's layout; images in ``root``, which may be that
    folder). ``file_name``s are relative to :func:`image_folder`; the image of each XML is found as
    :func:`image_names` says, the ones found by stem reported in one counted warning. Category ids are 1..K in
    ``class_names`` order. Image sizes are read from the image files as displayed (EXIF orientation applied), not
    from ``<size>``, which hand-labelled sets often get wrong. ``names_file`` names where ``class_names`` came
    from, for messages ("" = the defaults).

    Raises:
        DatasetError: the split file, an XML or an image is missing or unreadable (listing the image names tried);
            malformed XML; an object of a class not in ``class_names``; a box field missing or not a number; an id
            listed twice, or two annotations resolving to one image. Messages name file and line.
    """
    root = Path(root)
    devkit = not is_folder_split(root, split)
    images_dir = image_folder(root, split)
    finder = _ImageFinder(images_dir)
    category = {name: i + 1 for i, name in enumerate(class_names)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    owner: dict[str, tuple[Optional[int], Path]] = {}  # file_name -> (split line, XML) of the record that took it
    for line, voc_id, xml_path in _annotation_files(root, split):
        tree = parse_xml(xml_path)
        file_name = finder.find(*image_names(voc_id, tree, devkit), xml_path)
        first_line, first_xml = owner.setdefault(file_name, (line, xml_path))
        if first_xml == xml_path and first_line != line:
            raise DatasetError(f"{split_file(root, split)}, lines {first_line} and {line}: image id '{voc_id}' is "
                               f"listed twice")
        if first_xml != xml_path:
            lines = f" (lines {first_line} and {line} of {split_file(root, split)})" if devkit else ""
            raise DatasetError(
                f"{first_xml} and {xml_path}{lines} both resolve to image {images_dir / file_name} (its id, "
                f"<filename> or stem names that image): give each annotation its own image, or remove one"
                + (" from the split" if devkit else ""))
        width, height = read_image_size(images_dir / file_name, str(xml_path))
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "voc_id": voc_id})
        for obj in parse_objects(tree, xml_path):
            if obj["name"] not in category:
                raise unknown_class(f"{xml_path}, line {obj['line']}", obj["name"], list(category), names_file)
            x1, y1, x2, y2 = obj["box"]
            annotations.append(annotation(
                len(annotations) + 1, image_id, category[obj["name"]], [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                iscrowd=bool(obj["difficult"]), difficult=obj["difficult"],
            ))
    if finder.by_stem_examples:
        found = finder.by_stem_examples
        warnings.warn(f"found {count(len(found), 'image')} of {split} by the stem of its annotation, as the file its "
                      f"XML names does not exist in {images_dir} (e.g. {found[0]})", stacklevel=2)
    if not images:
        raise DatasetError(f"VOC split file {split_file(root, split)} lists no image")
    return {"images": images, "annotations": annotations, "categories": coco_categories(list(class_names), 1)}
