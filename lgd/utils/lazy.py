"""Package faces that import a name's module only when the name is first read (PEP 562).

``import lgd.config`` first runs ``lgd/__init__.py``, and ``import lgd.data.difficulty`` runs
``lgd/data/__init__.py``: an eager face would load torch for a module that needs none.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that reads each name of ``exports`` ({name: module}) from its
    module on first use and keeps it in the package's namespace."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
