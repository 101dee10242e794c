"""The implicit teacher equals the authors' implementation (megvii-research/LGD ``DynamicTeacher``).

``tests/data/lgd_teacher_reference.pt`` holds the reference teacher's output maps, label embeddings, input
gradients, inside masks and clamped boxes, computed with the authors' code in float64 for three configurations.
No weights are stored: ``weight_rule`` regenerates every reference parameter from its name and shape; here each
is generated under its reference name and copied into our module of the same role (the name map below).
Any change to any step of the teacher (descriptors, encoder, masks, pooling, attention, painting, refinement)
moves these numbers far beyond the tolerance.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from lgd.teacher import ImplicitTeacher, inside_masks, pad_objects

GOLDEN = torch.load(Path(__file__).parent / "data" / "lgd_teacher_reference.pt", weights_only=True)
TOLERANCE = 1e-10  # float64 throughout; observed differences are ~1e-14

# reference parameter name (prefix) -> ours; the remainder of the name ("weight", "bias", ...) is kept.
_STN = {"conv1": "features.0.0", "conv2": "features.1.0", "conv3": "features.2.0", "fc1": "features.3.0",
        "fc2": "features.4.0", "fc3": "matrix"}
NAME_MAP = {
    **{f"label_encoder_.stn_desc.{k}.": f"label_encoder.input_transform.{v}." for k, v in _STN.items()},
    **{f"label_encoder_.stn_feat.{k}.": f"label_encoder.feature_transform.{v}." for k, v in _STN.items()},
    "label_encoder_.conv1.": "label_encoder.embed.0.",
    "label_encoder_.conv2.": "label_encoder.lift.0.0.",
    "label_encoder_.conv3.": "label_encoder.lift.1.0.",
    "label_encoder_.conv4.": "label_encoder.fuse.0.",
    "canoni_proj_1D.0.0.": "relation.label_projection.0.",
    "multi_head_attn.": "relation.attention.",
    "student_proj_2D.0.0.": "appearance.projection.0.",
    "local_inst_proj_1D.": "mapper.local.",
    "local_inst_proj_2D.": "mapper.render.",
    "global_ctx_proj_1D.": "mapper.context.",
    "refinement_module.": "mapper.refine.",
}


def _q(n: int) -> torch.Tensor:
    """q(i) = (i * i) mod 1000003 for i = 0..n-1, exact in int64, as float64."""
    i = torch.arange(n, dtype=torch.int64)
    return ((i * i) % 1000003).to(torch.float64)


def reference_weight(name: str, shape: list[int]) -> torch.Tensor:
    """The golden file's weight rule: 0.3 * sin(0.7 * q(i) + crc32(name) % 1000), C order."""
    n = int(torch.tensor(shape).prod()) if shape else 1
    return (0.3 * torch.sin(0.7 * _q(n) + float(zlib.crc32(name.encode("utf-8")) % 1000))).reshape(shape)


def our_name(reference: str) -> str:
    for prefix, ours in NAME_MAP.items():
        if reference.startswith(prefix):
            return ours + reference[len(prefix):]
    raise KeyError(f"no mapping for reference parameter {reference}")


def _level_tensors(rule_scale: float, offset: float, fn) -> list[torch.Tensor]:
    inputs = GOLDEN["inputs"]
    out = []
    for level, (h, w) in enumerate(inputs["level_sizes"]):
        shape = (inputs["batch"], inputs["channels"], h, w)
        n = shape[0] * shape[1] * h * w
        out.append(fn(rule_scale * _q(n) + offset * (level + 1)).reshape(shape))
    return out


def features() -> list[torch.Tensor]:
    return _level_tensors(0.37, 1.3, torch.sin)


def gradient_weights() -> list[torch.Tensor]:
    return _level_tensors(0.53, 0.4, torch.cos)


def build_teacher(name: str) -> ImplicitTeacher:
    config = GOLDEN["configs"][name]["config"]
    teacher = ImplicitTeacher(config["num_classes"], channels=config["channels"], context_box=config["context_box"],
                              class_format=config["class_format"], attention=config["attention"],
                              detach_appearance=config["detach_appearance"]).double()
    ours = dict(teacher.named_parameters())
    assigned = set()
    for ref_name, shape in GOLDEN["reference_params"][name]:
        target = our_name(ref_name)
        if target not in ours:
            # The reference keeps its context Linear when the context box is off; ours is not built then.
            assert target.startswith("mapper.context.") and not config["context_box"], ref_name
            continue
        value = reference_weight(ref_name, shape)
        with torch.no_grad():
            ours[target].copy_(value.reshape(ours[target].shape))  # e.g. Conv1d (out, in, 1) -> Linear (out, in)
        assigned.add(target)
    assert assigned == set(ours), f"parameters without a reference value: {set(ours) - assigned}"
    return teacher


def test_generated_inputs_match_the_golden_checksums():
    for level, (feature, check) in enumerate(zip(features(), GOLDEN["inputs"]["feature_checks"])):
        assert float(feature.sum()) == pytest.approx(check["sum"], abs=1e-9), level
        assert feature.flatten()[:4].tolist() == pytest.approx(check["first"], abs=1e-12)
    for level, (g, check) in enumerate(zip(gradient_weights(), GOLDEN["inputs"]["g_checks"])):
        assert float(g.abs().sum()) == pytest.approx(check["abs_sum"], abs=1e-9), level


@pytest.mark.parametrize("name", sorted(GOLDEN["configs"]))
def test_teacher_matches_the_reference(name):
    golden, inputs = GOLDEN["configs"][name], GOLDEN["inputs"]
    teacher = build_teacher(name)
    feats = [f.clone().requires_grad_(True) for f in features()]
    captured = {}
    teacher.label_encoder.register_forward_hook(lambda module, args, out: captured.setdefault("labels", out))
    output = teacher(feats, inputs["boxes"], inputs["classes"], tuple(inputs["image_size"]))

    for level, (ours, ref) in enumerate(zip(output.features, golden["outputs"])):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() <= TOLERANCE, f"output p{level + 3}"

    labels = captured["labels"]  # (B, N, C); the context box, when on, is the last slot of its image
    rows = torch.stack([labels[image, slot] for image, slot in golden["label_embedding_rows"]])
    assert (rows - golden["label_embeddings"]).abs().max() <= TOLERANCE

    scalar = sum((out * g).sum() for out, g in zip(output.features, gradient_weights()))
    assert float(scalar.detach()) == pytest.approx(golden["scalar"], abs=1e-9)
    scalar.backward()
    for level, feature in enumerate(feats):
        for k, image in enumerate(golden["input_grad_images"]):
            ref = golden["input_grads"][level][k]
            assert (feature.grad[image] - ref).abs().max() <= TOLERANCE, f"input grad p{level + 3}, image {image}"
        for image in golden["input_grad_zero_images"]:  # exactly zero in the reference; ours is rounding noise
            assert feature.grad[image].abs().max() <= TOLERANCE, f"input grad p{level + 3}, image {image}"


@pytest.mark.parametrize("name", sorted(GOLDEN["configs"]))
def test_clamped_boxes_and_inside_masks_match_the_reference(name):
    golden, inputs = GOLDEN["configs"][name], GOLDEN["inputs"]
    context = golden["config"]["context_box"]
    size = tuple(inputs["image_size"])
    objects = pad_objects(inputs["boxes"], inputs["classes"], size, context, torch.float64)
    for image, ref_boxes in enumerate(golden["clamped_boxes"]):
        slots = objects.valid[image]
        assert torch.equal(objects.boxes[image][slots].to(ref_boxes.dtype), ref_boxes)
    for level, level_size in enumerate(inputs["level_sizes"]):
        masks = inside_masks(objects.boxes, size, tuple(level_size)) | objects.is_context[..., None, None]
        for image, ref in enumerate(golden["inside_masks"][level]):
            assert torch.equal(masks[image][objects.valid[image]], ref), f"p{level + 3}, image {image}"


def test_a_changed_step_is_caught():
    """The tolerance is tight enough to see one refinement weight nudged by 1e-6."""
    name = "a_onehot_ctx"
    teacher = build_teacher(name)
    with torch.no_grad():
        teacher.mapper.refine[6].bias[0] += 1e-6
        output = teacher(features(), GOLDEN["inputs"]["boxes"], GOLDEN["inputs"]["classes"],
                         tuple(GOLDEN["inputs"]["image_size"]))
    diff = max(float((o - r).abs().max()) for o, r in zip(output.features, GOLDEN["configs"][name]["outputs"]))
    assert diff > TOLERANCE
