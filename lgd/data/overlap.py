"""Images that are both in the training and the validation split: a validation score on them measures memory.

Two image files are the same image when they are one file (same device and inode: a path reached twice, a hard or
symbolic link) or have the same bytes. Bytes are compared by SHA-1 only among files of equal size, so a typical
pair of splits, where sizes differ, reads no file; a re-encoded or resized copy is not caught.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lgd.errors import count
from lgd.utils.files import file_digest

if TYPE_CHECKING:
    from lgd.data.coco import CocoDetection

EXAMPLES = 3


def shared_files(train: list[Path], val: list[Path]) -> list[tuple[Path, Path, str]]:
    """(val file, train file, how: "the same file" or "same bytes, SHA-1 ...") for each val file also in ``train``.

    Raises:
        OSError: a file cannot be read (datasets check their files exist before this runs).
    """
    by_inode: dict[tuple[int, int], Path] = {}
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in train:
        st = path.stat()
        by_inode.setdefault((st.st_dev, st.st_ino), path)
        by_size[st.st_size].append(path)
    hashes: dict[Path, str] = {}

    def sha1(path: Path) -> str:
        if path not in hashes:
            hashes[path] = file_digest(path, "sha1")
        return hashes[path]

    found = []
    for path in val:
        st = path.stat()
        same = by_inode.get((st.st_dev, st.st_ino))
        if same is not None:
            found.append((path, same, "the same file"))
            continue
        digest = sha1(path) if st.st_size in by_size else ""
        copy = next((p for p in by_size.get(st.st_size, []) if sha1(p) == digest), None)
        if copy is not None:
            found.append((path, copy, f"same bytes, SHA-1 {digest[:12]}"))
    return found


def shared_images(train: "CocoDetection", val: "CocoDetection") -> Optional[str]:
    """A warning text when some validation images are training images (see the module), else None."""
    def files(dataset: "CocoDetection") -> list[Path]:
        return [dataset.root / dataset.image_info(i)["file_name"] for i in range(len(dataset))]

    val_files = files(val)
    found = shared_files(files(train), val_files)
    if not found:
        return None
    examples = "; ".join(f"{v} ({how})" if v == t else f"{v} is {t} ({how})" for v, t, how in found[:EXAMPLES])
    verb = "is a training image" if len(found) == 1 else "are also training images"
    return (f"{len(found)} of the {count(len(val_files), 'validation image')} {verb} (e.g. "
            f"{examples}): the validation AP on them measures what the model memorised, not how it generalises. "
            f"Hold them out of the training split")
