"""Training and evaluation loops: optimisers and schedules, mixed precision and gradient accumulation,
data-parallel training (see lgd/distributed.py), checkpoints and exact resume, fault handling, logging,
evaluation."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from lgd import distributed
from lgd.atomic import atomic_write
from lgd.config import Config, SolverConfig, config_from_dict, flatten, save_config, to_dict
from lgd.data import CocoDetection, build_eval_loader, build_train_loader, build_transforms, ensure_builtin_dataset
from lgd.data.loader import stop_workers
from lgd.data.formats import cached_conversion
from lgd.data.synthetic import Difficulty, default_cache_dir
from lgd.detectors import ARCH_ADAPTERS, build_detector, set_test_size
from lgd.distiller import LGD
from lgd.distributed import Context
from lgd.errors import ConfigError, LGDError, TrainingError
from lgd.evaluation import EvalResult, auto_metric, detections_to_coco, evaluate_detections, save_results

CHECKPOINT = "last.pth"  # always the newest checkpoint (a hard link to the newest numbered one where possible)
FINAL = "model_final.pth"
NUMBERED = re.compile(r"model_(\d{7})\.pth")
# Keys that may change between a run and its --resume: where and how fast it runs, not what it computes.
RUNTIME_KEYS = ("device", "threads", "data.workers", "keep_checkpoints", "checkpoint_period", "log_period",
                "eval_period", "solver.nan_policy")


# ----------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LGDError(f"device={name} was requested but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_paths(cfg: Config, split: str) -> tuple[Path, Path]:
    """(image root, COCO annotation file) of a split; the built-in dataset (generated once) when none is given.

    VOC, YOLO and CrowdHuman splits are converted to COCO JSON once, cached in the cache folder.
    """
    s = getattr(cfg.data, split)
    syn = cfg.data.synth
    cache_dir = Path(syn.cache_dir) if syn.cache_dir else default_cache_dir()
    if s.format != "coco":
        return cached_conversion(s.format, Path(s.root), s.ann, cfg.data.names_file, cfg.data.crowdhuman_box, cache_dir)
    if s.root:
        return Path(s.root), Path(s.ann)
    root = ensure_builtin_dataset(
        cache_dir,
        seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val, num_test=syn.num_test, size=syn.size,
        difficulty=Difficulty.of(syn),
    )
    return root / split, root / "annotations" / f"instances_{split}.json"


def build_dataset(cfg: Config, split: str, train: bool) -> CocoDetection:
    root, ann = split_paths(cfg, split)
    return CocoDetection(
        root,
        ann,
        transforms=build_transforms(train, cfg.data.hflip_prob),
        label_offset=ARCH_ADAPTERS[cfg.model.arch].label_offset,
        with_masks=cfg.model.arch == "maskrcnn",
        filter_empty=train and cfg.data.filter_empty,
    )


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The student, wrapped in LGD unless ``lgd.enabled`` is false."""
    detector = build_detector(cfg.model, num_classes)
    if not cfg.lgd.enabled:
        return detector
    return LGD(detector, num_classes=num_classes, config=cfg.lgd, max_iter=cfg.solver.max_iter)


def student_of(model: nn.Module) -> nn.Module:
    return model.student if isinstance(model, LGD) else model


def to_device(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Plain tensors on the device (tv_tensors unwrapped: torchvision's detectors expect plain ones)."""
    images = [img.as_subclass(Tensor).to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.as_subclass(Tensor).to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets


# ----------------------------------------------------------------------------- optimisation
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def make_optimizer(modules: Iterable[nn.Module], lr: float, momentum: float, weight_decay: float,
                   weight_decay_norm: Optional[float] = None,
                   weight_decay_bias: Optional[float] = None) -> torch.optim.SGD:
    """SGD over every trainable parameter, each once.

    Weight decay is ``weight_decay`` on every parameter, as in the reference's optimiser builder
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
    return torch.optim.SGD([{"params": ps, "weight_decay": wd} for wd, ps in groups.items()], lr=lr, momentum=momentum)


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
class Optimisation:
    """The optimisers (student+adapter; teacher when LGD is on) and their schedules."""

    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    clip_type: str  # "value" | "norm" | "none", applied to each optimiser's gradients separately
    clip_value: float

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, scaler: Optional[torch.amp.GradScaler] = None) -> list[nn.Parameter]:
        """Clip and step each optimiser on the gradients in place, then advance the schedules.

        Returns the parameters whose gradient is NaN or infinite, and then changes nothing: the check runs
        before any optimiser steps or clipping spreads the bad value. Under fp16 the ``scaler`` instead
        unscales each optimiser's gradients and skips the step of one whose gradients overflowed (dynamic loss
        scaling expects that now and then). An optimiser none of whose parameters has a gradient is left alone,
        as SGD itself would (its weight decay and momentum only touch parameters with gradients).
        """
        scaling = scaler is not None and scaler.is_enabled()
        active = []
        for opt in self.optimizers:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if params:
                active.append((opt, params))
                if scaling:
                    scaler.unscale_(opt)
        if not scaling and active:
            grads = [p.grad for _, params in active for p in params]
            if not bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for g in grads])).all()):
                return [p for _, params in active for p in params if not bool(torch.isfinite(p.grad).all())]
        for opt, params in active:
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
        self.advance()
        return []

    def advance(self) -> None:
        """Move the schedules one iteration on (also for a skipped step: the rate is a function of the iteration)."""
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


def build_optimisation(model: nn.Module, cfg: Config) -> Optimisation:
    s = cfg.solver
    if isinstance(model, LGD):
        optimizers = [
            make_optimizer([model.student, model.adapter], s.base_lr, s.momentum, s.weight_decay,
                           s.weight_decay_norm, s.weight_decay_bias),
            make_optimizer([model.teacher], cfg.lgd.teacher_lr, cfg.lgd.teacher_momentum, cfg.lgd.teacher_weight_decay,
                           s.weight_decay_norm, s.weight_decay_bias),
        ]
    else:
        optimizers = [make_optimizer([model], s.base_lr, s.momentum, s.weight_decay, s.weight_decay_norm,
                                     s.weight_decay_bias)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda it: lr_factor(it, s)) for o in optimizers]
    return Optimisation(optimizers, schedulers, s.clip_type, s.clip_value)


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically: a crash never leaves half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _link_or_copy(source: Path, dest: str) -> None:
    """``dest`` becomes ``source``'s contents: a hard link (no extra disk space), or a copy where links fail."""
    os.unlink(dest)
    try:
        os.link(source, dest)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(source, dest)


def save_checkpoint(state: dict[str, Any], out: Path, iteration: int, keep: int) -> Path:
    """Write ``model_<iteration>.pth`` and point ``last.pth`` at it, both atomically; keep the newest ``keep``.

    A kill at any moment leaves ``last.pth`` either the previous checkpoint or this one, whole. Numbered
    checkpoints newer than ``iteration`` come from an abandoned run (one killed after it wrote them and
    resumed from an older ``last.pth``) and are deleted, so the folder holds this run's history only.
    """
    path = out / f"model_{iteration:07d}.pth"
    try:
        atomic_save(state, path)
        atomic_write(out / CHECKPOINT, lambda tmp: _link_or_copy(path, tmp))
    except OSError as e:
        raise TrainingError(f"cannot write checkpoint {path} ({e.strerror or e}); the previous checkpoint "
                            f"{out / CHECKPOINT} is intact. Free space in {out} and continue with --resume") from None
    numbered = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := NUMBERED.fullmatch(p.name)))
    history = [p for it, p in numbered if it <= iteration]
    for stale in [p for it, p in numbered if it > iteration] + history[:-keep]:
        stale.unlink(missing_ok=True)
    return path


def prepare_output_dir(out: Path) -> None:
    """Create ``out`` and prove it writable before any work starts; remove temporaries that killed writes left.

    Raises TrainingError naming the folder and the reason, so an unwritable folder is reported before the
    dataset is read or a model built, not at the first checkpoint hours later.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".lgd-write-test.", suffix=".tmp") as probe:
            probe.write(b"lgd")
            probe.flush()
    except OSError as e:
        raise TrainingError(f"output_dir {out} is not writable ({e.strerror or e}); choose another output_dir "
                            "or fix its permissions") from None
    for leftover in out.glob(".*.tmp"):  # temporaries of killed writes (atomic_write, the probe above)
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


def checkpoint_bytes(model: nn.Module, opt: Optimisation) -> int:
    """Size of one checkpoint: the model's state plus one SGD momentum buffer per trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for o in opt.optimizers for g in o.param_groups for p in g["params"])
    return state + momentum


def check_free_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise TrainingError(
            f"output_dir {out} has {free / 2**20:.0f} MiB free, but this run needs about {needed / 2**20:.0f} MiB "
            "for its checkpoints (the newest and the one being written); free space or choose another output_dir"
        )


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LGDError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise LGDError(f"cannot read checkpoint {path}: {e}") from None


def load_model_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a training checkpoint (LGD or plain) into ``model`` (LGD or plain student)."""
    ckpt = load_checkpoint(path)
    state = ckpt["model"]
    if not isinstance(model, LGD) and any(k.startswith("student.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    elif isinstance(model, LGD) and not any(k.startswith("student.") for k in state):
        model.student.load_state_dict(state)
        return ckpt
    model.load_state_dict(state)
    return ckpt


def load_resume_checkpoint(path: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint to resume from; it must have been trained with ``cfg`` (runtime keys aside)."""
    if not path.is_file():
        raise LGDError(f"--resume: no checkpoint at {path}; start without --resume")
    ckpt = load_checkpoint(path)
    saved, now = flatten(to_dict(config_from_dict(ckpt["config"]))), flatten(to_dict(cfg))
    differ = [k for k, v in now.items() if k not in RUNTIME_KEYS and saved[k] != v]
    if differ:
        raise LGDError(f"--resume: the config differs from the one {path} was trained with ({', '.join(differ)}); "
                       f"resume with -c {path.parent / 'config.yaml'}")
    return ckpt


def load_trained(cfg: Config, split: str, weights: Optional[Path] = None) -> tuple[nn.Module, CocoDetection]:
    """The model a run trained (``weights`` or ``output_dir/model_final.pth``) and the split's evaluation dataset."""
    dataset = build_dataset(cfg, split, train=False)
    model = build_model(cfg, dataset.num_classes)
    load_model_weights(model, Path(weights) if weights else Path(cfg.output_dir) / FINAL)
    return model, dataset


# ----------------------------------------------------------------------------- logging
class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) plus TensorBoard events."""

    def __init__(self, out_dir: Path, purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)

    def train(self, it: int, losses: dict[str, float], total: float, lrs: list[float], seconds: float) -> None:
        record = {"kind": "train", "iter": it, "total_loss": total, "losses": losses, "lr": lrs[0], "time": seconds}
        if len(lrs) > 1:
            record["teacher_lr"] = lrs[1]
        self._write(record)
        self.tb.add_scalar("loss/total", total, it)
        for k, v in losses.items():
            self.tb.add_scalar(f"loss/{k}", v, it)
        self.tb.add_scalar("lr/student", lrs[0], it)

    def eval(self, it: int, split: str, metrics: dict[str, float]) -> None:
        self._write({"kind": "eval", "iter": it, "split": split, "metrics": metrics})
        for k, v in metrics.items():
            if not math.isnan(v):
                self.tb.add_scalar(f"{split}/{k}", v, it)

    def skip(self, it: int, terms: list[str], gradients: list[str], image_ids: list[Any]) -> None:
        """A step that solver.nan_policy=skip left out: which loss terms or parameters' gradients were not
        finite, on which images."""
        self._write({"kind": "skip", "iter": it, "terms": terms, "gradients": gradients, "image_ids": image_ids})

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _truncate_metrics(path: Path, iteration: int) -> None:
    """On resume, drop records written after the checkpoint so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iter"] <= iteration:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- evaluation
def split_metric(cfg: Config, split: str) -> str:
    """The metric a split is evaluated with: ``data.metric``, or when "auto" the one its format is reported with."""
    s = getattr(cfg.data, split)
    return auto_metric(s.format, s.root) if cfg.data.metric == "auto" else cfg.data.metric


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    cfg: Config,
    device: torch.device,
    teacher: bool = False,
    out_file: Optional[Path] = None,
    progress: bool = True,
    desc: str = "eval",
    ctx: Optional[Context] = None,
    split: str = "val",
) -> Optional[EvalResult]:
    """AP of the student (or, with ``teacher``, of the head on the teacher's features: an upper bound).

    The metric is ``split_metric(cfg, split)``: COCO AP, VOC AP50 or CrowdHuman AP50 / MR^-2.

    With a distributed ``ctx`` every rank runs its share of the images and rank 0 gathers the detections,
    scores them and writes ``out_file``; the other ranks return ``None``.
    """
    if teacher and not isinstance(model, LGD):
        raise LGDError("the teacher diagnostic needs an LGD model (lgd.enabled=true)")
    ctx = ctx or Context(device=device)
    student = student_of(model)
    was_training = model.training
    model.eval()
    set_test_size(student, cfg.model)
    shard = Subset(dataset, distributed.shard_indices(ctx, len(dataset))) if ctx.distributed else dataset
    loader = build_eval_loader(shard, cfg.data.eval_batch_size, cfg.data.workers)
    outputs, ids = [], []
    bar = not progress or not ctx.is_main
    for images, targets in tqdm(loader, desc=desc, disable=bar, leave=False, dynamic_ncols=True):
        images, targets = to_device(images, targets, device)
        dets = model.teacher_detect(images, targets) if teacher else student(images)
        outputs.extend({k: v.cpu() for k, v in d.items()} for d in dets)
        ids.extend(t["image_id"] for t in targets)
    student.transform.min_size = tuple(cfg.model.min_size)
    model.train(was_training)
    gathered = distributed.gather_lists(ctx, list(zip(outputs, ids)))
    if gathered is None:
        return None
    outputs, ids = [o for o, _ in gathered], [i for _, i in gathered]
    with_masks = cfg.model.arch == "maskrcnn"
    results = detections_to_coco(outputs, ids, dataset.label_to_category_id, with_masks=with_masks)
    if out_file is not None:
        save_results(results, out_file)
    return evaluate_detections(
        split_metric(cfg, split),
        dataset.coco,
        results,
        iou_types=("bbox", "segm") if with_masks else ("bbox",),
        class_names=dataset.class_names,
        cat_ids=dataset.cat_ids,
        image_ids=dataset.ids,
    )


# ----------------------------------------------------------------------------- training
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

    def __init__(self, net: nn.Module, opt: Optimisation, ctx: Context, solver: SolverConfig) -> None:
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
        self.names = {id(p): name for name, p in module.named_parameters()}

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


def _may_leave_parameters_unused(model: nn.Module, cfg: Config, start: int) -> bool:
    """Whether some step may give a trainable parameter no gradient, which DDP must then look for (at the
    cost of a walk over the autograd graph every step): LGD's frozen-backbone window still ahead, or a
    teacher without context box on a rank whose images may all lack objects. Everything else in the student,
    adapter and teacher takes part in every step's loss."""
    if not isinstance(model, LGD):
        return False
    return start < model.freeze_backbone_iters or (not model.context_box and not cfg.data.filter_empty)


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
    opt = build_optimisation(model, cfg)
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
            _truncate_metrics(out / "metrics.jsonl", start)
        else:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        save_config(cfg, out / "config.yaml")

    net: nn.Module = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=_may_leave_parameters_unused(model, cfg, start))
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
                if isinstance(model, LGD):
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
