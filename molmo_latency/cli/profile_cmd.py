"""`molmo-latency profile`, `report` and `demo` (the sweep runner's commands)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from molmo_latency.cli.app import app
from molmo_latency.cli.show import console, err_console, frame_records, print_frame, print_json
from molmo_latency.errors import MolmoLatencyError

DEMO_SWEEP = {"crops": [1, 4, 8], "top_k": [1, 2], "blocks": [2, 4], "prompt_tokens": [16],
              "new_tokens": [8], "repeats": 5, "warmup": 1, "seed": 0}


class _RichProgress:
    """Progress bar: units done / total, ETA, configurations done and the last latency."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and err_console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            TextColumn("configs {task.fields[configs]}  last {task.fields[last]}"),
                            console=err_console, transient=False)
        self.task = None
        self._last_line = 0.0

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def __call__(self, p) -> None:
        last = "-" if p.last_ms is None else f"{p.last_ms:.1f} ms ({p.last_config})"
        fields = {"stage": p.stage, "configs": f"{p.configs_done}/{p.configs_total}", "last": last}
        if not self.enabled:  # no terminal (CI, a log file): a line every few seconds
            now = time.monotonic()
            if now - self._last_line > 5 or p.done == p.total:
                self._last_line = now
                print(f"[{p.stage}] {p.done}/{p.total} requests, configs {fields['configs']}, last {last}",
                      file=sys.stderr, flush=True)
            return
        if self.task is None:
            self.task = self.bar.add_task("sweep", total=p.total, **fields)
        self.bar.update(self.task, completed=p.done, total=p.total, **fields)


def _run_and_report(model: str, sweep, out: Path, *, device: str, dtype: Optional[str], kineto: bool,
                    nvml: str, trust_remote_code: bool, as_json: bool, progress: bool = True) -> None:
    from molmo_latency.sweep.runner import run_sweep

    command = "molmo-latency " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _RichProgress(enabled=progress and not as_json) as bar:
        result = run_sweep(model, sweep, out, device=device, dtype=dtype, kineto=kineto, nvml=nvml,
                           trust_remote_code=trust_remote_code, progress=bar, command=command)
    if not as_json:
        msg = (f"{result['measured']} requests measured, {result['skipped']} already done"
               f"{' (resumed)' if result['resumed'] else ''}, {result['failed_configs']} failed configurations "
               f"-> {result['run_dir']}")
        err_console.print(msg)
    _report(out, as_json=as_json, extra={"sweep": result} if as_json else None)


def _report(run_dir: Path, *, as_json: bool, extra: dict | None = None) -> None:
    import polars as pl

    from molmo_latency.plots import write_report_plots
    from molmo_latency.report import run_report

    rep = run_report(run_dir)
    pngs = write_report_plots(rep, Path(run_dir) / "report")
    if as_json:
        print_json({**(extra or {}), "run_dir": str(run_dir), "configs": frame_records(rep["config"]),
                    "summary": frame_records(rep["summary"]), "shares": frame_records(rep["shares"]),
                    "failures": frame_records(rep["failures"]), "plots": [str(p) for p in pngs]})
        return
    short = {"prompt_tokens": "prompt", "new_tokens": "new", "image_tokens": "img_tok",
             "input_tokens": "in_tok", "vision_median_ms": "vision", "projector_median_ms": "projector",
             "prefill_median_ms": "prefill", "decode_per_token_median_ms": "decode/tok",
             "decode_per_token_cv": "decode/tok CV", "total_median_ms": "total", "total_p95_ms": "total p95",
             "n_valid": "valid", "invalid_reason_top": "top invalid reason"}
    table = rep["config"].select([c for c in ["crops", "top_k", "blocks", *short, "invalid"]
                                  if c in rep["config"].columns]).rename(short, strict=False)
    print_frame(table, "Per configuration: medians in ms over valid requests (CV = std/mean)")
    if rep["failures"].height:
        print_frame(rep["failures"].with_columns(pl.col("message").str.slice(0, 160)), "Failed configurations (not measured; see failures.parquet)")
    shares = rep["shares"].select("config_id", *[c for c in rep["shares"].columns if c.endswith("_share")])
    print_frame(shares, "Phase shares of the median request", digits=3)
    console.print("plots: " + ", ".join(str(p) for p in pngs))


@app.command()
def profile(
    model: str = typer.Option(..., "--model", help="reference preset (tiny, molmoe-1b-shape) or a local HF model directory"),
    sweep: Path = typer.Option(..., "--sweep", help="sweep TOML file (grid and protocol)"),
    out: Path = typer.Option(..., "--out", help="run directory (created, or resumed if made by the same sweep)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)"),
    kineto: bool = typer.Option(False, "--kineto", help="also record Kineto traces of extra requests into RUN_DIR/traces"),
    nvml: str = typer.Option("auto", "--nvml", help="auto, off or required"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow a local Molmo checkpoint's own code"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run on Ray: 'local' or a cluster address", show_default=False),
    workers: Optional[int] = typer.Option(None, "--workers", help="with --ray: number of workers (default: one per GPU, or per CPU)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Profile MODEL over the grid of SWEEP into RUN_DIR, then print the report."""
    from molmo_latency.sweep.spec import load_sweep

    if nvml not in ("auto", "off", "required"):
        raise MolmoLatencyError(f"--nvml must be auto, off or required, got {nvml!r}")
    if device != "cpu" and not device.startswith("cuda"):
        raise MolmoLatencyError(f"--device must be cpu or cuda[:N], got {device!r}")
    spec = load_sweep(sweep)
    if ray is not None:
        from molmo_latency.scale import run_sweep_ray

        if kineto:
            raise MolmoLatencyError("--kineto is not available with --ray: record traces with a plain "
                                    "`molmo-latency profile --kineto` run of the configurations you need")
        command = "molmo-latency " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        with _RichProgress(enabled=not as_json) as bar:
            result = run_sweep_ray(model, spec, out, address=None if ray in ("", "local") else ray, device=device,
                                   dtype=dtype, nvml=nvml, trust_remote_code=trust_remote_code, workers=workers,
                                   progress=bar, command=command)
        if not as_json:
            err_console.print(f"{result['measured']} requests measured on Ray by {result['workers']} workers, "
                              f"{result['skipped']} already done -> {result['run_dir']}")
        _report(out, as_json=as_json, extra={"sweep": result} if as_json else None)
        return
    _run_and_report(model, spec, out, device=device, dtype=dtype, kineto=kineto, nvml=nvml,
                    trust_remote_code=trust_remote_code, as_json=as_json)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory of `molmo-latency profile`"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Per-configuration median/p95/CV of every phase, with PNG plots in RUN_DIR/report/."""
    _report(run_dir, as_json=as_json)


@app.command()
def demo(
    out: Path = typer.Option(Path("molmo-latency-demo"), "--out", help="run directory for the demo"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """A small sweep of the tiny reference model on CPU (well under 2 minutes), then its report."""
    from molmo_latency.sweep.spec import SweepSpec

    spec = SweepSpec.from_dict(DEMO_SWEEP, source="demo sweep")
    if not as_json:
        err_console.print(f"demo: tiny reference VLM on CPU, {len(spec.configs())} configurations "
                          f"x {spec.protocol['repeats']} repeats -> {out}")
    _run_and_report("tiny", spec, out, device="cpu", dtype=None, kineto=True, nvml="auto",
                    trust_remote_code=False, as_json=as_json)
