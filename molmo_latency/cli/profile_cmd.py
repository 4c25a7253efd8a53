"""`molmo-latency profile`, `report` and `demo` (the sweep runner's commands)."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import typer

from molmo_latency.cli.app import app, examples
from molmo_latency.errors import MolmoLatencyError

# 8 repeats: enough for diff to give verdicts; two output lengths: fit can hold one out
DEMO_SWEEP = {"crops": [1, 4, 8], "top_k": [1, 2], "blocks": [2, 4], "prompt_tokens": [16],
              "new_tokens": [4, 12], "repeats": 8, "warmup": 1, "seed": 0}


class _RichProgress:
    """Progress bar: units done / total, ETA, configurations done and the last latency."""

    def __init__(self, enabled: bool = True):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        from molmo_latency.show import err_console

        self.enabled = enabled and err_console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            TextColumn("configs {task.fields[configs]}  last {task.fields[last]}"),
                            console=err_console, transient=False)
        self.task = None
        self._last_line = 0.0
        self.warmups = 0  # warm-up requests so far: shown while the measured count still stands at 0

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            if exc and exc[0] is KeyboardInterrupt:  # Ctrl-C: clear the bar, the interrupt message follows
                self.bar.live.transient = True
            self.bar.__exit__(*exc)

    def __call__(self, p) -> None:
        if p.stage == "warmup":
            self.warmups += 1
            last = f"warm-up request {self.warmups} ({p.last_config})"
        else:
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
                    nvml: str, trust_remote_code: bool, as_json: bool, progress: bool = True,
                    threads: Optional[int] = None) -> None:
    from molmo_latency.safe_fs import translate_faults
    from molmo_latency.show import err_console
    from molmo_latency.sweep.runner import run_sweep

    command = "molmo-latency " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _RichProgress(enabled=progress and not as_json) as bar, translate_faults(
            out, "run the same command again: the sweep resumes where it stopped"):
        result = run_sweep(model, sweep, out, device=device, dtype=dtype, kineto=kineto, nvml=nvml,
                           trust_remote_code=trust_remote_code, progress=bar, command=command, threads=threads)
    if not as_json:
        _print_failures(out)
        msg = (f"{result['measured']} requests measured, {result['skipped']} already done"
               f"{' (resumed)' if result['resumed'] else ''}, {result['failed_configs']} failed configurations "
               f"-> {result['run_dir']}")
        err_console.print(msg, markup=False, highlight=False)
    _nothing_measured(result, out)
    _report(out, as_json=as_json, extra={"sweep": result.as_dict()} if as_json else None)


def failure_groups(run_dir: Path) -> list[tuple[str, str, list[str]]]:
    """The failed configurations of a run grouped by cause (the first line of the message, its
    numbers aside): (stage, the first such message, config ids), the most common cause first."""
    from molmo_latency.report import failure_table
    from molmo_latency.hold.rundir import RunDir

    import re

    failures = failure_table(RunDir(run_dir))
    groups: dict[tuple[str, str], tuple[str, list[str]]] = {}
    for row in failures.iter_rows(named=True):
        message = (row["message"] or "").strip().splitlines()
        cause = f"{row['error_type']}: {message[0] if message else ''}".strip()
        key = (row["stage"] or "?", re.sub(r"\d+(\.\d+)?", "#", cause))  # same cause, other numbers
        groups.setdefault(key, (cause, []))[1].append(row["config_id"])
    return sorted(((stage, cause, ids) for (stage, _), (cause, ids) in groups.items()), key=lambda g: -len(g[2]))


def _print_failures(run_dir: Path) -> None:
    """Each cause of failure, once, with the configurations it hit (stderr, before the report)."""
    from molmo_latency.show import err_console

    for stage, cause, ids in failure_groups(run_dir):
        shown = ", ".join(ids[:4]) + (f", ... ({len(ids) - 4} more)" if len(ids) > 4 else "")
        err_console.print(f"failed ({len(ids)} configuration{'s' if len(ids) > 1 else ''}, at {stage}): {cause} "
                          f"[{shown}]", markup=False, highlight=False)


def _nothing_measured(result: Mapping, out: Path) -> None:
    if result.get("rows", 0) == 0 and result["failed_configs"]:
        raise MolmoLatencyError(f"nothing was measured: all {result['failed_configs']} configurations failed "
                                f"(causes above; details in {Path(out) / 'failures.parquet'}); fix the sweep "
                                "or the model and run again into a new --out")


def _report(run_dir: Path, *, as_json: bool, extra: dict | None = None, html: bool = False) -> None:
    import polars as pl

    from molmo_latency.show import console, frame_records, print_frame, print_json
    from molmo_latency.show.report_plots import write_report_plots
    from molmo_latency.report import run_report
    from molmo_latency.safe_fs import inside, is_write_fault

    inside(Path(run_dir) / "report", run_dir)  # never write plots through a link out of the run
    rep = run_report(run_dir)
    quality = rep["quality"]
    try:
        pngs, skipped = write_report_plots(rep, Path(run_dir) / "report")
    except Exception as exc:  # a read-only or full run directory: the tables still print
        if not is_write_fault(exc, run_dir):
            raise
        why = getattr(exc, "strerror", None) or "the disk is full"
        pngs, skipped = [], [("plots", f"cannot write {Path(run_dir) / 'report'} ({why})")]
    page = _write_html(run_dir, rep, pngs, skipped) if html else None
    if as_json:
        print_json({**(extra or {}), "run_dir": str(run_dir), "quality": quality.as_dict(),
                    "quality_configs": frame_records(quality.configs), "configs": frame_records(rep["config"]),
                    "summary": frame_records(rep["summary"]), "shares": frame_records(rep["shares"]),
                    "failures": frame_records(rep["failures"]), "plots": [str(p) for p in pngs],
                    **({"modules": frame_records(rep["modules"])} if "modules" in rep else {}),
                    "plots_skipped": [{"file": name, "why": why} for name, why in skipped],
                    "html": str(page) if page else None})
        return
    _print_quality(quality)
    config = rep["config"]
    # header: (source column, scale): the compact columns answer "where did the time go"
    named = {"config": ("config_id", 1), "crops": ("crops", 1), "top_k": ("top_k", 1), "blocks": ("blocks", 1),
             "prompt": ("prompt_tokens", 1), "new": ("new_tokens", 1), "img tok": ("image_tokens", 1),
             "in tok": ("input_tokens", 1), "vision ms": ("vision_median_ms", 1),
             "proj ms": ("projector_median_ms", 1), "prefill ms": ("prefill_median_ms", 1),
             "decode ms/step": ("decode_per_token_median_ms", 1), "total ms": ("total_median_ms", 1),
             "total p95 ms": ("total_p95_ms", 1), "CV %": ("total_cv", 100),
             "decode CV %": ("decode_per_token_cv", 100), "n": ("n_valid", 1), "invalid": ("invalid", 1),
             "top invalid reason": ("invalid_reason_top", 1)}
    table = config.select([(pl.col(src) * scale if scale != 1 else pl.col(src)).alias(name)
                           for name, (src, scale) in named.items() if src in config.columns])
    compact = ["config", "vision ms", "prefill ms", "decode ms/step", "total ms", "CV %", "n"]
    if "invalid" in table.columns and table["invalid"].sum():
        compact += ["invalid", "top invalid reason"]
    print_frame(table, "Per configuration: medians over valid requests (CV = std/mean of total; n = valid "
                "requests)", compact=compact, digits=2)
    if rep["failures"].height:
        print_frame(rep["failures"].with_columns(pl.col("message").str.slice(0, 160)),
                    "Failed configurations (not measured; see failures.parquet)",
                    compact=["config_id", "stage", "message"])
    present = [c for c in ("vision", "projector", "prefill", "decode", "other")
               if f"{c}_share" in rep["shares"].columns]
    shares = rep["shares"].select(pl.col("config_id").alias("config"),
                                  *[(100 * pl.col(f"{c}_share")).alias(f"{c} %") for c in present])
    print_frame(shares, "Phase shares of the median request (% of the sum of its phases)", digits=1)
    if "modules" in rep:
        _print_modules(rep["modules"])
    console.print("plots: " + (", ".join(str(p) for p in pngs) or "none"), markup=False, highlight=False)
    for name, why in skipped:
        console.print(f"no {name}: {why}", markup=False, highlight=False)
    if page is not None:
        console.print(f"html: {page}", markup=False, highlight=False)


def _print_modules(modules) -> None:
    """detail="modules": per configuration and phase, the median ms per phase instance of each
    module kind (a decode row is one step), other = the phase outside every module."""
    import polars as pl

    from molmo_latency.report import MODULE_KIND_ORDER
    from molmo_latency.show import print_frame

    if modules.height == 0:
        return
    short = {"vision_block": "vis blk", "projector": "proj", "attention": "attn", "mlp": "mlp",
             "moe_router": "router", "moe_experts": "experts", "norm": "norm", "lm_head": "lm head", "other": "other"}
    kinds = [k for k in MODULE_KIND_ORDER if k in set(modules["module_kind"].to_list())]
    wide = modules.pivot(on="module_kind", index=["config_id", "phase"], values="median_ms",
                         maintain_order=True)
    table = wide.select(pl.col("config_id").alias("config"), "phase",
                        *[pl.col(k).alias(short.get(k, k)) for k in kinds if k in wide.columns])
    print_frame(table, "Inside the phases: median ms per phase instance (decode: per step) of each module kind "
                "(attn = attention, experts = MoE experts, router = MoE router); other = the phase outside every "
                "module", digits=3, compact=[c for c in table.columns if c not in ("norm", "lm head")])


def _print_quality(quality) -> None:
    """The data-quality verdict in one line, then one line per reason (each says what to do)."""
    from molmo_latency.show import console

    console.print(f"data quality: {quality.verdict}" + ("" if quality.reasons else
                                                          " (repeats agree, no contention recorded)"),
                  markup=False, highlight=False)
    for reason in quality.reasons:
        console.print(f"  - {reason}", markup=False, highlight=False)


def _write_html(run_dir: Path, rep: dict, pngs: list, skipped: list = ()) -> Path | None:
    """RUN_DIR/report/index.html: verdict, conditions and versions, tables, every plot (and why a
    plot was not drawn), failures."""
    from molmo_latency.show import err_console
    from molmo_latency.show.html import HtmlSection, render_html

    meta = {}
    if (Path(run_dir) / "run.json").is_file():
        from molmo_latency.hold import RunDir

        meta = RunDir(run_dir).meta()
    facts = {k: meta[k] for k in ("conditions", "versions", "identity", "device", "protocol", "command") if k in meta}
    quality = rep["quality"]
    sections = [HtmlSection("Per configuration", table=rep["config"],
                            note="medians over valid, warm requests; CV = std/mean"),
                HtmlSection("Data quality per configuration", table=quality.configs),
                HtmlSection("Phase shares of the median request", table=rep["shares"])]
    if "modules" in rep:
        sections.append(HtmlSection("Inside the phases: module kinds", table=rep["modules"],
                                    note="median ms per phase instance (decode: per step), share of the phase, "
                                         "FLOPs and achieved GFLOP/s; other = the phase outside every module"))
    sections += [HtmlSection(Path(p).stem.replace("_", " "), image=Path(p)) for p in pngs]
    sections += [HtmlSection(Path(name).stem.replace("_", " "), note=f"not drawn: {why}") for name, why in skipped]
    if rep["failures"].height:
        sections.append(HtmlSection("Failed configurations", table=rep["failures"]))
    target = Path(run_dir) / "report" / "index.html"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".index.html.tmp")
        tmp.write_text(render_html(f"molmo-latency report: {Path(run_dir).name}", verdict=quality.as_dict(),
                                   conditions=facts, sections=sections), encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        err_console.print(f"report: cannot write {target} ({exc.strerror or exc}); the tables still print",
                          markup=False, highlight=False)
        return None
    return target


WIDE_HELP = "show every column at its natural width (default: the columns that fit the terminal)"


def check_nvml_required(device: str) -> None:
    """`--nvml required`: NVML must open the GPU now, before a model is loaded or a file written;
    the GPU is named as the profiler names it (:func:`~molmo_latency.telemetry.source.resolve_gpu`,
    by UUID), so CUDA_VISIBLE_DEVICES cannot make the check look at another GPU."""
    from molmo_latency.errors import NvmlUnavailable
    from molmo_latency.telemetry.device import open_gpu
    from molmo_latency.telemetry.source import resolve_gpu

    try:
        open_gpu(resolve_gpu(device).nvml_id).close()
    except NvmlUnavailable as exc:
        msg = str(exc).replace("nvml='off'", "--nvml off")
        if "--nvml off" not in msg:
            msg += "; pass --nvml off to profile without telemetry"
        raise MolmoLatencyError(f"--nvml required: {msg}") from None


@app.command(epilog=examples(
    "molmo-latency profile --model tiny --sweep sweep.toml --out runs/tiny",
    "molmo-latency profile --model /ckpt/MolmoE-1B-0924 --trust-remote-code --device cuda --sweep sweep.toml "
    "--out runs/molmoe --kineto --ray"))
def profile(
    model: str = typer.Option(..., "--model", help="reference preset (tiny, molmoe-1b-shape) or a local HF model directory"),
    sweep: Path = typer.Option(..., "--sweep", help="sweep TOML file (grid and protocol)"),
    out: Path = typer.Option(..., "--out", help="run directory (created, or resumed if made by the same sweep)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)"),
    kineto: bool = typer.Option(False, "--kineto", help="also record Kineto traces of extra requests into RUN_DIR/traces"),
    nvml: str = typer.Option("auto", "--nvml", help="auto, off or required (required: refused up front where NVML "
                             "cannot open the GPU)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow a local Molmo checkpoint's own code"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]", show_default=False,
                                      help="run on Ray; --ray alone (or --ray local) starts a local Ray, "
                                      "--ray ADDRESS joins a cluster (e.g. ray://head:10001 or auto)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="with --ray: number of workers (default: one per GPU, or per CPU)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for the whole run (default on "
                                          "cpu: 1, the steadiest on a shared machine; recorded in run.json)"),
    detail: Optional[str] = typer.Option(None, "--detail", help="phases or modules: modules also times attention, "
                                         "MLP / MoE router / experts and norms inside each phase (a modules "
                                         "table; default: the sweep file's `detail`, else phases)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Profile MODEL over the grid of SWEEP into RUN_DIR, then print the report."""
    from molmo_latency.cli.paths import file_arg
    from molmo_latency.show import err_console, set_wide
    from molmo_latency.sweep.spec import load_sweep

    set_wide(wide)
    if nvml not in ("auto", "off", "required"):
        raise MolmoLatencyError(f"--nvml must be auto, off or required, got {nvml!r}")
    if device != "cpu" and not device.startswith("cuda"):
        raise MolmoLatencyError(f"--device must be cpu or cuda[:N], got {device!r}")
    if workers is not None and workers < 1:
        raise MolmoLatencyError(f"--workers must be at least 1, got {workers}")
    if workers is not None and ray is None:
        raise MolmoLatencyError("--workers takes effect only with --ray (a plain run measures in this process); "
                                "add --ray, or leave --workers out")
    if detail is not None and detail not in ("phases", "modules"):
        raise MolmoLatencyError(f"--detail must be phases or modules, got {detail!r}")
    if threads is not None and threads < 1:
        raise MolmoLatencyError(f"--threads must be a whole number of threads >= 1, got {threads}")
    if threads is not None and ray is not None:
        raise MolmoLatencyError("--threads is for a plain run; with --ray each worker uses the CPUs Ray gives it "
                                "(recorded in run.json)")
    if out.exists() and not out.is_dir():
        raise MolmoLatencyError(f"profile: --out {out} is a file; pass a new or existing run directory")
    spec = load_sweep(file_arg(sweep, "profile", "a sweep TOML file as --sweep (see README: Sweep file)"))
    if detail is not None:  # part of the sweep's protocol (and so of the run's identity)
        spec.protocol["detail"] = detail
    if nvml == "required":
        check_nvml_required(device)
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
            _print_failures(out)
            err_console.print(f"{result['measured']} requests measured on Ray by {result['workers']} workers, "
                              f"{result['skipped']} already done -> {result['run_dir']}", markup=False,
                              highlight=False)
        _nothing_measured(result, out)
        _report(out, as_json=as_json, extra={"sweep": result.as_dict()} if as_json else None)
        return
    _run_and_report(model, spec, out, device=device, dtype=dtype, kineto=kineto, nvml=nvml,
                    trust_remote_code=trust_remote_code, as_json=as_json, threads=threads)


@app.command(epilog=examples("molmo-latency report runs/tiny", "molmo-latency report runs/tiny --wide"))
def report(
    run_dir: Path = typer.Argument(..., help="a run directory of `molmo-latency profile`"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
    html: bool = typer.Option(False, "--html", help="also write RUN_DIR/report/index.html: one self-contained "
                              "page (verdict, conditions, tables, every plot, failures)"),
) -> None:
    """Per-configuration median/p95/CV of every phase, with PNG plots in RUN_DIR/report/."""
    from molmo_latency.cli.paths import run_dir_arg
    from molmo_latency.show import set_wide

    set_wide(wide)
    _report(run_dir_arg(run_dir, "report"), as_json=as_json, html=html)


@app.command(epilog=examples("molmo-latency demo", "molmo-latency demo --out /tmp/demo --wide"))
def demo(
    out: Path = typer.Option(Path("molmo-latency-demo"), "--out", help="run directory for the demo"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """A small sweep of the tiny reference model on CPU (well under 2 minutes), then its report."""
    from molmo_latency.show import err_console, set_wide
    from molmo_latency.sweep.spec import SweepSpec

    set_wide(wide)
    spec = SweepSpec.from_dict(DEMO_SWEEP, source="demo sweep")
    if not as_json:
        err_console.print(f"demo: tiny reference VLM on CPU, {len(spec.configs())} configurations "
                          f"x {spec.protocol['repeats']} repeats -> {out}", markup=False, highlight=False)
    _run_and_report("tiny", spec, out, device="cpu", dtype=None, kineto=True, nvml="auto",
                    trust_remote_code=False, as_json=as_json)
