"""Optimization: SGD or AdamW optimizers over parameter groups, gradient clipping, the learning-rate schedule.

A model says which optimizers it wants (``optimizer_groups()``: LGD trains the teacher with an optimizer of its
own, as the paper does); ``build_optimization`` makes them from the solver config, each with the same schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from lgd.config import SolverConfig
from lgd.methods.trainable import OptimizerGroup


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def make_optimizer(modules: Iterable[nn.Module], lr: float, momentum: float, weight_decay: float,
                   weight_decay_norm: Optional[float] = None, weight_decay_bias: Optional[float] = None,
                   optimizer: str = "sgd") -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or AdamW over every trainable parameter, each once.

    AdamW is the reference's (megvii-research/LGD ``utils/build.py``, ``build_distillator_optimizer``):
    ``torch.optim.AdamW`` with betas (0.9, 0.999), torch's eps, and ``weight_decay`` decoupled; it has no momentum.

    Weight decay is ``weight_decay`` on every parameter, as in the reference's optimizer builder
    (megvii-research/LGD ``utils/build.py``: one group per parameter, all at 1e-4). ``weight_decay_norm`` sets it
    for normalisation-layer parameters and ``weight_decay_bias`` for biases (detectron2's SOLVER.WEIGHT_DECAY_NORM
    / _BIAS); None means ``weight_decay``. A norm layer's bias follows ``weight_decay_norm``.
    """
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in modules:
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                decay = weight_decay
                if isinstance(m, _NORMS):
                    decay = weight_decay if weight_decay_norm is None else weight_decay_norm
                elif name == "bias" and weight_decay_bias is not None:
                    decay = weight_decay_bias
                groups.setdefault(decay, []).append(p)
    param_groups = [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999))
    if optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer '{optimizer}' (sgd | adamw)")


def lr_factor(it: int, s: SolverConfig) -> float:
    """Linear warm-up from warmup_factor, then multistep or cosine decay; a pure function of the iteration."""
    if s.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * it / s.max_iter))
    else:
        factor = s.gamma ** sum(it >= step for step in s.steps)
    if it < s.warmup_iters:
        alpha = it / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


@dataclass
class Optimization:
    """The optimizers (student+adapter; teacher when LGD is on) and their schedules."""

    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    clip_type: str  # "value" | "norm" | "none", applied to each optimizer's gradients separately
    clip_value: float

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _with_gradients(self) -> list[tuple[torch.optim.Optimizer, list[nn.Parameter]]]:
        """Each optimizer with its parameters that have a gradient; one with none is left alone, as SGD itself
        would (its weight decay and momentum only touch parameters with gradients)."""
        active = [(opt, [p for g in opt.param_groups for p in g["params"] if p.grad is not None])
                  for opt in self.optimizers]
        return [(opt, params) for opt, params in active if params]

    def nonfinite_gradients(self, scaler: Optional[torch.amp.GradScaler] = None) -> list[nn.Parameter]:
        """The parameters whose gradient is NaN or infinite, found before clipping or any optimizer spreads the bad
        value. Under fp16 the ``scaler`` first unscales each optimizer's gradients, and none is reported: its step
        skips an optimizer whose gradients overflowed (dynamic loss scaling expects that now and then)."""
        active = self._with_gradients()
        if scaler is not None and scaler.is_enabled():
            for opt, _ in active:
                scaler.unscale_(opt)
            return []
        grads = [p.grad for _, params in active for p in params]
        if grads and not bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for g in grads])).all()):
            return [p for _, params in active for p in params if not bool(torch.isfinite(p.grad).all())]
        return []

    def step(self, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """Clip each optimizer's gradients (``clip_type``, each optimizer separately) and step it; under fp16
        through the ``scaler``, after ``nonfinite_gradients`` unscaled them."""
        scaling = scaler is not None and scaler.is_enabled()
        for opt, params in self._with_gradients():
            if self.clip_type == "value":
                torch.nn.utils.clip_grad_value_(params, self.clip_value)
            elif self.clip_type == "norm":
                torch.nn.utils.clip_grad_norm_(params, self.clip_value)
            if scaling:
                scaler.step(opt)
            else:
                opt.step()
        if scaling:
            scaler.update()

    def advance(self) -> None:
        """Move the schedules one iteration on (the engine's ``LRScheduler`` hook, after every step, also a skipped
        one: the rate is a function of the iteration)."""
        for sched in self.schedulers:
            sched.step()

    def lrs(self) -> list[float]:
        return [opt.param_groups[0]["lr"] for opt in self.optimizers]

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, st in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(st)
        for s, st in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(st)


def linear_lr_scale(batch_size: int, reference_batch_size: int) -> float:
    """The linear scaling rule's factor on every learning rate (Goyal et al., 2017, "Accurate, Large Minibatch
    SGD"; detectron2's ``SOLVER.REFERENCE_WORLD_SIZE``): ``batch_size / reference_batch_size``, both in images per
    iteration of all processes together (``data.batch_size`` is the global batch); 1 when the reference is 0 (the
    rule off)."""
    return batch_size / reference_batch_size if reference_batch_size else 1.0


def build_optimization(groups: list[OptimizerGroup], s: SolverConfig, lr_scale: float = 1.0) -> Optimization:
    """One optimizer per group, in order (``make_optimizer``; ``s.optimizer`` unless the group names its own),
    each scheduled by ``lr_factor`` and clipped as the solver config ``s`` says; every group's learning rate is
    multiplied by ``lr_scale`` (``linear_lr_scale``)."""
    optimizers = [
        make_optimizer(g.modules, lr_scale * (s.base_lr if g.lr is None else g.lr),
                       s.momentum if g.momentum is None else g.momentum,
                       s.weight_decay if g.weight_decay is None else g.weight_decay, s.weight_decay_norm,
                       s.weight_decay_bias, s.optimizer if g.optimizer is None else g.optimizer)
        for g in groups
    ]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda it: lr_factor(it, s)) for o in optimizers]
    return Optimization(optimizers, schedulers, s.clip_type, s.clip_value)
