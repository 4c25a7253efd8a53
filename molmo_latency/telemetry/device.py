"""The thin device layer: one small interface for a GPU's sensors, one NVML implementation.

The sampler (:mod:`molmo_latency.telemetry.sampler`) only ever calls :meth:`GpuDevice.read`, so
it runs and is tested on machines without NVIDIA GPUs by giving it a :class:`FakeGpu`. Only
:class:`NvmlGpu` and :func:`open_gpu` touch ``pynvml`` (the ``nvidia-ml-py`` package).

A sensor the GPU lacks (NVML answers *not supported*, *no permission* or the driver lacks the
function) reads as ``None`` for that field, never as an error; after the first such answer the
field is not asked again.
"""

from __future__ import annotations

import abc
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from types import ModuleType

from molmo_latency.errors import NvmlUnavailable

__all__ = [
    "FakeGpu",
    "GpuDevice",
    "GpuReading",
    "NvmlGpu",
    "SLOWDOWN_REASONS_MASK",
    "THROTTLE_REASONS",
    "is_slowdown",
    "open_gpu",
    "throttle_reason_names",
]


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One read of a GPU's sensors; ``None`` where the GPU lacks the sensor.

    >>> GpuReading(sm_clock_mhz=1980.0, temp_c=41.0).power_w is None
    True
    """

    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    energy_mj: float | None = None     # NVML total energy counter, millijoules since driver load
    util_gpu_pct: float | None = None
    util_mem_pct: float | None = None
    throttle_reasons: int | None = None  # clocks-event reasons bitmask


READING_FIELDS = tuple(f.name for f in fields(GpuReading))


class GpuDevice(abc.ABC):
    """A GPU whose sensors can be read: what the sampler needs, nothing more.

    Subclasses implement one method per sensor (returning ``None`` when the GPU lacks it) and
    the identity attributes ``index``, ``name``, ``uuid`` and ``driver``; :meth:`read` reads them
    all at once. The sampler calls only :meth:`read` and :meth:`close`.

    >>> gpu = FakeGpu(sm_clock_mhz=1410.0, temp_c=50.0)
    >>> isinstance(gpu, GpuDevice), gpu.read().sm_clock_mhz
    (True, 1410.0)
    """

    index: int = 0
    name: str = ""
    uuid: str = ""
    driver: str = ""

    @abc.abstractmethod
    def sm_clock_mhz(self) -> float | None: ...

    @abc.abstractmethod
    def mem_clock_mhz(self) -> float | None: ...

    @abc.abstractmethod
    def temp_c(self) -> float | None: ...

    @abc.abstractmethod
    def power_w(self) -> float | None: ...

    @abc.abstractmethod
    def energy_mj(self) -> float | None: ...

    @abc.abstractmethod
    def utilization_pct(self) -> tuple[float | None, float | None]:
        """(GPU busy %, memory-controller busy %) over the driver's last sample period."""

    @abc.abstractmethod
    def throttle_reasons(self) -> int | None: ...

    def read(self) -> GpuReading:
        """Read every sensor once."""
        util_gpu, util_mem = self.utilization_pct()
        return GpuReading(
            sm_clock_mhz=self.sm_clock_mhz(),
            mem_clock_mhz=self.mem_clock_mhz(),
            temp_c=self.temp_c(),
            power_w=self.power_w(),
            energy_mj=self.energy_mj(),
            util_gpu_pct=util_gpu,
            util_mem_pct=util_mem,
            throttle_reasons=self.throttle_reasons(),
        )

    def conditions(self) -> dict[str, object]:
        """What the GPU's state says about the labels measured on it, read once at a run's start:
        ``other_processes`` (compute/graphics processes on it other than this one, None when not
        readable), ``persistence_mode``, ``clocks_locked`` (application clocks set away from their
        defaults), ``temp_c`` and ``sm_clock_mhz`` now. Implementations fill what they can read."""
        return {"name": self.name, "uuid": self.uuid, "driver": self.driver, "other_processes": None,
                "persistence_mode": None, "clocks_locked": None, "temp_c": self.temp_c(),
                "sm_clock_mhz": self.sm_clock_mhz()}

    def close(self) -> None:
        """Release what the device holds (NVML handle); idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, name={self.name!r}, uuid={self.uuid!r})"


# --------------------------------------------------------------------------------------------
# Throttle (clocks-event) reasons


# The reason bits live in telemetry/throttle.py (no NVML there), so that analysis can use them
# without importing the device layer; re-exported here for the device layer's users.
from molmo_latency.telemetry.throttle import (  # noqa: E402
    SLOWDOWN_REASONS_MASK,
    THROTTLE_REASONS,
    is_slowdown,
    throttle_reason_names,
)


# --------------------------------------------------------------------------------------------
# NVML


def _import_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlUnavailable(
            "NVML telemetry needs the nvidia-ml-py package (import pynvml), which is not "
            f"installed ({exc}); install it with `pip install nvidia-ml-py` or use nvml='off'"
        ) from exc


def _nvml_error_class(pynvml: ModuleType, name: str) -> type[BaseException]:
    # pynvml builds its NVMLError_* subclasses at import; a missing one matches nothing.
    return getattr(pynvml, f"NVMLError_{name}", _NeverRaised)


class _NeverRaised(Exception):
    pass


def _explain_nvml_error(pynvml: ModuleType, exc: BaseException, what: str) -> str:
    """One line saying why NVML cannot be used, from the NVMLError pynvml raised."""
    cls = lambda n: _nvml_error_class(pynvml, n)  # noqa: E731
    if isinstance(exc, cls("LibraryNotFound")):
        why = ("the NVML library (libnvidia-ml.so.1) was not found: this machine has no NVIDIA "
               "driver installed, or the container does not expose it")
    elif isinstance(exc, cls("DriverNotLoaded")):
        why = "the NVIDIA driver is not loaded (no GPU, or the kernel module is not running)"
    elif isinstance(exc, cls("NoPermission")):
        why = "permission denied by NVML (run as a user allowed to query the GPU)"
    elif isinstance(exc, cls("LibRmVersionMismatch")):
        why = "the NVML library and the kernel driver versions differ (reboot or reload the driver)"
    elif isinstance(exc, cls("GpuIsLost")):
        why = "the GPU has fallen off the bus or is otherwise inaccessible"
    elif isinstance(exc, cls("FunctionNotFound")):
        why = "the installed driver is too old for this NVML call"
    else:
        why = f"NVML error: {exc}"
    return f"cannot use NVML for {what}: {why}"


class NvmlGpu(GpuDevice):
    """One GPU read through NVML (``pynvml``). Prefer :func:`open_gpu`, which explains failures.

    ``handle`` comes from ``pynvml.nvmlDeviceGetHandleByIndex``; NVML must be initialised
    (``pynvml.nvmlInit()``) and :meth:`close` shuts it down once.

    >>> try:
    ...     gpu = open_gpu(0)
    ... except NvmlUnavailable:
    ...     gpu = None                       # no NVIDIA driver or GPU on this machine
    >>> clock = None if gpu is None else gpu.read().sm_clock_mhz
    >>> clock is None or clock > 0
    True
    >>> if gpu is not None:
    ...     gpu.close()
    """

    def __init__(self, pynvml: ModuleType, handle: object, index: int) -> None:
        self._nvml = pynvml
        self._handle = handle
        self.index = index
        self._missing: set[str] = set()
        self._closed = False
        self._reasons_fn: Callable[[object], int] | None = None
        self._unsupported = tuple(
            _nvml_error_class(pynvml, n) for n in ("NotSupported", "NoPermission", "FunctionNotFound")
        )
        self.name = self._ident(lambda: pynvml.nvmlDeviceGetName(handle))
        self.uuid = self._ident(lambda: pynvml.nvmlDeviceGetUUID(handle))
        self.driver = self._ident(pynvml.nvmlSystemGetDriverVersion)

    def _ident(self, fn: Callable[[], object]) -> str:
        try:
            value = fn()
        except self._unsupported:
            return ""
        return value.decode() if isinstance(value, bytes) else str(value)

    def _sensor(self, key: str, fn: Callable[[], float]) -> float | None:
        """Call an NVML getter; remember and return None when the GPU lacks the sensor."""
        if key in self._missing:
            return None
        try:
            return fn()
        except self._unsupported:
            self._missing.add(key)
            return None

    def sm_clock_mhz(self) -> float | None:
        n, h = self._nvml, self._handle
        v = self._sensor("sm_clock", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))
        return None if v is None else float(v)

    def mem_clock_mhz(self) -> float | None:
        n, h = self._nvml, self._handle
        v = self._sensor("mem_clock", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM))
        return None if v is None else float(v)

    def temp_c(self) -> float | None:
        n, h = self._nvml, self._handle
        v = self._sensor("temp", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
        return None if v is None else float(v)

    def power_w(self) -> float | None:
        v = self._sensor("power", lambda: self._nvml.nvmlDeviceGetPowerUsage(self._handle))
        return None if v is None else v / 1000.0   # NVML: milliwatts

    def energy_mj(self) -> float | None:
        v = self._sensor(
            "energy", lambda: self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        return None if v is None else float(v)

    def utilization_pct(self) -> tuple[float | None, float | None]:
        u = self._sensor("util", lambda: self._nvml.nvmlDeviceGetUtilizationRates(self._handle))
        if u is None:
            return None, None
        return float(u.gpu), float(u.memory)

    def throttle_reasons(self) -> int | None:
        if self._reasons_fn is None:
            self._reasons_fn = self._pick_reasons_fn()
        v = self._sensor("reasons", lambda: self._reasons_fn(self._handle))
        return None if v is None else int(v)

    def _pick_reasons_fn(self) -> Callable[[object], int]:
        """nvmlDeviceGetCurrentClocksEventReasons (NVML >= 535), else the Throttle spelling."""
        n = self._nvml
        new = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None)
        old = getattr(n, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if new is not None:
            try:
                new(self._handle)
                return new
            except _nvml_error_class(n, "FunctionNotFound"):
                pass
            except self._unsupported:
                if old is None:
                    return new
        if old is None:
            raise NvmlUnavailable("this pynvml has no clocks-event reasons call; upgrade nvidia-ml-py")
        return old

    def conditions(self) -> dict[str, object]:
        out = super().conditions()
        n, h = self._nvml, self._handle
        pids: list[int] | None = []
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                pids += [int(p.pid) for p in getattr(n, getter)(h)]  # type: ignore[operator]
            except Exception:  # noqa: BLE001 - not readable here (container, permissions)
                pids = None
                break
        if pids is not None:
            import os

            pids = sorted(set(pids) - {os.getpid()})
        out["other_processes"] = pids
        try:
            out["persistence_mode"] = bool(n.nvmlDeviceGetPersistenceMode(h))
        except Exception:  # noqa: BLE001
            pass
        try:
            now = n.nvmlDeviceGetApplicationsClock(h, n.NVML_CLOCK_SM)
            default = n.nvmlDeviceGetDefaultApplicationsClock(h, n.NVML_CLOCK_SM)
            out["clocks_locked"] = bool(now != default)
        except Exception:  # noqa: BLE001
            pass
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down must not mask the caller's error
                pass


def open_gpu(index: int | str = 0) -> NvmlGpu:
    """Open GPU ``index`` (NVML index, or a ``"GPU-..."`` UUID) through NVML.

    Raises :class:`~molmo_latency.errors.NvmlUnavailable` saying why NVML cannot be used: the
    package or driver library is missing, the driver is not loaded, there is no GPU, permission
    is denied, or the index is out of range. NVML numbers GPUs in PCI order and ignores
    ``CUDA_VISIBLE_DEVICES``; pass the UUID (``torch.cuda.get_device_properties(i).uuid``,
    prefixed ``GPU-``) when they may differ.

    >>> try:
    ...     open_gpu(0).close()
    ... except NvmlUnavailable as exc:
    ...     str(exc).startswith("cannot use NVML")
    ... else:
    ...     True
    True
    """
    pynvml = _import_pynvml()
    what = f"GPU {index}"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(_explain_nvml_error(pynvml, exc, what)
                              + "; use nvml='off' to profile without telemetry") from exc
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise NvmlUnavailable(f"cannot use NVML for {what}: NVML sees no NVIDIA GPU on this "
                                  "machine; use nvml='off' to profile without telemetry")
        if isinstance(index, str):
            handle = pynvml.nvmlDeviceGetHandleByUUID(index)
            nvml_index = int(pynvml.nvmlDeviceGetIndex(handle))
        else:
            if not 0 <= int(index) < count:
                raise NvmlUnavailable(
                    f"cannot use NVML for {what}: bad GPU index {index}, this machine has {count} "
                    f"GPU(s), indices 0..{count - 1}")
            nvml_index = int(index)
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        gpu = NvmlGpu(pynvml, handle, nvml_index)
    except NvmlUnavailable:
        _shutdown_quietly(pynvml)
        raise
    except pynvml.NVMLError as exc:
        _shutdown_quietly(pynvml)
        if isinstance(exc, (_nvml_error_class(pynvml, "NotFound"),
                            _nvml_error_class(pynvml, "InvalidArgument"))):
            raise NvmlUnavailable(f"cannot use NVML for {what}: no such GPU ({exc})") from exc
        raise NvmlUnavailable(_explain_nvml_error(pynvml, exc, what)) from exc
    return gpu


def _shutdown_quietly(pynvml: ModuleType) -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------
# A fake GPU for tests and demos


class FakeGpu(GpuDevice):
    """A scripted GPU: constant sensor values, a sequence of readings, or a function of time.

    ``readings`` (a sequence of :class:`GpuReading` or dicts, replayed in order and then held at
    the last one) or ``fn(t_ns) -> GpuReading`` override the constants. ``energy_mj`` integrates
    ``power_w`` over time when not given, like the NVML counter. ``fail_after=n`` makes the n+1-th
    read raise ``RuntimeError`` (to test error handling); ``read_delay_s`` makes reads slow.

    >>> gpu = FakeGpu(readings=[{"sm_clock_mhz": 1980.0}, {"sm_clock_mhz": 1410.0}])
    >>> [gpu.read().sm_clock_mhz for _ in range(3)]
    [1980.0, 1410.0, 1410.0]
    """

    def __init__(
        self,
        *,
        index: int = 0,
        sm_clock_mhz: float | None = 1410.0,
        mem_clock_mhz: float | None = 1593.0,
        temp_c: float | None = 45.0,
        power_w: float | None = 300.0,
        energy_mj: float | None = None,
        util_gpu_pct: float | None = 100.0,
        util_mem_pct: float | None = 50.0,
        throttle_reasons: int | None = 0,
        readings: Sequence[GpuReading | dict] | None = None,
        fn: Callable[[int], GpuReading] | None = None,
        fail_after: int | None = None,
        read_delay_s: float = 0.0,
        name: str = "Fake GPU",
        uuid: str = "GPU-00000000-0000-0000-0000-000000000000",
        driver: str = "0.0",
        clock: Callable[[], int] | None = None,
        other_processes: list[int] | None = None,
        persistence_mode: bool | None = True,
        clocks_locked: bool | None = False,
    ) -> None:
        import time

        self.index, self.name, self.uuid, self.driver = index, name, uuid, driver
        self._conditions = {"other_processes": other_processes, "persistence_mode": persistence_mode,
                            "clocks_locked": clocks_locked}
        self._const = GpuReading(sm_clock_mhz, mem_clock_mhz, temp_c, power_w, energy_mj,
                                 util_gpu_pct, util_mem_pct, throttle_reasons)
        self._integrate_energy = energy_mj is None and power_w is not None
        self._readings: Iterator[GpuReading] | None = None
        self._last: GpuReading | None = None
        if readings is not None:
            self._readings = iter([r if isinstance(r, GpuReading) else GpuReading(**r)
                                   for r in readings])
        self._fn = fn
        self._fail_after = fail_after
        self._delay = read_delay_s
        self._clock = clock or time.perf_counter_ns
        self._energy_mj = 0.0
        self._last_t: int | None = None
        self.reads = 0       # successful reads
        self.failures = 0    # reads that raised (fail_after)
        self.closed = False

    def _current(self) -> GpuReading:
        if self._fn is not None:
            return self._fn(self._clock())
        if self._readings is not None:
            self._last = next(self._readings, self._last)
            return self._last if self._last is not None else self._const
        return self._const

    def read(self) -> GpuReading:
        if self._fail_after is not None and self.reads >= self._fail_after:
            self.failures += 1
            raise RuntimeError(f"fake GPU read {self.reads + 1} failed")
        if self._delay:
            import time

            time.sleep(self._delay)
        self.reads += 1
        r = self._current()
        if self._integrate_energy and r.energy_mj is None and r.power_w is not None:
            now = self._clock()
            if self._last_t is not None:
                self._energy_mj += r.power_w * (now - self._last_t) / 1e6  # W * ns -> mJ
            self._last_t = now
            r = GpuReading(**{**{k: getattr(r, k) for k in READING_FIELDS},
                              "energy_mj": math.floor(self._energy_mj)})
        return r

    # The per-sensor methods look at the current reading without advancing a script.
    def _peek(self) -> GpuReading:
        if self._fn is not None:
            return self._fn(self._clock())
        return self._last if self._last is not None else self._const

    def sm_clock_mhz(self) -> float | None:
        return self._peek().sm_clock_mhz

    def mem_clock_mhz(self) -> float | None:
        return self._peek().mem_clock_mhz

    def temp_c(self) -> float | None:
        return self._peek().temp_c

    def power_w(self) -> float | None:
        return self._peek().power_w

    def energy_mj(self) -> float | None:
        return self._peek().energy_mj

    def utilization_pct(self) -> tuple[float | None, float | None]:
        r = self._peek()
        return r.util_gpu_pct, r.util_mem_pct

    def throttle_reasons(self) -> int | None:
        return self._peek().throttle_reasons

    def conditions(self) -> dict[str, object]:
        return {**super().conditions(), **self._conditions}

    def close(self) -> None:
        self.closed = True
