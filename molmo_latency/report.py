"""The run report (transform): per-configuration statistics of every phase, phase shares,
prefill against input tokens and decode step time against step index.

Example:
    >>> import tempfile
    >>> from molmo_latency.sweep import SweepSpec, run_sweep
    >>> out = run_sweep("tiny", SweepSpec.from_dict({"crops": [1, 2], "repeats": 2, "new_tokens": [3]}),
    ...                 tempfile.mkdtemp())["run_dir"]
    >>> rep = run_report(out)
    >>> sorted(rep)
    ['config', 'decode_steps', 'prefill_vs_tokens', 'shares', 'summary']
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from molmo_latency.schema import CONFIG_COLUMNS
from molmo_latency.stats import PHASE_METRICS, summarize
from molmo_latency.sweep.rundir import RunDir

SHARE_PHASES = ("vision_ms", "projector_ms", "prefill_ms", "decode_ms", "other_ms")


def config_table(requests: pl.DataFrame) -> pl.DataFrame:
    """One row per configuration: knobs, counts and the headline medians/p95/CV."""
    keys = ["config_id", *[c for c in CONFIG_COLUMNS if c in requests.columns]]
    valid = requests.filter(pl.col("valid"))
    head = valid.group_by(keys, maintain_order=True).agg(
        pl.len().alias("n"),
        pl.col("image_tokens").first(), pl.col("input_tokens").first(),
        *[pl.col(m).median().alias(f"{m.removesuffix('_ms')}_median_ms") for m in
          ("vision_ms", "projector_ms", "prefill_ms", "decode_per_token_ms", "total_ms")],
        pl.col("total_ms").quantile(0.95, interpolation="linear").alias("total_p95_ms"),
        (pl.col("decode_per_token_ms").std() / pl.col("decode_per_token_ms").mean()).alias("decode_per_token_cv"),
        (pl.col("prefill_total_ms").std() / pl.col("prefill_total_ms").mean()).alias("prefill_total_cv"),
    )
    invalid = requests.group_by("config_id").agg((~pl.col("valid")).sum().alias("invalid"))
    return head.join(invalid, on="config_id", how="left").sort(keys[1:] if len(keys) > 1 else keys)


def phase_shares(requests: pl.DataFrame) -> pl.DataFrame:
    """Median time of each phase per configuration and its share of the median total."""
    present = [c for c in SHARE_PHASES if c in requests.columns]
    med = requests.filter(pl.col("valid")).group_by("config_id", maintain_order=True).agg(
        *[pl.col(c).median().fill_null(0.0) for c in present])
    total = sum(pl.col(c) for c in present)
    return med.with_columns(*[(pl.col(c) / total).alias(c.replace("_ms", "_share")) for c in present])


def decode_step_table(phases: pl.DataFrame) -> pl.DataFrame:
    """Median decode step time per configuration and step index (the KV length grows with it)."""
    dec = phases.filter(pl.col("phase") == "decode")
    return dec.group_by("config_id", "step").agg(pl.col("ms").median().alias("median_ms"),
                                                pl.len().alias("n")).sort("config_id", "step")


def run_report(run_dir: str | Path) -> dict[str, pl.DataFrame]:
    """All tables of the report of a run directory."""
    rd = RunDir(run_dir)
    rd.meta()
    requests = rd.table("requests")
    phases = rd.table("phases")
    keys = ["config_id"]
    return {
        "config": config_table(requests),
        "summary": summarize(requests.filter(pl.col("valid")), keys, PHASE_METRICS),
        "shares": phase_shares(requests),
        "prefill_vs_tokens": requests.filter(pl.col("valid")).select(
            "config_id", "input_tokens", "image_tokens", "prefill_ms", "prefill_total_ms"),
        "decode_steps": decode_step_table(phases),
    }
