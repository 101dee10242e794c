"""Drawing detections, reading images, and plotting training curves."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lgd.errors import DatasetError, LGDError
from lgd.plots import plot_ap_curves, plot_metrics, read_metrics, smooth
from lgd.visualize import class_color, draw_detections, list_images, load_image


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
    drawn = draw_detections(image, _detections(), ["background", "cat", "dog"], score_thresh=0.3)
    assert isinstance(drawn, Image.Image) and drawn.size == (96, 64) and drawn.mode == "RGB"
    pixels = np.asarray(drawn)
    grey = np.full(3, 128, dtype=np.uint8)
    assert (pixels[4, 4:21] != grey).any()  # top edge of the kept box
    assert (pixels[38:59, 58:83] == grey).all()  # the 0.1-score box is not drawn


def test_draw_detections_overlays_masks_and_accepts_uint8() -> None:
    image = torch.full((3, 64, 96), 100, dtype=torch.uint8)
    plain = np.asarray(draw_detections(image, _detections(), ["cat", "dog"], label_offset=1))
    masked = np.asarray(draw_detections(image, _detections(with_masks=True), ["cat", "dog"], label_offset=1))
    assert (masked[10, 10] != plain[10, 10]).any()  # inside the mask, away from the box edges
    assert (masked[50, 40] == 100).all()  # nowhere near any detection


def test_draw_detections_without_detections_returns_the_image() -> None:
    image = torch.rand(3, 10, 12)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    drawn = np.asarray(draw_detections(image, empty, ["cat"]))
    assert drawn.shape == (10, 12, 3)
    assert np.array_equal(drawn, image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_class_colors_differ() -> None:
    assert len({class_color(i) for i in range(20)}) == 20


def test_load_image_reads_rgb_floats(tmp_path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (5, 3), color=255).save(path)
    image = load_image(path)
    assert image.shape == (3, 3, 5) and image.dtype == torch.float32
    assert torch.allclose(image, torch.ones_like(image))


def test_load_image_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "missing.jpg"
    with pytest.raises(DatasetError, match="missing.jpg"):
        load_image(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image(broken)


def test_list_images(tmp_path) -> None:
    for name in ["b.PNG", "a.jpg", "c.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    assert list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    with pytest.raises(DatasetError, match="notes.txt"):
        list_images(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        list_images(tmp_path / "empty")


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
