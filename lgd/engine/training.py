"""A training run: ``train(cfg)`` builds it from the config (datasets, model, optimizers, the checkpoint it resumes,
the records, the hooks), lets the ``Trainer`` (lgd/engine/trainer.py) run it — its hooks resume it, and end it with
``model_final.pth`` and an evaluation on val — and reports it: the curves and ``eval_val.txt``.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lgd.config import Config, save_config
from lgd.data import CocoDetection, build_train_loader
from lgd.data.build import build_dataset, split_paths
from lgd.data.overlap import shared_images
from lgd.engine.checkpoint import CHECKPOINT, Checkpointer, load_resume_checkpoint
from lgd.engine.events import ConsoleWriter, EventStorage, JSONWriter, TensorboardWriter
from lgd.engine.hooks import EvalHook, build_hooks
from lgd.engine.output_dir import check_free_space, checkpoint_bytes, prepare_output_dir
from lgd.engine.signals import ignore_stop_signals
from lgd.engine.solver import build_optimization, linear_lr_scale
from lgd.engine.step import Stepper
from lgd.engine.summary import training_summary
from lgd.engine.trainer import Hook, Trainer
from lgd.errors import ConfigError
from lgd.evaluation import EvalResult, check_categories, dataset_categories
from lgd.evaluation.evaluator import evaluate
from lgd.methods.build import build_model
from lgd.methods.trainable import Trainable
from lgd.utils import distributed
from lgd.utils.distributed import Context
from lgd.utils.env import resolve_device, seed_everything


def train(cfg: Config, resume: bool = False, progress: bool = True, extra_hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train (LGD, FGFI or baseline) as the config says; returns the final metrics on the val split. ``extra_hooks``
    run after the run's own (``build_hooks``), around every step.

    Launched by torchrun, every process runs this with the same config and they train one model together
    (lgd/utils/distributed.py); only rank 0 writes files, and only its return value carries the ``result``.

    Raises:
        TrainingError: ``output_dir`` is not writable, or already holds a run and ``resume`` is false; a loss or
            gradient stopped being finite (``solver.nan_policy=stop``).
        LGDError: ``resume`` without a checkpoint, or with a config that differs from the checkpoint's.
    """
    ctx = distributed.init(resolve_device(cfg.device))
    try:
        return _train(cfg, ctx, resume, progress, extra_hooks)
    finally:
        distributed.cleanup(ctx)


def _train(cfg: Config, ctx: Context, resume: bool, progress: bool, extra_hooks: Sequence[Hook]) -> dict[str, Any]:
    """``train`` in this process; the order of the steps up to the data loader is that of the random streams."""
    out = Path(cfg.output_dir)
    with _removed_if_refused(out, ctx):
        train_set, val_set = _prepare(cfg, ctx, out, resume, progress)
        check_categories(dataset_categories(train_set), val_set, "val", f"training split {train_set.ann_file}")
        model = build_model(cfg, train_set.num_classes)
        if cfg.model.sync_bn and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(ctx.device)
        optimization = build_optimization(model.optimizer_groups(), cfg.solver,
                                          linear_lr_scale(cfg.data.batch_size, cfg.solver.reference_batch_size))
        distributed.share_from_main(ctx, lambda: check_free_space(out, 2 * checkpoint_bytes(model, optimization)))
        # Rank 0 reads the checkpoint and hands it to the others: other nodes need not see output_dir. Its state is
        # restored by CheckpointHook before the first step, once the data loader has drawn its seed.
        ckpt = distributed.share_from_main(ctx, lambda: load_resume_checkpoint(out / CHECKPOINT, cfg)) if resume \
            else None
    start = ckpt["iteration"] if ckpt is not None else 0
    bar = tqdm(total=cfg.solver.max_iter, initial=start, desc="train", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    storage = _storage(cfg, out, start if resume else None, bar) if ctx.is_main else None
    if ctx.is_main:
        save_config(cfg, out / "config.yaml")
        print(training_summary(cfg, ctx, train_set, val_set, model, start), flush=True)
    stepper = Stepper(_parallel(model, cfg, ctx, start), optimization, ctx, cfg.solver)
    batches = _train_batches(cfg, ctx, train_set, start)
    checkpointer = Checkpointer(out, model, optimization, stepper.scaler, cfg, ctx, dataset_categories(train_set))
    evaluate_val = functools.partial(evaluate, model, val_set, cfg, ctx.device, progress=progress, ctx=ctx)
    evaluate_teacher = functools.partial(evaluate_val, teacher=True) if model.has_teacher and cfg.lgd.eval_teacher \
        else None
    evaluation = EvalHook(evaluate_val, storage, cfg.eval_period, out / "detections_val.json", evaluate_teacher)
    hooks = build_hooks(cfg, checkpointer, storage, evaluation, ckpt) + list(extra_hooks)
    Trainer(model, stepper, batches, ctx, start, cfg.solver.max_iter, hooks, bar).train()
    return _report(ctx, out, evaluation.final)


def _storage(cfg: Config, out: Path, resumed_at: Optional[int], bar: tqdm) -> EventStorage:
    """Rank 0's records: metrics.jsonl, TensorBoard and the console; a resumed run's files go on after the
    checkpoint's iteration ``resumed_at``."""
    finished = resumed_at is not None and resumed_at >= cfg.solver.max_iter
    # TensorBoard drops what the interrupted run logged after the checkpoint, as metrics.jsonl does: the checkpoint's
    # own iteration stays (its evaluation ran before it was saved) unless the run had finished and repeats it.
    purge = None if resumed_at is None else resumed_at if finished else resumed_at + 1
    return EventStorage([JSONWriter(out / "metrics.jsonl", resumed_at, finished),
                         TensorboardWriter(out / "tensorboard", purge),
                         ConsoleWriter(bar, 5 * cfg.log_period, cfg.solver.max_iter)])


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
