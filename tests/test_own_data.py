"""Data as annotation tools keep it (issue 26): labelImg folders, CSV boxes, class maps, and the messages about it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lgd.cli import main
from lgd.config import load_config, to_dict
from lgd.data import CocoDetection
from lgd.data import csv_boxes, voc, yolo
from lgd.data.build import split_paths
from lgd.data.formats import apply_class_map, cached_conversion, describe, read_class_names
from lgd.data.stats import dataset_stats
from lgd.engine.checkpoint import load_resume_checkpoint
from lgd.errors import ConfigError, DatasetError, LGDError, count
from lgd.evaluation import auto_metric
from lgd.plots import ap_figure

DATA = Path(__file__).parent / "data"
CSV = DATA / "csv"
YOLO_IMAGES = DATA / "yolo" / "images"


def _xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    """An annotation as labelImg saves it (<folder>, <filename>, <path>, <size>, <object>s)."""
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>\n"
        for name, (x1, y1, x2, y2) in objects)
    return (f"<annotation>\n<folder>trees</folder>\n<filename>{filename}</filename>\n"
            f"<path>C:\\Users\\someone\\trees\\{filename}</path>\n<source><database>Unknown</database></source>\n"
            f"<size><width>64</width><height>48</height><depth>3</depth></size>\n<segmented>0</segmented>\n"
            f"{body}</annotation>\n")


def _label_img_folder(folder: Path) -> Path:
    """OSBS_029.png whose XML names OSBS_029.tif (two Tree crowns, one Dead), and plot_b.jpg named right (Alive)."""
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(folder / "OSBS_029.png")
    (folder / "OSBS_029.xml").write_text(_xml("OSBS_029.tif", [("Tree", (3, 5, 20, 30)), ("Dead", (30, 2, 60, 40))]))
    Image.new("RGB", (64, 48)).save(folder / "plot_b.jpg")
    (folder / "plot_b.xml").write_text(_xml("plot_b.jpg", [("Alive", (11, 11, 40, 40))]))
    return folder


def _names(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "names.txt"
    path.write_text("".join(f"{n}\n" for n in names))
    return path


# ----------------------------------------------------------------------------- 1. labelImg folders
def test_a_label_img_folder_is_a_voc_split_and_a_png_named_tif_is_found_by_its_stem(tmp_path):
    trees = _label_img_folder(tmp_path / "trees")
    with pytest.warns(UserWarning, match=r"found 1 image of .*trees by the stem of its annotation, as the file its "
                                         r"XML names does not exist in .*trees \(e\.g\. OSBS_029\.xml: named "
                                         r"OSBS_029\.tif, found OSBS_029\.png\)"):
        data = voc.to_coco(trees, str(trees), ["Tree", "Alive", "Dead"])
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        ("OSBS_029.png", 64, 48), ("plot_b.jpg", 64, 48)]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in data["annotations"]] == [
        (1, 1, [2.0, 4.0, 18.0, 26.0]), (1, 3, [29.0, 1.0, 31.0, 39.0]), (2, 2, [10.0, 10.0, 30.0, 30.0])]
    assert voc.image_folder(trees, str(trees)) == trees
    assert auto_metric("voc", str(trees)) == "voc"


def test_a_label_img_folder_trains_from_the_config_with_the_folder_as_ann(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _label_img_folder(tmp_path / "trees")
    _names(tmp_path, "Tree", "Alive", "Dead")
    cfg = load_config(None, ["data.train.format=voc", "data.train.root=trees", "data.train.ann=trees",
                             "data.names_file=names.txt", f"data.synth.cache_dir={tmp_path / 'cache'}"])
    with pytest.warns(UserWarning, match="by the stem"):
        dataset = CocoDetection(*split_paths(cfg, "train"))
    image, target = dataset[0]
    assert image.shape == (3, 48, 64) and target["labels"].tolist() == [0, 2]
    assert len(list((tmp_path / "cache" / "converted").glob("voc-*.json"))) == 1


def test_a_missing_label_img_image_lists_what_was_tried(tmp_path):
    trees = _label_img_folder(tmp_path / "trees")
    (trees / "OSBS_029.png").unlink()
    with pytest.raises(DatasetError, match=r"OSBS_029\.xml: its image is not in .*trees: tried .*trees/OSBS_029\.tif, "
                                           r"and any image named OSBS_029 with an image extension \(\.jpg, \.jpeg, "
                                           r"\.png, .*\.tif, \.tiff\)"):
        voc.to_coco(trees, str(trees), ["Tree", "Alive", "Dead"])
    Image.new("RGB", (8, 8)).save(trees / "OSBS_029.jpg")
    Image.new("RGB", (8, 8)).save(trees / "OSBS_029.bmp")
    with pytest.raises(DatasetError, match=r"2 images have the stem 'OSBS_029' \(OSBS_029\.bmp, OSBS_029\.jpg\)"):
        voc.to_coco(trees, str(trees), ["Tree", "Alive", "Dead"])


def test_devkit_layout_finds_an_image_by_stem_too(tmp_path):
    root = tmp_path / "VOC"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "Annotations" / "OSBS_029.xml").write_text(_xml("OSBS_029.tif", [("Tree", (3, 5, 20, 30))]))
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "OSBS_029.png")
    (root / "ImageSets" / "Main" / "train.txt").write_text("OSBS_029\n")
    with pytest.warns(UserWarning, match=r"named OSBS_029\.tif, found OSBS_029\.png"):
        data = voc.to_coco(root, "train", ["Tree"])
    assert data["images"][0]["file_name"] == "OSBS_029.png"


def test_wrong_voc_annotations_say_which_layout_to_give(tmp_path):
    trees = _label_img_folder(tmp_path / "trees")
    with pytest.raises(DatasetError, match=r"VOC split file .*trees/ImageSets/Main/train\.txt does not exist; .*trees "
                                           r"has no ImageSets/Main but holds 2 \.xml files: for XML files beside "
                                           r"their images \(labelImg's layout\) give that folder as the annotations, "
                                           r"data\.<split>\.ann=.*trees"):
        voc.to_coco(trees, "train")
    with pytest.raises(DatasetError, match=r"VOC annotations '.*OSBS_029\.xml' is one XML file; .*a folder of XML "
                                           r"files \(labelImg's layout\): here .*trees"):
        voc.to_coco(trees, str(trees / "OSBS_029.xml"))


# ----------------------------------------------------------------------------- 2. CSV boxes
def test_csv_boxes_give_the_boxes_of_the_same_images_in_yolo():
    names = read_class_names(CSV / "classes.csv")
    assert names == ["circle", "square"]
    got = csv_boxes.to_coco(YOLO_IMAGES, CSV / "train.csv", names)  # with a header row
    assert [(i["file_name"], i["width"]) for i in got["images"]] == [("train/a.jpg", 32), ("train/b.jpg", 40),
                                                                      ("train/c.png", 32)]
    assert [c["name"] for c in got["categories"]] == names
    want = yolo.to_coco(YOLO_IMAGES / "train", DATA / "yolo" / "labels" / "train", names)
    assert len(got["annotations"]) == len(want["annotations"]) == 3
    for a, b in zip(got["annotations"], want["annotations"]):
        assert a["image_id"] == b["image_id"] and a["bbox"] == pytest.approx(b["bbox"])
        assert names[a["category_id"] - 1] == names[b["category_id"]]  # CSV ids 1..K, YOLO's its class ids
    assert not [a for a in got["annotations"] if a["image_id"] == 3]  # train/c.png,,,,, : a background image
    val = csv_boxes.to_coco(YOLO_IMAGES, CSV / "val.csv", names)  # no header
    assert [a["bbox"] for a in val["annotations"]] == [[8.0, 8.0, 16.0, 16.0], [0.0, 0.0, 8.0, 10.0]]


@pytest.mark.parametrize("row, message", [
    ("train/a.jpg,4,4,16,circle", r"line 2: expected 6 fields image_path,xmin,ymin,xmax,ymax,label, found 5"),
    ("train/a.jpg,4,four,16,16,circle", r"line 2: field 'ymin' is 'four', not a number"),
    ("train/a.jpg,4,4,,,circle", r"line 2: fields 'xmax', 'ymax' are empty; a background image leaves all five box "
                                 r"fields empty \(train/a\.jpg,,,,,\)"),
    ("train/a.jpg,16,4,4,16,circle", r"line 2: xmax < xmin or ymax < ymin: 16,4,4,16"),
    (",4,4,16,16,circle", r"line 2: field 'image_path' is empty"),
    ("train/a.jpg,4,4,16,16,triangle", r"line 2, field 'label': class 'triangle' is not among the 2 class names "
                                       r"\(circle, square\); add it to the names file .*classes\.csv, or map it in "
                                       r"data\.class_map"),
    ("train/zz.jpg,4,4,16,16,circle", r"line 2: image file .*train/zz\.jpg does not exist"),
])
def test_bad_csv_rows_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "boxes.csv"
    path.write_text(f"train/b.jpg,2,6,22,26,square\n{row}\n")
    with pytest.raises(DatasetError, match=r"boxes\.csv, " + message):
        csv_boxes.to_coco(YOLO_IMAGES, path, ["circle", "square"], str(CSV / "classes.csv"))


def test_csv_converts_from_the_cli_and_needs_names(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["data", "convert", "--from", "csv", "--root", str(YOLO_IMAGES), "--ann", str(CSV / "train.csv"),
            "--out", str(out)]
    assert main(argv) == 2
    assert "CSV labels need a class names file (data.names_file / --names)" in capsys.readouterr().err
    assert main([*argv, "--names", str(CSV / "classes.csv")]) == 0
    assert "wrote 3 images, 3 objects + 0 ignored" in capsys.readouterr().out
    assert CocoDetection(YOLO_IMAGES, out).num_classes == 2
    with pytest.raises(ConfigError, match="data.train.format=csv needs data.names_file"):
        load_config(None, ["data.train.format=csv", "data.train.root=i", "data.train.ann=b.csv"])


def test_csv_split_reads_in_data_stats(tmp_path, capsys):
    args = ["data.train.format=csv", f"data.train.root={YOLO_IMAGES}", f"data.train.ann={CSV / 'train.csv'}",
            f"data.names_file={CSV / 'classes.csv'}", f"data.synth.cache_dir={tmp_path / 'cache'}"]
    assert main(["data", "stats", *args, "--out", str(tmp_path / "s.png")]) == 0
    assert "train: 3 images (1 without objects), 3 objects (+0 ignored" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 4. class map
def test_a_class_map_merges_two_classes_in_a_label_img_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _label_img_folder(tmp_path / "trees")
    _names(tmp_path, "Tree")
    base = ["data.train.format=voc", "data.train.root=trees", "data.train.ann=trees", "data.names_file=names.txt",
            f"data.synth.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(DatasetError, match=r"OSBS_029\.xml, line \d+: class 'Dead' is not among the 1 class name "
                                           r"\(Tree\); add it to the names file .*names\.txt, or map it in "
                                           r"data\.class_map \(e\.g\. \{Dead: OTHER\}, or \{Dead: null\} to drop "
                                           r"it\)$") as e:
        split_paths(load_config(None, base), "train")
    assert "..." not in str(e.value) and "--names" not in str(e.value)
    cfg = load_config(None, [*base, "data.class_map={Alive: Tree, Dead: Tree}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stem warning
        dataset = CocoDetection(*split_paths(cfg, "train"))
    assert dataset.class_names == ["Tree"] and dataset.cat_ids == [1]
    stats = dataset_stats(dataset)
    assert stats.per_class == {"Tree": 3} and stats.text().splitlines()[0].endswith(", 1 class")


def test_a_class_map_applies_to_coco_splits_and_null_drops_a_class(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
           "categories": [{"id": 5, "name": "Alive"}, {"id": 7, "name": "Tree"}, {"id": 9, "name": "Rock"}],
           "annotations": [{"id": i, "image_id": 1, "category_id": c, "bbox": [i, i, 5, 5]}
                           for i, c in ((1, 5), (2, 7), (3, 9), (4, 9))]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    args = [f"data.train.root={tmp_path}", f"data.train.ann={tmp_path / 'ann.json'}",
            f"data.synth.cache_dir={tmp_path / 'cache'}", "data.class_map={Alive: Tree, Rock: null}"]
    with pytest.warns(UserWarning, match=r"data.class_map dropped 2 annotations of Rock in .*ann\.json"):
        root, ann = split_paths(load_config(None, args), "train")
    assert root == tmp_path and ann.parent == tmp_path / "cache" / "converted"
    data = json.loads(ann.read_text())
    assert data["categories"] == [{"id": 7, "name": "Tree"}]  # the id of the category already named Tree
    assert [(a["id"], a["category_id"]) for a in data["annotations"]] == [(1, 7), (2, 7)]
    assert describe(data).endswith(", 1 category")
    with pytest.raises(DatasetError, match=r"data.class_map maps 'Alvie', not among the 3 categories of x.json "
                                           r"\(Alive, Tree, Rock\)"):
        apply_class_map(doc, {"Alvie": "Tree"}, "x.json")
    with pytest.raises(ConfigError, match=r"config key 'data.class_map' expects a mapping"):
        load_config(None, ["data.class_map=[Alive, Tree]"])
    with pytest.raises(ConfigError, match=r"config key 'data.class_map': '\{Alive: ' is not valid YAML"):
        load_config(None, ["data.class_map={Alive: "])


def test_the_class_map_is_part_of_the_cache_key(tmp_path):
    trees = _label_img_folder(tmp_path / "trees")
    names = str(_names(tmp_path, "Tree", "Alive", "Dead"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = cached_conversion("voc", trees, str(trees), names, "full", tmp_path / "cache")[1]
        merged = cached_conversion("voc", trees, str(trees), names, "full", tmp_path / "cache", {"Dead": "Tree"})[1]
    assert plain != merged
    assert [c["name"] for c in json.loads(merged.read_text())["categories"]] == ["Tree", "Alive"]


# ----------------------------------------------------------------------------- 8. small things
def test_data_convert_prints_absolute_paths_and_a_class_map_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _label_img_folder(tmp_path / "trees")
    _names(tmp_path, "Tree")
    with pytest.warns(UserWarning, match="by the stem"):
        assert main(["data", "convert", "--from", "voc", "--root", "trees", "--ann", "trees", "--names", "names.txt",
                     "--class-map", "{Alive: Tree, Dead: Tree}", "--out", "val.json"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 images, 3 objects + 0 ignored (difficult / ignore regions, as iscrowd), 1 category" in printed
    assert f"train with: data.train.root={tmp_path / 'trees'} data.train.ann={tmp_path / 'val.json'}\n" in printed


def test_count_gives_singular_and_plural():
    assert [count(1, "class"), count(2, "class"), count(1, "category"), count(0, "category"), count(3, "image"),
            count(2, "key")] == ["1 class", "2 classes", "1 category", "0 categories", "3 images", "2 keys"]


def test_data_synth_help_has_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    assert "Write the built-in synthetic dataset (shapes on cluttered backgrounds" in capsys.readouterr().out


def test_resume_names_the_first_differing_keys_with_values_and_counts_the_rest(tmp_path):
    torch.save({"config": to_dict(load_config(None, []))}, tmp_path / "last.pth")
    changed = ["seed=1", "model.arch=fcos", "model.depth=18", "model.fpn_channels=64", "solver.base_lr=0.02",
               "solver.max_iter=10", "solver.momentum=0.8", "data.batch_size=4", "data.hflip_prob=0.1",
               "lgd.enabled=false"]
    with pytest.raises(LGDError) as e:
        load_resume_checkpoint(tmp_path / "last.pth", load_config(None, changed))
    message = str(e.value)
    assert "was trained with in 10 keys (seed was 0, now 1; data.hflip_prob was 0.5, now 0.1; " in message
    assert message.count(", now ") == 8 and "; and 2 more); resume with -c" in message


def test_readme_lists_every_config():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for config in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        twin = config.name.replace("_baseline.yaml", "_lgd.yaml")
        assert config.name in readme or (twin != config.name and f"`{twin}` / `_baseline.yaml`" in readme), config.name


def test_ap_png_dashes_the_teacher_in_its_student_curves_colour():
    evals = [{"kind": "eval", "iter": it, "split": split, "metrics": {"bbox/AP": ap, "bbox/AP50": 2 * ap}}
             for it in (10, 20) for split, ap in (("val", 1.0 * it), ("val_teacher", 1.5 * it))]
    figure = ap_figure(evals)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert sorted(lines) == ["val AP", "val AP50", "val_teacher AP", "val_teacher AP50"]
    assert [lines[n].get_linestyle() for n in sorted(lines)] == ["-", "-", "--", "--"]
    assert lines["val AP"].get_color() == lines["val_teacher AP"].get_color()
    assert lines["val AP50"].get_color() == lines["val_teacher AP50"].get_color() != lines["val AP"].get_color()
