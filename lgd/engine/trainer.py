"""The training loop: a ``Trainer`` runs a run's iterations, and ``Hook``s do everything else around them.

``Trainer.train`` is the run's one lifecycle: every hook's ``before_train``; per iteration their ``before_step``,
``run_step`` (a batch loaded, moved onto the device, and one step: lgd/engine/step.py), then their ``after_step`` —
or ``after_failed_step``; and at the end, finished or not, their ``after_train`` in reverse order. The hooks
themselves (resume and checkpoints, the schedule, NaN policy, metrics, evaluation, stop signals) are in
lgd/engine/hooks.py, and ``build_hooks`` lists a run's. The model is a ``Trainable`` (lgd/methods/trainable.py) — LGD,
FGFI or the Baseline — so the loop never asks which it trains.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

from tqdm import tqdm

from lgd.data.build import to_device
from lgd.data.loader import stop_workers
from lgd.engine.signals import StopSignals
from lgd.engine.solver import Optimization
from lgd.engine.step import Stepper, StepResult
from lgd.errors import DatasetError
from lgd.methods.trainable import Trainable
from lgd.utils.distributed import Context


class Hook:
    """One concern of a run; each method is called for every hook, in order, and does nothing here.

    Every rank calls every hook: a hook that takes part in a collective (averaged metrics, evaluation,
    checkpoints) does so on all ranks, and only rank 0 writes files or prints.
    """

    def before_train(self, trainer: Trainer) -> None:
        """Before the first iteration (of this process: ``trainer.start`` on resume)."""

    def before_step(self, trainer: Trainer) -> None:
        """Before the step of ``trainer.iteration``."""

    def after_step(self, trainer: Trainer) -> None:
        """After a step that updated the model; ``trainer.result`` says what it did."""

    def after_failed_step(self, trainer: Trainer) -> None:
        """After a step whose loss or gradient was not finite on some rank: nothing changed."""

    def on_data_error(self, trainer: Trainer, error: DatasetError) -> None:
        """When the batch of ``trainer.iteration`` could not be loaded (an image that cannot be decoded): the
        model is as the last step left it. The loop raises ``error`` after every hook, unless a hook raises."""

    def after_train(self, trainer: Trainer) -> None:
        """At the end of the run, still under ``StopSignals``: ``trainer.finished`` says whether every iteration
        ran (the final checkpoint and evaluation) or an error stops the run (only what must be released)."""


class Trainer:
    """Runs iterations ``start`` .. ``max_iter - 1`` through the hooks (see the module's docstring).

    Hooks read the trainer: ``iteration`` (0-based), ``done`` (iterations completed with this step), ``result``
    (the step's ``StepResult``), ``data_time`` (seconds this step waited for its batch), ``finished``, ``model``,
    ``optimization``, ``ctx``, ``signals``, ``bar`` and ``say``.
    """

    def __init__(self, model: Trainable, stepper: Stepper, batches: Iterator, ctx: Context, start: int,
                 max_iter: int, hooks: list[Hook], bar: tqdm) -> None:
        self.model, self.stepper, self.batches, self.ctx = model, stepper, batches, ctx
        self.optimization: Optimization = stepper.opt
        self.start, self.max_iter, self.hooks = start, max_iter, hooks
        self.iteration = start
        self.result: Optional[StepResult] = None
        self.data_time = 0.0
        self.finished = False
        self.signals: Optional[StopSignals] = None
        self.bar = bar  # the run's progress bar (disabled on ranks other than 0); closed when the run ends

    @property
    def done(self) -> int:
        """Iterations completed once this step is: what metrics and checkpoints are numbered by."""
        return self.iteration + 1

    def say(self, message: str) -> None:
        """A line for the user above the progress bar (rank 0 only)."""
        if self.ctx.is_main:
            self.bar.write(message)

    def train(self) -> None:
        """The run: raises what a hook raises (TrainingError, TrainingInterrupted) after the step, and the
        DatasetError of a batch that could not be loaded (after ``on_data_error``)."""
        self.stepper.net.train()
        for hook in self.hooks:
            hook.before_train(self)
        try:
            with StopSignals(announce=self.ctx.is_main) as signals:
                self.signals = signals
                try:
                    for it in range(self.start, self.max_iter):
                        self.iteration = it
                        for hook in self.hooks:
                            hook.before_step(self)
                        self.run_step()
                        for hook in self.hooks:
                            (hook.after_failed_step if self.result.failed else hook.after_step)(self)
                    self.finished = True
                finally:
                    # in reverse: a hook's services (the metrics storage) outlast the hooks listed after it
                    for hook in reversed(self.hooks):
                        hook.after_train(self)
        finally:
            stop_workers(self.batches)
            self.bar.close()

    def run_step(self) -> None:
        """This iteration's batch, on the device, through one step (``trainer.result``)."""
        loading = time.perf_counter()
        try:
            batch = next(self.batches)
        except DatasetError as error:
            for hook in self.hooks:
                hook.on_data_error(self, error)
            raise
        images, targets = to_device(*batch, self.ctx.device)
        self.data_time = time.perf_counter() - loading
        self.result = self.stepper(images, targets, stop_requested=self.signals.received is not None)
        self.bar.update(1)
