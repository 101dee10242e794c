"""How hard the built-in dataset is (``data.synth.*``): the generator's knobs and their bounds.

Apart from ``lgd.data.synthetic``, which draws the images, so that ``lgd.config`` checks these keys without
loading the generator's imaging libraries.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

CLASS_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond",
)
EMPTY_PROB = 0.03  # share of images with no object at all


@dataclass(frozen=True)
class Difficulty:
    """How hard the built-in dataset is. The defaults are the benchmark dataset, byte for byte.

    Each knob only changes the numbers the generator draws with, never the order of its random
    draws, except ``clutter=False``, which skips the clutter's draws altogether.
    """

    num_classes: int = len(CLASS_NAMES)  # the first N of CLASS_NAMES
    min_object_px: float = 8.0  # smallest object diameter (px); also the smallest distractor's
    max_objects: int = 12  # an ordinary image has 1 to this many objects
    crowded_prob: float = 0.08  # share of crowded images: 20-30 objects of at most size / 5
    clutter: bool = True  # unannotated distractors (blobs, bars, lines, scribbles) and thin lines over objects

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be 1 to {len(CLASS_NAMES)}, got {self.num_classes}")
        if self.min_object_px < 2:
            raise ValueError(f"min_object_px must be at least 2, got {self.min_object_px}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")
        if not 0.0 <= self.crowded_prob <= 1.0 - EMPTY_PROB:
            raise ValueError(f"crowded_prob must be 0 to {1.0 - EMPTY_PROB}, got {self.crowded_prob}")

    @classmethod
    def of(cls, settings: object) -> "Difficulty":
        """The difficulty named by an object with these fields as attributes (``cfg.data.synth``)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def tag(self) -> str:
        """The part of the dataset's folder name that names the knobs differing from the defaults ('' for none)."""
        default = Difficulty()
        parts = []
        if self.num_classes != default.num_classes:
            parts.append(f"k{self.num_classes}")
        if self.min_object_px != default.min_object_px:
            parts.append(f"min{self.min_object_px:g}")
        if self.max_objects != default.max_objects:
            parts.append(f"max{self.max_objects}")
        if self.crowded_prob != default.crowded_prob:
            parts.append(f"crowd{self.crowded_prob:g}")
        if not self.clutter:
            parts.append("noclutter")
        return "".join("-" + p for p in parts)
