"""Training data of the estimator (hold): the requests of one or more run directories.

Example:
    >>> import tempfile
    >>> from molmo_latency.sweep import SweepSpec, run_sweep
    >>> run = run_sweep("tiny", SweepSpec.from_dict({"crops": [1, 2], "repeats": 2, "new_tokens": [3]}),
    ...                 tempfile.mkdtemp())["run_dir"]
    >>> rows, info = load_requests([run])
    >>> rows.height, info["invalid_rows"], rows["config_key"].n_unique()
    (4, 0, 2)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from molmo_latency.errors import EstimatorError
from molmo_latency.estimator.features import KNOBS, TARGETS, TOKENS

NEEDED = (*KNOBS, *TOKENS, *TARGETS, "valid", "config_id")


def config_key() -> pl.Expr:
    """One key per distinct configuration (knob values after filling the model's defaults).

    Example:
        >>> pl.DataFrame({"crops": [4], "top_k": [2], "blocks": [3], "prompt_tokens": [8], "new_tokens": [6],
        ...               "batch_size": [1]}).select(config_key())["config_key"][0]
        'c4-k2-b3-p8-n6-bs1'
    """
    return pl.format("c{}-k{}-b{}-p{}-n{}-bs{}", *[pl.col(k) for k in KNOBS]).alias("config_key")


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
            "top_k_default": model.get("top_k_default")}


def load_run(run_dir: str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """All requests of one run directory with top_k/blocks filled from the model's defaults,
    plus what the run says about itself (model, device, row counts).

    Example:
        >>> load_run("/no/such/run")
        Traceback (most recent call last):
        ...
        molmo_latency.errors.EstimatorError: run directory /no/such/run does not exist; give directories made by `molmo-latency profile`
    """
    run = Path(run_dir)
    path = run / "requests.parquet"
    if run.is_dir():
        from molmo_latency.sweep.rundir import RunDir

        RunDir(run).refresh()  # a killed sweep's parts become visible in requests.parquet
    if not run.is_dir():
        raise EstimatorError(f"run directory {run} does not exist; give directories made by `molmo-latency profile`")
    if not path.is_file():
        raise EstimatorError(f"{run} has no requests.parquet; is it a run directory of `molmo-latency profile` "
                             "with at least one finished measurement?")
    try:
        rows = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds
        raise EstimatorError(f"{path} cannot be read as Parquet ({exc}); re-run or resume the sweep") from None
    missing = [c for c in NEEDED if c not in rows.columns]
    if missing:
        raise EstimatorError(f"{path} lacks the columns {missing}; it was not written by this version's sweep runner")
    meta = _run_meta(run)
    ident = _identity(meta, rows)
    fills = {"top_k": ident["top_k_default"], "blocks": ident["blocks_total"]}
    for knob, default in fills.items():
        if rows[knob].null_count():
            if default is None:
                raise EstimatorError(f"{path}: {knob} is the model's default in some rows, and {run / 'run.json'} "
                                     f"does not say what that is (model.{'top_k_default' if knob == 'top_k' else 'blocks_total'})")
            rows = rows.with_columns(pl.col(knob).fill_null(default))
    rows = rows.select(
        *[pl.col(c).cast(pl.Int64) for c in (*KNOBS, *TOKENS)],
        *[pl.col(c).cast(pl.Float64) for c in TARGETS],
        pl.col("valid").cast(pl.Boolean), pl.col("config_id").cast(pl.Utf8),
        pl.col("repeat").cast(pl.Int64) if "repeat" in rows.columns else pl.lit(None, pl.Int64).alias("repeat"),
    ).with_columns(pl.lit(str(run)).alias("run_dir"))
    rows = rows.with_columns(config_key())
    return rows, {**ident, "run_dir": str(run), "rows": rows.height}


def load_requests(run_dirs: Sequence[str | Path]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Valid requests of several run directories concatenated, and what was left out.

    Rows with ``valid`` False (or null) are excluded and counted. Runs of different models or
    devices are refused: an estimator describes one model on one device.

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
    rows = pl.concat(frames, how="vertical")
    valid = rows.filter(pl.col("valid").fill_null(False))
    info = {"run_dirs": runs, "rows_read": rows.height, "invalid_rows": rows.height - valid.height,
            "rows": valid.height, "configs": valid["config_key"].n_unique(),
            **{k: runs[0][k] for k in (*keys, "blocks_total", "top_k_default")}}
    if valid.height == 0:
        raise EstimatorError(f"no valid request in {', '.join(str(r) for r in run_dirs)} "
                             f"({rows.height} rows, all valid=False); see invalid_reason in requests.parquet")
    return valid, info
