"""The training loop's hooks, one per concern.

The ``Trainer`` (lgd/train_loop.py) calls every hook around every step, on every rank, in the order that
lgd/training.py gives: ``ModelSchedule`` (the model's windows), ``NanPolicy`` (a non-finite step: stop or skip),
``MetricsWriter``, ``PeriodicEval``, ``StopOnSignal`` (SIGINT/SIGTERM: checkpoint and stop), ``PeriodicCheckpoint``.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable, Optional

from lgd.engine.checkpoint import Checkpointer
from lgd.engine.events import MetricsLog
from lgd.engine.loss_monitor import DegenerateLossMonitor
from lgd.engine.signals import TrainingInterrupted
from lgd.engine.trainer import Hook, Trainer
from lgd.errors import TrainingError
from lgd.evaluation import EvalResult, teacher_ahead
from lgd.utils import distributed


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
    learning rates and the seconds per iteration (mean over the steps since the last record, evaluations and
    checkpoints left out), to metrics.jsonl / TensorBoard and the progress bar — or, without
    a progress bar (``--no-progress``, a log file), as a printed line every ``5 * period`` iterations. The same
    values go to ``monitor``, whose warnings (a loss term stuck at a degenerate value) are printed."""

    def __init__(self, log: Optional[MetricsLog], period: int, monitor: Optional[DegenerateLossMonitor] = None) -> None:
        self.log = log
        self.period = period
        self.monitor = monitor
        self.started = time.perf_counter()
        self.busy, self.steps = 0.0, 0

    def before_step(self, trainer: Trainer) -> None:
        self.started = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        # seconds per iteration: batch loading and the step, not the evaluations and checkpoints between steps
        self.busy += time.perf_counter() - self.started
        self.steps += 1
        done, step = trainer.done, trainer.result
        if done % self.period and done != trainer.max_iter:
            return
        values = distributed.mean_over_ranks(trainer.ctx, {k: float(v) for k, v in step.losses.items()})
        if self.log is not None:
            lrs = trainer.optimization.lrs()
            seconds_per_iter = self.busy / self.steps
            self.busy, self.steps = 0.0, 0
            self.log.train(done, values, float(step.total), lrs, seconds_per_iter)
            trainer.bar.set_postfix(loss=f"{float(step.total):.3f}", lr=f"{lrs[0]:.2g}")
            if trainer.bar.disable and (done % (5 * self.period) == 0 or done == trainer.max_iter):
                trainer.say(f"iter {done}/{trainer.max_iter}: loss {float(step.total):.3f}, lr {lrs[0]:.3g}, "
                            f"{seconds_per_iter:.2f} s/iter")
        if self.monitor is not None:
            for message in self.monitor.update(done, values):
                trainer.say(f"lgd: warning: {message}")


class PeriodicEval(Hook):
    """Every ``period`` iterations (0: never) before the last: ``evaluate(desc=...)`` on val, logged and printed;
    with ``evaluate_teacher`` (``lgd.eval_teacher``) the teacher diagnostic too, logged as split ``val_teacher``
    and printed beside the student's AP, as the reference's EVAL_TEACHER does. The run's final evaluation calls
    :meth:`run` itself (lgd/training.py)."""

    def __init__(self, evaluate: Callable[..., Optional[EvalResult]], log: Optional[MetricsLog], period: int,
                 evaluate_teacher: Optional[Callable[..., Optional[EvalResult]]] = None) -> None:
        self.evaluate = evaluate
        self.evaluate_teacher = evaluate_teacher
        self.log = log
        self.period = period

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.done
        if not self.period or done % self.period or done >= trainer.max_iter:
            return
        self.run(done, trainer.say, desc=f"eval@{done}")

    def run(self, done: int, say: Callable[[str], None], desc: str,
            out_file: Optional[Path] = None) -> Optional[EvalResult]:
        """Evaluate after ``done`` iterations; returns the student's result (None on ranks other than 0)."""
        result = self.evaluate(desc=desc, out_file=out_file)
        teacher = self.evaluate_teacher(desc=f"{desc} teacher") if self.evaluate_teacher is not None else None
        if self.log is not None:
            self.log.eval(done, "val", result.metrics)
            student_ap = result.metrics[result.headline]
            line = f"iter {done}: val {result.headline} {student_ap:.2f} %"
            if teacher is not None:
                self.log.eval(done, "val_teacher", teacher.metrics)
                teacher_ap = teacher.metrics[teacher.headline]
                verdict = "above the student: it has something to teach" if teacher_ahead(student_ap, teacher_ap) else \
                    "not above the student: a warning, not proof that distilling cannot help"
                line += f"; teacher diagnostic {teacher_ap:.2f} % ({verdict})"
            say(line)
        return result


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
