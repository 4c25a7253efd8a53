"""NVML telemetry on the phase timeline: collect (device, sampler), hold (samples frames),
transform (aggregate per phase/request), show (counter tracks in a Kineto trace).

The profiler takes the settings as one value, checked once, and opens the sampler on the GPU
:func:`resolve_gpu` names (by UUID) for the model (see :mod:`molmo_latency.telemetry.source`)::

    from molmo_latency.telemetry import NvmlSettings, attach_telemetry, open_telemetry, stop_telemetry

    settings = NvmlSettings("auto", interval_ms=50.0)  # "auto" | "off" | "required"
    sampler = open_telemetry(settings, model)         # None when off or unavailable
    try:
        ...                                           # profiled generate() calls
    finally:
        samples = stop_telemetry(sampler, settings.mode)
    report = attach_telemetry(report, samples)
"""

from molmo_latency._lazy import lazy_exports

# Lazy: importing one submodule (e.g. ``telemetry.throttle`` from explain) must not load the
# device layer; each public name is imported from its module on first use.
_WHERE = {
    "aggregate_intervals": "aggregate", "attach_telemetry": "aggregate", "empty_telemetry_columns": "aggregate",
    "add_counter_tracks": "counters", "add_request_counter_tracks": "counters",
    "estimate_clock_offset_ns": "counters",
    "FakeGpu": "device", "GpuDevice": "device", "GpuReading": "device", "NvmlGpu": "device", "open_gpu": "device",
    "SLOWDOWN_REASONS_MASK": "throttle", "THROTTLE_REASONS": "throttle", "is_slowdown": "throttle",
    "throttle_reason_names": "throttle",
    "NVML_MODES": "policy", "NvmlSettings": "policy", "NvmlWarning": "policy", "start_telemetry": "policy",
    "stop_telemetry": "policy",
    "GpuIdentity": "source", "open_telemetry": "source", "resolve_gpu": "source",
    "NvmlSampler": "sampler", "empty_samples": "sampler",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())


__all__ = [
    "NVML_MODES",
    "SLOWDOWN_REASONS_MASK",
    "THROTTLE_REASONS",
    "FakeGpu",
    "GpuDevice",
    "GpuIdentity",
    "GpuReading",
    "NvmlGpu",
    "NvmlSampler",
    "NvmlSettings",
    "NvmlWarning",
    "add_counter_tracks",
    "add_request_counter_tracks",
    "aggregate_intervals",
    "attach_telemetry",
    "empty_samples",
    "empty_telemetry_columns",
    "estimate_clock_offset_ns",
    "is_slowdown",
    "open_gpu",
    "open_telemetry",
    "resolve_gpu",
    "start_telemetry",
    "stop_telemetry",
    "throttle_reason_names",
]
