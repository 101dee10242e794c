"""`lgd visualize`: student FPN energy beside the teacher's knowledge energy, per level, as a PNG."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from lgd.cli import main
from lgd.config import save_config
from lgd.data.build import build_dataset
from lgd.errors import DatasetError
from lgd.feature_maps import DPI, PANEL_INCHES, feature_energies, find_image, level_names, render_feature_maps
from lgd.methods.build import build_model

from helpers import tiny_lgd


def test_energies_cover_the_image_without_padding():
    model = tiny_lgd("retinanet").eval()
    model.student.transform.min_size = (64,)
    image = torch.rand(3, 48, 64)  # resized to 64 x 85, padded to 64 x 96
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    student, teacher = feature_energies(model, image, target)
    assert len(student) == len(teacher) == 5
    assert level_names(model, 5) == ["P3", "P4", "P5", "P6", "P7"]
    for level, (s, t) in enumerate(zip(student, teacher)):
        stride = 8 * 2 ** level
        assert s.shape == t.shape == (math.ceil(64 / stride), math.ceil(85 / stride))
        assert (s >= 0).all() and (t >= 0).all()
    assert level_names(tiny_lgd("fasterrcnn"), 5)[0] == "P2"


def test_render_writes_a_png_of_the_documented_size(tmp_path):
    maps = [torch.rand(8, 8), torch.rand(4, 4)]
    out = render_feature_maps(torch.rand(3, 32, 32), torch.tensor([[2.0, 2.0, 20.0, 12.0]]), [0], ["cat"],
                              maps, maps, ["P3", "P4"], tmp_path / "fm.png", "title")
    width, height = Image.open(out).size
    assert (width, height) == (2 * PANEL_INCHES * DPI, 3 * PANEL_INCHES * DPI)  # image row + 2 levels


def test_visualize_from_the_cli(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    dataset = build_dataset(cfg, "val", train=False)
    torch.save({"model": build_model(cfg, dataset.num_classes).state_dict()}, tmp_path / "w.pth")
    save_config(cfg, tmp_path / "cfg.yaml")
    image_id = dataset.ids[find_image(dataset, None)]
    assert main(["visualize", "-c", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "w.pth")]) == 0
    out = tmp_path / "run" / f"feature_maps_val_{image_id}.png"
    assert str(out) in capsys.readouterr().out
    assert Image.open(out).size == (2 * PANEL_INCHES * DPI, 6 * PANEL_INCHES * DPI)  # RetinaNet: P3-P7

    name = dataset.image_info(1)["file_name"]
    assert find_image(dataset, name) == 1 and find_image(dataset, str(dataset.ids[1])) == 1
    with pytest.raises(DatasetError, match="no image with id or file name 'nope.png'"):
        find_image(dataset, "nope.png")
    assert main(["visualize", "-c", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "w.pth"),
                 "lgd.enabled=false"]) == 2
    assert "need an LGD model" in capsys.readouterr().err
