"""Sweeps: profile a model over a grid of configurations into a run directory.

This package measures (it imports torch); reading a run directory needs only
:mod:`molmo_latency.hold`, whose :class:`~molmo_latency.hold.RunDir` is re-exported here.

    >>> from molmo_latency.sweep import SweepSpec
    >>> spec = SweepSpec.from_dict({"crops": [1, 2], "top_k": [2], "blocks": [4], "repeats": 2})
    >>> [c.config_id for c in spec.configs()]
    ['c1-k2-b4-p32-n8-bs1', 'c2-k2-b4-p32-n8-bs1']
"""

from molmo_latency.hold.rundir import RunDir
from molmo_latency.sweep.runner import run_sweep
from molmo_latency.sweep.spec import Config, SweepSpec, load_sweep

__all__ = ["Config", "SweepSpec", "load_sweep", "RunDir", "run_sweep"]
