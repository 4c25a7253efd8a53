"""`molmo-latency explain RUN_DIR [--json]`: which part of the latency variance is the hardware.

Reads ``requests.parquet`` of a run directory (or any requests Parquet), computes
:func:`molmo_latency.explain.explain`, prints tables (or JSON with ``--json``) and writes the
decode-time-against-SM-clock plot (:mod:`molmo_latency.show.explain_plot`) to
``RUN_DIR/report/explain_decode_vs_clock.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from molmo_latency.cli.app import app, examples
from molmo_latency.errors import MolmoLatencyError

if TYPE_CHECKING:  # imported when a command runs, not at start-up
    import polars as pl

    from molmo_latency.explain import Explanation

PLOT_NAME = "explain_decode_vs_clock.png"


def read_requests(path: str | os.PathLike) -> tuple[pl.DataFrame, Path]:
    """The requests table at ``path`` (a run directory or a Parquet file) and the directory
    that holds it (where ``report/`` goes).

    >>> read_requests("/no/such/run")
    Traceback (most recent call last):
    ...
    molmo_latency.errors.MolmoLatencyError: /no/such/run does not exist; pass a run directory written by `molmo-latency profile` or a requests Parquet file
    """
    import polars as pl

    path = Path(path)
    if not path.exists():
        raise MolmoLatencyError(f"{path} does not exist; pass a run directory written by "
                                "`molmo-latency profile` or a requests Parquet file")
    if path.is_dir():
        from molmo_latency.hold.rundir import RunDir

        RunDir(path).refresh()  # a killed sweep's parts become visible in requests.parquet
        file, base = path / "requests.parquet", path
        if not file.is_file():
            raise MolmoLatencyError(
                f"{path} is not a run directory: it has no requests.parquet; pass the directory "
                "`molmo-latency profile` wrote (finished or resumed), or a requests Parquet file")
    else:
        file, base = path, path.parent
        if path.name.endswith((".json", ".json.gz")):
            raise MolmoLatencyError(f"explain: {path} is a trace; pass the run directory `molmo-latency profile "
                                    "--out DIR` wrote (or its requests.parquet); `molmo-latency trace summary` "
                                    "reads a trace")
    try:
        return pl.read_parquet(file), base
    except Exception as exc:  # polars raises several kinds for a bad file
        raise MolmoLatencyError(f"cannot read {file} as Parquet ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a "
                                "requests.parquet written by molmo-latency") from exc


# ----------------------------------------------------------------------------- the terminal


def render_terminal(result: "Explanation", plot: Path | None, why_no_plot: str | None = None) -> None:
    """The explanation as tables (through the one renderer, :func:`molmo_latency.show.print_frame`)."""
    import polars as pl

    from molmo_latency.show import console, print_frame

    stats = result.phase_stats.with_columns((100 * pl.col("cv")).alias("CV %"))
    stats = stats.with_columns(pl.when(pl.col("config_id") == pl.col("config_id").shift(1))
                               .then(pl.lit("")).otherwise(pl.col("config_id")).alias("config"))
    print_frame(stats.select("config", "phase", "n", pl.col("median_ms").alias("median ms"),
                             pl.col("p95_ms").alias("p95 ms"), "CV %"),
                "Phases per configuration (valid requests)", max_rows=10_000)
    hw = result.hardware.select(
        "target", "n", pl.col("n_configs").alias("configs"), pl.col("r2").alias("R\u00b2"),
        pl.col("r2_adj").alias("adj. R\u00b2"), pl.col("r2_relative").alias("R\u00b2 relative"),
        pl.col("coef_ms_per_mhz").alias("ms/MHz"), pl.col("coef_ms_per_c").alias("ms/\u00b0C"),
        pl.col("coef_ms_throttled").alias("ms throttled"), pl.col("note").fill_null(""))
    print_frame(hw, "Share of the within-configuration variance explained by the hardware "
                "(R\u00b2 of the residual on SM clock, temperature, throttling)",
                compact=["target", "n", "R\u00b2", "ms/MHz", "ms/\u00b0C", "ms throttled", "note"], digits=4)
    out = result.outliers
    if out.height == 0:
        console.print("No outliers (|robust z| > threshold) within any configuration.")
    else:
        print_frame(out.select(pl.col("config_id").alias("config"), "request", "repeat", "order", "metric",
                               pl.col("value_ms").alias("value ms"), pl.col("median_ms").alias("median ms"),
                               pl.col("robust_z").alias("z"), "cause", pl.col("detail").fill_null("")),
                    "Outliers and their likely cause", max_rows=40,
                    compact=["config", "metric", "value ms", "z", "cause", "detail"], digits=2)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    if plot is not None:
        console.print(f"plot: {plot}", markup=False, highlight=False)
    elif why_no_plot:
        console.print(f"no plot: {why_no_plot}", markup=False, highlight=False)


@app.command("explain", epilog=examples("molmo-latency explain runs/molmoe",
                                         "molmo-latency explain runs/molmoe/requests.parquet --json"))
def explain_command(
    run_dir: Path = typer.Argument(..., help="A run directory of `molmo-latency profile`, or a "
                                   "requests Parquet file (with telemetry columns for the "
                                   "hardware share)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    z: float = typer.Option(3.5, "--z", help="Outlier threshold on |robust z| within a configuration."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the PNG (default "
                                        f"RUN_DIR/report/{PLOT_NAME}; for a Parquet file: only here)."),
    wide: bool = typer.Option(False, "--wide", help="show every column at its natural width"),
) -> None:
    """Per configuration: median, p95 and CV of every phase; the share of the decode and
    prefill variance explained by SM clock, temperature and throttling; outliers with their
    likely cause; a plot of decode step time against SM clock."""
    from molmo_latency.explain import explain
    from molmo_latency.show import print_json, set_wide
    from molmo_latency.show.explain_plot import why_no_clock_plot, write_decode_vs_clock_plot

    set_wide(wide)
    if not (z > 0 and math.isfinite(z)):
        raise MolmoLatencyError(f"explain: --z must be a positive number of robust standard deviations "
                                f"(e.g. 3.5), got {z}")
    requests, base = read_requests(run_dir)
    result = explain(requests, z=z)
    why = why_no_clock_plot(result)
    plot_path = None
    if plot is None and not Path(run_dir).is_dir():
        why = why or "pass --plot PATH to write it (explain writes nothing beside a Parquet file it reads)"
    elif why is None:
        target = plot or base / "report" / PLOT_NAME
        try:
            plot_path = write_decode_vs_clock_plot(result, target)
        except OSError as exc:
            if plot is not None:
                raise MolmoLatencyError(f"explain: cannot write the plot to {plot} ({exc.strerror or exc}); "
                                        "pass a --plot path in a folder you can write") from None
            why = (f"cannot write {target} ({exc.strerror or exc}); pass --plot PATH in a folder you can "
                   "write")
    if as_json:
        print_json({"source": str(run_dir), **result.to_dict(),
                    "plot": None if plot_path is None else str(plot_path), "plot_skipped": why})
        return
    render_terminal(result, plot_path, why)
