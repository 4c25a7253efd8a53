"""Every runnable docstring example of the package runs (the trace and estimator packages run
theirs in their own test modules)."""

import doctest
import importlib
import pkgutil

import pytest

import molmo_latency

COVERED_ELSEWHERE = ("molmo_latency.trace", "molmo_latency.estimator")
SKIP = ("molmo_latency.__main__", "molmo_latency.cli.main")


def _modules():
    names = ["molmo_latency"]
    for info in pkgutil.walk_packages(molmo_latency.__path__, "molmo_latency."):
        if info.name.startswith(COVERED_ELSEWHERE) or info.name in SKIP:
            continue
        names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    if name.startswith("molmo_latency.scale"):
        pytest.importorskip("ray")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
