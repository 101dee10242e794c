"""One training step: forward in micro-batches under autocast, a finiteness check agreed by all ranks, backward,
clipping and every optimizer's step (lgd/engine/solver.py); a step found non-finite is undone and reported instead."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lgd.config import SolverConfig
from lgd.engine.solver import Optimization
from lgd.utils import distributed
from lgd.utils.distributed import Context

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """One optimization step: forward in micro-batches under autocast, a finiteness check agreed by all ranks,
    backward (gradients averaged over ranks by DDP on the last micro-batch), clipping, every optimizer's step.

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
        """Train on this rank's share of a batch: ``images`` (3, H, W) floats in [0, 1] and their targets, on the
        device; ``stop_requested``: this rank received SIGINT/SIGTERM (the result says whether any rank did)."""
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
        bad_params = self.opt.nonfinite_gradients(self.scaler)
        if bad_params:
            return self._failed(sums, targets, buffers, [self.names[id(p)] for p in bad_params])
        self.opt.step(self.scaler)
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
