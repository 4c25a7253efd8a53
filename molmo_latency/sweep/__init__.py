"""Sweeps: profile a model over a grid of configurations into a run directory.

    >>> from molmo_latency.sweep import SweepSpec
    >>> spec = SweepSpec.from_dict({"crops": [1, 2], "top_k": [2], "blocks": [4], "repeats": 2})
    >>> [c.config_id for c in spec.configs()]
    ['c1-k2-b4-p32-n8-bs1', 'c2-k2-b4-p32-n8-bs1']
"""

from molmo_latency.sweep.spec import Config, SweepSpec, load_sweep
from molmo_latency.hold.rundir import RunDir


def __getattr__(name: str):
    # run_sweep imports torch; analysis code reading run directories (RunDir) must not pull it in
    if name == "run_sweep":
        from molmo_latency.sweep.runner import run_sweep

        return run_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Config", "SweepSpec", "load_sweep", "RunDir", "run_sweep"]
