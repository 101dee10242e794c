"""Weight I/O for detectors: a torchvision weight name (torch's cache, else a download) or a local file.

Only tensors that fit are loaded, so a detector with another class count still takes a checkpoint's backbone.
"""
from __future__ import annotations

import socket
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models

from lgd.errors import WeightsError
from lgd.utils.files import load_torch_file


def load_into(module: nn.Module, spec: str, key: str, strict: bool) -> None:
    """Load a torchvision weight name or a local file; tensors whose shapes differ (e.g. a class head) are skipped."""
    state = _read_weights(spec, key)
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in usable)
    if not usable:
        raise WeightsError(f"{key}={spec}: none of its tensors fit this model (wrong architecture or depth?)")
    module.load_state_dict(usable, strict=False)
    if skipped:
        warnings.warn(f"{key}={spec}: {len(skipped)} tensors with other shapes were not loaded (e.g. {skipped[0]})")
    if strict and missing:
        raise WeightsError(f"{key}={spec}: {len(missing)} tensors missing, e.g. {missing[0]}")


def is_lgd_state(state: dict[str, Tensor]) -> bool:
    """Whether a model state is an LGD model's, which names the student's tensors ``student.*``."""
    return any(str(k).startswith("student.") for k in state)


def student_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The detector's tensors in a model state: an LGD state's ``student.*`` entries without the prefix (teacher and
    adapter left out), any other state as it is."""
    if not is_lgd_state(state):
        return state
    return {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}


def _read_weights(spec: str, key: str) -> dict[str, Tensor]:
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt") or path.exists():
        obj = load_torch_file(path, f"{key} weights file", WeightsError)
        for field in ("model", "state_dict"):  # a training checkpoint, an lgd export, a common wrapper
            if isinstance(obj, dict) and isinstance(obj.get(field), dict):
                obj = obj[field]
                break
        return student_state(obj) if isinstance(obj, dict) else obj
    try:
        weights = models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(
            f"{key}: '{spec}' is neither a file nor a torchvision weight name "
            "(e.g. ResNet50_Weights.IMAGENET1K_V1)"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return load_torch_file(cached, f"{key} cached weights file", WeightsError)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # no network here is the common case; never hang or dump a urllib traceback
        raise WeightsError(
            f"{key}: '{spec}' is not in the local cache ({cached}) and could not be downloaded ({e}). "
            f"Download {weights.url} elsewhere and put it at {cached}, or pass a local .pth file."
        ) from None
    finally:
        socket.setdefaulttimeout(old)

