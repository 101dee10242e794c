"""Training curves from `metrics.jsonl`: losses and AP against iteration.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so nothing here
needs a display or changes the process-wide matplotlib backend.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lgd.errors import LGDError

TEACHER_PREFIX = "teacher/"  # of the teacher's loss terms in train records
TEACHER_SPLIT_SUFFIX = "_teacher"  # of the split the teacher diagnostic's eval records name ("val_teacher")


def read_metrics(metrics_file: Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order.

    Lines that are not valid JSON objects are skipped: a run killed mid-write leaves a
    truncated last line, and a resumed run appends after it. Skipping any line other than
    the last raises a warning naming the line numbers.

    Raises:
        LGDError: the file does not exist.
    """
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        raise LGDError(f"metrics file not found: {metrics_file}")
    lines = metrics_file.read_text().splitlines()
    records: list[dict] = []
    bad: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad and bad != [len(lines)]:
        warnings.warn(f"{metrics_file}: skipped unreadable lines {bad}", stacklevel=2)
    return records


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average of a 1-D series; the first points average what exists."""
    if window <= 1 or values.size == 0:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    counts = np.minimum(ends, window)
    return (cumulative[ends] - cumulative[ends - counts]) / counts


def plot_metrics(metrics_file: Path, out_dir: Path) -> list[Path]:
    """Write `loss.png` and `ap.png` for a training run into `out_dir`.

    loss.png: the total loss and every loss term against iteration, lightly smoothed, on
    a log scale; teacher terms are dashed in the colour of the matching student term.
    ap.png: each AP metric ("<iou type>/AP...") of each evaluated split against iteration,
    one panel per iou type, a colour per metric, the teacher diagnostic's curves dashed; written
    only when eval records hold an AP value (not NaN).

    Returns:
        The paths written.

    Raises:
        LGDError: the file is missing or holds neither train nor eval records.
    """
    records = read_metrics(metrics_file)
    train = [r for r in records if r.get("kind") == "train" and "iter" in r]
    evals = [r for r in records if r.get("kind") == "eval" and "iter" in r]
    if not train and not evals:
        raise LGDError(f"no train or eval records in {metrics_file}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if train:
        written.append(_plot_losses(train, out_dir / "loss.png"))
    ap_png = _plot_ap(evals, out_dir / "ap.png")
    if ap_png is not None:
        written.append(ap_png)
    return written


def _plot_losses(train: list[dict], out: Path) -> Path:
    # name -> iter -> value; a resumed run logs some iterations again and its values win.
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for record in train:
        terms = {"total_loss": record.get("total_loss"), **record.get("losses", {})}
        for name, value in terms.items():
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                series[name][record["iter"]] = float(value)

    figure = Figure(figsize=(10, 6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    styles = paired_styles(set(series) - {"total_loss"}, lambda name: name.removeprefix(TEACHER_PREFIX))
    styles["total_loss"] = {"color": "black", "linewidth": 2.0}
    window = max(1, len(train) // 50)
    for name in sorted(series, key=lambda n: (n != "total_loss", n)):
        iters, values = (np.asarray(column) for column in zip(*sorted(series[name].items())))
        axes.plot(iters, smooth(values, window), label=name, **{"linewidth": 1.2, **styles[name]})
    axes.set_yscale("log")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss" + (f" (moving average over {window} records)" if window > 1 else ""))
    axes.grid(True, which="both", alpha=0.3)
    if series:
        axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    return out


def paired_styles(names: Iterable[str], student_of: Callable[[str], str]) -> dict[str, dict]:
    """matplotlib line keywords per curve name: a colour of its own for each student curve, and its teacher's
    curve (a name that ``student_of`` maps to another) dashed in the same colour."""
    names = sorted(names)
    color_of = {name: f"C{i % 10}" for i, name in enumerate(sorted({student_of(n) for n in names}))}
    return {name: {"color": color_of[student_of(name)], "linestyle": "-" if student_of(name) == name else "--"}
            for name in names}


def _student_curve(label: str) -> str:
    """The student's curve of an AP curve label "<split> <metric>": "val_teacher AP50" -> "val AP50"."""
    split, _, metric = label.partition(" ")
    return f"{split.removesuffix(TEACHER_SPLIT_SUFFIX)} {metric}"


def _plot_ap(evals: list[dict], out: Path) -> Path | None:
    """Draw the AP panels; None, and no file, when there is no AP value to draw."""
    figure = ap_figure(evals)
    if figure is None:
        return None
    figure.savefig(out, dpi=100)
    return out


def ap_figure(evals: list[dict]) -> Figure | None:
    """The AP panels of eval records, one per iou type, a curve per split and metric, the teacher diagnostic's
    (split ``val_teacher``) dashed in the colour of the student's; None when there is no AP value to draw."""
    # iou type -> "split metric" -> iter -> AP; as for losses, a later record wins.
    panels: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for record in evals:
        split = record.get("split", "val")
        for key, value in record.get("metrics", {}).items():
            iou_type, _, metric = key.rpartition("/")
            # NaN is COCO's "no such objects" (e.g. APl on small-object data): nothing to draw.
            is_number = isinstance(value, (int, float)) and not math.isnan(value)
            if metric.startswith("AP") and is_number:
                panels[iou_type or "ap"][f"{split} {metric}"][record["iter"]] = float(value)
    if not panels:
        return None

    figure = Figure(figsize=(7 * max(1, len(panels)), 5))
    FigureCanvasAgg(figure)
    for index, (iou_type, curves) in enumerate(sorted(panels.items()), start=1):
        axes = figure.add_subplot(1, len(panels), index)
        styles = paired_styles(curves, _student_curve)
        for label, points in sorted(curves.items()):
            iters, values = zip(*sorted(points.items()))
            axes.plot(iters, values, marker="o", markersize=3, label=label, **styles[label])
        axes.set_title(iou_type)
        axes.set_xlabel("iteration")
        axes.set_ylabel("AP (%)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


def plot_ap_curves(curves: dict[str, list[tuple[int, float]]], out: Path, title: str,
                   styles: dict[str, dict] | None = None) -> Path:
    """Several named AP-vs-iteration curves on one figure, e.g. baseline against LGD.

    Args:
        curves: name -> [(iteration, AP in percent), ...].
        out: the PNG to write; its folder is created.
        title: the figure title.
        styles: name -> matplotlib line keywords (``color``, ``linestyle``, ...) for some curves.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, points in curves.items():
        if points:
            iters, values = zip(*sorted(points))
            axes.plot(iters, values, label=name, **({"marker": "o", "markersize": 3} | (styles or {}).get(name, {})))
    axes.set_title(title)
    axes.set_xlabel("iteration")
    axes.set_ylabel("AP (%)")
    axes.grid(True, alpha=0.3)
    if any(curves.values()):
        axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    return out
