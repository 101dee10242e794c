"""Backbones by name: the registry, DCN v2 at initialisation, Swin-T's FPN, and the depth/backbone keys (CPU)."""
from pathlib import Path

import pytest
import torch

from lgd.config import ModelConfig, load_config
from lgd.detectors import build_detector
from lgd.detectors.backbones import BACKBONES, build_backbone
from lgd.detectors.deform import ModulatedDeformConv
from lgd.errors import ConfigError

DCN = [False, True, True, True]


def _shapes(features: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in features.items()}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_gives_its_fpn_levels(name):
    # on the meta device: shapes and parameter counts without allocating or computing anything
    with torch.device("meta"):
        rcnn = build_backbone(ModelConfig(backbone=name, fpn_channels=64), one_stage=False)
        one_stage = build_backbone(ModelConfig(backbone=name, fpn_channels=64), one_stage=True)
        images = torch.zeros(2, 3, 128, 192)
        assert _shapes(rcnn(images)) == {"0": (2, 64, 32, 48), "1": (2, 64, 16, 24), "2": (2, 64, 8, 12),
                                         "3": (2, 64, 4, 6), "pool": (2, 64, 2, 3)}
        assert _shapes(one_stage(images)) == {"0": (2, 64, 16, 24), "1": (2, 64, 8, 12), "2": (2, 64, 4, 6),
                                              "p6": (2, 64, 2, 3), "p7": (2, 64, 1, 2)}
    assert rcnn.out_channels == 64 and hasattr(rcnn, "body") and hasattr(rcnn, "fpn")


# Student parameter counts at 80 classes, FPN width 256 (as `lgd summary` reports them for the recipes)
COUNTS = {
    ("retinanet", "resnet101", True): 54_655_966,
    ("retinanet", "resnext101_32x8d", True): 104_585_950,
    ("retinanet", "swin_t", False): 37_278_958,
    ("fcos", "resnext101_32x8d", True): 103_043_391,
    ("maskrcnn", "swin_t", False): 47_798_959,
}


@pytest.mark.parametrize("arch,backbone,deform", sorted(COUNTS))
def test_parameter_counts_of_the_reference_detectors(arch, backbone, deform):
    with torch.device("meta"):
        model = build_detector(ModelConfig(arch=arch, backbone=backbone, deform_stages=DCN if deform else [False] * 4),
                               80)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[arch, backbone, deform]
    deformable = [m for m in model.modules() if isinstance(m, ModulatedDeformConv)]
    assert len(deformable) == (4 + 23 + 3 if deform else 0)  # every 3x3 of res3 (4 blocks), res4 (23), res5 (3)


def _body(deform_stages, mask_scale=1.0):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet50", norm="frozen_bn", fpn_channels=32, deform_stages=deform_stages,
                      deform_mask_scale=mask_scale)
    return build_backbone(cfg, one_stage=True).body.double().eval()


def test_dcn_starts_as_the_plain_backbone_with_mask_scale_2():
    plain = _body([False] * 4)
    images = torch.rand(1, 3, 32, 48, dtype=torch.float64)  # float64: equal up to rounding, not up to luck
    with torch.no_grad():
        expected = plain(images)
    for scale, same in ((2.0, True), (1.0, False)):
        dcn = _body(DCN, scale)
        missing, unexpected = dcn.load_state_dict(plain.state_dict(), strict=False)  # ImageNet weights load so too
        assert not unexpected and missing and all(".conv2.conv_offset." in k for k in missing)
        assert all(not k.startswith("layer1.") for k in missing)  # res2 stays plain
        with torch.no_grad():
            found = dcn(images)
        for k in expected:
            close = torch.allclose(found[k], expected[k], atol=1e-6, rtol=0)
            assert close == same, (scale, k)  # detectron2's mask 0.5 halves each deformed conv at first


def test_dcn_offsets_and_masks_learn():
    dcn = _body([False, False, True, False], 2.0).float()
    dcn(torch.rand(1, 3, 32, 32))["2"].square().sum().backward()
    conv = dcn.layer3[0].conv2
    assert isinstance(conv, ModulatedDeformConv)
    grad = conv.conv_offset.weight.grad
    assert grad[:18].abs().sum() > 0 and grad[18:].abs().sum() > 0  # offsets, then mask logits


def test_dcn_needs_bottlenecks_and_a_resnet():
    with pytest.raises(ConfigError, match="model.deform_stages needs a bottleneck ResNet"):
        build_backbone(ModelConfig(backbone="resnet18", deform_stages=DCN), True)
    with pytest.raises(ConfigError, match="model.deform_stages applies to ResNet bottlenecks"):
        with torch.device("meta"):
            build_backbone(ModelConfig(backbone="swin_t", deform_stages=DCN), True)
    with pytest.raises(ConfigError, match="model.deform_stages must be 4 true/false values"):
        load_config(None, ["model.deform_stages=[true, true]"])


def test_swin_fpn_takes_sizes_its_windows_do_not_divide():
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone="swin_t", fpn_channels=32, trainable_layers=3), one_stage=False)
    with torch.no_grad():
        feats = backbone(torch.rand(1, 3, 70, 90))  # neither a multiple of 32 nor of the 7x7 windows (the patch embedding floors to /4, merging rounds up)
    assert _shapes(feats) == {"0": (1, 32, 17, 22), "1": (1, 32, 9, 11), "2": (1, 32, 5, 6), "3": (1, 32, 3, 3),
                              "pool": (1, 32, 2, 2)}
    assert all(torch.isfinite(f).all() for f in feats.values())
    frozen = {n.split(".")[1] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == {"0", "1"}  # trainable_layers=3: patch embedding and stage 1 frozen; output norms train


def test_depth_and_backbone_must_agree():
    assert load_config(None, ["model.depth=101", "model.backbone=resnet101"]).model.depth == 101
    with pytest.raises(ConfigError, match="model.depth=50 and model.backbone=resnext101_32x8d disagree"):
        load_config(None, ["model.depth=50", "model.backbone=resnext101_32x8d"])
    with pytest.raises(ConfigError, match="model.backbone must be one of .*swin_t; got 'vgg16'"):
        load_config(None, ["model.backbone=vgg16"])
    with torch.device("meta"):  # model.depth alone keeps naming resnet<depth>
        body = build_backbone(ModelConfig(depth=34), one_stage=True).body
    assert type(body.layer1[0]).__name__ == "BasicBlock" and len(body.layer3) == 6


@pytest.mark.parametrize("overrides", [
    # Swin-T Mask R-CNN as the reference trains it: AdamW student, SGD teacher, mask-guided
    ("model.arch=maskrcnn", "model.backbone=swin_t", "solver.optimizer=adamw", "solver.base_lr=0.0001",
     "solver.weight_decay=0.05", "lgd.mask_guided=true", "model.mask_head_channels=16", "model.rpn_proposals_train=50",
     "model.rpn_proposals_test=50", "model.roi_batch_size=32"),
    # a grouped (ResNeXt) bottleneck with DCN v2 (in res5 only: deform_conv2d is slow on CPU), under FCOS, whose
    # GroupNorm(32) needs FPN width 64 on a 64 px image's 1x1 P7
    ("model.arch=fcos", "model.backbone=resnext50_32x4d", "model.deform_stages=[false,false,false,true]",
     "model.fpn_channels=64"),
], ids=["swin_t-maskrcnn", "resnext-dcn-fcos"])
def test_each_new_backbone_family_trains_with_lgd_evaluates_and_exports(tiny_config, overrides, capsys):
    from lgd.cli import main
    from lgd.config import save_config
    from lgd.engine.training import train
    from lgd.errors import LGDError
    from lgd.export import export_onnx, load_student

    cfg = tiny_config("model.depth=null", "solver.max_iter=2", "checkpoint_period=2", "lgd.freeze_backbone_iters=1",
                      "lgd.eval_teacher=false", *overrides)
    out = train(cfg, progress=False)
    assert 0 <= out["metrics"]["bbox/AP"] <= 100
    run = Path(cfg.output_dir)
    save_config(cfg, run / "cfg.yaml")
    assert main(["export", "-c", str(run / "cfg.yaml")]) == 0
    student, meta = load_student(run / "student.pth")
    with torch.no_grad():
        detections = student([torch.rand(3, 64, 64)])[0]
    assert set(detections) >= {"boxes", "scores", "labels"}
    if any(cfg.model.deform_stages):
        with pytest.raises(LGDError, match="ONNX export cannot express this student's deformable convolutions"):
            export_onnx(student, cfg.model, ["a"], [1], 0, [torch.rand(3, 64, 64)], run / "s.onnx")
        assert not (run / "s.onnx").exists()


def test_swin_fpn_exports_to_onnx(tmp_path):
    # the detectors' own ONNX paths are tested in test_export.py; the new part here is Swin-T's FPN
    import onnxruntime

    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone="swin_t", fpn_channels=32), one_stage=True).eval()
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = backbone(image)
    torch.onnx.export(backbone, (image,), str(tmp_path / "swin.onnx"), input_names=["image"],
                      output_names=[f"level_{k}" for k in expected], opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "swin.onnx"), providers=["CPUExecutionProvider"])
    for found, want in zip(session.run(None, {"image": image.numpy()}), expected.values()):
        torch.testing.assert_close(torch.from_numpy(found), want, atol=1e-4, rtol=1e-4)
