"""The run report (transform): per-configuration statistics of every phase, phase shares,
prefill against input tokens and decode step time against step index.

Example:
    >>> import tempfile
    >>> from molmo_latency.sweep import SweepSpec, run_sweep
    >>> out = run_sweep("tiny", SweepSpec.from_dict({"crops": [1, 2], "repeats": 2, "new_tokens": [3]}),
    ...                 tempfile.mkdtemp())["run_dir"]
    >>> rep = run_report(out)
    >>> sorted(rep)
    ['config', 'decode_steps', 'failures', 'prefill_vs_tokens', 'quality', 'shares', 'summary']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from molmo_latency.quality import Quality, judge
from molmo_latency.schema import CONFIG_COLUMNS
from molmo_latency.stats import PHASE_METRICS, summarize
from molmo_latency.hold.rundir import RunDir

SHARE_PHASES = ("vision_ms", "projector_ms", "prefill_ms", "decode_ms", "other_ms")


FAILURE_COLUMNS = ("config_id", "stage", "error_type", "message")

# What tells configurations apart when a table has neither config_id nor knob columns (a
# `prof.report().write_parquet(dir)`): crops change the image tokens, the prompt the input tokens.
SHAPE_COLUMNS = {"image_tokens": "img", "input_tokens": "in"}


def with_config_id(requests: pl.DataFrame) -> pl.DataFrame:
    """`requests` with a text ``config_id``: the sweep's own; else one built from the knob
    columns (``crops=1,top_k=2``); else from the request shape (``img16-in25``); else ``all``.
    explain and report both call this, so they agree on what a configuration is.

    >>> with_config_id(pl.DataFrame({"image_tokens": [16, 64, 16], "input_tokens": [25, 73, 25]}))["config_id"].to_list()
    ['img16-in25', 'img64-in73', 'img16-in25']
    >>> with_config_id(pl.DataFrame({"crops": [1], "top_k": [2], "image_tokens": [16]}))["config_id"].to_list()
    ['crops=1,top_k=2']
    """
    if "config_id" in requests.columns:
        return requests.with_columns(pl.col("config_id").cast(pl.String))
    knobs = [c for c in CONFIG_COLUMNS if c in requests.columns and c != "batch_size"]
    if knobs:
        expr = pl.concat_str([pl.format(f"{k}={{}}", pl.col(k)) for k in knobs], separator=",")
    elif any(c in requests.columns for c in SHAPE_COLUMNS):
        expr = pl.concat_str([pl.format(f"{short}{{}}", pl.col(c)) for c, short in SHAPE_COLUMNS.items()
                              if c in requests.columns], separator="-")
    else:
        expr = pl.lit("all")
    return requests.with_columns(expr.fill_null("?").alias("config_id"))


def config_table(requests: pl.DataFrame) -> pl.DataFrame:
    """One row per configuration (also one whose requests are all invalid): knobs, counts of
    valid and invalid requests, the most common invalid_reason, and the medians/p95/CV of the
    valid requests (null where none is valid).

    >>> req = pl.DataFrame({"config_id": ["a", "a", "b"], "valid": [True, True, False],
    ...                     "invalid_reason": [None, None, "oom"], "total_ms": [1.0, 3.0, 9.0]})
    >>> config_table(req).select("config_id", "n_valid", "invalid", "invalid_reason_top", "total_median_ms").rows()
    [('a', 2, 0, None, 2.0), ('b', 0, 1, 'oom', None)]
    """
    keys = ["config_id", *[c for c in CONFIG_COLUMNS if c in requests.columns]]
    valid = pl.col("valid")

    def v(col: str) -> pl.Expr:
        return pl.col(col).filter(valid)

    medians = [m for m in ("vision_ms", "projector_ms", "prefill_ms", "decode_per_token_ms", "total_ms")
               if m in requests.columns]
    aggs = [valid.sum().cast(pl.Int64).alias("n_valid"), (~valid).sum().cast(pl.Int64).alias("invalid"),
            *[v(m).median().alias(f"{m.removesuffix('_ms')}_median_ms") for m in medians]]
    for col in ("image_tokens", "input_tokens"):
        if col in requests.columns:
            aggs.append(pl.col(col).first())
    if "total_ms" in requests.columns:
        aggs.append(v("total_ms").quantile(0.95, interpolation="linear").alias("total_p95_ms"))
    for col, name in (("decode_per_token_ms", "decode_per_token_cv"), ("prefill_total_ms", "prefill_total_cv"),
                      ("total_ms", "total_cv")):
        if col in requests.columns:
            aggs.append((v(col).std() / v(col).mean()).alias(name))
    if "invalid_reason" in requests.columns:
        aggs.append(pl.col("invalid_reason").filter(~valid).drop_nulls().mode().sort().first()
                    .alias("invalid_reason_top"))
    table = requests.group_by(keys, maintain_order=True).agg(aggs)
    return table.sort(keys[1:] if len(keys) > 1 else keys, nulls_last=True, maintain_order=True)


def phase_shares(requests: pl.DataFrame) -> pl.DataFrame:
    """Median time of each phase per configuration and its share of the sum of those medians;
    with the whole request's median, 25th and 75th percentiles (``total_*``) and ``n``, so a
    plot can show the median request's height, its spread and how many requests it stands for."""
    present = [c for c in SHARE_PHASES if c in requests.columns]
    total_stats = [pl.col("total_ms").median().alias("total_median_ms"),
                   pl.col("total_ms").quantile(0.25, interpolation="linear").alias("total_q25_ms"),
                   pl.col("total_ms").quantile(0.75, interpolation="linear").alias("total_q75_ms")] \
        if "total_ms" in requests.columns else []
    med = requests.filter(pl.col("valid")).group_by("config_id", maintain_order=True).agg(
        *[pl.col(c).median().fill_null(0.0) for c in present], *total_stats, pl.len().alias("n"))
    total = sum(pl.col(c) for c in present)
    return med.with_columns(*[(pl.col(c) / total).alias(c.replace("_ms", "_share")) for c in present])


def decode_step_table(phases: pl.DataFrame, requests: pl.DataFrame | None = None) -> pl.DataFrame:
    """Median decode step time per configuration and step index (the KV length grows with it),
    over the steps of valid requests only when `requests` is given."""
    dec = phases.filter(pl.col("phase") == "decode")
    if requests is not None and "repeat" in dec.columns:
        ok = requests.filter(pl.col("valid")).select("config_id", "repeat").unique()
        dec = dec.join(ok, on=["config_id", "repeat"], how="semi")
    table = dec.group_by("config_id", "step").agg(
        pl.col("ms").median().alias("median_ms"), pl.len().alias("n"),
        pl.col("ms").quantile(0.25, interpolation="linear").alias("q25_ms"),
        pl.col("ms").quantile(0.75, interpolation="linear").alias("q75_ms")).sort("config_id", "step")
    if requests is not None:  # the knobs of each configuration, for plots that facet by them
        knobs = [c for c in CONFIG_COLUMNS if c in requests.columns and c not in table.columns]
        if knobs:
            table = table.join(requests.group_by("config_id").agg(*[pl.col(k).first() for k in knobs]),
                               on="config_id", how="left")
    return table


def failure_table(rd: RunDir) -> pl.DataFrame:
    """The configurations that failed (config_id, stage, error_type, message); empty if none."""
    if not (rd.path / "parts" / "failures").is_dir() and not (rd.path / "failures.parquet").is_file():
        return pl.DataFrame(schema={c: pl.String for c in FAILURE_COLUMNS})
    failures = rd.table("failures")
    return failures.select([pl.col(c).cast(pl.String) if c in failures.columns else pl.lit(None, pl.String).alias(c)
                            for c in FAILURE_COLUMNS]).sort("config_id")


def run_quality(rd: RunDir, requests: pl.DataFrame) -> Quality:
    """The data-quality verdict of a run directory's requests: its spread, contention and drift
    (:func:`molmo_latency.quality.judge`), and how many of the sweep's requests it holds, with
    the command that resumes it."""
    meta: dict = {}
    if rd.run_json.exists():
        meta = rd.meta()
    if not isinstance(meta, dict):  # an edited run.json: judged without what it should say
        meta = {}
    expected = None
    sweep = meta.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("grid"), dict) and isinstance(sweep.get("protocol"), dict) \
            and all(isinstance(v, list) for v in sweep["grid"].values()):
        # the units of the sweep: every grid point times the repeats (run.json: SweepSpec.as_dict())
        try:
            expected = int(sweep["protocol"]["repeats"])
            for values in sweep["grid"].values():
                expected *= len(values)
        except (KeyError, TypeError, ValueError):  # an older or edited run.json: completeness not judged
            expected = None
    def part(key: str) -> dict:  # an edited run.json may hold anything: only a dict counts
        value = meta.get(key)
        return value if isinstance(value, dict) else {}

    cpus = part("conditions").get("usable_cpus") or part("versions").get("cpu_count")
    cpus = cpus if isinstance(cpus, int) and not isinstance(cpus, bool) and cpus > 0 else (os.cpu_count() or 1)
    command = meta.get("command") if isinstance(meta.get("command"), str) else None
    return judge(requests, usable_cpus=cpus, expected_requests=expected, resume_command=command)


MODULE_PHASES = ("vision", "projector", "prefill", "decode")
MODULE_KIND_ORDER = ("vision_block", "projector", "attention", "mlp", "moe_router", "moe_experts", "norm",
                     "lm_head", "other")


def _valid_modules(modules: pl.DataFrame, requests: pl.DataFrame) -> pl.DataFrame:
    """The rows of the ``modules`` table that belong to valid (and warm) requests and to a phase,
    with their configuration's config_id."""
    if "config_id" not in modules.columns:
        modules = modules.join(requests.select("request", "config_id"), on="request", how="left")
    keys = ["config_id", "repeat"] if "repeat" in modules.columns and "repeat" in requests.columns else ["request"]
    ok = requests.filter(pl.col("valid")).select(keys).unique()
    return modules.join(ok, on=keys, how="semi").filter(pl.col("phase").is_not_null())


def _ordered(frame: pl.DataFrame, requests: pl.DataFrame) -> pl.DataFrame:
    knobs = [c for c in CONFIG_COLUMNS if c in requests.columns and c not in frame.columns]
    if knobs:
        frame = frame.join(requests.group_by("config_id").agg(*[pl.col(k).first() for k in knobs]),
                           on="config_id", how="left")
    rank = {p: i for i, p in enumerate(MODULE_PHASES)}
    kinds = {k: i for i, k in enumerate(MODULE_KIND_ORDER)}
    return frame.with_columns(
        pl.col("phase").replace_strict(rank, default=len(rank), return_dtype=pl.Int64).alias("_p"),
        pl.col("module_kind").replace_strict(kinds, default=len(kinds), return_dtype=pl.Int64).alias("_k"),
    ).sort("config_id", "_p", "_k", "module_kind").drop("_p", "_k")


def module_breakdown(modules: pl.DataFrame, requests: pl.DataFrame) -> pl.DataFrame:
    """Per configuration, phase and module kind (``detail="modules"`` runs), over the phase
    instances of valid requests (each decode step is one instance): ``median_ms`` per instance,
    ``share`` of the phase's time (the kind's summed ms over the phase's summed ms; the kinds of a
    phase, ``other`` included, add up to 1), ``calls`` per instance (median), ``flops_median``
    per instance and ``gflop_per_s`` achieved (summed FLOPs over summed time, where FLOPs are
    known), ``n`` instances; with the configuration's knobs.

    >>> m = pl.DataFrame({"request": [0, 0, 0, 0], "phase": ["decode"] * 4, "step": [0, 0, 1, 1],
    ...                   "module_kind": ["attention", "other"] * 2, "ms": [2.0, 1.0, 4.0, 1.0],
    ...                   "calls": [4, None, 4, None], "flops": [2_000_000, None, 2_000_000, None]})
    >>> r = pl.DataFrame({"request": [0], "config_id": ["a"], "valid": [True]})
    >>> module_breakdown(m, r).select("module_kind", "median_ms", "share", "gflop_per_s").rows()
    [('attention', 3.0, 0.75, 0.6666666666666666), ('other', 1.0, 0.25, None)]
    """
    m = _valid_modules(modules, requests)
    phase_ms = m.group_by("config_id", "phase").agg(pl.col("ms").sum().alias("_phase_ms"))
    known = pl.col("flops").is_not_null()
    out = m.group_by("config_id", "phase", "module_kind").agg(
        pl.col("ms").median().alias("median_ms"), pl.col("calls").median().alias("calls"),
        pl.col("flops").median().alias("flops_median"), pl.len().alias("n"),
        pl.col("ms").sum().alias("_kind_ms"), pl.col("flops").filter(known).sum().alias("_flops"),
        pl.col("ms").filter(known).sum().alias("_flops_ms"), known.any().alias("_known"))
    out = out.join(phase_ms, on=["config_id", "phase"], how="left").with_columns(
        (pl.col("_kind_ms") / pl.col("_phase_ms")).alias("share"),
        pl.when(pl.col("_known") & (pl.col("_flops_ms") > 0))
        .then(pl.col("_flops") / (pl.col("_flops_ms") / 1e3) / 1e9).alias("gflop_per_s"))
    out = out.select("config_id", "phase", "module_kind", "median_ms", "share", "calls", "flops_median",
                     "gflop_per_s", "n")
    return _ordered(out, requests)


def module_stacks(modules: pl.DataFrame, requests: pl.DataFrame) -> pl.DataFrame:
    """Per configuration, phase and module kind: the mean time per valid request (``mean_ms``:
    decode steps summed within a request, then the mean over requests, so the stack of a
    configuration is its mean request) and ``n`` requests."""
    m = _valid_modules(modules, requests)
    req_key = ["config_id", "repeat"] if "repeat" in m.columns else ["config_id", "request"]
    per_request = m.group_by(*req_key, "phase", "module_kind").agg(pl.col("ms").sum())
    n = per_request.select(*req_key).unique().group_by("config_id").agg(pl.len().alias("n"))
    out = per_request.group_by("config_id", "phase", "module_kind").agg(pl.col("ms").sum().alias("_sum"))
    out = out.join(n, on="config_id").with_columns((pl.col("_sum") / pl.col("n")).alias("mean_ms"))
    return _ordered(out.select("config_id", "phase", "module_kind", "mean_ms", "n"), requests)


def run_report(run_dir: str | Path) -> dict[str, Any]:
    """All tables of the report of a run directory (or of a directory that
    ``prof.report().write_parquet(dir)`` wrote: its configurations come from :func:`with_config_id`)."""
    rd = RunDir(run_dir)
    if rd.run_json.exists() or not (rd.path / "requests.parquet").is_file():
        rd.meta()
        failures = failure_table(rd)
        requests = with_config_id(rd.table("requests"))
        phases = rd.table("phases")
    else:
        failures = pl.DataFrame(schema={c: pl.String for c in FAILURE_COLUMNS})
        requests = with_config_id(rd.table("requests"))
        phases = rd.table("phases")
    if "config_id" not in phases.columns and "request" in phases.columns:
        phases = phases.join(requests.select("request", "config_id"), on="request", how="left")
    if "valid" not in requests.columns:
        requests = requests.with_columns(pl.lit(True).alias("valid"))
    quality = run_quality(rd, requests)
    if "warm" in requests.columns:  # a cold request never enters a median (quality counts them)
        requests = requests.filter(pl.col("warm").fill_null(True))
    keys = ["config_id"]
    extra: dict[str, Any] = {}
    if (rd.path / "modules.parquet").is_file() or (rd.path / "parts" / "modules").is_dir():
        modules = rd.table("modules")  # a detail="modules" run: the breakdown inside each phase
        extra = {"modules": module_breakdown(modules, requests), "module_stacks": module_stacks(modules, requests)}
    return {
        **extra,
        "quality": quality,
        "failures": failures,
        "config": config_table(requests),
        "summary": summarize(requests.filter(pl.col("valid")), keys, PHASE_METRICS),
        "shares": phase_shares(requests),
        "prefill_vs_tokens": requests.filter(pl.col("valid")).select(
            "config_id", "input_tokens", "image_tokens", "prefill_ms", "prefill_total_ms",
            *[c for c in CONFIG_COLUMNS if c in requests.columns]),
        "decode_steps": decode_step_table(phases, requests),
    }
