"""Label descriptors (docs/method.md, section 1): the padded object set and its per-object vectors.

Objects of a batch live in one padded layout, B x N: image i's N_i ground-truth objects fill
slots 0..N_i-1, the optional context box takes the last slot of every image, the rest is
padding marked invalid. Everything downstream (encoder, masks, attention, painting) works on
this layout with batched tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lgd.choices import CLASS_FORMATS


@dataclass(frozen=True)
class PaddedObjects:
    """The objects of a batch in a padded B x N layout.

    Attributes:
        boxes: (B, N, 4) float XYXY, clamped to [0, W-1] x [0, H-1]; zeros in padding slots.
        classes: (B, N) int64 class ids 0..K-1; -1 for the context box and padding.
        valid: (B, N) bool, True for real objects and the context box.
        is_context: (B, N) bool, True only in the context slot (the last one) when enabled.
        image_index: (T,) int64, image of each ground-truth object in concatenation order.
        slot_index: (T,) int64, slot of each ground-truth object in concatenation order.
    """

    boxes: Tensor
    classes: Tensor
    valid: Tensor
    is_context: Tensor
    image_index: Tensor
    slot_index: Tensor

    def scatter(self, values: Tensor, fill: float = 0) -> Tensor:
        """Place per-object values, T x ... in concatenation order, into the (B, N, ...) layout.

        Slots without a ground-truth object (context, padding) hold ``fill``.
        """
        return _scatter(values, self.image_index, self.slot_index, self.valid.shape, fill)

    def gather(self, padded: Tensor) -> Tensor:
        """Inverse of :meth:`scatter`: (B, N, ...) -> T x ... for the ground-truth objects."""
        return padded[self.image_index, self.slot_index]


def _scatter(
    values: Tensor, image_index: Tensor, slot_index: Tensor, layout: tuple[int, int], fill: float
) -> Tensor:
    out = values.new_full((*layout, *values.shape[1:]), fill)
    out[image_index, slot_index] = values
    return out


def pad_objects(
    boxes: list[Tensor],
    classes: list[Tensor],
    image_size: tuple[int, int],
    context_box: bool,
    dtype: torch.dtype = torch.float32,
) -> PaddedObjects:
    """Lay the objects of B images out as a padded set, appending the context box if enabled.

    Args:
        boxes: B >= 1 tensors, each (N_i, 4) float XYXY in the padded batch frame.
        classes: B tensors, each (N_i,) int64.
        image_size: (H, W) of the padded batch.
        context_box: append one object per image covering the whole image ([0, 0, W, H]).
        dtype: floating dtype of the padded boxes, and so of the descriptors built from them. The teacher
            passes its features' dtype (at least float32), so a float64 teacher computes descriptors such as
            95/96 in float64, as the reference does.

    Returns:
        The padded set with N = max N_i + 1 slots with the context box, else max(max N_i, 1):
        at least one slot, so that no later reduction runs over an empty axis.
    """
    height, width = image_size
    device = boxes[0].device
    lengths = torch.tensor([b.shape[0] for b in boxes], dtype=torch.long)
    most = int(lengths.max())
    layout = (len(boxes), most + 1 if context_box else max(most, 1))
    # Index bookkeeping runs on the CPU from the known lengths, so it needs no device sync.
    image_index = torch.repeat_interleave(torch.arange(len(boxes)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    slot_index = (torch.arange(image_index.numel()) - starts[image_index]).to(device)
    image_index = image_index.to(device)

    upper = torch.tensor([width - 1, height - 1] * 2, dtype=dtype, device=device)
    flat_boxes = torch.minimum(torch.cat(boxes).to(device, dtype).clamp(min=0), upper)
    flat_classes = torch.cat(classes).to(device, torch.long)
    present = torch.ones(flat_boxes.shape[0], dtype=torch.bool, device=device)
    padded_boxes = _scatter(flat_boxes, image_index, slot_index, layout, 0)
    padded_classes = _scatter(flat_classes, image_index, slot_index, layout, -1)
    valid = _scatter(present, image_index, slot_index, layout, False)
    is_context = torch.zeros(layout, dtype=torch.bool, device=device)
    if context_box:
        whole = torch.tensor([0.0, 0.0, width, height], dtype=dtype, device=device)
        padded_boxes[:, -1] = torch.minimum(whole, upper)
        valid[:, -1] = True
        is_context[:, -1] = True
    return PaddedObjects(padded_boxes, padded_classes, valid, is_context, image_index, slot_index)


def descriptor_dim(num_classes: int, class_format: str, mask_guided: bool = False) -> int:
    """Length k of a label descriptor: 4 box entries, the class part, 49 mask-crop entries."""
    class_part = num_classes if class_format == "one_hot" else 1
    return 4 + class_part + (49 if mask_guided else 0)


def label_descriptors(
    objects: PaddedObjects,
    image_size: tuple[int, int],
    num_classes: int,
    class_format: str = "one_hot",
    mask_crops: Tensor | None = None,
) -> Tensor:
    """Per-object label descriptors, every entry in [-1, 1].

    Descriptor = [x1/W, y1/H, x2/W, y2/H, class part, (mask crop)] mapped by v -> 2v - 1.
    Class part: ``one_hot`` (K entries) or ``norm_classes`` (one entry, id / K); the context
    box's class part is zero (also for ``norm_classes``, where the reference crashes instead).

    Args:
        objects: padded set from :func:`pad_objects`, boxes (B, N, 4), classes (B, N).
        image_size: (H, W) of the padded batch.
        num_classes: K.
        class_format: ``"one_hot"`` or ``"norm_classes"``.
        mask_crops: optional (B, N, 7, 7) mask crops in [0, 1] (context crop all ones).

    Returns:
        (B, N, k) float descriptors, k = :func:`descriptor_dim`.
    """
    if class_format not in CLASS_FORMATS:
        raise ValueError(f"class_format must be one of {CLASS_FORMATS}, got {class_format!r}")
    height, width = image_size
    geometry = objects.boxes / objects.boxes.new_tensor([width, height, width, height])
    known = objects.classes >= 0
    ids = objects.classes.clamp(min=0)
    if class_format == "one_hot":
        class_part = F.one_hot(ids, num_classes).to(geometry.dtype) * known[..., None]
    else:
        class_part = (ids.to(geometry.dtype) / num_classes)[..., None]
    parts = [geometry, class_part]
    if mask_crops is not None:
        parts.append(mask_crops.flatten(2).to(geometry.dtype))
    return torch.cat(parts, dim=-1) * 2 - 1
