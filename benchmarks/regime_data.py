"""The pretrained regime's two synthetic domains: the backbone's pretraining task and the detection target.

    python benchmarks/regime_data.py                               # the target dataset in the cache; prints its paths
    python benchmarks/pretrain_backbone.py --link datasets/regime  # + the pretrained backbone; links both where
                                                                   #   configs/regime_*_lgd.yaml look for them

The two domains share no class, no fill texture and no kind of background (BENCHMARKS.md, "The pretrained regime:
setup"), so what the backbone brings to the target is general visual features, as ImageNet weights bring to COCO:

| | pretraining (classification, :func:`pretrain_batch`) | target (detection, :func:`ensure_target_dataset`) |
|---|---|---|
| classes | 10 shape families and 6 texture families (``PRETRAIN_CLASSES``) | 8 shapes (``TARGET_CLASSES``) |
| object fills | ``PRETRAIN_TEXTURES`` | ``TARGET_TEXTURES`` |
| backgrounds | procedural: smooth colour noise or gradients, grain, strokes | crops of photographs from scikit-image |
| random streams | numpy ``(seed, 7, ...)`` | numpy ``(seed, 3, split index)`` |

The photographs are the colour and grey photographs that scikit-image's wheel ships in ``skimage/data`` (no
download), each public domain, CC0 or of no known copyright restriction by the statement in its ``skimage.data``
docstring (``PHOTOS``); every target dataset folder carries that list in ``LICENSES.txt``. scikit-image is a
benchmark-only dependency: ``pip install -e ".[bench]"``.

Boxes are the tight box of the pixels drawn (pixel (x, y) covers [x, x+1) x [y, y+1)), ``area`` their count. Objects
never cover one another, so every annotation is fully visible; unannotated distractor blobs lie under them.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from lgd.data.synthetic import regular_polygon, rotate_points
from lgd.utils.atomic import ensure_dir

# Bumped whenever rendering changes, so a cached dataset or backbone of an older generator is not reused.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")

PRETRAIN_SHAPES = ("crescent", "arrow", "ell", "tee", "trapezoid", "heart", "semicircle", "parallelogram",
                   "chevron", "bowtie")
PRETRAIN_TEXTURES = ("checker", "concentric", "waves", "crosshatch", "cells", "blotches")
# Shape classes first, then one class per texture family (a crop filled with that texture).
PRETRAIN_CLASSES = PRETRAIN_SHAPES + tuple(f"texture_{t}" for t in PRETRAIN_TEXTURES)
TARGET_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond")
TARGET_TEXTURES = ("solid", "stripes", "dots", "noise", "gradient")

# (skimage.data function, licence as scikit-image 0.26's docstring states it). moon, page, retina and the
# motorcycle pair also ship in the wheel but are left out: no licence statement, mostly black, or Middlebury terms.
PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "NASA; no known copyright restrictions, released into the public domain"),
    ("chelsea", "CC0 by the photographer (Stefan van der Walt)"),
    ("coffee", "CC0 by the photographer (Rachel Michetti)"),
    ("rocket", "SpaceX; released into the public domain"),
    ("hubble_deep_field", "NASA; may be freely used in the public domain"),
    ("camera", "CC0 by the photographer (Lav Varshney)"),
    ("brick", "CC0 (CC0Textures, Bricks25)"),
    ("grass", "CC0 (DeviantArt, linolafett)"),
    ("gravel", "CC0 (CC0Textures, Gravel04)"),
    ("clock", "released into the public domain by the photographer (Stefan van der Walt)"),
    ("coins", "Brooklyn Museum Collection; no known copyright restrictions"),
    ("cell", "CC0, dedicated to the public domain"),
)

Polygons = list[tuple[np.ndarray, bool]]  # (M x 2 vertices, x right / y down; True = fill, False = cut a hole)


# ----------------------------------------------------------------------------- shapes
# Each returns polygons centred on 0 with circumradius at most 1, rotation applied; `_place` scales and moves them.


def _fit_unit(points: np.ndarray) -> np.ndarray:
    """Centre an outline on its bounding box and scale it to circumradius 1."""
    points = points - (points.min(axis=0) + points.max(axis=0)) / 2
    return points / np.linalg.norm(points, axis=1).max()


def _any_turn(rng: np.random.Generator) -> float:
    return float(rng.uniform(0, 2 * np.pi))


def _crescent(rng):
    offset = rng.uniform(0.35, 0.55)
    return [(regular_polygon(40), True), (rotate_points(regular_polygon(40) * 0.85 + [offset, 0.0], _any_turn(rng)), False)]


def _arrow(rng):
    head = rng.uniform(0.35, 0.55)
    shaft = rng.uniform(0.12, 0.2)
    outline = np.array([[-1, -shaft], [1 - head, -shaft], [1 - head, -0.6], [1, 0], [1 - head, 0.6], [1 - head, shaft],
                        [-1, shaft]])
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _ell(rng):
    t = rng.uniform(0.25, 0.4)
    outline = np.array([[0, 0], [t, 0], [t, 1 - t], [1, 1 - t], [1, 1], [0, 1]]) * [rng.uniform(0.6, 1.0), 1.0]
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _tee(rng):
    t = rng.uniform(0.22, 0.35)
    outline = np.array([[-1, 0], [1, 0], [1, t], [t / 2, t], [t / 2, 1.6], [-t / 2, 1.6], [-t / 2, t], [-1, t]])
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _trapezoid(rng):
    top = rng.uniform(0.3, 0.6)
    height = rng.uniform(0.5, 0.9)
    outline = np.array([[-1, height], [1, height], [top, -height], [-top, -height]])
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _heart(rng):
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    outline = np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                       axis=1)
    return [(rotate_points(_fit_unit(outline), np.deg2rad(rng.uniform(-30, 30))), True)]


def _semicircle(rng):
    angles = np.linspace(0, np.pi, 24)
    outline = np.stack([np.cos(angles), -np.sin(angles)], axis=1)
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _parallelogram(rng):
    skew = rng.uniform(0.4, 0.7)
    height = rng.uniform(0.35, 0.6)
    outline = np.array([[-1, -height], [1 - skew, -height], [1, height], [-1 + skew, height]])
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _chevron(rng):
    t = rng.uniform(0.3, 0.45)
    outline = np.array([[-1, -1], [0, 0], [1, -1], [1, -1 + 2 * t], [0, 2 * t], [-1, -1 + 2 * t]])
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _bowtie(rng):
    w = rng.uniform(0.5, 0.8)
    outline = np.array([[-w, -1], [w, -1], [0.08, 0], [w, 1], [-w, 1], [-0.08, 0]])
    return [(rotate_points(_fit_unit(outline), _any_turn(rng)), True)]


def _circle(rng):
    return [(regular_polygon(40), True)]


def _square(rng):
    # Limited tilt keeps squares apart from diamonds.
    return [(rotate_points(regular_polygon(4, np.pi / 4), np.deg2rad(rng.uniform(-15, 15))), True)]


def _triangle(rng):
    return [(regular_polygon(3, _any_turn(rng)), True)]


def _star(rng):
    points = regular_polygon(10, _any_turn(rng))
    points[1::2] *= 0.42
    return [(points, True)]


def _cross(rng):
    a = 0.3  # half-width of an arm, relative to its half-length
    outline = np.array([[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a],
                        [-a, -a], [-a, -1]])
    return [(rotate_points(_fit_unit(outline), rng.uniform(0, np.pi / 2)), True)]


def _ring(rng):
    return [(regular_polygon(40), True), (regular_polygon(40) * rng.uniform(0.45, 0.65), False)]


def _hexagon(rng):
    return [(regular_polygon(6, rng.uniform(0, np.pi / 3)), True)]


def _diamond(rng):
    outline = np.array([[0.0, -1.0], [0.55, 0.0], [0.0, 1.0], [-0.55, 0.0]])
    return [(rotate_points(outline, np.deg2rad(rng.uniform(-20, 20))), True)]


def _blob(rng):
    """An irregular polygon (jittered angles and radii): a distractor that is none of the classes."""
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    radii = rng.uniform(0.35, 1.0, size=n)
    return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), True)]


ShapeFn = Callable[[np.random.Generator], Polygons]
_PRETRAIN_SHAPE_FNS: tuple[ShapeFn, ...] = (_crescent, _arrow, _ell, _tee, _trapezoid, _heart, _semicircle,
                                            _parallelogram, _chevron, _bowtie)
_TARGET_SHAPE_FNS: tuple[ShapeFn, ...] = (_circle, _square, _triangle, _star, _cross, _ring, _hexagon, _diamond)


def _mask(polygons: Polygons, diameter: float, centre: np.ndarray, size: int) -> np.ndarray:
    """The ``(size, size)`` bool mask of ``polygons`` scaled to ``diameter`` px around ``centre`` (x, y)."""
    layer = Image.new("L", (size, size))
    draw = ImageDraw.Draw(layer)
    for points, fill in polygons:
        xy = points * (diameter / 2.0) + centre
        draw.polygon([tuple(p) for p in xy.tolist()], fill=1 if fill else 0)
    return np.asarray(layer, dtype=bool)


# ----------------------------------------------------------------------------- textures
# Each fills an (h, w, 3) float32 patch with two colours; the patterns' periods are in pixels.


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _along(rng, h, w):
    """Pixel coordinates along a random direction, shape (h, w)."""
    yy, xx = _grid(h, w)
    angle = rng.uniform(0, np.pi)
    return xx * np.cos(angle) + yy * np.sin(angle)


def _two(mask: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], c1, c2).astype(np.float32)


def _checker(rng, h, w, c1, c2):
    yy, xx = _grid(h, w)
    angle = rng.uniform(0, np.pi / 2)
    u, v = xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)
    period = rng.uniform(3.0, 8.0)
    return _two(((np.floor(u / period) + np.floor(v / period)) % 2) == 0, c1, c2)


def _concentric(rng, h, w, c1, c2):
    yy, xx = _grid(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    r = np.hypot(yy - cy, xx - cx)
    return _two((r / rng.uniform(3.0, 8.0)) % 1.0 < 0.5, c1, c2)


def _waves(rng, h, w, c1, c2):
    t = 0.5 + 0.5 * np.sin(2 * np.pi * _along(rng, h, w) / rng.uniform(4.0, 12.0))
    return (c1 * t[..., None] + c2 * (1 - t[..., None])).astype(np.float32)


def _crosshatch(rng, h, w, c1, c2):
    period = rng.uniform(3.0, 7.0)
    first, second = _along(rng, h, w), _along(rng, h, w)  # two directions
    return _two(((first % period) < 1.2) | ((second % period) < 1.2), c1, c2)


def _cells(rng, h, w, c1, c2):
    yy, xx = _grid(h, w)
    n = int(rng.integers(6, 20))
    seeds = rng.uniform(0, 1, size=(n, 2)) * [h, w]
    nearest = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1)
    mix = rng.uniform(0, 1, size=n)[nearest][..., None]
    return (c1 * mix + c2 * (1 - mix)).astype(np.float32)


def _blotches(rng, h, w, c1, c2):
    cells = int(rng.integers(3, 7))
    grid = (rng.uniform(0, 255, size=(cells, cells))).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return _two(smooth > np.median(smooth), c1, c2)


def _solid(rng, h, w, c1, c2):
    return np.broadcast_to(c1, (h, w, 3)).astype(np.float32)


def _stripes(rng, h, w, c1, c2):
    return _two((_along(rng, h, w) / rng.uniform(2.5, 7.0)) % 1.0 < 0.5, c1, c2)


def _dots(rng, h, w, c1, c2):
    yy, xx = _grid(h, w)
    period = rng.uniform(3.0, 7.0)
    dy, dx = (yy % period) - period / 2, (xx % period) - period / 2
    return _two(dy * dy + dx * dx < (0.3 * period) ** 2, c2, c1)


def _noise(rng, h, w, c1, c2):
    return (c1 + rng.normal(0.0, rng.uniform(15, 45), size=(h, w, 3))).astype(np.float32)


def _gradient(rng, h, w, c1, c2):
    t = _along(rng, h, w)
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
    return (c1 * (1 - t) + c2 * t).astype(np.float32)


TextureFn = Callable[[np.random.Generator, int, int, np.ndarray, np.ndarray], np.ndarray]
_PRETRAIN_TEXTURE_FNS: tuple[TextureFn, ...] = (_checker, _concentric, _waves, _crosshatch, _cells, _blotches)
_TARGET_TEXTURE_FNS: tuple[TextureFn, ...] = (_solid, _stripes, _dots, _noise, _gradient)


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A colour uniform in RGB, redrawn a few times while it is within 80 of ``avoid`` (the local background)."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(8):
        if np.linalg.norm(colour - avoid) >= 80:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


def _paint(rng, canvas: np.ndarray, mask: np.ndarray, textures: tuple[TextureFn, ...]) -> None:
    """Fill ``mask`` of ``canvas`` (H, W, 3 float32) with a random texture of ``textures``, in colours that stand
    out from what is under the mask."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    local = mask[y0:y1, x0:x1]
    under = canvas[y0:y1, x0:x1][local].mean(axis=0)
    texture = textures[int(rng.integers(len(textures)))]
    patch = texture(rng, y1 - y0, x1 - x0, _colour(rng, under), _colour(rng, under))
    canvas[y0:y1, x0:x1][local] = patch[local]


# ----------------------------------------------------------------------------- backgrounds


def _procedural_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pretraining background, ``(size, size, 3)`` float32: smooth colour noise or a gradient, grain, a few strokes."""
    if rng.random() < 0.5:
        cells = int(rng.integers(2, 7))
        grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        canvas = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), dtype=np.float32)
    else:
        canvas = _gradient(rng, size, size, rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3))
    image = Image.fromarray(np.clip(canvas + rng.normal(0, rng.uniform(2, 12), canvas.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        draw.line(rng.uniform(0, size, size=4).tolist(), fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 3)))
    return np.asarray(image, dtype=np.float32)


Photo = tuple[np.ndarray, bool]  # (H, W, 3) uint8 pixels, and whether the photograph is grey


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Photo, ...]:
    """The photographs of ``PHOTOS``: ``(H, W, 3)`` uint8 pixels (grey ones repeated to 3 channels) and a grey flag.

    Raises:
        ImportError: scikit-image is not installed (``pip install -e ".[bench]"``).
    """
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the pretrained regime's target draws photographs from scikit-image, a benchmark-only "
                          "dependency: pip install -e \".[bench]\"") from e
    photos = []
    for name, _ in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
        grey = pixels.ndim == 2
        photos.append((np.repeat(pixels[..., None], 3, axis=2) if grey else pixels[..., :3], grey))
    return tuple(photos)


def _photo_background(rng: np.random.Generator, size: int, photos: tuple[Photo, ...]) -> np.ndarray:
    """Target background, ``(size, size, 3)`` float32: a random square crop of a photograph (a side between ``size``
    and the photo's shorter side), resized to ``size``, maybe mirrored; grey photos get a random tint."""
    photo, grey = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(size, h, w), min(h, w) + 1))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[y0:y0 + side, x0:x0 + side]
    canvas = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), dtype=np.float32)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    if grey:
        tint = rng.uniform(0.5, 1.2, size=3)
        canvas = canvas * (tint / tint.max())
    return np.ascontiguousarray(canvas, dtype=np.float32)


# ----------------------------------------------------------------------------- pretraining crops


def render_pretrain_crop(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """One pretraining sample: ``(size, size, 3)`` uint8 pixels and its class index into ``PRETRAIN_CLASSES``.

    A shape class is one shape of 45-95% of the crop, filled with a random pretraining texture, on a procedural
    background; a texture class is the whole crop in that texture, with a few strokes over it.
    """
    label = int(rng.integers(len(PRETRAIN_CLASSES)))
    if label < len(PRETRAIN_SHAPES):
        canvas = _procedural_background(rng, size)
        diameter = rng.uniform(0.45, 0.95) * size
        centre = rng.uniform(diameter / 2, size - diameter / 2, size=2)
        mask = _mask(_PRETRAIN_SHAPE_FNS[label](rng), diameter, centre, size)
        _paint(rng, canvas, mask, _PRETRAIN_TEXTURE_FNS)
    else:
        texture = _PRETRAIN_TEXTURE_FNS[label - len(PRETRAIN_SHAPES)]
        canvas = texture(rng, size, size, rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3))
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(0, 3))):
            draw.line(rng.uniform(0, size, size=4).tolist(), fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                      width=int(rng.integers(1, 3)))
        canvas = np.asarray(image, dtype=np.float32)
    noise = rng.normal(0.0, rng.uniform(0.0, 5.0), size=canvas.shape)
    return np.clip(canvas + noise, 0, 255).astype(np.uint8), label


def pretrain_batch(rng: np.random.Generator, batch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` pretraining samples: ``(B, size, size, 3)`` uint8 pixels and ``(B,)`` int64 labels."""
    samples = [render_pretrain_crop(rng, size) for _ in range(batch)]
    return np.stack([s[0] for s in samples]), np.array([s[1] for s in samples], dtype=np.int64)


# ----------------------------------------------------------------------------- target images


def render_target_image(rng: np.random.Generator, size: int, photos: tuple[Photo, ...], min_px: float,
                        max_px: float, max_objects: int) -> tuple[np.ndarray, list[tuple[int, list[float], int]]]:
    """One target image: ``(size, size, 3)`` uint8 pixels and its objects as (class index into ``TARGET_CLASSES``,
    ``[x, y, w, h]`` tight box of the drawn pixels, pixel count).

    1 to ``max_objects`` objects of ``min_px``-``max_px`` diameter (log-uniform) on a photograph, over 0-2
    unannotated blobs; an object that cannot be placed without touching an earlier one in 30 tries is dropped.
    """
    canvas = _photo_background(rng, size, photos)
    for _ in range(int(rng.integers(0, 3))):
        diameter = float(np.exp(rng.uniform(np.log(min_px), np.log(max_px))))
        _paint(rng, canvas, _mask(_blob(rng), diameter, rng.uniform(0, size, size=2), size), _TARGET_TEXTURE_FNS)
    taken = np.zeros((size, size), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(30):
            label = int(rng.integers(len(TARGET_CLASSES)))
            diameter = float(np.exp(rng.uniform(np.log(min_px), np.log(max_px))))
            centre = rng.uniform(diameter / 2, size - diameter / 2, size=2)
            mask = _mask(_TARGET_SHAPE_FNS[label](rng), diameter, centre, size)
            if mask.any() and not (mask & taken).any():
                break
        else:
            continue
        _paint(rng, canvas, mask, _TARGET_TEXTURE_FNS)
        taken |= mask
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        objects.append((label, box, int(mask.sum())))
    noise = rng.normal(0.0, rng.uniform(0.0, 4.0), size=canvas.shape)
    return np.clip(canvas + noise, 0, 255).astype(np.uint8), objects


def target_object_crops(rng: np.random.Generator, images: int, size: int, crop: int, min_px: float, max_px: float,
                        max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Square crops around every object of ``images`` fresh target images (25% margin), resized to ``crop`` px:
    ``(N, crop, crop, 3)`` uint8 and ``(N,)`` labels. For the linear probe of a pretrained backbone; ``rng`` must be a
    stream of its own, never the dataset's."""
    photos = load_photos()
    pixels, labels = [], []
    for _ in range(images):
        image, objects = render_target_image(rng, size, photos, min_px, max_px, max_objects)
        pad = size // 2  # a crop around an object at the border reaches at most this far outside
        padded = Image.fromarray(np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
        for label, (x, y, w, h), _ in objects:
            half = 0.625 * max(w, h)
            cx, cy = x + w / 2 + pad, y + h / 2 + pad
            box = (cx - half, cy - half, cx + half, cy + half)
            pixels.append(np.asarray(padded.resize((crop, crop), Image.BILINEAR, box=box)))
            labels.append(label)
    return np.stack(pixels), np.array(labels, dtype=np.int64)


# ----------------------------------------------------------------------------- the target dataset on disk

TARGET_DEFAULTS = {"seed": 0, "num_train": 1000, "num_val": 200, "num_test": 200, "size": 128, "min_px": 12,
                   "max_px": 56, "max_objects": 8}


def target_dataset_name(seed: int, num_train: int, num_val: int, num_test: int, size: int, min_px: float,
                        max_px: float, max_objects: int) -> str:
    """Folder name of a target dataset, e.g. ``target-v1-s0-128px-o12-56x8-1000-200-200``."""
    return (f"target-v{GENERATOR_VERSION}-s{seed}-{size}px-o{min_px:g}-{max_px:g}x{max_objects}-"
            f"{num_train}-{num_val}-{num_test}")


def _check_target(size: int, min_px: float, max_px: float, max_objects: int, counts: dict[str, int]) -> None:
    if not 4 <= min_px <= max_px <= size:
        raise ValueError(f"object diameters must satisfy 4 <= min_px <= max_px <= size; got {min_px}, {max_px}, {size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    if any(n < 1 for n in counts.values()):
        raise ValueError(f"every split needs at least one image, got {counts}")


def write_target_dataset(out_dir: Path, seed: int, num_train: int, num_val: int, num_test: int, size: int,
                         min_px: float, max_px: float, max_objects: int) -> Path:
    """Write ``out_dir/{train,val,test}/NNNNNN.png``, ``out_dir/annotations/instances_{split}.json`` (COCO, boxes only)
    and ``out_dir/LICENSES.txt``. Each split has its own stream ``(seed, 3, split index)``: the same arguments give
    byte-identical files, and no two splits share an image."""
    counts = dict(zip(SPLITS, (num_train, num_val, num_test)))
    _check_target(size, min_px, max_px, max_objects, counts)
    photos = load_photos()
    # Recorded because the pixels come from the installed scikit-image: a dataset made with other photographs differs.
    photos_sha256 = hashlib.sha256(b"".join(pixels.tobytes() for pixels, _ in photos)).hexdigest()
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(TARGET_CLASSES)]
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, 3, split_index])
        (out_dir / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, counts[split] + 1):
            pixels, objects = render_target_image(rng, size, photos, min_px, max_px, max_objects)
            file_name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(out_dir / split / file_name, compress_level=1)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for label, box, area in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                    "bbox": box, "area": area, "iscrowd": 0})
        document = {"info": {"description": "lgd pretrained-regime target: shapes on photographs",
                             "version": GENERATOR_VERSION, "seed": seed, "split": split,
                             "photos": [name for name, _ in PHOTOS], "photos_sha256": photos_sha256},
                    "images": images, "annotations": annotations, "categories": categories}
        (out_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(document, separators=(",", ":")))
    lines = ["Backgrounds are crops of these photographs, shipped in scikit-image's wheel (skimage.data); licences as",
             "stated in their skimage.data docstrings:", ""] + [f"- {name}: {text}" for name, text in PHOTOS]
    (out_dir / "LICENSES.txt").write_text("\n".join(lines) + "\n")
    return out_dir


def ensure_target_dataset(cache_dir: Path, **params: float) -> Path:
    """The target dataset folder in ``cache_dir`` (``TARGET_DEFAULTS`` updated by ``params``), written on first use.

    Written to a temporary sibling renamed into place when complete, so an interrupted run never leaves a folder that
    looks finished.
    """
    unknown = set(params) - set(TARGET_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown target dataset parameters: {sorted(unknown)}")
    p = {**TARGET_DEFAULTS, **params}
    return ensure_dir(Path(cache_dir) / target_dataset_name(**p), lambda tmp: write_target_dataset(tmp, **p))


def regime_cache_dir(cache_dir: Optional[str] = None) -> Path:
    """Where the regime's dataset and backbone are cached: ``cache_dir``, else ``$LGD_CACHE/regime``, else
    ``~/.cache/lgd/regime``."""
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("LGD_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "lgd") / "regime"


def split_overrides(dataset: Path) -> list[str]:
    """``lgd train`` overrides that select the dataset's three splits."""
    overrides = []
    for split in SPLITS:
        overrides += [f"data.{split}.root={dataset / split}",
                      f"data.{split}.ann={dataset / 'annotations' / f'instances_{split}.json'}"]
    return overrides


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="default: $LGD_CACHE/regime or ~/.cache/lgd/regime")
    args = parser.parse_args(argv)
    cache = regime_cache_dir(args.cache_dir)
    dataset = ensure_target_dataset(cache)
    print(f"target dataset: {dataset}")
    print("lgd train overrides: " + " ".join(split_overrides(dataset)))


if __name__ == "__main__":
    main()
