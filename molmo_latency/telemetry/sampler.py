"""A background thread that reads a GPU's sensors every few milliseconds.

Samples carry ``time.perf_counter_ns()`` timestamps, the clock of the phase timings, so they
line up with phases and requests (:func:`molmo_latency.telemetry.aggregate.aggregate_intervals`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import polars as pl

from molmo_latency.errors import MolmoLatencyError, NvmlUnavailable
from molmo_latency.schema import TELEMETRY_SAMPLE_COLUMNS
from molmo_latency.telemetry.device import GpuDevice, open_gpu

__all__ = ["NvmlSampler", "SAMPLE_SCHEMA", "empty_samples"]

_DTYPES = {"int64": pl.Int64, "float64": pl.Float64, "str": pl.String, "bool": pl.Boolean}
SAMPLE_SCHEMA: dict[str, pl.DataType] = {
    name: _DTYPES[dtype] for name, dtype in TELEMETRY_SAMPLE_COLUMNS.items()
}


def empty_samples() -> pl.DataFrame:
    """A telemetry table with no rows (TELEMETRY_SAMPLE_COLUMNS).

    >>> empty_samples().columns[:3]
    ['t_ns', 'gpu_index', 'sm_clock_mhz']
    """
    return pl.DataFrame(schema=SAMPLE_SCHEMA)


class NvmlSampler:
    """Read a GPU's clocks, temperature, power, energy, utilisation and throttle reasons every
    ``interval_ms`` on a background thread.

    ``device`` is an NVML index or ``"GPU-..."`` UUID (opened with
    :func:`~molmo_latency.telemetry.device.open_gpu` at :meth:`start`, closed at :meth:`stop`) or
    any :class:`~molmo_latency.telemetry.device.GpuDevice` (e.g. a ``FakeGpu`` in tests; left
    open unless ``owns_device=True``). :meth:`start` takes one sample before it returns and :meth:`stop` one after the thread
    ends, so every interval between the two has a sample in effect at its start.

    Each sample's ``t_ns`` is the midpoint of its read on ``time.perf_counter_ns()``;
    ``read_cost_ns`` is what the read took. The thread never raises: an error ends sampling,
    keeps the samples read so far, and :meth:`stop` raises it as
    :class:`~molmo_latency.errors.NvmlUnavailable` (or hands it back with ``raise_error=False``).

    >>> from molmo_latency.telemetry.device import FakeGpu
    >>> with NvmlSampler(device=FakeGpu(sm_clock_mhz=1410.0), interval_ms=5) as sampler:
    ...     time.sleep(0.05)
    >>> df = sampler.samples()
    >>> df.height > 2, df["sm_clock_mhz"].unique().to_list(), sampler.achieved_hz > 0
    (True, [1410.0], True)
    """

    def __init__(
        self,
        device: int | str | GpuDevice = 0,
        interval_ms: float = 10.0,
        *,
        clock: Callable[[], int] = time.perf_counter_ns,
        owns_device: bool | None = None,
    ) -> None:
        if not interval_ms > 0:
            raise MolmoLatencyError(
                f"the NVML sampling interval must be > 0 ms, got interval_ms={interval_ms!r}")
        self.interval_ms = float(interval_ms)
        self._interval_ns = max(1, round(interval_ms * 1e6))
        self._device_arg = device
        self._device: GpuDevice | None = device if isinstance(device, GpuDevice) else None
        self._owns_device = (not isinstance(device, GpuDevice)) if owns_device is None else owns_device
        self._clock = clock
        self._rows: list[tuple] = []
        self._rows_lock = threading.Lock()
        self._discarded = 0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started = False
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> NvmlSampler:
        """Open the device if needed, take a first sample and start the thread.

        Raises :class:`~molmo_latency.errors.NvmlUnavailable` if the device cannot be opened or
        its first read fails.

        >>> from molmo_latency.telemetry.device import FakeGpu
        >>> s = NvmlSampler(device=FakeGpu()).start(); s.running
        True
        >>> s.stop(); s.running
        False
        """
        if self._started:
            raise RuntimeError("an NvmlSampler runs once; create a new one to sample again")
        self._started = True
        if self._device is None:
            self._device = open_gpu(self._device_arg)  # type: ignore[arg-type]
        try:
            self._sample()
        except Exception as exc:  # noqa: BLE001
            self._close_device()
            self._stopped = True
            raise NvmlUnavailable(
                f"the first read of {self._describe()} failed: {type(exc).__name__}: {exc}"
            ) from exc
        self._thread = threading.Thread(
            target=self._run, name=f"molmo-latency-nvml-{self._device.index}", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, raise_error: bool = True, timeout_s: float = 10.0) -> BaseException | None:
        """Stop the thread, take a last sample and close a device this sampler opened.

        Idempotent. If the thread failed, raises :class:`NvmlUnavailable` from the stored error
        (``raise_error=True``) or returns that error; returns ``None`` otherwise. Samples read
        before a failure stay available in :meth:`samples`.

        >>> from molmo_latency.telemetry.device import FakeGpu
        >>> s = NvmlSampler(device=FakeGpu(fail_after=1), interval_ms=1).start()
        >>> time.sleep(0.05)
        >>> type(s.stop(raise_error=False)).__name__, s.samples().height
        ('RuntimeError', 1)
        """
        if self._started and not self._stopped:
            self._stopped = True
            self._stop_event.set()
            thread = self._thread
            if thread is not None:
                thread.join(timeout_s)
                if thread.is_alive() and self._error is None:
                    self._error = TimeoutError(
                        f"the sampler thread did not stop within {timeout_s} s "
                        "(a device read hangs)")
            if self._error is None:
                try:
                    self._sample()
                except Exception as exc:  # noqa: BLE001
                    self._error = exc
            if thread is None or not thread.is_alive():
                self._close_device()
        if self._error is not None and raise_error:
            raise NvmlUnavailable(
                f"NVML sampling of {self._describe()} failed after {len(self._rows)} samples: "
                f"{type(self._error).__name__}: {self._error}; the samples read before the "
                "failure are kept (NvmlSampler.samples())"
            ) from self._error
        return self._error

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        # Do not hide the body's exception behind a sampler failure.
        self.stop(raise_error=exc_type is None)

    # -- the thread -------------------------------------------------------------------------

    def _sample(self) -> None:
        t0 = self._clock()
        r = self._device.read()  # type: ignore[union-attr]
        t1 = self._clock()
        with self._rows_lock:
            self._rows.append((
                (t0 + t1) // 2, self._device.index,  # type: ignore[union-attr]
                r.sm_clock_mhz, r.mem_clock_mhz, r.temp_c, r.power_w, r.energy_mj,
                r.util_gpu_pct, r.util_mem_pct, r.throttle_reasons, t1 - t0,
            ))

    def _run(self) -> None:
        interval = self._interval_ns
        next_t = self._clock() + interval
        try:
            while not self._stop_event.wait(max(0, next_t - self._clock()) / 1e9):
                self._sample()
                next_t += interval
                now = self._clock()
                if next_t <= now:  # fell behind (slow read, GIL): skip the missed ticks
                    next_t = now + interval - (now - next_t) % interval
        except Exception as exc:  # noqa: BLE001 - stored, raised by stop()
            self._error = exc

    def _close_device(self) -> None:
        if self._owns_device and self._device is not None:
            self._device.close()

    def _describe(self) -> str:
        d = self._device
        if d is None:
            return f"GPU {self._device_arg}"
        return f"GPU {d.index} ({d.name})" if d.name else f"GPU {d.index}"

    # -- results ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`, also after the thread failed (then
        :attr:`error` is set and :meth:`stop` reports it): whether there is a sampler to stop."""
        return self._started and not self._stopped

    @property
    def device(self) -> GpuDevice | None:
        """The device read (None before :meth:`start` when given an index)."""
        return self._device

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the thread, if any."""
        return self._error

    def discard_before(self, t_ns: int) -> int:
        """Forget the samples older than `t_ns`, keeping the last one at or before it (the value
        in effect at `t_ns`, which sample-and-hold still needs); returns how many were dropped.

        Long sweeps call this once their older requests are written, so memory and the cost of
        :meth:`samples` stay bounded.

        >>> from molmo_latency.telemetry.device import FakeGpu
        >>> s = NvmlSampler(device=FakeGpu(), clock=iter(range(0, 10**6, 10)).__next__)
        >>> _ = s.start(); s.stop()
        >>> before = s.samples()["t_ns"].to_list(); s.discard_before(before[-1]), s.samples().height
        (1, 1)
        """
        with self._rows_lock:
            keep = 0
            for i, row in enumerate(self._rows):
                if row[0] <= t_ns:
                    keep = i
                else:
                    break
            dropped = keep
            if dropped:
                self._rows = self._rows[keep:]
                self._discarded += dropped
        return dropped

    def samples(self) -> pl.DataFrame:
        """The samples so far, one row each, TELEMETRY_SAMPLE_COLUMNS, sorted by ``t_ns``.

        Safe to call while running (a snapshot).

        >>> from molmo_latency.telemetry.device import FakeGpu
        >>> with NvmlSampler(device=FakeGpu(temp_c=61.0)) as s:
        ...     pass
        >>> s.samples().select("temp_c", "throttle_reasons").row(0)
        (61.0, 0)
        """
        with self._rows_lock:
            rows = list(self._rows)
        if not rows:
            return empty_samples()
        return pl.DataFrame(rows, schema=SAMPLE_SCHEMA, orient="row").sort("t_ns")

    @property
    def achieved_hz(self) -> float | None:
        """Samples per second between the first and the last sample (None below 2 samples).

        >>> from molmo_latency.telemetry.device import FakeGpu
        >>> with NvmlSampler(device=FakeGpu(), interval_ms=10) as s:
        ...     time.sleep(0.2)
        >>> 20 < s.achieved_hz < 150
        True
        """
        rows = list(self._rows)
        if len(rows) < 2 or rows[-1][0] <= rows[0][0]:
            return None
        return (len(rows) - 1) * 1e9 / (rows[-1][0] - rows[0][0])

    @property
    def mean_read_cost_ns(self) -> float | None:
        """Mean time one read of all sensors took the sampler thread (None without samples).

        >>> from molmo_latency.telemetry.device import FakeGpu
        >>> with NvmlSampler(device=FakeGpu()) as s:
        ...     pass
        >>> s.mean_read_cost_ns > 0
        True
        """
        rows = list(self._rows)
        if not rows:
            return None
        return sum(r[-1] for r in rows) / len(rows)

    def stats(self) -> dict:
        """What the sampler achieved, for run metadata (``run.json``).

        >>> from molmo_latency.telemetry.device import FakeGpu
        >>> with NvmlSampler(device=FakeGpu(), interval_ms=10) as s:
        ...     pass
        >>> sorted(s.stats())[:3]
        ['achieved_hz', 'device_name', 'device_uuid']
        """
        d = self._device
        return {
            "gpu_index": None if d is None else d.index,
            "device_name": None if d is None else d.name,
            "device_uuid": None if d is None else d.uuid,
            "driver": None if d is None else d.driver,
            "interval_ms": self.interval_ms,
            "requested_hz": 1000.0 / self.interval_ms,
            "achieved_hz": self.achieved_hz,
            "samples": len(self._rows) + self._discarded,
            "mean_read_cost_ns": self.mean_read_cost_ns,
            "error": None if self._error is None else f"{type(self._error).__name__}: {self._error}",
        }
