"""Standard output and error that outlive their reader, so that a run's last steps do not depend on them.

``lgd train ... 2>&1 | tee log`` and Ctrl-C: the terminal sends SIGINT to the whole process group, ``tee`` dies
of it and the next line ``lgd`` prints (the signal's own announcement) raises BrokenPipeError, which would
abort the step it interrupted before its checkpoint, and which ``lgd``'s ``| head`` rule reads as success
(issue 26). Python's documented answer to a closed pipe (the ``signal`` module's "Note on SIGPIPE") is to point
the stream's file descriptor at ``os.devnull`` and carry on: :func:`outliving_reader` does that for stdout and
stderr while it is active, so the run checkpoints and exits with its own status, its later lines lost.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO


class OutlivingStream:
    """A text stream (``sys.stdout``, ``sys.stderr``) whose writes and flushes succeed once its reader is gone.

    On the first BrokenPipeError the stream's file descriptor is made a duplicate of ``os.devnull``, so what is
    still buffered, and every later write, is discarded without an error; ``closed_reader`` then says so. Every
    other attribute is the wrapped stream's.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.closed_reader = False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        self.closed_reader = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        finally:
            os.close(devnull)
        try:  # what the failed write left in the buffer now goes to devnull
            self.stream.flush()
        except BrokenPipeError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def outliving_reader() -> Iterator[None]:
    """While active, ``sys.stdout`` and ``sys.stderr`` are :class:`OutlivingStream` wrappers of themselves
    (streams without a file descriptor, such as pytest's capture, are left as they are)."""
    previous = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (OutlivingStream(s) if _has_fd(s) else s for s in previous)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):  # here, where a closed reader is survived, not at exit
            stream.flush()
        sys.stdout, sys.stderr = previous


def _has_fd(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both OSError and ValueError
        return False
    return True
