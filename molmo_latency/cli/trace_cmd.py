"""`molmo-latency trace summary PATH [--json]`: where the GPU time of a trace went.

Reads a Kineto trace or an Nsight Systems SQLite export (:func:`molmo_latency.trace.load_trace`,
which tells them apart by content, through the Parquet cache of :mod:`molmo_latency.trace.cache`),
summarises what it shows (:func:`molmo_latency.trace.summarize`) and shows per-device,
per-category, per-kernel and per-annotation tables (a CPU-op table when the trace has no GPU
activity), or one JSON document with ``--json``. This module declares the command to Typer; what
it does and shows is :mod:`.trace_summary` (which the command line also runs without Typer).
"""

from __future__ import annotations

from pathlib import Path

import typer

from molmo_latency.cli.app import app
from molmo_latency.cli.trace_summary import (  # noqa: F401 - the command's pieces, importable from here too
    NAME_WIDTH,
    SUMMARY_OPTIONS,
    direct_summary,
    run_summary,
    short_name,
    summary_document,
)

trace_app = typer.Typer(
    name="trace",
    help="Read traces (torch.profiler Kineto JSON, Nsight Systems SQLite exports): GPU time per kernel, "
    "annotation and device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(trace_app, name="trace")


@trace_app.command(
    "summary",
    help="GPU time per device, kernel category, kernel name and annotation (NVTX range) of one trace: a "
    "Kineto .json/.json.gz or an Nsight Systems .sqlite export (plain or gzipped).\n\n"
    "Examples:\n\n"
    "  molmo-latency trace summary run/traces/c1-k2.pt.trace.json.gz --top 10\n\n"
    "  molmo-latency trace summary report.sqlite --json",
)
def summary_command(
    path: Path = typer.Argument(..., help="a Kineto trace (.json, .json.gz) or an nsys SQLite export (.sqlite)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document (full names) instead of tables"),
    top: int = typer.Option(25, "--top", min=1, help="kernels, annotations and CPU ops shown in the tables"),
    wide: bool = typer.Option(False, "--wide", help="show names in full in the tables"),
    parts: str | None = typer.Option(None, "--parts", help="what to compute and show, a comma list of gpu, "
                                     "categories, kernels, annotations, cpu_ops (default: all; --json's `computed` "
                                     "lists them). An nsys export without annotations and cpu_ops is summarised "
                                     "by SQLite alone (fast, bounded memory: no NVTX attribution, no launch join)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="read the trace itself, neither reading nor writing "
                                  "the Parquet cache (.molmo-latency-cache/ beside the trace)"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="keep the Parquet cache of the trace's tables "
                                          "in this folder (default: .molmo-latency-cache/ beside the trace, "
                                          "or $MOLMO_LATENCY_CACHE_DIR)"),
) -> None:
    """`molmo-latency trace summary PATH [--json] [--parts P,..] [--top N] [--wide] [--no-cache] [--cache-dir D]`.

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
    run_summary(path, as_json=as_json, top=top, wide=wide, parts=parts, no_cache=no_cache, cache_dir=cache_dir)
