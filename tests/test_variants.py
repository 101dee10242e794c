"""The departures of issue 21 (docs/method.md, section 10): each mechanism on a toy batch, each off by default."""
import pytest
import torch
from torch.nn import functional as F

from helpers import batch, tiny_lgd
from lgd.config import LGDConfig, load_config
from lgd.errors import ConfigError
from lgd.methods.lgd import distillation_loss
from lgd.teacher import ImplicitTeacher, InterObjectRelationAdapter
from lgd.teacher.descriptors import label_descriptors, pad_objects
from lgd.teacher.label_encoder import LabelEncoder

BOXES = [torch.tensor([[4.0, 4, 20, 20], [30, 8, 60, 40], [10, 40, 30, 60], [40, 44, 62, 62]])]
CLASSES = [torch.tensor([0, 1, 2, 0])]


def test_the_defaults_are_the_reference():
    cfg = LGDConfig()
    assert (cfg.relation_residual, cfg.label_fusion, cfg.distill_region) == (False, "concat", "all")


def uniform_adapter(residual: bool) -> InterObjectRelationAdapter:
    """A relation adapter whose query and key projections are zero: its attention is exactly uniform."""
    torch.manual_seed(0)
    adapter = InterObjectRelationAdapter(32, "student_guided", residual=residual)
    with torch.no_grad():
        adapter.attention.in_proj_weight[:64].zero_()
        adapter.attention.in_proj_bias[:64].zero_()
    return adapter


def test_uniform_attention_erases_identity_and_the_residual_keeps_it():
    # The fixed point the teacher probe found: uniform attention gives every object of an image the same
    # knowledge, whatever its label; the residual path keeps each object's own label embedding in it.
    torch.manual_seed(1)
    labels, appearance = torch.randn(1, 4, 32), [torch.randn(1, 4, 32)]
    valid = torch.ones(1, 4, dtype=torch.bool)
    spread = {}
    for residual in (False, True):
        with torch.no_grad():
            out = uniform_adapter(residual)(labels, appearance, valid, num_levels=1)[0][0]
        spread[residual] = float((out - out.mean(dim=0)).norm(dim=-1).max())
    assert spread[False] < 1e-5
    assert spread[True] > 0.1


def test_the_residual_needs_attention_to_go_around():
    with pytest.raises(ValueError, match="residual"):
        InterObjectRelationAdapter(32, "teacher_fill", residual=True)


@pytest.mark.parametrize("seed", range(3))
def test_balanced_fusion_makes_one_images_label_embeddings_differ(seed):
    objects = pad_objects(BOXES, CLASSES, (64, 64), context_box=False)
    descriptors = label_descriptors(objects, (64, 64), num_classes=3)
    similarity = {}
    for fusion in ("concat", "balanced"):
        torch.manual_seed(seed)  # fusion adds no parameter: both encoders start from the same weights
        with torch.no_grad():
            embeddings = F.normalize(LabelEncoder(descriptors.shape[-1], 32, fusion)(descriptors, objects.valid)[0])
        similarity[fusion] = float((embeddings @ embeddings.T)[~torch.eye(4, dtype=torch.bool)].mean())
    assert similarity["balanced"] < similarity["concat"] - 0.05


def test_object_pixels_cover_the_painted_objects_only():
    torch.manual_seed(0)
    teacher = ImplicitTeacher(3, channels=32, context_box=True)
    features = [torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 8)]
    out = teacher(features, [torch.tensor([[0.0, 0, 32, 32]])], [torch.tensor([1])], (64, 64))
    fine = out.object_pixels[0][0, 0]
    assert fine.shape == (16, 16) and out.object_pixels[1].shape == (1, 1, 8, 8)
    # the box's inside mask (pixel centres 0..8 of the 16-pixel level, both ends in: masks.inside_masks); the
    # context box covers the whole image but is not an object
    assert bool(fine[:9, :9].all()) and int(fine.sum()) == 81


def test_distillation_inside_objects_is_the_mean_over_their_pixels():
    torch.manual_seed(0)
    teacher, student = [torch.randn(1, 8, 6, 6)], torch.randn(1, 8, 6, 6)
    region = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    region[..., :3, :3] = True

    def normed(x):  # the reference's instance normalisation, over the whole map
        return (x - x.mean((2, 3), keepdim=True)) / x.var((2, 3), unbiased=False, keepdim=True).add(1e-5).sqrt()

    squared = (normed(student) - normed(teacher[0])).pow(2)
    got = distillation_loss([student], teacher, [region])
    assert float(got) == pytest.approx(float(squared[..., :3, :3].mean()), rel=1e-5)
    assert float(got) != pytest.approx(float(squared.mean()), rel=1e-3)
    everywhere = torch.ones_like(region)
    assert float(distillation_loss([student], teacher, [everywhere])) == pytest.approx(
        float(distillation_loss([student], teacher)), rel=1e-6)
    assert float(distillation_loss([student], teacher, [torch.zeros_like(region)])) == 0.0


@pytest.mark.parametrize("arch", ["fcos", "fasterrcnn"])
def test_lgd_trains_with_every_departure_on(arch):
    lgd = tiny_lgd(arch, relation_residual=True, label_fusion="balanced", distill_region="objects")
    lgd.train()
    images, targets = batch(arch)
    losses = lgd(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and float(losses["loss_distill"]) > 0
    total.backward()
    teacher_grads = [p.grad for p in lgd.teacher_parameters()]
    assert all(g is not None for g in teacher_grads)


def test_an_unknown_departure_value_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="lgd.distill_region"):
        load_config(None, ["lgd.distill_region=boxes"])
    with pytest.raises(ConfigError, match="lgd.label_fusion"):
        load_config(None, ["lgd.label_fusion=sum"])
