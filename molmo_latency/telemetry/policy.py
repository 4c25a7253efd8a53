"""The ``nvml="auto" | "off" | "required"`` policy: one :class:`NvmlSettings` value, checked once,
and two calls around a profiled run::

    sampler = start_telemetry(nvml, gpu)              # None when off or unavailable
    try:
        ...                                           # the profiled generate() calls
    finally:
        samples = stop_telemetry(sampler, nvml)       # DataFrame, or None without telemetry
    report = attach_telemetry(report, samples)        # null columns when samples is None

``gpu`` is the NVML index / UUID; the profiler names it with
:func:`molmo_latency.telemetry.source.resolve_gpu` (by UUID) through
:func:`~molmo_latency.telemetry.source.open_telemetry`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import polars as pl

from molmo_latency.errors import MolmoLatencyError, NvmlUnavailable
from molmo_latency.telemetry.device import GpuDevice, open_gpu
from molmo_latency.telemetry.sampler import NvmlSampler

__all__ = ["DEFAULT_INTERVAL_MS", "MIN_INTERVAL_MS", "NVML_MODES", "NvmlSettings", "NvmlWarning",
           "start_telemetry", "stop_telemetry"]

#: The profiler's NVML sampling interval unless told otherwise. A sample costs the sampler
#: thread several GIL hand-offs (one per NVML query); against a decode loop that holds the GIL,
#: 1 ms sampling slowed decode steps by about 30% on a GPU machine and 10 ms still achieved only
#: about 19 Hz. 50 ms keeps the sampler's cost on the measured loop within the noise
#: (``benchmarks/overhead.py`` measures it: decode step with the sampler on vs off).
DEFAULT_INTERVAL_MS = 50.0
#: The shortest interval ``profile_phases`` accepts.
MIN_INTERVAL_MS = 5.0

NvmlMode = Literal["auto", "off", "required"]
NVML_MODES: tuple[str, ...] = ("auto", "off", "required")


@dataclass(frozen=True)
class NvmlSettings:
    """NVML telemetry of a profiled block as one value, checked once when it is made.

    ``mode``: "auto" | "off" | "required"; ``interval_ms``: the sampling interval (at least
    ``MIN_INTERVAL_MS``: a faster sampler thread slows the loop it measures); ``device``: the
    NVML index / UUID or a :class:`~molmo_latency.telemetry.device.GpuDevice` to read (None: the
    model's GPU, see :func:`molmo_latency.telemetry.source.resolve_gpu`).

    >>> NvmlSettings().interval_ms == DEFAULT_INTERVAL_MS
    True
    >>> NvmlSettings("sometimes")
    Traceback (most recent call last):
    ...
    molmo_latency.errors.MolmoLatencyError: nvml must be 'auto', 'off' or 'required', got 'sometimes'
    """

    mode: NvmlMode | str = "auto"
    interval_ms: float = DEFAULT_INTERVAL_MS
    device: int | str | GpuDevice | None = None

    def __post_init__(self) -> None:
        if self.mode not in NVML_MODES:
            raise MolmoLatencyError(f"nvml must be 'auto', 'off' or 'required', got {self.mode!r}")
        interval = self.interval_ms
        if self.mode != "off" and not (isinstance(interval, (int, float)) and interval >= MIN_INTERVAL_MS):
            raise MolmoLatencyError(
                f"nvml_interval_ms={interval!r} is below the floor of {MIN_INTERVAL_MS:g} ms: "
                "faster NVML sampling slows the measured decode loop (see benchmarks/RESULTS.md); "
                f"use nvml_interval_ms >= {MIN_INTERVAL_MS:g} (default {DEFAULT_INTERVAL_MS:g})")


class NvmlWarning(UserWarning):
    """NVML telemetry was asked for ("auto") but cannot be used; the columns stay null."""


_warned = False  # "auto" warns once per process


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, NvmlWarning, stacklevel=3)


def _check_mode(mode: str) -> None:
    if mode not in NVML_MODES:
        raise MolmoLatencyError(
            f"nvml must be one of 'auto', 'off', 'required', got {mode!r}")


def start_telemetry(
    mode: NvmlMode | str = "auto",
    device: int | str | GpuDevice = 0,
    *,
    interval_ms: float = DEFAULT_INTERVAL_MS,
    opener: Callable[[int | str], GpuDevice] = open_gpu,
) -> NvmlSampler | None:
    """Start an :class:`NvmlSampler` as the policy says, or return None.

    - ``"off"``: None, NVML untouched.
    - ``"auto"``: a running sampler; where NVML cannot be used (no driver or library, no GPU,
      permission denied, bad index) one :class:`NvmlWarning` per process and None.
    - ``"required"``: a running sampler, or :class:`~molmo_latency.errors.NvmlUnavailable`
      saying why not.

    ``device`` is the NVML index / UUID, or a GpuDevice (tests); ``opener`` opens an index.

    >>> start_telemetry("off") is None
    True
    >>> from molmo_latency.telemetry.device import FakeGpu
    >>> sampler = start_telemetry("required", FakeGpu())
    >>> stop_telemetry(sampler, "required").height >= 2
    True
    """
    _check_mode(mode)
    if mode == "off":
        return None
    try:
        gpu = device if isinstance(device, GpuDevice) else opener(device)
        # A device opened here is closed by the sampler at stop().
        owns = not isinstance(device, GpuDevice)
        return NvmlSampler(gpu, interval_ms=interval_ms, owns_device=owns).start()
    except NvmlUnavailable as exc:
        if mode == "required":
            raise
        _warn_once(f"NVML telemetry is off for this process: {exc}. Telemetry columns stay "
                   "null; pass nvml='off' to silence this or nvml='required' to fail instead")
        return None


def stop_telemetry(sampler: NvmlSampler | None, mode: NvmlMode | str = "auto") -> pl.DataFrame | None:
    """Stop a sampler from :func:`start_telemetry` and return its samples (None for no sampler).

    If the sampler thread failed mid-run, ``"required"`` raises
    :class:`~molmo_latency.errors.NvmlUnavailable`; ``"auto"`` warns (once per process) and
    returns the samples read before the failure.

    >>> stop_telemetry(None) is None
    True
    >>> from molmo_latency.telemetry.device import FakeGpu
    >>> stop_telemetry(start_telemetry("auto", FakeGpu(temp_c=70.0)))["temp_c"].max()
    70.0
    """
    _check_mode(mode)
    if sampler is None:
        return None
    error = sampler.stop(raise_error=mode == "required")
    if error is not None:
        _warn_once(f"NVML sampling stopped early ({type(error).__name__}: {error}); telemetry "
                   "covers only the part of the run before the failure")
    return sampler.samples()
