"""One request's phases on a timeline: the requests and phases tables as a Chrome trace
(transform: frames in, a JSON-ready dict out).

Perfetto (ui.perfetto.dev) and ``chrome://tracing`` open the result. Each thread that called
generate() is a track; each request a slice ``request[N]`` (N: its order in the run) carrying its
configuration, validity and recorded conditions as args; each phase a slice inside it named as
the profiler's ``record_function`` ranges are (``vision``, ``projector``, ``prefill``,
``decode[3]``), a decode step with its step index and the KV length it attended over. NVML
samples become counter tracks (SM clock, temperature, power, ...) and the conditions of each
request (CPU share of its threads, host load) counters too, on the same time axis (a sample at
the request's start and one at its end, so a viewer draws the value across the request). The slices
use the ``user_annotation`` category, so molmo-latency's own Kineto reader reads the file back
(:func:`molmo_latency.trace.read_kineto`).

Times: the tables hold ``time.perf_counter_ns()``; ``ts`` is microseconds from the first shown
request's start (or, with ``clock_offset_ns``, on another trace's base).

Example:
    >>> import polars as pl
    >>> req = pl.DataFrame({"request": [0], "start_ns": [1_000_000], "end_ns": [9_000_000],
    ...                     "thread_id": [77], "input_tokens": [20], "valid": [True]})
    >>> ph = pl.DataFrame({"request": [0, 0], "phase": ["prefill", "decode"], "step": [0, 0],
    ...                    "start_ns": [2_000_000, 6_000_000], "end_ns": [5_000_000, 8_000_000]})
    >>> t = chrome_trace(req, ph)
    >>> [(e["name"], e["ts"], e["dur"]) for e in t["traceEvents"] if e["ph"] == "X"]
    [('request[0]', 0.0, 8000.0), ('prefill', 1000.0, 3000.0), ('decode[0]', 5000.0, 2000.0)]
    >>> [e["args"]["kv_tokens"] for e in t["traceEvents"] if e["name"] == "decode[0]"]
    [21]
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import polars as pl

from molmo_latency.conditions import CONDITION_COLUMNS
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.schema import CONFIG_COLUMNS

PID = 1
CATEGORY = "user_annotation"  # what torch.profiler gives record_function ranges
# (sample column, counter track) of NVML samples; the same names as counters in Kineto traces
NVML_TRACKS: tuple[tuple[str, str], ...] = (
    ("sm_clock_mhz", "GPU SM clock (MHz)"),
    ("mem_clock_mhz", "GPU memory clock (MHz)"),
    ("temp_c", "GPU temperature (C)"),
    ("power_w", "GPU power (W)"),
    ("util_gpu_pct", "GPU utilisation (%)"),
)
REQUEST_ARGS = ("config_id", "repeat", *CONFIG_COLUMNS, "valid", "invalid_reason", "total_ms",
                "input_tokens", "image_tokens", "output_tokens", "decode_steps", *CONDITION_COLUMNS,
                "sm_clock_mean_mhz", "temp_max_c", "power_mean_w", "energy_j")


def _plain(value: Any) -> Any:
    """A JSON-ready value (no NaN / inf, which the format does not allow)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _request_label(requests: pl.DataFrame) -> str:
    """The column that numbers requests uniquely: ``order`` in a run directory, else ``request``."""
    return "order" if "order" in requests.columns else "request"


def _keys(frame: pl.DataFrame) -> list[str]:
    """The columns that tie a phase to its request: (config_id, repeat, request) in a run."""
    return [k for k in ("config_id", "repeat", "request") if k in frame.columns]


def select_requests(requests: pl.DataFrame, numbers: Iterable[int] | None) -> pl.DataFrame:
    """The requests to show: those numbered `numbers` (by ``order`` in a run directory, else
    ``request``), or all; an unknown number is refused naming the ones there are."""
    label = _request_label(requests)
    if numbers is None:
        return requests
    wanted = list(dict.fromkeys(int(n) for n in numbers))
    have = set(requests[label].to_list())
    missing = [n for n in wanted if n not in have]
    if missing:
        lo, hi = (min(have), max(have)) if have else (None, None)
        raise MolmoLatencyError(
            f"no request {', '.join(map(str, missing))} in this run (it holds {len(have)} requests"
            + (f", numbered {lo}..{hi} by {label})" if have else ")"))
    return requests.filter(pl.col(label).is_in(wanted))


def chrome_trace(requests: pl.DataFrame, phases: pl.DataFrame, *, telemetry: pl.DataFrame | None = None,
                 metadata: dict[str, Any] | None = None, clock_offset_ns: int | None = None,
                 process_name: str = "molmo-latency", pid: int = PID,
                 category: str = CATEGORY) -> dict[str, Any]:
    """The Chrome trace (``{"traceEvents": [...], ...}``) of `requests` and their `phases`, as
    process `pid`, its slices in `category`."""
    if requests.is_empty():
        raise MolmoLatencyError("no request to put on a timeline: the requests table is empty")
    label = _request_label(requests)
    requests = requests.sort("start_ns")
    base = -int(requests["start_ns"].min()) if clock_offset_ns is None else int(clock_offset_ns)

    def us(t_ns: int) -> float:
        return (int(t_ns) + base) / 1000.0

    threads = {tid: i + 1 for i, tid in enumerate(dict.fromkeys(
        requests["thread_id"].to_list() if "thread_id" in requests.columns else [0]))}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process_name}}]
    events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                "args": {"name": f"generate() thread {tid}"}} for tid in threads.values()]
    keys = _keys(requests)
    by_request: dict[tuple, list[dict[str, Any]]] = {}
    for row in phases.sort("start_ns").iter_rows(named=True):
        by_request.setdefault(tuple(row[k] for k in keys), []).append(row)
    counters: list[dict[str, Any]] = []
    for r in requests.iter_rows(named=True):
        tid = threads[r.get("thread_id", 0)]
        args = {k: _plain(r[k]) for k in REQUEST_ARGS if k in r}
        events.append({"ph": "X", "cat": category, "name": f"request[{r[label]}]", "pid": pid, "tid": tid,
                       "ts": us(r["start_ns"]), "dur": (r["end_ns"] - r["start_ns"]) / 1000.0, "args": args})
        for p in by_request.get(tuple(r[k] for k in keys), []):
            name = f"{p['phase']}[{p['step']}]" if p["phase"] == "decode" else p["phase"]
            pargs: dict[str, Any] = {"phase": p["phase"], "step": p["step"],
                                     "ms": (p["end_ns"] - p["start_ns"]) / 1e6}
            if p["phase"] == "decode" and r.get("input_tokens") is not None:
                pargs["kv_tokens"] = int(r["input_tokens"]) + int(p["step"]) + 1  # prompt + tokens so far
            events.append({"ph": "X", "cat": category, "name": name, "pid": pid, "tid": tid,
                           "ts": us(p["start_ns"]), "dur": (p["end_ns"] - p["start_ns"]) / 1000.0, "args": pargs})
        # a request's own measures: the value at its start and again at its end, so a viewer
        # draws it across the request (a counter holds its last sample; one sample has no width)
        share = r.get("cpu_time_ratio")
        if share is not None and r.get("torch_threads"):
            counters += [{"ph": "C", "name": "CPU share of the threads", "pid": pid, "tid": 0, "ts": us(t),
                          "args": {"share": _plain(share / max(1, r["torch_threads"]))}}
                         for t in (r["start_ns"], r["end_ns"])]
        if r.get("host_load_1m") is not None:
            counters += [{"ph": "C", "name": "host load (1 min)", "pid": pid, "tid": 0, "ts": us(t),
                          "args": {"load": _plain(r["host_load_1m"])}} for t in (r["start_ns"], r["end_ns"])]
    if telemetry is not None and telemetry.height:
        lo, hi = int(requests["start_ns"].min()), int(requests["end_ns"].max())
        inside = telemetry.filter((pl.col("t_ns") >= lo - 1_000_000_000) & (pl.col("t_ns") <= hi))
        for column, track in NVML_TRACKS:
            if column not in inside.columns:
                continue
            for t_ns, value in inside.select("t_ns", column).drop_nulls().iter_rows():
                counters.append({"ph": "C", "name": track, "pid": pid, "tid": 0, "ts": us(t_ns),
                                 "args": {"value": _plain(value)}})
    return {"traceEvents": events + counters, "displayTimeUnit": "ms",
            "otherData": {"producer": "molmo-latency", "request_numbering": label, **(metadata or {})}}


MERGED_CATEGORY = "molmo_latency"  # our slices inside a Kineto trace: not torch's user_annotation,
# which the trace already holds for the same ranges (a reader would count them twice)


def merge_into_trace(trace: dict[str, Any] | list, requests: pl.DataFrame, phases: pl.DataFrame, *,
                     clock_offset_ns: int, telemetry: pl.DataFrame | None = None,
                     metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Kineto `trace` (decoded JSON) with our requests and phases added on its clock
    (``trace ts us * 1000 = perf_counter_ns + clock_offset_ns``, see
    :func:`molmo_latency.telemetry.counters.estimate_clock_offset_ns`) as a process of their own,
    so the kernels of each phase sit under it on one time axis. Our slices use the category
    ``molmo_latency`` (the trace's own ``user_annotation`` ranges stay the ones a reader counts);
    NVML samples are added only when the trace has no ``nvml`` counters yet.

    Example:
        >>> req = pl.DataFrame({"request": [0], "start_ns": [1_000_000], "end_ns": [9_000_000], "thread_id": [7]})
        >>> ph = pl.DataFrame({"request": [0], "phase": ["prefill"], "step": [0], "start_ns": [2_000_000],
        ...                    "end_ns": [5_000_000]})
        >>> kineto = {"traceEvents": [{"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7,
        ...                            "ts": 5500.0, "dur": 100.0}]}
        >>> merged = merge_into_trace(kineto, req, ph, clock_offset_ns=4_000_000)
        >>> [(e["name"], e["pid"], e["ts"]) for e in merged["traceEvents"] if e["ph"] == "X"]
        [('gemm', 0, 5500.0), ('request[0]', 1, 5000.0), ('prefill', 1, 6000.0)]
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else list(trace)
    pids = [e["pid"] for e in events if isinstance(e, dict) and isinstance(e.get("pid"), int)
            and not isinstance(e.get("pid"), bool)]
    has_nvml = any(isinstance(e, dict) and e.get("cat") == "nvml" for e in events)
    ours = chrome_trace(requests, phases, telemetry=None if has_nvml else telemetry, metadata=metadata,
                        clock_offset_ns=clock_offset_ns, pid=max(pids, default=0) + 1,
                        category=MERGED_CATEGORY, process_name="molmo-latency (measured requests)")
    merged = dict(trace) if isinstance(trace, dict) else {}
    merged["traceEvents"] = [*events, *ours["traceEvents"]]
    other = merged.get("otherData") if isinstance(merged.get("otherData"), dict) else {}
    merged["otherData"] = {**other, "molmo_latency": ours["otherData"]}
    return merged


def aligned_offset_ns(trace: dict[str, Any] | list, phases: pl.DataFrame, coarse_offset_ns: int) -> tuple[int, int]:
    """(``clock_offset_ns``, ranges used): the median over the phases of one request of (the start
    of the trace's own range of that name, e.g. ``prefill`` or ``decode[3]``, nearest to where
    `coarse_offset_ns` puts it) minus (our start of it). One range can be off: the first range
    after the profiler starts (``request[N]``) was stamped 5-13 ms before the clock we read right
    after opening it (the profiler's time to open its first range); the median of a request's
    phase ranges is not. With no range matched, `coarse_offset_ns` and 0.

    Example:
        >>> trace = {"traceEvents": [{"ph": "X", "cat": "user_annotation", "name": n, "ts": t, "dur": 1.0}
        ...                          for n, t in (("prefill", 1010.0), ("decode[0]", 1030.0), ("decode[1]", 1050.0))]}
        >>> ph = pl.DataFrame({"phase": ["prefill", "decode", "decode"], "step": [0, 0, 1],
        ...                    "start_ns": [10_000, 30_000, 50_000]})
        >>> aligned_offset_ns(trace, ph, coarse_offset_ns=987_000)
        (1000000, 3)
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    starts: dict[str, list[float]] = {}
    for e in events:
        if isinstance(e, dict) and e.get("ph") in ("X", "B") and e.get("cat") == CATEGORY \
                and isinstance(e.get("ts"), (int, float)):
            starts.setdefault(str(e.get("name")), []).append(float(e["ts"]))
    offsets = []
    for phase, step, start_ns in phases.select("phase", "step", "start_ns").iter_rows():
        name = f"{phase}[{step}]" if phase == "decode" else phase
        candidates = starts.get(name)
        if not candidates:
            continue
        guess_us = (int(start_ns) + coarse_offset_ns) / 1000.0
        nearest = min(candidates, key=lambda ts: abs(ts - guess_us))
        offsets.append(round(nearest * 1000.0) - int(start_ns))
    if not offsets:
        return coarse_offset_ns, 0
    offsets.sort()
    return offsets[len(offsets) // 2], len(offsets)
