"""Drawing detections, reading images, and plotting training curves."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from lgd.draw import class_color, draw_detections, one_box_per_object, text_color
from lgd.errors import LGDError
from lgd.plots import plot_ap_curves, plot_metrics, read_metrics, smooth


def _detections(with_masks: bool = False) -> dict[str, torch.Tensor]:
    detections = {
        "boxes": torch.tensor([[4.0, 4.0, 20.0, 16.0], [60.0, 40.0, 80.0, 56.0]]),
        "scores": torch.tensor([0.9, 0.1]),
        "labels": torch.tensor([1, 2]),
    }
    if with_masks:
        masks = torch.zeros(2, 1, 64, 96)
        masks[0, 0, 6:14, 6:18] = 0.8
        detections["masks"] = masks
    return detections


def test_draw_detections_marks_boxes_above_threshold() -> None:
    image = torch.full((3, 64, 96), 0.5)
    drawn = draw_detections(image, _detections(), ["background", "cat", "dog"], score_thresh=0.3, long_side=0)
    assert isinstance(drawn, Image.Image) and drawn.size == (96, 64) and drawn.mode == "RGB"
    pixels = np.asarray(drawn)
    grey = np.full(3, 127, dtype=np.uint8)  # torchvision's float -> uint8: floor(0.5 * 256)
    assert (pixels[4, 4:21] != grey).any()  # top edge of the kept box
    assert (pixels[38:59, 58:83] == grey).all()  # the 0.1-score box is not drawn


def test_draw_detections_overlays_masks_and_accepts_uint8() -> None:
    image = torch.full((3, 64, 96), 100, dtype=torch.uint8)
    plain = np.asarray(draw_detections(image, _detections(), ["cat", "dog"], label_offset=1))
    masked = np.asarray(draw_detections(image, _detections(with_masks=True), ["cat", "dog"], label_offset=1))
    assert masked.shape == (533, 800, 3)  # 96 x 64 drawn at 800 x 533, the mask scaled with it
    assert (masked[100, 125] != plain[100, 125]).any()  # inside the mask (rows 6-14, columns 6-18), below the label
    assert (masked[416, 333] == 100).all()  # nowhere near any detection


def test_draw_detections_without_detections_returns_the_image() -> None:
    image = torch.rand(3, 10, 12)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    drawn = np.asarray(draw_detections(image, empty, ["cat"], long_side=0))
    assert drawn.shape == (10, 12, 3)
    assert np.array_equal(drawn, F.to_dtype(image, torch.uint8, scale=True).permute(1, 2, 0).numpy())


def _stacked() -> dict[str, torch.Tensor]:
    """One object reported under classes 0, 1 and 2 from one anchor, and a second object of class 1."""
    return {
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]] * 3 + [[44.0, 20.0, 60.0, 44.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([0, 2, 1, 1]),
    }


def _has_color(pixels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (pixels == np.array(color, dtype=np.uint8)).all(axis=-1)


def test_one_box_per_object_keeps_the_best_class_of_a_stack() -> None:
    shown = one_box_per_object(_stacked(), score_thresh=0.5)
    assert shown["labels"].tolist() == [1, 0]  # ascending score: the best is drawn last, on top
    assert shown["scores"].tolist() == pytest.approx([0.6, 0.9])
    assert one_box_per_object(_stacked(), score_thresh=0.95)["boxes"].shape == (0, 4)


def test_nested_boxes_of_one_class_are_drawn_once_and_overlapping_objects_of_two_classes_twice() -> None:
    # IoU of the two boxes: 0.6 (above the per-class 0.5, below the class-agnostic 0.7)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 24.0, 40.0]])
    same = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([3, 3])}
    assert one_box_per_object(same, score_thresh=0.5)["scores"].tolist() == pytest.approx([0.9])
    other = {**same, "labels": torch.tensor([3, 1])}
    assert one_box_per_object(other, score_thresh=0.5)["labels"].tolist() == [1, 3]


def test_small_images_are_drawn_upscaled_one_coloured_box_per_object_with_legible_labels() -> None:
    image = torch.full((3, 48, 64), 0.5)
    pixels = np.asarray(draw_detections(image, _stacked(), ["cat", "dog", "bird"], score_thresh=0.5))
    assert pixels.shape == (600, 800, 3)  # 64 x 48 drawn at 800 x 600: boxes scale by 12.5
    cat, dog, bird = (class_color(c) for c in range(3))
    assert not _has_color(pixels, bird).any()  # the stacked lower-scoring classes are not drawn
    assert _has_color(pixels[100:375, 100:500], cat).any() and _has_color(pixels[250:550, 550:750], dog).any()
    inside = pixels[104:200, 104:496]  # the cat box without its 3 px border
    rows = np.flatnonzero(_has_color(inside, cat).any(axis=1))  # the label's filled background, top-left
    assert rows.min() < 5 and len(rows) == rows.max() - rows.min() + 1 >= 15  # one band, 16 px high at 800 px
    text = (inside[rows.min():rows.max() + 1] == np.array(text_color(cat), dtype=np.uint8)).all(axis=-1)
    assert text.sum() > 100  # its text, in the contrasting colour


def test_class_colors_differ_and_text_contrasts() -> None:
    assert len({class_color(i) for i in range(20)}) == 20
    assert text_color((250, 250, 120)) == (0, 0, 0) and text_color((20, 20, 120)) == (255, 255, 255)


def test_smooth_is_a_trailing_mean() -> None:
    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert np.allclose(smooth(values, 2), [1.0, 2.0, 4.0, 6.0])
    assert np.array_equal(smooth(values, 1), values)


def _write_metrics(path, truncated: bool) -> None:
    lines = []
    for it in range(0, 100, 10):
        losses = {"loss_classification": 1.0 / (it + 1), "teacher/loss_classification": 0.5, "loss_distill": 0.1}
        lines.append(json.dumps({"kind": "train", "iter": it, "total_loss": 2.0, "losses": losses, "lr": 0.01}))
        if it % 50 == 40:
            metrics = {"bbox/AP": it / 10, "bbox/AP50": it / 5, "bbox/APm": float("nan")}
            lines.append(json.dumps({"kind": "eval", "iter": it, "split": "val", "metrics": metrics}))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"kind": "train", "iter": 100, "total_lo'
    path.write_text(text)


@pytest.mark.parametrize("truncated", [False, True])
def test_plot_metrics_writes_both_pngs(tmp_path, truncated: bool) -> None:
    metrics_file = tmp_path / "metrics.jsonl"
    _write_metrics(metrics_file, truncated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated last line is expected, not warned about
        written = plot_metrics(metrics_file, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "ap.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_plot_metrics_skips_ap_without_eval_records(tmp_path) -> None:
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(json.dumps({"kind": "train", "iter": 0, "total_loss": 1.0, "losses": {}}) + "\n")
    assert [p.name for p in plot_metrics(metrics_file, tmp_path)] == ["loss.png"]


def test_plot_metrics_errors(tmp_path) -> None:
    with pytest.raises(LGDError, match="absent.jsonl"):
        plot_metrics(tmp_path / "absent.jsonl", tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LGDError, match="no train or eval records"):
        plot_metrics(empty, tmp_path)


def test_read_metrics_warns_about_a_broken_middle_line(tmp_path) -> None:
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text('{"kind": "train", "iter": 1}\n{"kind": "tr\n{"kind": "train", "iter": 2}\n')
    with pytest.warns(UserWarning, match=r"\[2\]"):
        records = read_metrics(metrics_file)
    assert [r["iter"] for r in records] == [1, 2]


def test_plot_ap_curves(tmp_path) -> None:
    out = tmp_path / "bench" / "ap.png"
    curves = {"baseline": [(100, 1.0), (200, 3.0)], "lgd": [(200, 4.5), (100, 2.0)], "empty": []}
    assert plot_ap_curves(curves, out, "RetinaNet") == out
    with Image.open(out) as image:
        assert image.format == "PNG"


def test_plot_metrics_handles_a_resumed_run(tmp_path) -> None:
    # Killed at iter 20 mid-write, resumed from the iter-10 checkpoint: 20 is logged again.
    lines = [{"kind": "train", "iter": it, "total_loss": 1.0, "losses": {}} for it in (0, 10, 20)]
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(
        "".join(json.dumps(r) + "\n" for r in lines)
        + '{"kind": "tra'
        + json.dumps({"kind": "train", "iter": 20, "total_loss": 0.5, "losses": {}})
        + "\n"
        + json.dumps({"kind": "train", "iter": 30, "total_loss": 0.4, "losses": {}})
        + "\n"
    )
    with pytest.warns(UserWarning, match=r"\[4\]"):
        written = plot_metrics(metrics_file, tmp_path)
    assert [p.name for p in written] == ["loss.png"]
