import pytest
import torch

from lgd.methods.lgd import LGD, distillation_loss, instance_norm

from helpers import ARCHS, batch, tiny_detector, tiny_lgd


def _grads(params):
    return [p.grad for p in params]


def _has_grad(params) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_returns_student_teacher_and_distill_terms(arch):
    model = tiny_lgd(arch, mask_guided=arch == "maskrcnn").train()
    losses = model(*batch(arch))
    student = {k for k in losses if not k.startswith("teacher/") and k != "loss_distill"}
    assert student and {f"teacher/{k}" for k in student} <= set(losses)
    assert "loss_distill" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert _has_grad(model.teacher.parameters()) and _has_grad(model.adapter.parameters())


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_eval_mode_is_exactly_the_wrapped_detector(arch):
    model = tiny_lgd(arch).eval()
    images, _ = batch(arch)
    with torch.no_grad():
        ours, theirs = model(images), model.student(images)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_reference_defaults_per_detector_family():
    assert tiny_lgd("retinanet").context_box and not tiny_lgd("retinanet").detach_appearance
    assert not tiny_lgd("fcos").context_box and not tiny_lgd("fcos").detach_appearance
    assert not tiny_lgd("fasterrcnn").context_box and tiny_lgd("fasterrcnn").detach_appearance
    assert tiny_lgd("retinanet", context_box=False).context_box is False


def test_class_count_is_read_from_the_detector():
    assert LGD(tiny_detector("retinanet", num_classes=4)).num_classes == 4
    assert LGD(tiny_detector("fasterrcnn", num_classes=4)).num_classes == 4


def test_teacher_gets_no_gradient_from_the_distillation_loss():
    model = tiny_lgd("retinanet").train()
    model(*batch("retinanet"))["loss_distill"].backward()
    assert not _has_grad(model.teacher.parameters())
    assert _has_grad(model.adapter.parameters()) and _has_grad(model.student.backbone.parameters())


def test_student_gets_no_distillation_gradient_before_pre_distill_iters():
    model = tiny_lgd("retinanet", pre_distill_iters=10).train()
    model.set_iteration(9)
    assert model.student_detached
    model(*batch("retinanet"))["loss_distill"].backward()
    assert not _has_grad(model.student.parameters())
    assert _has_grad(model.adapter.parameters())
    model.zero_grad()
    model.set_iteration(10)
    assert not model.student_detached
    model(*batch("retinanet"))["loss_distill"].backward()
    assert _has_grad(model.student.backbone.parameters())


def test_post_distill_window_detaches_the_last_iterations():
    model = tiny_lgd("retinanet", post_distill_iters=5)  # max_iter = 100
    model.set_iteration(95)  # the reference detaches when iteration > max_iter - post_distill_iters
    assert not model.student_detached
    model.set_iteration(96)
    assert model.student_detached


def test_backbone_body_gets_no_update_inside_the_freeze_window():
    model = tiny_lgd("retinanet", freeze_backbone_iters=2).train()
    opt = torch.optim.SGD(model.student_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    body = [p.detach().clone() for p in model.student.backbone.body.parameters()]
    fpn = [p.detach().clone() for p in model.student.backbone.fpn.parameters()]
    images, targets = batch("retinanet")
    for it in range(2):
        model.set_iteration(it)
        opt.zero_grad()
        sum(model(images, targets).values()).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(body, model.student.backbone.body.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fpn, model.student.backbone.fpn.parameters()))
    model.set_iteration(2)
    opt.zero_grad()
    sum(model(images, targets).values()).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(body, model.student.backbone.body.parameters()))


def test_one_stage_teacher_loss_trains_the_student_backbone_unless_detached():
    for detach, expected in [(False, True), (True, False)]:
        model = tiny_lgd("retinanet", detach_appearance=detach).train()
        losses = model(*batch("retinanet"))
        sum(v for k, v in losses.items() if k.startswith("teacher/")).backward()
        assert _has_grad(model.student.backbone.body.parameters()) == expected


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn", "maskrcnn"])
def test_teacher_loss_updates_the_shared_head_unless_teacher_trains_head_is_off(arch):
    for trains_head in (True, False):
        model = tiny_lgd(arch, teacher_trains_head=trains_head, mask_guided=arch == "maskrcnn").train()
        losses = model(*batch(arch))
        sum(v for k, v in losses.items() if k.startswith("teacher/")).backward()
        heads = model.student.head if arch in ("retinanet", "fcos") else model.student.roi_heads
        assert _has_grad(heads.parameters()) == trains_head
        assert _has_grad(model.teacher.parameters())
        if trains_head is False:
            model.zero_grad()
            losses = model(*batch(arch))
            sum(v for k, v in losses.items() if not k.startswith("teacher/")).backward()
            assert _has_grad(heads.parameters())


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
@pytest.mark.parametrize("objects", [(0, 0), (0, 1), (1, 100)])
def test_empty_single_and_crowded_images_stay_finite(arch, objects):
    model = tiny_lgd(arch).train()
    losses = model(*batch(arch, objects=objects))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total = sum(losses.values())
    total.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    if objects == (0, 0) and not model.context_box:
        assert not any(k.startswith("teacher/") for k in losses)
        assert losses["loss_distill"] == 0


def test_distillation_loss_is_normalised_mse_over_all_levels():
    torch.manual_seed(0)
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 1, 1)]
    t = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 1, 1)]
    flat = torch.cat([(instance_norm(a) - instance_norm(b)).flatten() for a, b in zip(s, t)])
    assert torch.allclose(distillation_loss(s, t), flat.pow(2).mean())
    assert torch.allclose(instance_norm(s[0]), torch.nn.functional.instance_norm(s[0]), atol=1e-5)
    assert torch.equal(instance_norm(s[1]), torch.zeros_like(s[1]))  # 1x1 maps normalise to zero
    assert distillation_loss(s, s) == 0


def test_teacher_diagnostic_returns_detections():
    model = tiny_lgd("retinanet").eval()
    images, targets = batch("retinanet")
    out = model.teacher_detect(images, targets)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])


def test_the_summary_warns_when_the_run_ends_before_distillation_starts():
    assert "never learns from distillation" not in tiny_lgd("fcos", pre_distill_iters=99).describe()  # max_iter 100
    text = tiny_lgd("fcos", pre_distill_iters=100).describe()
    assert "WARNING: this run ends at iteration 100, so the student never learns from distillation" in text
