"""torchvision detectors built from the config: a backbone-FPN (backbones.py), RetinaNet / FCOS / Faster / Mask R-CNN."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead

from lgd.detectors.backbones import build_backbone
from lgd.detectors.weights import load_into
from lgd.errors import ConfigError

if TYPE_CHECKING:  # only annotations: lgd.config imports this package for the model.arch choices
    from lgd.config import ModelConfig


def retinanet_anchors(sizes: list[int]) -> AnchorGenerator:
    """RetinaNet's anchors: per FPN level, base size x 2^(0, 1/3, 2/3) and aspect ratios 0.5, 1, 2 (9 per location)."""
    octave = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
    return AnchorGenerator(octave, ((0.5, 1.0, 2.0),) * len(octave))


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A plain torchvision detector for ``num_classes`` foreground classes.

    RetinaNet/FCOS predict ``num_classes`` outputs (labels 0..K-1); the R-CNNs add a background class
    (labels 1..K). ``VIEWS[arch].label_offset`` tells which.
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
        anchors = retinanet_anchors(cfg.anchor_sizes)
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
        load_into(model, cfg.weights, "model.weights", strict=False)
    return model


def set_test_size(model: nn.Module, cfg: ModelConfig) -> None:
    """Evaluation uses one scale: test_min_size, or the largest training scale."""
    model.transform.min_size = (cfg.test_min_size or max(cfg.min_size),)
