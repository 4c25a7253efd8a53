"""`molmo-latency fit` and `predict` (the latency estimator's commands)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import polars as pl
import typer

from molmo_latency.cli.app import app
from molmo_latency.show import console, err_console, plural, print_frame, print_json
from molmo_latency.errors import EstimatorError

METRIC_COLUMNS = {"n": "n", "mae_ms": "MAE ms", "mape_pct": "MAPE %", "r2": "R^2",
                  "within_10pct_share": "within +-10%", "coverage_p50": "P50 coverage", "coverage_p95": "P95 coverage"}
OUTPUT_LABELS = {"prefill_total_ms": "prefill total", "decode_total_ms": "decode total", "request_ms": "whole request",
                 "decode_step_ms": "decode step"}
SPLIT_LABELS = {"held_out_configs": "configs", "held_out_new_tokens": "N"}


def _metric_row(split: str, output: str, basis: str, m: dict) -> dict:
    return {"held out": SPLIT_LABELS.get(split, split), "output": OUTPUT_LABELS.get(output, output),
            **{label: m.get(key) for key, label in METRIC_COLUMNS.items()}}


_SCHEMA = {"held out": pl.Utf8, "output": pl.Utf8, "n": pl.Int64,
           **{label: pl.Float64 for key, label in METRIC_COLUMNS.items() if key != "n"}}


def metrics_frame(metrics: dict) -> pl.DataFrame:
    """One row per (held-out split, output): requests (or decode steps) against P50/P95.

    Example:
        >>> m = {"r2": 0.9, "mape_pct": 2.0, "n": 3, "coverage_p50": 0.5, "coverage_p95": 1.0}
        >>> metrics_frame({"held_out_configs": {"request_ms": {"requests": m}, "decode_step_ms": {"steps": m}}})["output"].to_list()
        ['whole request', 'decode step']
    """
    rows = []
    for split, ms in metrics.items():
        for output in ("prefill_total_ms", "decode_total_ms", "request_ms", "decode_step_ms"):
            entry = ms.get(output) if isinstance(ms, dict) else None
            if not entry:
                continue
            basis = "steps" if output == "decode_step_ms" else "requests"
            rows.append(_metric_row(split, output, basis, entry.get(basis) or {}))
    return pl.DataFrame(rows, schema=_SCHEMA)


def breakdown_frame(metrics: dict, output: str, key: str, label: str) -> pl.DataFrame:
    """Rows of a per-bucket breakdown (``by_position`` of decode_step_ms, ``by_output_tokens``
    of request_ms) for every held-out split.

    Example:
        >>> m = {"held_out_configs": {"request_ms": {"by_output_tokens": [{"output_tokens": 8, "n": 2, "mape_pct": 1.0}]}}}
        >>> breakdown_frame(m, "request_ms", "by_output_tokens", "output tokens")["output tokens"].to_list()
        ['8']
    """
    rows = []
    for split, ms in metrics.items():
        for b in ((ms.get(output) or {}).get(key) or []) if isinstance(ms, dict) else []:
            name = b.get("positions") if key == "by_position" else b.get("output_tokens")
            rows.append({"held out": SPLIT_LABELS.get(split, split), label: str(name),
                         **{lab: b.get(k) for k, lab in METRIC_COLUMNS.items() if k != "r2"}})
    return pl.DataFrame(rows, schema={"held out": pl.Utf8, label: pl.Utf8, "n": pl.Int64,
                                      **{lab: pl.Float64 for k, lab in METRIC_COLUMNS.items() if k not in ("n", "r2")}})


@app.command(epilog="Examples:\n\b\n  molmo-latency fit RUN_DIR --out MODEL_DIR\n"
                     "  molmo-latency fit RUN_A RUN_B --out MODEL_DIR --json")
def fit(
    run_dirs: List[Path] = typer.Argument(..., help="run directories of `molmo-latency profile` (one model, one device)"),
    out: Path = typer.Option(..., "--out", help="model directory to write (model.json, weights.safetensors, plots)"),
    feature_set: str = typer.Option("physical", "--feature-set", help="physical (costs by where time goes) or knobs (baseline)"),
    test_fraction: float = typer.Option(0.25, "--test-fraction", help="share of configurations held out for evaluation"),
    calib_fraction: float = typer.Option(0.25, "--calib-fraction", help="share of configurations that calibrate P50/P95"),
    seed: int = typer.Option(0, "--seed", help="seed of the configuration split"),
    force: bool = typer.Option(False, "--force", help="write the model even when it fails the quality gate "
                               "(the model records the verdict)"),
    allow_mixed: bool = typer.Option(False, "--allow-mixed", help="fit run directories measured under different "
                                     "conditions (threads, dtype, versions, ...) as one label set; the model records it"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Fit the whole-request latency estimator (P50/P95 of prefill, of every decode step by position, of the
    whole request) on RUN_DIRs, evaluated on held-out configurations and held-out N."""
    from molmo_latency.estimator import fit_estimator
    from molmo_latency.estimator.model import _jsonable
    from molmo_latency.show.estimator_plots import write_estimator_plots

    est = fit_estimator([str(r) for r in run_dirs], feature_set=feature_set, test_fraction=test_fraction,
                        calib_fraction=calib_fraction, seed=seed, allow_mixed=allow_mixed)
    quality = est.meta["quality"]
    write = quality["passed"] or force
    model_dir = est.save(out, plots=write_estimator_plots) if write else None
    meta = est.meta
    files = [str(model_dir / f) for f in meta["files"].values() if f] if write else []
    refused = ("the estimator failed its quality gate (" + "; ".join(quality["problems"]) + "; likely: "
               + "; ".join(quality["reasons"]) + f"); {out} was not written: fix the data, or pass --force to write "
               "it anyway (the model records the verdict)")
    if as_json:
        print_json(_jsonable({"model_dir": str(model_dir) if write else None, "written": write, "files": files,
                              "feature_set": meta["feature_set"]["name"],
                              **{k: meta[k] for k in ("quality", "training", "split", "selection", "calibration", "noise",
                                                      "metrics", "token_map", "defaults", "knob_ranges", "model")}}))
        if not write:
            raise EstimatorError(refused)
        return
    tr, sp = meta["training"], meta["split"]
    err_console.print(f"fit: {tr['rows']} valid requests ({tr['decode_steps']} decode steps) of {tr['configs']} "
                      f"configurations from {plural(len(tr['run_dirs']), 'run directory', 'run directories')} ({tr['invalid_rows_excluded']} invalid "
                      f"requests excluded); output tokens {tr['output_tokens']}")
    err_console.print(f"split by setting (seed {sp['seed']}): train {sp['configs']['train']}, calibration "
                      f"{sp['configs']['calib']}, test {sp['configs']['test']}")
    metrics = meta["metrics"]
    print_frame(metrics_frame(metrics), "Held out (configs: whole configurations never fitted on; N: the longest "
                                        "outputs): P50 against measured, P95 coverage")
    print_frame(breakdown_frame(metrics, "decode_step_ms", "by_position", "positions"),
                "Decode steps by position (held out)")
    print_frame(breakdown_frame(metrics, "request_ms", "by_output_tokens", "output tokens"),
                "Whole requests by output tokens (held out)")
    skipped = (metrics.get("held_out_new_tokens") or {}).get("skipped")
    hn = metrics.get("held_out_new_tokens") or {}
    if skipped:
        err_console.print(f"held-out N: skipped ({skipped})")
    else:
        err_console.print(f"held-out N: {hn['holdout']}, fitted on output tokens {hn['trained_on_output_tokens']}")
    for name, cal in meta["calibration"].items():
        what = (f"P50 x{cal['p50_factor']:.3f}, P95 x{cal['p95_factor']:.3f}" if cal.get("scale") != "log_sd" else
                f"P50 at {cal['p50_factor']:+.2f}, P95 at {cal['p95_factor']:+.2f} modelled log-SDs from the modelled "
                "median at that N")
        console.print(f"{OUTPUT_LABELS.get(name, name)}: {what} "
                      f"({cal['rows']} calibration {'steps' if name == 'decode_step_ms' else 'requests'})")
    base = (quality.get("baseline") or {}).get("request_ms") or {}
    if base.get("mape_pct") is not None:
        console.print(f"knobs baseline (same split): whole request MAPE {base['mape_pct']:.1f}%, "
                      f"P50 coverage {100 * base['coverage_p50']:.0f}%, P95 coverage {100 * base['coverage_p95']:.0f}%")
    if quality["passed"]:
        console.print("quality gate: passed (held-out P50 coverage 40-60%, P95 90-99%, better than the knobs baseline)")
    else:
        console.print("quality gate: FAILED")
        for p in quality["problems"]:
            console.print(f"  problem: {p}")
        for r in quality["reasons"]:
            console.print(f"  likely: {r}")
    if not write:
        raise EstimatorError(refused)
    console.print(f"wrote {model_dir}: " + ", ".join(Path(f).name for f in files)
                  + ("" if quality["passed"] else " (written with --force; model.json records the failed gate)"))


def parse_new_tokens(text: str | None, from_file: Path | None):
    """--new-tokens N (one N), N1,N2,... (a distribution of output lengths) or --new-tokens-from FILE.

    Example:
        >>> parse_new_tokens("64", None), parse_new_tokens("8,8,32", None).values.tolist()
        (64, [8.0, 32.0])
        >>> parse_new_tokens("0", None)
        Traceback (most recent call last):
        ...
        molmo_latency.errors.EstimatorError: --new-tokens must be a whole number >= 1 (output tokens), or a comma-separated list of them; got '0'
    """
    from molmo_latency.estimator import OutputLengths

    if text is not None and from_file is not None:
        raise EstimatorError("give --new-tokens or --new-tokens-from, not both")
    if from_file is not None:
        return OutputLengths.from_file(from_file)
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise EstimatorError(f"--new-tokens must be a whole number >= 1 (output tokens), or a comma-separated list "
                             f"of them; got {text!r}")
    return values[0] if len(values) == 1 and "," not in text else OutputLengths(values)


@app.command(epilog="Examples:\n\b\n  molmo-latency predict MODEL_DIR --crops 4 --top-k 2 --blocks 16 "
                     "--prompt-tokens 32 --new-tokens 64 --json\n"
                     "  molmo-latency predict MODEL_DIR --crops 4 --top-k 2 --blocks 16 --prompt-tokens 32 "
                     "--new-tokens-from lengths.txt")
def predict(
    model_dir: Path = typer.Argument(..., help="model directory written by `molmo-latency fit`"),
    crops: int = typer.Option(..., "--crops", help="image crops (>= 0)"),
    top_k: int = typer.Option(..., "--top-k", help="MoE experts per token (1 .. the model's experts)"),
    blocks: int = typer.Option(..., "--blocks", help="active transformer blocks (1 .. the model's)"),
    prompt_tokens: int = typer.Option(..., "--prompt-tokens", help="text tokens after the image (>= 0)"),
    new_tokens: Optional[str] = typer.Option(None, "--new-tokens", help="output tokens N (default: the training "
                                             "data's), or N1,N2,... a distribution of output lengths (the budget for an unknown N)"),
    new_tokens_from: Optional[Path] = typer.Option(None, "--new-tokens-from", help="a file of output lengths (text, "
                                                   "JSON list, or Parquet with output_tokens): the budget for an unknown N"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="sequences per request (default: the training data's)"),
    feature_set: Optional[str] = typer.Option(None, "--feature-set", help="refuse the model unless fitted with this feature set"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """P50 and P95 of a whole request of N output tokens (prefill, decode total, request) for one configuration."""
    from molmo_latency.estimator import Estimator, OutputLengths
    from molmo_latency.estimator.model import _jsonable

    n = parse_new_tokens(new_tokens, new_tokens_from)
    est = Estimator.load(model_dir, feature_set=feature_set)
    config = {"crops": crops, "top_k": top_k, "blocks": blocks, "prompt_tokens": prompt_tokens}
    if batch_size is not None:
        config["batch_size"] = batch_size
    if isinstance(n, OutputLengths):
        n_desc = {"distribution": {"lengths": n.values.astype(int).tolist(), "weights": n.weights.tolist()}}
        n_range = (float(n.values.min()), float(n.values.max()))
    else:
        n = est.defaults["new_tokens"] if n is None else n
        n_desc, n_range = n, (float(n), float(n))
    pred = est.predict_arrays(**config, new_tokens=n)  # the estimator's own range check refuses what cannot be
    inside = bool(pred.pop("in_range")[0])
    out = {k: float(v[0]) for k, v in pred.items()}
    if as_json:
        print_json(_jsonable({"model_dir": str(model_dir), "feature_set": est.features.name, "coverage": est.coverage,
                              "configuration": config, "new_tokens": n_desc, **out, "in_range": inside}))
        return
    rows = [{"output": OUTPUT_LABELS[o] if o != "decode_per_token_ms" else "decode per step (mean)",
             "P50 ms": out[f"{o[:-3]}_p50_ms"], "P95 ms": out[f"{o[:-3]}_p95_ms"]}
            for o in ("prefill_total_ms", "decode_total_ms", "decode_per_token_ms", "request_ms")
            if f"{o[:-3]}_p50_ms" in out]  # a distribution of N has no per-step figure
    what = (f"N = {n_desc}" if not isinstance(n_desc, dict) else
            f"N from {len(n_desc['distribution']['lengths'])} output lengths "
            f"{int(n_range[0])}..{int(n_range[1])}")
    print_frame(pl.DataFrame(rows), f"Predicted latency, {what} ({est.features.name} features, P95 calibrated to "
                                    f"{100 * est.coverage:.0f}%)")
    if not inside:
        text = ", ".join(f"{k} {int(lo)}..{int(hi)}" for k, (lo, hi) in est.knob_ranges.items())
        err_console.print(f"note: outside the configurations the model was fitted on ({text}); this is extrapolation")
