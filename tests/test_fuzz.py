"""Property-based fuzzing (hypothesis) of the dataset loader and of the teacher's descriptor and mask functions
with hostile boxes: degenerate, inverted, negative, huge, NaN and infinite coordinates; 0 to hundreds of objects.

Either the input is used (and nothing downstream is NaN or out of range) or it is refused with a DatasetError
or ValueError saying what is wrong; no other exception may escape.
"""
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from lgd.data import CocoDetection, build_transforms
from lgd.data.coco import MIN_BOX_SIZE
from lgd.errors import DatasetError
from lgd.teacher import ImplicitTeacher, inside_masks, label_descriptors, mask_pool, pad_objects, paint

FUZZ = settings(max_examples=40, deadline=None)
K = 3
# Finite coordinates of every kind: in and around a small image, far outside it, and near float32's limit.
FINITE = st.one_of(
    st.floats(-50, 150, width=32),
    st.floats(-1e7, 1e7, width=32),
    st.sampled_from([0.0, -0.0, 1.0, 3e38, -3e38]),
)
COUNTS = st.one_of(st.integers(0, 4), st.sampled_from([0, 300]))


def _boxes(draw, n: int, coordinates=FINITE) -> torch.Tensor:
    return torch.from_numpy(draw(arrays(np.float32, (n, 4), elements=coordinates)))


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return {context: ImplicitTeacher(K, channels=8, context_box=context).eval() for context in (False, True)}


@FUZZ
@given(data=st.data())
def test_descriptors_masks_pooling_and_painting_stay_finite(data):
    counts = [data.draw(COUNTS) for _ in range(data.draw(st.integers(1, 3)))]
    height, width = data.draw(st.integers(1, 80)), data.draw(st.integers(1, 80))
    boxes = [_boxes(data.draw, n) for n in counts]
    classes = [torch.randint(0, K, (n,)) for n in counts]
    objects = pad_objects(boxes, classes, (height, width), context_box=data.draw(st.booleans()))

    assert objects.valid.sum() == sum(counts) + objects.is_context.sum()
    for class_format in ("one_hot", "norm_classes"):
        descriptors = label_descriptors(objects, (height, width), K, class_format)
        assert torch.isfinite(descriptors).all()
        assert descriptors.min() >= -1 and descriptors.max() <= 1
    for level in [(1, 1), (math.ceil(height / 4), math.ceil(width / 4)), (height, width)]:
        masks = inside_masks(objects.boxes, (height, width), level)
        assert masks.dtype == torch.bool and masks.shape == (*objects.valid.shape, *level)
        features = torch.randn(len(counts), 8, *level)
        pooled = mask_pool(features, masks)
        painted = paint(pooled, masks)
        assert torch.isfinite(pooled).all() and torch.isfinite(painted).all()
        # An object's pooled vector is a mean of its inside pixels, or zero where it has none.
        empty = ~masks.flatten(2).any(-1)
        assert (pooled[empty] == 0).all()


@FUZZ
@given(data=st.data())
def test_the_teacher_gives_finite_maps_for_finite_boxes_and_refuses_non_finite_ones(data, teachers):
    counts = [data.draw(COUNTS) for _ in range(data.draw(st.integers(1, 2)))]
    height, width = data.draw(st.integers(8, 64)), data.draw(st.integers(8, 64))
    levels = [torch.randn(len(counts), 8, math.ceil(height / s), math.ceil(width / s)) for s in (4, 8)]
    classes = [torch.randint(0, K, (n,)) for n in counts]
    teacher = teachers[data.draw(st.booleans())]
    poisoned = data.draw(st.booleans()) and sum(counts) > 0
    coordinates = st.one_of(FINITE, st.sampled_from([math.nan, math.inf, -math.inf])) if poisoned else FINITE
    boxes = [_boxes(data.draw, n, coordinates) for n in counts]

    if not all(torch.isfinite(b).all() for b in boxes):
        with pytest.raises(ValueError, match=r"boxes\[\d\] holds NaN or infinite coordinates"):
            teacher(levels, boxes, classes, (height, width))
        return
    with torch.no_grad():
        out = teacher(levels, boxes, classes, (height, width))
    assert [tuple(m.shape) for m in out.features] == [tuple(level.shape) for level in levels]
    assert all(torch.isfinite(m).all() for m in out.features)
    assert out.has_objects.tolist() == [n > 0 or teacher.context_box for n in counts]


# --------------------------------------------------------------------------- the COCO dataset loader
IMAGE_SIZES = [(40, 30), (17, 52)]  # (width, height)
_files = itertools.count()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_images")
    for i, size in enumerate(IMAGE_SIZES):
        Image.new("RGB", size, (i * 90, 120, 200)).save(root / f"{i}.png")
    return root


# Finite numbers of any kind, as JSON holds them: floats, integers, beyond float32's range.
FINITE_NUMBER = st.one_of(FINITE, st.integers(-10**6, 10**6), st.sampled_from([1e300, -1e300]))
FINITE_BBOX = st.lists(FINITE_NUMBER, min_size=4, max_size=4)
# What makes an annotation unusable: a non-finite number, a wrong length or type, an unknown category.
BROKEN_BBOX = st.one_of(
    st.lists(st.one_of(FINITE_NUMBER, st.sampled_from([math.nan, math.inf, -math.inf])), min_size=4, max_size=4)
    .filter(lambda b: not all(map(math.isfinite, b))),
    st.lists(FINITE_NUMBER, max_size=6).filter(lambda b: len(b) != 4),
    st.sampled_from([None, "1 2 3 4", {"x": 1}, [True, 1, 2, 3]]),
)


def _expected_kept(bbox, width: int, height: int) -> bool:
    """The loader's rule, restated: a box of at least MIN_BOX_SIZE that keeps that much once clipped to the image."""
    x, y, w, h = bbox
    if not (w >= MIN_BOX_SIZE and h >= MIN_BOX_SIZE):
        return False
    x1, y1 = min(max(x, 0), width), min(max(y, 0), height)
    x2, y2 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    return x2 - x1 >= MIN_BOX_SIZE and y2 - y1 >= MIN_BOX_SIZE


def _is_valid_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@FUZZ
@given(data=st.data())
def test_the_coco_loader_keeps_only_usable_boxes_or_says_what_is_wrong(data, image_root):
    annotations = []
    for image_index in range(len(IMAGE_SIZES)):
        for _ in range(data.draw(COUNTS)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_index + 1,
                                "category_id": data.draw(st.sampled_from([1, 2])), "bbox": data.draw(FINITE_BBOX),
                                "iscrowd": data.draw(st.sampled_from([0, 0, 0, 1]))})
    if annotations and data.draw(st.booleans()):  # half the files carry one broken annotation
        broken = data.draw(st.sampled_from(annotations))
        if data.draw(st.booleans()):
            broken["bbox"] = data.draw(BROKEN_BBOX)
        else:
            broken["category_id"] = 99
    doc = {"images": [{"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h}
                      for i, (w, h) in enumerate(IMAGE_SIZES)],
           "annotations": annotations,
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    ann_file = image_root / f"ann_{next(_files)}.json"
    ann_file.write_text(json.dumps(doc))  # NaN and Infinity are written as JSON's common extensions
    well_formed = all(
        a["category_id"] != 99 and isinstance(a["bbox"], list) and len(a["bbox"]) == 4
        and all(_is_valid_number(v) for v in a["bbox"]) for a in annotations
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted warnings about skipped and clipped boxes are expected
        try:
            dataset = CocoDetection(image_root, ann_file, transforms=build_transforms(True, hflip_prob=0.5))
        except DatasetError as e:
            assert not well_formed, f"a well-formed file was refused: {e}"
            assert str(ann_file) in str(e) and "annotation id" in str(e)
            return
    assert well_formed
    assert len(dataset) == len(IMAGE_SIZES)
    for idx in range(len(dataset)):
        image, target = dataset[(idx, idx)]
        width, height = IMAGE_SIZES[idx]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        firsts = {(a["category_id"], *a["bbox"]): a for a in reversed(annotations)
                  if a["image_id"] == idx + 1 and not a["iscrowd"]}  # exact duplicates: the first stays
        expected = [a for a in annotations if a["image_id"] == idx + 1 and not a["iscrowd"]
                    and firsts[(a["category_id"], *a["bbox"])] is a and _expected_kept(a["bbox"], width, height)]
        assert image.shape == (3, height, width) and torch.isfinite(image).all()
        assert boxes.shape == (len(expected), 4) and torch.isfinite(boxes).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
        assert target["labels"].tolist() == [a["category_id"] - 1 for a in expected]
