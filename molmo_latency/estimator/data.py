"""Training data of the estimator (hold): the requests of one or more run directories, each with
the latency of every decode step (from ``phases.parquet``) as a list column ``decode_step_ms``.

Example:
    >>> import tempfile
    >>> from molmo_latency.sweep import SweepSpec, run_sweep
    >>> run = run_sweep("tiny", SweepSpec.from_dict({"crops": [1, 2], "repeats": 2, "new_tokens": [3]}),
    ...                 tempfile.mkdtemp())["run_dir"]
    >>> rows, info = load_requests([run])
    >>> rows.height, info["invalid_rows"], rows["config_key"].n_unique(), rows["decode_step_ms"].list.len().to_list()
    (4, 0, 2, [2, 2, 2, 2])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from molmo_latency.errors import EstimatorError
from molmo_latency.estimator.features import KNOBS, SETTING, TOKENS

# request-level columns the estimator reads from requests.parquet
MEASURES = ("prefill_total_ms", "decode_ms", "other_ms", "total_ms")
COUNTS = ("decode_steps", "output_tokens")
NEEDED = (*KNOBS, *TOKENS, *MEASURES, "decode_steps", "valid", "config_id")


def config_key() -> pl.Expr:
    """One key per distinct configuration (knob values after filling the model's defaults).

    Example:
        >>> pl.DataFrame({"crops": [4], "top_k": [2], "blocks": [3], "prompt_tokens": [8], "new_tokens": [6],
        ...               "batch_size": [1]}).select(config_key())["config_key"][0]
        'c4-k2-b3-p8-n6-bs1'
    """
    return pl.format("c{}-k{}-b{}-p{}-n{}-bs{}", *[pl.col(k) for k in KNOBS]).alias("config_key")


def setting_key() -> pl.Expr:
    """One key per configuration without its number of new tokens: what held-out configurations
    are split by, so that a held-out configuration is never seen at any N.

    Example:
        >>> pl.DataFrame({"crops": [4], "top_k": [2], "blocks": [3], "prompt_tokens": [8],
        ...               "batch_size": [1]}).select(setting_key())["setting_key"][0]
        'c4-k2-b3-p8-bs1'
    """
    return pl.format("c{}-k{}-b{}-p{}-bs{}", *[pl.col(k) for k in SETTING]).alias("setting_key")


def _run_meta(run: Path) -> dict[str, Any]:
    path = run / "run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EstimatorError(f"{path} is not valid JSON ({exc}); repair it or re-run the sweep") from None


def _identity(meta: dict[str, Any], rows: pl.DataFrame) -> dict[str, Any]:
    """Which model on which device made these rows (for refusing to mix them)."""
    model = meta.get("model") or {}
    device = meta.get("device") or {}
    dev = device.get("device") or (rows["device"][0] if "device" in rows.columns and rows.height else None)
    return {"model": model.get("name") or (meta.get("identity") or {}).get("model"),
            "device_type": None if dev is None else str(dev).split(":")[0],
            "gpu_name": device.get("gpu_name"),
            "dtype": model.get("dtype"),
            "blocks_total": model.get("blocks_total"),
            "top_k_default": model.get("top_k_default"),
            "experts": model.get("experts") or experts_of(model.get("config") or {})}


def experts_of(config: dict[str, Any]) -> int | None:
    """The number of experts per MoE layer in a model's config (its own or its text model's), the
    largest top-k the model can take; None when the config does not say.

    Example:
        >>> experts_of({"text_config": {"num_experts": 8}}), experts_of({"moe_num_experts": 64}), experts_of({})
        (8, 64, None)
    """
    for cfg in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        if not isinstance(cfg, dict):
            continue
        for key in ("num_experts", "moe_num_experts", "n_experts", "num_local_experts", "n_routed_experts"):
            v = cfg.get(key)
            if isinstance(v, int) and v > 0:
                return v
    return None


def _read(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds
        raise EstimatorError(f"{path} cannot be read as Parquet ({exc}); re-run or resume the sweep") from None


def decode_steps_of(phases: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    """Per request (`keys`), the decode step latencies in step order as a list column
    ``decode_step_ms``.

    Example:
        >>> ph = pl.DataFrame({"config_id": ["a"] * 4, "repeat": [0] * 4, "phase": ["prefill", "decode", "decode", "decode"],
        ...                    "step": [0, 1, 0, 2], "ms": [9.0, 2.0, 1.0, 3.0]})
        >>> decode_steps_of(ph, ["config_id", "repeat"])["decode_step_ms"].to_list()
        [[1.0, 2.0, 3.0]]
    """
    return (phases.filter(pl.col("phase") == "decode").sort(*keys, "step")
            .group_by(list(keys), maintain_order=True)
            .agg(pl.col("ms").cast(pl.Float64).alias("decode_step_ms")))


def load_run(run_dir: str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """All requests of one run directory with top_k/blocks filled from the model's defaults and
    the decode step latencies of each, plus what the run says about itself (model, device, rows).

    Example:
        >>> load_run("/no/such/run")
        Traceback (most recent call last):
        ...
        molmo_latency.errors.EstimatorError: run directory /no/such/run does not exist; give directories made by `molmo-latency profile`
    """
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise EstimatorError(f"{run} is a file, not a run directory; give the directories made by `molmo-latency "
                             "profile --out RUN_DIR` (the folder that holds requests.parquet)")
    if not run.is_dir():
        raise EstimatorError(f"run directory {run} does not exist; give directories made by `molmo-latency profile`")
    from molmo_latency.hold.rundir import RunDir

    RunDir(run).refresh()  # a killed sweep's parts become visible in requests.parquet
    path = run / "requests.parquet"
    if not path.is_file():
        raise EstimatorError(f"{run} has no requests.parquet; is it a run directory of `molmo-latency profile` "
                             "with at least one finished measurement?")
    rows = _read(path)
    missing = [c for c in NEEDED if c not in rows.columns]
    if missing:
        raise EstimatorError(f"{path} lacks the columns {missing}; it was not written by this version's sweep runner")
    meta = _run_meta(run)
    ident = _identity(meta, rows)
    if "block_indices" in rows.columns:  # a block subset: its size is the count where the count is missing
        rows = rows.with_columns(pl.col("block_indices").cast(pl.List(pl.Int64)))
        rows = rows.with_columns(pl.coalesce(pl.col("blocks"), pl.col("block_indices").list.len()).alias("blocks"))
    else:
        rows = rows.with_columns(pl.lit(None, pl.List(pl.Int64)).alias("block_indices"))
    fills = {"top_k": ident["top_k_default"], "blocks": ident["blocks_total"]}
    for knob, default in fills.items():
        if rows[knob].null_count():
            if default is None:
                raise EstimatorError(f"{path}: {knob} is the model's default in some rows, and {run / 'run.json'} "
                                     f"does not say what that is (model.{'top_k_default' if knob == 'top_k' else 'blocks_total'})")
            rows = rows.with_columns(pl.col(knob).fill_null(default))
    keys = ["config_id", "repeat"] if "repeat" in rows.columns else ["request"]
    phases_path = run / "phases.parquet"
    if not phases_path.is_file():
        raise EstimatorError(f"{run} has no phases.parquet; the per-position decode model needs the decode steps "
                             "of each request: re-run or resume the sweep")
    phases = _read(phases_path)
    lacking = [c for c in (*keys, "phase", "step", "ms") if c not in phases.columns]
    if lacking:
        raise EstimatorError(f"{phases_path} lacks the columns {lacking}; it was not written by this version's sweep runner")
    steps = decode_steps_of(phases.with_columns(*[pl.col(k).cast(rows.schema[k]) for k in keys]), keys)
    rows = rows.join(steps, on=keys, how="left")
    rows = rows.select(
        *[pl.col(c).cast(pl.Int64) for c in (*KNOBS, *TOKENS, "decode_steps")],
        (pl.col("output_tokens") if "output_tokens" in rows.columns else pl.lit(None)).cast(pl.Int64).alias("output_tokens"),
        *[pl.col(c).cast(pl.Float64) for c in MEASURES],
        pl.col("decode_step_ms").fill_null([]),
        pl.col("block_indices"),
        pl.col("valid").cast(pl.Boolean), pl.col("config_id").cast(pl.Utf8),
        pl.col("repeat").cast(pl.Int64) if "repeat" in rows.columns else pl.lit(None, pl.Int64).alias("repeat"),
    ).with_columns(pl.lit(str(run)).alias("run_dir"))
    return with_keys(rows), {**ident, "run_dir": str(run), "rows": rows.height}


def with_keys(rows: pl.DataFrame) -> pl.DataFrame:
    """Add config_key and setting_key (when absent)."""
    return rows.with_columns(*[e for e, name in ((config_key(), "config_key"), (setting_key(), "setting_key"))
                               if name not in rows.columns])


def load_requests(run_dirs: Sequence[str | Path], *, allow_mixed: bool = False) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Valid requests of several run directories concatenated, and what was left out.

    Rows with ``valid`` False (or null) are excluded and counted. Runs of different models or
    devices are refused: an estimator describes one model on one device. Runs measured under
    different conditions (dtype, thread count, model, library versions, CPU: see
    :func:`molmo_latency.conditions.condition_differences`) are refused too, each difference
    named, unless `allow_mixed`; the returned info records them (``mixed_conditions``).

    Example:
        >>> load_requests([])
        Traceback (most recent call last):
        ...
        molmo_latency.errors.EstimatorError: no run directory given; pass one or more directories made by `molmo-latency profile`
    """
    if not run_dirs:
        raise EstimatorError("no run directory given; pass one or more directories made by `molmo-latency profile`")
    frames, runs = [], []
    for run_dir in run_dirs:
        rows, info = load_run(run_dir)
        info["invalid_rows"] = int(rows.height - rows["valid"].fill_null(False).sum())
        frames.append(rows)
        runs.append(info)
    keys = ("model", "device_type", "gpu_name", "dtype")
    seen = {tuple(r[k] for k in keys) for r in runs}
    if len(seen) > 1:
        listing = "; ".join(f"{r['run_dir']}: " + ", ".join(f"{k}={r[k]}" for k in keys) for r in runs)
        raise EstimatorError(f"the run directories were recorded with different models or devices ({listing}); "
                             "an estimator describes one model on one device: fit them separately")
    from molmo_latency.conditions import condition_differences

    differ = condition_differences({str(r): _run_meta(Path(r)) for r in run_dirs}) if len(run_dirs) > 1 else []
    if differ and not allow_mixed:
        raise EstimatorError("the run directories were measured under different conditions, so their labels are "
                             "not one label set: " + "; ".join(differ) + ". Fit them separately, re-measure under "
                             "one set of conditions, or pass --allow-mixed (the model then records the mix)")
    rows = pl.concat(frames, how="vertical")
    valid = rows.filter(pl.col("valid").fill_null(False))
    info = {"run_dirs": runs, "rows_read": rows.height, "invalid_rows": rows.height - valid.height,
            "mixed_conditions": differ, "allow_mixed": bool(allow_mixed),
            "rows": valid.height, "configs": valid["config_key"].n_unique(),
            **{k: runs[0][k] for k in (*keys, "blocks_total", "top_k_default", "experts")}}
    if valid.height == 0:
        raise EstimatorError(f"no valid request in {', '.join(str(r) for r in run_dirs)} "
                             f"({rows.height} rows, all valid=False); see invalid_reason in requests.parquet")
    return valid, info
