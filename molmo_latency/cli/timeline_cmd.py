"""`molmo-latency timeline RUN_DIR [--request N ...] --out FILE.json`: requests and their phases
as a Chrome trace that Perfetto (ui.perfetto.dev) and chrome://tracing open.

The trace is built by :func:`molmo_latency.timeline.chrome_trace` from the run directory's
tables (requests, phases, telemetry when NVML was on) and run.json (versions, conditions).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from molmo_latency.cli.app import app, examples


@app.command(epilog=examples("molmo-latency timeline runs/tiny --out tiny.json",
                             "molmo-latency timeline runs/tiny --request 0 --request 5 --out two.json --png two.png"))
def timeline(
    run_dir: Path = typer.Argument(..., help="a run directory of `molmo-latency profile`"),
    request: Optional[List[int]] = typer.Option(None, "--request", "-r",
                                                help="a request to show, by its order in the run (repeatable; default all)"),
    out: Path = typer.Option(..., "--out", "-o", help="the Chrome trace to write (.json)"),
    png: Optional[Path] = typer.Option(None, "--png", help="also draw the same slices as a PNG"),
) -> None:
    """Write requests and their phases as a Chrome trace (Perfetto, chrome://tracing): a track per
    thread, each phase and decode step a slice, NVML and host conditions as counter tracks."""

    from molmo_latency.cli.paths import run_dir_arg
    from molmo_latency.show import err_console, write_json
    from molmo_latency.errors import MolmoLatencyError
    from molmo_latency.hold import RunDir
    from molmo_latency.timeline import chrome_trace, select_requests

    path = run_dir_arg(run_dir, "timeline")
    if out.exists() and out.is_dir():
        raise MolmoLatencyError(f"timeline: --out {out} is a directory; pass a file name such as {out / 'timeline.json'}")
    rd = RunDir(path)
    requests = select_requests(rd.table("requests"), request)
    phases = rd.table("phases")
    try:
        telemetry = rd.table("telemetry")
    except MolmoLatencyError:
        telemetry = None  # NVML was off: no counter tracks
    meta = rd.meta() if (path / "run.json").is_file() else {}
    other = {k: meta[k] for k in ("versions", "conditions", "identity", "device") if k in meta}
    doc = chrome_trace(requests, phases, telemetry=telemetry, metadata={"run_dir": str(path), **other},
                       process_name=f"molmo-latency {path.name}")
    write_json(out, doc, compact=True)
    if png is not None:
        from molmo_latency.show.timeline_plot import write_timeline_png

        write_timeline_png(doc, png, title=f"{path.name}: {requests.height} requests (the slices of {out.name})")
        err_console.print(f"timeline: drawn -> {png}", markup=False, highlight=False)
    slices = sum(1 for e in doc["traceEvents"] if e["ph"] == "X")
    err_console.print(f"timeline: {requests.height} requests, {slices} slices -> {out} "
                      "(open in ui.perfetto.dev or chrome://tracing)", markup=False, highlight=False)
