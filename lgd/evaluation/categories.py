"""The categories a model was trained on, and the check that a split to evaluate has the same ones.

A model predicts labels 0..K-1 (or 1..K) that mean its training categories in order; scored against a split
whose categories differ, its labels would be read as other classes and the AP would be silently wrong.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lgd.errors import DatasetError, count

if TYPE_CHECKING:
    from lgd.data import CocoDetection

Categories = dict[str, list]  # {"ids": [category id, ...] ascending, "names": [name, ...] in the same order}


def dataset_categories(dataset: "CocoDetection") -> Categories:
    """A dataset's categories as stored in checkpoints: plain lists, loadable with ``weights_only=True``."""
    return {"ids": list(dataset.cat_ids), "names": list(dataset.class_names)}


def read_categories(ann: Path) -> Categories:
    """The categories of a COCO instances file, in category-id order (as ``CocoDetection`` orders them),
    read without validating or indexing the rest of the file.

    Raises:
        DatasetError: the file is unreadable or has no valid ``categories`` list.
    """
    try:
        records = json.loads(Path(ann).read_text())["categories"]
        pairs = sorted((int(c["id"]), str(c["name"])) for c in records)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"cannot read categories from {ann}: {e}") from None
    return {"ids": [i for i, _ in pairs], "names": [n for _, n in pairs]}


def check_categories(model: Categories, dataset: "CocoDetection", split: str, source: str) -> None:
    """Raise unless ``dataset`` (the split to evaluate) has exactly the model's categories.

    Args:
        model: the categories the model was trained on.
        dataset: the split to evaluate.
        split: its name ("val", "test", ...), for the message.
        source: where ``model`` came from, for the message (e.g. "checkpoint outputs/run/model_final.pth").

    Raises:
        DatasetError: the names, ids or number of categories differ; the message lists both sets.
    """
    own = dataset_categories(dataset)
    if own == {"ids": list(model["ids"]), "names": list(model["names"])}:
        return
    raise DatasetError(
        f"the {split} split {dataset.ann_file} has {_describe(own)}, but the model's categories are "
        f"{_describe(model)} ({source}). Its labels would be scored as the wrong classes; evaluate on a split "
        f"with the training categories (same names and ids): set data.{split}.root and data.{split}.ann."
    )


def _describe(categories: Categories, limit: int = 8) -> str:
    items = [f"{i}:{n}" for i, n in zip(categories["ids"], categories["names"])]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return f"{count(len(items), 'category')} (id:name {', '.join(items[:limit])}{more})"
