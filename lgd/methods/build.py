"""The model a config trains: the student detector wrapped as ``distill.method`` says (LGD, FGFI or Baseline)."""
from __future__ import annotations

from pathlib import Path

from lgd.config import Config, distill_method
from lgd.detectors import build_detector
from lgd.methods.fgfi import FGFI, load_teacher
from lgd.methods.lgd import LGD
from lgd.methods.trainable import Baseline, Trainable


def build_model(cfg: Config, num_classes: int, teacher: bool = True) -> Trainable:
    """The student wrapped as ``distill.method`` says: in LGD, in FGFI (with its frozen teacher read from
    ``fgfi.teacher``), or in Baseline.

    ``teacher=False`` builds an FGFI run's student as a Baseline, without reading the teacher: what evaluation,
    export and pictures of a trained FGFI run need (its teacher was training-only).

    Raises:
        LGDError: the FGFI teacher file is missing, corrupt or not one lgd wrote.
    """
    detector = build_detector(cfg.model, num_classes)
    method = distill_method(cfg)
    if method == "none" or (method == "fgfi" and not teacher):
        return Baseline(detector)
    if method == "fgfi":
        frozen, sha256 = load_teacher(Path(cfg.fgfi.teacher))
        return FGFI(detector, frozen, sha256, cfg.fgfi, cfg.model.anchor_sizes)
    return LGD(detector, num_classes=num_classes, config=cfg.lgd, max_iter=cfg.solver.max_iter)
