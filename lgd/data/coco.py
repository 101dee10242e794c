"""COCO instances dataset: validated loading, contiguous labels, tv_tensors targets."""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors

from lgd.data.ground_truth import MIN_BOX_SIZE, renumber, validate_annotations, warn_counted, warn_crowd_only_classes
from lgd.data.image_io import describe, read_image, stored_size_note
from lgd.data.text_io import read_json
from lgd.errors import DatasetError

Index = Union[int, tuple[int, int]]
__all__ = ["MIN_BOX_SIZE", "CocoDetection", "load_instances"]


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format instances file and its image folder.

    Sample ``i`` is ``(image, target)``: ``image`` a float32 ``tv_tensors.Image`` (3, H, W)
    in [0, 1]; ``target`` a dict with "boxes" (N, 4) XYXY ``tv_tensors.BoundingBoxes``,
    "labels" (N,) int64 in ``label_offset .. label_offset + K - 1``, "image_id" (int) and,
    with ``with_masks``, "masks" (N, H, W) uint8 ``tv_tensors.Mask``. The annotations are the
    validated ground truth of :func:`lgd.data.ground_truth.validate_annotations` (unusable boxes
    and exact duplicates dropped, boxes clipped to their image), numbered 1..N (see
    :meth:`source_annotation_id`); ``self.coco`` indexes them for evaluation, crowd regions
    included, which targets leave out. Images are read by :func:`lgd.data.image_io.read_image`
    (EXIF orientation applied, high bit depths scaled by their range).

    Every image the split uses must exist when the dataset is built, so a wrong ``root`` fails
    before training starts (naming a parent or subfolder of ``root`` that holds the files, if
    one does). With ``with_masks``, an annotation whose segmentation gives no mask (``[]``, or
    no polygon of 3 or more points) becomes an ignore region (``iscrowd=1``, its box as
    polygon) with one counted warning: Mask R-CNN trains a mask for every box it learns, so
    the object leaves box and mask training alike, and evaluation neither rewards nor
    penalises detections on it (pycocotools cannot score an empty segmentation).

    Index with ``(i, sample_seed)`` to make random transforms a pure function of the seed.
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path,
        transforms: Callable[..., Any] | None = None,
        label_offset: int = 0,
        with_masks: bool = False,
        filter_empty: bool = False,
    ) -> None:
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.label_offset = label_offset
        self.with_masks = with_masks

        raw = _load_json(self.ann_file)
        images, categories = _validate(raw, self.ann_file)
        self._dataset = {**raw, "annotations": validate_annotations(raw["annotations"], images, self.ann_file)}
        if with_masks:
            self._ignore_unusable_segmentations(images)
        warn_crowd_only_classes(self._dataset["annotations"], categories, self.ann_file)
        self._source_ids = renumber(self._dataset["annotations"])
        self.cat_ids: list[int] = sorted(categories)
        self.class_names: list[str] = [categories[c] for c in self.cat_ids]
        self._cat_to_index = {c: i for i, c in enumerate(self.cat_ids)}
        self._images = images
        self._image_pos = {image_id: pos for pos, image_id in enumerate(images)}
        self._collect_targets()
        counts = np.diff(self._starts)
        self.ids: list[int] = [
            image_id for image_id, count in zip(images, counts.tolist()) if count > 0 or not filter_empty
        ]
        self._check_image_files()
        self._coco: COCO | None = None

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.cat_ids)

    def source_annotation_id(self, ann_id: int) -> int:
        """The id an annotation has in the file, of its id ``ann_id`` (1..N) in ``self.coco``.

        Raises:
            ValueError: ``ann_id`` is not an annotation id of ``self.coco``.
        """
        if not 1 <= int(ann_id) <= len(self._source_ids):
            raise ValueError(f"annotation id {ann_id} is outside 1..{len(self._source_ids)}")
        return int(self._source_ids[int(ann_id) - 1])

    def check_trainable(self) -> None:
        """Raise unless some image has an object to train on, saying why none has.

        Raises:
            DatasetError: no object is left (also with ``filter_empty`` off, which would train on empty images
                only); the message names the cause when every annotation is a crowd region (``iscrowd=1``, as
                CVAT's COCO export writes brush-drawn masks).
        """
        if len(self._boxes):
            return
        anns = self._dataset["annotations"]
        where = f"the training set {self.ann_file} ({len(self._images)} images)"
        if anns and all(a["iscrowd"] for a in anns):
            raise DatasetError(
                f"{where} has no object to train on: all its {len(anns)} annotations are crowd regions (field "
                f"'iscrowd' = 1, e.g. annotation id {self.source_annotation_id(anns[0]['id'])}), which training "
                f"leaves out and evaluation ignores. CVAT's COCO export marks brush-drawn masks (RLE) iscrowd=1: "
                f"set iscrowd=0 on the objects meant to be learnt"
            )
        raise DatasetError(f"{where} has no object to train on ({len(anns)} usable annotations)")

    @property
    def coco(self) -> COCO:
        """pycocotools index over the validated ground truth (crowds included), built on first use."""
        if self._coco is None:
            coco = COCO()
            coco.dataset = self._dataset
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes never evaluate; rebuilding the index there on demand beats pickling it.
        state = self.__dict__.copy()
        state["_coco"] = None
        return state

    def trained_objects(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The objects training uses, as loaded: ``boxes`` (M, 4) float32 XYXY pixels clipped to their image,
        ``classes`` (M,) int64 class indices (into ``class_names``) and ``per_image`` (images,) int64 counts in
        file order, every image record included (also those ``filter_empty`` drops). Crowd annotations and the
        ones dropped at load (zero-size, outside the image, duplicates) are not in them."""
        return self._boxes, self._labels, np.diff(self._starts).astype(np.int64)

    def label_to_category_id(self, label: int) -> int:
        """Category id of a model label (``label = class index + label_offset``)."""
        index = int(label) - self.label_offset
        if not 0 <= index < len(self.cat_ids):
            last = self.label_offset + len(self.cat_ids) - 1
            raise ValueError(f"label {label} is outside {self.label_offset}..{last}")
        return self.cat_ids[index]

    def category_id_to_label(self, category_id: int) -> int:
        """Model label of a category id; the inverse of :meth:`label_to_category_id`."""
        try:
            return self._cat_to_index[int(category_id)] + self.label_offset
        except KeyError:
            raise ValueError(f"category id {category_id} is not in {self.ann_file}") from None

    def __len__(self) -> int:
        return len(self.ids)

    def image_info(self, idx: int) -> dict[str, Any]:
        """The image record of sample ``idx`` as it appears in the JSON."""
        return self._images[self.ids[idx]]

    def aspect_ratio(self, idx: int) -> float:
        """Width / height of sample ``idx`` from the JSON, without reading the image."""
        info = self.image_info(idx)
        return info["width"] / info["height"]

    def __getitem__(self, index: Index) -> tuple[tv_tensors.Image, dict[str, Any]]:
        if isinstance(index, tuple):
            idx, sample_seed = index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return self._sample(idx)
        return self._sample(index)

    def _sample(self, idx: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.ids[idx]
        info = self._images[image_id]
        height, width = info["height"], info["width"]
        pos = self._image_pos[image_id]
        rows = slice(self._starts[pos], self._starts[pos + 1])
        image = tv_tensors.Image(self._read_image(info))
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(self._boxes[rows].copy()), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(self._labels[rows] + self.label_offset),
            "image_id": image_id,
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(_decode_masks(self._segments[rows], height, width))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _read_image(self, info: dict[str, Any]) -> torch.Tensor:
        """(3, H, W) float32 pixels of an image record, checked against its width and height."""
        path = self.root / info["file_name"]
        where = f"{self.ann_file}, image id {info['id']}"
        image = read_image(path, where)
        height, width = image.shape[-2:]
        if (width, height) != (info["width"], info["height"]):
            raise DatasetError(
                f"{describe(path, where)} is {width}x{height} pixels but its record says width={info['width']}, "
                f"height={info['height']}{stored_size_note(path, info['width'], info['height'])}"
            )
        return image

    def _check_image_files(self) -> None:
        """Stat every image file the split uses, so that a wrong root fails now rather than mid-training."""
        infos = [self._images[image_id] for image_id in self.ids]
        missing = [info for info in infos if not (self.root / info["file_name"]).is_file()]
        if not missing:
            return
        first = missing[0]
        message = (
            f"{len(missing)} of the {len(infos)} images of {self.ann_file} are not in the image root {self.root} "
            f"(e.g. image id {first['id']}: field 'file_name' = '{first['file_name']}', but "
            f"{self.root / first['file_name']} does not exist)"
        )
        better = _working_root(self.root, [info["file_name"] for info in infos])
        if "\\" in first["file_name"] and os.sep != "\\":
            message += ("; its separators look like Windows paths ('\\'): write the 'file_name' fields with '/', "
                        "which every system reads")
        elif better is not None:
            message += f"; all of them are under {better}: use that as the image root (data.<split>.root)"
        elif not self.root.is_dir():
            message += f"; the image root {self.root} is not a folder"
        raise DatasetError(message)

    def _ignore_unusable_segmentations(self, images: dict[int, dict[str, Any]]) -> None:
        """Turn annotations whose segmentation gives no mask into ignore regions; drop short polygons.

        Checked structurally (no rasterising, which would cost seconds on a large file): a segmentation
        with no polygon of 3+ points left is unusable. The eval copy gets the same cleaned segmentations,
        since pycocotools fails on an empty one and reads a 4-number polygon as a box.
        """
        emptied, shortened = [], []
        for ann in self._dataset["annotations"]:
            segm, dropped = _usable_segmentation(ann, images[ann["image_id"]], self.ann_file)
            if dropped:
                shortened.append(ann["id"])
            if segm is None:
                if not ann["iscrowd"]:
                    emptied.append(ann["id"])
                x, y, w, h = ann["bbox"]
                ann.update(iscrowd=1, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])
            else:
                ann["segmentation"] = segm
        warn_counted(np.array(shortened), "ignored polygons with fewer than 3 points in {n} annotations",
                     self.ann_file)
        warn_counted(
            np.array(emptied),
            "made {n} annotations whose segmentation gives no mask (empty, or no polygon of 3+ points) ignore "
            "regions (iscrowd=1): Mask R-CNN does not train on them and evaluation does not count them",
            self.ann_file,
        )

    def _collect_targets(self) -> None:
        """Build the training targets of every image, as flat arrays sliced per image.

        ``_boxes`` (M, 4) float32 XYXY, ``_labels`` (M,) int64 class indices and, with masks, ``_segments``
        (M segmentations), from the validated non-crowd annotations grouped by image in file order; image ``p``
        owns rows ``_starts[p]:_starts[p + 1]``.
        """
        anns = [a for a in self._dataset["annotations"] if not a["iscrowd"]]
        positions = np.array([self._image_pos[a["image_id"]] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        order = np.argsort(positions, kind="stable")
        self._boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)[order].astype(np.float32)
        self._labels = np.array([self._cat_to_index[anns[i]["category_id"]] for i in order], dtype=np.int64).reshape(-1)
        self._starts = np.concatenate([[0], np.cumsum(np.bincount(positions[order], minlength=len(self._images)))])
        self._segments = [anns[i]["segmentation"] for i in order] if self.with_masks else []


def _load_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path}: top level must be an object, found {type(data).__name__}")
    return data


def load_instances(path: Path) -> dict[str, Any]:
    """A COCO instances file as a dict, checked as ``CocoDetection`` checks it (images are not opened).

    Raises:
        DatasetError: as ``CocoDetection`` does for the file's structure.
    """
    data = _load_json(Path(path))
    _validate(data, Path(path))
    return data


def _working_root(root: Path, file_names: list[str]) -> Optional[Path]:
    """A parent (up to two levels up) or a subfolder of ``root`` under which every file in ``file_names`` exists.

    Catches the usual slips: a ``file_name`` that already carries ``train/`` with that folder as root, or a
    root one level above the image folder. Each candidate costs one stat until its first missing file.
    """
    subfolders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for candidate in [root.parent, root.parent.parent, *subfolders]:
        if candidate != root and all((candidate / name).is_file() for name in file_names):
            return candidate
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _validate(data: dict[str, Any], path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Check the structure ``CocoDetection`` relies on; fill "area"/"iscrowd" that COCOeval needs.

    Returns image records by id (file order) and category names by id.
    """
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise DatasetError(f"annotation file {path} lacks the top-level key(s) {', '.join(map(repr, missing))}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"annotation file {path}: '{key}' must be a list")

    categories: dict[int, str] = {}
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise DatasetError(f"annotation file {path}: category record {cat!r} has no integer 'id'")
        if cat["id"] in categories:
            raise DatasetError(f"annotation file {path}: duplicate category id {cat['id']}")
        categories[cat["id"]] = str(cat.get("name", cat["id"]))

    images: dict[int, dict[str, Any]] = {}
    image_of_file: dict[str, int] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or isinstance(img.get("id"), bool):
            raise DatasetError(f"annotation file {path}: image record {img!r} has no integer 'id'")
        image_id = img["id"]
        if image_id in images:
            raise DatasetError(f"annotation file {path}: duplicate image id {image_id}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DatasetError(f"annotation file {path}: image id {image_id} lacks field 'file_name'")
        for dim in ("width", "height"):
            if not _is_positive_int(img.get(dim)):
                raise DatasetError(
                    f"annotation file {path}: image id {image_id} lacks field '{dim}' "
                    f"(a positive integer; found {img.get(dim)!r})"
                )
        other = image_of_file.setdefault(os.path.normpath(img["file_name"]), image_id)
        if other != image_id:
            raise DatasetError(
                f"annotation file {path}: image ids {other} and {image_id} have the same field 'file_name' = "
                f"'{img['file_name']}', so both records' boxes would land on one image: give each record its own "
                f"image file, or merge them into one record"
            )
        images[image_id] = img

    ann_ids: set[int] = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int) or isinstance(ann.get("id"), bool):
            raise DatasetError(f"annotation file {path}: annotation record {_short(ann)} has no integer 'id'")
        ann_id = ann["id"]
        if ann_id in ann_ids:
            raise DatasetError(f"annotation file {path}: duplicate annotation id {ann_id}")
        ann_ids.add(ann_id)
        if not isinstance(ann.get("image_id"), int) or ann["image_id"] not in images:
            raise DatasetError(
                f"annotation file {path}: annotation id {ann_id} has field 'image_id' = {ann.get('image_id')!r}, "
                f"which is not an image id in 'images'"
            )
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in categories:
            raise DatasetError(
                f"annotation file {path}: annotation id {ann_id} has field 'category_id' = "
                f"{ann.get('category_id')!r}, which is not a category id in 'categories'"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DatasetError(
                f"annotation file {path}: annotation id {ann_id} (image id {ann['image_id']}) has field 'bbox' = "
                f"{bbox!r}; expected 4 numbers [x, y, width, height]"
            )
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
    return images, categories


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _usable_segmentation(ann: dict[str, Any], info: dict[str, Any], path: Path) -> tuple[Any, bool]:
    """(the segmentation as ``_decode_masks`` takes it, or None where it gives no mask; whether polygons were dropped).

    Polygons need at least 3 points (pycocotools reads 4 numbers as a box); shorter ones are dropped. A crowd
    region without a segmentation has none to give.

    Raises:
        DatasetError: the field is neither polygons nor RLE, or the RLE's size is not its image's.
    """
    segm = ann.get("segmentation")
    if segm is None and ann["iscrowd"]:
        return None, False
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [info["height"], info["width"]]:
            raise DatasetError(
                f"annotation file {path}: annotation id {ann['id']} has an RLE 'segmentation' of size "
                f"{segm['size']}, but image id {ann['image_id']} is height={info['height']}, width={info['width']}"
            )
        return segm, False
    if isinstance(segm, list) and all(isinstance(p, list) and all(_is_number(v) for v in p) for p in segm):
        polygons = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        return (polygons, len(polygons) < len(segm)) if polygons else (None, False)
    raise DatasetError(
        f"annotation file {path}: annotation id {ann['id']} (image id {ann['image_id']}) has field "
        f"'segmentation' = {_short(segm)}; expected polygons or RLE (needed for masks)"
    )


def _decode_masks(segments: list[Any], height: int, width: int) -> torch.Tensor:
    """Binary masks (N, H, W) uint8 from COCO polygons / RLE, as ``COCO.annToMask`` decodes them."""
    if not segments:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    rles = []
    for segm in segments:
        if isinstance(segm, list):
            rles.append(mask_utils.merge(mask_utils.frPyObjects(segm, height, width)))
        elif isinstance(segm["counts"], list):
            rles.append(mask_utils.frPyObjects(segm, height, width))
        else:
            rles.append(segm)
    masks = mask_utils.decode(rles)  # (H, W, N), Fortran order
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))

