"""VOC AP50 (11-point and area) and CrowdHuman AP / MR^-2 against hand-computed cases."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO

from lgd.evaluation import auto_metric, evaluate_crowdhuman, evaluate_detections, evaluate_voc
from lgd.evaluation.crowdhuman import ap_and_mr
from lgd.evaluation.voc import voc_ap


def _coco(objects: dict[int, list[tuple]], categories=((1, "cat"), (2, "dog"))) -> COCO:
    """objects: image id -> [(category id, x, y, w, h, ignored)]."""
    anns = [
        {"id": i, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(ign)}
        for i, (image_id, (c, x, y, w, h, ign)) in enumerate(
            ((image_id, o) for image_id, objs in objects.items() for o in objs), start=1)
    ]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in objects],
        "annotations": anns,
        "categories": [{"id": c, "name": n} for c, n in categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _det(image_id: int, box: list[float], score: float, category_id: int = 1) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


def test_voc_ap_area_and_11_point_differ_as_computed_by_hand():
    # recall 1/3, 1/3, 2/3 with precision 1, 1/2, 2/3:
    # area: envelope is 1 up to recall 1/3 and 2/3 up to 2/3 -> 1/3 * 1 + 1/3 * 2/3 = 5/9
    # 11-point: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t >= .7 -> 0 -> (4 + 2) / 11 = 6/11
    recall = np.array([1 / 3, 1 / 3, 2 / 3])
    precision = np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision) == pytest.approx(5 / 9)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(6 / 11)
    assert voc_ap(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert voc_ap(np.array([1.0]), np.array([1.0]), use_07_metric=True) == pytest.approx(1.0)


@pytest.fixture()
def voc_case():
    """Three cats count (npos = 3) and one difficult cat is ignored; no dog has ground truth.

    Detections in score order: TP (a), ignored (on the difficult one), FP (duplicate of a), TP (d), FP (nothing).
    Cumulated with the ignored one kept as a flat step: recall 1/3, 1/3, 1/3, 2/3, 2/3; precision 1, 1, 1/2, 2/3, 1/2.
    """
    gt = _coco({
        1: [(1, 0, 0, 10, 10, False), (1, 20, 20, 10, 10, False), (1, 0, 20, 10, 10, True)],
        2: [(1, 5, 5, 10, 10, False)],
    })
    dets = [
        _det(1, [0, 0, 10, 10], 0.9),
        _det(1, [0, 20, 10, 10], 0.8),
        _det(1, [0, 0, 10, 10], 0.7),
        _det(2, [5, 5, 10, 10], 0.6),
        _det(2, [40, 40, 5, 5], 0.5),
        _det(2, [40, 40, 5, 5], 0.9, category_id=2),  # a dog where there is none: dog has no AP
    ]
    return gt, dets


def test_voc_map_ignores_difficult_and_counts_duplicates(voc_case):
    gt, dets = voc_case
    area = evaluate_voc(gt, dets)
    assert area.metrics["bbox/AP50"] == pytest.approx(100 * 5 / 9)
    assert area.per_class["bbox"]["cat"] == pytest.approx(100 * 5 / 9)
    assert math.isnan(area.per_class["bbox"]["dog"])
    assert area.headline == "bbox/AP50" and "VOC" in area.name
    eleven = evaluate_detections("voc07", gt, dets)
    assert eleven.metrics["bbox/AP50"] == pytest.approx(100 * 6 / 11)
    assert "11-point" in eleven.summary["bbox"]


def test_voc_threshold_is_iou_at_least_half():
    gt = _coco({1: [(1, 0, 0, 10, 10, False)]})
    # IoU exactly 50 / 100 = 0.5 is a match in the VOC devkit (ovmax >= minoverlap)
    assert evaluate_voc(gt, [_det(1, [0, 0, 10, 5], 1.0)]).metrics["bbox/AP50"] == pytest.approx(100.0)
    assert evaluate_voc(gt, [_det(1, [0, 0, 10, 4.9], 1.0)]).metrics["bbox/AP50"] == pytest.approx(0.0)


@pytest.fixture()
def crowdhuman_case():
    """Two images, four people, one ignore region. Scored detections (ignored one left out):
    TP, TP, FP, TP, FP, FP -> FPPI 0, 0, .5, .5, 1, 1.5; miss rate .75, .5, .5, .25, .25, .25."""
    gt = _coco({
        1: [(1, 0, 0, 10, 20, False), (1, 20, 0, 10, 20, False), (1, 40, 0, 20, 20, True)],
        2: [(1, 0, 0, 10, 20, False), (1, 20, 0, 10, 20, False)],
    }, categories=((1, "person"),))
    dets = [
        _det(1, [0, 0, 10, 20], 0.95),   # TP
        _det(2, [0, 0, 10, 20], 0.90),   # TP
        _det(1, [70, 70, 10, 10], 0.85),  # FP
        _det(1, [20, 0, 10, 20], 0.80),  # TP
        _det(1, [42, 2, 5, 5], 0.75),    # inside the ignore region (IoA 1, IoU 1/16): ignored
        _det(2, [60, 60, 10, 10], 0.70),  # FP
        _det(2, [0, 0, 10, 20], 0.65),   # duplicate of a matched person: FP
    ]
    return gt, dets


def test_crowdhuman_ap_and_mr_match_hand_computation(crowdhuman_case):
    gt, dets = crowdhuman_case
    result = evaluate_crowdhuman(gt, dets)
    # MR: references 10^-2 .. 10^-0.5 (7 of them) first reach FPPI .5 (miss .5); 10^-0.25 and 1 reach FPPI 1 (miss .25)
    assert result.metrics["bbox/MR-2"] == pytest.approx(100 * math.exp((7 * math.log(0.5) + 2 * math.log(0.25)) / 9))
    assert result.metrics["bbox/MR-2"] == pytest.approx(100 * 0.5 ** (11 / 9))
    # AP: trapezoids from (0, 1): (0 -> .25) 1, (.25 -> .5) 1, (.5 -> .75) between 2/3 and 3/4 -> .5 + 17/96
    assert result.metrics["bbox/AP50"] == pytest.approx(100 * 65 / 96)
    assert result.name == "CrowdHuman" and "MR^-2" in result.summary["bbox"]
    assert evaluate_detections("crowdhuman", gt, dets).metrics == result.metrics


def test_crowdhuman_edge_cases():
    # no detection: everything missed
    assert ap_and_mr(np.zeros(0), np.zeros(0), num_positives=3, num_images=2) == (0.0, 1.0)
    # all found, no false positive: FPPI never reaches a reference, so the last point (miss 0) is read
    ap, mr = ap_and_mr(np.ones(2), np.zeros(2), num_positives=2, num_images=1)
    assert ap == pytest.approx(1.0) and mr < 1e-9
    # half found, no false positive: miss rate .5 at every reference
    assert ap_and_mr(np.ones(1), np.zeros(1), num_positives=2, num_images=1)[1] == pytest.approx(0.5)


def test_metric_is_chosen_by_format(tmp_path):
    assert auto_metric("voc", str(tmp_path / "VOCdevkit" / "VOC2007")) == "voc07"
    assert auto_metric("voc", str(tmp_path / "VOC2012")) == "voc"
    assert auto_metric("crowdhuman", "x") == "crowdhuman"
    assert auto_metric("yolo", "x") == "coco" and auto_metric("coco", "") == "coco"
