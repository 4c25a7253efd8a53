"""Telemetry per interval (phase instance, request): pure functions from frames to frames.

The alignment rule (sample-and-hold)
------------------------------------
A sample's values are taken to hold from its ``t_ns`` until the next sample (at most
``max_hold_ns``, by default 10 x the median sampling interval, so a stalled sampler does not
stretch one old reading over seconds). The samples that describe an interval
``[start_ns, end_ns)`` are those whose held span overlaps it: the last sample at or before
``start_ns`` (the value in effect when the interval began) plus every sample inside it. A 2 ms
decode step between two 10 ms samples therefore still gets the value held at its start.

- ``sm_clock_mean_mhz``, ``mem_clock_mean_mhz``, ``power_mean_w``: means weighted by how long
  each sample's value held inside the interval (a zero-length interval takes the held value).
- ``sm_clock_min_mhz``, ``sm_clock_max_mhz``, ``temp_max_c``: over those samples.
- ``throttle_reasons``: bitwise OR over those samples.
- ``energy_j``: the NVML energy counter interpolated linearly at ``start_ns`` and ``end_ns``,
  difference in joules; where the counter is missing, does not bracket the interval, or goes
  backwards: ``power_mean_w x duration``.
- ``telemetry_samples``: how many samples were used (the held one included); 0 when none.

A value stays null where the sensor was missing in every sample used.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl

from molmo_latency.errors import MolmoLatencyError
from molmo_latency.schema import TELEMETRY_AGG_COLUMNS, TELEMETRY_SAMPLE_COLUMNS

__all__ = [
    "AGG_SCHEMA",
    "aggregate_intervals",
    "attach_telemetry",
    "empty_telemetry_columns",
]

_DTYPES = {"int64": pl.Int64, "float64": pl.Float64, "str": pl.String, "bool": pl.Boolean}
AGG_SCHEMA: dict[str, pl.DataType] = {n: _DTYPES[d] for n, d in TELEMETRY_AGG_COLUMNS.items()}

_NEEDED_SAMPLE_COLUMNS = ("t_ns", "sm_clock_mhz", "mem_clock_mhz", "temp_c", "power_w",
                          "energy_mj", "throttle_reasons")
_HOLD_FACTOR = 10
_K = "__interval"  # private row key


def empty_telemetry_columns(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with the TELEMETRY_AGG_COLUMNS as typed nulls (NVML off or unavailable).

    Existing telemetry columns are replaced; other columns are kept in order.

    >>> empty_telemetry_columns(pl.DataFrame({"request": [0]})).row(0)[:3]
    (0, None, None)
    """
    base = df.drop([c for c in AGG_SCHEMA if c in df.columns])
    return base.with_columns(pl.lit(None, dtype=t).alias(c) for c, t in AGG_SCHEMA.items())


def _check_columns(df: pl.DataFrame, needed, what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise MolmoLatencyError(
            f"{what} lacks the column(s) {', '.join(missing)} (has: {', '.join(df.columns)}); "
            f"telemetry aggregation needs {', '.join(needed)}")


def _counter_diff(te: np.ndarray, ev: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Counter increase ``ev(e) - ev(s)`` by linear interpolation between the samples ``(te, ev)``.

    NaN where ``s`` or ``e`` lies outside ``[te[0], te[-1]]`` or the counter went backwards
    (driver reload) anywhere between the samples that bracket ``s`` and ``e``.
    """
    out = np.full(s.shape, np.nan)
    m = te.size
    if m == 0:
        return out
    resets = np.concatenate([[0], np.cumsum(np.diff(ev) < 0)])  # counter segment of each sample

    def at(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        j = np.searchsorted(te, x, side="right") - 1          # last sample at or before x
        ok = (j >= 0) & ((j < m - 1) | (x == te[-1]))
        lo = np.clip(j, 0, m - 1)
        hi = np.clip(j + 1, 0, m - 1)
        span = te[hi] - te[lo]
        frac = np.divide(x - te[lo], span, out=np.zeros_like(x), where=span > 0)
        return ev[lo] + (ev[hi] - ev[lo]) * frac, ok, lo, hi

    v_s, ok_s, lo_s, _ = at(s)
    v_e, ok_e, _, hi_e = at(e)
    ok = ok_s & ok_e & (resets[lo_s] == resets[hi_e])
    out[ok] = v_e[ok] - v_s[ok]
    return out


def aggregate_intervals(
    intervals: pl.DataFrame,
    samples: pl.DataFrame | None,
    *,
    max_hold_ns: int | None = None,
) -> pl.DataFrame:
    """Telemetry per interval: ``intervals`` (``start_ns``, ``end_ns`` and any key columns, all
    kept in order) plus TELEMETRY_AGG_COLUMNS, by the sample-and-hold rule of this module.

    ``samples`` is a TELEMETRY_SAMPLE_COLUMNS frame (None gives null columns). Vectorised: the
    samples of each interval are a contiguous run found by binary search.

    >>> samples = pl.DataFrame({"t_ns": [0, 10_000_000, 20_000_000],
    ...     "sm_clock_mhz": [1980.0, 1410.0, 1410.0], "mem_clock_mhz": [2619.0] * 3,
    ...     "temp_c": [50.0, 52.0, 53.0], "power_w": [300.0, 500.0, 500.0],
    ...     "energy_mj": [0.0, 3000.0, 8000.0], "throttle_reasons": [0, 4, 0]})
    >>> steps = pl.DataFrame({"step": [0, 1], "start_ns": [2_000_000, 8_000_000],
    ...                       "end_ns": [4_000_000, 12_000_000]})
    >>> aggregate_intervals(steps, samples).select(
    ...     "step", "sm_clock_mean_mhz", "energy_j", "throttle_reasons", "telemetry_samples").rows()
    [(0, 1980.0, 0.6, 0, 1), (1, 1695.0, 1.6, 4, 2)]
    """
    _check_columns(intervals, ("start_ns", "end_ns"), "the interval table")
    base = intervals.drop([c for c in AGG_SCHEMA if c in intervals.columns])
    if samples is None:
        return empty_telemetry_columns(base)
    _check_columns(samples, _NEEDED_SAMPLE_COLUMNS, "the telemetry sample table")

    samp = (samples.select(_NEEDED_SAMPLE_COLUMNS)
            .filter(pl.col("t_ns").is_not_null())
            .sort("t_ns")
            .with_columns(pl.col("t_ns").cast(pl.Int64),
                          pl.col("throttle_reasons").cast(pl.Int64))
            .with_row_index("_i")
            .with_columns(pl.col("_i").cast(pl.Int64)))
    keyed = base.with_row_index(_K)
    if samp.height == 0 or base.height == 0:
        out = empty_telemetry_columns(base)
        return out.with_columns(pl.lit(0, dtype=pl.Int64).alias("telemetry_samples"))

    t = samp["t_ns"]
    if max_hold_ns is None:
        gaps = t.diff().drop_nulls()
        gaps = gaps.filter(gaps > 0)
        max_hold_ns = int(_HOLD_FACTOR * gaps.median()) if gaps.len() else 2**62
    samp = samp.with_columns(
        pl.min_horizontal(pl.col("t_ns").shift(-1), pl.col("t_ns") + max_hold_ns)
        .fill_null(pl.col("t_ns") + max_hold_ns).alias("_seg_end"))

    iv = (keyed.select(_K, pl.col("start_ns").cast(pl.Int64).alias("_s"),
                       pl.col("end_ns").cast(pl.Int64).alias("_e"))
          .filter(pl.col("_s").is_not_null() & pl.col("_e").is_not_null())
          .with_columns(pl.max_horizontal("_e", pl.col("_s") + 1).alias("_e_eff")))
    # a: last sample at or before the start (the held one); b: last sample before the end.
    a = (t.search_sorted(iv["_s"], side="right").cast(pl.Int64) - 1).clip(lower_bound=0)
    b = t.search_sorted(iv["_e_eff"], side="left").cast(pl.Int64) - 1
    iv = iv.with_columns(a.alias("_a"), b.alias("_b"))

    rows = (iv.filter(pl.col("_b") >= pl.col("_a"))
            .with_columns(pl.int_ranges("_a", pl.col("_b") + 1).alias("_i"))
            .explode("_i")
            .join(samp, on="_i", how="inner")
            .with_columns(
                (pl.min_horizontal("_e_eff", "_seg_end") - pl.max_horizontal("_s", "t_ns"))
                .clip(lower_bound=0).cast(pl.Float64).alias("_w"))
            .filter(pl.col("_w") > 0))

    def wmean(col: str) -> pl.Expr:
        num = (pl.col(col) * pl.col("_w")).sum()
        den = pl.when(pl.col(col).is_not_null()).then(pl.col("_w")).otherwise(0.0).sum()
        return pl.when(den > 0).then(num / den).otherwise(None)

    agg = rows.group_by(_K).agg(
        wmean("sm_clock_mhz").alias("sm_clock_mean_mhz"),
        pl.col("sm_clock_mhz").min().alias("sm_clock_min_mhz"),
        pl.col("sm_clock_mhz").max().alias("sm_clock_max_mhz"),
        wmean("mem_clock_mhz").alias("mem_clock_mean_mhz"),
        pl.col("temp_c").max().alias("temp_max_c"),
        wmean("power_w").alias("power_mean_w"),
        pl.col("throttle_reasons").bitwise_or().alias("throttle_reasons"),
        pl.len().cast(pl.Int64).alias("telemetry_samples"),
    )

    # Energy from the counter, interpolated at both ends.
    energy = samp.filter(pl.col("energy_mj").is_not_null())
    te = energy["t_ns"].to_numpy().astype(np.float64)
    ev = energy["energy_mj"].to_numpy().astype(np.float64)
    s = iv["_s"].to_numpy().astype(np.float64)
    e = np.maximum(iv["_e"].to_numpy().astype(np.float64), s)
    counter_j = _counter_diff(te, ev, s, e) / 1000.0
    iv = iv.with_columns(
        pl.Series("_counter_j", counter_j, dtype=pl.Float64).fill_nan(None),
        ((pl.col("_e") - pl.col("_s")).clip(lower_bound=0).cast(pl.Float64) / 1e9).alias("_dur_s"))

    agg = (iv.select(_K, "_counter_j", "_dur_s")
           .join(agg, on=_K, how="left")
           .with_columns(
               pl.coalesce("_counter_j", pl.col("power_mean_w") * pl.col("_dur_s"))
               .alias("energy_j"),
               pl.col("telemetry_samples").fill_null(0))
           .select(_K, *AGG_SCHEMA))

    out = (keyed.join(agg, on=_K, how="left", maintain_order="left")
           .with_columns(pl.col("telemetry_samples").fill_null(0))
           .drop(_K))
    return out.with_columns(pl.col(c).cast(t) for c, t in AGG_SCHEMA.items())


def attach_telemetry(
    report: Mapping[str, pl.DataFrame],
    samples: pl.DataFrame | None,
    *,
    tables: tuple[str, ...] = ("phases", "requests"),
    max_hold_ns: int | None = None,
) -> dict[str, pl.DataFrame]:
    """A new report dict whose ``phases`` and ``requests`` carry TELEMETRY_AGG_COLUMNS.

    With ``samples`` None (NVML off or unavailable) the columns are typed nulls; otherwise each
    table's ``start_ns``/``end_ns`` rows are aggregated by :func:`aggregate_intervals` and the
    samples are added as ``report["telemetry"]``. Other tables pass through untouched.

    >>> report = {"requests": pl.DataFrame({"request": [0], "start_ns": [0], "end_ns": [10]})}
    >>> out = attach_telemetry(report, None)
    >>> out["requests"]["sm_clock_mean_mhz"].to_list(), "telemetry" in out
    ([None], False)
    """
    out = dict(report)
    for name in tables:
        if name in out:
            if samples is None:
                out[name] = empty_telemetry_columns(out[name])
            else:
                out[name] = aggregate_intervals(out[name], samples, max_hold_ns=max_hold_ns)
    if samples is not None:
        schema = {c: _DTYPES[d] for c, d in TELEMETRY_SAMPLE_COLUMNS.items()}
        out["telemetry"] = samples.select(
            pl.col(c).cast(t) if c in samples.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in schema.items())
    return out
