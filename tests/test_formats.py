"""Pascal VOC, YOLO and CrowdHuman: conversion of the committed samples, bad input, caching, and a
tiny training + evaluation from the CLI on each format."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from lgd.cli import main
from lgd.config import load_config
from lgd.data import CocoDetection
from lgd.data import crowdhuman, voc, yolo
from lgd.data.formats import cached_conversion, read_class_names
from lgd.data.stats import dataset_stats
from lgd.errors import ConfigError, DatasetError

DATA = Path(__file__).parent / "data"
VOC = DATA / "voc" / "VOC2007"
YOLO = DATA / "yolo"
CH = DATA / "crowdhuman"
CSV = DATA / "csv"


def _boxes(data: dict, image_id: int) -> list[tuple[list[float], int]]:
    return [(a["bbox"], a["iscrowd"]) for a in data["annotations"] if a["image_id"] == image_id]


# ----------------------------------------------------------------------------- conversion of the samples
def test_voc_round_trip_keeps_every_box_and_the_difficult_flag():
    data = voc.to_coco(VOC, "train")
    assert [img["file_name"] for img in data["images"]] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert all((img["width"], img["height"]) == (32, 32) for img in data["images"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert len(names) == 20 and names[1] == "aeroplane"
    # back to VOC's 1-based inclusive pixels: xmin = x + 1, xmax = x + w
    for img in data["images"]:
        objects = ET.parse(VOC / "Annotations" / f"{img['voc_id']}.xml").getroot().iter("object")
        expected = [(o.find("name").text, int(o.find("difficult").text),
                     [float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]) for o in objects]
        got = [(names[a["category_id"]], a["difficult"], [a["bbox"][0] + 1, a["bbox"][1] + 1,
                a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]) for a in data["annotations"]
               if a["image_id"] == img["id"]]
        assert got == expected
    difficult = [a for a in data["annotations"] if a["difficult"]]
    assert len(difficult) == 1 and difficult[0]["iscrowd"] == 1  # kept, but neither trained on nor scored
    assert _boxes(data, 1)[0] == ([2.0, 4.0, 12.0, 16.0], 0)


def test_voc_custom_class_names_and_split_file_path(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("person\ncat\ndog\ncar\n")
    data = voc.to_coco(VOC, str(VOC / "ImageSets" / "Main" / "val.txt"), read_class_names(names))
    assert [c["name"] for c in data["categories"]] == ["person", "cat", "dog", "car"]
    assert [img["voc_id"] for img in data["images"]] == ["000003", "000004"]
    assert sorted(a["category_id"] for a in data["annotations"]) == [1, 3, 4]  # person, dog, car


def test_yolo_round_trip_gives_back_the_normalised_labels():
    assert read_class_names(YOLO / "data.yaml") == read_class_names(YOLO / "classes.txt") == ["circle", "square"]
    data = yolo.to_coco(YOLO / "images" / "train", YOLO / "labels" / "train", ["circle", "square"])
    assert [img["file_name"] for img in data["images"]] == ["a.jpg", "b.jpg", "c.png"]
    assert [c["id"] for c in data["categories"]] == [0, 1]  # the YOLO class ids themselves
    for img in data["images"]:
        label = YOLO / "labels" / "train" / Path(img["file_name"]).with_suffix(".txt")
        expected = [[float(v) for v in line.split()] for line in label.read_text().splitlines()] if label.exists() else []
        w, h = img["width"], img["height"]
        got = [[a["category_id"], (a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h,
                a["bbox"][2] / w, a["bbox"][3] / h] for a in data["annotations"] if a["image_id"] == img["id"]]
        assert len(got) == len(expected)
        for row, want in zip(got, expected):
            assert row == pytest.approx(want)
    assert _boxes(data, 3) == []  # c.png has no label file: a background image
    assert data["images"][1]["width"] == 40  # sizes come from the images


def test_crowdhuman_box_types_and_ignore_regions():
    odgt = CH / "annotation_train.odgt"
    full = crowdhuman.to_coco(CH / "Images", odgt, "full")
    assert full["categories"] == [{"id": 1, "name": "person"}]
    assert [img["file_name"] for img in full["images"]][0] == "273271,c9db000d5146c15.jpg"
    # image 1: a person, a person whose full box leaves the 32 px image (clipped: 6 + 30 -> 32), a "mask" region
    assert _boxes(full, 1) == [([2, 4, 10, 26], 0), ([20, 6, 10, 26], 0), ([12, 0, 8, 8], 1)]
    # image 2: a person and an extra.ignore = 1 person (a reflection)
    assert _boxes(full, 2) == [([4, 2, 14, 28], 0), ([24, 4, 12, 26], 1)]
    visible = crowdhuman.to_coco(CH / "Images", odgt, "visible")
    assert _boxes(visible, 1)[1] == ([20, 6, 10, 24], 0)
    head = crowdhuman.to_coco(CH / "Images", odgt, "head")
    assert _boxes(head, 1)[:2] == [([4, 4, 6, 6], 0), ([22, 6, 6, 6], 1)]  # head_attr.ignore = 1 only for heads
    assert all(a["ignore"] == a["iscrowd"] for a in head["annotations"])


def test_stats_of_a_converted_split(tmp_path):
    stats = dataset_stats(CocoDetection(*cached_conversion("voc", VOC, "train", "", "full", tmp_path)))
    assert (stats.images, stats.objects, stats.ignored, stats.empty_images) == (3, 4, 1, 0)
    assert stats.per_class["dog"] == 2 and stats.per_class["person"] == 0 and len(stats.per_class) == 20
    # sqrt(w * h) of 12x16, 21x17, 15x11, 17x15: all below 32 px
    assert stats.buckets() == {"small": 4, "medium": 0, "large": 0}
    assert sorted(stats.sizes) == pytest.approx(sorted([192 ** 0.5, 357 ** 0.5, 165 ** 0.5, 255 ** 0.5]))
    assert "4 objects (+1 ignored" in stats.text()


# ----------------------------------------------------------------------------- bad input
def _copy(tmp_path: Path, source: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def test_voc_bad_input_names_file_and_line(tmp_path):
    root = _copy(tmp_path, VOC)
    xml = root / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text().replace("</bndbox>", "</bndbx>", 1))
    with pytest.raises(DatasetError, match=r"000002\.xml, line 20: malformed XML \(mismatched tag"):
        voc.to_coco(root, "train")

    xml.write_text((VOC / "Annotations" / "000002.xml").read_text().replace("<name>cat</name>", "<name>kitten</name>"))
    with pytest.raises(DatasetError, match=r"000002\.xml, line 11: class 'kitten' is not among the 20 class names"):
        voc.to_coco(root, "train")

    xml.write_text((VOC / "Annotations" / "000002.xml").read_text().replace("<xmin>6</xmin>", "<xmin>six</xmin>"))
    with pytest.raises(DatasetError, match=r"000002\.xml, line 16: <xmin> is 'six', not a number"):
        voc.to_coco(root, "train")

    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n\n000009\n")
    with pytest.raises(DatasetError, match=r"train\.txt, line 3: image id '000009' has no annotation file"):
        voc.to_coco(root, "train")
    with pytest.raises(DatasetError, match="VOC split file .*trainval.txt does not exist"):
        voc.to_coco(root, "trainval")


def test_crowdhuman_bad_input_names_file_and_line(tmp_path):
    odgt = tmp_path / "bad.odgt"
    good = (CH / "annotation_val.odgt").read_text().splitlines()[0]
    odgt.write_text(good + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"bad\.odgt, line 2: not valid JSON"):
        crowdhuman.to_coco(CH / "Images", odgt)
    odgt.write_text(good.replace('"fbox": [6, 4, 12, 26]', '"fbox": [6, 4]') + "\n")
    with pytest.raises(DatasetError, match=r"bad\.odgt, line 1, gtboxes\[0\]: 'fbox' must be 4 numbers"):
        crowdhuman.to_coco(CH / "Images", odgt)
    odgt.write_text(good.replace("284193", "999999") + "\n")
    with pytest.raises(DatasetError, match=r"bad\.odgt, line 1: image file .*999999,faa9000f2678b5e\.jpg does not exist"):
        crowdhuman.to_coco(CH / "Images", odgt)
    odgt.write_text('["a list"]\n')
    with pytest.raises(DatasetError, match=r"line 1: expected a JSON object with a string 'ID'"):
        crowdhuman.to_coco(CH / "Images", odgt)


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", r"a\.txt, line 2: expected 5 fields 'class cx cy w h', found 4"),
    ("0 0.5 0.5 0.2 0.2 0.9 0.9", r"a\.txt, line 2: expected 5 fields .*found 7 \(segmentation polygons"),
    ("0 0.5 1.2 0.2 0.2", r"a\.txt, line 2: coordinates must be normalised to \[0, 1\], found 0.5 1.2 0.2 0.2"),
    ("0 -0.1 0.5 0.2 0.2", r"a\.txt, line 2: coordinates must be normalised"),
    ("2 0.5 0.5 0.2 0.2", r"a\.txt, line 2: class id 2 is not in 0..1 \(the names file lists 2 classes\)"),
    ("one 0.5 0.5 0.2 0.2", r"a\.txt, line 2: fields must be numbers"),
])
def test_yolo_bad_lines_name_file_and_line(tmp_path, line, message):
    root = _copy(tmp_path, YOLO)
    label = root / "labels" / "train" / "a.txt"
    label.write_text(label.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=message):
        yolo.to_coco(root / "images" / "train", root / "labels" / "train", ["circle", "square"])


def test_yolo_label_without_image_is_a_counted_warning(tmp_path):
    root = _copy(tmp_path, YOLO)
    for name in ("x.txt", "y.txt"):
        (root / "labels" / "train" / name).write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.warns(UserWarning, match=r"skipped 2 label files without an image in .*images/train \(e\.g\. .*x\.txt\)"):
        data = yolo.to_coco(root / "images" / "train", root / "labels" / "train", ["circle", "square"])
    assert len(data["images"]) == 3 and len(data["annotations"]) == 3


def test_bad_names_files(tmp_path):
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match="repeats a class name"):
        read_class_names(tmp_path / "dup.txt")
    (tmp_path / "data.yaml").write_text("names: {0: a, 2: b}\n")
    with pytest.raises(DatasetError, match="keys must be the class ids 0..1"):
        read_class_names(tmp_path / "data.yaml")
    with pytest.raises(DatasetError, match="does not exist"):
        read_class_names(tmp_path / "missing.txt")


def test_format_config_is_validated():
    with pytest.raises(ConfigError, match="data.train.format=yolo needs data.names_file"):
        load_config(None, ["data.train.format=yolo", "data.train.root=i", "data.train.ann=l"])
    with pytest.raises(ConfigError, match="data.val.format=voc needs data.val.root and data.val.ann"):
        load_config(None, ["data.val.format=voc"])
    with pytest.raises(ConfigError, match="data.metric' must be one of auto, coco, voc, voc07, crowdhuman"):
        load_config(None, ["data.metric=map"])
    with pytest.raises(ConfigError, match="data.crowdhuman_box' must be one of full, visible, head"):
        load_config(None, ["data.crowdhuman_box=body"])


# ----------------------------------------------------------------------------- cache and CLI
def test_conversion_is_cached_until_a_label_file_changes(tmp_path):
    root = _copy(tmp_path, YOLO)
    args = ("yolo", root / "images" / "train", str(root / "labels" / "train"), str(root / "classes.txt"), "full")
    image_root, first = cached_conversion(*args, tmp_path / "cache")
    assert image_root == (root / "images" / "train").resolve()
    stamp = first.stat().st_mtime_ns
    assert cached_conversion(*args, tmp_path / "cache")[1] == first and first.stat().st_mtime_ns == stamp
    label = root / "labels" / "train" / "a.txt"
    label.write_text(label.read_text() + "1 0.5 0.5 0.25 0.25\n")
    second = cached_conversion(*args, tmp_path / "cache")[1]
    assert second != first
    assert len(json.loads(second.read_text())["annotations"]) == len(json.loads(first.read_text())["annotations"]) + 1


@pytest.mark.parametrize("argv, root", [
    (["--from", "voc", "--root", str(VOC), "--ann", "train"], VOC / "JPEGImages"),
    (["--from", "yolo", "--root", str(YOLO / "images" / "val"), "--ann", str(YOLO / "labels" / "val"),
      "--names", str(YOLO / "data.yaml")], YOLO / "images" / "val"),
    (["--from", "crowdhuman", "--root", str(CH / "Images"), "--ann", str(CH / "annotation_val.odgt"),
      "--box", "visible"], CH / "Images"),
])
def test_data_convert_writes_a_coco_json_that_loads(tmp_path, capsys, argv, root):
    out = tmp_path / "out.json"
    assert main(["data", "convert", *argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"data.train.root={root} data.train.ann={out}" in printed
    dataset = CocoDetection(root, out)
    image, target = dataset[0]
    assert image.shape[-2:] == (dataset.image_info(0)["height"], dataset.image_info(0)["width"])
    assert target["boxes"].shape[0] > 0


def test_data_convert_reports_bad_input_without_traceback(tmp_path, capsys):
    root = _copy(tmp_path, YOLO)
    (root / "labels" / "val" / "d.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n")
    code = main(["data", "convert", "--from", "yolo", "--root", str(root / "images" / "val"),
                 "--ann", str(root / "labels" / "val"), "--names", str(root / "classes.txt"),
                 "--out", str(tmp_path / "o.json")])
    assert code == 2
    assert "d.txt, line 2: class id 5 is not in 0..1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training and evaluation from the CLI
TINY = ["model.depth=18", "model.fpn_channels=32", "model.norm=bn", "model.min_size=[64]", "model.max_size=128",
        "data.batch_size=2", "data.eval_batch_size=4", "data.workers=0", "solver.max_iter=2", "solver.warmup_iters=1",
        "solver.steps=[3]", "checkpoint_period=2", "log_period=1", "lgd.pre_distill_iters=1"]


def _splits(fmt: str) -> list[str]:
    if fmt == "voc":
        return [f"data.{s}.format=voc" for s in ("train", "val")] + [
            f"data.train.root={VOC}", "data.train.ann=train", f"data.val.root={VOC}", "data.val.ann=val"]
    if fmt == "yolo":
        return [f"data.{s}.format=yolo" for s in ("train", "val")] + [f"data.names_file={YOLO / 'data.yaml'}"] + [
            f"data.{s}.{key}={YOLO / folder / s}"
            for s in ("train", "val") for key, folder in (("root", "images"), ("ann", "labels"))]
    if fmt == "csv":
        return [f"data.{s}.format=csv" for s in ("train", "val")] + [f"data.names_file={CSV / 'classes.csv'}"] + [
            f"data.{s}.root={DATA / 'yolo' / 'images'}" for s in ("train", "val")] + [
            f"data.{s}.ann={CSV / f'{s}.csv'}" for s in ("train", "val")]
    return [f"data.{s}.format=crowdhuman" for s in ("train", "val")] + [
        f"data.{s}.root={CH / 'Images'}" for s in ("train", "val")] + [
        f"data.{s}.ann={CH / f'annotation_{s}.odgt'}" for s in ("train", "val")]


@pytest.mark.parametrize("fmt, title, metric", [
    ("voc", "VOC2007 11-point AP50 evaluation", "bbox/AP50"),
    ("yolo", "COCO evaluation", "bbox/AP"),
    ("crowdhuman", "CrowdHuman evaluation", "bbox/MR-2"),
    ("csv", "COCO evaluation", "bbox/AP"),
])
def test_each_format_trains_and_evaluates_from_the_cli(tmp_path, capsys, fmt, title, metric):
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.synth.cache_dir={tmp_path / 'cache'}", *TINY, *_splits(fmt)]
    assert main(["train", "--no-progress", *args]) == 0
    assert f"{title} on val after 2 iterations" in capsys.readouterr().out
    assert (out / "eval_val.txt").read_text().startswith(title.replace(" evaluation", "") + " evaluation on val")
    assert len(list((tmp_path / "cache" / "converted").glob(f"{fmt}-*.json"))) == 2  # train and val, once each

    assert main(["eval", "-c", str(out / "config.yaml"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert title in printed
    assert metric in json.loads(printed.strip().splitlines()[-2])  # the last line names the files written


def test_data_stats_prints_and_plots_a_split(tmp_path, capsys):
    png = tmp_path / "stats.png"
    args = [f"data.synth.cache_dir={tmp_path / 'cache'}", *_splits("voc")]
    assert main(["data", "stats", *args, "--split", "val", "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "val: 2 images (0 without objects), 3 objects (+0 ignored" in printed
    assert "small 3 (100%)" in printed and f"plot: {png}" in printed
    assert Image.open(png).size == (1200, 450)


def test_new_subcommands_have_help(capsys):
    for argv in (["data", "convert", "--help"], ["data", "stats", "--help"], ["visualize", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and "usage: lgd" in capsys.readouterr().out


def test_stats_count_what_training_uses_not_the_records_it_skips(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 8], "area": 0, "iscrowd": 0},  # zero-size
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20], "area": 400, "iscrowd": 0}]
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], "annotations": anns,
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning) as caught:
        stats = dataset_stats(CocoDetection(tmp_path, tmp_path / "ann.json"))
    messages = sorted(str(w.message).split(" in ")[0] for w in caught)
    assert messages == ["clipped 1 boxes that extend outside their image", "skipped 1 annotations with zero-size boxes"]
    assert (stats.images, stats.objects, stats.per_class) == (1, 2, {"thing": 2})
    assert sorted(stats.sizes) == pytest.approx([10.0, 10.0])  # the second clipped to its image: 10 x 10
