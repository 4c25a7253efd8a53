"""`molmo-latency trace summary PATH [--json]`: where the GPU time of a Kineto trace went.

Reads the trace (:func:`molmo_latency.trace.read_kineto`), summarises it
(:func:`molmo_latency.trace.summarize`) and shows per-device, per-category, per-kernel and
per-annotation tables, or one JSON document with ``--json``. This module only shows.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import polars as pl
import typer
from rich.table import Table
from rich.text import Text

from molmo_latency.cli.app import app
from molmo_latency.cli.show import console, err_console, print_json
from molmo_latency.trace import TraceWarning, read_kineto, summarize
from molmo_latency.trace.summary import TraceSummary

trace_app = typer.Typer(
    name="trace",
    help="Read Kineto (torch.profiler) traces: GPU time per kernel, annotation and device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(trace_app, name="trace")


def _us(ns: int | float | None) -> float | None:
    return None if ns is None else ns / 1000


def summary_document(summary: TraceSummary, warned: list[str]) -> dict[str, Any]:
    """The JSON document of `trace summary --json` (times in microseconds).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto, summarize
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> doc = summary_document(summarize(read_kineto(write_demo_trace(tempfile.mkdtemp()))), [])
        >>> doc["gpu"][0]["busy_us"], doc["kernels"][0]["name"], doc["annotations"][0]["kernels"]
        (43.375, 'flash_fwd_kernel', 3)
    """
    trace = summary.trace
    names = {d.get("id"): d.get("name") for d in trace.device_properties}
    return {
        "trace": {
            "path": trace.path,
            "layout": trace.layout,
            "base_time_ns": trace.base_time_ns,
            "events": trace.events,
            "gpu_activities": trace.gpu.height,
            "runtime_calls": trace.runtime.height,
            "cpu_ops": trace.cpu_ops.height,
            "annotations": trace.annotations.height,
            "skipped_events": trace.skipped,
        },
        "gpu": [
            {
                "device": r["device"],
                "name": names.get(r["device"]),
                "activities": r["gpu_activities"],
                "kernel_us": _us(r["gpu_kernel_ns"]),
                "busy_us": _us(r["gpu_busy_ns"]),
                "span_us": _us(r["gpu_span_ns"]),
                "idle_us": _us(r["gpu_idle_ns"]),
            }
            for r in summary.devices.iter_rows(named=True)
        ],
        "categories": [
            {"category": r["category"], "count": r["count"], "total_us": _us(r["total_ns"])}
            for r in summary.categories.iter_rows(named=True)
        ],
        "kernels": [
            {
                "name": r["name"],
                "kind": r["kind"],
                "category": r["category"],
                "count": r["count"],
                "total_us": _us(r["total_ns"]),
                "mean_us": _us(r["total_ns"] / r["count"]),
                "min_us": _us(r["min_ns"]),
                "max_us": _us(r["max_ns"]),
            }
            for r in summary.kernels.iter_rows(named=True)
        ],
        "annotations": [
            {
                "name": r["name"],
                "instances": r["instances"],
                "kernels": r["gpu_activities"],
                "gpu_kernel_us": _us(r["gpu_kernel_ns"]),
                "gpu_busy_us": _us(r["gpu_busy_ns"]),
                "gpu_span_us": _us(r["gpu_span_ns"]),
                "gpu_idle_us": _us(r["gpu_idle_ns"]),
                "launch_delay_mean_us": _us(r["launch_delay_mean_ns"]),
            }
            for r in summary.annotations.iter_rows(named=True)
        ],
        "unattributed_activities": summary.unattributed,
        "unlinked_activities": summary.unlinked,
        "warnings": warned,
    }


_NAME_WIDTH = 100


def _cell(value: Any) -> Text:
    """A table cell as plain text: names like "[param|cuda]" must not be read as rich markup."""
    if value is None:
        return Text("-")
    if isinstance(value, float):
        return Text(f"{value:,.3f}")
    if isinstance(value, int):
        return Text(f"{value:,}")
    text = str(value)
    if len(text) > _NAME_WIDTH:
        text = text[: _NAME_WIDTH - 1] + "\u2026"
    return Text(text)


def _print_frame(frame: pl.DataFrame, title: str, max_rows: int = 60) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name, dtype in frame.schema.items():
        table.add_column(name, justify="right" if dtype.is_numeric() else "left", overflow="fold")
    for row in frame.head(max_rows).iter_rows():
        table.add_row(*(_cell(v) for v in row))
    if frame.height > max_rows:
        table.caption = f"... {frame.height - max_rows} more rows (--top N, or --json for all)"
    console.print(table)


def _us_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """`*_ns` columns shown as `*_us`."""
    return frame.with_columns(
        (pl.col(c) / 1000).alias(c[:-3] + "_us") for c in frame.columns if c.endswith("_ns")
    ).drop([c for c in frame.columns if c.endswith("_ns")])


@trace_app.command(
    "summary", help="GPU time per device, kernel category, kernel name and annotation of one trace."
)
def summary_command(
    path: Path = typer.Argument(..., help="a Kineto trace: .json or .json.gz written by torch.profiler"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document instead of tables"),
    top: int = typer.Option(25, "--top", min=1, help="kernels and annotations shown in the tables"),
) -> None:
    """`molmo-latency trace summary PATH [--json] [--top N]`.

    Example:
        >>> import contextlib, io, json, tempfile
        >>> from molmo_latency.cli.main import main
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> path = write_demo_trace(tempfile.mkdtemp())
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):
        ...     code = main(["trace", "summary", str(path), "--json"])
        >>> code, json.loads(out.getvalue())["gpu"][0]["activities"]
        (0, 9)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TraceWarning)
        trace = read_kineto(path)
    warned = [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]
    summary = summarize(trace)
    if as_json:
        print_json(summary_document(summary, warned))
        return
    for message in warned:
        err_console.print(f"warning: {message}", highlight=False, soft_wrap=True)
    console.print(
        f"[bold]{trace.path}[/bold]: {trace.events} events, {trace.gpu.height} GPU activities, "
        f"{trace.annotations.height} annotations ({trace.layout} layout)",
        highlight=False,
    )
    if trace.gpu.height:
        _print_frame(_us_columns(summary.devices.drop("gpu_start_ns", "gpu_end_ns")), "GPU per device (us)")
        _print_frame(_us_columns(summary.categories), "GPU time per kernel category (us)")
        _print_frame(
            _us_columns(summary.kernels.drop("kind")), f"Top kernels by total time (us, of {summary.kernels.height})",
            max_rows=top,
        )
    shown = summary.annotations.drop("launch_delay_sum_ns", "launch_delay_max_ns")
    _print_frame(
        _us_columns(shown).rename({"gpu_activities": "kernels"}),
        "GPU activities charged to the innermost annotation that launched them (us)",
        max_rows=top,
    )
    console.print(
        f"{summary.unattributed} GPU activities outside every annotation; "
        f"{summary.unlinked} without their launch call in the trace",
        highlight=False,
    )
