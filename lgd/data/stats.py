"""What a dataset holds: images, objects, the class histogram and the object size distribution.

Counts what training uses (a loaded ``CocoDetection``: boxes clipped to their image, annotations skipped at load
left out), so on every format once converted. Sizes are ``sqrt(w * h)`` of the box in pixels, bucketed with COCO's
small / medium / large area limits (32², 96²).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from lgd.errors import count

if TYPE_CHECKING:
    from lgd.data.coco import CocoDetection

SMALL, LARGE = 32.0, 96.0  # COCO's area limits are SMALL**2 and LARGE**2


@dataclass
class DatasetStats:
    """Counts of one split; crowd / ignore / difficult annotations are counted apart, not as objects.

    Attributes:
        images: image records; empty_images: those without an object.
        objects: annotations that are trained on; ignored: iscrowd (difficult, ignore regions) ones.
        per_class: class name -> objects, every category listed (zeros included), in category-id order.
        sizes: (objects,) float64 ``sqrt(w * h)`` in pixels.
        per_image: (images,) int64 objects in each image.
    """

    images: int
    empty_images: int
    objects: int
    ignored: int
    per_class: dict[str, int]
    sizes: np.ndarray
    per_image: np.ndarray

    def buckets(self) -> dict[str, int]:
        """Objects per COCO size bucket (by area = size²)."""
        return {
            "small": int((self.sizes < SMALL).sum()),
            "medium": int(((self.sizes >= SMALL) & (self.sizes < LARGE)).sum()),
            "large": int((self.sizes >= LARGE).sum()),
        }

    def text(self) -> str:
        lines = [f"{count(self.images, 'image')} ({self.empty_images} without objects), "
                 f"{count(self.objects, 'object')} (+{self.ignored} ignored: crowd / difficult / ignore regions), "
                 f"{count(len(self.per_class), 'class')}"]
        if self.images:
            lines.append(f"objects per image: mean {self.per_image.mean():.2f}, max {self.per_image.max()}")
        if self.objects:
            q = np.percentile(self.sizes, [0, 50, 100])
            shares = ", ".join(f"{k} {v} ({100 * v / self.objects:.0f}%)" for k, v in self.buckets().items())
            lines.append(f"object size sqrt(w*h) px: min {q[0]:.1f}, median {q[1]:.1f}, max {q[2]:.1f}; {shares}")
        width = max((len(n) for n in self.per_class), default=5)
        lines.append("objects per class:")
        lines += [f"  {name:<{width}} {count:>8}" for name, count in self.per_class.items()]
        return "\n".join(lines)


def dataset_stats(dataset: CocoDetection) -> DatasetStats:
    """Statistics of a split as training sees it (see ``CocoDetection.trained_objects``)."""
    boxes, classes, per_image = dataset.trained_objects()
    counts = np.bincount(classes, minlength=dataset.num_classes)
    wh = (boxes[:, 2:] - boxes[:, :2]).astype(np.float64)
    return DatasetStats(
        images=len(per_image),
        empty_images=int((per_image == 0).sum()),
        objects=len(boxes),
        ignored=sum(1 for a in dataset.coco.dataset["annotations"] if a.get("iscrowd", 0)),
        per_class={name: int(n) for name, n in zip(dataset.class_names, counts)},
        sizes=np.sqrt(wh.prod(axis=1)),
        per_image=per_image,
    )


def plot_stats(stats: DatasetStats, out: Path, title: str) -> Path:
    """Write a PNG: the class histogram (left) and the object size histogram with the COCO limits (right)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    classes, sizes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    names = list(stats.per_class)
    classes.bar(range(len(names)), list(stats.per_class.values()), color="C0")
    classes.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize="small")
    classes.set_ylabel("objects")
    classes.set_title(f"{title}: {stats.objects} objects in {stats.images} images")
    if stats.objects:
        edges = np.geomspace(max(stats.sizes.min(), 1.0), max(stats.sizes.max(), 2.0), 30)
        sizes.hist(np.clip(stats.sizes, edges[0], None), bins=edges, color="C1")
        sizes.set_xscale("log")
        ticks = [t for t in (2, 4, 8, 16, 32, 64, 96, 128, 256, 512, 1024, 2048) if edges[0] / 2 <= t <= edges[-1] * 2]
        sizes.set_xticks(ticks, [str(t) for t in ticks])
        sizes.xaxis.set_minor_formatter(NullFormatter())
        for limit, label in ((SMALL, "small | medium"), (LARGE, "medium | large")):
            sizes.axvline(limit, color="black", linestyle="--", linewidth=1)
            sizes.text(limit, 0.98, f" {label}", transform=sizes.get_xaxis_transform(), va="top", fontsize="small")
    sizes.set_xlabel("object size sqrt(w * h), pixels (log scale)")
    sizes.set_ylabel("objects")
    sizes.set_title(", ".join(f"{k} {v}" for k, v in stats.buckets().items()))
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    return out
