"""Reading images from disk and drawing detections on them."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from lgd.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_image(path: Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float tensor in [0, 1], RGB.

    EXIF orientation is not applied, matching how COCO-style datasets are read for
    training, so boxes predicted here line up with the dataset's annotations.

    Raises:
        DatasetError: the file is missing or cannot be decoded; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"cannot decode image {path}: {error}") from error
    return pil_to_tensor(rgb).float().div_(255)


def list_images(path: Path) -> list[Path]:
    """The image files at `path`: the file itself, or a folder's images sorted by name.

    Only the folder's top level is searched; extensions are matched case-insensitively
    against jpg, jpeg, png, bmp and webp.

    Raises:
        DatasetError: the path does not exist, or holds no image.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DatasetError(f"{path} is not an image (expected one of {IMAGE_EXTENSIONS})")
        return [path]
    if not path.is_dir():
        raise DatasetError(f"no such image file or folder: {path}")
    images = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
    return images


def class_color(index: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour for a class index (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: torch.Tensor,
    detections: dict[str, torch.Tensor],
    class_names: Sequence[str],
    label_offset: int = 0,
    score_thresh: float = 0.3,
) -> Image.Image:
    """Draw boxes labelled "name score", and masks when present, on an image.

    Args:
        image: (3, H, W) float in [0, 1] or uint8.
        detections: torchvision output for this image: "boxes" (N, 4) XYXY pixels,
            "scores" (N,), "labels" (N,), optional "masks" (N, 1, H, W) probabilities.
        class_names: name of class `label - label_offset`; labels outside get their number.
        label_offset: 1 for models whose label 0 is background (Faster/Mask R-CNN).
        score_thresh: detections scoring below this are not drawn.

    Returns:
        An RGB PIL image of size (W, H).
    """
    canvas = image.detach().cpu()
    if canvas.is_floating_point():
        canvas = canvas.clamp(0, 1).mul(255).round().to(torch.uint8)
    keep = detections["scores"].detach().cpu() >= score_thresh
    if not keep.any():
        return to_pil_image(canvas)

    boxes = detections["boxes"].detach().cpu()[keep]
    scores = detections["scores"].detach().cpu()[keep].tolist()
    classes = (detections["labels"].detach().cpu()[keep] - label_offset).tolist()
    colors = [class_color(c) for c in classes]
    names = [
        class_names[c] if 0 <= c < len(class_names) else str(c + label_offset) for c in classes
    ]

    if "masks" in detections:
        masks = detections["masks"].detach().cpu()[keep]
        if masks.dim() == 4:
            masks = masks[:, 0]
        canvas = draw_segmentation_masks(canvas, masks > 0.5, alpha=0.5, colors=colors)
    canvas = draw_bounding_boxes(
        canvas,
        boxes,
        labels=[f"{name} {score:.2f}" for name, score in zip(names, scores)],
        colors=colors,
        width=2,
    )
    return to_pil_image(canvas)
