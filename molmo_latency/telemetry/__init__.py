"""NVML telemetry on the phase timeline: collect (device, sampler), hold (samples frames),
transform (aggregate per phase/request), show (counter tracks in a Kineto trace).

The profiler needs three calls (see :mod:`molmo_latency.telemetry.policy`)::

    from molmo_latency.telemetry import attach_telemetry, start_telemetry, stop_telemetry

    sampler = start_telemetry(nvml, gpu_index)      # "auto" | "off" | "required"
    try:
        ...                                         # profiled generate() calls
    finally:
        samples = stop_telemetry(sampler, nvml)
    report = attach_telemetry(report, samples)
"""

from molmo_latency.telemetry.aggregate import (
    aggregate_intervals,
    attach_telemetry,
    empty_telemetry_columns,
)
from molmo_latency.telemetry.counters import add_counter_tracks, estimate_clock_offset_ns
from molmo_latency.telemetry.device import (
    SLOWDOWN_REASONS_MASK,
    THROTTLE_REASONS,
    FakeGpu,
    GpuDevice,
    GpuReading,
    NvmlGpu,
    is_slowdown,
    open_gpu,
    throttle_reason_names,
)
from molmo_latency.telemetry.policy import NVML_MODES, NvmlWarning, start_telemetry, stop_telemetry
from molmo_latency.telemetry.sampler import NvmlSampler, empty_samples

__all__ = [
    "NVML_MODES",
    "SLOWDOWN_REASONS_MASK",
    "THROTTLE_REASONS",
    "FakeGpu",
    "GpuDevice",
    "GpuReading",
    "NvmlGpu",
    "NvmlSampler",
    "NvmlWarning",
    "add_counter_tracks",
    "aggregate_intervals",
    "attach_telemetry",
    "empty_samples",
    "empty_telemetry_columns",
    "estimate_clock_offset_ns",
    "is_slowdown",
    "open_gpu",
    "start_telemetry",
    "stop_telemetry",
    "throttle_reason_names",
]
