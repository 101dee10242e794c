"""Stop signals: the first SIGINT/SIGTERM asks training to stop after the step in progress (a checkpoint follows),
a second stops at once; data-loading workers leave both to the main process."""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional


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
        self._args = (signum, iteration, checkpoint, is_main)

    def __reduce__(self) -> tuple:
        # A run stopped inside a process pool (benchmarks/accuracy.py) returns this to its parent pickled; the
        # default reduction re-calls __init__ with the message alone, which fails there and breaks the pool, whose
        # other runs are then killed before their checkpoints.
        return type(self), self._args


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
            # Nothing the announcement meets may escape: raised here, it would abort the step this signal
            # interrupted, and its checkpoint. A closed reader (lgd/utils/streams.py), or a write to stderr that the
            # signal interrupted (the buffer's "reentrant call" RuntimeError), costs only the line.
            try:
                print(f"\nlgd: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
            except (OSError, RuntimeError):
                pass

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loading workers leave SIGINT/SIGTERM to the main process: a terminal's Ctrl-C reaches the whole
    process group (as does a scheduler's or ``pkill``'s SIGTERM), and a worker dying of it would break the step
    the main process is finishing. So nothing can leave them behind at exit, train() stops them itself
    (``stop_workers``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
