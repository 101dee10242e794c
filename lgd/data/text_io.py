"""Reading the text files users give lgd: annotation JSON, label files, class names, split lists, ``.odgt``.

Every one is decoded as ``utf-8-sig``: UTF-8, with the byte-order mark that common Windows editors write at
the start dropped (it would otherwise become part of the first class name or the first label field).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lgd.errors import DatasetError


def read_text(path: Path, what: str) -> str:
    """The text of ``path`` decoded as ``utf-8-sig``; ``what`` names the file's role in messages ("YOLO label file").

    Raises:
        DatasetError: the file is missing, unreadable or not UTF-8 (the message gives the byte offset).
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 4]!r}): "
            f"save it as UTF-8") from None
    except OSError as exc:
        raise DatasetError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


def read_json(path: Path, what: str) -> Any:
    """The JSON document in ``path`` (read as :func:`read_text` reads it).

    Raises:
        DatasetError: as :func:`read_text`, or the text is not valid JSON (the message gives line and column).
    """
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
