"""Reading and writing lgd's files safely: strict JSON and weights-only torch loads.

(Atomic, umask-respecting writes are in ``lgd.utils.atomic``; :func:`atomic_save` is ``torch.save`` through them.)

- JSON: Python's ``json`` writes NaN and Infinity, which are not JSON and which strict parsers (``jq``,
  JavaScript, most databases) reject. Every JSON lgd writes goes through :func:`to_json`, which writes
  ``null`` for a non-finite number (e.g. COCO's APl on a split without large objects).
- torch files: ``torch.load(weights_only=False)`` unpickles arbitrary objects, so opening a downloaded
  checkpoint could run any code it carries. lgd writes only tensors, numbers, strings, lists and dicts and
  reads every file with ``weights_only=True`` (:func:`load_torch_file`).
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from lgd.errors import LGDError
from lgd.utils.atomic import atomic_write


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes ``null`` for NaN / Infinity; ``kwargs`` go to ``json.dumps``.

    Raises:
        ValueError: never for non-finite floats (they are replaced first); ``allow_nan=False`` guarantees
            that none slips through in a type this function does not walk.
    """
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def load_torch_file(path: Path, what: str, error: type[LGDError] = LGDError) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with messages that name the file and what it is.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. "checkpoint", "model.backbone_weights file").
        error: the exception class to raise.

    Raises:
        ``error``: the file is missing or unreadable, or holds Python objects other than tensors, numbers,
            strings, lists and dicts (which a weights-only load refuses, since unpickling them runs code).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise error(
            f"{what} {path} holds Python objects ({_unsafe_globals(path)}) besides tensors, numbers, strings, lists "
            "and dicts. lgd loads files with torch.load(weights_only=True) only, since unpickling such objects "
            "runs code the file carries. If you trust the file, save its tensors alone, e.g. "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth'), or, for a file an "
            "older lgd wrote, write it again with this version."
        ) from None
    except Exception as e:  # a truncated, corrupt or foreign file
        raise error(f"cannot read {what} {path}: {e}") from None


def _unsafe_globals(path: Path) -> str:
    """The Python classes and functions a file would unpickle, e.g. "numpy.core.multiarray._reconstruct"."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an older torch without this function, or a file it cannot scan
        return "objects a weights-only load does not allow"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically: a crash never leaves half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The ``hashlib`` digest of a file's bytes (read 1 MiB at a time), as hex digits."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
