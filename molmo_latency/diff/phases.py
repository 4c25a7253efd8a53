"""Phase-level samples of one side and the phase diff of two sides (transform only).

A *phase sample* frame has one row per measured value: ``phase`` (str), ``request`` (int64)
and ``value_ms`` (float64). Its phases are the headline ones of :data:`HEADLINE_PHASES`
(``decode`` is the sum of a request's decode steps, ``decode_per_token`` their mean, ``other``
the request minus its phases, ``total`` the whole generate() call) and one ``decode[k]`` per
decode step index k.

Example:
    >>> import polars as pl
    >>> a = pl.DataFrame({"phase": ["total"] * 6, "request": list(range(6)),
    ...                   "value_ms": [20.0, 21.0, 19.5, 20.5, 20.2, 19.8]})
    >>> b = a.with_columns(pl.col("value_ms") * 1.5)
    >>> phase_diff(a, b).select("phase", "verdict").row(0)
    ('total', 'slower')
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import polars as pl

from molmo_latency.diff.stats import compare_samples, holm, row_seed

HEADLINE_PHASES = ("vision", "projector", "prefill", "decode", "decode_per_token", "other", "total")
_REQUEST_COLUMN = {"vision": "vision_ms", "projector": "projector_ms", "prefill": "prefill_ms",
                   "decode": "decode_ms", "decode_per_token": "decode_per_token_ms", "other": "other_ms",
                   "total": "total_ms"}
_STEP = re.compile(r"^decode\[(\d+)\]$")
SAMPLE_SCHEMA = {"phase": pl.String, "request": pl.Int64, "value_ms": pl.Float64}

PHASE_DIFF_SCHEMA = {
    "phase": pl.String, "family": pl.String, "a_n": pl.Int64, "b_n": pl.Int64,
    "a_median_ms": pl.Float64, "b_median_ms": pl.Float64, "a_p95_ms": pl.Float64, "b_p95_ms": pl.Float64,
    "a_mean_ms": pl.Float64, "b_mean_ms": pl.Float64, "delta_ms": pl.Float64, "delta_pct": pl.Float64,
    "ci_low_ms": pl.Float64, "ci_high_ms": pl.Float64, "p_value": pl.Float64, "p_adjusted": pl.Float64,
    "verdict": pl.String, "reason": pl.String,
}


def phase_order(phase: str) -> tuple[int, int]:
    """Sort key: the headline phases in pipeline order, then decode steps by index.

    Example:
        >>> sorted(["decode[10]", "total", "decode[2]", "vision"], key=phase_order)
        ['vision', 'total', 'decode[2]', 'decode[10]']
    """
    if phase in HEADLINE_PHASES:
        return (0, HEADLINE_PHASES.index(phase))
    m = _STEP.match(phase)
    return (1, int(m.group(1))) if m else (2, 0)


def run_phase_samples(requests: pl.DataFrame, phases: pl.DataFrame, config_id: str) -> pl.DataFrame:
    """Phase samples of one configuration of a run directory: its valid requests only.

    `requests` and `phases` are the run directory's tables (see :mod:`molmo_latency.schema`);
    a request is identified by its ``repeat``.

    Example:
        >>> import polars as pl
        >>> req = pl.DataFrame({"config_id": ["c", "c"], "repeat": [0, 1], "valid": [True, False],
        ...                     **{c: [1.0, 2.0] for c in ("vision_ms", "projector_ms", "prefill_ms",
        ...                        "decode_ms", "decode_per_token_ms", "other_ms", "total_ms")}})
        >>> ph = pl.DataFrame({"config_id": ["c"] * 2, "repeat": [0, 1], "phase": ["decode"] * 2,
        ...                    "step": [0, 0], "ms": [1.0, 2.0]})
        >>> s = run_phase_samples(req, ph, "c")
        >>> s.filter(pl.col("phase") == "decode[0]").rows()
        [('decode[0]', 0, 1.0)]
    """
    req = requests.filter((pl.col("config_id") == config_id) & pl.col("valid"))
    parts = []
    for phase, column in _REQUEST_COLUMN.items():
        if column in req.columns:
            parts.append(req.select(pl.lit(phase).alias("phase"), pl.col("repeat").cast(pl.Int64).alias("request"),
                                    pl.col(column).cast(pl.Float64).alias("value_ms")))
    steps = phases.filter((pl.col("config_id") == config_id) & (pl.col("phase") == "decode"))
    steps = steps.join(req.select("repeat"), on="repeat", how="semi")
    parts.append(steps.select(pl.format("decode[{}]", pl.col("step")).alias("phase"),
                              pl.col("repeat").cast(pl.Int64).alias("request"),
                              pl.col("ms").cast(pl.Float64).alias("value_ms")))
    return _finish(parts)


def trace_phase_samples(annotations: pl.DataFrame) -> pl.DataFrame:
    """Phase samples from the CPU user annotations of a trace written by ``profile_phases``.

    Each ``request[N]`` range holds the ``vision``, ``projector``, ``prefill`` and ``decode[k]``
    ranges inside it on the same thread (names read by the trace reader's
    :func:`~molmo_latency.trace.phase_of` and :func:`~molmo_latency.trace.request_of`,
    containment by :func:`~molmo_latency.trace.innermost_range`); their durations are host-side
    ``record_function`` times. A trace without ``request[N]`` ranges gives an empty frame.

    Example:
        >>> import polars as pl
        >>> ann = pl.DataFrame({"name": ["request[0]", "vision", "prefill", "decode[0]", "decode[1]"],
        ...                     "pid": [1] * 5, "tid": [1] * 5,
        ...                     "start_ns": [0, 1_000_000, 3_000_000, 6_000_000, 8_000_000],
        ...                     "end_ns": [10_000_000, 2_000_000, 5_000_000, 7_000_000, 9_500_000]})
        >>> s = trace_phase_samples(ann.with_columns(dur_ns=pl.col("end_ns") - pl.col("start_ns")))
        >>> dict(s.select("phase", "value_ms").iter_rows())["other"]
        4.5
    """
    from molmo_latency.trace import innermost_range, phase_of, request_of

    if annotations.height == 0:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    names = annotations["name"].to_list()
    parsed = [phase_of(n) for n in names]
    ann = annotations.with_columns(
        phase=pl.Series([p[0] if p else None for p in parsed], dtype=pl.String),
        step=pl.Series([p[1] if p else None for p in parsed], dtype=pl.Int64),
        request=pl.Series([request_of(n) for n in names], dtype=pl.Int64),
    )
    requests = ann.filter(pl.col("request").is_not_null())
    if requests.height == 0:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    inner = ann.filter(pl.col("phase").is_not_null()).drop("request")
    inner = inner.with_columns(request=requests["request"].gather(innermost_range(inner, requests)))
    inner = inner.filter(pl.col("request").is_not_null()).with_columns(ms=pl.col("dur_ns") / 1e6)
    per_request = inner.group_by("request", "phase").agg(pl.col("ms").sum(), pl.len().alias("n"))
    wide = requests.select("request", total=pl.col("dur_ns") / 1e6).unique("request", keep="first")
    for phase in ("vision", "projector", "prefill", "decode"):
        part = per_request.filter(pl.col("phase") == phase).select("request", pl.col("ms").alias(phase),
                                                                    pl.col("n").alias(f"{phase}_n"))
        wide = wide.join(part, on="request", how="left")
    phase_sum = pl.sum_horizontal(*[pl.col(p).fill_null(0.0) for p in ("vision", "projector", "prefill", "decode")])
    wide = wide.with_columns(other=pl.col("total") - phase_sum,
                             decode_per_token=pl.col("decode") / pl.col("decode_n"))
    parts = [wide.select(pl.lit(p).alias("phase"), "request", pl.col(p).cast(pl.Float64).alias("value_ms"))
             for p in HEADLINE_PHASES]
    steps = inner.filter((pl.col("phase") == "decode") & pl.col("step").is_not_null())
    parts.append(steps.select(pl.format("decode[{}]", "step").alias("phase"), "request", pl.col("ms").alias("value_ms")))
    return _finish(parts)


def _finish(parts: list[pl.DataFrame]) -> pl.DataFrame:
    frame = pl.concat([p.cast(SAMPLE_SCHEMA) for p in parts]) if parts else pl.DataFrame(schema=SAMPLE_SCHEMA)
    frame = frame.drop_nulls("value_ms").filter(pl.col("value_ms").is_finite())
    order = {p: phase_order(p) for p in frame["phase"].unique().to_list()}
    return frame.with_columns(_key=pl.col("phase").replace_strict(
        {p: k[0] * 1_000_000 + k[1] for p, k in order.items()}, return_dtype=pl.Int64) if order else pl.lit(0)
    ).sort("_key", "request").drop("_key")


def phase_diff(a: pl.DataFrame, b: pl.DataFrame, *, alpha: float = 0.05, ci_level: float = 0.95,
               resamples: int = 2000, min_effect_pct: float = 1.0, seed: int = 0) -> pl.DataFrame:
    """One row per phase present on both sides: medians, p95, means, difference of medians
    with its bootstrap CI, Mann-Whitney p-value (raw and Holm-adjusted) and verdict.

    Two families are Holm-adjusted apart: the headline phases (``family == "phase"``) and the
    decode steps (``family == "step"``). See :mod:`molmo_latency.diff.stats` for the rule.

    Example:
        >>> import polars as pl
        >>> s = pl.DataFrame({"phase": ["prefill"] * 5, "request": list(range(5)),
        ...                   "value_ms": [3.0, 3.1, 2.9, 3.05, 2.95]})
        >>> phase_diff(s, s).select("phase", "delta_ms", "verdict").row(0)
        ('prefill', 0.0, 'no significant change')
    """
    common = set(a["phase"].unique().to_list()) & set(b["phase"].unique().to_list())
    phases = sorted(common, key=phase_order)
    values = {}
    for side, frame in (("a", a), ("b", b)):
        grouped = frame.filter(pl.col("phase").is_in(phases)).group_by("phase").agg(pl.col("value_ms"))
        values[side] = {p: np.asarray(v, dtype=np.float64) for p, v in grouped.iter_rows()}
    families = {p: ("phase" if p in HEADLINE_PHASES else "step") for p in phases}
    from molmo_latency.diff.stats import mann_whitney_p

    raw = {p: mann_whitney_p(values["a"][p], values["b"][p]) for p in phases}
    adjusted: dict[str, float | None] = {}
    family_size: dict[str, int] = {}
    for family in ("phase", "step"):
        members = [p for p in phases if families[p] == family]
        adjusted.update(zip(members, holm([raw[p] for p in members])))
        family_size.update({p: max(1, sum(raw[m] is not None for m in members)) for p in members})
    rows: list[dict[str, Any]] = []
    for p in phases:
        xa, xb = values["a"][p], values["b"][p]
        row = compare_samples(xa, xb, alpha=alpha, ci_level=ci_level, resamples=resamples,
                              min_effect_pct=min_effect_pct, seed=row_seed(seed, p), p_adjusted=adjusted[p],
                              family_size=family_size[p])
        row["p_value"] = raw[p]
        rows.append({"phase": p, "family": families[p], "a_mean_ms": float(xa.mean()),
                     "b_mean_ms": float(xb.mean()), **row})
    return pl.DataFrame(rows, schema=PHASE_DIFF_SCHEMA) if rows else pl.DataFrame(schema=PHASE_DIFF_SCHEMA)
