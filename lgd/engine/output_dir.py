"""The run's output folder (``output_dir``), checked before any work starts: not holding another run, writable,
with room for two checkpoints (the newest and the one being written)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from torch import nn

from lgd.engine.checkpoint import CHECKPOINT
from lgd.engine.solver import Optimization
from lgd.errors import TrainingError


def prepare_output_dir(out: Path, resume: bool = False) -> None:
    """Create ``out`` and prove it writable before any work starts; remove temporaries that killed writes left.

    Raises TrainingError naming the folder and the reason, so an unwritable folder is reported before the
    dataset is read or a model built, not at the first checkpoint hours later; and when ``out`` already holds a
    run's checkpoint and this is not a resume, since starting afresh would overwrite that run.
    """
    if not resume and (out / CHECKPOINT).is_file():
        raise TrainingError(f"output_dir {out} already holds a run ({CHECKPOINT}); continue it with --resume, or "
                            "start a new run in another output_dir (or delete this one to start it over)")
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


def checkpoint_bytes(model: nn.Module, opt: Optimization) -> int:
    """Size of one checkpoint: the model's state plus one SGD momentum buffer per trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for o in opt.optimizers for g in o.param_groups for p in g["params"])
    return state + momentum


def check_free_space(out: Path, needed: int) -> None:
    """Raises TrainingError when ``out``'s file system has fewer than ``needed`` bytes free."""
    free = shutil.disk_usage(out).free
    if free < needed:
        raise TrainingError(
            f"output_dir {out} has {free / 2**20:.0f} MiB free, but this run needs about {needed / 2**20:.0f} MiB "
            "for its checkpoints (the newest and the one being written); free space or choose another output_dir"
        )
