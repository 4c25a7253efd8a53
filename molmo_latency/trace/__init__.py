"""Kineto traces and Nsight Systems exports: read them (:mod:`.reader`, :mod:`.nsys`, both into
the same tables; :func:`load_trace` picks one by content), charge GPU time to the annotation that
launched it (:mod:`.attribution`, transform) and name kernel categories (:mod:`.categories`).
Names are imported on first use (``from molmo_latency.trace import read_nsys`` works as ever).

    >>> import tempfile
    >>> from molmo_latency.trace import phase_gpu_table, read_kineto
    >>> from molmo_latency.trace._demo import write_demo_trace
    >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
    >>> phase_gpu_table(trace).select("phase", "step", "gpu_activities").row(0)
    ('vision', 0, 2)
"""

import importlib

#: Public name -> the module defining it, imported on first use (so reading an nsys export in SQL,
#: :mod:`molmo_latency.trace.nsys_sql`, imports no polars).
_WHERE = {
    **dict.fromkeys(("PHASE_GPU_COLUMNS", "annotation_gpu_stats", "annotation_name_stats", "attribute", "busy_ns",
                     "charged_name_stats", "device_gpu_stats", "innermost_range", "kernel_breakdown", "link_launches", "module_gpu_table", "module_op_table",
                     "phase_category_table", "phase_gpu_table", "phase_of", "request_of"), "attribution"),
    **dict.fromkeys(("CATEGORIES", "CPU_OP_RULES", "cpu_op_category", "kernel_category", "with_category"),
                    "categories"),
    **dict.fromkeys(("load_trace", "trace_format"), "load"),
    "read_nsys": "nsys",
    **dict.fromkeys(("KinetoTrace", "read_kineto"), "reader"),
    "TraceWarning": "molmo_latency.errors",
    **dict.fromkeys(("TraceSummary", "summarize"), "summary"),
}

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
    "charged_name_stats",
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


def __getattr__(name: str):
    if name in _WHERE:
        module = _WHERE[name]
        value = getattr(importlib.import_module(module if "." in module else f"molmo_latency.trace.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'molmo_latency.trace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
