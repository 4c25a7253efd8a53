"""The conditions a measurement ran under: recorded per request and per run (collect).

A latency label is only as good as its conditions. Two kinds are recorded:

- **Per request** (:class:`RequestProbe`), as columns of ``requests`` (:data:`CONDITION_COLUMNS`):
  the torch thread count, the process's CPU time over the wall time inside the request
  (``cpu_time_ratio``: about the thread count when the CPU computes undisturbed, less when other
  processes take the cores; idle OpenMP workers spin-wait for a while and count too, so with
  several threads it is high even where the request waits), the involuntary context switches
  the process suffered, the host's
  1-minute load, and ``warm`` (False for a request measured before the model reached steady
  state). Two ``getrusage`` calls and a clock read per request: a few microseconds
  (``benchmarks/overhead.py``).
- **Per measured request of a sweep**, ``reference_ms`` (:class:`SpeedReference`): a fixed CPU
  workload timed just before and after the request, outside its timeline: the host's speed then,
  which a VM changes without the process seeing it.
- **Per run** (:func:`run_conditions`), the ``conditions`` object of ``run.json``: threads and the
  environment variables that set them, CPU affinity and model, frequency governor where
  readable, load at the start and, on a GPU, what :meth:`GpuDevice.conditions` reads (other
  processes on it, persistence mode, application clocks against their defaults, temperature).

No analysis here: :mod:`molmo_latency.quality` judges what was recorded.

Example:
    >>> probe = RequestProbe.start(torch_threads=1)
    >>> row = probe.stop(warm=True)
    >>> sorted(row) == sorted(CONDITION_COLUMNS)
    True
    >>> row["torch_threads"], row["warm"], row["cpu_time_ratio"] >= 0
    (1, True, True)
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass
from typing import Any

# Columns every request row carries (added to REQUEST_COLUMNS in molmo_latency.schema).
CONDITION_COLUMNS = {
    "torch_threads": "int64",         # torch.get_num_threads() when the request ran
    "cpu_time_ratio": "float64",      # process CPU seconds / wall seconds inside the request
    "involuntary_switches": "int64",  # context switches forced on the process during the request
    "host_load_1m": "float64",        # os.getloadavg()[0] at the request's end
    "warm": "bool",                   # False: measured before the model reached steady state
}

# Environment variables that decide how many threads the math libraries use.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "TORCH_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING")


def _switches() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)


def _load_1m() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # pragma: no cover - not on this platform
        return None


@dataclass
class RequestProbe:
    """What one request's conditions are measured from: started before generate(), stopped after.

    The CPU time and the switches are the whole process's (every thread the request keeps busy,
    torch's pool included); nothing here synchronises a device."""

    torch_threads: int
    wall_ns: int
    cpu_ns: int
    switches: int

    @classmethod
    def start(cls, torch_threads: int) -> "RequestProbe":
        return cls(torch_threads=int(torch_threads), switches=_switches(),
                   cpu_ns=time.process_time_ns(), wall_ns=time.perf_counter_ns())

    def stop(self, *, warm: bool) -> dict[str, Any]:
        wall = time.perf_counter_ns() - self.wall_ns
        cpu = time.process_time_ns() - self.cpu_ns
        return {"torch_threads": self.torch_threads,
                "cpu_time_ratio": cpu / wall if wall > 0 else None,
                "involuntary_switches": _switches() - self.switches,
                "host_load_1m": _load_1m(),
                "warm": bool(warm)}


class SpeedReference:
    """How fast the host runs right now, from a fixed workload timed beside each measured request.

    A process cannot see everything that slows it: on a VM the host CPU's speed changes with
    what other tenants run and with frequency scaling, and the CPU share and switches recorded by
    :class:`RequestProbe` stay at 1.00 and 0 while it happens. So the sweep times the same small
    workload just before and just after each request (outside its timeline: the label is not
    touched) and records the mean as ``reference_ms``. A reference that varies between requests
    says the machine's speed varied; :mod:`molmo_latency.quality` uses it to tell that spread from
    the configuration's own.

    The workload is what a small model on a CPU spends its time on: a chain of small torch ops
    (matmul, add, tanh on 32x32 tensors: dispatch and a little arithmetic), ``ops`` of them, about
    a millisecond on a 2-core EPYC VM; the result is kept so that nothing is optimised away.

    Example:
        >>> ref = SpeedReference(ops=30)
        >>> ms = ref.time_ms()
        >>> ms > 0
        True
    """

    def __init__(self, ops: int = 450) -> None:
        import torch

        if ops < 1:
            raise ValueError(f"SpeedReference needs ops >= 1, got {ops}")
        self.ops = int(ops)
        self._torch = torch
        self._w = torch.full((32, 32), 1.0 / 32)
        self._x = torch.ones(1, 32)
        self.sink = 0.0

    def time_ms(self) -> float:
        torch = self._torch
        with torch.inference_mode():
            x = self._x
            t0 = time.perf_counter_ns()
            for _ in range(self.ops // 3 or 1):
                x = torch.tanh(x @ self._w + 0.01)
            t1 = time.perf_counter_ns()
        self.sink = float(x[0, 0])
        return (t1 - t0) / 1e6


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cpu_affinity() -> list[int] | None:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def frequency_governors(cpus: list[int] | None) -> list[str] | None:
    """The distinct cpufreq governors of the CPUs the process may run on (None: not readable)."""
    found = {_read(f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor") for c in (cpus or [0])}
    found.discard(None)
    return sorted(found) or None  # type: ignore[arg-type]


def run_conditions(torch_threads: int, torch_interop_threads: int | None = None,
                   gpu: Any = None) -> dict[str, Any]:
    """The ``conditions`` object of ``run.json``: the host side, and the GPU's when one is given
    (a :class:`~molmo_latency.telemetry.GpuDevice`).

    Example:
        >>> c = run_conditions(torch_threads=2)
        >>> c["torch_threads"], "OMP_NUM_THREADS" in c["thread_env"], c["gpu"]
        (2, True, None)
    """
    cpus = cpu_affinity()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    out: dict[str, Any] = {
        "torch_threads": int(torch_threads),
        "torch_interop_threads": torch_interop_threads,
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV},
        "cpu_affinity": cpus,
        "usable_cpus": len(cpus) if cpus is not None else os.cpu_count(),
        "cpu_model": cpu_model(),
        "frequency_governors": frequency_governors(cpus),
        "host_load_start": load,
        "gpu": None,
    }
    if gpu is not None:
        reader = getattr(gpu, "conditions", None)
        out["gpu"] = reader() if callable(reader) else None
    return out


# What must be equal for two runs' labels to be one label set (fit refuses to mix them).
MIXING_KEYS = ("model", "device", "dtype", "gpu_name", "torch_threads", "torch", "transformers",
               "molmo_latency", "cpu_model")


def label_conditions(run_json: dict[str, Any]) -> dict[str, Any]:
    """The facts of one run directory's ``run.json`` that decide what its labels mean.

    Example:
        >>> label_conditions({"identity": {"model": "tiny", "device": "cpu", "dtype": "float32"},
        ...                   "conditions": {"torch_threads": 1}, "versions": {"torch": "2.13"}})["torch_threads"]
        1
    """
    def part(key: str) -> dict:  # an edited run.json may hold anything: only a dict counts
        value = run_json.get(key) if isinstance(run_json, dict) else None
        return value if isinstance(value, dict) else {}

    identity, versions, conditions, device = part("identity"), part("versions"), part("conditions"), part("device")
    run_json = run_json if isinstance(run_json, dict) else {}
    return {
        "model": identity.get("model"), "device": identity.get("device"), "dtype": identity.get("dtype"),
        "gpu_name": device.get("gpu_name"),
        "torch_threads": conditions.get("torch_threads", run_json.get("torch_threads")),
        "torch": versions.get("torch"), "transformers": versions.get("transformers"),
        "molmo_latency": versions.get("molmo_latency"),
        "cpu_model": conditions.get("cpu_model", versions.get("cpu")),
    }


def condition_differences(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One line per condition that differs between run directories (``{name: run.json}``).

    Example:
        >>> a = {"identity": {"model": "tiny"}, "conditions": {"torch_threads": 1}}
        >>> b = {"identity": {"model": "tiny"}, "conditions": {"torch_threads": 2}}
        >>> condition_differences({"runs/a": a, "runs/b": b})
        ['torch_threads: 1 (runs/a), 2 (runs/b)']
    """
    facts = {name: label_conditions(meta) for name, meta in runs.items()}
    lines = []
    for key in MIXING_KEYS:
        values = {name: f.get(key) for name, f in facts.items()}
        if len({repr(v) for v in values.values()}) > 1:
            lines.append(f"{key}: " + ", ".join(f"{v} ({name})" for name, v in values.items()))
    return lines


@dataclass(frozen=True)
class ThermalWait:
    """Before a configuration is measured, wait until the GPU is idle and cool (the policy of
    nsight-python's thermal mode): utilisation at most ``idle_util_pct`` and temperature at most
    ``max_temp_c``, polled every ``poll_s``, for at most ``timeout_s`` (then measure anyway and
    say so in the returned record)."""

    max_temp_c: float = 60.0
    idle_util_pct: float = 5.0
    poll_s: float = 0.2
    timeout_s: float = 60.0


def wait_until_cool(gpu: Any, policy: ThermalWait, sleep: Any = time.sleep,
                    clock: Any = time.monotonic) -> dict[str, Any]:
    """Wait as `policy` says on `gpu` (a :class:`~molmo_latency.telemetry.GpuDevice`); returns
    what happened: ``waited_s``, ``temp_c`` and ``util_gpu_pct`` at the end, ``timed_out``.

    Example:
        >>> from molmo_latency.telemetry import FakeGpu
        >>> gpu = FakeGpu(readings=[{"temp_c": 75.0, "util_gpu_pct": 90.0}, {"temp_c": 58.0, "util_gpu_pct": 0.0}])
        >>> r = wait_until_cool(gpu, ThermalWait(poll_s=0.0))
        >>> r["temp_c"], r["timed_out"]
        (58.0, False)
    """
    start = clock()
    while True:
        reading = gpu.read()
        temp, util = reading.temp_c, reading.util_gpu_pct
        cool = temp is None or temp <= policy.max_temp_c
        idle = util is None or util <= policy.idle_util_pct
        waited = clock() - start
        if (cool and idle) or waited >= policy.timeout_s:
            return {"waited_s": round(waited, 3), "temp_c": temp, "util_gpu_pct": util,
                    "timed_out": not (cool and idle)}
        sleep(policy.poll_s)
