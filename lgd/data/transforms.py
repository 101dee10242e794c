"""Sample transforms (image, target) built on torchvision.transforms.v2 and tv_tensors.

Resizing and normalisation are left to the detector's own transform.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def build_transforms(train: bool, hflip_prob: float = 0.5) -> v2.Transform:
    """Transform for ``(tv_tensors.Image, target)`` samples.

    Training flips horizontally with probability ``hflip_prob`` (boxes and masks follow
    the image, as tv_tensors); both modes convert the image to float32 in [0, 1].
    """
    steps: list[v2.Transform] = []
    if train and hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)
