"""`molmo-latency plan` (the controller's question: which configurations fit my latency budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import polars as pl
import typer

from molmo_latency.cli.app import app
from molmo_latency.show import console, err_console, print_frame, print_json

KNOB_COLUMNS = ("crops", "top_k", "blocks", "prompt_tokens", "new_tokens")


@app.command(epilog="Examples:\n\b\n  molmo-latency plan MODEL_DIR --budget-ms 250\n"
                     "  molmo-latency plan MODEL_DIR --budget-ms 250 --quantile 0.5 --new-tokens 64\n"
                     "  molmo-latency plan MODEL_DIR --budget-ms 250 --accuracy scores.csv --json\n"
                     "  molmo-latency plan MODEL_DIR --budget-ms 100,200,400 --accuracy scores.csv")
def plan(
    model_dir: Path = typer.Argument(..., help="model directory written by `molmo-latency fit`"),
    budget_ms: str = typer.Option(..., "--budget-ms", help="latency budget of a whole request (ms), or B1,B2,... "
                                  "a budget sweep (the best configuration per budget)"),
    quantile: float = typer.Option(0.95, "--quantile", help="the quantile that must fit (0.5: P50, 0.95: P95)"),
    accuracy: Optional[Path] = typer.Option(None, "--accuracy", help="CSV or Parquet: knob columns (crops, top_k, "
                                            "blocks, ...) and a score per configuration; adds the Pareto frontier and "
                                            "the best configuration"),
    new_tokens: Optional[str] = typer.Option(None, "--new-tokens", help="output tokens N (default: the training "
                                             "data's), or N1,N2,... a distribution of output lengths"),
    new_tokens_from: Optional[Path] = typer.Option(None, "--new-tokens-from", help="a file of output lengths (text, "
                                                   "JSON list, or Parquet with output_tokens)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """The configurations whose whole request fits a latency budget at a quantile, with their P50/P95 (every
    combination of the knob values the model was fitted on, or those an accuracy table scores); with --accuracy,
    the Pareto frontier of accuracy against latency and the best configuration that fits."""
    from molmo_latency.cli.fit_cmd import parse_new_tokens
    from molmo_latency.estimator import Estimator, OutputLengths
    from molmo_latency.estimator.model import _jsonable, plan_configs

    budgets = parse_budgets(budget_ms)
    n = parse_new_tokens(new_tokens, new_tokens_from)
    est = Estimator.load(model_dir)
    configs = plan_configs(est, None, accuracy)
    fits = est.plan(budgets, quantile=quantile, configs=configs.drop("score", strict=False),
                    new_tokens=n, accuracy=accuracy)
    n_desc = ({"distribution": {"lengths": n.values.astype(int).tolist(), "weights": n.weights.tolist()}}
              if isinstance(n, OutputLengths) else (est.defaults["new_tokens"] if n is None else n))
    what = f"at P{100 * quantile:g}"
    if len(budgets) > 1:
        _sweep(fits, budgets, configs.height, what, {"model_dir": str(model_dir), "quantile": quantile,
                                                     "new_tokens": n_desc}, as_json)
        return
    budget = budgets[0]
    fits = fits.drop("budget_ms")
    frontier = fits.filter(pl.col("pareto")) if "pareto" in fits.columns else None
    best = fits.filter(pl.col("best")) if "best" in fits.columns else None
    if as_json:
        print_json(_jsonable({
            "model_dir": str(model_dir), "budget_ms": budget, "quantile": quantile, "new_tokens": n_desc,
            "configurations": configs.height, "fitting": fits.height, "fit": fits.to_dicts(),
            "frontier": None if frontier is None else frontier.to_dicts(),
            "best": None if best is None or best.height == 0 else best.to_dicts()[0]}))
        return
    cols = [c for c in (*KNOB_COLUMNS, "score", "latency_ms", "request_p50_ms", "request_p95_ms", "in_range", "pareto",
                        "best") if c in fits.columns]
    shown = frontier if frontier is not None else fits
    title = (f"{fits.height} of {configs.height} configurations fit {budget:g} ms {what}"
             + ("; the accuracy-latency frontier among them" if frontier is not None else ", fastest first"))
    print_frame(shown.select(cols), title)
    if best is not None:
        if best.height:
            b = best.row(0, named=True)
            console.print("best: " + ", ".join(f"{k} {b[k]}" for k in KNOB_COLUMNS if b.get(k) is not None)
                          + f" (score {b['score']:g}, {b['latency_ms']:.1f} ms {what})")
        else:
            console.print(f"best: none (no scored configuration fits {budget:g} ms {what})")
    _note_range(fits)


def parse_budgets(text: str) -> list[float]:
    """--budget-ms B or B1,B2,... (ms).

    Example:
        >>> parse_budgets("250"), parse_budgets("100, 200")
        ([250.0], [100.0, 200.0])
    """
    from molmo_latency.errors import EstimatorError

    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values:
        raise EstimatorError(f"--budget-ms must be a number of ms or a comma-separated list of them; got {text!r}")
    return values


def _sweep(fits: pl.DataFrame, budgets: list[float], total: int, what: str, head: dict, as_json: bool) -> None:
    """One row per budget: how many configurations fit, the fastest, and (with scores) the best."""
    from molmo_latency.estimator.model import _jsonable

    rows = []
    for budget in budgets:
        part = fits.filter(pl.col("budget_ms") == budget)
        pick = part.filter(pl.col("best")) if "best" in part.columns else part.head(1)
        row = {"budget_ms": budget, "fitting": part.height}
        if pick.height:
            row.update({k: v for k, v in pick.drop("budget_ms").row(0, named=True).items()})
        rows.append(row)
    if as_json:
        print_json(_jsonable({**head, "configurations": total, "budgets": rows}))
        return
    frame = pl.DataFrame(rows)
    label = "best" if "best" in fits.columns else "fastest"
    cols = [c for c in ("budget_ms", "fitting", *KNOB_COLUMNS, "score", "latency_ms", "request_p50_ms",
                        "request_p95_ms", "in_range") if c in frame.columns]
    print_frame(frame.select(cols), f"The {label} configuration per budget {what} (of {total} configurations)")
    _note_range(fits)


def _note_range(fits: pl.DataFrame) -> None:
    if fits.height and not fits["in_range"].all():
        err_console.print(f"note: {int((~fits['in_range']).sum())} fitting configurations lie outside the values the "
                          "model was fitted on (in_range false): extrapolation")
