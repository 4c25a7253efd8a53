"""Summary statistics over polars frames (transform only): median, p95, CV per group.

Example:
    >>> import polars as pl
    >>> df = pl.DataFrame({"g": ["a", "a", "b"], "x_ms": [1.0, 3.0, 5.0]})
    >>> summarize(df, ["g"], ["x_ms"]).select("g", "metric", "n", "median").rows()
    [('a', 'x_ms', 2, 2.0), ('b', 'x_ms', 1, 5.0)]
"""

from __future__ import annotations

from typing import Sequence

import polars as pl

PHASE_METRICS = ("vision_ms", "projector_ms", "prefill_ms", "prefill_total_ms", "decode_per_token_ms",
                 "decode_ms", "other_ms", "total_ms")


def summarize(df: pl.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pl.DataFrame:
    """Long table: one row per (group, metric) with n, mean, median, p95, min, max, std, cv.

    Null and NaN values are left out; p95 uses linear interpolation; cv = std / mean (sample
    std; null for n < 2 or a zero mean).
    """
    present = [m for m in metrics if m in df.columns]
    if not present:
        return pl.DataFrame()
    long = (df.select(*by, *present)
            .unpivot(index=list(by), on=present, variable_name="metric", value_name="value")
            .filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan()))
    out = long.group_by(*by, "metric", maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("n"),
        pl.col("value").mean().alias("mean"),
        pl.col("value").median().alias("median"),
        pl.col("value").quantile(0.95, interpolation="linear").alias("p95"),
        pl.col("value").min().alias("min"),
        pl.col("value").max().alias("max"),
        pl.col("value").std().alias("std"),
    ).with_columns(pl.when((pl.col("n") >= 2) & (pl.col("mean") != 0))
                   .then(pl.col("std") / pl.col("mean")).otherwise(None).alias("cv"))
    return out.sort(*by, "metric", maintain_order=True)
