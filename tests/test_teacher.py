"""Tests for LGD's implicit teacher (docs/method.md, sections 1-5), CPU-only with tiny sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lgd.teacher import (
    ImplicitTeacher,
    IntraObjectKnowledgeMapper,
    LabelEncoder,
    SpatialTransformer,
    TeacherOutput,
    descriptor_dim,
    inside_masks,
    label_descriptors,
    mask_crops,
    mask_pool,
    pad_objects,
    paint,
    resize_masks,
)

PATTERNS = ("student_guided", "label_guided", "student_fill", "teacher_fill")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_boxes(n: int, image_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    height, width = image_size
    corner = torch.rand(n, 2, generator=generator) * torch.tensor([width, height])
    size = torch.rand(n, 2, generator=generator) * torch.tensor([width, height]) / 2 + 1
    return torch.cat([corner, corner + size], dim=1)


def make_features(batch: int, channels: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=generator) for h, w in sizes]


# ---------------------------------------------------------------- descriptors


def test_descriptors_one_hot_normalise_and_clamp() -> None:
    boxes = [torch.tensor([[-10.0, 5.0, 50.0, 120.0], [10.0, 20.0, 30.0, 40.0]])]
    classes = [torch.tensor([2, 0])]
    objects = pad_objects(boxes, classes, (100, 200), context_box=False)
    d = label_descriptors(objects, (100, 200), num_classes=3, class_format="one_hot")
    assert d.shape == (1, 2, 4 + 3)
    # clamped to [0, W-1] x [0, H-1], divided by W/H, then 2v - 1
    expected_box0 = torch.tensor([0 / 200, 5 / 100, 50 / 200, 99 / 100]) * 2 - 1
    torch.testing.assert_close(d[0, 0, :4], expected_box0)
    torch.testing.assert_close(d[0, 0, 4:], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(d[0, 1, 4:], torch.tensor([1.0, -1.0, -1.0]))
    assert d.min() >= -1 and d.max() <= 1


def test_descriptors_norm_classes_and_context_box() -> None:
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[4.0, 4.0, 8.0, 8.0]])]
    classes = [torch.tensor([3]), torch.tensor([0])]
    objects = pad_objects(boxes, classes, (20, 40), context_box=True)
    assert objects.valid.tolist() == [[True, True], [True, True]]
    assert objects.is_context.tolist() == [[False, True], [False, True]]
    # context box [0, 0, W, H] clamped like the rest
    torch.testing.assert_close(objects.boxes[:, -1], torch.tensor([[0.0, 0.0, 39.0, 19.0]] * 2))
    d = label_descriptors(objects, (20, 40), num_classes=4, class_format="norm_classes")
    assert d.shape == (2, 2, 5)
    torch.testing.assert_close(d[0, 0, 4], torch.tensor(3 / 4 * 2 - 1))
    torch.testing.assert_close(d[1, 0, 4], torch.tensor(-1.0))
    torch.testing.assert_close(d[:, 1, 4], torch.tensor([-1.0, -1.0]))  # context class entry 0
    torch.testing.assert_close(d[0, 1, :4], torch.tensor([0.0, 0.0, 39 / 40, 19 / 20]) * 2 - 1)
    one_hot = label_descriptors(objects, (20, 40), num_classes=4, class_format="one_hot")
    assert (one_hot[:, 1, 4:] == -1).all()  # context class part is all zeros before 2v - 1
    assert d.min() >= -1 and d.max() <= 1


def test_descriptors_with_mask_crops_and_unknown_format() -> None:
    objects = pad_objects([torch.tensor([[1.0, 1.0, 5.0, 5.0]])], [torch.tensor([0])], (8, 8), True)
    crops = torch.full((1, 2, 7, 7), 0.5)
    d = label_descriptors(objects, (8, 8), 2, "one_hot", crops)
    assert d.shape == (1, 2, descriptor_dim(2, "one_hot", mask_guided=True)) == (1, 2, 55)
    assert torch.all(d[..., -49:] == 0)
    with pytest.raises(ValueError, match="class_format"):
        label_descriptors(objects, (8, 8), 2, "word2vec")


def test_pad_objects_layout() -> None:
    boxes = [torch.zeros(0, 4), torch.tensor([[1.0, 1.0, 2.0, 2.0]] * 3), torch.tensor([[0.0, 0.0, 3.0, 3.0]])]
    classes = [torch.zeros(0, dtype=torch.long), torch.tensor([0, 1, 2]), torch.tensor([1])]
    objects = pad_objects(boxes, classes, (10, 10), context_box=False)
    assert objects.valid.tolist() == [[False] * 3, [True] * 3, [True, False, False]]
    assert objects.classes.tolist() == [[-1, -1, -1], [0, 1, 2], [1, -1, -1]]
    assert objects.image_index.tolist() == [1, 1, 1, 2]
    assert objects.slot_index.tolist() == [0, 1, 2, 0]
    values = torch.arange(4.0)
    torch.testing.assert_close(objects.gather(objects.scatter(values)), values)
    # no objects at all still gives one (invalid) slot per image
    empty = pad_objects([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (10, 10), False)
    assert empty.valid.shape == (2, 1) and not empty.valid.any()


# ---------------------------------------------------------------- masks


def test_inside_masks_hand_computed() -> None:
    # stride 4: box [4, 8, 12, 16] -> [1, 2, 3, 4]: columns 1..3, rows 2..4
    mask = inside_masks(torch.tensor([4.0, 8.0, 12.0, 16.0]), (32, 32), (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:5, 1:4] = True
    assert torch.equal(mask, expected)


def test_inside_masks_tiny_box_empty_on_coarse_level() -> None:
    box = torch.tensor([5.0, 5.0, 6.0, 6.0])
    assert not inside_masks(box, (32, 32), (8, 8)).any()
    fine = inside_masks(box, (32, 32), (32, 32))
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[5:7, 5:7] = True
    assert torch.equal(fine, expected)


def test_inside_masks_border_and_odd_sizes() -> None:
    objects = pad_objects([torch.tensor([[-5.0, -5.0, 40.0, 40.0]])], [torch.tensor([0])], (32, 32), False)
    assert inside_masks(objects.boxes[0, 0], (32, 32), (8, 8)).all()
    # image 30 x 45, level 15 x 23: x scaled by 23/45 -> [4.6, 13.8], y by 1/2 -> [3, 10]
    mask = inside_masks(torch.tensor([9.0, 6.0, 27.0, 20.0]), (30, 45), (15, 23))
    expected = torch.zeros(15, 23, dtype=torch.bool)
    expected[3:11, 5:14] = True
    assert torch.equal(mask, expected)
    # a box at the bottom-right border reaches the last pixel: x [20.4, 22.5] y [12.5, 14.5] -> 21..22, 13..14
    corner = inside_masks(torch.tensor([40.0, 25.0, 44.0, 29.0]), (30, 45), (15, 23))
    expected = torch.zeros(15, 23, dtype=torch.bool)
    expected[13:, 21:] = True
    assert torch.equal(corner, expected)
    # at 4 x 6 the same box spans x [5.33, 5.87]: no integer column, so the mask is empty
    assert not inside_masks(torch.tensor([40.0, 25.0, 44.0, 29.0]), (30, 45), (4, 6)).any()


@pytest.mark.parametrize("level", [(30, 45), (15, 23), (8, 12), (4, 6), (2, 3), (1, 2), (1, 1)])
def test_context_box_covers_every_pixel(level: tuple[int, int]) -> None:
    objects = pad_objects([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], (30, 45), True)
    assert inside_masks(objects.boxes[0, -1], (30, 45), level).all()


def test_resize_masks_matches_interpolate_nearest() -> None:
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 37, 53, generator=generator) > 0.5
    for size in [(10, 14), (5, 7), (37, 53), (74, 106), (1, 1)]:
        expected = F.interpolate(masks[None].float(), size=size, mode="nearest")[0].bool()
        assert torch.equal(resize_masks(masks, size), expected)
    assert resize_masks(torch.zeros(0, 37, 53, dtype=torch.uint8), (5, 7)).shape == (0, 5, 7)


def test_mask_crops_values() -> None:
    masks = torch.zeros(3, 14, 14, dtype=torch.uint8)
    masks[0] = 1
    masks[2, :, :7] = 1
    crops = mask_crops(masks, torch.tensor([[0.0, 0.0, 14.0, 14.0]] * 3))
    assert crops.shape == (3, 7, 7)
    assert torch.all(crops[0] == 1) and torch.all(crops[1] == 0)
    # bins of 2 pixels: bins 0-2 inside the left half, bin 3 straddles it, bins 4-6 outside
    assert torch.all(crops[2, :, :3] == 1) and torch.all(crops[2, :, 4:] == 0)
    torch.testing.assert_close(crops[2, :, 3], torch.full((7,), 0.5))


def test_mask_pool_and_paint_match_naive_loop() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 5, 6, 7, generator=generator)
    masks = torch.rand(2, 4, 6, 7, generator=generator) > 0.6
    masks[1, 3] = False  # an empty mask pools to zero
    vectors = torch.randn(2, 4, 5, generator=generator)
    pooled = mask_pool(features, masks)
    painted = paint(vectors, masks)
    naive_pooled = torch.zeros(2, 4, 5)
    naive_painted = torch.zeros(2, 5, 6, 7)
    for b in range(2):
        for n in range(4):
            inside = masks[b, n]
            naive_pooled[b, n] = features[b][:, inside].sum(dim=1) / max(int(inside.sum()), 1)
            naive_painted[b] += vectors[b, n][:, None, None] * inside
    torch.testing.assert_close(pooled, naive_pooled)
    torch.testing.assert_close(painted, naive_painted)
    assert torch.all(pooled[1, 3] == 0)


# ---------------------------------------------------------------- label encoder and mapper


def test_spatial_transformer_adds_no_identity() -> None:
    stn = SpatialTransformer(5)
    torch.nn.init.zeros_(stn.matrix.weight)
    torch.nn.init.zeros_(stn.matrix.bias)
    assert torch.all(stn(torch.randn(2, 3, 5)) == 0)


def test_label_encoder_ignores_padding_and_is_permutation_equivariant() -> None:
    torch.manual_seed(0)
    encoder = LabelEncoder(descriptor_dim=7, channels=16)
    objects = torch.rand(1, 3, 7) * 2 - 1
    out = encoder(objects, torch.ones(1, 3, dtype=torch.bool))
    assert out.shape == (1, 3, 16)
    padded = torch.cat([objects, torch.full((1, 2, 7), 5.0)], dim=1)
    valid = torch.tensor([[True, True, True, False, False]])
    torch.testing.assert_close(encoder(padded, valid)[:, :3], out)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(encoder(objects[:, order], torch.ones(1, 3, dtype=torch.bool)), out[:, order])


def test_mapper_context_bias_and_unpainted_objects() -> None:
    torch.manual_seed(0)
    mapper = IntraObjectKnowledgeMapper(channels=8, context_box=False)
    masks = [torch.ones(1, 2, 4, 4, dtype=torch.bool)]
    none_painted = torch.zeros(1, 2, dtype=torch.bool)
    a = mapper([torch.randn(1, 2, 8)], masks, none_painted)[0]
    b = mapper([torch.randn(1, 2, 8)], masks, none_painted)[0]
    torch.testing.assert_close(a, b)
    with_context = IntraObjectKnowledgeMapper(channels=8, context_box=True)
    knowledge = [torch.randn(1, 2, 8)]
    c = with_context(knowledge, masks, none_painted, [torch.randn(1, 8)])[0]
    d = with_context(knowledge, masks, none_painted, [torch.randn(1, 8)])[0]
    assert not torch.allclose(c, d)
    with pytest.raises(ValueError, match="context"):
        with_context(knowledge, masks, none_painted)


# ---------------------------------------------------------------- the whole teacher


def test_parameter_counts() -> None:
    assert count(ImplicitTeacher(80)) == 8_304_336
    assert count(ImplicitTeacher(80, class_format="norm_classes")) == 6_487_257
    assert count(ImplicitTeacher(80, context_box=False)) == 8_304_336 - 65_792
    assert count(ImplicitTeacher(80, channels=16)) < count(ImplicitTeacher(80))


@pytest.mark.parametrize(
    ("image_size", "levels", "num_classes", "channels"),
    [
        ((50, 70), [(13, 18), (7, 9), (4, 5)], 1, 16),
        ((64, 96), [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)], 3, 64),
        ((33, 47), [(9, 12), (5, 6), (3, 3), (2, 2), (1, 1)], 80, 16),
        ((32, 32), [(4, 4), (2, 2), (1, 1)], 80, 256),
    ],
)
def test_output_shapes(image_size, levels, num_classes, channels) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher = ImplicitTeacher(num_classes, channels=channels)
    features = make_features(2, channels, levels)
    boxes = [random_boxes(3, image_size, generator), random_boxes(1, image_size, generator)]
    classes = [torch.randint(0, num_classes, (3,), generator=generator), torch.tensor([num_classes - 1])]
    out = teacher(features, boxes, classes, image_size)
    assert isinstance(out, TeacherOutput)
    assert [f.shape for f in out.features] == [f.shape for f in features]
    assert out.has_objects.tolist() == [True, True]


@pytest.mark.parametrize("attention", PATTERNS)
def test_images_do_not_see_each_other(attention: str) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    teacher = ImplicitTeacher(3, channels=16, attention=attention).eval()
    sizes = [(8, 10), (4, 5), (2, 3)]
    first, second = make_features(2, 16, sizes, seed=1), make_features(2, 16, sizes, seed=2)
    for level_a, level_b in zip(first, second):
        level_b[0] = level_a[0]
    boxes0, classes0 = random_boxes(2, (32, 40), generator), torch.tensor([0, 2])
    a = teacher(first, [boxes0, random_boxes(1, (32, 40), generator)], [classes0, torch.tensor([1])], (32, 40))
    b = teacher(
        second,
        [boxes0, random_boxes(6, (32, 40), generator)],
        [classes0, torch.randint(0, 3, (6,), generator=generator)],
        (32, 40),
    )
    for level_a, level_b in zip(a.features, b.features):
        torch.testing.assert_close(level_a[0], level_b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a.features[0][1], b.features[0][1])


@pytest.mark.parametrize("context_box", [True, False])
@pytest.mark.parametrize("attention", PATTERNS)
def test_zero_one_and_many_objects_are_finite(attention: str, context_box: bool) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(4)
    teacher = ImplicitTeacher(3, channels=16, context_box=context_box, attention=attention)
    features = [f.requires_grad_() for f in make_features(3, 16, [(8, 12), (4, 6), (2, 3)])]
    counts = [0, 1, 100]
    boxes = [random_boxes(n, (32, 48), generator) for n in counts]
    classes = [torch.randint(0, 3, (n,), generator=generator) for n in counts]
    out = teacher(features, boxes, classes, (32, 48))
    assert out.has_objects.tolist() == [context_box, True, True]
    assert all(torch.isfinite(level).all() for level in out.features)
    sum(level.square().mean() for level in out.features).backward()
    grads = [p.grad for p in teacher.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if attention != "teacher_fill":
        assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in features)


def test_batch_without_any_object() -> None:
    teacher = ImplicitTeacher(2, channels=16, context_box=False)
    features = make_features(2, 16, [(4, 4), (2, 2)])
    empty = torch.zeros(0, 4)
    out = teacher(features, [empty, empty], [torch.zeros(0, dtype=torch.long)] * 2, (16, 16))
    assert out.has_objects.tolist() == [False, False]
    assert all(torch.isfinite(level).all() for level in out.features)


@pytest.mark.parametrize("attention", ["student_guided", "label_guided", "student_fill"])
def test_detach_appearance_blocks_gradient_to_features(attention: str) -> None:
    boxes, classes = [torch.tensor([[2.0, 2.0, 20.0, 14.0]])], [torch.tensor([1])]
    for detach in (False, True):
        torch.manual_seed(0)
        teacher = ImplicitTeacher(2, channels=16, attention=attention, detach_appearance=detach)
        features = [f.requires_grad_() for f in make_features(1, 16, [(8, 12), (4, 6)])]
        out = teacher(features, boxes, classes, (32, 48))
        sum(level.sum() for level in out.features).backward()
        assert (features[0].grad is None) == detach
        assert teacher.mapper.local.weight.grad is not None


def test_mask_guided_teacher() -> None:
    torch.manual_seed(0)
    teacher = ImplicitTeacher(3, channels=16, mask_guided=True)
    assert teacher.label_encoder.input_transform.dim == 4 + 3 + 49
    masks = [torch.zeros(2, 32, 48, dtype=torch.uint8), torch.zeros(0, 32, 48, dtype=torch.uint8)]
    masks[0][0, 4:12, 8:20] = 1
    masks[0][1, 20:30, 30:46] = 1
    boxes = [torch.tensor([[8.0, 4.0, 20.0, 12.0], [30.0, 20.0, 46.0, 30.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    features = [f.requires_grad_() for f in make_features(2, 16, [(8, 12), (4, 6)])]
    out = teacher(features, boxes, classes, (32, 48), masks)
    assert [f.shape for f in out.features] == [f.shape for f in features]
    assert all(torch.isfinite(level).all() for level in out.features)
    sum(level.sum() for level in out.features).backward()
    assert torch.isfinite(features[0].grad).all()
    with pytest.raises(ValueError, match="mask"):
        teacher(features, boxes, classes, (32, 48))


def test_invalid_inputs_raise_value_error() -> None:
    teacher = ImplicitTeacher(3, channels=16)
    features = make_features(2, 16, [(4, 4)])
    box = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    good_boxes, good_classes = [box, box], [torch.tensor([0]), torch.tensor([2])]
    teacher(features, good_boxes, good_classes, (16, 16))
    cases = [
        (features, good_boxes, [torch.tensor([0]), torch.tensor([3])], "class ids"),
        (features, good_boxes, [torch.tensor([-1]), torch.tensor([0])], "class ids"),
        (features, [box], [torch.tensor([0])], "2 images"),
        (features, [box, torch.zeros(1, 5)], good_classes, "boxes\\[1\\]"),
        (features, good_boxes, [torch.tensor([0, 1]), torch.tensor([0])], "classes\\[0\\]"),
        (features, good_boxes, [torch.tensor([0.0]), torch.tensor([1.0])], "integer"),
        (make_features(2, 8, [(4, 4)]), good_boxes, good_classes, "features\\[0\\]"),
    ]
    for feats, boxes, classes, message in cases:
        with pytest.raises(ValueError, match=message):
            teacher(feats, boxes, classes, (16, 16))
    with pytest.raises(ValueError, match="attention"):
        ImplicitTeacher(3, attention="cross")
    with pytest.raises(ValueError, match="class_format"):
        ImplicitTeacher(3, class_format="word2vec")
    with pytest.raises(ValueError, match="divisible"):
        ImplicitTeacher(3, channels=12)
