"""Summaries: a model's parameter counts (``lgd summary``) and what a training run is about to do (printed
before its first step, so that a wrong dataset, device or output folder shows at once, not hours later)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lgd import __version__, errors
from lgd.config import Config
from lgd.config import backbone_name
from lgd.data import CocoDetection
from lgd.data.stats import dataset_stats
from lgd.detectors import build_detector
from lgd.engine.solver import linear_lr_scale
from lgd.methods.lgd import LGD
from lgd.utils.distributed import Context


def count(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: Config, num_classes: int) -> dict[str, Any]:
    """Parameter counts of the student, LGD's teacher and adapter, and what is deployed, for ``num_classes``.

    Counting needs no pretrained weights: ``model.weights`` and ``model.backbone_weights`` are ignored, so
    this works offline.
    """
    architecture = dataclasses.replace(cfg.model, weights="", backbone_weights="")
    student = build_detector(architecture, num_classes)
    report: dict[str, Any] = {"arch": cfg.model.arch, "backbone": backbone_name(cfg.model),
                              "deform_stages": list(cfg.model.deform_stages), "num_classes": num_classes,
                              "fpn_channels": cfg.model.fpn_channels, "student": count(student)}
    lgd = LGD(student, num_classes=num_classes, config=cfg.lgd, max_iter=cfg.solver.max_iter)
    report.update({
        "teacher": count(lgd.teacher), "adapter": count(lgd.adapter),
        "context_box": lgd.context_box, "detach_appearance": lgd.detach_appearance,
        "class_format": cfg.lgd.class_format, "lgd_enabled": cfg.lgd.enabled,
        "deployed": count(student),
    })
    return report


def training_summary(cfg: Config, ctx: Context, train_set: CocoDetection, val_set: CocoDetection, model: nn.Module,
                     start: int) -> str:
    """What training will do, as aligned "what: value" lines: config, device and threads, each split's source
    (and where it is cached), images and objects, the model, LGD on or off, the schedule, the output folder.

    Args:
        model: the model about to train (``Trainable``: LGD, or Baseline for ``lgd.enabled=false``).
        start: the first iteration (above 0 when resuming).
    """
    m, s = cfg.model, cfg.solver
    student = model.student
    processes = f", {ctx.world_size} processes" if ctx.distributed else ""
    weights = m.weights or m.backbone_weights or "none (from scratch)"
    evaluation = f"every {cfg.eval_period} iterations and at the end" if cfg.eval_period else "at the end"
    resuming = ""
    if start >= s.max_iter:
        resuming = f", already finished (iteration {start}): only its final evaluation runs again"
    elif start:
        resuming = f", resuming after iteration {start}"
    late = [f"the warm-up (solver.warmup_iters={s.warmup_iters}) never reaches lr {s.base_lr}"] \
        if s.warmup_iters >= s.max_iter else []
    if s.schedule == "multistep" and any(step >= s.max_iter for step in s.steps):
        late.append(f"solver.steps={list(s.steps)} reach past the last iteration")
    elif s.schedule == "multistep" and s.steps and max(s.steps) < s.max_iter / 2:
        late.append(f"the last of solver.steps={list(s.steps)} falls before half the run, which then trains at "
                    f"{s.gamma ** len(s.steps):g} x the learning rate")
    warning = f" — WARNING: {'; '.join(late)}: scale them with solver.max_iter" if late else ""
    threads = torch.get_num_threads()
    lines = [
        ("config", cfg.source),
        ("device", f"{ctx.device}, {threads} thread{'s' if threads > 1 else ''}{processes}, precision {s.amp}"),
        *_split_lines(cfg, "train", train_set),
        *_split_lines(cfg, "val", val_set),
        ("model", f"{m.arch}, {backbone_name(m)}{'-DCNv2' if any(m.deform_stages) else ''}-FPN (width "
                  f"{m.fpn_channels}, {m.norm}), {count(student) / 1e6:.2f} M parameters, images {'/'.join(map(str, m.min_size))} px (max {m.max_size}); weights: {weights}"),
        ("LGD", model.describe()),
        ("schedule", f"{s.max_iter} iterations of {cfg.data.batch_size} images, {s.optimizer} lr "
                     f"{_learning_rate(cfg)}; evaluation on val {evaluation}{resuming}{warning}"),
        *([("scaled", f"with solver.max_iter={s.max_iter} (solver.scale_schedule=false keeps the file's): "
                      f"{cfg.scaled}")] if cfg.scaled else []),
        ("output", f"{cfg.output_dir} (config.yaml, checkpoints, metrics.jsonl, tensorboard/, plots)"),
    ]
    width = max(len(k) for k, _ in lines)
    return f"lgd {__version__}: training\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


def _learning_rate(cfg: Config) -> str:
    """The student's learning rate and, where the linear scaling rule changes it, how."""
    s = cfg.solver
    if not s.reference_batch_size:
        return f"{s.base_lr:g} (linear scaling rule off: solver.reference_batch_size=0)"
    scale = linear_lr_scale(cfg.data.batch_size, s.reference_batch_size)
    if scale == 1:
        return f"{s.base_lr:g} (for the reference batch solver.reference_batch_size={s.reference_batch_size})"
    return (f"{scale * s.base_lr:g} = solver.base_lr {s.base_lr:g} x {cfg.data.batch_size} / {s.reference_batch_size} "
            f"(linear scaling rule from solver.reference_batch_size; the teacher's likewise; "
            f"solver.reference_batch_size=0 turns it off)")


def _split_lines(cfg: Config, split: str, dataset: CocoDetection) -> list[tuple[str, str]]:
    """Where a split comes from (and is cached), and its images and objects."""
    s = getattr(cfg.data, split)
    if not s.root:
        source = f"the built-in synthetic dataset, generated once into {dataset.root.parent}"
    elif s.format != "coco":
        source = f"{s.format} {s.root}, converted once to {dataset.ann_file}"
    else:
        source = f"{dataset.ann_file}, images in {dataset.root}"
    if cfg.data.class_map:
        source += ", classes renamed by data.class_map"
    stats = dataset_stats(dataset)
    counts = ", ".join(errors.count(n, noun) for n, noun in
                       ((stats.images, "image"), (stats.objects, "object"), (len(stats.per_class), "class")))
    if stats.ignored:
        counts += f" (+{errors.count(stats.ignored, 'crowd / ignore region')}, iscrowd=1: not trained on, not scored)"
    if len(dataset) < stats.images:
        counts += f"; {len(dataset)} images with objects are trained on (data.filter_empty)"
    return [(split, source), ("", counts)]
