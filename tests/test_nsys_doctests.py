"""The runnable examples in the docstrings of the nsys reader and the trace loader."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

MODULES = [
    "molmo_latency.trace.nsys",
    "molmo_latency.trace.load",
    "molmo_latency.trace._nsys_demo",
    "molmo_latency.trace.summary",
    "molmo_latency.cli.trace_cmd",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_function_has_an_example():
    missing = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]):
            obj = getattr(module, attr)
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and ">>>" not in (obj.__doc__ or ""):
                missing.append(f"{name}.{attr}")
    assert missing == []
