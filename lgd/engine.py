"""Training and evaluation loops: optimisers and schedules, mixed precision and gradient accumulation,
data-parallel training (see lgd/distributed.py), checkpoints and exact resume, fault handling, logging,
evaluation."""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lgd import distributed
from lgd.builders import build_dataset, build_model, resolve_device, seed_everything, split_paths, to_device
from lgd.checkpoint import (CHECKPOINT, FINAL, atomic_save, check_free_space, checkpoint_bytes, load_resume_checkpoint,
                            prepare_output_dir, rng_state, save_checkpoint, set_rng_state)
from lgd.config import Config, SolverConfig, save_config, to_dict
from lgd.data import build_train_loader
from lgd.data.loader import stop_workers
from lgd.distributed import Context
from lgd.errors import ConfigError, TrainingError
from lgd.evaluation.evaluator import evaluate
from lgd.events import MetricsLog, truncate_metrics
from lgd.solver import Optimization, build_optimization

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loading workers leave SIGINT/SIGTERM to the main process: a terminal's Ctrl-C reaches the whole
    process group (as does a scheduler's or ``pkill``'s SIGTERM), and a worker dying of it would break the step
    the main process is finishing. So nothing can leave them behind at exit, train() stops them itself
    (``stop_workers``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass
class StepResult:
    """What one training step did, the same on every rank.

    ``losses`` are this rank's per-term means over its micro-batches and ``total`` the total loss averaged
    over all ranks (tensors, read only when logged). ``bad_terms`` (loss terms) or ``bad_gradients``
    (parameter names) is non-empty when some rank's loss, or the averaged gradient, was not finite, in which
    case no parameter or buffer changed. ``stop`` is set when some rank received SIGINT/SIGTERM.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    total: Optional[Tensor] = None
    bad_terms: list[str] = field(default_factory=list)
    bad_gradients: list[str] = field(default_factory=list)
    image_ids: list[Any] = field(default_factory=list)
    bad_values: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False

    @property
    def failed(self) -> bool:
        return bool(self.bad_terms or self.bad_gradients)

    def problem(self, it: int) -> str:
        """What went wrong, for the message and the log."""
        if self.bad_terms:
            return f"iteration {it}: non-finite loss terms {self.bad_terms} on images {self.image_ids}."
        names = self.bad_gradients[:5] + ([f"{len(self.bad_gradients) - 5} more"] if len(self.bad_gradients) > 5
                                          else [])
        return f"iteration {it}: non-finite gradients of {', '.join(names)} on images {self.image_ids} (finite losses)."


class Stepper:
    """One optimisation step: forward in micro-batches under autocast, a finiteness check agreed by all ranks,
    backward (gradients averaged over ranks by DDP on the last micro-batch), clipping, both optimisers' steps.

    ``solver.accumulate`` splits each rank's images into that many micro-batches whose loss, divided by their
    number, adds up to the mean over the rank's images: the step sees the same global batch with less memory.
    """

    def __init__(self, net: nn.Module, opt: Optimization, ctx: Context, solver: SolverConfig) -> None:
        self.net = net
        self.opt = opt
        self.ctx = ctx
        self.accumulate = solver.accumulate
        self.amp_dtype = AMP_DTYPES[solver.amp]
        # Only fp16 needs loss scaling: bf16 has float32's exponent range.
        enabled = solver.amp == "fp16"
        self.scaler = (torch.amp.GradScaler("cuda", enabled=enabled) if hasattr(torch.amp, "GradScaler")
                       else torch.cuda.amp.GradScaler(enabled=enabled))
        module = net.module if isinstance(net, DistributedDataParallel) else net
        # named as in the checkpoint's state (a Baseline's state is its detector's, without "student.")
        self.names = {id(p): name for name, p in module.state_dict(keep_vars=True).items()}

    def __call__(self, images: list[Tensor], targets: list[dict], stop_requested: bool) -> StepResult:
        self.opt.zero_grad()
        # The forward moves BatchNorm running statistics; a step found non-finite puts them back (they are small).
        buffers = [(b, b.detach().clone()) for b in self.net.buffers()]
        n = len(images) // self.accumulate
        sums: dict[str, Tensor] = {}
        total_mean: Optional[Tensor] = None
        stop = False
        for j in range(self.accumulate):
            imgs, tgts = images[j * n:(j + 1) * n], targets[j * n:(j + 1) * n]
            last = j == self.accumulate - 1
            # Gradients are averaged over ranks once per step, in the last micro-batch's backward.
            sync = contextlib.nullcontext() if last or not isinstance(self.net, DistributedDataParallel) \
                else self.net.no_sync()
            with sync:
                with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    losses = self.net(imgs, tgts)
                total = sum(losses.values())
                # One small collective per micro-batch: every rank learns whether any rank's loss is not finite
                # (and whether any was asked to stop), so all take the same branch and none waits forever.
                flags = distributed.all_reduce_sum(self.ctx, torch.stack(
                    [total.detach().float(), total.new_tensor(float(stop_requested), dtype=torch.float32)]))
                if not torch.isfinite(flags[0]):
                    return self._failed(losses, tgts, buffers)
                stop = stop or bool(flags[1] > 0)
                self.scaler.scale(total / self.accumulate).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / self.accumulate
            mean = flags[0] / (self.ctx.world_size * self.accumulate)
            total_mean = mean if total_mean is None else total_mean + mean
        # Gradients are the same on every rank now (averaged), so every rank finds the same bad ones.
        bad_params = self.opt.step(self.scaler)
        if bad_params:
            return self._failed(sums, targets, buffers, [self.names[id(p)] for p in bad_params])
        return StepResult(losses=sums, total=total_mean, stop=stop)

    def _failed(self, losses: dict[str, Tensor], targets: list[dict], buffers: list[tuple[Tensor, Tensor]],
                bad_gradients: Optional[list[str]] = None) -> StepResult:
        """Undo the step's effects (gradients, BatchNorm statistics) and report it, gathered from every rank."""
        self.opt.zero_grad()
        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)
        values = {k: float(v.detach()) for k, v in losses.items()}
        reports = distributed.all_gather_list(self.ctx, (values, [t.get("image_id") for t in targets]))
        bad = list(dict.fromkeys(k for vals, _ in reports for k, v in vals.items() if not math.isfinite(v)))
        ids = [i for _, image_ids in reports for i in image_ids]
        return StepResult(bad_terms=bad, bad_gradients=bad_gradients or [], image_ids=ids,
                          bad_values=[vals for vals, _ in reports])


def _check_runtime(cfg: Config, ctx: Context) -> None:
    """Settings this machine or launch cannot honour, found before any work starts."""
    if cfg.solver.amp == "fp16" and ctx.device.type != "cuda":
        raise ConfigError("solver.amp=fp16 needs CUDA; on CPU use solver.amp=bf16 or none")
    if cfg.model.sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise ConfigError("model.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation); set "
                          "model.sync_bn=false or use model.norm=gn")
    distributed.per_rank_batch(cfg.data.batch_size, ctx.world_size, cfg.solver.accumulate)


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (LGD or baseline) as the config says; returns the final metrics on the val split.

    Launched by torchrun, every process runs this with the same config and they train one model together
    (lgd/distributed.py); only rank 0 writes files, and only its return value carries the ``result``.
    """
    ctx = distributed.init(resolve_device(cfg.device))
    try:
        return _train(cfg, ctx, resume, progress)
    finally:
        distributed.cleanup(ctx)


def _train(cfg: Config, ctx: Context, resume: bool, progress: bool) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    device = ctx.device
    _check_runtime(cfg, ctx)
    distributed.share_from_main(ctx, lambda: prepare_output_dir(out))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    # Rank 0 generates the built-in dataset (if used) before the others look for it.
    distributed.share_from_main(ctx, lambda: [split_paths(cfg, s) for s in ("train", "val")])
    train_set = build_dataset(cfg, "train", train=True)
    val_set = build_dataset(cfg, "val", train=False)
    model = build_model(cfg, train_set.num_classes)
    if cfg.model.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    opt = build_optimization(model.optimizer_groups(), cfg.solver)
    distributed.share_from_main(ctx, lambda: check_free_space(out, 2 * checkpoint_bytes(model, opt)))

    start = 0
    ckpt = None
    if resume:
        # Rank 0 reads the checkpoint and hands it to the others: other nodes need not see output_dir.
        ckpt = distributed.share_from_main(ctx, lambda: load_resume_checkpoint(out / CHECKPOINT, cfg))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimisation"])
        start = ckpt["iteration"]
    if ctx.is_main:
        if resume:
            truncate_metrics(out / "metrics.jsonl", start)
        else:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        save_config(cfg, out / "config.yaml")

    net: nn.Module = model
    if ctx.distributed:
        unused = model.may_leave_parameters_unused(start, images_may_lack_objects=not cfg.data.filter_empty)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)
    stepper = Stepper(net, opt, ctx, cfg.solver)
    if ckpt is not None and "scaler" in ckpt and stepper.scaler.is_enabled():
        stepper.scaler.load_state_dict(ckpt["scaler"])

    # This rank's share of each global batch of the single-process stream, resumed at batch ``start``: the
    # same data order whatever the number of processes and workers.
    batches = iter(build_train_loader(
        train_set, cfg.data.batch_size, cfg.seed, cfg.data.workers, cfg.data.aspect_ratio_grouping, start,
        ctx.rank, ctx.world_size, pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals,
    ))
    if ckpt is not None:
        rng = ckpt["rng"]
        # One state per rank; a run resumed on another number of processes continues from rank 0's.
        set_rng_state(rng[ctx.rank] if isinstance(rng, list) and len(rng) == ctx.world_size
                      else rng[0] if isinstance(rng, list) else rng)
    log = MetricsLog(out, purge_step=start if resume else None) if ctx.is_main else None

    def checkpoint(it: int) -> Path:
        rngs = distributed.all_gather_list(ctx, rng_state())
        state = {"model": model.state_dict(), "optimisation": opt.state_dict(), "iteration": it, "rng": rngs,
                 "config": to_dict(cfg)}
        if stepper.scaler.is_enabled():
            state["scaler"] = stepper.scaler.state_dict()
        return distributed.share_from_main(ctx, lambda: save_checkpoint(state, out, it, cfg.keep_checkpoints))

    def debug_checkpoint(it: int, step: StepResult) -> Path:
        """The state before the failed step (no parameter changed), with every rank's loss values."""
        path = out / f"nan_debug_{it:07d}.pth"
        state = {"model": model.state_dict(), "optimisation": opt.state_dict(), "iteration": it,
                 "losses_per_rank": step.bad_values, "image_ids": step.image_ids, "config": to_dict(cfg)}
        distributed.share_from_main(ctx, lambda: atomic_save(state, path))
        return path

    net.train()
    bar = tqdm(total=cfg.solver.max_iter, initial=start, desc="train", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    last = time.perf_counter()
    try:
        with StopSignals(announce=ctx.is_main) as signals:
            for it in range(start, cfg.solver.max_iter):
                model.set_iteration(it)
                images, targets = to_device(*next(batches), device)
                step = stepper(images, targets, stop_requested=signals.received is not None)
                done = it + 1
                if step.failed:
                    message = step.problem(it)
                    if cfg.solver.nan_policy == "skip":
                        opt.advance()
                        if log is not None:
                            log.skip(done, step.bad_terms, step.bad_gradients, step.image_ids)
                            bar.write(f"lgd: {message} Step skipped (solver.nan_policy=skip).")
                        bar.update(1)
                        continue
                    debug = debug_checkpoint(it, step)
                    raise TrainingError(
                        f"{message} Training stopped so that nothing trains on NaN; lower solver.base_lr, raise "
                        "solver.warmup_iters or check these images' annotations (solver.nan_policy=skip skips such "
                        f"steps instead). The state before this step and its loss values are in {debug}; the last "
                        "checkpoint is intact; resume with --resume."
                    )
                bar.update(1)
                if done % cfg.log_period == 0 or done == cfg.solver.max_iter:
                    values = distributed.mean_over_ranks(ctx, {k: float(v) for k, v in step.losses.items()})
                    if log is not None:
                        now = time.perf_counter()
                        log.train(done, values, float(step.total), opt.lrs(), (now - last) / cfg.log_period)
                        last = now
                        bar.set_postfix(loss=f"{float(step.total):.3f}", lr=f"{opt.lrs()[0]:.2g}")
                if cfg.eval_period and done % cfg.eval_period == 0 and done < cfg.solver.max_iter:
                    result = evaluate(model, val_set, cfg, device, progress=progress, desc=f"eval@{done}", ctx=ctx)
                    if log is not None:
                        log.eval(done, "val", result.metrics)
                        bar.write(f"iter {done}: val {result.headline} {result.metrics[result.headline]:.2f}")
                if step.stop and done < cfg.solver.max_iter:
                    raise TrainingInterrupted(signals.received or signal.SIGTERM, done, checkpoint(done), ctx.is_main)
                if done % cfg.checkpoint_period == 0 and done < cfg.solver.max_iter:
                    checkpoint(done)
            checkpoint(cfg.solver.max_iter)
        bar.close()
        if ctx.is_main:
            atomic_save({"model": model.state_dict(), "iteration": cfg.solver.max_iter, "config": to_dict(cfg)},
                        out / FINAL)
        result = evaluate(model, val_set, cfg, device, out_file=out / "detections_val.json", progress=progress,
                          desc="eval (val)", ctx=ctx)
        if log is not None:
            log.eval(cfg.solver.max_iter, "val", result.metrics)
    finally:
        stop_workers(batches)
        bar.close()
        if log is not None:
            log.close()
    final = distributed.broadcast(ctx, result.metrics if result is not None else None)
    if not ctx.is_main:
        return {"metrics": final, "result": None}
    from lgd.plots import plot_metrics

    plot_metrics(out / "metrics.jsonl", out)
    # every iou type evaluated (bbox; segm too for Mask R-CNN), each with its per-class table
    (out / "eval_val.txt").write_text("\n".join(
        f"{result.name} evaluation on val — {t}\n{text}\n{result.table(t)}\n" for t, text in result.summary.items()
    ))
    return {"metrics": final, "result": result}
