"""torchvision detectors built from the config: a backbone-FPN (backbones.py) under the family's view (views.py)."""
from __future__ import annotations

from torch import nn

from lgd.config import ModelConfig
from lgd.detectors.backbones import build_backbone
from lgd.detectors.views import VIEWS
from lgd.detectors.weights import load_into
from lgd.errors import ConfigError


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A plain torchvision detector for ``num_classes`` foreground classes, with ``model.weights`` loaded.

    RetinaNet/FCOS predict ``num_classes`` outputs (labels 0..K-1); the R-CNNs add a background class
    (labels 1..K). ``VIEWS[arch].label_offset`` tells which.
    """
    if num_classes <= 0:
        raise ConfigError(f"the dataset has no categories (num_classes={num_classes})")
    if cfg.arch not in VIEWS:
        raise ConfigError(f"unknown model.arch '{cfg.arch}'")
    view = VIEWS[cfg.arch]
    model = view.build(cfg, build_backbone(cfg, view.one_stage), num_classes)
    if cfg.weights:
        load_into(model, cfg.weights, "model.weights", strict=False)
    return model


def set_test_size(model: nn.Module, cfg: ModelConfig) -> None:
    """Evaluation uses one scale: test_min_size, or the largest training scale."""
    model.transform.min_size = (cfg.test_min_size or max(cfg.min_size),)
