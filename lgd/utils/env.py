"""Where a process runs and how its random generators start: the ``device`` setting and the seeds."""
from __future__ import annotations

import random

import numpy as np
import torch

from lgd.errors import LGDError


def resolve_device(name: str) -> torch.device:
    """The ``device`` setting as a torch device ("auto": CUDA when there is one). Raises LGDError for CUDA
    requested where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LGDError(f"device={name} was requested but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: initialisation and augmentation follow ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
