"""Public names of a package loaded on first use (keeps ``import stemgpu`` cheap).

Examples
--------
>>> import stemgpu.io as io
>>> io.open.__module__
'stemgpu.io.nion'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose names ``table`` maps to modules.

    A module is absolute (``"stemgpu.io.nion"``) or relative to ``package`` (``"find"`` or
    ``".find"``); the name is imported on first access and then kept in the package.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if not module.startswith(("stemgpu", ".")):
            module = "." + module
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
