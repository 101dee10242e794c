"""Appearance encoder (docs/method.md, section 3): per-object appearance from the student's features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lgd.teacher.masks import mask_pool


class AppearanceEncoder(nn.Module):
    """Projects each student FPN level and mask-pools it into one appearance vector per object.

    Projection, shared by all levels: conv3x3 C->C, GroupNorm(1 group, no affine), ReLU.
    a_j^l = sum of the projected level-l feature over object j's inside pixels / max(count, 1).
    With ``detach`` the student features are detached first, so the teacher's loss does not
    reach the student through this path (reference: on for Faster/Mask R-CNN).
    """

    def __init__(self, channels: int = 256, detach: bool = False) -> None:
        super().__init__()
        self.detach = detach
        self.projection = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(1, channels, affine=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Tensor]:
        """Appearance embeddings.

        Args:
            features: per level (B, C, H_l, W_l) student features.
            masks: per level (B, N, H_l, W_l) bool inside masks.

        Returns:
            per level (B, N, C).
        """
        return [
            mask_pool(self.projection(level.detach() if self.detach else level), level_masks)
            for level, level_masks in zip(features, masks)
        ]
