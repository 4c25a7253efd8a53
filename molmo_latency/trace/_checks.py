"""What the trace readers refuse to sum: events whose times cannot be true, and duplicates.

Part of the trace readers (collect/hold), shared by the Kineto and the nsys reader so both count
the same things under the same names. Every event set aside is counted under a reason
(:data:`SKIP_REASONS`: the key is what ``KinetoTrace.skipped_reasons`` and the ``trace summary
--json`` key ``skipped_reasons`` hold; the value is how a warning words it), never summed, and
one :class:`~molmo_latency.trace.TraceWarning` lists them.

Times that cannot be true (checked on every table once its times are int64 ns since the epoch):

- a negative duration (``dur < 0``; nsys ``end < start``);
- a start before the Unix epoch (a negative ``ts``);
- a start more than :data:`MAX_TRACE_SPAN_NS` away from the trace's median start while most
  events start near it, or a duration longer than that (one event would stretch a seconds-long
  trace over years);
- an event identical in every column to one before it in the same table (a duplicate).
"""

from __future__ import annotations

import warnings
from collections import Counter

import polars as pl

__all__ = ["MAX_TRACE_SPAN_NS", "SKIP_REASONS", "drop_impossible"]

#: Reason key -> how a warning words it.
SKIP_REASONS = {
    "missing_time": "without a numeric 'ts'/'dur' (nsys: start/end)",
    "non_numeric_time": "with a start or end that is not an integer",
    "time_out_of_range": "with a time beyond the int64 nanosecond range",
    "negative_duration": "with a negative duration (end before start)",
    "negative_time": "starting before the Unix epoch (negative 'ts')",
    "outside_time_span": "more than a day away from the rest of the trace (or lasting over a day)",
    "duplicate": "duplicating an event before them",
    "bad_phase": "with a missing, unknown or non-text 'ph'",
    "missing_category": "complete ('X') events without a 'cat'",
    "unknown_category": "complete ('X') events of an unknown 'cat'",
    "unclosed_range": "NVTX ranges never closed (no end time)",
    "non_integer_id": "with a device, stream, correlation or other id that is not an integer",
    "non_text_name": "with a name that is not text",
    "missing_device": "GPU activities without a device",
}

#: The longest a trace can be: events further than this from the trace's median start, or
#: longer than this, are set aside (a real capture lasts seconds to hours).
MAX_TRACE_SPAN_NS = 24 * 3600 * 10**9

_TIME_COLUMNS = ("start_ns", "end_ns", "dur_ns")


def median_start_ns(tables: list[pl.DataFrame]) -> int | None:
    """The median start of the events of `tables`, when most of them (more than half) start
    within :data:`MAX_TRACE_SPAN_NS` of it: the events far from it are then the odd ones out. None
    when there is no such majority (events spread over years on purpose, or no events): then no
    event is set aside for being far from the others."""
    starts = [t["start_ns"].filter(t["start_ns"] >= 0) for t in tables if t.height]
    starts = [s for s in starts if s.len()]
    if not starts:
        return None
    every = pl.concat(starts)
    median = int(every.median())
    near = int(((every - median).abs() <= MAX_TRACE_SPAN_NS).sum())
    return median if 2 * near > every.len() else None


def drop_impossible(table: pl.DataFrame, median_ns: int | None, skipped: Counter,
                    device_required: bool = False) -> pl.DataFrame:
    """`table` without events whose times cannot be true or that duplicate another; each
    counted in `skipped` under its reason. Valid tables come back unchanged (the same object).
    `device_required`: a row without a ``device`` is set aside too (a GPU activity no GPU ran).

    Example:
        >>> from collections import Counter
        >>> t = pl.DataFrame({"name": ["a", "b", "b", "c"], "start_ns": [100, 200, 200, -5],
        ...                   "end_ns": [150, 190, 190, 0]}).with_columns(dur_ns=pl.col("end_ns") - pl.col("start_ns"))
        >>> seen = Counter()
        >>> drop_impossible(t, 150, seen)["name"].to_list(), sorted(seen.items())
        (['a'], [('negative_duration', 2), ('negative_time', 1)])
    """
    if not table.height:
        return table
    start, dur = pl.col("start_ns"), pl.col("dur_ns")
    checks = [("negative_duration", dur < 0), ("negative_time", start < 0)]
    if device_required:
        checks.append(("missing_device", pl.col("device").is_null()))
    if median_ns is not None:
        far = ((start - median_ns).abs() > MAX_TRACE_SPAN_NS) | (dur > MAX_TRACE_SPAN_NS)
        checks.append(("outside_time_span", far))
    # One boolean pass first (a valid table, the usual case, costs no more); reasons are named
    # on the rows set aside only.
    bad = table.select(pl.any_horizontal([condition for _, condition in checks]).fill_null(False))[:, 0]
    if bad.any():
        reason = pl.lit(None, dtype=pl.String)
        for key, condition in reversed(checks):  # the first that applies names the reason
            reason = pl.when(condition).then(pl.lit(key)).otherwise(reason)
        reasons = table.filter(bad).select(reason.alias("reason"))["reason"]
        for key, count in reasons.drop_nulls().value_counts().iter_rows():
            skipped[key] += count
        table = table.filter(~bad)
    return drop_duplicates(table, skipped)


def drop_duplicates(table: pl.DataFrame, skipped: Counter) -> pl.DataFrame:
    """`table` without rows equal in every column to an earlier row; counted as ``duplicate``.

    Checked first on the time columns alone (cheap; a real trace rarely has two events with the
    same start, end and duration in one table), then on every column of the candidates.
    """
    if table.height < 2:
        return table
    start = table["start_ns"]
    shared = None  # rows whose start another row shares: the only possible duplicates
    if start.null_count() == 0 and start.is_sorted():  # equal starts are neighbours (the Kineto reader sorts)
        same = start.diff().fill_null(1) == 0
        if not same.any():
            return table
        shared = same | same.shift(-1, fill_value=False)
    candidates = table if shared is None else table.filter(shared)
    if not candidates.select(_TIME_COLUMNS).is_duplicated().any():
        return table
    hashable = candidates.with_columns(pl.col(c).cast(pl.List(pl.Int64)) for c, dtype in table.schema.items()
                                       if isinstance(dtype, pl.Array))
    first = hashable.select(pl.struct(pl.all()).is_first_distinct())[:, 0]
    n = int((~first).sum())
    if n:
        skipped["duplicate"] += n
        if shared is not None:  # back onto every row: a row no other shares a start with is kept
            first = pl.repeat(True, table.height, eager=True).scatter(shared.arg_true(), first)
        table = table.filter(first)
    return table


def warn_skipped(path, skipped: Counter, stacklevel: int) -> None:
    """One TraceWarning listing what was skipped and why (nothing when nothing was)."""
    from molmo_latency.errors import TraceWarning

    total = sum(skipped.values())
    if not total:
        return
    parts = ", ".join(f"{count} {SKIP_REASONS.get(key, key)}" for key, count in skipped.most_common())
    warnings.warn(f"{path}: skipped {total} event(s), not counted in any total: {parts}", TraceWarning,
                  stacklevel=stacklevel + 1)
