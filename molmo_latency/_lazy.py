"""Lazy package exports: each public name of a package is imported from its submodule on first
use, so importing one submodule (or the package for one name) does not load the others.

Example:
    >>> import types
    >>> pkg = types.ModuleType("pkg")
    >>> getattr_, dir_ = lazy_exports("json", {"dumps": "decoder"}, vars(pkg))
    >>> getattr_("nothing")
    Traceback (most recent call last):
    ...
    AttributeError: module 'json' has no attribute 'nothing'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """A package's ``(__getattr__, __dir__)``: `where` maps each public name to the submodule
    defining it; a name is imported once, then kept in the package's `namespace`."""

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
