"""torchvision detectors, built from the config, and one small adapter per detector family.

LGD never subclasses or patches a detector. What differs between detectors — how to get the FPN
features, how to run the head's loss (or inference) on *other* features such as the teacher's —
lives in a ``DetectorAdapter`` here, so the teacher, the distiller and the engine stay generic.
"""
from __future__ import annotations

import functools
import socket
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchvision import models
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from lgd.config import ModelConfig
from lgd.errors import ConfigError, WeightsError
from lgd.files import load_torch_file

Targets = list[dict[str, Tensor]]


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return misc_ops.FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    return functools.partial(nn.GroupNorm, 32)


def build_backbone(cfg: ModelConfig, one_stage: bool) -> BackboneWithFPN:
    """ResNet-FPN: P3-P7 (P6/P7 from P5) for one-stage detectors, P2-P6 (max-pool P6) for R-CNNs."""
    resnet = getattr(models, f"resnet{cfg.depth}")(weights=None, norm_layer=_norm_layer(cfg.norm))
    if cfg.backbone_weights:
        _load_into(resnet, cfg.backbone_weights, "model.backbone_weights", strict=False)
    if not 0 <= cfg.trainable_layers <= 5:
        raise ConfigError(f"model.trainable_layers must be in 0..5, got {cfg.trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        trainable.append("bn1")
    for name, p in resnet.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            p.requires_grad_(False)
    stages = [2, 3, 4] if one_stage else [1, 2, 3, 4]
    widths = {1: 64, 2: 128, 3: 256, 4: 512} if cfg.depth in (18, 34) else {1: 256, 2: 512, 3: 1024, 4: 2048}
    c = cfg.fpn_channels
    extra = LastLevelP6P7(c, c) if one_stage else LastLevelMaxPool()
    return BackboneWithFPN(
        resnet,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(stages)},
        in_channels_list=[widths[k] for k in stages],
        out_channels=c,
        extra_blocks=extra,
    )


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A plain torchvision detector for ``num_classes`` foreground classes.

    RetinaNet/FCOS predict ``num_classes`` outputs (labels 0..K-1); the R-CNNs add a background class
    (labels 1..K). ``ADAPTERS[arch].label_offset`` tells which.
    """
    if num_classes <= 0:
        raise ConfigError(f"the dataset has no categories (num_classes={num_classes})")
    one_stage = cfg.arch in ("retinanet", "fcos")
    backbone = build_backbone(cfg, one_stage)
    sizes = dict(
        min_size=tuple(cfg.min_size),
        max_size=cfg.max_size,
        detections_per_img=cfg.detections_per_img,
    )
    if cfg.arch == "retinanet":
        octave = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in cfg.anchor_sizes)
        anchors = AnchorGenerator(octave, ((0.5, 1.0, 2.0),) * len(octave))
        model: nn.Module = RetinaNet(backbone, num_classes, score_thresh=cfg.score_thresh, anchor_generator=anchors,
                                     **sizes)
        if cfg.head_norm == "gn":
            model.head = RetinaNetHead(
                backbone.out_channels,
                model.anchor_generator.num_anchors_per_location()[0],
                num_classes,
                norm_layer=functools.partial(nn.GroupNorm, 32),
            )
    elif cfg.arch == "fcos":
        model = FCOS(backbone, num_classes, score_thresh=cfg.score_thresh, **sizes)
    elif cfg.arch in ("fasterrcnn", "maskrcnn"):
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
        rcnn_args = dict(
            box_score_thresh=cfg.score_thresh, rpn_anchor_generator=anchors, box_batch_size_per_image=cfg.roi_batch_size,
            rpn_pre_nms_top_n_train=cfg.rpn_proposals_train, rpn_post_nms_top_n_train=cfg.rpn_proposals_train,
            rpn_pre_nms_top_n_test=cfg.rpn_proposals_test, rpn_post_nms_top_n_test=cfg.rpn_proposals_test, **sizes,
        )
        if cfg.arch == "fasterrcnn":
            model = FasterRCNN(backbone, num_classes + 1, **rcnn_args)
        else:
            m = cfg.mask_head_channels
            model = MaskRCNN(backbone, num_classes + 1, **rcnn_args)
            model.roi_heads.mask_head = MaskRCNNHeads(backbone.out_channels, (m,) * 4, 1)
            model.roi_heads.mask_predictor = MaskRCNNPredictor(m, m, num_classes + 1)
    else:
        raise ConfigError(f"unknown model.arch '{cfg.arch}'")
    if cfg.weights:
        _load_into(model, cfg.weights, "model.weights", strict=False)
    return model


def set_test_size(model: nn.Module, cfg: ModelConfig) -> None:
    """Evaluation uses one scale: test_min_size, or the largest training scale."""
    model.transform.min_size = (cfg.test_min_size or max(cfg.min_size),)


def _load_into(module: nn.Module, spec: str, key: str, strict: bool) -> None:
    """Load a torchvision weight name or a local file; tensors whose shapes differ (e.g. a class head) are skipped."""
    state = _read_weights(spec, key)
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in usable)
    if not usable:
        raise WeightsError(f"{key}={spec}: none of its tensors fit this model (wrong architecture or depth?)")
    module.load_state_dict(usable, strict=False)
    if skipped:
        warnings.warn(f"{key}={spec}: {len(skipped)} tensors with other shapes were not loaded (e.g. {skipped[0]})")
    if strict and missing:
        raise WeightsError(f"{key}={spec}: {len(missing)} tensors missing, e.g. {missing[0]}")


def _read_weights(spec: str, key: str) -> dict[str, Tensor]:
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt") or path.exists():
        obj = load_torch_file(path, f"{key} weights file", WeightsError)
        for field in ("model", "state_dict"):  # a training checkpoint, an lgd export, a common wrapper
            if isinstance(obj, dict) and isinstance(obj.get(field), dict):
                return obj[field]
        return obj
    try:
        weights = models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(
            f"{key}: '{spec}' is neither a file nor a torchvision weight name "
            "(e.g. ResNet50_Weights.IMAGENET1K_V1)"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return load_torch_file(cached, f"{key} cached weights file", WeightsError)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # no network here is the common case; never hang or dump a urllib traceback
        raise WeightsError(
            f"{key}: '{spec}' is not in the local cache ({cached}) and could not be downloaded ({e}). "
            f"Download {weights.url} elsewhere and put it at {cached}, or pass a local .pth file."
        ) from None
    finally:
        socket.setdefaulttimeout(old)


class DetectorAdapter:
    """The uniform view LGD needs of one torchvision detector family.

    ``reference`` holds the LGD reference defaults of the family (LGD_SPEC section 8).
    """

    label_offset: int = 0
    reference: dict[str, bool] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # False: the teacher's pass runs the heads with detached parameters (lgd.teacher_trains_head)
        self.teacher_trains_head = True

    @property
    def channels(self) -> int:
        return self.model.backbone.out_channels

    @property
    def backbone_body(self) -> nn.Module:
        return self.model.backbone.body

    def preprocess(self, images: list[Tensor], targets: Optional[Targets]) -> tuple[ImageList, Optional[Targets]]:
        """The detector's own resize/normalise/pad; boxes (and masks) follow into the padded frame."""
        return self.model.transform(images, targets)

    def features(self, image_list: ImageList) -> "OrderedDict[str, Tensor]":
        """FPN levels, finest first, each (B, C, H_l, W_l)."""
        feats = self.model.backbone(image_list.tensors)
        return feats if isinstance(feats, OrderedDict) else OrderedDict(feats)

    def losses(
        self,
        image_list: ImageList,
        targets: Targets,
        features: "OrderedDict[str, Tensor]",
        teacher: Optional[list[Tensor]] = None,
        teacher_index: Optional[Tensor] = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Head losses of the student features and, with the same targets, of the teacher features.

        ``teacher`` levels hold the images ``teacher_index`` (a subset of the batch) in that order.
        Returns (student losses, teacher losses), named as the detector names them.
        """
        raise NotImplementedError

    def detect(
        self, image_list: ImageList, features: "OrderedDict[str, Tensor]", original_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Inference from given features (the student's, or the teacher's for the diagnostic)."""
        raise NotImplementedError


def _frozen_call(module: nn.Module, *args):
    """``module(*args)`` with its parameters detached: gradients reach the inputs, never the parameters."""
    return functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)


def _subset(image_list: ImageList, index: Tensor) -> ImageList:
    idx = index.tolist()
    return ImageList(image_list.tensors[index], [image_list.image_sizes[i] for i in idx])


class OneStageAdapter(DetectorAdapter):
    """RetinaNet and FCOS: the head is per-image (no batch statistics), so the student's and the
    teacher's features go through it as one batch and their outputs are split afterwards."""

    label_offset = 0

    def _compute_loss(self, targets: Targets, outputs: dict[str, Tensor], anchors: list[Tensor],
                      features: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def losses(self, image_list, targets, features, teacher=None, teacher_index=None):
        student = list(features.values())
        b = len(targets)
        anchors = self.model.anchor_generator(image_list, student)
        if teacher is not None and not self.teacher_trains_head:
            outputs = self.model.head(student)
            t_outputs = _frozen_call(self.model.head, teacher)
        else:
            both = student if teacher is None else [torch.cat([s, t]) for s, t in zip(student, teacher)]
            outputs = self.model.head(both)
            t_outputs = {k: v[b:] for k, v in outputs.items()}
        student_losses = self._compute_loss(targets, {k: v[:b] for k, v in outputs.items()}, anchors, student)
        if teacher is None:
            return student_losses, {}
        t_targets = [targets[i] for i in teacher_index.tolist()]
        return student_losses, self._compute_loss(t_targets, t_outputs, anchors[: len(t_targets)], student)

    def detect(self, image_list, features, original_sizes):
        feats = list(features.values())
        outputs = self.model.head(feats)
        anchors = self.model.anchor_generator(image_list, feats)
        per_level = [x.size(2) * x.size(3) for x in feats]
        per_location = outputs["cls_logits"].size(1) // sum(per_level)
        split = [n * per_location for n in per_level]
        split_outputs = {k: list(v.split(split, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(a.split(split)) for a in anchors]
        detections = self.model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
        return self.model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


class RetinaNetAdapter(OneStageAdapter):
    reference = {"context_box": True, "detach_appearance": False}

    def _compute_loss(self, targets, outputs, anchors, features):
        return self.model.compute_loss(targets, outputs, anchors)


class FCOSAdapter(OneStageAdapter):
    reference = {"context_box": False, "detach_appearance": False}

    def _compute_loss(self, targets, outputs, anchors, features):
        per_level = [x.size(2) * x.size(3) for x in features]
        return self.model.compute_loss(targets, outputs, anchors, per_level)


class TwoStageAdapter(DetectorAdapter):
    """Faster and Mask R-CNN: RPN and ROI heads run on the teacher features as a second pass
    (their proposal sampling and loss normalisation span the whole batch, so no shared pass)."""

    label_offset = 1
    reference = {"context_box": False, "detach_appearance": True}

    def _heads(self, image_list: ImageList, features: "OrderedDict[str, Tensor]", targets: Targets,
               frozen: bool = False) -> dict[str, Tensor]:
        call = _frozen_call if frozen else lambda module, *args: module(*args)
        proposals, rpn_losses = call(self.model.rpn, image_list, features, targets)
        _, roi_losses = call(self.model.roi_heads, features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    def losses(self, image_list, targets, features, teacher=None, teacher_index=None):
        student_losses = self._heads(image_list, features, targets)
        if teacher is None:
            return student_losses, {}
        t_features = OrderedDict(zip(features.keys(), teacher))
        t_targets = [targets[i] for i in teacher_index.tolist()]
        return student_losses, self._heads(_subset(image_list, teacher_index), t_features, t_targets,
                                           frozen=not self.teacher_trains_head)

    def detect(self, image_list, features, original_sizes):
        proposals, _ = self.model.rpn(image_list, features)
        detections, _ = self.model.roi_heads(features, proposals, image_list.image_sizes)
        return self.model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


ADAPTERS: dict[type, type[DetectorAdapter]] = {
    RetinaNet: RetinaNetAdapter,
    FCOS: FCOSAdapter,
    FasterRCNN: TwoStageAdapter,
    MaskRCNN: TwoStageAdapter,
}

ARCH_ADAPTERS: dict[str, type[DetectorAdapter]] = {
    "retinanet": RetinaNetAdapter,
    "fcos": FCOSAdapter,
    "fasterrcnn": TwoStageAdapter,
    "maskrcnn": TwoStageAdapter,
}


def adapter_for(model: nn.Module) -> DetectorAdapter:
    """The adapter of a torchvision detector instance (MaskRCNN is checked before its parent FasterRCNN)."""
    for cls in type(model).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls](model)
    raise TypeError(
        f"LGD supports torchvision RetinaNet, FCOS, FasterRCNN and MaskRCNN; got {type(model).__name__}"
    )
