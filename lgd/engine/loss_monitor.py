"""Warnings about the loss as training logs it: a loss term stuck at a degenerate value (a branch of the model
that has stopped learning, ``DegenerateLossMonitor``) and a loss far above its early level (a run that diverges,
``DivergenceMonitor``).

Each detector's view names its degenerate values (``DetectorView.degenerate_losses``, lgd/detectors/views.py): FCOS's
box regression is the known case.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

from lgd.detectors import VIEWS
from lgd.errors import TrainingError


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


TEACHER_PREFIX, DISTILL_TERM = "teacher/", "loss_distill"


@dataclass
class DivergenceMonitor:
    """Warns once when the total loss rises far above its early level: a learning rate too high for the batch.

    The total is the sum of the student's detection loss terms: the teacher's (``teacher/`` prefix) and the
    distillation loss (``loss_distill``) are left out, since they start late (FGFI's warm-up) or follow a teacher
    that is itself learning, so they may rise in a run that is fine. Once ``window`` records have been logged
    after the first ``window``, the mean of the last ``window`` totals is compared with the mean of the first
    ``window``; above ``factor`` times it, the run is reported as diverging. A detector that learns starts at its
    highest loss and falls, so three times the early level is far outside a healthy run (issue 26: a
    classification loss from 0.46 to 91 at twice the batch's learning rate).

    Args:
        window: records averaged at the start and at the end (log records, not iterations).
        factor: how many times the early mean the recent mean must exceed.
        frozen_body_iters: ``lgd.freeze_backbone_iters`` of an LGD run (0 otherwise); when set, the advice names
            it too: the only Faster R-CNN runs seen to diverge did so while LGD kept the body frozen in the
            warm-up, and trained stably with the freeze off (BENCHMARKS.md, "What makes Faster R-CNN LGD diverge").
        stop: raise instead of warning (``solver.divergence_policy=stop``): a diverged run seen here collapsed
            for good and trained on for hundreds of CPU seconds into a model scoring 0 AP.

    Raises:
        TrainingError: from ``update``, with ``stop``, when the run diverges (the warning's text, and that training
            stopped).
    """

    window: int = 3
    factor: float = 3.0
    frozen_body_iters: int = 0
    stop: bool = False
    _early: list[float] = field(default_factory=list)
    _recent: deque = field(default_factory=deque)
    _warned: bool = False

    def update(self, iteration: int, losses: Mapping[str, float]) -> list[str]:
        """Feed one logged record's loss terms; returns the warning when it is due (once per run)."""
        total = sum(v for k, v in losses.items() if not k.startswith(TEACHER_PREFIX) and k != DISTILL_TERM)
        if len(self._early) < self.window:
            self._early.append(total)
            return []
        self._recent.append(total)
        if len(self._recent) > self.window:
            self._recent.popleft()
        if self._warned or len(self._recent) < self.window:
            return []
        early, recent = sum(self._early) / self.window, sum(self._recent) / self.window
        if recent <= self.factor * early:
            return []
        self._warned = True
        message = (f"iteration {iteration}: the loss is diverging: {recent:.4g} (mean of the last {self.window} "
                   f"records) is more than {self.factor:g}x its early level {early:.4g} (mean of the first "
                   f"{self.window}). What to try: a lower solver.base_lr (e.g. a half or a quarter; with a batch "
                   f"other than the recipe's, set solver.reference_batch_size so the rate follows the batch), a "
                   f"longer solver.warmup_iters{self._freeze_advice()}.")
        if self.stop:
            raise TrainingError(f"{message} Training stopped (solver.divergence_policy=stop; =warn trains on); "
                                f"metrics.jsonl has every record so far and the last checkpoint is intact.")
        return [message]

    def _freeze_advice(self) -> str:
        if not self.frozen_body_iters:
            return ""
        return (f", or, since LGD freezes the backbone body for the first {self.frozen_body_iters} iterations "
                f"(which the baseline does not), lgd.freeze_backbone_iters=0")
