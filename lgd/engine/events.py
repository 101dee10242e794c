"""Training events: ``metrics.jsonl`` (one JSON record per line: train, eval or skip) and TensorBoard scalars.

``lgd/plots.py`` draws the curves from ``metrics.jsonl`` at the end of a run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from lgd.utils.files import to_json

class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) plus TensorBoard events."""

    def __init__(self, out_dir: Path, purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)

    def train(self, it: int, losses: dict[str, float], total: float, lrs: list[float], seconds: float) -> None:
        record = {"kind": "train", "iter": it, "total_loss": total, "losses": losses, "lr": lrs[0], "time": seconds}
        if len(lrs) > 1:
            record["teacher_lr"] = lrs[1]
        self._write(record)
        self.tb.add_scalar("loss/total", total, it)
        for k, v in losses.items():
            self.tb.add_scalar(f"loss/{k}", v, it)
        self.tb.add_scalar("lr/student", lrs[0], it)

    def eval(self, it: int, split: str, metrics: dict[str, float]) -> None:
        self._write({"kind": "eval", "iter": it, "split": split, "metrics": metrics})
        for k, v in metrics.items():
            if not math.isnan(v):
                self.tb.add_scalar(f"{split}/{k}", v, it)

    def skip(self, it: int, terms: list[str], gradients: list[str], image_ids: list[Any]) -> None:
        """A step that solver.nan_policy=skip left out: which loss terms or parameters' gradients were not
        finite, on which images."""
        self._write({"kind": "skip", "iter": it, "terms": terms, "gradients": gradients, "image_ids": image_ids})

    def _write(self, record: dict) -> None:
        self.file.write(to_json(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


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
