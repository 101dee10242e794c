"""Intra-object knowledge mapper (docs/method.md, section 5): paints object knowledge into FPN maps."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lgd.teacher.masks import paint


def _conv_norm(channels: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels, affine=False)]


class IntraObjectKnowledgeMapper(nn.Module):
    """Renders per-object knowledge onto each level and refines it into teacher features.

    Per level l: map = conv3x3(sum over painted objects of local(o_j) (x) mask_j), where
    ``local`` is a Linear C->C and overlapping objects add up. With the context box, the
    context object is not painted: its knowledge goes through its own Linear C->C and is added
    to every pixel of its image as a bias. Then ReLU, then the refinement shared by all levels:
    [conv3x3, GroupNorm(1, no affine), ReLU] x 2, conv3x3, GroupNorm(1, no affine).
    """

    def __init__(self, channels: int = 256, context_box: bool = True) -> None:
        super().__init__()
        self.local = nn.Linear(channels, channels)
        self.render = nn.Conv2d(channels, channels, 3, padding=1)
        self.context = nn.Linear(channels, channels) if context_box else None
        self.activation = nn.ReLU(inplace=True)
        self.refine = nn.Sequential(
            *_conv_norm(channels), nn.ReLU(inplace=True),
            *_conv_norm(channels), nn.ReLU(inplace=True),
            *_conv_norm(channels),
        )

    def forward(
        self,
        knowledge: Sequence[Tensor],
        masks: Sequence[Tensor],
        painted: Tensor,
        context: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """Teacher features.

        Args:
            knowledge: per level (B, N, C) object knowledge o^l.
            masks: per level (B, N, H_l, W_l) bool inside masks.
            painted: (B, N) bool, the objects painted through ``local`` (real objects only).
            context: per level (B, C) context-object knowledge; required iff built with it.

        Returns:
            per level (B, C, H_l, W_l).
        """
        if (context is None) != (self.context is None):
            raise ValueError("context knowledge must be given exactly when the mapper has a context box")
        keep = painted.unsqueeze(-1)
        outputs = []
        for level, (objects, level_masks) in enumerate(zip(knowledge, masks)):
            rendered = self.render(paint(self.local(objects) * keep, level_masks))
            if self.context is not None:
                rendered = rendered + self.context(context[level])[:, :, None, None]
            outputs.append(self.refine(self.activation(rendered)))
        return outputs
