"""Backbones by name (``model.backbone``): torchvision ResNets, ResNeXts and Swin-T, each with an FPN on top.

``BACKBONES`` is the one registry: adding a backbone is one entry here and its name in
``lgd.choices.BACKBONE_NAMES``. Every backbone returned by
``build_backbone`` has ``body`` (the trunk: what ``lgd.freeze_backbone_iters`` freezes), ``fpn`` and
``out_channels``, and maps (B, 3, H, W) images to an OrderedDict of FPN levels, finest first:
P3-P7 (keys '0', '1', '2', 'p6', 'p7') for one-stage detectors, P2-P6 ('0'..'3', 'pool') for R-CNNs.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from lgd.config import ModelConfig, backbone_name
from lgd.detectors.deform import deform_resnet
from lgd.detectors.weights import load_into
from lgd.errors import ConfigError


@dataclass(frozen=True)
class Backbone:
    """One registered trunk: its torchvision constructor and what the FPN needs to know of it."""

    family: str  # "resnet" (torchvision ResNet, ResNeXt) | "swin" (torchvision SwinTransformer)
    widths: tuple[int, int, int, int]  # channels of stages 1-4 (strides 4, 8, 16, 32; res2..res5)
    # parameter-name prefixes of the trunk, top stage first: model.trainable_layers=n trains the first n entries
    layers: tuple[tuple[str, ...], ...]


_RESNET_LAYERS = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))
_SWIN_LAYERS = (("features.6", "features.7"), ("features.4", "features.5"), ("features.2", "features.3"),
                ("features.1",), ("features.0",))
_BASIC, _BOTTLENECK = (64, 128, 256, 512), (256, 512, 1024, 2048)

BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("resnet", _BASIC, _RESNET_LAYERS),
    "resnet34": Backbone("resnet", _BASIC, _RESNET_LAYERS),
    "resnet50": Backbone("resnet", _BOTTLENECK, _RESNET_LAYERS),
    "resnet101": Backbone("resnet", _BOTTLENECK, _RESNET_LAYERS),
    "resnext50_32x4d": Backbone("resnet", _BOTTLENECK, _RESNET_LAYERS),
    "resnext101_32x8d": Backbone("resnet", _BOTTLENECK, _RESNET_LAYERS),
    "swin_t": Backbone("swin", (96, 192, 384, 768), _SWIN_LAYERS),
}


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return misc_ops.FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    return functools.partial(nn.GroupNorm, 32)


class SwinBody(nn.Module):
    """torchvision Swin-T's ``features`` returning the chosen stages as NCHW maps, each behind its own LayerNorm.

    The per-output LayerNorms are those of the Swin detection backbone the LGD reference uses
    (``models/thirdparty_backbones/swint``, from SwinT_detectron2: ``norm{i}`` on each returned stage).
    Inputs of any size work: torchvision's shifted-window attention pads each stage to whole 7x7 windows and its
    patch merging pads odd sizes, so an image needs no multiple of 32 (the detector's transform pads to 32 anyway).
    """

    def __init__(self, features: nn.Sequential, stages: list[int], widths: tuple[int, ...]) -> None:
        super().__init__()
        self.features = features
        # stage k (1-4) ends at features[2k - 1]; entries 0, 2, 4, 6 are the patch embedding and the mergings
        self.ends = {2 * k - 1: str(i) for i, k in enumerate(stages)}
        self.norms = nn.ModuleDict({str(i): nn.LayerNorm(widths[k - 1]) for i, k in enumerate(stages)})

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """(B, 3, H, W) -> {'0': (B, C_k, H / 2^(k+1), W / 2^(k+1)), ...} for the chosen stages k."""
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, layer in enumerate(self.features):
            x = layer(x)  # NHWC throughout torchvision's Swin
            if i in self.ends:
                key = self.ends[i]
                out[key] = self.norms[key](x).permute(0, 3, 1, 2).contiguous()
            if len(out) == len(self.ends):
                break
        return out


class SwinFPN(nn.Module):
    """A Swin trunk and an FPN, shaped as torchvision's ``BackboneWithFPN`` (``body``, ``fpn``, ``out_channels``)."""

    def __init__(self, body: SwinBody, in_channels: list[int], out_channels: int, extra: ExtraFPNBlock) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """(B, 3, H, W) -> the FPN levels, each (B, out_channels, H_l, W_l)."""
        return self.fpn(self.body(x))


def _trunk(cfg: ModelConfig, name: str, spec: Backbone) -> nn.Module:
    if spec.family == "resnet":
        trunk = getattr(models, name)(weights=None, norm_layer=_norm_layer(cfg.norm))
        if any(cfg.deform_stages):
            deform_resnet(trunk, cfg.deform_stages, cfg.deform_mask_scale)
    else:
        if any(cfg.deform_stages):
            raise ConfigError(f"model.deform_stages applies to ResNet bottlenecks, not to model.backbone={name}")
        trunk = getattr(models, name)(weights=None)  # LayerNorm throughout; model.norm is for ResNets
    if cfg.backbone_weights:  # torchvision's classifier names, so ImageNet weights load as they are
        load_into(trunk, cfg.backbone_weights, "model.backbone_weights", strict=False)
    return trunk


def build_backbone(cfg: ModelConfig, one_stage: bool) -> nn.Module:
    """The named trunk with an FPN: P3-P7 (P6/P7 from P5) for one-stage detectors, P2-P6 (max-pool P6) for R-CNNs.

    Raises:
        ConfigError: an unknown or inconsistent backbone name, or deformable stages asked of a backbone without
            bottlenecks.
    """
    name = backbone_name(cfg)
    spec = BACKBONES[name]
    trunk = _trunk(cfg, name, spec)
    trainable = tuple(p + "." for layer in spec.layers[: cfg.trainable_layers] for p in layer)
    for pname, p in trunk.named_parameters():
        if not pname.startswith(trainable):
            p.requires_grad_(False)
    stages = [2, 3, 4] if one_stage else [1, 2, 3, 4]
    c = cfg.fpn_channels
    extra = LastLevelP6P7(c, c) if one_stage else LastLevelMaxPool()
    in_channels = [spec.widths[k - 1] for k in stages]
    if spec.family == "swin":
        return SwinFPN(SwinBody(trunk.features, stages, spec.widths), in_channels, c, extra)
    return BackboneWithFPN(trunk, return_layers={f"layer{k}": str(i) for i, k in enumerate(stages)},
                           in_channels_list=in_channels, out_channels=c, extra_blocks=extra)
