"""`molmo-latency explain RUN_DIR [--json]`: which part of the latency variance is the hardware.

Reads ``requests.parquet`` of a run directory (or any requests Parquet), computes
:func:`molmo_latency.explain.explain`, prints rich tables (or JSON with ``--json``) and writes
the decode-time-against-SM-clock plot to ``RUN_DIR/report/explain_decode_vs_clock.png``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

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


# ----------------------------------------------------------------------------- the plot


def why_no_clock_plot(result: "Explanation") -> str | None:
    """Why there is nothing to plot (None when there is)."""
    if result.decode_points.height:
        return None
    if not result.has_telemetry:
        return ("no SM clock readings (NVML was off or unavailable, e.g. on CPU); profile on a GPU "
                "with --nvml required to get this plot")
    return "no request has both a decode per-token time and an SM clock reading"


def write_decode_vs_clock_plot(result: "Explanation", path: str | os.PathLike) -> Path | None:
    """PNG of decode per-token time against SM clock, coloured by max temperature, or None (and
    no file) when there is nothing to plot (:func:`why_no_clock_plot` says why).

    Left: the time itself; right: the time over its configuration's median (so that
    configurations share an axis). Throttled requests are ringed in red.

    >>> import tempfile, os
    >>> import polars as pl
    >>> from molmo_latency.explain import PHASE_MS_COLUMNS, explain
    >>> r = explain(pl.DataFrame({c: [1.0, 1.2] for c in PHASE_MS_COLUMNS}))
    >>> write_decode_vs_clock_plot(r, os.path.join(tempfile.mkdtemp(), "x.png")) is None
    True
    """
    import polars as pl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    pts = result.decode_points
    if why_no_clock_plot(result) is not None:
        return None
    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    clock = pts["sm_clock_mean_mhz"].to_numpy()
    temp = pts["temp_max_c"]
    has_temp = temp.null_count() < temp.len()
    throttled = pts["throttled"].fill_null(False).to_numpy()
    sc = None
    for i, (col, label) in enumerate((
            ("decode_per_token_ms", "decode per token (ms)"),
            ("ratio_to_config_median", "decode per token / configuration median"))):
        ax = fig.add_subplot(1, 2, i + 1)
        y = pts[col].to_numpy()
        kw: dict[str, Any] = {"s": 22, "alpha": 0.85, "edgecolors": "none"}
        if has_temp:
            temps = temp.fill_null(float("nan")).to_numpy()
            # one colour scale for both panels (and the colour bar)
            low, high = float(temp.min()), float(temp.max())
            if high - low < 1.0:  # one temperature: a 1 C wide scale centred on it, not a degenerate one
                low, high = (low + high) / 2 - 0.5, (low + high) / 2 + 0.5
            kw.update(c=temps, cmap="plasma", vmin=low, vmax=high)
        sc = ax.scatter(clock, y, **kw)
        if throttled.any():
            ax.scatter(clock[throttled], y[throttled], s=70, facecolors="none",
                       edgecolors="red", linewidths=1.2, label="throttled")
            ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.02), fontsize=8, frameon=False)  # above the data
        ax.set_xlabel("SM clock, mean over the request (MHz)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if has_temp and sc is not None:
        fig.colorbar(sc, ax=fig.axes, label="max temperature (C)", shrink=0.9)
    r2 = result.hardware.filter(pl.col("target") == "decode_per_token_ms")["r2"]
    share = "" if r2.len() == 0 or r2[0] is None else f" (hardware R\u00b2 = {r2[0]:.2f})"
    fig.suptitle(f"Decode step time against SM clock, {pts.height} requests{share}")
    import io

    from molmo_latency.hold.rundir import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())  # atomic, fsynced, normal permissions
    return path


# ----------------------------------------------------------------------------- the terminal


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def render_terminal(result: "Explanation", plot: Path | None, why_no_plot: str | None = None) -> None:
    """The explanation as tables (through the one renderer, :func:`molmo_latency.cli.show.print_frame`)."""
    import polars as pl

    from molmo_latency.cli.show import console, print_frame

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


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_ready(v) for v in obj]
    return obj


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
    import msgspec

    from molmo_latency.cli.show import set_wide
    from molmo_latency.explain import explain

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
        doc = _json_ready({"source": str(run_dir), **result.to_dict(),
                           "plot": None if plot_path is None else str(plot_path), "plot_skipped": why})
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode() + "\n")
        return
    render_terminal(result, plot_path, why)
