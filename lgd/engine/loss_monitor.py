"""Warnings for loss terms stuck at a degenerate value: a branch of the model that has stopped learning.

Each detector's view names its degenerate values (``DetectorView.degenerate_losses``, lgd/detectors/views.py): FCOS's
box regression is the known case.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from lgd.detectors import VIEWS


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
        known = VIEWS[self.arch].degenerate_losses
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
