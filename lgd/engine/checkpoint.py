"""Checkpoints: what a run saves and how it comes back — atomic writes, the newest K kept, RNG state for exact
resume, the free-space and writability checks made before training, loading weights into a model, and a trained
model read back for evaluation, export and pictures."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from lgd.config import Config, config_from_dict, flatten, runtime_keys, to_dict
from lgd.data.build import build_dataset, split_paths
from lgd.data.coco import CocoDetection
from lgd.detectors.weights import is_lgd_state, student_state
from lgd.engine.solver import Optimization
from lgd.errors import LGDError, TrainingError, count
from lgd.evaluation import Categories, check_categories, read_categories
from lgd.methods.build import build_model
from lgd.methods.trainable import Trainable
from lgd.utils import distributed
from lgd.utils.atomic import atomic_write
from lgd.utils.distributed import Context
from lgd.utils.files import atomic_save, load_torch_file

CHECKPOINT = "last.pth"  # always the newest checkpoint (a hard link to the newest numbered one where possible)
FINAL = "model_final.pth"
NUMBERED = re.compile(r"model_(\d{7})\.pth")
RESUME_KEYS_SHOWN = 8  # differing keys a refused --resume lists with their values; the rest are counted


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) generator states, as tensors, lists and numbers, so that
    checkpoints load with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # np.random.set_state takes the list back
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` returned (CUDA's only where there is CUDA)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_state(saved: Any, ctx: Context) -> None:
    """Continue this rank's random streams from a checkpoint's ``rng`` (one state per rank, or one state)."""
    # A run resumed on another number of processes continues from rank 0's.
    set_rng_state(saved[ctx.rank] if isinstance(saved, list) and len(saved) == ctx.world_size
                  else saved[0] if isinstance(saved, list) else saved)


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, on the CPU, read with weights_only=True. Raises LGDError for a missing, truncated,
    foreign or code-carrying file."""
    return load_torch_file(path, "checkpoint")


def load_model_weights(model: Trainable, checkpoint: Union[Path, dict[str, Any]]) -> dict[str, Any]:
    """Load a training checkpoint (LGD or plain; a file or as loaded) into ``model`` (LGD or Baseline); returns the
    checkpoint.

    LGD's state names the student's tensors ``student.*``; a plain detector's state is the student's alone.
    Whole LGD states go into LGD models, and otherwise the student's part into the student.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    state = ckpt["model"]
    if is_lgd_state(state) and is_lgd_state(model.state_dict()):
        model.load_state_dict(state)
    else:
        model.student.load_state_dict(student_state(state))
    return ckpt


def load_resume_checkpoint(path: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint to resume from; it must have been trained with ``cfg`` (runtime keys aside)."""
    if not path.is_file():
        raise LGDError(f"--resume: no checkpoint at {path}; start without --resume")
    ckpt = load_checkpoint(path)
    saved, now = flatten(to_dict(config_from_dict(ckpt["config"]))), flatten(to_dict(cfg))
    runtime = runtime_keys()
    differ = [k for k, v in now.items() if k not in runtime and saved[k] != v]
    if differ:
        longer = ("; a finished schedule cannot be extended (its LR steps and LGD windows are placed by "
                  "solver.max_iter): train a new run from it with model.weights=" + str(path.parent / FINAL) + ")"
                  if "solver.max_iter" in differ else "")
        shown = "; ".join(f"{k} was {saved[k]!r}, now {now[k]!r}" for k in differ[:RESUME_KEYS_SHOWN])
        more = f"; and {len(differ) - RESUME_KEYS_SHOWN} more" if len(differ) > RESUME_KEYS_SHOWN else ""
        raise LGDError(f"--resume: the config differs from the one {path} was trained with in "
                       f"{count(len(differ), 'key')} ({shown}{more}); resume with -c {path.parent / 'config.yaml'}"
                       + longer)
    return ckpt


class Checkpointer:
    """Writes one run's checkpoints into ``out``. Every rank calls ``save`` (each adds its RNG state); rank 0 writes.

    A checkpoint holds the model's state, the optimization's (optimizers and schedules), the iteration, every
    rank's RNG state, the config and, under fp16, the gradient scaler's state: all that an exact resume needs.
    """

    def __init__(self, out: Path, model: nn.Module, optimization: Optimization, scaler: torch.amp.GradScaler,
                 cfg: Config, ctx: Context, categories: dict[str, list]) -> None:
        self.out, self.model, self.optimization, self.scaler = out, model, optimization, scaler
        self.cfg, self.ctx = cfg, ctx
        self.categories = categories  # the training split's ids and names: evaluation checks a split against them

    def save(self, it: int) -> Path:
        """``model_<it>.pth``, linked as ``last.pth`` (``save_checkpoint``); returns its path."""
        rngs = distributed.all_gather_list(self.ctx, rng_state())
        state = {"model": self.model.state_dict(), "optimization": self.optimization.state_dict(), "iteration": it,
                 "rng": rngs, "config": to_dict(self.cfg), "categories": self.categories}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return distributed.share_from_main(self.ctx, lambda: save_checkpoint(state, self.out, it,
                                                                             self.cfg.keep_checkpoints))

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Continue from ``ckpt`` (``last.pth`` as ``load_resume_checkpoint`` read it): the model's, the
        optimization's and the gradient scaler's state, and this rank's RNG state. Called once the data loader has
        drawn its seed from torch's generator, so that every random stream goes on as in the interrupted run."""
        self.model.load_state_dict(ckpt["model"])
        # "optimisation" is the key as checkpoints written before 2026-12-03 spell it: they still resume
        self.optimization.load_state_dict(ckpt["optimization"] if "optimization" in ckpt else ckpt["optimisation"])
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"], self.ctx)

    def save_debug(self, it: int, losses_per_rank: list[dict[str, float]], image_ids: list[Any]) -> Path:
        """The state before the failed step (no parameter changed), with every rank's loss values."""
        path = self.out / f"nan_debug_{it:07d}.pth"
        state = {"model": self.model.state_dict(), "optimization": self.optimization.state_dict(), "iteration": it,
                 "losses_per_rank": losses_per_rank, "image_ids": image_ids, "config": to_dict(self.cfg)}
        distributed.share_from_main(self.ctx, lambda: atomic_save(state, path))
        return path

    def save_final(self, it: int) -> None:
        """``model_final.pth``: the trained model's state alone (rank 0)."""
        if self.ctx.is_main:
            atomic_save({"model": self.model.state_dict(), "iteration": it, "config": to_dict(self.cfg),
                         "categories": self.categories}, self.out / FINAL)


def load_trained_model(cfg: Config, weights: Optional[Path] = None) -> tuple[Trainable, Categories, Path]:
    """The model a run trained (``weights`` or ``output_dir/model_final.pth``), the categories it was trained on and
    the file read: no image is opened (exporting a model needs no dataset)."""
    path = Path(weights) if weights else Path(cfg.output_dir) / FINAL
    ckpt = load_checkpoint(path)
    # checkpoints written before categories were stored: the config's training split's annotation file
    categories = ckpt.get("categories") or read_categories(split_paths(cfg, "train")[1])
    model = build_model(cfg, len(categories["ids"]), teacher=False)
    load_model_weights(model, ckpt)
    return model, categories, path


def load_trained(cfg: Config, split: str, weights: Optional[Path] = None) -> tuple[Trainable, CocoDetection]:
    """The model a run trained (``weights`` or ``output_dir/model_final.pth``) and the split's evaluation dataset.

    Raises:
        DatasetError: the split's categories differ from the model's.
    """
    dataset = build_dataset(cfg, split, train=False)
    model, categories, path = load_trained_model(cfg, weights)
    check_categories(categories, dataset, split, f"checkpoint {path}")
    return model, dataset
