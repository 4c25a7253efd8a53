"""Trace diff: what changed between two traces or two runs, phase by phase and kernel by
kernel, with noise told apart from change.

``diff(A, B)`` takes two Kineto traces, two run directories of the sweep runner, or one of
each, and returns a :class:`DiffResult` of polars tables: ``phases`` (per phase and per decode
step: medians, p95, difference of medians with a bootstrap CI, verdict) and ``kernels`` (kernels
or CPU ops aligned by name, ranked by their contribution to the change), ``categories``
(per-category sums side by side). The building blocks are pure functions from frames to frames:
:func:`phase_diff`, :func:`kernel_diff`, :func:`category_diff`, :func:`normalize_kernel_name`.

Example:
    >>> import tempfile
    >>> from molmo_latency.diff import diff
    >>> from molmo_latency.trace._demo import write_demo_trace
    >>> trace = write_demo_trace(tempfile.mkdtemp())
    >>> result = diff(trace, trace)
    >>> sorted(result.to_dict())[:4]
    ['a', 'a_kind', 'b', 'b_kind']
    >>> result.kernels.select("name", "a_count", "b_count", "delta_us").row(0)
    ('Memcpy HtoD (Pageable -> Device)', 1, 1, 0.0)
"""

from molmo_latency.diff.core import Comparison, DiffResult, diff
from molmo_latency.diff.kernels import (category_diff, cpu_op_category, cpu_self_ns, kernel_diff,
                                        normalize_kernel_name, ops_table)
from molmo_latency.diff.phases import phase_diff, run_phase_samples, trace_phase_samples
from molmo_latency.diff.sources import DiffError
from molmo_latency.diff.stats import VERDICTS, compare_samples, describe_rule

__all__ = [
    "Comparison", "DiffError", "DiffResult", "VERDICTS", "category_diff", "compare_samples",
    "cpu_op_category", "cpu_self_ns", "describe_rule", "diff", "kernel_diff", "normalize_kernel_name",
    "ops_table", "phase_diff", "run_phase_samples", "trace_phase_samples",
]
