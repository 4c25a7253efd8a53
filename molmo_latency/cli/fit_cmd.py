"""`molmo-latency fit` and `predict` (the latency estimator's commands)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import polars as pl
import typer

from molmo_latency.cli.app import app
from molmo_latency.cli.show import console, err_console, print_frame, print_json

METRIC_COLUMNS = {"n": "n", "mae_ms": "MAE ms", "rmse_ms": "RMSE ms", "mape_pct": "MAPE %", "r2": "R^2",
                  "within_10pct_share": "within +-10%", "p95_coverage": "P95 coverage"}


def metrics_frame(metrics: dict) -> pl.DataFrame:
    """One row per (target, basis): held-out requests, and configuration medians against the P50.

    Example:
        >>> m = {"r2": 0.9, "mape_pct": 2.0, "n": 3}
        >>> metrics_frame({"decode_per_token_ms": {"requests": m, "config_medians": m}})["basis"].to_list()
        ['requests', 'config medians']
    """
    rows = []
    for target, m in metrics.items():
        for basis in ("requests", "config_medians"):
            values = m.get(basis) or {}
            rows.append({"target": target, "basis": basis.replace("_", " "),
                         **{label: values.get(key) for key, label in METRIC_COLUMNS.items()}})
    return pl.DataFrame(rows, schema={"target": pl.Utf8, "basis": pl.Utf8, "n": pl.Int64,
                                      **{label: pl.Float64 for key, label in METRIC_COLUMNS.items() if key != "n"}})


@app.command()
def fit(
    run_dirs: List[Path] = typer.Argument(..., help="run directories of `molmo-latency profile` (one model, one device)"),
    out: Path = typer.Option(..., "--out", help="model directory to write (model.json, weights.safetensors, parity.png)"),
    feature_set: str = typer.Option("physical", "--feature-set", help="physical (costs by where time goes) or knobs (baseline)"),
    test_fraction: float = typer.Option(0.25, "--test-fraction", help="share of configurations held out for evaluation"),
    calib_fraction: float = typer.Option(0.25, "--calib-fraction", help="share of configurations that calibrate P50/P95"),
    seed: int = typer.Option(0, "--seed", help="seed of the configuration split"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Fit P50/P95 of prefill_total_ms and decode_per_token_ms on RUN_DIRs, evaluated on held-out configurations."""
    from molmo_latency.estimator import fit_estimator

    est = fit_estimator([str(r) for r in run_dirs], feature_set=feature_set, test_fraction=test_fraction,
                        calib_fraction=calib_fraction, seed=seed)
    model_dir = est.save(out)
    meta = est.meta
    files = [str(model_dir / f) for f in ("model.json", "weights.safetensors", "evaluation.parquet", "parity.png")]
    if as_json:
        print_json({"model_dir": str(model_dir), "files": files, "feature_set": meta["feature_set"]["name"],
                    **{k: meta[k] for k in ("training", "split", "selection", "calibration", "metrics", "token_map",
                                            "defaults", "model")}})
        return
    tr, sp = meta["training"], meta["split"]
    err_console.print(f"fit: {tr['rows']} valid requests of {tr['configs']} configurations from "
                      f"{len(tr['run_dirs'])} run directories ({tr['invalid_rows_excluded']} invalid requests excluded)")
    err_console.print(f"split by configuration (seed {sp['seed']}): train {sp['configs']['train']}, calibration "
                      f"{sp['configs']['calib']}, test {sp['configs']['test']}")
    print_frame(metrics_frame(meta["metrics"]), "Held-out configurations: P50 against measured; P95 coverage")
    for t, s in meta["selection"].items():
        cal = meta["calibration"][t]
        console.print(f"{t}: {s['chosen']} on {meta['feature_set']['name']} features; P50 x{cal['p50_factor']:.3f}, "
                      f"P95 x{cal['p95_factor']:.3f} ({cal['rows']} calibration requests)")
    console.print(f"wrote {model_dir}: " + ", ".join(Path(f).name for f in files))


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="model directory written by `molmo-latency fit`"),
    crops: int = typer.Option(..., "--crops", help="image crops"),
    top_k: int = typer.Option(..., "--top-k", help="MoE experts per token"),
    blocks: int = typer.Option(..., "--blocks", help="active transformer blocks"),
    prompt_tokens: int = typer.Option(..., "--prompt-tokens", help="text tokens after the image"),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help="generated tokens (default: the training data's)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="sequences per request (default: the training data's)"),
    feature_set: Optional[str] = typer.Option(None, "--feature-set", help="refuse the model unless fitted with this feature set"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """P50 and P95 of prefill_total_ms and decode_per_token_ms for one configuration."""
    from molmo_latency.estimator import Estimator

    est = Estimator.load(model_dir, feature_set=feature_set)
    config = {"crops": crops, "top_k": top_k, "blocks": blocks, "prompt_tokens": prompt_tokens}
    if new_tokens is not None:
        config["new_tokens"] = new_tokens
    if batch_size is not None:
        config["batch_size"] = batch_size
    frame = est.predict(config)
    row = frame.row(0, named=True)
    if as_json:
        print_json({"model_dir": str(model_dir), "feature_set": est.features.name, "prediction": row})
        return
    print_frame(frame, f"Predicted latency ({est.features.name} features, P95 calibrated to "
                       f"{100 * est.meta.get('coverage', 0.95):.0f}%)")
    if not row["in_training_range"]:
        ranges = ", ".join(f"{k} {int(lo)}..{int(hi)}" for k, (lo, hi) in est.knob_ranges.items())
        err_console.print(f"note: outside the configurations the model was fitted on ({ranges}); this is extrapolation")
