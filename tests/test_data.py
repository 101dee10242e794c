"""COCO loading and validation, transforms, and the deterministic loaders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from lgd.data import (
    CocoDetection,
    TrainBatchSampler,
    build_eval_loader,
    build_train_loader,
    build_transforms,
    collate,
    write_synthetic,
)
from lgd.errors import DatasetError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _write_coco(
    root: Path,
    images: list[dict[str, Any]] | None = None,
    annotations: list[dict[str, Any]] | None = None,
    categories: list[dict[str, Any]] | None = None,
    mode: str = "RGB",
) -> Path:
    """Write a tiny COCO file plus one PNG per image record (sized as the record says) under ``root``."""
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "width": 20, "height": 16}]
    categories = categories if categories is not None else [{"id": 1, "name": "thing"}]
    for img in images:
        if "file_name" in img and isinstance(img.get("width"), int) and isinstance(img.get("height"), int):
            Image.new(mode, (img["width"], img["height"])).save(root / img["file_name"])
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations or [], "categories": categories}))
    return path


def _ann(ann_id: int, image_id: int = 1, category_id: int = 1, bbox: Any = (2, 3, 6, 5), **extra: Any) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), **extra}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(
        tmp_path_factory.mktemp("synth"), seed=0, num_train=20, num_val=2, num_test=2, size=64, progress=False
    )


def _synthetic(root: Path, **kwargs: Any) -> CocoDetection:
    return CocoDetection(root / "train", root / "annotations" / "instances_train.json", **kwargs)


# ----------------------------------------------------------------------------- labels and targets


@pytest.mark.parametrize("offset", [0, 1])
def test_label_mapping_round_trip(tmp_path: Path, offset: int) -> None:
    categories = [{"id": 12, "name": "c12"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
    path = _write_coco(tmp_path, annotations=[_ann(1, category_id=7), _ann(2, category_id=12)], categories=categories)
    ds = CocoDetection(tmp_path, path, label_offset=offset)
    assert ds.cat_ids == [3, 7, 12]
    assert ds.class_names == ["c3", "c7", "c12"]
    assert ds.num_classes == 3
    for index, cat_id in enumerate([3, 7, 12]):
        assert ds.label_to_category_id(index + offset) == cat_id
        assert ds.category_id_to_label(cat_id) == index + offset
    assert ds[0][1]["labels"].tolist() == [1 + offset, 2 + offset]
    with pytest.raises(ValueError):
        ds.label_to_category_id(3 + offset)
    with pytest.raises(ValueError):
        ds.category_id_to_label(4)


def test_sample_types_and_shapes(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, annotations=[_ann(5, bbox=[1.5, 2, 4, 3])], mode="L")
    ds = CocoDetection(tmp_path, path)
    image, target = ds[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 16, 20)
    assert target["boxes"].tolist() == [[1.5, 2.0, 5.5, 5.0]]
    assert tuple(target["boxes"].canvas_size) == (16, 20)
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1
    assert ds.image_info(0)["file_name"] == "a.png"
    assert ds.aspect_ratio(0) == pytest.approx(20 / 16)


def test_crowd_excluded_from_targets_but_kept_for_evaluation(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 16},
        {"id": 2, "file_name": "b.png", "width": 20, "height": 16},
    ]
    anns = [_ann(1), _ann(2, iscrowd=1), _ann(3, image_id=2, iscrowd=1)]
    path = _write_coco(tmp_path, images=images, annotations=anns)
    ds = CocoDetection(tmp_path, path)
    assert len(ds) == 2
    assert len(ds[0][1]["boxes"]) == 1 and len(ds[1][1]["boxes"]) == 0
    assert sorted(ds.coco.getAnnIds(imgIds=[1, 2])) == [1, 2, 3]
    assert CocoDetection(tmp_path, path, filter_empty=True).ids == [1]


def test_rle_of_the_wrong_size(tmp_path: Path) -> None:
    rle = mask_utils.encode(np.zeros((8, 8, 1), dtype=np.uint8, order="F"))[0]
    rle["counts"] = rle["counts"].decode("ascii")
    path = _write_coco(tmp_path, annotations=[_ann(31, segmentation=rle)])
    assert len(CocoDetection(tmp_path, path)) == 1
    with pytest.raises(DatasetError, match=r"annotation id 31.*\[8, 8\].*height=16, width=20"):
        CocoDetection(tmp_path, path, with_masks=True)


def test_masks_from_polygons_and_rle(tmp_path: Path) -> None:
    rle_source = np.zeros((16, 20, 1), dtype=np.uint8, order="F")
    rle_source[4:9, 10:15] = 1
    rle = mask_utils.encode(rle_source)[0]
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        _ann(1, bbox=[2, 2, 4, 4], segmentation=[[2, 2, 6, 2, 6, 6, 2, 6]]),
        _ann(2, bbox=[10, 4, 5, 5], segmentation=rle),
    ]
    ds = CocoDetection(tmp_path, _write_coco(tmp_path, annotations=anns), with_masks=True)
    masks = ds[0][1]["masks"]
    assert masks.dtype == torch.uint8 and tuple(masks.shape) == (2, 16, 20)
    assert masks[0].sum() == 16 and masks[0, 2:6, 2:6].all()
    assert torch.equal(masks[1], torch.from_numpy(rle_source[:, :, 0]))


# ----------------------------------------------------------------------------- transforms and seeds


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY pixel-edge boxes (N, 4) of binary masks (N, H, W)."""
    rows, cols = masks.bool().any(dim=2), masks.bool().any(dim=1)
    ys, xs = torch.arange(masks.shape[1]), torch.arange(masks.shape[2])
    return torch.stack(
        [
            torch.where(cols, xs, masks.shape[2]).amin(1),
            torch.where(rows, ys, masks.shape[1]).amin(1),
            torch.where(cols, xs, -1).amax(1) + 1,
            torch.where(rows, ys, -1).amax(1) + 1,
        ],
        dim=1,
    ).float()


def test_flip_keeps_boxes_and_masks_consistent(synthetic_root: Path) -> None:
    plain = _synthetic(synthetic_root, with_masks=True)
    flipped = _synthetic(synthetic_root, with_masks=True, transforms=build_transforms(train=True, hflip_prob=1.0))
    checked = 0
    for idx in range(len(plain)):
        image, target = plain[idx]
        image_f, target_f = flipped[idx]
        assert torch.equal(image_f, image.flip(-1))
        width = image.shape[-1]
        boxes = target["boxes"]
        expected = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        torch.testing.assert_close(target_f["boxes"].as_subclass(torch.Tensor), expected)
        assert torch.equal(target_f["labels"], target["labels"])
        mask_boxes = _mask_boxes(target["masks"])
        mask_boxes_f = _mask_boxes(target_f["masks"])
        expected_mask_boxes = torch.stack(
            [width - mask_boxes[:, 2], mask_boxes[:, 1], width - mask_boxes[:, 0], mask_boxes[:, 3]], dim=1
        )
        assert torch.equal(mask_boxes_f, expected_mask_boxes)
        # A star tip can poke up to ~2 px past the last pixel centre the rasteriser fills.
        assert torch.all((mask_boxes_f - target_f["boxes"].as_subclass(torch.Tensor)).abs() < 2.0)
        checked += len(boxes)
    assert checked > 20


def test_eval_transforms_do_not_flip(synthetic_root: Path) -> None:
    plain = _synthetic(synthetic_root)
    evaluated = _synthetic(synthetic_root, transforms=build_transforms(train=False))
    image, target = evaluated[(0, 123)]
    assert torch.equal(image, plain[0][0])
    assert torch.equal(target["boxes"], plain[0][1]["boxes"])


def test_seeded_index_is_a_pure_function_of_the_seed(synthetic_root: Path) -> None:
    ds = _synthetic(synthetic_root, with_masks=True, transforms=build_transforms(train=True))
    plain = _synthetic(synthetic_root)[0][0]
    torch.manual_seed(0)
    first = ds[(0, 7)]
    torch.manual_seed(99)
    second = ds[(0, 7)]
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1]["boxes"], second[1]["boxes"])
    assert torch.equal(first[1]["masks"], second[1]["masks"])
    was_flipped = {torch.equal(ds[(0, seed)][0], plain.flip(-1)) for seed in range(12)}
    assert was_flipped == {True, False}
    state = torch.random.get_rng_state()
    ds[(0, 3)]
    assert torch.equal(torch.random.get_rng_state(), state)


# ----------------------------------------------------------------------------- validation


def _img(**fields: Any) -> dict[str, Any]:
    return {"id": 1, "file_name": "a.png", "width": 20, "height": 16, **fields}


BAD_FILES = {
    "unknown image": (dict(annotations=[_ann(41, image_id=9)]), ["annotation id 41", "image_id"]),
    "unknown category": (dict(annotations=[_ann(42, category_id=5)]), ["annotation id 42", "category_id"]),
    "short bbox": (dict(annotations=[_ann(43, bbox=[1, 2, 3])]), ["annotation id 43", "bbox"]),
    "text bbox": (dict(annotations=[_ann(44, bbox=[1, 2, "3", 4])]), ["annotation id 44", "bbox"]),
    "no file_name": (dict(images=[{"id": 5, "width": 20, "height": 16}]), ["image id 5", "file_name"]),
    "no width": (dict(images=[{"id": 6, "file_name": "a.png", "height": 16}]), ["image id 6", "width"]),
    "no height": (dict(images=[{"id": 7, "file_name": "a.png", "width": 16}]), ["image id 7", "height"]),
    "duplicate image": (dict(images=[_img(id=8), _img(id=8, file_name="b.png")]), ["duplicate image id 8"]),
    "duplicate annotation": (dict(annotations=[_ann(9), _ann(9)]), ["duplicate annotation id 9"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_annotation_file_names_file_and_record(tmp_path: Path, case: str) -> None:
    fields, expected = BAD_FILES[case]
    path = _write_coco(tmp_path, **fields)
    with pytest.raises(DatasetError) as info:
        CocoDetection(tmp_path, path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"ann\.json.*'categories'"):
        CocoDetection(tmp_path, path)


def test_malformed_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [\n    {"id": 1,, "file_name": "a.png"}\n  ]\n}')
    with pytest.raises(DatasetError, match=r"broken\.json.*line 3, column 14"):
        CocoDetection(tmp_path, path)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nothere.json"):
        CocoDetection(tmp_path, tmp_path / "nothere.json")


def test_missing_undecodable_and_wrong_size_images(tmp_path: Path) -> None:
    images = [_img(id=1)] + [_img(id=i, file_name=f) for i, f in ((2, "gone.png"), (3, "junk.png"), (4, "big.png"))]
    path = _write_coco(tmp_path, images=images)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    Image.new("RGB", (21, 16)).save(tmp_path / "big.png")
    ds = CocoDetection(tmp_path, path)
    assert ds[0][0].shape == (3, 16, 20)
    with pytest.raises(DatasetError, match=r"image id 3: image file .*junk\.png cannot be read"):
        ds[2]
    with pytest.raises(DatasetError, match=r"image id 4: image file .*big\.png is 21x16 pixels.*width=20, height=16$"):
        ds[3]
    (tmp_path / "gone.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 4 images .*image id 2: .*gone\.png does not exist"):
        CocoDetection(tmp_path, path)


def test_degenerate_boxes_skipped_with_one_counted_warning(tmp_path: Path) -> None:
    anns = [
        _ann(1),
        _ann(17, bbox=[3, 3, 0, 5]),
        _ann(18, bbox=[3, 3, 4, -1]),
        _ann(19, bbox=[5, 5, 0, 0]),
        _ann(20, bbox=[15, 10, 10, 10]),
        _ann(21, bbox=[30, 2, 4, 4]),
    ]
    path = _write_coco(tmp_path, annotations=anns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(tmp_path, path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    zero = [m for m in messages if "zero-size" in m]
    assert zero == [f"skipped 3 annotations with zero-size boxes in {path} (e.g. annotation id 17)"]
    assert any("skipped 1 annotations with boxes entirely outside" in m and "id 21" in m for m in messages)
    assert any("clipped 1 boxes" in m and "id 20" in m for m in messages)
    assert len(messages) == 3
    assert ds[0][1]["boxes"].tolist() == [[2.0, 3.0, 8.0, 8.0], [15.0, 10.0, 20.0, 16.0]]


# ----------------------------------------------------------------------------- sampler and loaders


def _take(sampler: TrainBatchSampler, n: int) -> list[list[tuple[int, int]]]:
    stream = iter(sampler)
    return [next(stream) for _ in range(n)]


def test_sampler_resume_equals_tail_of_uninterrupted_run() -> None:
    ratios = [1.5, 0.7, 1.0, 0.5, 1.2, 0.8, 1.3] * 3
    full = _take(TrainBatchSampler(ratios, batch_size=4, seed=5), 30)
    resumed = _take(TrainBatchSampler(ratios, batch_size=4, seed=5, start_iter=12), 18)
    assert resumed == full[12:]
    assert _take(TrainBatchSampler(ratios, batch_size=4, seed=6), 30) != full


def test_sampler_groups_by_aspect_ratio() -> None:
    ratios = [1.5, 0.7, 1.0, 0.5, 1.2, 0.8, 1.3, 0.9, 2.0] * 4
    landscape = {i for i, r in enumerate(ratios) if r >= 1}
    for batch in _take(TrainBatchSampler(ratios, batch_size=3, seed=0), 60):
        kinds = {idx in landscape for idx, _ in batch}
        assert len(batch) == 3 and len(kinds) == 1
    ungrouped = _take(TrainBatchSampler(ratios, batch_size=3, seed=0, aspect_ratio_grouping=False), 60)
    assert any(len({idx in landscape for idx, _ in batch}) == 2 for batch in ungrouped)
    first_epoch = [idx for batch in ungrouped[:12] for idx, _ in batch]
    assert sorted(first_epoch) == list(range(len(ratios)))
    assert [s for _, s in ungrouped[0]] != [s for _, s in ungrouped[12]]


class _CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n
        self.loaded: list[Any] = []

    def __len__(self) -> int:
        return self.n

    def aspect_ratio(self, idx: int) -> float:
        return 1.0 if idx % 2 else 0.5

    def __getitem__(self, index: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        self.loaded.append(index)
        idx, seed = index
        return torch.full((3, 2, 2), float(idx)), {"image_id": idx, "seed": seed}


def test_train_loader_resume_loads_only_the_needed_images() -> None:
    full_ds, resumed_ds = _CountingDataset(9), _CountingDataset(9)
    full = iter(build_train_loader(full_ds, batch_size=2, seed=3, workers=0))
    expected = [next(full) for _ in range(8)][5:]
    resumed = iter(build_train_loader(resumed_ds, batch_size=2, seed=3, workers=0, start_iter=5))
    got = [next(resumed) for _ in range(3)]
    assert len(resumed_ds.loaded) == 6
    for (images, targets), (images_e, targets_e) in zip(got, expected):
        assert targets == targets_e
        assert all(torch.equal(a, b) for a, b in zip(images, images_e))


def test_train_loader_ranks_split_each_single_process_batch_in_order() -> None:
    one = iter(build_train_loader(_CountingDataset(11), batch_size=4, seed=2, workers=0))
    expected = [[t["image_id"] for t in next(one)[1]] for _ in range(9)][3:]
    shares = [iter(build_train_loader(_CountingDataset(11), batch_size=4, seed=2, workers=0, start_iter=3,
                                      rank=rank, world_size=2)) for rank in (0, 1)]
    for whole in expected:
        first, second = ([t["image_id"] for t in next(share)[1]] for share in shares)
        assert first == whole[:2] and second == whole[2:]
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        build_train_loader(_CountingDataset(11), batch_size=4, seed=2, workers=0, rank=2, world_size=2)


def test_train_loader_output_does_not_depend_on_workers(synthetic_root: Path) -> None:
    ds = _synthetic(synthetic_root, with_masks=True, transforms=build_transforms(train=True))
    streams = []
    for workers in (0, 2):
        loader = iter(build_train_loader(ds, batch_size=3, seed=4, workers=workers))
        streams.append([next(loader) for _ in range(4)])
    for (images_a, targets_a), (images_b, targets_b) in zip(*streams):
        assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))
        for ta, tb in zip(targets_a, targets_b):
            assert ta["image_id"] == tb["image_id"]
            assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])


def test_eval_loader_visits_every_image_once_in_order(synthetic_root: Path) -> None:
    ds = _synthetic(synthetic_root, transforms=build_transforms(train=False))
    seen = []
    for images, targets in build_eval_loader(ds, batch_size=3, workers=0):
        assert type(images[0]) is torch.Tensor and images[0].shape[0] == 3
        seen.extend(t["image_id"] for t in targets)
    assert seen == ds.ids


def test_collate_keeps_sizes_apart() -> None:
    batch = [(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 2), {"a": 2})]
    images, targets = collate(batch)
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 2)]
    assert targets == [{"a": 1}, {"a": 2}]
