"""Telemetry as counter tracks (``"ph": "C"``) in a Chrome / Kineto trace JSON.

A trace viewer (Perfetto, chrome://tracing) then draws the SM clock, temperature, power and
slowdown flag as graphs on the same time axis as the phases and kernels.

Clocks: samples carry ``time.perf_counter_ns()``; a Kineto trace carries microsecond ``ts`` on
its own base. ``ts_us = (t_ns + clock_offset_ns) / 1000``; the profiler knows the offset, or it
is estimated from one annotation whose ``perf_counter_ns`` start is known
(:func:`estimate_clock_offset_ns`).
"""

from __future__ import annotations

import gzip
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import msgspec
import polars as pl

from molmo_latency.errors import TraceError
from molmo_latency.telemetry.throttle import SLOWDOWN_REASONS_MASK
from molmo_latency.trace.reader import _read_bytes

__all__ = ["COUNTER_TRACKS", "add_counter_tracks", "add_request_counter_tracks", "estimate_clock_offset_ns",
           "read_trace"]

#: (sample column, counter track name) written by :func:`add_counter_tracks`.
COUNTER_TRACKS: tuple[tuple[str, str], ...] = (
    ("sm_clock_mhz", "GPU SM clock (MHz)"),
    ("mem_clock_mhz", "GPU memory clock (MHz)"),
    ("temp_c", "GPU temperature (C)"),
    ("power_w", "GPU power (W)"),
    ("util_gpu_pct", "GPU utilisation (%)"),
    ("_slowdown", "GPU clock slowdown (0/1)"),
)
_CATEGORY = "nvml"


def read_trace(path: str | os.PathLike) -> Any:
    """The decoded JSON of a Chrome/Kineto trace (``.json`` or ``.json.gz``), read through the
    one Kineto file reader (:mod:`molmo_latency.trace.reader`: gzip by its magic bytes, and its
    one-line errors for a missing, unreadable, empty or corrupt-gzip file).

    Raises :class:`~molmo_latency.errors.TraceError` for a missing, truncated or non-JSON file.

    >>> import json, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.json")
    >>> _ = open(p, "w").write(json.dumps({"traceEvents": []}))
    >>> read_trace(p)
    {'traceEvents': []}
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise TraceError(f"cannot read trace {path}: {exc}; is it a complete Chrome/Kineto "
                         "trace JSON?") from None


def _events(trace: Any, where: str) -> list:
    if isinstance(trace, dict) and isinstance(trace.get("traceEvents"), list):
        return trace["traceEvents"]
    if isinstance(trace, list):
        return trace
    raise TraceError(f"{where} is JSON but not a trace: no 'traceEvents' list")


def estimate_clock_offset_ns(
    trace: str | os.PathLike | dict | list,
    name: str,
    start_ns: int,
    *,
    occurrence: int = 0,
) -> int:
    """``clock_offset_ns`` such that ``trace_ts_us * 1000 = perf_counter_ns + offset``.

    ``name`` is an annotation in the trace (``record_function`` / NVTX range, ``"ph": "X"`` or
    ``"B"``) whose start was also read as ``time.perf_counter_ns()`` = ``start_ns``;
    ``occurrence`` picks the n-th such event by time. The error is the delay between reading
    the clock and the profiler opening the range (microseconds).

    >>> trace = {"traceEvents": [{"ph": "X", "name": "generate", "ts": 1500.0, "dur": 10}]}
    >>> estimate_clock_offset_ns(trace, "generate", start_ns=500_000)
    1000000
    """
    where = "the trace" if isinstance(trace, (dict, list)) else str(trace)
    if not isinstance(trace, (dict, list)):
        trace = read_trace(trace)
    found = sorted(
        float(ev["ts"]) for ev in _events(trace, where)
        if isinstance(ev, dict) and ev.get("name") == name and ev.get("ph") in ("X", "B")
        and isinstance(ev.get("ts"), (int, float))
    )
    if len(found) <= occurrence:
        raise TraceError(
            f"{where} has {len(found)} '{name}' range(s), needed occurrence {occurrence}; pass "
            "the name of an annotation recorded while profiling")
    return round(found[occurrence] * 1000.0) - int(start_ns)


def _pick_pid(events: list, gpu_index: int) -> tuple[int, list[dict]]:
    """The pid of Kineto's "GPU <i>" process if the trace has one, else a new pid (+ its name)."""
    want = f"GPU {gpu_index}"
    int_pids = set()
    for ev in events:
        if not isinstance(ev, dict):
            continue
        pid = ev.get("pid")
        if isinstance(pid, int):
            int_pids.add(pid)
        if (ev.get("ph") == "M" and ev.get("name") == "process_name"
                and isinstance(ev.get("args"), dict) and ev["args"].get("name") == want
                and isinstance(pid, int)):
            return pid, []
    pid = max(int_pids, default=0) + 1
    meta = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
         "args": {"name": f"{want} telemetry (NVML)"}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
         "args": {"sort_index": pid}},
    ]
    return pid, meta


def add_counter_tracks(
    trace_path: str | os.PathLike,
    samples: pl.DataFrame,
    *,
    clock_offset_ns: int,
    out_path: str | os.PathLike | None = None,
    pid: int | None = None,
) -> Path:
    """Write the telemetry samples into a Chrome/Kineto trace as counter tracks; returns the path.

    One ``"ph": "C"`` event per sample and sensor (COUNTER_TRACKS; null readings skipped), at
    ``ts = (t_ns + clock_offset_ns) / 1000`` microseconds, sorted by time, category ``nvml``.
    They go to the trace's ``GPU <i>`` process when it has one (Kineto's device rows), else to
    a new process ``GPU <i> telemetry (NVML)``; ``pid`` forces one. The file is rewritten
    atomically in place (gzip kept for ``.gz``) unless ``out_path`` is given.

    >>> import json, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "trace.json")
    >>> _ = open(p, "w").write(json.dumps({"traceEvents": []}))
    >>> s = pl.DataFrame({"t_ns": [1_000, 2_000], "gpu_index": [0, 0],
    ...                   "sm_clock_mhz": [1980.0, 1410.0], "temp_c": [50.0, 51.0]})
    >>> _ = add_counter_tracks(p, s, clock_offset_ns=0)
    >>> [(e["name"], e["ts"], e["args"]["value"]) for e in json.load(open(p))["traceEvents"]
    ...  if e["ph"] == "C" and e["name"].startswith("GPU SM")]
    [('GPU SM clock (MHz)', 1.0, 1980.0), ('GPU SM clock (MHz)', 2.0, 1410.0)]
    """
    trace_path = Path(trace_path)
    trace = read_trace(trace_path)
    events = _events(trace, str(trace_path))
    if "t_ns" not in samples.columns:
        raise TraceError("the telemetry samples lack the t_ns column; pass NvmlSampler.samples()")

    gpu_index = 0
    if "gpu_index" in samples.columns and samples.height and samples["gpu_index"][0] is not None:
        gpu_index = int(samples["gpu_index"][0])
    meta: list[dict] = []
    if pid is None:
        pid, meta = _pick_pid(events, gpu_index)

    df = samples.sort("t_ns").with_columns(
        ((pl.col("t_ns") + int(clock_offset_ns)) / 1000.0).round(3).alias("_ts_us"))
    if "throttle_reasons" in df.columns:
        df = df.with_columns(
            pl.when(pl.col("throttle_reasons").is_null()).then(None)
            .otherwise(((pl.col("throttle_reasons") & SLOWDOWN_REASONS_MASK) != 0).cast(pl.Float64))
            .alias("_slowdown"))

    new: list[tuple[float, int, dict]] = []
    for order, (column, track) in enumerate(COUNTER_TRACKS):
        if column not in df.columns:
            continue
        part = df.select("_ts_us", pl.col(column).cast(pl.Float64)).drop_nulls()
        for ts, value in part.iter_rows():
            new.append((ts, order, {"ph": "C", "name": track, "cat": _CATEGORY, "pid": pid,
                                    "tid": 0, "ts": ts, "args": {"value": value}}))
    new.sort(key=lambda item: (item[0], item[1]))
    events.extend(meta)
    events.extend(ev for _, _, ev in new)

    out = Path(out_path) if out_path is not None else trace_path
    payload = msgspec.json.encode(trace)
    gz = out.suffix == ".gz"
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            if gz:
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
                    fh.write(payload)
            else:
                raw.write(payload)
        mode = (out if out.exists() else trace_path).stat().st_mode & 0o777
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def add_request_counter_tracks(trace_path: str | os.PathLike, samples: pl.DataFrame, *, request: int,
                               request_start_ns: int) -> Path | None:
    """Counter tracks in a trace that `profile_phases` wrote: the clock offset comes from the
    ``request[<request>]`` annotation, whose start was ``request_start_ns`` on the samples'
    clock; the samples from 1 s before that request on are written (:func:`add_counter_tracks`).

    A trace without that annotation gets no tracks and one warning naming it; returns the path
    written, or None.
    """
    try:
        offset = estimate_clock_offset_ns(trace_path, f"request[{request}]", request_start_ns)
    except TraceError as exc:
        warnings.warn(f"no NVML counter tracks in {trace_path}: {exc}", stacklevel=2)
        return None
    recent = samples.filter(pl.col("t_ns") >= request_start_ns - 1_000_000_000)
    return add_counter_tracks(trace_path, recent, clock_offset_ns=offset)
