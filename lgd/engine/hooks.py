"""A run's hooks, one per concern, and ``build_hooks``: the list a run is made of, which callers may extend.

The ``Trainer`` (lgd/engine/trainer.py) calls every hook around every step, on every rank, in the list's order (and
``after_train`` in reverse): ``ModelSchedule`` (the model's windows), ``NanPolicy`` (a non-finite step: stop or
skip), ``LRScheduler`` (the schedule moves one iteration on), ``MetricsWriter`` (train records to the storage),
``EvalHook`` (periodic and final evaluation), ``StopOnSignal`` (SIGINT/SIGTERM: checkpoint and stop),
``CheckpointHook`` (resume, periodic and final checkpoints), ``CheckpointOnDataError`` (an image that cannot be
loaded: a checkpoint, then the error).
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from lgd.config import Config, distill_method
from lgd.engine.checkpoint import Checkpointer
from lgd.engine.events import EventStorage
from lgd.engine.loss_monitor import DegenerateLossMonitor, DivergenceMonitor
from lgd.engine.signals import TrainingInterrupted
from lgd.engine.trainer import Hook, Trainer
from lgd.errors import DatasetError, TrainingError, user_message
from lgd.evaluation import EvalResult, teacher_ahead
from lgd.utils import distributed

Evaluate = Callable[..., Optional[EvalResult]]


class ModelSchedule(Hook):
    """The model's schedule windows follow the iteration (LGD: distillation windows, frozen backbone)."""

    def before_step(self, trainer: Trainer) -> None:
        trainer.model.set_iteration(trainer.iteration)


class NanPolicy(Hook):
    """A non-finite loss or gradient (``solver.nan_policy``): ``stop`` writes ``nan_debug_NNNNNNN.pth`` (the
    state before the step, with every rank's loss values) and raises TrainingError; ``skip`` records the step as
    skipped (the schedule moves on all the same: ``LRScheduler``)."""

    def __init__(self, policy: str, checkpointer: Checkpointer, storage: Optional[EventStorage]) -> None:
        self.policy = policy
        self.checkpointer = checkpointer
        self.storage = storage

    def after_failed_step(self, trainer: Trainer) -> None:
        step, it = trainer.result, trainer.iteration
        message = step.problem(it)
        if self.policy == "skip":
            if self.storage is not None:
                self.storage.put("skip", trainer.done, terms=step.bad_terms, gradients=step.bad_gradients,
                                 image_ids=step.image_ids)
                trainer.say(f"lgd: {message} Step skipped (solver.nan_policy=skip).")
            return
        debug = self.checkpointer.save_debug(it, step.bad_values, step.image_ids)
        raise TrainingError(
            f"{message} Training stopped so that nothing trains on NaN; lower solver.base_lr, raise "
            "solver.warmup_iters or check these images' annotations (solver.nan_policy=skip skips such "
            f"steps instead). The state before this step and its loss values are in {debug}; the last "
            "checkpoint is intact; resume with --resume."
        )


class LRScheduler(Hook):
    """The learning-rate schedules move one iteration on after every step, also a skipped one: the rate is a
    function of the iteration (``lr_factor``). Listed before ``MetricsWriter``, which records the rate that the
    next step will use, as the schedule has always been logged."""

    def after_step(self, trainer: Trainer) -> None:
        trainer.optimization.advance()

    def after_failed_step(self, trainer: Trainer) -> None:
        trainer.optimization.advance()


class MetricsWriter(Hook):
    """Every ``period`` iterations and at the last, a train record: the loss terms averaged over ranks, the total
    loss, the learning rates and the seconds per iteration (mean over the steps since the last record,
    evaluations and checkpoints left out), with the seconds of those spent loading data beside it. The same
    values go to each of ``monitors``, whose warnings (a loss term stuck at a degenerate value, a diverging loss)
    are printed. The storage is closed at the end of the run, after every later hook's last record."""

    def __init__(self, storage: Optional[EventStorage], period: int,
                 monitors: Sequence[Union[DegenerateLossMonitor, DivergenceMonitor]] = ()) -> None:
        self.storage = storage
        self.period = period
        self.monitors = monitors
        self.started = time.perf_counter()
        self.busy, self.loading, self.steps = 0.0, 0.0, 0

    def before_step(self, trainer: Trainer) -> None:
        self.started = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        # seconds per iteration: batch loading and the step, not the evaluations and checkpoints between steps
        self.busy += time.perf_counter() - self.started
        self.loading += trainer.data_time
        self.steps += 1
        done, step = trainer.done, trainer.result
        if done % self.period and done != trainer.max_iter:
            return
        values = distributed.mean_over_ranks(trainer.ctx, {k: float(v) for k, v in step.losses.items()})
        if self.storage is not None:
            lrs = trainer.optimization.lrs()
            teacher: dict[str, Any] = {"teacher_lr": lrs[1]} if len(lrs) > 1 else {}
            self.storage.put("train", done, extra={"data_time": self.loading / self.steps},
                             total_loss=float(step.total), losses=values, lr=lrs[0], time=self.busy / self.steps,
                             **teacher)
            self.busy, self.loading, self.steps = 0.0, 0.0, 0
        for monitor in self.monitors:
            for message in monitor.update(done, values):
                trainer.say(f"lgd: warning: {message}")

    def after_train(self, trainer: Trainer) -> None:
        if self.storage is not None:
            self.storage.close()


class EvalHook(Hook):
    """``evaluate(desc=...)`` on val every ``period`` iterations (0: never) before the last, and after the last
    (writing ``out_file``): recorded and printed; with ``evaluate_teacher`` (``lgd.eval_teacher``) the teacher
    diagnostic too, recorded as split ``val_teacher`` and printed beside the student's AP, as the reference's
    EVAL_TEACHER does. ``final`` is the last evaluation's result (None on ranks other than 0)."""

    def __init__(self, evaluate: Evaluate, storage: Optional[EventStorage], period: int, out_file: Path,
                 evaluate_teacher: Optional[Evaluate] = None) -> None:
        self.evaluate = evaluate
        self.evaluate_teacher = evaluate_teacher
        self.storage = storage
        self.period = period
        self.out_file = out_file
        self.final: Optional[EvalResult] = None

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.done
        if not self.period or done % self.period or done >= trainer.max_iter:
            return
        self._run(done, trainer.say, desc=f"eval@{done}")

    def after_train(self, trainer: Trainer) -> None:
        if trainer.finished:
            self.final = self._run(trainer.max_iter, trainer.say, "eval (val)", self.out_file)

    def _run(self, done: int, say: Callable[[str], None], desc: str,
             out_file: Optional[Path] = None) -> Optional[EvalResult]:
        """Evaluate after ``done`` iterations; returns the student's result (None on ranks other than 0)."""
        result = self.evaluate(desc=desc, out_file=out_file)
        teacher = self.evaluate_teacher(desc=f"{desc} teacher") if self.evaluate_teacher is not None else None
        if self.storage is not None:
            self.storage.put("eval", done, split="val", metrics=result.metrics)
            student_ap = result.metrics[result.headline]
            line = f"iter {done}: val {result.headline} {student_ap:.2f} %"
            if teacher is not None:
                self.storage.put("eval", done, split="val_teacher", metrics=teacher.metrics)
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


class CheckpointHook(Hook):
    """The run's checkpoints: with ``resume`` (``last.pth`` as read) its state restored before the first step, a
    checkpoint every ``period`` iterations, and after the last iteration the last numbered checkpoint and
    ``model_final.pth``."""

    def __init__(self, checkpointer: Checkpointer, period: int, resume: Optional[dict[str, Any]] = None) -> None:
        self.checkpointer = checkpointer
        self.period = period
        self.resume = resume

    def before_train(self, trainer: Trainer) -> None:
        if self.resume is not None:
            self.checkpointer.resume(self.resume)

    def after_step(self, trainer: Trainer) -> None:
        done = trainer.done
        if done % self.period == 0 and done < trainer.max_iter:
            self.checkpointer.save(done)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.finished:
            self.checkpointer.save(trainer.max_iter)
            self.checkpointer.save_final(trainer.max_iter)


class CheckpointOnDataError(Hook):
    """A checkpoint before a batch that cannot be loaded stops the run (issue 26): what trained since the last
    periodic checkpoint is kept, and once the file is fixed, ``--resume`` reads the same batch again and continues
    exactly. The error is raised again with the checkpoint named.

    A single process only: under torchrun the other processes are already in the next step's collectives, which
    a checkpoint (itself collective) would block; there the last periodic checkpoint is what resumes.
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def on_data_error(self, trainer: Trainer, error: DatasetError) -> None:
        done = trainer.iteration  # steps completed; the failed batch is that of iteration ``done`` (0-based)
        error = user_message(error)  # without the DataLoader worker's traceback
        if trainer.ctx.distributed:
            raise DatasetError(f"{error}. Stopped before iteration {done + 1}; fix or replace the file and resume "
                               f"from the last periodic checkpoint with the same command and --resume") from None
        if done == trainer.start:
            raise DatasetError(f"{error}. Stopped before iteration {done + 1}, with nothing trained since "
                               f"{'the last checkpoint' if done else 'the start'}; fix or replace the file and run "
                               f"the same command{' with --resume' if done else ''}") from None
        path = self.checkpointer.save(done)
        raise DatasetError(f"{error}. Stopped before iteration {done + 1} and wrote {path}; fix or replace the "
                           f"file and continue with the same command and --resume") from None


def frozen_body_iters(cfg: Config) -> int:
    """The iterations an LGD run keeps the backbone body frozen (``lgd.freeze_backbone_iters``); 0 for other methods."""
    return cfg.lgd.freeze_backbone_iters if distill_method(cfg) == "lgd" else 0


def build_hooks(cfg: Config, checkpointer: Checkpointer, storage: Optional[EventStorage], evaluation: EvalHook,
                resume: Optional[dict[str, Any]] = None) -> list[Hook]:
    """A training run's hooks, in their order (see the module's docstring); ``resume``: the checkpoint the run
    continues (``last.pth`` as read). A caller adds its own after them (``train(..., extra_hooks=...)``)."""
    return [ModelSchedule(), NanPolicy(cfg.solver.nan_policy, checkpointer, storage), LRScheduler(),
            MetricsWriter(storage, cfg.log_period, [DegenerateLossMonitor(cfg.model.arch),
                                                    DivergenceMonitor(frozen_body_iters=frozen_body_iters(cfg),
                                                                      stop=cfg.solver.divergence_policy == "stop")]),
            evaluation, StopOnSignal(checkpointer), CheckpointHook(checkpointer, cfg.checkpoint_period, resume),
            CheckpointOnDataError(checkpointer)]
