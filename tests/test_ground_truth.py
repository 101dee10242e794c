"""Evaluation scores the validated ground truth training uses: a perfect detector gets 100 AP on every kind of
awkward annotation, or lgd says why it cannot (issue 22's cases, each with a second one)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from lgd.config import load_config
from lgd.data import CocoDetection
from lgd.data.overlap import shared_images
from lgd.data.stats import dataset_stats
from lgd.data.yolo import parse_label_file
from lgd.engine.summary import _split_lines
from lgd.errors import DatasetError
from tests.oracle import oracle_eval

W, H = 64, 48


def _ann(ann_id: int, image_id: int, bbox: list[float], category_id: int = 1, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": 0, **extra}


def _write_coco(folder: Path, annotations: list[dict], images: int = 1, categories: int = 1,
                size: tuple[int, int] = (W, H)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, images + 1):
        Image.new("RGB", size, (i, 2 * i, 3 * i)).save(folder / f"{i}.png")
    doc = {"images": [{"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]}
                      for i in range(1, images + 1)],
           "annotations": annotations,
           "categories": [{"id": c, "name": f"class{c}"} for c in range(1, categories + 1)]}
    path = folder / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def _cfg(tmp_path: Path, root: Path, ann: Path, *overrides: str, fmt: str = "coco"):
    return load_config(None, [f"data.val.format={fmt}", f"data.val.root={root}", f"data.val.ann={ann}",
                              "data.eval_batch_size=4", "data.workers=0", f"data.synth.cache_dir={tmp_path / 'cache'}",
                              *overrides])


def _awkward_boxes() -> list[dict]:
    """Six images, three with a box training cannot use as drawn: zero-size, outside the image, past the edge."""
    anns = [_ann(i, i, [4.0 + i, 5.0, 20.0, 16.0], category_id=1 + i % 2) for i in range(1, 7)]
    anns += [_ann(7, 1, [10.0, 10.0, 0.0, 12.0]),  # zero-size
             _ann(8, 2, [70.0, 10.0, 8.0, 8.0], category_id=2),  # entirely outside the 64 x 48 image
             _ann(9, 3, [50.0, 30.0, 30.0, 30.0])]  # past the right and bottom edges: IoU 0.2 with its visible part
    return anns


# ---------------------------------------------------------------- 1. one ground truth for training and evaluation

@pytest.mark.parametrize("metric, key", [("coco", "bbox/AP"), ("voc", "bbox/AP50"), ("crowdhuman", "bbox/AP50")])
def test_skipped_and_clipped_boxes_are_scored_as_training_sees_them(tmp_path, metric, key):
    ann = _write_coco(tmp_path / "val", _awkward_boxes(), images=6, categories=2)
    caught: list[str] = []
    result, _ = oracle_eval(_cfg(tmp_path, tmp_path / "val", ann, f"data.metric={metric}"), caught=caught)
    assert result.metrics[key] == pytest.approx(100.0)
    assert all(ap == pytest.approx(100.0) for ap in result.per_class["bbox"].values())
    assert any("skipped 1 annotations with zero-size boxes" in m and "id 7" in m for m in caught)
    assert any("skipped 1 annotations with boxes entirely outside" in m and "id 8" in m for m in caught)
    assert any("clipped 1 boxes" in m and "id 9" in m for m in caught)


def test_stats_training_targets_and_evaluation_count_the_same_objects(tmp_path):
    ann = _write_coco(tmp_path / "val", _awkward_boxes(), images=6, categories=2)
    with pytest.warns(UserWarning):
        dataset = CocoDetection(tmp_path / "val", ann)
    scored = [a for a in dataset.coco.dataset["annotations"] if not a["iscrowd"]]
    stats = dataset_stats(dataset)
    assert stats.objects == len(scored) == sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset))) == 7
    clipped = next(a for a in scored if dataset.source_annotation_id(a["id"]) == 9)
    assert clipped["bbox"] == [50.0, 30.0, 14.0, 18.0] and clipped["area"] == pytest.approx(14.0 * 18.0)


# ---------------------------------------------------------------- 2. annotation id 0

@pytest.mark.parametrize("first_id, step", [(0, 1), (-3, 5)])
def test_annotation_ids_from_zero_or_negative_score_100(tmp_path, first_id, step):
    anns = [_ann(first_id + step * k, 1 + k % 3, [2.0 + 9 * (k // 3), 4.0, 8.0, 10.0]) for k in range(9)]
    ann = _write_coco(tmp_path / "val", anns, images=3)
    result, dataset = oracle_eval(_cfg(tmp_path, tmp_path / "val", ann))
    assert result.metrics["bbox/AP"] == pytest.approx(100.0)
    internal = [a["id"] for a in dataset.coco.dataset["annotations"]]
    assert internal == list(range(1, 10))
    assert [dataset.source_annotation_id(i) for i in internal] == [a["id"] for a in anns]


# ---------------------------------------------------------------- 3. dense images

def _grid(n: int, columns: int, categories: int = 1) -> list[dict]:
    return [_ann(k + 1, 1, [float(4 * (k % columns)), float(4 * (k // columns)), 3.0, 3.0],
                 category_id=1 + k % categories) for k in range(n)]


def test_1024_objects_per_image_score_100_with_detections_per_img_2000(tmp_path):
    # 8 classes of 128: COCOeval caps per image and class, and its pure-Python matcher is quadratic in that
    ann = _write_coco(tmp_path / "val", _grid(1024, 32, categories=8), categories=8, size=(128, 128))
    caught: list[str] = []
    result, _ = oracle_eval(_cfg(tmp_path, tmp_path / "val", ann, "model.detections_per_img=2000"), caught=caught)
    assert result.metrics["bbox/AP"] == pytest.approx(100.0)
    assert "maxDets=2000" in result.summary["bbox"]
    assert not any("hold more than" in m for m in caught)


def test_more_objects_than_the_limit_are_reported_and_the_limit_printed(tmp_path):
    ann = _write_coco(tmp_path / "val", _grid(150, 15), size=(60, 40))
    caught: list[str] = []
    capped, _ = oracle_eval(_cfg(tmp_path, tmp_path / "val", ann), caught=caught)
    assert capped.metrics["bbox/AP"] < 70.0 and "maxDets=100" in capped.summary["bbox"]
    assert any("1 of the 1 evaluated images holds more than 100 objects (image id 1: 150)" in m for m in caught)
    full, _ = oracle_eval(_cfg(tmp_path, tmp_path / "val", ann, "model.detections_per_img=150"))
    assert full.metrics["bbox/AP"] == pytest.approx(100.0) and "maxDets=150" in full.summary["bbox"]


# ---------------------------------------------------------------- 4. crowd-only data

def _rle_crowd(ann_id: int, image_id: int, category_id: int = 1) -> dict:
    """A brush-drawn mask as CVAT exports it: RLE, iscrowd=1."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[5:15, 5:15] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return _ann(ann_id, image_id, [5.0, 5.0, 10.0, 10.0], category_id=category_id, iscrowd=1,
                segmentation={"counts": rle["counts"].decode("ascii"), "size": [H, W]})


def test_a_crowd_only_training_split_names_iscrowd_and_an_annotation(tmp_path):
    ann = _write_coco(tmp_path / "train", [_rle_crowd(10 + i, i) for i in range(1, 5)], images=4)
    for filter_empty in (True, False):
        with pytest.warns(UserWarning, match=r"\(class1\) has only crowd / ignore annotations"):
            dataset = CocoDetection(tmp_path / "train", ann, with_masks=True, filter_empty=filter_empty)
        with pytest.raises(DatasetError, match=r"4 images\) .*all its 4 annotations are crowd regions \(field "
                                               r"'iscrowd' = 1, e\.g\. annotation id 11\)"):
            dataset.check_trainable()


def test_a_class_with_only_crowd_annotations_is_named_and_crowds_counted_apart(tmp_path):
    square = [[2.0, 2.0, 14.0, 2.0, 14.0, 14.0, 2.0, 14.0]]
    anns = [_ann(i, i, [2.0, 2.0, 12.0, 12.0], segmentation=square) for i in range(1, 5)]
    anns += [_rle_crowd(10 + i, i, 2) for i in range(1, 5)]
    ann = _write_coco(tmp_path / "train", anns, images=4, categories=2)
    with pytest.warns(UserWarning, match=r"1 class of .* \(class2\) has only crowd / ignore annotations \(iscrowd=1\)"):
        dataset = CocoDetection(tmp_path / "train", ann, with_masks=True, filter_empty=True)
    dataset.check_trainable()
    cfg = _cfg(tmp_path, tmp_path / "train", ann)
    (_, source), (_, counts) = _split_lines(cfg, "val", dataset)
    assert "4 objects" in counts and "+4 crowd / ignore regions" in counts


# ---------------------------------------------------------------- 5. exact duplicates

def test_duplicate_yolo_rows_are_dropped_with_one_counted_warning(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rows = {"a": ["0 0.5 0.5 0.25 0.25", "0 0.5 0.5 0.25 0.25", "1 0.2 0.3 0.1 0.2"],
            "b": ["1 0.6 0.6 0.3 0.3", "1 0.6 0.6 0.3 0.3", "1 0.6 0.6 0.3 0.3", "0 0.3 0.3 0.2 0.2"]}
    for stem, lines in rows.items():
        Image.new("RGB", (W, H)).save(images / f"{stem}.png")
        (labels / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "names.txt").write_text("circle\nsquare\n")
    caught: list[str] = []
    cfg = _cfg(tmp_path, images, labels, f"data.names_file={tmp_path / 'names.txt'}", fmt="yolo")
    result, dataset = oracle_eval(cfg, caught=caught)
    assert result.metrics["bbox/AP"] == pytest.approx(100.0)
    assert dataset_stats(dataset).objects == 4
    assert sum("dropped 3 exact duplicate annotations" in m for m in caught) == 1


def test_duplicate_coco_annotations_are_dropped_but_a_second_class_on_the_box_stays(tmp_path):
    box = [3.0, 4.0, 20.0, 10.0]
    anns = [_ann(1, 1, box), _ann(2, 1, list(box)), _ann(3, 1, box, category_id=2), _ann(4, 2, box)]
    ann = _write_coco(tmp_path / "val", anns, images=2, categories=2)
    caught: list[str] = []
    result, dataset = oracle_eval(_cfg(tmp_path, tmp_path / "val", ann), caught=caught)
    assert result.metrics["bbox/AP"] == pytest.approx(100.0)
    assert [dataset.source_annotation_id(a["id"]) for a in dataset.coco.dataset["annotations"]] == [1, 3, 4]
    assert any(m.startswith("dropped 1 exact duplicate annotations") and "id 2)" in m for m in caught)


# ---------------------------------------------------------------- 6. validation images that are training images

def test_validation_images_shared_with_training_are_counted(tmp_path):
    train_ann = _write_coco(tmp_path / "train", [_ann(i, i, [2.0, 2.0, 9.0, 9.0]) for i in range(1, 5)], images=4)
    train = CocoDetection(tmp_path / "train", train_ann)
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    shutil.copy(tmp_path / "train" / "3.png", val_dir / "copy.png")  # same bytes, another name
    Image.new("RGB", (W, H), (200, 0, 0)).save(val_dir / "own.png")
    names = ["1.png", "2.png", "copy.png", "own.png"]
    doc = {"images": [{"id": i + 1, "file_name": n if n in ("copy.png", "own.png") else f"../train/{n}",
                       "width": W, "height": H} for i, n in enumerate(names)],
           "annotations": [], "categories": [{"id": 1, "name": "class1"}]}
    (val_dir / "instances.json").write_text(json.dumps(doc))
    val = CocoDetection(val_dir, val_dir / "instances.json")
    message = shared_images(train, val)
    assert message is not None and message.startswith("3 of the 4 validation images are also training images")
    assert "1.png (the same file)" in message and "copy.png is" in message and "same bytes, SHA-1" in message


def test_distinct_splits_share_nothing_even_with_equal_sizes(tmp_path):
    train = CocoDetection(tmp_path / "train", _write_coco(tmp_path / "train", [], images=3))
    val = CocoDetection(tmp_path / "val", _write_coco(tmp_path / "val", [], images=0))
    Image.new("RGB", (W, H), (9, 9, 9)).save(tmp_path / "val" / "x.png")  # same size as the training files
    doc = json.loads(val.ann_file.read_text())
    doc["images"] = [{"id": 1, "file_name": "x.png", "width": W, "height": H}]
    val.ann_file.write_text(json.dumps(doc))
    assert shared_images(train, CocoDetection(tmp_path / "val", val.ann_file)) is None


# ---------------------------------------------------------------- small messages

def test_a_yolo_row_with_a_confidence_column_is_called_a_predictions_file(tmp_path):
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.2 0.87\n")
    with pytest.raises(DatasetError, match=r"a\.txt, line 1: .*found 6 \(it looks like a predictions file with a "
                                           r"confidence column"):
        parse_label_file(tmp_path / "a.txt", 2)


def test_a_windows_file_name_is_called_a_windows_path(tmp_path):
    ann = _write_coco(tmp_path / "val", [], images=1)
    doc = json.loads(ann.read_text())
    doc["images"][0]["file_name"] = "images\\1.png"
    ann.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"separators look like Windows paths"):
        CocoDetection(tmp_path / "val", ann)
