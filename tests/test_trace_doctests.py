"""The runnable examples in the docstrings of the trace readers (Kineto and nsys), the trace
loader and the trace CLI command."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "molmo_latency.trace",
    "molmo_latency.trace.reader",
    "molmo_latency.trace._events",
    "molmo_latency.trace._checks",
    "molmo_latency.trace._text",
    "molmo_latency.trace.attribution",
    "molmo_latency.trace.categories",
    "molmo_latency.trace.summary",
    "molmo_latency.trace._demo",
    "molmo_latency.cli.trace_cmd",
    "molmo_latency.trace.nsys",
    "molmo_latency.trace.nsys_sql",
    "molmo_latency.trace.load",
    "molmo_latency.trace._nsys_demo",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_function_has_an_example():
    import inspect

    missing = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]):
            obj = getattr(module, attr)
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                if ">>>" not in (obj.__doc__ or ""):
                    missing.append(f"{name}.{attr}")
    assert missing == []
