"""LGD: label-guided self-distillation for torchvision object detectors.

Each name is imported on first use (``lgd.utils.lazy``), so ``import lgd.config`` loads no torch.
"""
from lgd.utils.lazy import lazy_exports

_EXPORTS = {
    "Config": "lgd.config",
    "load_config": "lgd.config",
    "build_detector": "lgd.detectors",
    "LGD": "lgd.methods.lgd",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
