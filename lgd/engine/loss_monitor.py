"""Warnings for loss terms stuck at a degenerate value: a branch of the model that has stopped learning.

FCOS's box regression is the known case. torchvision's FCOS passes its box-regression outputs through a ReLU and
decodes them as distances from each location; where every output is <= 0, each predicted box has zero size, its
GIoU loss is exactly 1 and no gradient reaches the branch. From scratch the branch starts near that point (its
outputs are ~0 at initialisation), and in LGD runs the teacher's loss through the shared head can push it there
for hundreds of iterations (BENCHMARKS.md, "The dead box-regression branch").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class DegenerateValue:
    """A loss value that means a branch has stopped learning, and what to tell the user about it."""

    value: float
    meaning: str
    advice: str


_FCOS_BOX = DegenerateValue(
    1.0,
    "FCOS's box-regression branch predicts zero-size boxes (every output is <= 0 after its ReLU), so its GIoU "
    "loss is 1 and it gets no gradient: the detector is not learning where objects are",
    "runs often recover by themselves; if it lasts, try a longer or gentler warm-up (solver.warmup_iters, "
    "solver.warmup_factor), a lower solver.base_lr, or lgd.teacher_trains_head=false (the teacher's loss then "
    "no longer moves the shared head)",
)

# Per detector: loss term (also with the teacher/ prefix) -> its degenerate value.
DEGENERATE_LOSSES: dict[str, dict[str, DegenerateValue]] = {"fcos": {"bbox_regression": _FCOS_BOX}}


@dataclass
class DegenerateLossMonitor:
    """Watches the per-iteration loss terms and reports a term that sits at its degenerate value.

    Args:
        arch: detector name (``model.arch``); detectors without known degenerate values are never reported.
        patience: consecutive iterations at the value before a warning (iterations).
        tolerance: how close to the value counts as at it (absolute, in loss units).
    """

    arch: str
    patience: int = 200
    tolerance: float = 2e-3
    _since: dict[str, int] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def update(self, iteration: int, losses: Mapping[str, float]) -> list[str]:
        """Feed one iteration's loss terms; returns the messages that are due now (each episode warns once,
        and its end is reported too)."""
        known = DEGENERATE_LOSSES.get(self.arch, {})
        messages = []
        for term, loss in losses.items():
            degenerate = known.get(term.removeprefix("teacher/"))
            if degenerate is None:
                continue
            if abs(loss - degenerate.value) <= self.tolerance:
                start = self._since.setdefault(term, iteration)
                if iteration - start + 1 >= self.patience and term not in self._warned:
                    self._warned.add(term)
                    messages.append(
                        f"iteration {iteration}: loss '{term}' has stayed at {degenerate.value:g} for "
                        f"{iteration - start + 1} iterations: {degenerate.meaning}. What to try: {degenerate.advice}."
                    )
            else:
                self._since.pop(term, None)
                if term in self._warned:
                    self._warned.discard(term)
                    messages.append(f"iteration {iteration}: loss '{term}' has left its degenerate value "
                                    f"({loss:.3f}): the branch is learning again.")
        return messages
