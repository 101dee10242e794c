"""Label encoder (docs/method.md, section 2): a PointNet-style set encoder over each image's objects.

The reference writes the per-object layers as 1x1 Conv1d over a length axis; here they are
nn.Linear over the last axis of a (B, N, d) tensor, which is the same map with the same
parameter count. Every LayerNorm is without affine parameters, every linear layer has a bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lgd.choices import LABEL_FUSIONS


def linear_block(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear in_dim -> out_dim, LayerNorm (no affine), ReLU, applied on the last axis."""
    return nn.Sequential(
        nn.Linear(in_dim, out_dim),
        nn.LayerNorm(out_dim, elementwise_affine=False),
        nn.ReLU(inplace=True),
    )


def _stack(dims: list[int]) -> nn.Sequential:
    return nn.Sequential(*(linear_block(a, b) for a, b in zip(dims[:-1], dims[1:])))


def _transform(x: Tensor, matrix: Tensor) -> Tensor:
    """Row vector times matrix per object: (..., d) x (..., d, d) -> (..., d)."""
    return (x.unsqueeze(-2) @ matrix).squeeze(-2)


class SpatialTransformer(nn.Module):
    """STN(d): predicts a d x d matrix from one object's own d-vector.

    Layers: d->64->128->1024 (each LN, ReLU), then 1024->512->256 (each LN, ReLU), then
    256->d*d. The reference's max over the length-1 axis between the two stacks is the
    identity and is omitted. No identity matrix is added to the output (as the reference).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.features = _stack([dim, 64, 128, 1024, 512, 256])
        self.matrix = nn.Linear(256, dim * dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., d, d)."""
        return self.matrix(self.features(x)).unflatten(-1, (self.dim, self.dim))


class LabelEncoder(nn.Module):
    """Encodes each object's label descriptor into a C-d label embedding in context of its image.

    Per object x (length k): x <- x . STN_k(x); h1 = ReLU(LN(Linear k->64 (x)));
    h1 <- h1 . STN_64(h1); h3 = ReLU(LN(Linear 128->1024 (ReLU(LN(Linear 64->128 (h1))))));
    g = max of h3 over the valid objects of the image; e = ReLU(LN(Linear 1088->C ([h1 ; g]))).

    ``fusion="balanced"`` (a departure, docs/method.md section 10; the reference concatenates) normalises h1 and
    g separately (LayerNorm, no affine) and scales g by sqrt(64 / 1024) before the 1088->C layer, so the
    per-object part and the image-wide part enter it with equal norm. In the reference g, shared by every
    object of an image, holds 16x more entries and dominates, so one image's embeddings are nearly identical.

    Raises:
        ValueError: an unknown ``fusion``.
    """

    def __init__(self, descriptor_dim: int, channels: int = 256, fusion: str = "concat") -> None:
        super().__init__()
        if fusion not in LABEL_FUSIONS:
            raise ValueError(f"fusion must be one of {LABEL_FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.input_transform = SpatialTransformer(descriptor_dim)
        self.embed = linear_block(descriptor_dim, 64)
        self.feature_transform = SpatialTransformer(64)
        self.lift = _stack([64, 128, 1024])
        self.fuse = linear_block(64 + 1024, channels)

    def forward(self, descriptors: Tensor, valid: Tensor) -> Tensor:
        """Label embeddings.

        Args:
            descriptors: (B, N, k) label descriptors in the padded object layout.
            valid: (B, N) bool; padding slots are left out of the per-image max.

        Returns:
            (B, N, C) label embeddings (padding slots hold finite values that must be ignored).
        """
        x = _transform(descriptors, self.input_transform(descriptors))
        h1 = self.embed(x)
        h1 = _transform(h1, self.feature_transform(h1))
        h3 = self.lift(h1)
        # h3 is a ReLU output (>= 0), so filling padding with 0 leaves each image's max
        # unchanged and gives an image without objects a finite all-zero global feature.
        pooled = h3.masked_fill(~valid.unsqueeze(-1), 0).amax(dim=1, keepdim=True).expand_as(h3)
        if self.fusion == "balanced":
            h1 = F.layer_norm(h1, h1.shape[-1:])
            pooled = F.layer_norm(pooled, pooled.shape[-1:]) * math.sqrt(h1.shape[-1] / pooled.shape[-1])
        return self.fuse(torch.cat([h1, pooled], dim=-1))
