"""Package faces that import a name's module only when the name is first read (PEP 562).

``import lgd.config`` first runs ``lgd/__init__.py``, and ``import lgd.data.difficulty`` runs
``lgd/data/__init__.py``: an eager face would load torch for a module that needs none.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``'s face: each name of ``modules`` ({module: names}) is read from
    its module on first use and then kept in the package's namespace."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__, sorted(home)
