"""Faster and Mask R-CNN under LGD: mask-guided inside masks, export, training and evaluation with masks."""
from pathlib import Path

import pytest
import torch

from lgd.config import ModelConfig
from lgd.engine.training import train
from lgd.export import export_student, load_student
from lgd.teacher import resize_masks

from helpers import batch, tiny_lgd


def test_mask_guided_inside_masks_follow_hand_made_masks():
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, 4:12, 0:4] = 1      # an L shape: a bar ...
    masks[0, 8:12, 4:12] = 1     # ... and its foot
    masks[1, 5, 5] = 1           # one pixel, between the samples of a coarse level
    fine = resize_masks(masks, (8, 8))  # nearest: output (i, j) samples input (2i, 2j)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 0:2] = True
    expected[4:6, 2:6] = True
    assert torch.equal(fine[0], expected)
    coarse = resize_masks(masks, (4, 4))  # samples rows/cols 0, 4, 8, 12
    assert coarse[1].sum() == 0, "a tiny object can vanish at a coarse level"
    assert torch.equal(coarse[0], torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool))


def test_mask_guided_lgd_trains_with_an_object_empty_at_coarse_levels():
    model = tiny_lgd("maskrcnn", mask_guided=True).train()
    images, targets = batch("maskrcnn")
    targets[0]["boxes"][0] = torch.tensor([5.0, 5.0, 7.0, 7.0])
    targets[0]["masks"][0].zero_()
    targets[0]["masks"][0, 5:7, 5:7] = 1
    losses = model(images, targets)
    assert "teacher/loss_mask" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_two_stage_teacher_loss_leaves_the_detached_backbone_alone():
    model = tiny_lgd("fasterrcnn").train()
    assert model.detach_appearance
    losses = model(*batch("fasterrcnn"))
    sum(v for k, v in losses.items() if k.startswith("teacher/")).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.student.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.roi_heads.parameters())


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
def test_export_equivalence(arch, tmp_path):
    model = tiny_lgd(arch)
    cfg = ModelConfig(arch=arch, depth=18, fpn_channels=32, norm="bn", min_size=[64], max_size=128)
    path = export_student(model.student, cfg, ["a", "b", "c"], [1, 2, 3], 1, tmp_path / "s.pth")
    exported, meta = load_student(path)
    assert type(exported) is type(model.student) and meta["label_offset"] == 1
    images, _ = batch(arch)
    model.student.eval()
    with torch.no_grad():
        a, b = model.student(images), exported(images)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])
        if arch == "maskrcnn":
            assert torch.equal(x["masks"], y["masks"])


def test_mask_rcnn_trains_and_evaluates_box_and_mask_ap(tiny_config):
    # a narrow mask head and 20 detections per image: the mask head over 100 untrained detections was most of the time
    cfg = tiny_config("model.arch=maskrcnn", "solver.max_iter=2", "model.mask_head_channels=32",
                      "model.detections_per_img=20")
    out = train(cfg, progress=False)
    assert {"bbox/AP", "segm/AP"} <= set(out["metrics"])
    assert "segm" in out["result"].summary
    written = (Path(cfg.output_dir) / "eval_val.txt").read_text()
    assert "on val — bbox" in written and "on val — segm" in written
