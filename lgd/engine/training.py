"""A training run: ``train(cfg)`` builds it from the config (datasets, model, optimizers, resumed state, hooks),
lets the ``Trainer`` (lgd/train_loop.py) run the iterations, and ends it with ``model_final.pth``, an evaluation
on val, the curves and ``eval_val.txt``.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lgd.config import Config, save_config
from lgd.data import CocoDetection, build_train_loader
from lgd.data.build import build_dataset, split_paths
from lgd.data.loader import stop_workers
from lgd.data.overlap import shared_images
from lgd.engine.checkpoint import CHECKPOINT, Checkpointer, load_resume_checkpoint, restore_rng_state
from lgd.engine.events import MetricsLog, truncate_metrics
from lgd.engine.hooks import MetricsWriter, ModelSchedule, NanPolicy, PeriodicCheckpoint, PeriodicEval, StopOnSignal
from lgd.engine.loss_monitor import DegenerateLossMonitor
from lgd.engine.output_dir import check_free_space, checkpoint_bytes, prepare_output_dir
from lgd.engine.signals import ignore_stop_signals
from lgd.engine.solver import Optimization, build_optimization
from lgd.engine.step import Stepper
from lgd.engine.trainer import Trainer
from lgd.errors import ConfigError
from lgd.evaluation import EvalResult, check_categories, dataset_categories
from lgd.evaluation.evaluator import evaluate
from lgd.methods.build import build_model
from lgd.methods.trainable import Trainable
from lgd.summary import training_summary
from lgd.utils import distributed
from lgd.utils.distributed import Context
from lgd.utils.env import resolve_device, seed_everything


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (LGD or baseline) as the config says; returns the final metrics on the val split.

    Launched by torchrun, every process runs this with the same config and they train one model together
    (lgd/utils/distributed.py); only rank 0 writes files, and only its return value carries the ``result``.

    Raises:
        TrainingError: ``output_dir`` is not writable, or already holds a run and ``resume`` is false; a loss or
            gradient stopped being finite (``solver.nan_policy=stop``).
        LGDError: ``resume`` without a checkpoint, or with a config that differs from the checkpoint's.
    """
    ctx = distributed.init(resolve_device(cfg.device))
    try:
        return _train(cfg, ctx, resume, progress)
    finally:
        distributed.cleanup(ctx)


def _train(cfg: Config, ctx: Context, resume: bool, progress: bool) -> dict[str, Any]:
    """``train`` in this process; the order of the steps up to the data loader is that of the random streams."""
    out = Path(cfg.output_dir)
    with _removed_if_refused(out, ctx):
        train_set, val_set = _prepare(cfg, ctx, out, resume, progress)
        check_categories(dataset_categories(train_set), val_set, "val", f"training split {train_set.ann_file}")
        model = build_model(cfg, train_set.num_classes)
        if cfg.model.sync_bn and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(ctx.device)
        optimization = build_optimization(model.optimizer_groups(), cfg.solver)
        distributed.share_from_main(ctx, lambda: check_free_space(out, 2 * checkpoint_bytes(model, optimization)))
        ckpt = _resume(cfg, ctx, out, model, optimization) if resume else None
    start = ckpt["iteration"] if ckpt is not None else 0
    if ctx.is_main:
        _start_records(cfg, out, resume, start)
        print(training_summary(cfg, ctx, train_set, val_set, model, start), flush=True)
    stepper = Stepper(_parallel(model, cfg, ctx, start), optimization, ctx, cfg.solver)
    if ckpt is not None and "scaler" in ckpt and stepper.scaler.is_enabled():
        stepper.scaler.load_state_dict(ckpt["scaler"])
    batches = _train_batches(cfg, ctx, train_set, start)
    if ckpt is not None:  # after the loader is made, which draws a seed from torch's generator
        restore_rng_state(ckpt["rng"], ctx)
    # TensorBoard drops what the interrupted run logged after the checkpoint, as metrics.jsonl does: the checkpoint's
    # own iteration stays (its evaluation ran before it was saved) unless the run had finished and repeats it.
    purge = (start if start >= cfg.solver.max_iter else start + 1) if resume else None
    log = MetricsLog(out, purge_step=purge) if ctx.is_main else None
    checkpointer = Checkpointer(out, model, optimization, stepper.scaler, cfg, ctx, dataset_categories(train_set))
    evaluate_val = functools.partial(evaluate, model, val_set, cfg, ctx.device, progress=progress, ctx=ctx)
    evaluate_teacher = functools.partial(evaluate_val, teacher=True) if model.has_teacher and cfg.lgd.eval_teacher \
        else None
    validation = PeriodicEval(evaluate_val, log, cfg.eval_period, evaluate_teacher)
    hooks = [ModelSchedule(), NanPolicy(cfg.solver.nan_policy, checkpointer, log),
             MetricsWriter(log, cfg.log_period, DegenerateLossMonitor(cfg.model.arch)), validation,
             StopOnSignal(checkpointer), PeriodicCheckpoint(checkpointer, cfg.checkpoint_period)]
    trainer = Trainer(model, stepper, batches, ctx, start, cfg.solver.max_iter, hooks, progress)
    try:
        trainer.run()
        checkpointer.save_final(cfg.solver.max_iter)
        result = validation.run(cfg.solver.max_iter, trainer.say, "eval (val)", out / "detections_val.json")
    finally:
        stop_workers(batches)
        trainer.bar.close()
        if log is not None:
            log.close()
    return _report(ctx, out, result)


def _check_runtime(cfg: Config, ctx: Context) -> None:
    """Settings this machine or launch cannot honour, found before any work starts."""
    if cfg.solver.amp == "fp16" and ctx.device.type != "cuda":
        raise ConfigError("solver.amp=fp16 needs CUDA; on CPU use solver.amp=bf16 or none")
    if cfg.model.sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise ConfigError("model.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation); set "
                          "model.sync_bn=false or use model.norm=gn")
    distributed.per_rank_batch(cfg.data.batch_size, ctx.world_size, cfg.solver.accumulate)


@contextmanager
def _removed_if_refused(out: Path, ctx: Context) -> Iterator[None]:
    """A run refused before it wrote anything (bad data, settings, weights) leaves no empty output folder behind:
    the folder this run created is removed again if it is still empty."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and ctx.is_main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _prepare(cfg: Config, ctx: Context, out: Path, resume: bool,
             progress: bool) -> tuple[CocoDetection, CocoDetection]:
    """The checks made before any work (settings, output folder), threads and seeds; the train and val sets."""
    _check_runtime(cfg, ctx)
    distributed.share_from_main(ctx, lambda: prepare_output_dir(out, resume))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    # Rank 0 generates the built-in dataset (if used) before the others look for it.
    distributed.share_from_main(ctx, lambda: [split_paths(cfg, s, progress) for s in ("train", "val")])
    train_set = build_dataset(cfg, "train", train=True)
    train_set.check_trainable()
    val_set = build_dataset(cfg, "val", train=False)
    shared = shared_images(train_set, val_set) if ctx.is_main else None
    if shared:
        warnings.warn(shared, stacklevel=2)
    return train_set, val_set


def _resume(cfg: Config, ctx: Context, out: Path, model: Trainable, optimization: Optimization) -> dict[str, Any]:
    """``last.pth``'s model and optimization state loaded; returns the checkpoint (iteration, RNG, scaler)."""
    # Rank 0 reads the checkpoint and hands it to the others: other nodes need not see output_dir.
    ckpt = distributed.share_from_main(ctx, lambda: load_resume_checkpoint(out / CHECKPOINT, cfg))
    model.load_state_dict(ckpt["model"])
    optimization.load_state_dict(ckpt["optimisation"])
    return ckpt


def _start_records(cfg: Config, out: Path, resume: bool, start: int) -> None:
    """metrics.jsonl continued after iteration ``start`` on resume, else begun afresh; config.yaml written."""
    if resume:
        truncate_metrics(out / "metrics.jsonl", start, final=start >= cfg.solver.max_iter)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")


def _parallel(model: Trainable, cfg: Config, ctx: Context, start: int) -> nn.Module:
    """The model under DistributedDataParallel when torchrun launched several processes, else itself."""
    if not ctx.distributed:
        return model
    unused = model.may_leave_parameters_unused(start, images_may_lack_objects=not cfg.data.filter_empty)
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def _train_batches(cfg: Config, ctx: Context, train_set: CocoDetection, start: int) -> Iterator:
    """This rank's share of each global batch of the single-process stream, resumed at batch ``start``: the
    same data order whatever the number of processes and workers."""
    return iter(build_train_loader(
        train_set, cfg.data.batch_size, cfg.seed, cfg.data.workers, cfg.data.aspect_ratio_grouping, start,
        ctx.rank, ctx.world_size, pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_stop_signals,
    ))


def _report(ctx: Context, out: Path, result: Optional[EvalResult]) -> dict[str, Any]:
    """Every rank returns rank 0's final metrics; rank 0 also draws the curves and writes eval_val.txt."""
    final = distributed.broadcast(ctx, result.metrics if result is not None else None)
    if not ctx.is_main:
        return {"metrics": final, "result": None}
    from lgd.plots import plot_metrics  # matplotlib, only where a run ends

    plot_metrics(out / "metrics.jsonl", out)
    # every iou type evaluated (bbox; segm too for Mask R-CNN), each with its per-class table
    (out / "eval_val.txt").write_text("\n".join(
        f"{result.name} evaluation on val — {t}\n{text}\n{result.table(t)}\n" for t, text in result.summary.items()
    ))
    return {"metrics": final, "result": result}
