"""Training and evaluation loops: optimisers and schedules, checkpoints, resume, logging, evaluation."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from lgd.atomic import atomic_write
from lgd.config import Config, SolverConfig, config_from_dict, save_config, to_dict
from lgd.data import CocoDetection, build_eval_loader, build_train_loader, build_transforms, ensure_builtin_dataset
from lgd.data.synthetic import default_cache_dir
from lgd.detectors import ARCH_ADAPTERS, build_detector, set_test_size
from lgd.distiller import LGD
from lgd.errors import LGDError, TrainingError
from lgd.evaluation import EvalResult, detections_to_coco, evaluate_coco, save_results

CHECKPOINT = "last.pth"
FINAL = "model_final.pth"


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
    """(image root, annotation file) of a split; the built-in dataset (generated once) when none is given."""
    s = getattr(cfg.data, split)
    if s.root:
        return Path(s.root), Path(s.ann)
    syn = cfg.data.synth
    root = ensure_builtin_dataset(
        Path(syn.cache_dir) if syn.cache_dir else default_cache_dir(),
        seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val, num_test=syn.num_test, size=syn.size,
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
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def make_optimizer(modules: Iterable[nn.Module], lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over every trainable parameter; normalisation layers get no weight decay (detectron2's default)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for m in module.modules():
            for p in m.parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (no_decay if isinstance(m, _NORMS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


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
    clip: float

    def step(self, loss: Tensor) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            if self.clip > 0:
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.clip)
            opt.step()
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
            make_optimizer([model.student, model.adapter], s.base_lr, s.momentum, s.weight_decay),
            make_optimizer([model.teacher], cfg.lgd.teacher_lr, cfg.lgd.teacher_momentum, cfg.lgd.teacher_weight_decay),
        ]
    else:
        optimizers = [make_optimizer([model], s.base_lr, s.momentum, s.weight_decay)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda it: lr_factor(it, s)) for o in optimizers]
    return Optimisation(optimizers, schedulers, s.clip_grad_norm)


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
) -> EvalResult:
    """COCO AP of the student (or, with ``teacher``, of the head on the teacher's features: an upper bound)."""
    if teacher and not isinstance(model, LGD):
        raise LGDError("the teacher diagnostic needs an LGD model (lgd.enabled=true)")
    student = student_of(model)
    was_training = model.training
    model.eval()
    set_test_size(student, cfg.model)
    loader = build_eval_loader(dataset, cfg.data.eval_batch_size, cfg.data.workers)
    outputs, ids = [], []
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        images, targets = to_device(images, targets, device)
        dets = model.teacher_detect(images, targets) if teacher else student(images)
        outputs.extend({k: v.cpu() for k, v in d.items()} for d in dets)
        ids.extend(t["image_id"] for t in targets)
    student.transform.min_size = tuple(cfg.model.min_size)
    model.train(was_training)
    with_masks = cfg.model.arch == "maskrcnn"
    results = detections_to_coco(outputs, ids, dataset.label_to_category_id, with_masks=with_masks)
    if out_file is not None:
        save_results(results, out_file)
    return evaluate_coco(
        dataset.coco,
        results,
        iou_types=("bbox", "segm") if with_masks else ("bbox",),
        class_names=dataset.class_names,
        cat_ids=dataset.cat_ids,
        image_ids=dataset.ids,
    )


# ----------------------------------------------------------------------------- training
def _check_finite(losses: dict[str, Tensor], it: int, targets: list[dict]) -> None:
    bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
    if bad:
        ids = [t.get("image_id") for t in targets]
        raise TrainingError(
            f"iteration {it}: non-finite loss terms {bad} on images {ids}. Training stopped so that nothing trains "
            "on NaN; lower solver.base_lr, raise solver.warmup_iters or check these images' annotations. "
            "The last checkpoint is intact; resume with --resume."
        )


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (LGD or baseline) as the config says; returns the final metrics on the val split."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    train_set = build_dataset(cfg, "train", train=True)
    val_set = build_dataset(cfg, "val", train=False)
    model = build_model(cfg, train_set.num_classes).to(device)
    opt = build_optimisation(model, cfg)

    start = 0
    ckpt_path = out / CHECKPOINT
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise LGDError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        ckpt = load_checkpoint(ckpt_path)
        saved = config_from_dict(ckpt["config"])
        if to_dict(saved) != to_dict(cfg):
            raise LGDError(f"--resume: the config differs from the one {ckpt_path} was trained with; "
                           f"resume with -c {out / 'config.yaml'}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimisation"])
        start = ckpt["iteration"]
        _truncate_metrics(out / "metrics.jsonl", start)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")

    loader = build_train_loader(
        train_set, cfg.data.batch_size, cfg.seed, cfg.data.workers, cfg.data.aspect_ratio_grouping, start_iter=start
    )
    batches = iter(loader)
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
    log = MetricsLog(out, purge_step=start if resume else None)

    def checkpoint(it: int) -> None:
        atomic_save(
            {"model": model.state_dict(), "optimisation": opt.state_dict(), "iteration": it,
             "rng": rng_state(), "config": to_dict(cfg)},
            ckpt_path,
        )

    model.train()
    bar = tqdm(total=cfg.solver.max_iter, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
    last = time.perf_counter()
    final: dict[str, float] = {}
    try:
        for it in range(start, cfg.solver.max_iter):
            if isinstance(model, LGD):
                model.set_iteration(it)
            images, targets = to_device(*next(batches), device)
            losses = model(images, targets)
            _check_finite(losses, it, targets)
            total = sum(losses.values())
            opt.step(total)
            bar.update(1)
            done = it + 1
            if done % cfg.log_period == 0 or done == cfg.solver.max_iter:
                now = time.perf_counter()
                values = {k: float(v.detach()) for k, v in losses.items()}
                log.train(done, values, float(total.detach()), opt.lrs(), (now - last) / cfg.log_period)
                last = now
                bar.set_postfix(loss=f"{float(total.detach()):.3f}", lr=f"{opt.lrs()[0]:.2g}")
            if cfg.eval_period and done % cfg.eval_period == 0 and done < cfg.solver.max_iter:
                result = evaluate(model, val_set, cfg, device, progress=progress, desc=f"eval@{done}")
                log.eval(done, "val", result.metrics)
                bar.write(f"iter {done}: val bbox AP {result.metrics['bbox/AP']:.2f}")
            if done % cfg.checkpoint_period == 0 and done < cfg.solver.max_iter:
                checkpoint(done)
        bar.close()
        checkpoint(cfg.solver.max_iter)
        atomic_save({"model": model.state_dict(), "iteration": cfg.solver.max_iter, "config": to_dict(cfg)}, out / FINAL)
        result = evaluate(model, val_set, cfg, device, out_file=out / "detections_val.json", progress=progress,
                          desc="eval (val)")
        log.eval(cfg.solver.max_iter, "val", result.metrics)
        final = result.metrics
    finally:
        bar.close()
        log.close()
    from lgd.plots import plot_metrics

    plot_metrics(out / "metrics.jsonl", out)
    (out / "eval_val.txt").write_text(result.summary["bbox"] + "\n\n" + result.table("bbox") + "\n")
    return {"metrics": final, "result": result}
