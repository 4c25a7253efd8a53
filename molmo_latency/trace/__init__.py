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

import importlib

# Names -> the module that defines them, imported on first use (PEP 562): `trace summary` loads
# the reader and the summary only, not attribution's phase tables or the nsys reader.
_WHERE = {
    **dict.fromkeys(("PHASE_GPU_COLUMNS", "annotation_gpu_stats", "annotation_name_stats", "attribute", "busy_ns",
                     "device_gpu_stats", "innermost_range", "kernel_breakdown", "link_launches",
                     "phase_category_table", "phase_gpu_table", "phase_of", "request_of"),
                    "molmo_latency.trace.attribution"),
    **dict.fromkeys(("CATEGORIES", "CPU_OP_RULES", "cpu_op_category", "kernel_category", "with_category"),
                    "molmo_latency.trace.categories"),
    **dict.fromkeys(("load_trace", "trace_format"), "molmo_latency.trace.load"),
    "read_nsys": "molmo_latency.trace.nsys",
    **dict.fromkeys(("KinetoTrace", "TraceWarning", "read_kineto"), "molmo_latency.trace.reader"),
    **dict.fromkeys(("TraceSummary", "summarize"), "molmo_latency.trace.summary"),
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


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
