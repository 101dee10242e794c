"""Modulated deformable convolutions (DCN v2, Zhu et al. 2019) in a torchvision ResNet's bottlenecks.

``model.deform_stages`` (res2..res5, as detectron2's ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) says in which stages
every bottleneck's 3x3 convolution becomes a ``ModulatedDeformConv``. How this matches detectron2's
``DeformBottleneckBlock`` with ``DEFORM_MODULATED: True`` (the LGD reference's DCN v2) and where it differs is in
docs/method.md, section 11.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import DeformConv2d

from lgd.errors import ConfigError


class ModulatedDeformConv(DeformConv2d):
    """A 3x3 DCN v2 convolution whose offsets and modulation mask come from a zero-initialised 3x3 conv on its input.

    The predictor ``conv_offset`` gives 27 channels per position: 18 offsets, (dy, dx) per kernel tap as
    ``torchvision.ops.deform_conv2d`` orders them, then 9 mask logits. The mask is
    ``mask_scale * sigmoid(logit)``: with detectron2's ``mask_scale = 1`` it is 0.5 at initialisation (the
    layer starts as half the plain convolution); with 2 it is 1 and the layer starts as exactly the plain one.
    The weights keep the name (``weight``) and shape of the ``nn.Conv2d`` they replace, so ImageNet ResNet
    weights load unchanged.
    """

    def __init__(self, conv: nn.Conv2d, mask_scale: float = 1.0) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None)
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        self.conv_offset = nn.Conv2d(conv.in_channels, 3 * taps, conv.kernel_size, conv.stride, conv.padding,
                                     conv.dilation)
        # Zero offsets sample the regular grid: the layer starts as a (mask-scaled) plain convolution.
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self.mask_scale = mask_scale
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        predicted = self.conv_offset(x)
        taps = predicted.shape[1] // 3
        offset, logits = predicted[:, : 2 * taps], predicted[:, 2 * taps:]
        return super().forward(x, offset, self.mask_scale * torch.sigmoid(logits))


def deform_resnet(resnet: ResNet, stages: list[bool], mask_scale: float = 1.0) -> None:
    """Replace, in place, the 3x3 conv of every bottleneck in the stages res2..res5 flagged in ``stages``.

    Raises:
        ConfigError: ``stages`` does not have 4 entries, or a flagged stage has no bottlenecks (ResNet-18/34).
    """
    if len(stages) != 4:
        raise ConfigError(f"model.deform_stages needs 4 entries, one per stage res2..res5; got {stages}")
    for i, on in enumerate(stages):
        if not on:
            continue
        for block in getattr(resnet, f"layer{i + 1}"):
            if not isinstance(block, Bottleneck):
                raise ConfigError("model.deform_stages needs a bottleneck ResNet (resnet50, resnet101, ResNeXt); "
                                  f"{type(block).__name__} blocks have no single 3x3 conv to deform")
            block.conv2 = ModulatedDeformConv(block.conv2, mask_scale)


def has_deformable(module: nn.Module) -> bool:
    """Whether ``module`` holds a deformable convolution (which ONNX export cannot express, see lgd/export.py)."""
    return any(isinstance(m, DeformConv2d) for m in module.modules())
