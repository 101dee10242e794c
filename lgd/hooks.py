"""The training loop's hooks, one per concern, and the stop signals.

The ``Trainer`` (lgd/train_loop.py) calls every hook around every step, on every rank, in the order given:
``ModelSchedule`` (the model's windows), ``NanPolicy`` (a non-finite step: stop or skip), ``MetricsWriter``,
``PeriodicEval``, ``StopOnSignal`` (SIGINT/SIGTERM: checkpoint and stop), ``PeriodicCheckpoint``. A hook that takes
part in a collective (averaged metrics, evaluation, checkpoints) does so on all ranks; only rank 0 writes or prints.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lgd import distributed
from lgd.checkpoint import Checkpointer
from lgd.errors import TrainingError
from lgd.evaluation import EvalResult
from lgd.events import MetricsLog

if TYPE_CHECKING:  # the trainer imports the hooks
    from lgd.train_loop import Trainer


class Hook:
    """One concern of the training loop; each method is called for every hook, in order, and does nothing here."""

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


class ModelSchedule(Hook):
    """The model's schedule windows follow the iteration (LGD: distillation windows, frozen backbone)."""

    def before_step(self, trainer: Trainer) -> None:
        trainer.model.set_iteration(trainer.iteration)


class NanPolicy(Hook):
    """A non-finite loss or gradient (``solver.nan_policy``): ``stop`` writes ``nan_debug_NNNNNNN.pth`` (the
    state before the step, with every rank's loss values) and raises TrainingError; ``skip`` logs the step as
    skipped and moves the schedule on."""

    def __init__(self, policy: str, checkpointer: Checkpointer, log: Optional[MetricsLog]) -> None:
        self.policy = policy
        self.checkpointer = checkpointer
        self.log = log

    def after_failed_step(self, trainer: Trainer) -> None:
        step, it = trainer.result, trainer.iteration
        message = step.problem(it)
        if self.policy == "skip":
            trainer.optimization.advance()
            if self.log is not None:
                self.log.skip(trainer.done, step.bad_terms, step.bad_gradients, step.image_ids)
                trainer.say(f"lgd: {message} Step skipped (solver.nan_policy=skip).")
            return
        debug = self.checkpointer.save_debug(it, step.bad_values, step.image_ids)
        raise TrainingError(
            f"{message} Training stopped so that nothing trains on NaN; lower solver.base_lr, raise "
            "solver.warmup_iters or check these images' annotations (solver.nan_policy=skip skips such "
            f"steps instead). The state before this step and its loss values are in {debug}; the last "
            "checkpoint is intact; resume with --resume."
        )


class MetricsWriter(Hook):
    """Every ``period`` iterations and at the last: the loss terms averaged over ranks, the total loss, the
    learning rates and the seconds per iteration, to metrics.jsonl / TensorBoard and the progress bar."""

    def __init__(self, log: Optional[MetricsLog], period: int) -> None:
        self.log = log
        self.period = period
        self.last = time.perf_counter()

    def before_train(self, trainer: Trainer) -> None:
        self.last = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        done, step = trainer.done, trainer.result
        if done % self.period and done != trainer.max_iter:
            return
        values = distributed.mean_over_ranks(trainer.ctx, {k: float(v) for k, v in step.losses.items()})
        if self.log is not None:
            now = time.perf_counter()
            lrs = trainer.optimization.lrs()
            self.log.train(done, values, float(step.total), lrs, (now - self.last) / self.period)
            self.last = now
            trainer.bar.set_postfix(loss=f"{float(step.total):.3f}", lr=f"{lrs[0]:.2g}")


class PeriodicEval(Hook):
    """Every ``period`` iterations (0: never) before the last: ``evaluate(desc)`` on val, logged and printed.
    The last iteration's evaluation is the run's final one (lgd/train_loop.py)."""

    def __init__(self, evaluate: Callable[..., Optional[EvalResult]], log: Optional[MetricsLog], period: int) -> None:
        self.evaluate = evaluate
        self.log = log
        self.period = period

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.done
        if not self.period or done % self.period or done >= trainer.max_iter:
            return
        result = self.evaluate(desc=f"eval@{done}")
        if self.log is not None:
            self.log.eval(done, "val", result.metrics)
            trainer.say(f"iter {done}: val {result.headline} {result.metrics[result.headline]:.2f}")


class StopOnSignal(Hook):
    """After a step during which some rank received SIGINT/SIGTERM: a checkpoint, then TrainingInterrupted."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.done
        if trainer.result.stop and done < trainer.max_iter:
            signum = trainer.signals.received or signal.SIGTERM  # none here: another rank's, reported as SIGTERM
            raise TrainingInterrupted(signum, done, self.checkpointer.save(done), trainer.ctx.is_main)


class PeriodicCheckpoint(Hook):
    """A checkpoint every ``period`` iterations and after the last one."""

    def __init__(self, checkpointer: Checkpointer, period: int) -> None:
        self.checkpointer = checkpointer
        self.period = period

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.done
        if done % self.period == 0 and done < trainer.max_iter:
            self.checkpointer.save(done)

    def after_train(self, trainer: Trainer) -> None:
        self.checkpointer.save(trainer.max_iter)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after the step in progress, and a checkpoint was written.

    ``exit_code`` is the shell's convention for death by that signal (130 for SIGINT, 143 for SIGTERM), so a
    job scheduler sees that the run did not finish; ``--resume`` continues it exactly.
    """

    def __init__(self, signum: int, iteration: int, checkpoint: Path, is_main: bool = True) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after iteration {iteration} and wrote {checkpoint}; "
                         "continue with the same command and --resume")
        self.exit_code = 128 + signum
        self.is_main = is_main  # every torchrun process stops alike; rank 0 alone need say so


class StopSignals:
    """While active, the first SIGINT or SIGTERM only asks training to stop after the step in progress
    (a checkpoint follows); a second one interrupts at once (KeyboardInterrupt), as without this."""

    def __init__(self, announce: bool) -> None:
        self.received: Optional[int] = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to it only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        if self.announce:
            print(f"\nlgd: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loading workers leave SIGINT/SIGTERM to the main process: a terminal's Ctrl-C reaches the whole
    process group (as does a scheduler's or ``pkill``'s SIGTERM), and a worker dying of it would break the step
    the main process is finishing. So nothing can leave them behind at exit, train() stops them itself
    (``stop_workers``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
