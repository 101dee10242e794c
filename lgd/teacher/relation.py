"""Inter-object relation adapter (docs/method.md, section 4): labels and appearance meet in attention."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lgd.choices import ATTENTION_PATTERNS
from lgd.teacher.label_encoder import linear_block


class InterObjectRelationAdapter(nn.Module):
    """Relates each object to the other objects of its own image, once per FPN level.

    Label embeddings first go through a shared Linear C->C, LayerNorm (no affine), ReLU. One
    multi-head attention module (``num_heads`` heads, embed dim C) serves every level.

    Patterns, giving o^l (B, N, C) per level:
      - ``student_guided`` (default): query = appearance a^l, key = value = projected labels.
      - ``label_guided``: query = projected labels, key = value = appearance a^l.
      - ``student_fill``: o^l = a^l (no attention, labels unused).
      - ``teacher_fill``: o^l = projected label embedding, the same for every level.

    With ``residual`` (a departure, docs/method.md section 10; off in the reference) the guided patterns add
    each object's own projected label embedding to its attention output, as a transformer block's residual
    path does: o^l = attention(...) + projected label. Relations then refine an object's identity instead of
    replacing it, and the uniform attention the reference settles in no longer erases which class it is.

    Modules a pattern never uses are not built, so every parameter receives a gradient.

    Raises:
        ValueError: an unknown pattern, or ``residual`` with a pattern that has no attention.
    """

    def __init__(
        self, channels: int = 256, attention: str = "student_guided", num_heads: int = 8, residual: bool = False
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_PATTERNS:
            raise ValueError(f"attention must be one of {ATTENTION_PATTERNS}, got {attention!r}")
        if residual and attention not in ("student_guided", "label_guided"):
            raise ValueError(f"a residual path goes around the attention, and attention={attention!r} has none")
        self.pattern = attention
        self.residual = residual
        self.label_projection = linear_block(channels, channels) if attention != "student_fill" else None
        guided = attention in ("student_guided", "label_guided")
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True) if guided else None

    def forward(
        self,
        labels: Tensor | None,
        appearance: Sequence[Tensor] | None,
        valid: Tensor,
        num_levels: int,
    ) -> list[Tensor]:
        """Relation-aware object knowledge per level.

        Args:
            labels: (B, N, C) label embeddings; None only for ``student_fill``.
            appearance: per level (B, N, C); None only for ``teacher_fill``.
            valid: (B, N) bool; attention only looks at valid objects of the same image.
            num_levels: number of FPN levels.

        Returns:
            per level (B, N, C); rows of invalid slots are finite but meaningless.
        """
        if self.pattern == "student_fill":
            return list(appearance)
        projected = self.label_projection(labels)
        if self.pattern == "teacher_fill":
            return [projected] * num_levels
        # A row whose keys are all masked gives NaN; an image with no valid object therefore
        # attends over its padding instead. Its outputs are never painted.
        ignore = ~valid & valid.any(dim=1, keepdim=True)
        outputs = []
        for level in appearance:
            query, memory = (level, projected) if self.pattern == "student_guided" else (projected, level)
            out, _ = self.attention(query, memory, memory, key_padding_mask=ignore, need_weights=False)
            outputs.append(out + projected if self.residual else out)
        return outputs
