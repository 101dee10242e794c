"""LGD: label-guided self-distillation for torchvision object detectors."""
from lgd.config import Config, load_config
from lgd.detectors import build_detector
from lgd.distiller import LGD

__all__ = ["LGD", "Config", "build_detector", "load_config"]
__version__ = "0.1.0"
