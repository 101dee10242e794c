"""The built-in synthetic shapes dataset, written to disk in COCO format.

Each image shows 0 to ~30 annotated shapes from eight classes on a cluttered background
with unannotated distractors. Class is carried by outline only: every object draws its
colours uniformly from the whole RGB cube and its texture from the same five kinds, so
neither colour nor texture gives the class away. :class:`Difficulty` makes an easier
dataset from the same generator (fewer classes, larger and fewer objects, no clutter);
its defaults give the benchmark dataset, byte for byte.

Conventions:
- Polygons are in pixel coordinates where pixel (x, y) covers [x, x+1) x [y, y+1), the
  convention of ``pycocotools.mask``; every object is rasterised with pycocotools itself,
  so the drawn pixels are exactly ``annToMask`` of its annotation.
- ``bbox`` is the tight [x, y, w, h] of the polygon vertices, ``area`` the number of mask
  pixels. Annotations always describe the full shape, even when later objects cover part
  of it; placement rejects any object that would leave an earlier one less than half
  visible.
- A ring (annulus) is stored as two overlapping half-annulus polygons whose union is the
  ring with its hole, so masks decoded from the annotation keep the hole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw
from tqdm import tqdm

from lgd.utils.atomic import ensure_dir
from .difficulty import CLASS_NAMES, EMPTY_PROB, Difficulty

# Bumped whenever the rendering changes, so cached datasets of an older generator are not reused.
GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")

_TEXTURES = ("solid", "stripes", "dots", "noise", "gradient")
_MAX_VISIBLE_LOSS = 0.5
_PLACEMENT_TRIES = 30


def default_cache_dir() -> Path:
    """``$LGD_CACHE`` if set, else ``~/.cache/lgd``."""
    env = os.environ.get("LGD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lgd"


def builtin_dataset_name(
    seed: int, num_train: int, num_val: int, num_test: int, size: int, difficulty: Difficulty = Difficulty()
) -> str:
    """Folder name of the built-in dataset for these parameters, e.g. ``synth-v1-s0-128px-800-200-200``
    (``...-200-k4-min16-noclutter`` for an easier :class:`Difficulty`)."""
    return f"synth-v{GENERATOR_VERSION}-s{seed}-{size}px-{num_train}-{num_val}-{num_test}{difficulty.tag()}"


def ensure_builtin_dataset(
    cache_dir: Path,
    seed: int,
    num_train: int,
    num_val: int,
    num_test: int,
    size: int,
    difficulty: Difficulty = Difficulty(),
    progress: bool = True,
) -> Path:
    """Return the built-in dataset folder in ``cache_dir``, generating it on first use (with a progress bar on a
    terminal unless ``progress`` is false).

    Generation writes into a fresh temporary sibling folder that is renamed into place
    only when complete; an interrupted run leaves a ``.synth-...tmp-*`` folder that is
    never mistaken for a dataset. When two processes generate at once, the first rename
    wins and the other copy is discarded.
    """
    name = builtin_dataset_name(seed, num_train, num_val, num_test, size, difficulty)
    return ensure_dir(
        Path(cache_dir) / name,
        lambda tmp: write_synthetic(
            tmp, seed=seed, num_train=num_train, num_val=num_val, num_test=num_test, size=size, difficulty=difficulty,
            progress=progress,
        ),
    )


def write_synthetic(
    out_dir: Path,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 200,
    num_test: int = 200,
    size: int = 128,
    progress: bool = True,
    difficulty: Difficulty = Difficulty(),
) -> Path:
    """Write the dataset: ``out_dir/{train,val,test}/*.png`` and ``out_dir/annotations/instances_{split}.json``.

    Each split has its own numpy Generator seeded with ``(seed, split index)``, so splits
    never share images and the same arguments give byte-identical files.
    """
    if size < 4 * difficulty.min_object_px:
        raise ValueError(f"size must be at least 4 x min_object_px = {4 * difficulty.min_object_px:g} px, got {size}")
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    counts = dict(zip(SPLITS, (num_train, num_val, num_test)))
    # disable=None: tqdm draws no bar where stderr is not a terminal (a log file)
    bar = tqdm(total=sum(counts.values()), desc="synthetic dataset", unit="img", disable=None if progress else True)
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES[: difficulty.num_classes])
    ]
    with bar:
        for split_index, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, split_index])
            image_dir = out_dir / split
            image_dir.mkdir(exist_ok=True)
            images: list[dict] = []
            annotations: list[dict] = []
            for image_id in range(1, counts[split] + 1):
                pixels, objects = _render_image(rng, size, difficulty)
                file_name = f"{image_id:06d}.png"
                Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)
                images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
                for obj in objects:
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": image_id,
                            "category_id": obj.category_id,
                            "bbox": obj.bbox,
                            "area": obj.area,
                            "iscrowd": 0,
                            "segmentation": obj.segmentation,
                        }
                    )
                bar.update(1)
            document = {
                "info": {
                    "description": "lgd built-in synthetic shapes",
                    "version": GENERATOR_VERSION,
                    "seed": seed,
                    "split": split,
                },
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
            with open(out_dir / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
                f.write(json.dumps(document, separators=(",", ":")))
    return out_dir


@dataclass
class _Object:
    category_id: int
    bbox: list[float]
    area: float
    segmentation: list[list[float]]


class _Occupancy:
    """Which annotated object owns each pixel, to bound how much of each one later drawing hides."""

    def __init__(self, size: int) -> None:
        self.owner = np.full((size, size), -1, dtype=np.int32)  # (H, W), -1 where no object is visible
        self.full_area = np.zeros(0, dtype=np.int64)  # (N,) pixels of each object when drawn
        self.visible = np.zeros(0, dtype=np.int64)  # (N,) pixels of each object still visible

    def _remaining(self, y0: int, x0: int, mask: np.ndarray) -> np.ndarray:
        covered = self.owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask]
        return self.visible - np.bincount(covered[covered >= 0], minlength=len(self.visible))

    def accepts(self, y0: int, x0: int, mask: np.ndarray) -> bool:
        """True when painting ``mask`` (h x w bool at (y0, x0)) keeps every object at least half visible."""
        remaining = self._remaining(y0, x0, mask)
        return bool(np.all(remaining >= (1.0 - _MAX_VISIBLE_LOSS) * self.full_area))

    def paint(self, y0: int, x0: int, mask: np.ndarray, annotated: bool) -> None:
        """Mark ``mask`` as covered, by a new annotated object or by an unannotated distractor."""
        self.visible = self._remaining(y0, x0, mask)
        region = self.owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        region[mask] = len(self.visible) if annotated else -1
        if annotated:
            area = int(mask.sum())
            self.full_area = np.append(self.full_area, area)
            self.visible = np.append(self.visible, area)


def _render_image(
    rng: np.random.Generator, size: int, difficulty: Difficulty
) -> tuple[np.ndarray, list[_Object]]:
    """Draw one image: returns ``(size, size, 3)`` uint8 pixels and its annotated objects."""
    canvas = _background(rng, size)
    if difficulty.clutter:
        _draw_clutter(rng, canvas, difficulty.min_object_px)
    occupancy = _Occupancy(size)
    objects: list[_Object] = []

    min_diameter = difficulty.min_object_px
    draw = rng.random()
    if draw < EMPTY_PROB:
        wanted, max_diameter = 0, 0.0
    elif draw < EMPTY_PROB + difficulty.crowded_prob:
        wanted, max_diameter = int(rng.integers(20, 31)), max(min_diameter + 2, size / 5)
    else:
        wanted, max_diameter = int(rng.integers(1, difficulty.max_objects + 1)), size / 2
    for _ in range(wanted):
        for _ in range(_PLACEMENT_TRIES):
            class_index = int(rng.integers(difficulty.num_classes))
            diameter = float(np.exp(rng.uniform(np.log(min_diameter), np.log(max_diameter))))
            polygons = _place(rng, _SHAPES[class_index](rng), diameter, size)
            y0, x0, mask = _rasterise(polygons, size)
            if occupancy.accepts(y0, x0, mask):
                break
        else:
            continue
        _paint_textured(rng, canvas, y0, x0, mask)
        occupancy.paint(y0, x0, mask, annotated=True)
        xs = np.concatenate([p[:, 0] for p in polygons])
        ys = np.concatenate([p[:, 1] for p in polygons])
        x_min, y_min = float(xs.min()), float(ys.min())
        objects.append(
            _Object(
                category_id=class_index + 1,
                bbox=[x_min, y_min, round(float(xs.max()) - x_min, 2), round(float(ys.max()) - y_min, 2)],
                area=float(mask.sum()),
                segmentation=[p.reshape(-1).tolist() for p in polygons],
            )
        )
    if difficulty.clutter:
        _draw_lines_on_top(rng, canvas, occupancy)
    noise = rng.normal(0.0, rng.uniform(0.0, 6.0), size=canvas.shape).astype(np.float32)
    return np.clip(canvas + noise, 0, 255).astype(np.uint8), objects


# ----------------------------------------------------------------------------- shapes
# Each shape function returns its polygons (M x 2, x right, y down), centred on 0, with
# circumradius at most 1 and any rotation applied; `_place` scales and moves them.


def regular_polygon(n: int, phase: float = 0.0) -> np.ndarray:
    """The n vertices (n, 2) of a regular polygon of circumradius 1 centred on 0, the first at angle ``phase``."""
    angles = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def rotate_points(points: np.ndarray, angle: float) -> np.ndarray:
    """``points`` (M, 2) turned by ``angle`` radians about 0."""
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _circle(rng: np.random.Generator) -> list[np.ndarray]:
    return [regular_polygon(32)]


def _square(rng: np.random.Generator) -> list[np.ndarray]:
    # Limited tilt keeps squares apart from diamonds.
    return [rotate_points(regular_polygon(4, np.pi / 4), np.deg2rad(rng.uniform(-15, 15)))]


def _triangle(rng: np.random.Generator) -> list[np.ndarray]:
    return [regular_polygon(3, rng.uniform(0, 2 * np.pi))]


def _star(rng: np.random.Generator) -> list[np.ndarray]:
    points = regular_polygon(10, rng.uniform(0, 2 * np.pi))
    points[1::2] *= 0.42
    return [points]


def _cross(rng: np.random.Generator) -> list[np.ndarray]:
    a = 0.3  # half-width of an arm, relative to its half-length
    outline = np.array(
        [[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1]]
    ) / np.hypot(1.0, a)
    return [rotate_points(outline, rng.uniform(0, np.pi / 2))]


def _ring(rng: np.random.Generator) -> list[np.ndarray]:
    inner = rng.uniform(0.45, 0.65)
    overlap = 0.1  # radians; halves overlap so rounding never opens a seam
    halves = []
    for start in (0.0, np.pi):
        angles = np.linspace(start - overlap, start + np.pi + overlap, 18)
        arc = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        halves.append(np.concatenate([arc, inner * arc[::-1]]))
    return halves


def _hexagon(rng: np.random.Generator) -> list[np.ndarray]:
    return [regular_polygon(6, rng.uniform(0, np.pi / 3))]


def _diamond(rng: np.random.Generator) -> list[np.ndarray]:
    outline = np.array([[0.0, -1.0], [0.55, 0.0], [0.0, 1.0], [-0.55, 0.0]])
    return [rotate_points(outline, np.deg2rad(rng.uniform(-20, 20)))]


_SHAPES: tuple[Callable[[np.random.Generator], list[np.ndarray]], ...] = (
    _circle, _square, _triangle, _star, _cross, _ring, _hexagon, _diamond,
)


def _place(rng: np.random.Generator, polygons: list[np.ndarray], diameter: float, size: int) -> list[np.ndarray]:
    """Scale unit polygons to ``diameter`` px and move them to a random spot fully inside the image."""
    scaled = [p * (diameter / 2.0) for p in polygons]
    stacked = np.concatenate(scaled)
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    offset = rng.uniform(-low, (size - 1) - high)
    # Rounding here, before rasterising, makes the stored annotation exactly what was drawn.
    return [np.round(p + offset, 2) for p in scaled]


def _rasterise(polygons: list[np.ndarray], size: int) -> tuple[int, int, np.ndarray]:
    """Mask of the union of ``polygons`` within their bounding patch: ``(y0, x0, h x w bool)``.

    Rasterised on the whole image, not the patch: pycocotools rounds 5x-scaled coordinates,
    and shifting them first changes which ties round up, so only this matches ``annToMask``.
    """
    stacked = np.concatenate(polygons)
    x0, y0 = np.floor(stacked.min(axis=0)).astype(int)
    x1, y1 = np.ceil(stacked.max(axis=0)).astype(int) + 1
    rle = mask_utils.merge(mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polygons], size, size))
    return int(y0), int(x0), mask_utils.decode(rle)[y0:y1, x0:x1].astype(bool)


# ----------------------------------------------------------------------------- textures


def _random_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A colour uniform in RGB, redrawn a few times if it is too close to ``avoid`` (the local background)."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(8):
        if np.linalg.norm(colour - avoid) >= 80:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


def _texture(rng: np.random.Generator, h: int, w: int, background: np.ndarray) -> np.ndarray:
    """A ``(h, w, 3)`` float32 patch of one of the five textures in two random colours."""
    c1 = _random_colour(rng, background)
    c2 = _random_colour(rng, background)
    kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "solid":
        patch = np.broadcast_to(c1, (h, w, 3))
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(2.5, 7.0)
        patch = np.where(((phase % 1.0) < 0.5)[..., None], c1, c2)
    elif kind == "dots":
        period = rng.uniform(3.0, 7.0)
        dy, dx = (yy % period) - period / 2, (xx % period) - period / 2
        patch = np.where((dy * dy + dx * dx < (0.3 * period) ** 2)[..., None], c2, c1)
    elif kind == "noise":
        patch = c1 + rng.normal(0.0, rng.uniform(15, 45), size=(h, w, 3))
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        patch = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return np.asarray(patch, dtype=np.float32)


def _paint_textured(rng: np.random.Generator, canvas: np.ndarray, y0: int, x0: int, mask: np.ndarray) -> None:
    region = canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    background = region.reshape(-1, 3).mean(axis=0)
    region[mask] = _texture(rng, *mask.shape, background)[mask]


# ----------------------------------------------------------------------------- background and distractors


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` float32 base: a gradient, smooth colour noise or a flat colour, plus grain."""
    kind = rng.integers(3)
    if kind == 0:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        t = (xx * np.cos(angle) + yy * np.sin(angle)) / (size * 1.5) + 0.5
        canvas = rng.uniform(0, 255, size=3) * (1 - t[..., None]) + rng.uniform(0, 255, size=3) * t[..., None]
    elif kind == 1:
        cells = int(rng.integers(3, 9))
        grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        canvas = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), dtype=np.float32)
    else:
        canvas = np.broadcast_to(rng.uniform(0, 255, size=3), (size, size, 3))
    grain = rng.normal(0.0, rng.uniform(2.0, 14.0), size=(size, size, 3))
    return np.asarray(canvas + grain, dtype=np.float32)


def _blob(rng: np.random.Generator) -> list[np.ndarray]:
    """An irregular polygon: jittered angles and radii, so it is none of the classes."""
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    radii = rng.uniform(0.35, 1.0, size=n)
    return [np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)]


def _bar(rng: np.random.Generator) -> list[np.ndarray]:
    """A thin rectangle, aspect 5-10: elongated enough to be unlike a square or diamond."""
    half_width = 1.0 / rng.uniform(5, 10)
    outline = np.array([[-1.0, -half_width], [1.0, -half_width], [1.0, half_width], [-1.0, half_width]])
    return [rotate_points(outline, rng.uniform(0, np.pi))]


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray, min_diameter: float) -> None:
    """Unannotated distractors under the objects: textured blobs and bars (at least ``min_diameter`` px
    across, like the objects), lines and scribbles."""
    size = canvas.shape[0]
    for make in [_blob] * int(rng.integers(0, 4)) + [_bar] * int(rng.integers(0, 3)):
        diameter = float(np.exp(rng.uniform(np.log(min_diameter), np.log(size / 2.5))))
        y0, x0, mask = _rasterise(_place(rng, make(rng), diameter, size), size)
        _paint_textured(rng, canvas, y0, x0, mask)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 6))):
        ends = rng.uniform(0, size, size=4)
        draw.line(ends.tolist(), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):
        # Text-like scribble: a short zig-zag polyline in a small box.
        origin = rng.uniform(0, size - 16, size=2)
        points = origin + rng.uniform(0, rng.uniform(6, 16), size=(int(rng.integers(4, 9)), 2))
        draw.line(points.reshape(-1).tolist(), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=1)
    canvas[...] = np.asarray(image, dtype=np.float32)


def _draw_lines_on_top(rng: np.random.Generator, canvas: np.ndarray, occupancy: _Occupancy) -> None:
    """Thin lines over the objects, each dropped if it would hide too much of any object."""
    size = canvas.shape[0]
    for _ in range(int(rng.integers(0, 3))):
        layer = Image.new("L", (size, size))
        ImageDraw.Draw(layer).line(rng.uniform(0, size, size=4).tolist(), fill=1, width=1)
        mask = np.asarray(layer, dtype=bool)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if occupancy.accepts(0, 0, mask):
            canvas[mask] = colour
            occupancy.paint(0, 0, mask, annotated=False)
