"""The training loop: a small ``Trainer`` runs iterations, and ``Hook``s do everything periodic around them.

Each iteration is the hooks' ``before_step``, one step (lgd/step.py), then the hooks' ``after_step``; the hooks
themselves (the model's schedule windows, NaN policy, metrics, evaluation, stop signals, checkpoints) are in
lgd/hooks.py, and lgd/training.py assembles a run. The model is a ``Trainable`` (lgd/methods/trainable.py) — LGD, or the
Baseline — so the loop never asks which it trains.
"""
from __future__ import annotations

from typing import Iterator, Optional

from tqdm import tqdm

from lgd.data.build import to_device
from lgd.engine.signals import StopSignals
from lgd.engine.solver import Optimization
from lgd.engine.step import StepResult, Stepper
from lgd.methods.trainable import Trainable
from lgd.utils.distributed import Context


class Hook:
    """One concern of the training loop; each method is called for every hook, in order, and does nothing here.

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

    def after_train(self, trainer: Trainer) -> None:
        """After the last iteration, still under ``StopSignals``."""


class Trainer:
    """Runs iterations ``start`` .. ``max_iter - 1``: the hooks' ``before_step``, one step, then their
    ``after_step`` — or ``after_failed_step`` for a step whose loss or gradient was not finite (it changed nothing).

    Hooks read the trainer: ``iteration`` (0-based), ``done`` (iterations completed with this step), ``result``
    (the step's ``StepResult``), ``model``, ``optimization``, ``ctx``, ``signals``, ``bar`` and ``say``.
    """

    def __init__(self, model: Trainable, stepper: Stepper, batches: Iterator, ctx: Context, start: int,
                 max_iter: int, hooks: list[Hook], progress: bool) -> None:
        self.model, self.stepper, self.batches, self.ctx = model, stepper, batches, ctx
        self.optimization: Optimization = stepper.opt
        self.start, self.max_iter, self.hooks = start, max_iter, hooks
        self.iteration = start
        self.result: Optional[StepResult] = None
        self.signals: Optional[StopSignals] = None
        self.bar = tqdm(total=max_iter, initial=start, desc="train", disable=not (progress and ctx.is_main),
                        dynamic_ncols=True)

    @property
    def done(self) -> int:
        """Iterations completed once this step is: what metrics and checkpoints are numbered by."""
        return self.iteration + 1

    def say(self, message: str) -> None:
        """A line for the user above the progress bar (rank 0 only)."""
        if self.ctx.is_main:
            self.bar.write(message)

    def run(self) -> None:
        """Every iteration; raises what a hook raises (TrainingError, TrainingInterrupted) after the step."""
        self.stepper.net.train()
        for hook in self.hooks:
            hook.before_train(self)
        with StopSignals(announce=self.ctx.is_main) as signals:
            self.signals = signals
            for it in range(self.start, self.max_iter):
                self.iteration = it
                for hook in self.hooks:
                    hook.before_step(self)
                images, targets = to_device(*next(self.batches), self.ctx.device)
                self.result = self.stepper(images, targets, stop_requested=signals.received is not None)
                self.bar.update(1)
                for hook in self.hooks:
                    (hook.after_failed_step if self.result.failed else hook.after_step)(self)
            for hook in self.hooks:
                hook.after_train(self)
        self.bar.close()
