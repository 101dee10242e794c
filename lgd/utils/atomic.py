"""Atomic file writes: write a temporary file in the same folder, then rename it into place.

A crash or kill mid-write leaves the previous file intact and no half-written one. The file gets the
permissions any new file gets (0666 less the umask, e.g. 0644 under umask 022), not the owner-only 0600 of
``tempfile.mkstemp``: configs, checkpoints and exports stay readable to whoever may read the folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then move the result to ``path``; on any failure remove the temporary.

    ``write`` finds the temporary file created (empty); it may overwrite or replace it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never reuse an existing file; mode 0o666 is masked by the umask, as for any new file.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def ensure_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Return folder ``target``, first calling ``write(folder)`` on a fresh temporary sibling renamed into place.

    An interrupted ``write`` leaves no folder at ``target`` (only a ``.<name>.tmp-*`` sibling, never mistaken for a
    finished one, and removed on failure). When two processes write at once, the first rename wins and the other
    copy is discarded. An existing ``target`` is returned untouched.
    """
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
