"""The built-in synthetic dataset: determinism, content statistics and the cache."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from lgd.config import load_config
from lgd.data import synthetic
from lgd.data.build import split_paths
from lgd.data.synthetic import (
    CLASS_NAMES,
    Difficulty,
    builtin_dataset_name,
    default_cache_dir,
    ensure_builtin_dataset,
    write_synthetic,
)
from lgd.errors import ConfigError

SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _tiny(out: Path, seed: int = 0) -> Path:
    return write_synthetic(out, seed=seed, num_train=10, num_val=4, num_test=4, size=SIZE, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def moderate_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 240-image training split: enough to see the rare crowded and empty images."""
    return write_synthetic(
        tmp_path_factory.mktemp("moderate"), seed=0, num_train=240, num_val=0, num_test=0, size=SIZE, progress=False
    )


@pytest.fixture(scope="module")
def moderate(moderate_root: Path) -> dict:
    return json.loads((moderate_root / "annotations" / "instances_train.json").read_text())


def test_default_difficulty_is_the_benchmark_dataset(moderate_root: Path, moderate: dict) -> None:
    """The digests of generator v1 before the difficulty knobs existed: the defaults must keep every pixel."""
    text = json.dumps(moderate, sort_keys=True).encode()
    assert hashlib.sha256(text).hexdigest() == "519de631ae37b80cfd3d2756f66209d49d4b87a274e5c7e1850e347e77bd6106"
    pixels = hashlib.sha256()
    for image in moderate["images"]:
        pixels.update(np.asarray(Image.open(moderate_root / "train" / image["file_name"])).tobytes())
    assert pixels.hexdigest() == "f28d7341fa5db1319486679a083a35e2b9d384c111745fe4ca4bb96fe645b7c6"
    assert builtin_dataset_name(0, 800, 200, 200, 128, Difficulty()) == "synth-v1-s0-128px-800-200-200"


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    first, second = _files(_tiny(tmp_path / "a")), _files(_tiny(tmp_path / "b"))
    assert len(first) == 10 + 4 + 4 + 3
    assert first == second
    assert _files(_tiny(tmp_path / "c", seed=1)) != first


def test_layout_and_splits_differ(tmp_path: Path) -> None:
    out = _tiny(tmp_path)
    docs = {s: json.loads((out / "annotations" / f"instances_{s}.json").read_text()) for s in ("train", "val", "test")}
    assert [len(docs[s]["images"]) for s in ("train", "val", "test")] == [10, 4, 4]
    pixels = {
        s: {np.asarray(Image.open(out / s / im["file_name"])).tobytes() for im in docs[s]["images"]} for s in docs
    }
    assert not pixels["train"] & pixels["val"]
    assert not pixels["train"] & pixels["test"]
    assert not pixels["val"] & pixels["test"]
    image = Image.open(out / "train" / docs["train"]["images"][0]["file_name"])
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"


def test_classes(moderate: dict) -> None:
    names = [c["name"] for c in moderate["categories"]]
    assert len(names) >= 6 and len(set(names)) == len(names)
    assert [c["id"] for c in moderate["categories"]] == list(range(1, len(names) + 1))
    assert {a["category_id"] for a in moderate["annotations"]} == set(range(1, len(names) + 1))


def test_object_counts_vary(moderate: dict) -> None:
    per_image = np.bincount([a["image_id"] for a in moderate["annotations"]], minlength=241)[1:]
    assert (per_image == 0).sum() >= 1
    assert (per_image >= 20).sum() >= 3
    assert np.mean((per_image >= 1) & (per_image <= 12)) > 0.7


def test_box_sizes_span_small_to_half_image(moderate: dict) -> None:
    longest = np.array([max(a["bbox"][2:]) for a in moderate["annotations"]])
    assert longest.min() <= 10
    assert longest.max() >= 0.4 * SIZE
    assert longest.max() <= SIZE / 2 + 1


def test_polygons_inside_boxes_and_area_matches_mask(moderate: dict) -> None:
    for ann in moderate["annotations"][:400]:
        x, y, w, h = ann["bbox"]
        points = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
        assert points[:, 0].min() >= x - 1e-6 and points[:, 0].max() <= x + w + 1e-6
        assert points[:, 1].min() >= y - 1e-6 and points[:, 1].max() <= y + h + 1e-6
        assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
        mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], SIZE, SIZE)))
        assert mask.sum() == ann["area"] > 0


def test_ring_keeps_its_hole(moderate: dict) -> None:
    ring_id = next(c["id"] for c in moderate["categories"] if c["name"] == "ring")
    ring = max((a for a in moderate["annotations"] if a["category_id"] == ring_id), key=lambda a: a["area"])
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ring["segmentation"], SIZE, SIZE)))
    x, y, w, h = ring["bbox"]
    assert mask[int(y + h / 2), int(x + w / 2)] == 0
    assert mask.sum() < 0.8 * np.pi * (w / 2) ** 2


def test_no_object_is_more_than_half_hidden_by_later_objects(moderate: dict) -> None:
    by_image = defaultdict(list)
    for ann in moderate["annotations"]:
        by_image[ann["image_id"]].append(ann)
    for anns in by_image.values():
        rles = [mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], SIZE, SIZE)) for a in anns]
        masks = mask_utils.decode(rles).astype(bool)  # (H, W, N), drawn in annotation order
        covered = np.zeros((SIZE, SIZE), dtype=bool)
        for j in range(masks.shape[2] - 1, -1, -1):
            visible = (masks[:, :, j] & ~covered).sum()
            assert visible >= 0.5 * masks[:, :, j].sum()
            covered |= masks[:, :, j]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LGD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LGD_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lgd"


def test_ensure_builtin_dataset_generates_once_and_ignores_leftovers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = dict(seed=3, num_train=4, num_val=2, num_test=2, size=SIZE)
    name = builtin_dataset_name(**args)
    leftover = tmp_path / f".{name}.tmp-interrupted"
    (leftover / "annotations").mkdir(parents=True)

    real_write = synthetic.write_synthetic

    def interrupted(out_dir: Path, **kwargs: object) -> Path:
        (Path(out_dir) / "train").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_synthetic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin_dataset(tmp_path, **args)
    assert not (tmp_path / name).exists()

    monkeypatch.setattr(synthetic, "write_synthetic", real_write)
    path = ensure_builtin_dataset(tmp_path, **args)
    assert path == tmp_path / name
    assert len(json.loads((path / "annotations" / "instances_train.json").read_text())["images"]) == 4
    assert leftover.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, leftover.name])

    def must_not_run(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached dataset should have been reused")

    monkeypatch.setattr(synthetic, "write_synthetic", must_not_run)
    assert ensure_builtin_dataset(tmp_path, **args) == path



def test_easier_difficulty_has_fewer_classes_larger_and_fewer_objects(tmp_path: Path) -> None:
    easy = Difficulty(num_classes=3, min_object_px=16, max_objects=2, crowded_prob=0.0)
    out = write_synthetic(tmp_path, seed=0, num_train=60, num_val=0, num_test=0, size=SIZE, progress=False,
                          difficulty=easy)
    doc = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in doc["categories"]] == list(CLASS_NAMES[:3])
    assert {a["category_id"] for a in doc["annotations"]} == {1, 2, 3}
    per_image = np.bincount([a["image_id"] for a in doc["annotations"]], minlength=61)[1:]
    assert per_image.max() == 2  # no crowded images, at most max_objects
    longest = np.array([max(a["bbox"][2:]) for a in doc["annotations"]])
    assert longest.min() >= 0.75 * 16  # a box spans at least ~0.79 of the diameter (a tilted triangle)


def test_clutter_off_draws_no_distractors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("clutter drawn with clutter=False")

    monkeypatch.setattr(synthetic, "_draw_clutter", forbidden)
    monkeypatch.setattr(synthetic, "_draw_lines_on_top", forbidden)
    write_synthetic(tmp_path / "plain", num_train=8, num_val=0, num_test=0, size=SIZE, progress=False,
                    difficulty=Difficulty(clutter=False))
    with pytest.raises(AssertionError, match="clutter drawn"):
        write_synthetic(tmp_path / "cluttered", num_train=8, num_val=0, num_test=0, size=SIZE, progress=False)


def test_difficulty_from_config_names_its_own_cache_folder(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.synth.cache_dir={tmp_path}", "data.synth.num_train=4", "data.synth.num_val=2",
                             "data.synth.num_test=2", f"data.synth.size={SIZE}", "data.synth.num_classes=4",
                             "data.synth.min_object_px=12", "data.synth.clutter=false"])
    root, ann = split_paths(cfg, "val")
    assert root.parent.name == f"synth-v1-s0-{SIZE}px-4-2-2-k4-min12-noclutter"
    assert len(json.loads(ann.read_text())["categories"]) == 4
    with pytest.raises(ConfigError, match="data.synth: num_classes"):
        load_config(None, ["data.synth.num_classes=9"])
    with pytest.raises(ConfigError, match="data.synth: crowded_prob"):
        load_config(None, ["data.synth.crowded_prob=1.0"])


def test_no_progress_reaches_the_dataset_generator(tmp_path, monkeypatch):
    from lgd.config import load_config
    from lgd.data.build import split_paths
    import lgd.data.synthetic as synthetic

    bars = []
    real = synthetic.tqdm
    monkeypatch.setattr(synthetic, "tqdm", lambda *a, **k: bars.append(k["disable"]) or real(*a, **k))
    cfg = load_config(None, [f"data.synth.cache_dir={tmp_path}", "data.synth.num_train=2", "data.synth.num_val=1",
                             "data.synth.num_test=1", "data.synth.size=64"])
    split_paths(cfg, "train", progress=False)  # `lgd data stats --no-progress`, `lgd train --no-progress`
    assert bars == [True]
    split_paths(cfg, "val", progress=False)  # generated already: no bar at all
    assert bars == [True]
