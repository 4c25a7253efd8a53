"""What the profiler holds per request, and the polars tables built from it.

Validity rules (nothing is clamped; an impossible value marks the request invalid with a reason):
phases must lie inside the request, must not overlap, must each end after they start; `other_ms`
(total minus the phases) must not be negative; a request needs a prefill; the number of decode
steps must be `output_tokens - 1`; a request whose generate() raised is `complete=False` and
invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from molmo_latency.schema import PHASE_COLUMNS, PHASES, REQUEST_COLUMNS

_DTYPES = {"int64": pl.Int64, "float64": pl.Float64, "str": pl.Utf8, "bool": pl.Boolean}


def polars_schema(columns: dict[str, str]) -> dict[str, pl.DataType]:
    """A polars schema from one of the column contracts in :mod:`molmo_latency.schema`."""
    return {name: _DTYPES[kind] for name, kind in columns.items()}


@dataclass
class RequestRecord:
    """One generate() call as collected: timer marks and the phase spans that index them."""

    index: int
    marks: list[Any] = field(default_factory=list)
    spans: list[tuple[str, int, int, int]] = field(default_factory=list)  # phase, step, i0, i1
    open: list[tuple[str, int, int, str]] = field(default_factory=list)
    occurrences: dict[str, int] = field(default_factory=dict)
    llm_calls: int = 0
    anomalies: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    image_tokens: int | None = None
    output_tokens: int | None = None
    batch_size: int | None = None
    input_ids: Any = None  # held until the request ends, to count image tokens then
    complete: bool = True
    error: str | None = None
    times_ns: list[int] | None = None
    wall_start_ns: int = 0
    wall_end_ns: int = 0


@dataclass
class PhaseReport:
    """The profiler's tables: `requests` (one row per generate()) and `phases` (one per phase)."""

    requests: pl.DataFrame
    phases: pl.DataFrame
    traces: list[dict[str, Any]] = field(default_factory=list)
    telemetry: pl.DataFrame | None = None

    def __getitem__(self, name: str) -> pl.DataFrame:
        return getattr(self, name)

    def write_parquet(self, directory: str | Path) -> list[Path]:
        """Write requests.parquet, phases.parquet (and telemetry.parquet) into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ("requests", "phases", "telemetry"):
            frame = getattr(self, name)
            if frame is not None:
                path = out / f"{name}.parquet"
                frame.write_parquet(path)
                written.append(path)
        return written


def _phase_rows(rec: RequestRecord) -> tuple[list[dict[str, Any]], list[str]]:
    """Resolved phase rows of one request, sorted by start, and the problems found."""
    times = rec.times_ns
    problems = list(rec.anomalies)
    if times is None:
        return [], problems
    start, end = times[0], times[-1]
    rows = []
    for phase, step, i0, i1 in rec.spans:
        t0, t1 = times[i0], times[i1]
        rows.append({"request": rec.index, "phase": phase, "step": step, "start_ns": t0,
                     "end_ns": t1, "ms": (t1 - t0) / 1e6})
    rows.sort(key=lambda r: (r["start_ns"], r["end_ns"]))
    previous = None
    for row in rows:
        label = f"{row['phase']}[{row['step']}]"
        if row["end_ns"] < row["start_ns"]:
            problems.append(f"{label} ends before it starts")
        if row["start_ns"] < start or row["end_ns"] > end:
            problems.append(f"{label} lies outside the request")
        if previous is not None and row["start_ns"] < previous["end_ns"]:
            problems.append(f"{label} overlaps {previous['phase']}[{previous['step']}]")
        previous = row
    return rows, problems


def _request_row(rec: RequestRecord, rows: list[dict[str, Any]], problems: list[str],
                 timer_kind: str) -> dict[str, Any]:
    sums = {p: 0.0 for p in PHASES}
    decode_steps = 0
    for row in rows:
        sums[row["phase"]] += row["ms"]
        decode_steps += row["phase"] == "decode"
    times = rec.times_ns
    total_ms = (times[-1] - times[0]) / 1e6 if times else None
    other_ms = None
    if total_ms is not None:
        other_ms = total_ms - sum(sums.values())
        if other_ms < 0:
            problems.append(f"phases sum to {sum(sums.values()):.3f} ms, more than the request's "
                            f"{total_ms:.3f} ms (other_ms = {other_ms:.3f})")
    if not any(r["phase"] == "prefill" for r in rows) and rec.complete:
        problems.append("no LLM forward (prefill) was observed")
    if rec.complete and rec.output_tokens is not None and rec.output_tokens >= 1 \
            and decode_steps != rec.output_tokens - 1:
        problems.append(f"{decode_steps} decode steps for {rec.output_tokens} output tokens "
                        f"(expected {rec.output_tokens - 1})")
    if not rec.complete:
        problems.insert(0, f"generate() raised {rec.error}")
    seen = set()
    unique = [p for p in problems if not (p in seen or seen.add(p))]
    present = {r["phase"] for r in rows}
    return {
        "request": rec.index,
        **{f"{p}_ms": (sums[p] if p in present else None) for p in PHASES},
        "decode_steps": decode_steps,
        "decode_per_token_ms": sums["decode"] / decode_steps if decode_steps else None,
        "other_ms": other_ms,
        "total_ms": total_ms,
        "prefill_total_ms": (sum(sums[p] for p in ("vision", "projector", "prefill"))
                             if "prefill" in present else None),
        "input_tokens": rec.input_tokens,
        "image_tokens": rec.image_tokens,
        "output_tokens": rec.output_tokens,
        "batch_size": rec.batch_size,
        "valid": not unique,
        "invalid_reason": "; ".join(unique) if unique else None,
        "complete": rec.complete,
        "start_ns": times[0] if times else rec.wall_start_ns,
        "end_ns": times[-1] if times else rec.wall_end_ns,
        "timer": timer_kind,
    }


GPU_PHASE_COLUMNS = ("gpu_busy_ms", "gpu_span_ms", "gpu_kernel_ms", "gpu_activities",
                     "launch_delay_mean_us", "gpu_idle_ms")


def join_gpu_columns(requests: pl.DataFrame, phases: pl.DataFrame,
                     gpu_phases: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Add the trace's GPU time per phase instance (from `phase_gpu_table`) next to the
    event-timed `ms`, and per request the sums of GPU busy and kernel time (null where a
    request was not traced)."""
    keyed = gpu_phases.select("request", "phase", "step", *GPU_PHASE_COLUMNS).unique(
        ["request", "phase", "step"], keep="first")
    phases = phases.join(keyed, on=["request", "phase", "step"], how="left", maintain_order="left")
    per_request = keyed.group_by("request").agg(pl.col("gpu_busy_ms").sum(), pl.col("gpu_kernel_ms").sum())
    requests = requests.join(per_request, on="request", how="left", maintain_order="left")
    return requests, phases


def build_report(records: list[RequestRecord], timer_kind: str, *, samples: pl.DataFrame | None = None,
                 traces: list[dict[str, Any]] | None = None,
                 gpu_phases: pl.DataFrame | None = None) -> PhaseReport:
    """Turn collected records into the `requests` and `phases` tables."""
    request_rows, phase_rows = [], []
    for rec in records:
        rows, problems = _phase_rows(rec)
        phase_rows.extend(rows)
        request_rows.append(_request_row(rec, rows, problems, timer_kind))
    requests = pl.DataFrame(request_rows, schema=polars_schema(REQUEST_COLUMNS), orient="row")
    phases = pl.DataFrame(phase_rows, schema=polars_schema(PHASE_COLUMNS), orient="row")
    if gpu_phases is not None:
        requests, phases = join_gpu_columns(requests, phases, gpu_phases)
    from molmo_latency.telemetry import attach_telemetry

    tables = attach_telemetry({"requests": requests, "phases": phases}, samples)
    return PhaseReport(requests=tables["requests"], phases=tables["phases"], traces=list(traces or []),
                       telemetry=tables.get("telemetry"))
