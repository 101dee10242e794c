"""LGD: label-guided self-distillation for torchvision object detectors.

Each name is imported on first use (``lgd.utils.lazy``), so ``import lgd.config`` loads no torch.
"""
from lgd.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "lgd.config": ("Config", "load_config"),
    "lgd.detectors": ("build_detector",),
    "lgd.methods.lgd": ("LGD",),
})
__version__ = "0.1.0"
