"""`molmo-latency explain RUN_DIR [--json]`: which part of the latency variance is the hardware.

Reads ``requests.parquet`` of a run directory (or any requests Parquet), computes
:func:`molmo_latency.explain.explain`, prints rich tables (or JSON with ``--json``) and writes
the decode-time-against-SM-clock plot to ``RUN_DIR/report/explain_decode_vs_clock.png``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import msgspec
import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from molmo_latency.cli.app import app
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.explain import Explanation, explain

PLOT_NAME = "explain_decode_vs_clock.png"


def read_requests(path: str | os.PathLike) -> tuple[pl.DataFrame, Path]:
    """The requests table at ``path`` (a run directory or a Parquet file) and the directory
    that holds it (where ``report/`` goes).

    >>> read_requests("/no/such/run")
    Traceback (most recent call last):
    ...
    molmo_latency.errors.MolmoLatencyError: /no/such/run does not exist; pass a run directory written by `molmo-latency profile` or a requests Parquet file
    """
    path = Path(path)
    if not path.exists():
        raise MolmoLatencyError(f"{path} does not exist; pass a run directory written by "
                                "`molmo-latency profile` or a requests Parquet file")
    if path.is_dir():
        from molmo_latency.sweep.rundir import RunDir

        RunDir(path).refresh()  # a killed sweep's parts become visible in requests.parquet
        file, base = path / "requests.parquet", path
        if not file.is_file():
            raise MolmoLatencyError(
                f"{path} is not a run directory: it has no requests.parquet; pass the directory "
                "`molmo-latency profile` wrote (finished or resumed), or a requests Parquet file")
    else:
        file, base = path, path.parent
    try:
        return pl.read_parquet(file), base
    except Exception as exc:  # polars raises several kinds for a bad file
        raise MolmoLatencyError(f"cannot read {file} as Parquet ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a "
                                "requests.parquet written by molmo-latency") from exc


# ----------------------------------------------------------------------------- the plot


def write_decode_vs_clock_plot(result: Explanation, path: str | os.PathLike) -> Path:
    """PNG of decode per-token time against SM clock, coloured by max temperature.

    Left: the time itself; right: the time over its configuration's median (so that
    configurations share an axis). Throttled requests are ringed in red. Without telemetry the
    figure says so instead of plotting.

    >>> import tempfile, os
    >>> from molmo_latency.explain import PHASE_MS_COLUMNS
    >>> r = explain(pl.DataFrame({c: [1.0, 1.2] for c in PHASE_MS_COLUMNS}))
    >>> p = write_decode_vs_clock_plot(r, os.path.join(tempfile.mkdtemp(), "x.png"))
    >>> open(p, "rb").read(4)
    b'\\x89PNG'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    pts = result.decode_points
    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    if pts.height == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        why = ("No telemetry in this run: NVML was off or unavailable, so there is no SM clock to\n"
               "plot decode time against. Profile on a GPU with `--nvml required` to get it."
               if not result.has_telemetry else
               "No request has both a decode per-token time and an SM clock reading\n"
               "(no decode steps, or only invalid requests).")
        ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=12, wrap=True,
                transform=ax.transAxes)
        fig.suptitle("Decode step time against SM clock")
    else:
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
                kw.update(c=temp.fill_null(float("nan")).to_numpy(), cmap="plasma")
            sc = ax.scatter(clock, y, **kw)
            if throttled.any():
                ax.scatter(clock[throttled], y[throttled], s=70, facecolors="none",
                           edgecolors="red", linewidths=1.2, label="throttled")
                ax.legend(loc="best", fontsize=8)
            ax.set_xlabel("SM clock, mean over the request (MHz)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        if has_temp and sc is not None:
            fig.colorbar(sc, ax=fig.axes, label="max temperature (C)", shrink=0.9)
        r2 = result.hardware.filter(pl.col("target") == "decode_per_token_ms")["r2"]
        share = "" if r2.len() == 0 or r2[0] is None else f" (hardware R\u00b2 = {r2[0]:.2f})"
        fig.suptitle(f"Decode step time against SM clock, {pts.height} requests{share}")
    import io

    from molmo_latency.sweep.rundir import atomic_write_bytes

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


def _table(title: str, columns: list[tuple[str, str]], rows: list[list[str]],
           caption: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", caption=caption)
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=justify == "right")
    for row in rows:
        table.add_row(*row)
    return table


def render_terminal(result: Explanation, console: Console, plot: Path | None) -> None:
    """The explanation as rich tables."""
    stats = result.phase_stats
    rows, last = [], None
    for r in stats.iter_rows(named=True):
        cv = None if r["cv"] is None else 100 * r["cv"]
        rows.append([r["config_id"] if r["config_id"] != last else "", r["phase"], str(r["n"]),
                     _fmt(r["median_ms"]), _fmt(r["p95_ms"]), _fmt(cv, 1)])
        last = r["config_id"]
    console.print(_table("Phases per configuration (valid requests)",
                         [("config", "left"), ("phase", "left"), ("n", "right"),
                          ("median ms", "right"), ("p95 ms", "right"), ("CV %", "right")], rows))

    rows = []
    for r in result.hardware.iter_rows(named=True):
        rows.append([r["target"], str(r["n"]), str(r["n_configs"]), _fmt(r["r2"]), _fmt(r["r2_adj"]),
                     _fmt(r["r2_relative"]),
                     _fmt(r["coef_ms_per_mhz"], 5), _fmt(r["coef_ms_per_c"], 4),
                     _fmt(r["coef_ms_throttled"]), r["note"] or ""])
    console.print(_table(
        "Share of the within-configuration variance explained by the hardware "
        "(R\u00b2 of the residual on SM clock, temperature, throttling)",
        [("target", "left"), ("n", "right"), ("configs", "right"), ("R\u00b2", "right"),
         ("adj. R\u00b2", "right"), ("R\u00b2 relative", "right"), ("ms/MHz", "right"), ("ms/\u00b0C", "right"),
         ("ms throttled", "right"), ("note", "left")], rows))

    out = result.outliers
    if out.height == 0:
        console.print("No outliers (|robust z| > threshold) within any configuration.")
    else:
        rows = [[r["config_id"], _fmt(r["request"]), _fmt(r["repeat"]), _fmt(r["order"]), r["metric"],
                 _fmt(r["value_ms"]), _fmt(r["median_ms"]), _fmt(r["robust_z"], 1), r["cause"],
                 r["detail"] or ""]
                for r in out.head(40).iter_rows(named=True)]
        caption = f"... {out.height - 40} more (use --json for all)" if out.height > 40 else None
        console.print(_table(
            "Outliers and their likely cause",
            [("config", "left"), ("request", "right"), ("repeat", "right"), ("order", "right"),
             ("metric", "left"), ("value ms", "right"), ("median ms", "right"), ("z", "right"),
             ("cause", "left"), ("detail", "left")], rows, caption))
    for note in result.notes:
        console.print(f"note: {note}")
    if plot is not None:
        console.print(f"plot: {plot}")


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_ready(v) for v in obj]
    return obj


@app.command("explain")
def explain_command(
    run_dir: Path = typer.Argument(..., help="A run directory of `molmo-latency profile`, or a "
                                   "requests Parquet file (with telemetry columns for the "
                                   "hardware share)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    z: float = typer.Option(3.5, "--z", help="Outlier threshold on |robust z| within a configuration."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the PNG (default "
                                        f"RUN_DIR/report/{PLOT_NAME})."),
) -> None:
    """Per configuration: median, p95 and CV of every phase; the share of the decode and
    prefill variance explained by SM clock, temperature and throttling; outliers with their
    likely cause; a plot of decode step time against SM clock."""
    if not z > 0:
        raise MolmoLatencyError(f"--z must be > 0, got {z}")
    requests, base = read_requests(run_dir)
    result = explain(requests, z=z)
    plot_path = write_decode_vs_clock_plot(result, plot or base / "report" / PLOT_NAME)
    if as_json:
        doc = _json_ready({"source": str(run_dir), **result.to_dict(), "plot": str(plot_path)})
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode() + "\n")
        return
    width = None if sys.stdout.isatty() else max(160, int(os.environ.get("COLUMNS", "0") or 0))
    render_terminal(result, Console(width=width, soft_wrap=False), plot_path)
