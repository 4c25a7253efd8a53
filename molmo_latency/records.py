"""What the profiler holds per request, and the polars tables built from it.

Validity rules (nothing is clamped; an impossible value marks the request invalid with a reason):
phases must lie inside the request, must not overlap, must each end after they start; `other_ms`
(total minus the phases) must not be negative; a request needs a prefill; the number of decode
steps must be `output_tokens - 1`; a request with LLM calls that are not plain decode steps
(``recompute``: no KV cache; ``verify``: assisted decoding) is measured but invalid, with the
reason; a request whose generate() raised is `complete=False` and invalid.

`other_ms` is split on the same timeline into named gaps (time inside the request outside every
phase), which sum to it exactly when no phases overlap:

- ``input_prep_ms``: request start -> first phase (generate()'s argument checks, input
  preparation, cache set-up);
- ``embed_merge_ms``: after the first vision/projector phase, before the first LLM phase
  (feature selection, merging the image embeddings into the text embeddings, embedding lookup);
- ``between_steps_ms``: between LLM phases (sampling, logits processors, stopping criteria, the
  next step's input preparation);
- ``after_last_ms``: last phase -> request end (output assembly).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import polars as pl

from molmo_latency.session import Session
from molmo_latency.trace import phase_gpu_table, read_kineto
from molmo_latency.trace.load import cached_trace

from molmo_latency.conditions import CONDITION_COLUMNS
from molmo_latency.schema import (
    LLM_PHASES,
    OTHER_LLM_PHASES,
    PHASE_COLUMNS,
    PHASES,
    REQUEST_COLUMNS,
    TELEMETRY_RATE_COLUMNS,
)

_DTYPES = {"int64": pl.Int64, "float64": pl.Float64, "str": pl.Utf8, "bool": pl.Boolean,
           "list[int64]": pl.List(pl.Int64)}


def polars_schema(columns: dict[str, str]) -> dict[str, pl.DataType]:
    """A polars schema from one of the column contracts in :mod:`molmo_latency.schema`."""
    return {name: _DTYPES[kind] for name, kind in columns.items()}


class ModuleSpan(NamedTuple):
    """One module call of a request (``detail="modules"``): its kind (``attention``, ``mlp``,
    ``moe_router``, ...), decoder block or vision layer (-1: none) and mark indices."""

    kind: str
    block: int
    start_mark: int
    end_mark: int


class Span(NamedTuple):
    """One phase instance of a request: indices of its start and end mark in ``times_ns``."""

    phase: str
    step: int
    start_mark: int
    end_mark: int


@dataclass
class RequestRecord:
    """One finished generate() call: its resolved times and the phase spans that index them
    (the profiler's scratch state while it runs is :class:`molmo_latency.profiler.RunningRequest`)."""

    index: int
    spans: list[Span] = field(default_factory=list)
    times_ns: list[int] | None = None  # the marks on the host clock; None: they could not be resolved
    anomalies: list[str] = field(default_factory=list)
    complete: bool = True
    error: str | None = None
    input_tokens: int | None = None
    image_tokens: int | None = None
    output_tokens: int | None = None
    batch_size: int | None = None
    num_beams: int | None = None
    output_tokens_per_row: list[int] | None = None
    image_tokens_per_row: list[int] | None = None
    decode_rows: list[int] = field(default_factory=list)  # rows fed by each decode step
    unsplit: frozenset[str] = frozenset()  # regions whose LLM call was timed as a whole
    thread_id: int | None = None
    wall_start_ns: int = 0
    wall_end_ns: int = 0
    conditions: dict[str, Any] = field(default_factory=dict)  # molmo_latency.conditions.CONDITION_COLUMNS
    projector_inside_vision: bool | None = None  # from the phase map (issue 22)
    blocks_run: int | None = None  # text-model blocks configured when the request began
    # tokens at the start of each returned sequence that are not output tokens, where that is not
    # the prompt (encoder-decoder: the decoder start token; BLIP: the prompt less its last token)
    returned_prefix_tokens: int | None = None
    detail: str = "phases"  # "modules": module_spans were recorded
    module_spans: list[ModuleSpan] = field(default_factory=list)
    text_shape: Any = None  # molmo_latency.flops.TextShape of the decoder (FLOPs), None: unknown
    top_k: int | None = None  # MoE top-k when the request began


@dataclass
class PhaseReport:
    """The profiler's tables: `requests` (one row per generate()), `phases` (one per phase) and,
    with ``detail="modules"``, `modules` (one per phase instance and module kind, see
    :func:`modules_of`)."""

    requests: pl.DataFrame
    phases: pl.DataFrame
    traces: list[dict[str, Any]] = field(default_factory=list)
    telemetry: pl.DataFrame | None = None
    modules: pl.DataFrame | None = None

    def __getitem__(self, name: str) -> pl.DataFrame:
        return getattr(self, name)

    def write_parquet(self, directory: str | Path) -> list[Path]:
        """Write requests.parquet, phases.parquet (and telemetry.parquet, modules.parquet) into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ("requests", "phases", "telemetry", "modules"):
            frame = getattr(self, name)
            if frame is not None:
                path = out / f"{name}.parquet"
                frame.write_parquet(path)
                written.append(path)
        return written


    def write_chrome_trace(self, path: str | Path, *, requests: Iterable[int] | None = None) -> Path:
        """Write the requests (all, or those numbered `requests`) and their phases as a Chrome
        trace that Perfetto and ``chrome://tracing`` open (:func:`molmo_latency.timeline.chrome_trace`).

        Where ``profile_phases`` recorded a Kineto trace of one of them (``trace_dir=``), ours are
        merged into a copy of that trace on its clock (aligned on the profiler's own ranges of
        the first such request: the median offset over its phases, see
        :func:`~molmo_latency.timeline.aligned_offset_ns`), so each phase's kernels sit under it
        on one time axis; the trace itself is left as it was. Returns `path`.

        Example:
            >>> import json, tempfile, pathlib
            >>> from molmo_latency import profile_phases
            >>> from molmo_latency.models import reference_vlm
            >>> ref = reference_vlm("tiny")
            >>> with profile_phases(ref.model) as prof:
            ...     _ = ref.model.generate(**ref.request(crops=1, new_tokens=3))
            >>> out = prof.report().write_chrome_trace(pathlib.Path(tempfile.mkdtemp()) / "one.json")
            >>> [e["name"] for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X"][:3]
            ['request[0]', 'vision', 'projector']
        """
        from molmo_latency.show import write_json
        from molmo_latency.telemetry.counters import estimate_clock_offset_ns, read_trace
        from molmo_latency.timeline import aligned_offset_ns, chrome_trace, merge_into_trace, select_requests

        chosen = select_requests(self.requests, requests)
        numbers = set(chosen["request"].to_list())
        traced = next((t for t in self.traces if numbers & set(t.get("requests") or [])), None)
        if traced is None:
            doc = chrome_trace(chosen, self.phases, telemetry=self.telemetry)
        else:
            first = min(numbers & set(traced["requests"]))
            start_ns = int(chosen.filter(pl.col("request") == first)["start_ns"][0])
            kineto = read_trace(traced["path"])
            coarse = estimate_clock_offset_ns(kineto, f"request[{first}]", start_ns)
            own = self.phases.filter(pl.col("request") == first)
            offset, used = aligned_offset_ns(kineto, own, coarse)
            doc = merge_into_trace(kineto, chosen, self.phases, clock_offset_ns=offset, telemetry=self.telemetry,
                                   metadata={"kineto_trace": str(traced["path"]),
                                             "aligned_on": f"the median of {used} phase ranges of request[{first}]"
                                             if used else f"request[{first}]"})
        out = Path(path)
        write_json(out, doc, compact=True)
        return out


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


def _gaps_ns(rows: list[dict[str, Any]], start: int, end: int) -> dict[str, int]:
    """The time inside [start, end] outside every phase, by name (see the module docstring)."""
    gaps = {"input_prep": 0, "embed_merge": 0, "between_steps": 0, "after_last": 0}
    cursor, seen_image, seen_llm = start, False, False
    for i, row in enumerate(rows):
        gap = max(0, row["start_ns"] - cursor)
        if i == 0:
            gaps["input_prep"] += gap
        elif seen_llm:
            gaps["between_steps"] += gap
        elif seen_image:
            gaps["embed_merge"] += gap
        else:  # pragma: no cover - only a phase that is neither image nor LLM gets here
            gaps["input_prep"] += gap
        cursor = max(cursor, row["end_ns"])
        seen_llm |= row["phase"] in LLM_PHASES
        seen_image |= row["phase"] in ("vision", "projector")
    gaps["after_last"] += max(0, end - cursor)
    return gaps


def _request_row(rec: RequestRecord, rows: list[dict[str, Any]], problems: list[str],
                 timer_kind: str) -> dict[str, Any]:
    kinds = (*PHASES, *OTHER_LLM_PHASES)
    sums_ns = {p: 0 for p in kinds}
    counts = {p: 0 for p in kinds}
    for row in rows:
        sums_ns[row["phase"]] += row["end_ns"] - row["start_ns"]
        counts[row["phase"]] += 1
    sums = {p: ns / 1e6 for p, ns in sums_ns.items()}
    decode_steps = counts["decode"]
    times = rec.times_ns
    total_ms = (times[-1] - times[0]) / 1e6 if times else None
    other_ms = None
    gaps: dict[str, float | None] = dict.fromkeys(("input_prep", "embed_merge", "between_steps", "after_last"))
    if total_ms is not None:
        other_ns = (times[-1] - times[0]) - sum(sums_ns.values())
        other_ms = other_ns / 1e6
        if other_ms < 0:
            problems.append(f"phases sum to {sum(sums.values()):.3f} ms, more than the request's "
                            f"{total_ms:.3f} ms (other_ms = {other_ms:.3f})")
        if rows:
            gaps = {k: v / 1e6 for k, v in _gaps_ns(rows, times[0], times[-1]).items()}
    if not any(r["phase"] == "prefill" for r in rows) and rec.complete:
        problems.append("no LLM forward (prefill) was observed")
    if counts["recompute"]:
        problems.append(f"generate() ran without a KV cache (use_cache=False): {counts['recompute']} "
                        "LLM calls recomputed the whole sequence (phase 'recompute'), none is a decode "
                        "step; profile with the cache on for decode latency")
    if counts["verify"]:
        problems.append(f"{counts['verify']} LLM calls verified several candidate tokens at once "
                        "(assisted / prompt-lookup decoding, phase 'verify'); decode_steps counts only "
                        "the single-token steps")
    if rec.complete and rec.output_tokens is not None and rec.output_tokens >= 1 \
            and not counts["recompute"] and not counts["verify"] \
            and decode_steps != rec.output_tokens - 1:
        hint = ("; the missing LLM calls ran where no hook fires and no compiled call was handed out "
                "through get_compiled_call (a model compiled as a whole?)"
                if decode_steps < rec.output_tokens - 1 else "")
        problems.append(f"{decode_steps} decode steps for {rec.output_tokens} output tokens "
                        f"(expected {rec.output_tokens - 1}){hint}")
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
        "prefill_chunks": counts["prefill"],
        "recompute_ms": sums["recompute"] if counts["recompute"] else None,
        "recompute_steps": counts["recompute"],
        "verify_ms": sums["verify"] if counts["verify"] else None,
        "verify_steps": counts["verify"],
        "tokens_per_step": (sum(rec.decode_rows) / len(rec.decode_rows)) if rec.decode_rows else None,
        "num_beams": rec.num_beams,
        "output_tokens_per_row": rec.output_tokens_per_row,
        "image_tokens_per_row": rec.image_tokens_per_row,
        **{f"{k}_ms": v for k, v in gaps.items()},
        "unsplit_regions": ", ".join(sorted(rec.unsplit)) if rec.unsplit else None,
        "thread_id": rec.thread_id,
        **{k: rec.conditions.get(k) for k in CONDITION_COLUMNS},
        "projector_inside_vision": rec.projector_inside_vision,
        "blocks_run": rec.blocks_run,
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


def add_rate_columns(table: pl.DataFrame, samples: pl.DataFrame | None) -> pl.DataFrame:
    """TELEMETRY_RATE_COLUMNS per interval (``start_ns``..``end_ns``): the sampling rate achieved
    inside it, and the power from the energy counter (``energy_j`` / duration) where at least two
    samples lie inside it, so that the counter was read inside the interval (a shorter interval
    only interpolates between samples and says nothing about its own power). Null without
    samples."""
    rate_schema = polars_schema(TELEMETRY_RATE_COLUMNS)
    table = table.drop([c for c in rate_schema if c in table.columns])
    if samples is None or samples.height == 0 or table.height == 0:
        return table.with_columns(pl.lit(None, dtype=t).alias(c) for c, t in rate_schema.items())
    import numpy as np

    t = np.sort(samples["t_ns"].to_numpy())
    start, end = table["start_ns"].to_numpy(), table["end_ns"].to_numpy()
    inside = np.searchsorted(t, end, side="right") - np.searchsorted(t, start, side="left")
    duration_s = (end - start) / 1e9
    with np.errstate(divide="ignore", invalid="ignore"):
        hz = np.where(duration_s > 0, inside / duration_s, np.nan)
    energy = table["energy_j"].to_numpy() if "energy_j" in table.columns else np.full(table.height, np.nan)
    energy = np.asarray(energy, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        power = np.where((inside >= 2) & (duration_s > 0), energy / duration_s, np.nan)
    return table.with_columns(
        pl.Series("telemetry_hz", hz, dtype=pl.Float64).fill_nan(None),
        pl.Series("power_from_energy_w", power, dtype=pl.Float64).fill_nan(None),
    )


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
    modules = modules_of(records, phases) if any(r.detail == "modules" for r in records) else None
    if gpu_phases is not None:
        requests, phases = join_gpu_columns(requests, phases, gpu_phases)
    from molmo_latency.telemetry import attach_telemetry

    tables = attach_telemetry({"requests": requests, "phases": phases}, samples)
    tables["requests"] = add_rate_columns(tables["requests"], samples)
    tables["phases"] = add_rate_columns(tables["phases"], samples)
    return PhaseReport(requests=tables["requests"], phases=tables["phases"], traces=list(traces or []),
                       telemetry=tables.get("telemetry"), modules=modules)


MODULES_COLUMNS = {"request": pl.Int64, "phase": pl.Utf8, "step": pl.Int64, "module_kind": pl.Utf8,
                   "ms": pl.Float64, "calls": pl.Int64, "flops": pl.Int64, "flag": pl.Utf8}


def modules_of(records: list[RequestRecord], phases: pl.DataFrame) -> pl.DataFrame:
    """The ``modules`` table of ``detail="modules"`` requests: per phase instance and module kind
    the exclusive time (``ms``, :func:`molmo_latency.modules.module_table`: ``other`` closes the
    phase, never clamped, ``flag`` says why where it is negative), the module calls and the
    matrix-product FLOPs the config and the shapes fed give (:func:`molmo_latency.flops.request_flops`;
    null where not modelled: norms, ``other``, the image phases, prefill chunks, beam search)."""
    from molmo_latency.modules import module_table

    span_rows, flop_tables = [], []
    for rec in records:
        if rec.times_ns is None:
            continue
        t = rec.times_ns
        span_rows.extend({"request": rec.index, "module_kind": m.kind, "start_ns": t[m.start_mark],
                          "end_ns": t[m.end_mark]} for m in rec.module_spans)
        flops = _request_flops(rec)
        if flops is not None:
            flop_tables.append(flops.with_columns(pl.lit(rec.index, dtype=pl.Int64).alias("request")))
    spans = pl.DataFrame(span_rows, schema={"request": pl.Int64, "module_kind": pl.Utf8, "start_ns": pl.Int64,
                                            "end_ns": pl.Int64}, orient="row")
    table = module_table(spans, phases.select("request", "phase", "step", "start_ns", "end_ns"))
    if flop_tables:
        flops = pl.concat(flop_tables).select("request", "phase", "step", "module_kind", "flops")
        table = table.join(flops, on=["request", "phase", "step", "module_kind"], how="left",
                           maintain_order="left", nulls_equal=False)
    else:
        table = table.with_columns(pl.lit(None, dtype=pl.Int64).alias("flops"))
    return table.select(list(MODULES_COLUMNS)).cast(MODULES_COLUMNS)


def _request_flops(rec: RequestRecord) -> pl.DataFrame | None:
    """FLOPs per LLM phase instance and module kind of one request (None where its shapes are
    not all known: no decoder shape, no prompt length, beam search or prefill chunks)."""
    from molmo_latency.flops import request_flops

    if rec.text_shape is None or rec.input_tokens is None or rec.batch_size is None or (rec.num_beams or 1) > 1:
        return None
    if sum(1 for s in rec.spans if s.phase == "prefill") != 1:
        return None
    decode_steps = sum(1 for s in rec.spans if s.phase == "decode")
    table = request_flops(rec.text_shape, input_tokens=rec.input_tokens, output_tokens=decode_steps + 1,
                          top_k=rec.top_k, blocks=rec.blocks_run, batch=rec.batch_size)
    rows = rec.decode_rows
    if rows and any(r != rec.batch_size for r in rows):  # rows dropped out (finished sequences): per step
        return None
    return table


def trace_gpu_phases(traces: Iterable[Mapping[str, Any]]) -> pl.DataFrame | None:
    """GPU time per phase instance (``phase_gpu_table``) from the Kineto traces listed (each
    ``{"path": ...}``) that hold GPU activity; None without any. A file is read once for as long
    as it stays unchanged."""
    tables = [t for t in (_gpu_phases_of_file(str(trace["path"])) for trace in traces) if t is not None]
    return pl.concat(tables) if tables else None


def _gpu_phases_of_file(path: str) -> pl.DataFrame | None:
    try:
        stat = os.stat(path)
    except OSError:  # read_kineto says what is wrong with the path
        return _read_gpu_phases(path, None, None)
    return _read_gpu_phases(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _read_gpu_phases(path: str, _mtime_ns: int | None, _size: int | None) -> pl.DataFrame | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # through the Parquet cache (molmo_latency.trace.cache): a later report reads typed columns
        parsed = cached_trace(path, "kineto", read_kineto)
    return phase_gpu_table(parsed) if parsed.gpu.height else None


def session_report(session: Session) -> PhaseReport:
    """The `requests` and `phases` tables of a profiled :class:`~molmo_latency.session.Session`:
    the records' phases, their telemetry (from all samples held: a phase may hold an earlier
    sample) and the GPU time from its traces; the ``telemetry`` table is ``new_samples`` for a
    popped session."""
    report = build_report(session.records, session.timer_kind, samples=session.samples,
                          traces=session.traces, gpu_phases=trace_gpu_phases(session.traces))
    if session.new_samples is not None:
        report.telemetry = session.new_samples
    return report
