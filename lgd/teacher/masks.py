"""Inside-object masks per FPN level, and the two operations on them: pooling and painting.

Masks live in the padded object layout, (B, N, H_l, W_l) bool, one level at a time; no
tensor ever holds T x C x H_l x W_l. Pooling and painting are single batched matrix products
over the flattened pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align


def _inside_1d(low: Tensor, high: Tensor, size: int) -> Tensor:
    """(...,) interval ends in level pixels -> (..., size) bool: |p - centre| / extent <= 0.5."""
    centre = (low + high) / 2
    extent = high - low
    pixels = torch.arange(size, device=low.device, dtype=low.dtype)
    # Multiplied out rather than divided, so a zero-extent box holds only the pixel its
    # centre lies on instead of dividing by zero.
    return (pixels - centre.unsqueeze(-1)).abs() <= 0.5 * extent.unsqueeze(-1)


def inside_masks(boxes: Tensor, image_size: tuple[int, int], level_size: tuple[int, int]) -> Tensor:
    """Box masks on one FPN level.

    The box is scaled by (W_l / W, H_l / H); pixel (y, x), integer indices, is inside iff
    |y - yc| / h <= 0.5 and |x - xc| / w <= 0.5 for the scaled box's centre and size. A box
    too small for a coarse level can get an empty mask. The rule is separable, so the mask is
    the outer product of a row test and a column test.

    Args:
        boxes: (..., 4) XYXY in the padded image frame of size image_size = (H, W).
        level_size: (H_l, W_l).

    Returns:
        (..., H_l, W_l) bool.
    """
    height, width = image_size
    level_h, level_w = level_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    scale_x, scale_y = level_w / width, level_h / height
    rows = _inside_1d(y1 * scale_y, y2 * scale_y, level_h)
    cols = _inside_1d(x1 * scale_x, x2 * scale_x, level_w)
    return rows.unsqueeze(-1) & cols.unsqueeze(-2)


def resize_masks(masks: Tensor, level_size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of instance masks, (T, H, W) -> (T, H_l, W_l) bool.

    Same source pixel as F.interpolate(mode="nearest") (floor(dst * in / out)), written as
    one gather because interpolate rejects T = 0 and would need a float copy of the masks.
    """
    height, width = masks.shape[-2:]
    level_h, level_w = level_size
    rows = (torch.arange(level_h, device=masks.device) * (height / level_h)).floor().long()
    cols = (torch.arange(level_w, device=masks.device) * (width / level_w)).floor().long()
    rows = rows.clamp(max=height - 1)
    cols = cols.clamp(max=width - 1)
    return masks[:, rows.unsqueeze(-1), cols].bool()


def mask_crops(masks: Tensor, boxes: Tensor, size: int = 7) -> Tensor:
    """Each instance mask cropped to its own box and resampled to size x size.

    Args:
        masks: (T, H, W) bool/uint8 instance masks at the padded image size.
        boxes: (T, 4) XYXY boxes in the same frame.

    Returns:
        (T, size, size) float in [0, 1] (ROI-aligned averages of the binary mask).
    """
    index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)
    rois = torch.cat([index.unsqueeze(1), boxes], dim=1)
    # The float copy of the masks is the one torchvision's own Mask R-CNN loss makes of them.
    crops = roi_align(masks.unsqueeze(1).to(boxes.dtype), rois, size, 1.0, 0, True)
    return crops.squeeze(1).clamp(0, 1)


def mask_pool(features: Tensor, masks: Tensor) -> Tensor:
    """Mean of the features over each object's inside pixels.

    Args:
        features: (B, C, H_l, W_l).
        masks: (B, N, H_l, W_l) bool.

    Returns:
        (B, N, C): sum over inside pixels / max(number of inside pixels, 1).
    """
    weights = masks.flatten(2).to(features.dtype)
    # Normalising the weights before the product keeps half-precision sums from overflowing.
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return torch.bmm(weights, features.flatten(2).transpose(1, 2))


def paint(vectors: Tensor, masks: Tensor) -> Tensor:
    """Paint each object's vector onto its inside pixels; overlapping objects add up.

    Args:
        vectors: (B, N, C); zero rows paint nothing.
        masks: (B, N, H_l, W_l) bool.

    Returns:
        (B, C, H_l, W_l) = sum over objects of vector (x) mask.
    """
    weights = masks.flatten(2).to(vectors.dtype)
    return torch.bmm(vectors.transpose(1, 2), weights).unflatten(-1, masks.shape[-2:])
