"""Pictures of detections, as ``lgd predict`` writes them: one labelled, class-coloured box per object."""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Sequence

import torch
from matplotlib import font_manager
from PIL import Image
from torchvision.ops import batched_nms, nms
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# Images whose long side is shorter are drawn upscaled to this many pixels, so that labels stay legible.
PICTURE_LONG_SIDE = 800
# torchvision's detectors suppress overlaps per class only (FCOS and RetinaNet at IoU 0.6), so one object can come
# out once per class from the same location (IoU ~1), and a weak detector gives nested boxes of one class at IoU
# 0.5-0.6. The picture keeps the best-scoring of boxes overlapping more than PICTURE_NMS_IOU whatever their class,
# and more than PICTURE_CLASS_NMS_IOU within a class (detections.json keeps them all).
PICTURE_NMS_IOU = 0.7
PICTURE_CLASS_NMS_IOU = 0.5


def class_color(index: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour for a class index (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


@functools.cache
def label_font() -> str:
    """Path of the bold DejaVu Sans that matplotlib ships, a TrueType font every install has."""
    return font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold"))


def one_box_per_object(detections: dict[str, torch.Tensor], score_thresh: float,
                       iou: float = PICTURE_NMS_IOU) -> dict[str, torch.Tensor]:
    """The detections worth drawing: score >= ``score_thresh``, then NMS within each class at
    ``PICTURE_CLASS_NMS_IOU`` and across classes at ``iou``.

    For the picture only: where the detector reports one object under several classes, the best-scoring
    class is kept. Returns the same keys, rows in ascending score order (so the best is drawn on top).
    """
    detections = {k: v.detach().cpu() for k, v in detections.items()}
    scores, boxes = detections["scores"], detections["boxes"].float()
    keep = torch.nonzero(scores >= score_thresh).flatten()
    keep = keep[batched_nms(boxes[keep], scores[keep], detections["labels"][keep], PICTURE_CLASS_NMS_IOU)]
    order = keep[nms(boxes[keep], scores[keep], iou)].flip(0)
    return {k: v[order] for k, v in detections.items()}


def draw_detections(
    image: torch.Tensor,
    detections: dict[str, torch.Tensor],
    class_names: Sequence[str],
    label_offset: int = 0,
    score_thresh: float = 0.3,
    long_side: int = PICTURE_LONG_SIDE,
) -> Image.Image:
    """Draw one box per object (:func:`one_box_per_object`) labelled "name score", with masks when present.

    Boxes and label backgrounds take the class's colour; labels sit inside the box's top-left corner in a
    font scaled to the picture. Images whose long side is under ``long_side`` pixels are upscaled to it
    first (bilinear, boxes and masks with them); larger ones keep their size.

    Args:
        image: (3, H, W) float in [0, 1] or uint8.
        detections: torchvision output for this image: "boxes" (N, 4) XYXY pixels,
            "scores" (N,), "labels" (N,), optional "masks" (N, 1, H, W) probabilities.
        class_names: name of class ``label - label_offset``; labels outside get their number.
        label_offset: 1 for models whose label 0 is background (Faster/Mask R-CNN).
        score_thresh: detections scoring below this are not drawn.
        long_side: the picture's minimum long side in pixels; 0 keeps the image's size.

    Returns:
        An RGB PIL image of size (W * s, H * s), s = max(1, long_side / max(H, W)).
    """
    height, width = image.shape[-2:]
    scale = max(1.0, long_side / max(height, width))
    size = [round(height * scale), round(width * scale)]
    canvas = F.to_dtype(image.detach().cpu(), torch.uint8, scale=True)
    if scale > 1:
        canvas = F.resize(canvas, size, antialias=True)
    shown = one_box_per_object(detections, score_thresh)
    if not len(shown["scores"]):
        return F.to_pil_image(canvas)

    classes = (shown["labels"] - label_offset).tolist()
    colors = [class_color(c) for c in classes]
    names = [class_names[c] if 0 <= c < len(class_names) else str(c + label_offset) for c in classes]
    if "masks" in shown:
        masks = shown["masks"].float()
        masks = F.resize(masks if masks.dim() == 4 else masks[:, None], size, antialias=False)[:, 0]
        canvas = draw_segmentation_masks(canvas, masks > 0.5, alpha=0.45, colors=colors)
    boxes = shown["boxes"].float() * torch.tensor([size[1] / width, size[0] / height] * 2)
    long = max(size)
    canvas = draw_bounding_boxes(
        canvas,
        boxes,
        labels=[f"{name} {score:.2f}" for name, score in zip(names, shown["scores"].tolist())],
        colors=colors,
        width=max(2, round(long / 300)),
        font=label_font(),
        font_size=max(12, round(long / 45)),
        label_colors=[text_color(c) for c in colors],
        fill_labels=True,
    )
    return F.to_pil_image(canvas)
