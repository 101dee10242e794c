"""What a run reports: a small ``EventStorage`` that hooks put records into, and the writers that receive them.

A record is one line of ``metrics.jsonl``: ``{"kind": "train" | "eval" | "skip", "iter": N, ...}``, with the fields
of its kind (train: ``total_loss``, ``losses``, ``lr``, ``time`` and, for LGD, ``teacher_lr``; eval: ``split`` and
``metrics``; skip: ``terms``, ``gradients`` and ``image_ids``). Each writer takes what it shows of every record:
``JSONWriter`` the whole line, ``TensorboardWriter`` the scalars, ``ConsoleWriter`` the progress bar's figures and,
without a bar, a printed line. Figures no file keeps (the data-loading time) travel beside a record as ``extra``.
``lgd/plots.py`` draws the curves from ``metrics.jsonl`` at the end of a run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from lgd.utils.files import to_json

Record = dict[str, Any]


class EventWriter:
    """One destination of a run's records."""

    def write(self, record: Record, extra: dict[str, float]) -> None:
        """Show or keep ``record`` (and ``extra``, the figures beside it that no file keeps)."""

    def close(self) -> None:
        """Release what the writer holds (files, event streams)."""


class JSONWriter(EventWriter):
    """``metrics.jsonl``: one strict-JSON record per line, flushed at once. On resume the records after the
    checkpoint's iteration are dropped first (``truncate_metrics``); a fresh run starts the file anew."""

    def __init__(self, path: Path, resumed_at: Optional[int] = None, final: bool = False) -> None:
        if resumed_at is None:
            path.unlink(missing_ok=True)
        else:
            truncate_metrics(path, resumed_at, final)
        self.path = path
        self.file = open(path, "a")

    def write(self, record: Record, extra: dict[str, float]) -> None:
        self.file.write(to_json(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorboardWriter(EventWriter):
    """TensorBoard scalars: ``loss/*``, ``lr/student``, ``time/data`` per train record and ``<split>/<metric>`` per
    eval record. ``purge_step`` drops what an interrupted run logged from that step on, as ``JSONWriter`` does."""

    def __init__(self, folder: Path, purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is loaded only by a training run

        self.tb = SummaryWriter(str(folder), purge_step=purge_step)

    def write(self, record: Record, extra: dict[str, float]) -> None:
        it = record["iter"]
        if record["kind"] == "train":
            self.tb.add_scalar("loss/total", record["total_loss"], it)
            for k, v in record["losses"].items():
                self.tb.add_scalar(f"loss/{k}", v, it)
            self.tb.add_scalar("lr/student", record["lr"], it)
            if "data_time" in extra:
                self.tb.add_scalar("time/data", extra["data_time"], it)
        elif record["kind"] == "eval":
            for k, v in record["metrics"].items():
                if not math.isnan(v):
                    self.tb.add_scalar(f"{record['split']}/{k}", v, it)

    def close(self) -> None:
        self.tb.close()


class ConsoleWriter(EventWriter):
    """The train records on the console: loss and learning rate beside the progress bar, or — without a bar
    (``--no-progress``, a log file) — a printed line every ``every`` iterations and at ``max_iter``."""

    def __init__(self, bar: tqdm, every: int, max_iter: int) -> None:
        self.bar, self.every, self.max_iter = bar, every, max_iter

    def write(self, record: Record, extra: dict[str, float]) -> None:
        if record["kind"] != "train":
            return
        done, loss, lr = record["iter"], record["total_loss"], record["lr"]
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}")
        if self.bar.disable and (done % self.every == 0 or done == self.max_iter):
            data = f" ({extra['data_time']:.2f} s loading data)" if "data_time" in extra else ""
            self.bar.write(f"iter {done}/{self.max_iter}: loss {loss:.3f}, lr {lr:.3g}, {record['time']:.2f} s/iter{data}")


class EventStorage:
    """Where hooks put a run's records (rank 0's; other ranks have none): each goes to every writer, in order."""

    def __init__(self, writers: list[EventWriter]) -> None:
        self.writers = writers

    def put(self, kind: str, it: int, extra: Optional[dict[str, float]] = None, **fields: Any) -> None:
        """The record ``{"kind": kind, "iter": it, **fields}`` to every writer, with ``extra`` beside it."""
        record = {"kind": kind, "iter": it, **fields}
        for writer in self.writers:
            writer.write(record, extra or {})

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def truncate_metrics(path: Path, iteration: int, final: bool = False) -> None:
    """On resume, drop records written after the checkpoint so the log reads as one uninterrupted run; with
    ``final`` (the checkpoint is the last iteration, whose evaluation the resumed run repeats) also the evaluation
    records of that iteration."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record["iter"] < iteration or (record["iter"] == iteration and not (final and record["kind"] == "eval")):
                keep.append(line)
        except (ValueError, KeyError):
            continue
    path.write_text("".join(line + "\n" for line in keep))
