"""Kineto traces and Nsight Systems exports: read them (:mod:`.reader`, :mod:`.nsys`, both into
the same tables; :func:`load_trace` picks one by content), charge GPU time to the annotation that
launched it (:mod:`.attribution`, transform) and name kernel categories (:mod:`.categories`).

    >>> import tempfile
    >>> from molmo_latency.trace import phase_gpu_table, read_kineto
    >>> from molmo_latency.trace._demo import write_demo_trace
    >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
    >>> phase_gpu_table(trace).select("phase", "step", "gpu_activities").row(0)
    ('vision', 0, 2)
"""

from molmo_latency.trace.attribution import (
    PHASE_GPU_COLUMNS,
    annotation_gpu_stats,
    annotation_name_stats,
    attribute,
    busy_ns,
    device_gpu_stats,
    innermost_range,
    kernel_breakdown,
    link_launches,
    module_gpu_table,
    module_op_table,
    phase_category_table,
    phase_gpu_table,
    phase_of,
    request_of,
)
from molmo_latency.trace.categories import CATEGORIES, CPU_OP_RULES, cpu_op_category, kernel_category, with_category
from molmo_latency.trace.load import load_trace, trace_format
from molmo_latency.trace.nsys import read_nsys
from molmo_latency.trace.reader import KinetoTrace, TraceWarning, read_kineto
from molmo_latency.trace.summary import TraceSummary, summarize

__all__ = [
    "CATEGORIES",
    "CPU_OP_RULES",
    "cpu_op_category",
    "PHASE_GPU_COLUMNS",
    "KinetoTrace",
    "TraceSummary",
    "TraceWarning",
    "annotation_gpu_stats",
    "annotation_name_stats",
    "attribute",
    "busy_ns",
    "device_gpu_stats",
    "innermost_range",
    "kernel_breakdown",
    "kernel_category",
    "load_trace",
    "link_launches",
    "module_gpu_table",
    "module_op_table",
    "phase_category_table",
    "phase_gpu_table",
    "phase_of",
    "read_kineto",
    "read_nsys",
    "request_of",
    "summarize",
    "trace_format",
    "with_category",
]
