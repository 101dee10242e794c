"""COCO evaluation on tiny hand-built datasets (32 x 32 images)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from lgd.errors import DatasetError
from lgd.evaluation import EvalResult, detections_to_coco, evaluate_coco, save_results

# Non-contiguous category ids so that the label -> category mapping matters.
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
# image id -> [(category id, x, y, w, h)]; image 3 has no ground truth.
OBJECTS = {
    1: [(1, 2, 2, 12, 10), (3, 16, 14, 14, 16)],
    2: [(3, 4, 6, 20, 20)],
    3: [],
}


def _rectangle(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture()
def coco_gt() -> COCO:
    annotations = []
    for image_id, objects in OBJECTS.items():
        for category_id, x, y, w, h in objects:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "segmentation": _rectangle(x, y, w, h),
            })
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 32, "height": 32, "file_name": f"{i}.png"} for i in OBJECTS],
        "categories": CATEGORIES,
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _perfect_records(shift: float = 0.0) -> list[dict]:
    return [
        {"image_id": image_id, "category_id": c, "bbox": [x + shift, y + shift, w, h], "score": 1.0}
        for image_id, objects in OBJECTS.items()
        for c, x, y, w, h in objects
    ]


def _perfect_outputs() -> list[dict[str, torch.Tensor]]:
    """What a perfect Mask R-CNN would return; labels are category ids (identity mapping)."""
    outputs = []
    for objects in OBJECTS.values():
        masks = torch.zeros(len(objects), 1, 32, 32)
        for i, (_, x, y, w, h) in enumerate(objects):
            masks[i, 0, y : y + h, x : x + w] = 1.0
        outputs.append({
            "boxes": torch.tensor([[x, y, x + w, y + h] for _, x, y, w, h in objects]).reshape(-1, 4),
            "scores": torch.ones(len(objects)),
            "labels": torch.tensor([c for c, *_ in objects], dtype=torch.int64),
            "masks": masks,
        })
    return outputs


def test_perfect_boxes_give_ap_100_and_nan_for_absent_sizes(coco_gt: COCO) -> None:
    result = evaluate_coco(coco_gt, _perfect_records())
    assert result.metrics["bbox/AP"] == pytest.approx(100.0)
    assert result.metrics["bbox/AP50"] == pytest.approx(100.0)
    assert result.metrics["bbox/AP75"] == pytest.approx(100.0)
    assert result.metrics["bbox/APs"] == pytest.approx(100.0)
    # Every object is under 32*32 pixels: COCO has no medium or large ones (its -1).
    assert math.isnan(result.metrics["bbox/APm"]) and math.isnan(result.metrics["bbox/APl"])
    assert result.per_class["bbox"] == pytest.approx({"cat": 100.0, "dog": 100.0})


def test_perfect_masks_give_segm_ap_100(coco_gt: COCO) -> None:
    records = detections_to_coco(_perfect_outputs(), list(OBJECTS), lambda label: label, with_masks=True)
    result = evaluate_coco(coco_gt, records, iou_types=("bbox", "segm"))
    assert result.metrics["bbox/AP"] == pytest.approx(100.0)
    assert result.metrics["segm/AP"] == pytest.approx(100.0)
    assert set(result.per_class) == {"bbox", "segm"}


def test_shifted_boxes_score_lower(coco_gt: COCO) -> None:
    ap = evaluate_coco(coco_gt, _perfect_records(shift=3.0)).metrics["bbox/AP"]
    assert 0.0 < ap < 100.0


def test_no_detections_gives_zero_without_crashing(coco_gt: COCO) -> None:
    result = evaluate_coco(coco_gt, [], iou_types=("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        assert result.metrics[f"{iou_type}/AP"] == 0.0
        assert result.metrics[f"{iou_type}/AP50"] == 0.0
        assert result.per_class[iou_type] == {"cat": 0.0, "dog": 0.0}


def test_false_positive_on_image_without_ground_truth_counts(coco_gt: COCO) -> None:
    false_positive = {"image_id": 3, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 1.0}
    result = evaluate_coco(coco_gt, _perfect_records() + [false_positive])
    assert result.per_class["bbox"]["dog"] == pytest.approx(100.0)
    assert result.per_class["bbox"]["cat"] < 100.0


def test_restricting_image_ids(coco_gt: COCO) -> None:
    # Image 2's detection misses completely; evaluating image 1 alone ignores it.
    records = [r for r in _perfect_records() if r["image_id"] == 1]
    records.append({"image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2], "score": 1.0})
    assert evaluate_coco(coco_gt, records).metrics["bbox/AP"] < 100.0
    assert evaluate_coco(coco_gt, records, image_ids=[1]).metrics["bbox/AP"] == pytest.approx(100.0)
    only_empty = evaluate_coco(coco_gt, records, image_ids=[3])
    assert math.isnan(only_empty.metrics["bbox/AP"])


def test_cat_ids_and_class_names(coco_gt: COCO) -> None:
    result = evaluate_coco(coco_gt, _perfect_records(), cat_ids=[3], class_names=["Dog"])
    assert result.per_class["bbox"] == pytest.approx({"Dog": 100.0})
    with pytest.raises(DatasetError, match="class names"):
        evaluate_coco(coco_gt, _perfect_records(), class_names=["only one"])


def test_unknown_image_id_is_a_dataset_error(coco_gt: COCO) -> None:
    records = [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}]
    with pytest.raises(DatasetError, match="99"):
        evaluate_coco(coco_gt, records)


def test_results_untouched_and_pycocotools_silenced(coco_gt: COCO, capsys: pytest.CaptureFixture) -> None:
    records = _perfect_records()
    before = copy.deepcopy(records)
    result = evaluate_coco(coco_gt, records)
    assert records == before
    assert capsys.readouterr().out == ""
    lines = result.summary["bbox"].strip().splitlines()
    assert len(lines) == 12 and lines[0].lstrip().startswith("Average Precision")
    # pycocotools' labels, lgd's one scale: percent, marked, n/a where it reports -1 (no medium / large objects)
    assert lines[0].endswith("= 100.00 %") and lines[4].endswith("= n/a") and lines[6].endswith(" %")


def test_table_lists_every_class() -> None:
    names = ["person", "bicycle", "traffic light", "dog", "n"]
    result = EvalResult(per_class={"bbox": {n: 10.0 * i for i, n in enumerate(names)} | {"zebra": math.nan}})
    table = result.table("bbox")
    for name in [*names, "zebra"]:
        assert name in table
    assert "n/a" in table and "40.00" in table and "AP %" in table
    rows = table.splitlines()
    assert len(rows) == 2 + 2  # header, rule, 6 classes at 3 per row
    assert len({len(row) for row in rows[:3]}) == 1
    with pytest.raises(ValueError, match="segm"):
        result.table("segm")


def test_detections_to_coco_converts_boxes_labels_and_masks() -> None:
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 1:3, 2:6] = 0.9
    masks[1, 0, 4:, 4:] = 0.4  # below the threshold: an empty mask
    outputs = [
        {
            "boxes": torch.tensor([[1.0, 2.0, 5.0, 8.0], [0.5, 0.5, 1.5, 3.5]]),
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([0, 1]),
            "masks": masks,
        },
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, 8, 8),
        },
    ]
    records = detections_to_coco(outputs, [7, 8], lambda label: [1, 3][label], with_masks=True)
    assert len(records) == 2
    assert records[0]["bbox"] == pytest.approx([1.0, 2.0, 4.0, 6.0])
    assert records[1]["bbox"] == pytest.approx([0.5, 0.5, 1.0, 3.0])
    assert [r["category_id"] for r in records] == [1, 3]
    assert [r["image_id"] for r in records] == [7, 7]
    assert records[0]["score"] == pytest.approx(0.9)
    json.dumps(records)  # str counts: serialisable
    assert mask_util.area(records[0]["segmentation"]) == 8
    assert mask_util.area(records[1]["segmentation"]) == 0
    assert "segmentation" not in detections_to_coco(outputs[:1], [7], lambda label: label)[0]


def test_save_results_writes_json_atomically(tmp_path) -> None:
    path = tmp_path / "sub" / "results.json"
    save_results(_perfect_records(), path)
    assert json.loads(path.read_text()) == _perfect_records()
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
