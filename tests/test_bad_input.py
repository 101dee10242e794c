"""Real-world images and annotation files (issue 14): each kind of problem, its reported case and a second case.

1. high bit depth pixels, 2. EXIF orientation, 3. Mask R-CNN segmentations that give no mask, 4. records that
resolve to another record's image, 5. UTF-8 byte-order marks, 6. images Pillow cannot open; and the check that
every image exists before training starts.
"""
from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_detector
from lgd.cli import main
from lgd.config import ModelConfig
from lgd.data import CocoDetection, build_transforms
from lgd.data import crowdhuman, voc, yolo
from lgd.data.formats import read_class_names
from lgd.data.image_io import read_image, read_image_size
from lgd.errors import DatasetError
from lgd.evaluation.coco import evaluate_coco
from lgd.export import export_student
from lgd.predict import predict

RED = (220, 20, 20)


def _coco_file(root: Path, images: list[tuple[str, int, int]], annotations: list[dict] | None = None,
               name: str = "ann.json", bom: bool = False) -> Path:
    """A COCO file for images (file_name, width, height) with ids 1.., one category "thing" (id 1)."""
    doc = {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images, 1)],
           "annotations": annotations or [], "categories": [{"id": 1, "name": "thing"}]}
    path = root / name
    path.write_text(("\ufeff" if bom else "") + json.dumps(doc), encoding="utf-8")
    return path


def _ann(ann_id: int, bbox: list[float], image_id: int = 1, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, **extra}


def _box_pixels(image: torch.Tensor, box: list[float], margin: int = 4) -> torch.Tensor:
    """(3, n) pixels well inside an XYWH box (JPEG blurs its edges)."""
    x, y, w, h = (int(v) for v in box)
    return image[:, y + margin:y + h - margin, x + margin:x + w - margin].reshape(3, -1)


def _reads_red(pixels: torch.Tensor) -> bool:
    return bool((pixels[0] > 0.7).all() and (pixels[1:] < 0.3).all())


# ----------------------------------------------------------------------------- 1. high bit depth


def _grey16_png(path: Path) -> list[float]:
    """The issue's case: a 16-bit greyscale PNG, background 8192/65535, a 40x30 object at 49152/65535."""
    pixels = np.full((48, 64), 8192, dtype=np.uint16)
    pixels[9:39, 12:52] = 49152
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "I;16"
    return [12, 9, 40, 30]


class _Recorder(torch.nn.Module):
    """Stands in for an exported detector: remembers its input, detects nothing."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.seen = images[0]
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]


def test_a_16_bit_png_reaches_training_eval_and_predict_scaled_by_its_range(tmp_path: Path) -> None:
    box = _grey16_png(tmp_path / "deep.png")
    ann = _coco_file(tmp_path, [("deep.png", 64, 48)], [_ann(1, box)])
    model = _Recorder()
    meta = {"label_offset": 0, "class_names": ["thing"], "category_ids": [1]}
    predict(model, meta, tmp_path / "deep.png", tmp_path / "out", 0.5, torch.device("cpu"), progress=False)
    training = CocoDetection(tmp_path, ann, transforms=build_transforms(True, hflip_prob=0.0))[0][0]
    evaluation = CocoDetection(tmp_path, ann, transforms=build_transforms(False))[0][0]
    for image in (training, evaluation, model.seen):
        assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
        assert torch.allclose(image[:, 0, 0], torch.full((3,), 0.125), atol=1e-4)
        assert torch.allclose(_box_pixels(image, box, margin=0), torch.tensor(0.75), atol=1e-4)


def _png_rgb16(path: Path, rgb: tuple[int, int, int]) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    row = b"\x00" + np.array([rgb] * 5, dtype=">u2").tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(row * 4)) + chunk(b"IEND", b""))


def _unsigned_int32_tiff(path: Path, value: int) -> None:
    """A 32-bit unsigned greyscale TIFF: Pillow writes mode I as signed, so its SampleFormat tag is set to 1."""
    Image.fromarray(np.full((4, 5), value - 2**32 if value >= 2**31 else value, dtype=np.int32)).save(path, format="TIFF")
    signed_tag = struct.pack("<HHIHH", 339, 3, 1, 2, 0)
    data = path.read_bytes()
    assert data.count(signed_tag) == 1
    path.write_bytes(data.replace(signed_tag, struct.pack("<HHIHH", 339, 3, 1, 1, 0)))


@pytest.mark.parametrize("kind, expected", [
    ("16-bit TIFF", 0.75),
    ("16-bit PGM", 0.25),
    ("32-bit unsigned TIFF", 0.5),
    ("float TIFF", 0.375),
    ("16-bit RGB PNG", (1.0, 0.5, 0.125)),
])
def test_every_high_bit_depth_mode_is_scaled_by_its_true_range(tmp_path: Path, kind: str, expected) -> None:
    path = tmp_path / "image"
    if kind == "16-bit TIFF":
        Image.fromarray(np.full((4, 5), 49152, dtype=np.uint16)).save(path, format="TIFF")
    elif kind == "16-bit PGM":
        path.write_bytes(b"P5\n5 4\n65535\n" + np.full((4, 5), 16384, dtype=">u2").tobytes())
    elif kind == "32-bit unsigned TIFF":
        _unsigned_int32_tiff(path, 2**31)
    elif kind == "float TIFF":
        Image.fromarray(np.full((4, 5), 0.375, dtype=np.float32)).save(path, format="TIFF")
    else:
        _png_rgb16(path, (65535, 32768, 8192))
    image = read_image(path)
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    assert torch.allclose(image[:, 0, 0], torch.tensor(expected).expand(3), atol=1 / 255)


@pytest.mark.parametrize("kind, message", [
    ("signed 32-bit TIFF", r"mode I .*signed samples have no brightness range.*16-bit"),
    ("float TIFF beyond 1", r"mode F .*from 0 to 2\.5.*rescale it to \[0, 1\]"),
])
def test_modes_without_a_brightness_range_are_refused_by_name(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "odd.tif"
    if kind == "signed 32-bit TIFF":
        Image.fromarray(np.full((4, 5), 1000, dtype=np.int32)).save(path)
    else:
        values = np.zeros((4, 5), dtype=np.float32)
        values[1, 1] = 2.5
        Image.fromarray(values).save(path)
    ann = _coco_file(tmp_path, [("odd.tif", 5, 4)])
    with pytest.raises(DatasetError, match=rf"ann\.json, image id 1: image file .*odd\.tif has {message}"):
        CocoDetection(tmp_path, ann)[0]


# ----------------------------------------------------------------------------- 2. EXIF orientation

# The inverse of what each EXIF orientation asks a viewer to do: stored pixels = INVERSE(displayed pixels).
INVERSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
RED_BOX = [30, 100, 40, 40]  # XYWH in the displayed 96x160 frame


def _phone_photo(path: Path, orientation: int, fmt: str = "JPEG") -> Image.Image:
    """A photo displayed 96 wide, 160 high with a red 40x40 object at RED_BOX, stored as a phone stores it."""
    shown = Image.new("RGB", (96, 160), (90, 140, 200))
    x, y, w, h = RED_BOX
    shown.paste(RED, (x, y, x + w, y + h))
    stored = shown.transpose(INVERSE[orientation]) if INVERSE[orientation] is not None else shown
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return shown


@pytest.mark.parametrize("orientation", [6, 3])
def test_a_phone_photo_labelled_as_displayed_has_its_box_on_the_object(tmp_path: Path, orientation: int) -> None:
    _phone_photo(tmp_path / "phone.jpg", orientation)
    assert Image.open(tmp_path / "phone.jpg").size == ((160, 96) if orientation == 6 else (96, 160))
    ann = _coco_file(tmp_path, [("phone.jpg", 96, 160)], [_ann(1, RED_BOX)])
    image, target = CocoDetection(tmp_path, ann)[0]
    assert image.shape == (3, 160, 96)
    assert target["boxes"].tolist() == [[30.0, 100.0, 70.0, 140.0]]
    assert _reads_red(_box_pixels(image, RED_BOX))


def test_the_yolo_converter_reads_sizes_as_displayed(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _phone_photo(tmp_path / "images" / "phone.jpg", 6)
    x, y, w, h = RED_BOX
    (tmp_path / "labels" / "phone.txt").write_text(f"0 {(x + w / 2) / 96} {(y + h / 2) / 160} {w / 96} {h / 160}\n")
    data = yolo.to_coco(tmp_path / "images", tmp_path / "labels", ["thing"])
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (96, 160)
    assert data["annotations"][0]["bbox"] == pytest.approx(RED_BOX)
    ann = tmp_path / "converted.json"
    ann.write_text(json.dumps(data))
    image, _ = CocoDetection(tmp_path / "images", ann)[0]
    assert _reads_red(_box_pixels(image, RED_BOX))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_gives_the_displayed_pixels_and_size(tmp_path: Path, orientation: int) -> None:
    shown = _phone_photo(tmp_path / "photo.png", orientation, fmt="PNG")
    assert read_image_size(tmp_path / "photo.png") == (96, 160)
    expected = torch.from_numpy(np.asarray(shown).copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(read_image(tmp_path / "photo.png"), expected, atol=1e-6)


def test_a_size_in_the_stored_frame_is_explained_by_the_exif_tag(tmp_path: Path) -> None:
    _phone_photo(tmp_path / "phone.jpg", 6)
    ann = _coco_file(tmp_path, [("phone.jpg", 160, 96)])
    with pytest.raises(DatasetError, match=r"image id 1: image file .*phone\.jpg is 96x160 pixels but its record "
                                           r"says width=160, height=96; .*EXIF Orientation 6.*displayed 96x160"):
        CocoDetection(tmp_path, ann)[0]


def test_voc_and_crowdhuman_sizes_follow_the_exif_tag(tmp_path: Path) -> None:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / folder).mkdir(parents=True)
    _phone_photo(tmp_path / "JPEGImages" / "000001.jpg", 8)
    (tmp_path / "Annotations" / "000001.xml").write_text(
        "<annotation><size><width>160</width><height>96</height></size><object><name>cat</name><bndbox>"
        "<xmin>31</xmin><ymin>101</ymin><xmax>70</xmax><ymax>140</ymax></bndbox></object></annotation>")
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("000001\n")
    image = voc.to_coco(tmp_path, "train")["images"][0]
    assert (image["width"], image["height"]) == (96, 160)
    odgt = tmp_path / "a.odgt"
    odgt.write_text(json.dumps({"ID": "000001", "gtboxes": [{"tag": "person", "fbox": [30, 100, 80, 80]}]}))
    data = crowdhuman.to_coco(tmp_path / "JPEGImages", odgt)
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (96, 160)
    assert data["annotations"][0]["bbox"] == [30, 100, 66, 60]  # clipped to the displayed frame


# ----------------------------------------------------------------------------- 3. segmentations without a mask


def _mask_dataset(tmp_path: Path, segmentations: list) -> tuple[Path, list[list[float]]]:
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    boxes = [[2.0 + 9 * i, 3.0, 8.0, 8.0] for i in range(len(segmentations) + 1)]
    good = [[2, 3, 10, 3, 10, 11, 2, 11]]
    anns = [_ann(1, boxes[0], segmentation=good)]
    anns += [_ann(i + 2, box, segmentation=s) for i, (box, s) in enumerate(zip(boxes[1:], segmentations))]
    return _coco_file(tmp_path, [("a.png", 40, 30)], anns), boxes


@pytest.mark.parametrize("segmentation", [[], [[11, 3, 19, 11]]], ids=["empty", "two-point polygon"])
def test_annotations_without_a_mask_become_counted_ignore_regions_and_evaluation_runs(
        tmp_path: Path, segmentation: list) -> None:
    ann, boxes = _mask_dataset(tmp_path, [segmentation])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(tmp_path, ann, with_masks=True)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("made 1 annotations whose segmentation gives no mask") and str(ann) in m
               and "annotation id 2" in m for m in messages), messages
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2.0, 3.0, 10.0, 11.0]] and target["masks"].shape == (1, 30, 40)
    assert ds.coco.anns[2]["iscrowd"] == 1
    results = [{"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9,
                "segmentation": ds.coco.annToRLE(ds.coco.anns[1])} for box in boxes]
    result = evaluate_coco(ds.coco, results, iou_types=("bbox", "segm"))
    assert result.metrics["bbox/AP"] == pytest.approx(100.0) and result.metrics["segm/AP"] == pytest.approx(100.0)


def test_short_polygons_are_dropped_and_the_rest_of_the_annotation_kept(tmp_path: Path) -> None:
    ann, _ = _mask_dataset(tmp_path, [[[11, 3, 19, 11], [11, 3, 19, 3, 19, 11, 11, 11]]])
    with pytest.warns(UserWarning, match=r"ignored polygons with fewer than 3 points in 1 annotations.*id 2"):
        ds = CocoDetection(tmp_path, ann, with_masks=True)
    masks = ds[0][1]["masks"]
    assert masks.shape == (2, 30, 40) and masks[1, 3:11, 11:19].all() and masks[1].sum() == 64
    assert ds.coco.anns[2]["segmentation"] == [[11, 3, 19, 3, 19, 11, 11, 11]]


# ----------------------------------------------------------------------------- 4. records on another's image


def _voc(root: Path, records: dict[str, str], images: list[str]) -> None:
    """VOC layout: an XML per id whose <filename> is ``records[id]``, the listed images, and a split of all ids."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for voc_id, filename in records.items():
        (root / "Annotations" / f"{voc_id}.xml").write_text(
            f"<annotation><filename>{filename}</filename><object><name>cat</name><bndbox><xmin>2</xmin>"
            f"<ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    for name in images:
        Image.new("RGB", (20, 16)).save(root / "JPEGImages" / name)
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in records))


def test_voc_images_follow_the_id_not_a_stale_filename(tmp_path: Path) -> None:
    _voc(tmp_path, {"000001": "000001.jpg", "000001_flipped": "000001.jpg"}, ["000001.jpg", "000001_flipped.jpg"])
    data = voc.to_coco(tmp_path, "train")
    assert [i["file_name"] for i in data["images"]] == ["000001.jpg", "000001_flipped.jpg"]


def test_voc_filename_serves_only_when_the_id_has_no_image_and_two_ids_on_one_image_stop(tmp_path: Path) -> None:
    _voc(tmp_path / "a", {"000002": "000002.png", "000003": "000002.jpg"}, ["000002.png", "000003.jpg"])
    assert [i["file_name"] for i in voc.to_coco(tmp_path / "a", "train")["images"]] == ["000002.png", "000003.jpg"]
    _voc(tmp_path / "b", {"000004": "shared.jpg", "000005": "shared.jpg"}, ["shared.jpg"])
    with pytest.raises(DatasetError, match=r"000004\.xml and .*000005\.xml \(lines 1 and 2 of .*train\.txt\) both "
                                           r"resolve to image .*shared\.jpg"):
        voc.to_coco(tmp_path / "b", "train")


def test_coco_and_crowdhuman_records_sharing_an_image_stop(tmp_path: Path) -> None:
    for name in ("a.png", "a.jpg"):
        Image.new("RGB", (20, 16)).save(tmp_path / name)
    ann = _coco_file(tmp_path, [("a.png", 20, 16), ("./a.png", 20, 16)])
    with pytest.raises(DatasetError, match=r"ann\.json: image ids 1 and 2 have the same field 'file_name' = "
                                           r"'\./a\.png'"):
        CocoDetection(tmp_path, ann)
    odgt = tmp_path / "a.odgt"
    record = json.dumps({"ID": "a", "gtboxes": []})
    odgt.write_text(f"{record}\n{record}\n")
    with pytest.raises(DatasetError, match=r"a\.odgt, line 2: image ID 'a' already has a record on line 1"):
        crowdhuman.to_coco(tmp_path, odgt)


# ----------------------------------------------------------------------------- 5. byte-order marks

BOM = "\ufeff"


def test_a_byte_order_mark_changes_no_label_class_name_or_voc_class(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "labels" / "a.txt").write_text(f"{BOM}1 0.5 0.5 0.5 0.4\r\n", encoding="utf-8")
    (tmp_path / "names.txt").write_text(f"{BOM}cat\ndog\n", encoding="utf-8")
    names = read_class_names(tmp_path / "names.txt")
    assert names == ["cat", "dog"]
    data = yolo.to_coco(tmp_path / "images", tmp_path / "labels", names)
    assert [(a["category_id"], a["bbox"]) for a in data["annotations"]] == [(1, [5.0, 3.0, 10.0, 4.0])]
    _voc(tmp_path / "voc", {"000001": "000001.jpg"}, ["000001.jpg"])
    assert voc.to_coco(tmp_path / "voc", "train", names)["annotations"][0]["category_id"] == 1


def test_a_byte_order_mark_is_read_past_in_json_odgt_split_lists_and_yaml(tmp_path: Path) -> None:
    Image.new("RGB", (20, 16)).save(tmp_path / "a.jpg")
    ann = _coco_file(tmp_path, [("a.jpg", 20, 16)], [_ann(1, [1, 1, 5, 5])], bom=True)
    assert CocoDetection(tmp_path, ann).num_classes == 1
    odgt = tmp_path / "a.odgt"
    odgt.write_text(BOM + json.dumps({"ID": "a", "gtboxes": []}) + "\n", encoding="utf-8")
    assert len(crowdhuman.to_coco(tmp_path, odgt)["images"]) == 1
    _voc(tmp_path / "voc", {"000001": "000001.jpg"}, ["000001.jpg"])
    split = tmp_path / "voc" / "ImageSets" / "Main" / "train.txt"
    split.write_text(BOM + split.read_text(), encoding="utf-8")
    assert voc.to_coco(tmp_path / "voc", "train")["images"][0]["voc_id"] == "000001"
    (tmp_path / "data.yaml").write_text(f"{BOM}names: [cat, dog]\n", encoding="utf-8")
    assert read_class_names(tmp_path / "data.yaml") == ["cat", "dog"]


# ----------------------------------------------------------------------------- 6. images Pillow cannot open


def _truncated_jpeg(path: Path) -> None:
    Image.new("RGB", (20, 16), RED).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), r"the file is empty \(0 bytes.*copy it again or remove it"),
    (_truncated_jpeg, r"the file is truncated.*copy it again"),
    (lambda p: p.write_bytes(b"\x00\x05\x16\x07Mac OS X junk"), r"Pillow does not recognise it as an image.*PNG or JPEG"),
], ids=["empty", "truncated", "not an image"])
def test_training_images_pillow_cannot_read_are_named_with_record_and_fix(tmp_path: Path, make, reason) -> None:
    make(tmp_path / "bad.jpg")
    ann = _coco_file(tmp_path, [("bad.jpg", 20, 16)])
    with pytest.raises(DatasetError, match=rf"ann\.json, image id 1: image file .*bad\.jpg cannot be read: {reason}"):
        CocoDetection(tmp_path, ann)[0]


def test_decompression_bombs_and_converter_images_are_named(tmp_path: Path, monkeypatch) -> None:
    Image.new("RGB", (20, 16)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DatasetError, match=r"big\.png cannot be read: Pillow refuses it as a possible decompression "
                                           r"bomb.*downscale the image"):
        read_image(tmp_path / "big.png")
    monkeypatch.undo()
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    (tmp_path / "images" / "._empty.jpg").write_bytes(b"\x00\x05junk")
    with pytest.warns(UserWarning, match=r"skipped 1 hidden files in .*images \(e\.g\. .*\._empty\.jpg\)"):
        with pytest.raises(DatasetError, match=r"YOLO images folder .*: image file .*empty\.jpg cannot be read: "
                                               r"the file is empty"):
            yolo.to_coco(tmp_path / "images", tmp_path / "labels", ["thing"])


# ----------------------------------------------------------------------------- images exist before training


def test_every_image_is_checked_at_construction_and_a_working_root_suggested(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 16)).save(tmp_path / "train" / name)
    carries_folder = _coco_file(tmp_path, [("train/a.png", 20, 16), ("train/b.png", 20, 16)], name="t.json")
    with pytest.raises(DatasetError, match=r"2 of the 2 images of .*t\.json are not in the image root .*train \(e\.g\. "
                                           r"image id 1: field 'file_name' = 'train/a\.png'.*; all of them are under "
                                           rf"{tmp_path}: use that as the image root"):
        CocoDetection(tmp_path / "train", carries_folder)
    plain = _coco_file(tmp_path, [("a.png", 20, 16), ("b.png", 20, 16)], name="p.json")
    with pytest.raises(DatasetError, match=rf"all of them are under {tmp_path / 'train'}: use that"):
        CocoDetection(tmp_path, plain)
    (tmp_path / "train" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 2 images .*image id 2: field 'file_name' = 'b\.png'.*does not "
                                           r"exist\)$"):
        CocoDetection(tmp_path / "train", plain)


def _exported_student(path: Path) -> Path:
    student = tiny_detector("retinanet", num_classes=2)
    config = ModelConfig(arch="retinanet", depth=18, fpn_channels=32, norm="bn", min_size=[64], max_size=128)
    return export_student(student, config, ["cat", "dog"], [3, 7], 0, path)


def test_predict_on_a_real_folder_skips_what_it_cannot_read_and_keeps_the_rest(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 48), RED).save(folder / "a_good.png")
    Image.new("RGB", (48, 64), (30, 200, 30)).save(folder / "B_GOOD.PNG")
    (folder / "notes.txt").write_text("shot list")
    (folder / "._a_good.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (folder / "empty.jpg").write_bytes(b"")
    model = _exported_student(tmp_path / "student.pth")
    out = tmp_path / "out"
    code = main(["predict", str(folder), "--model", str(model), "--out", str(out), "--score-thresh", "0",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    records = json.loads((out / "detections.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["B_GOOD.PNG", "a_good.png"]
    assert all(d["class_name"] in ("cat", "dog") and d["category_id"] in (3, 7) for r in records for d in r["detections"])
    assert sorted(p.name for p in out.glob("*.png")) == ["B_GOOD.png", "a_good.png"]
    assert Image.open(out / "a_good.png").size == (800, 600)
    assert f"image file {folder / 'empty.jpg'} cannot be read: the file is empty" in captured.err
    assert "left out 1 hidden files (e.g. ._a_good.png)" in captured.err
    assert "2 images," in captured.out and "1 image skipped" in captured.out


class _FailsOnSecondImage(_Recorder):
    calls = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return [{"boxes": torch.tensor([[1.0, 2.0, 9.0, 8.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])}]


def test_predict_writes_what_succeeded_even_when_stopped_and_names_pictures_apart(tmp_path: Path) -> None:
    for name in ("x.jpg", "x.png", "y.png"):
        Image.new("RGB", (16, 12)).save(tmp_path / name)
    meta = {"label_offset": 0, "class_names": ["cat", "dog"], "category_ids": [3, 7]}
    with pytest.raises(KeyboardInterrupt):
        predict(_FailsOnSecondImage(), meta, tmp_path, tmp_path / "out", 0.5, torch.device("cpu"), progress=False)
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert records == [{"file": str(tmp_path / "x.jpg"), "picture": "x.jpg.png", "detections": [
        {"box_xyxy": [1.0, 2.0, 9.0, 8.0], "score": 0.9, "category_id": 7, "class_name": "dog"}]}]


class _BrokenRecords(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise DatasetError(f"ann.json: image record {index}, field 'file_name': imgs/a.png does not exist")


def test_an_error_in_a_dataloader_worker_reaches_the_user_without_the_worker_traceback():
    from lgd.errors import user_message

    loader = torch.utils.data.DataLoader(_BrokenRecords(), num_workers=1)
    with pytest.raises(DatasetError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # what torch re-raises in the main process
    assert user_message(caught.value) == "ann.json: image record 0, field 'file_name': imgs/a.png does not exist"
    assert user_message(DatasetError("plain\nmessage")) == "plain\nmessage"
