"""torchvision detectors: built from the config (build.py), weights loaded (weights.py), and seen by LGD
through one small view per family (views.py)."""
from lgd.detectors.build import build_backbone, build_detector, set_test_size
from lgd.detectors.views import VIEWS, DetectorView, Targets, view_of

__all__ = ["VIEWS", "DetectorView", "Targets", "build_backbone", "build_detector", "set_test_size", "view_of"]
