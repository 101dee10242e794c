import pytest
import torch

from lgd.config import ModelConfig
from lgd.detectors import build_detector, view_of
from lgd.errors import WeightsError

from helpers import ARCHS, batch, tiny_detector


@pytest.mark.parametrize("arch", ARCHS)
def test_each_detector_trains_a_few_iterations_with_finite_losses(arch):
    model = tiny_detector(arch)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = batch(arch)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_view_inference_from_features_equals_the_detector(arch):
    """The view's detect() is what the teacher diagnostic uses: on the student's own features it must be
    the detector's own inference."""
    model = tiny_detector(arch).eval()
    model.transform.min_size = (64,)
    images, _ = batch(arch)
    view = view_of(model)
    with torch.no_grad():
        expected = model(images)
        image_list, _ = view.preprocess(images, None)
        got = view.detect(image_list, view.features(image_list), [tuple(i.shape[-2:]) for i in images])
    for e, g in zip(expected, got):
        assert torch.equal(e["boxes"], g["boxes"]) and torch.equal(e["labels"], g["labels"])


def test_any_class_count_and_fpn_width():
    for k, c in [(1, 32), (7, 64)]:
        model = tiny_detector("retinanet", num_classes=k, channels=c)
        assert model.head.classification_head.num_classes == k
        assert model.backbone.out_channels == c
    rcnn = tiny_detector("fasterrcnn", num_classes=5)
    assert rcnn.roi_heads.box_predictor.cls_score.out_features == 6  # + background


def test_unknown_weight_name_is_a_clear_error():
    with pytest.raises(WeightsError, match="neither a file nor a torchvision weight name"):
        build_detector(ModelConfig(depth=18, fpn_channels=32, backbone_weights="NoSuchWeights.X"), 3)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_detector(ModelConfig(depth=18, fpn_channels=32, weights=str(tmp_path / "nope.pth")), 3)


def test_local_weights_load_and_a_different_class_head_is_skipped(tmp_path):
    source = tiny_detector("retinanet", num_classes=5)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    cfg = ModelConfig(depth=18, fpn_channels=32, norm="bn", weights=str(tmp_path / "w.pth"))
    with pytest.warns(UserWarning, match="not loaded"):
        target = build_detector(cfg, 3)
    assert torch.equal(target.backbone.body.conv1.weight, source.backbone.body.conv1.weight)
    assert target.head.classification_head.cls_logits.weight.shape != source.head.classification_head.cls_logits.weight.shape


def test_rcnn_proposal_roi_and_mask_head_sizes_follow_the_config():
    cfg = ModelConfig(arch="maskrcnn", depth=18, fpn_channels=32, norm="gn", rpn_proposals_train=50,
                      rpn_proposals_test=40, roi_batch_size=16, mask_head_channels=24)
    model = build_detector(cfg, 3)
    assert model.rpn._pre_nms_top_n == {"training": 50, "testing": 40}
    assert model.rpn._post_nms_top_n == {"training": 50, "testing": 40}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    assert model.roi_heads.mask_head[0][0].out_channels == 24
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4  # 3 classes + background
    model.train()
    images, targets = batch("maskrcnn")
    losses = model(images, targets)
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
