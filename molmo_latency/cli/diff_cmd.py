"""`molmo-latency diff A B`: what changed between two traces or two run directories (show only)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import polars as pl
import typer

from molmo_latency.cli.app import app
from molmo_latency.cli.show import console, print_frame, print_json

_VERDICT_STYLE = {"slower": "[bold red]slower[/]", "faster": "[bold green]faster[/]"}
_PHASE_SHORT = {"vision": "vis", "projector": "prj", "prefill": "pre", "decode": "dec", "other": "oth"}


def default_plot_path(a: Path, b: Path, a_config: str | None, b_config: str | None) -> Path:
    """Next to B: a trace's folder, or a run directory's report/ folder; the current directory
    when that one is not writable.

    Example:
        >>> default_plot_path(Path("x/base.json.gz"), Path("y/test.json.gz"), None, None).name
        'diff_base_vs_test.png'
    """
    def stem(p: Path, config: str | None) -> str:
        name = config or re.sub(r"(\.pt\.trace)?\.json(\.gz)?$", "", p.name) or "run"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", name)

    folder = b / "report" if b.is_dir() else b.parent
    name = f"diff_{stem(a, a_config)}_vs_{stem(b, b_config)}.png"
    probe = folder if folder.exists() else folder.parent
    if not os.access(probe, os.W_OK):
        folder = Path.cwd()
    return folder / name


def _phase_table(phases: pl.DataFrame, all_steps: bool) -> pl.DataFrame:
    shown = phases if all_steps else phases.filter(pl.col("family") == "phase")
    return shown.select(
        "phase", pl.col("a_n").alias("n A"), pl.col("b_n").alias("n B"),
        pl.col("a_median_ms").alias("A median"), pl.col("a_p95_ms").alias("A p95"),
        pl.col("b_median_ms").alias("B median"), pl.col("b_p95_ms").alias("B p95"),
        pl.col("delta_ms").alias("delta"), pl.col("delta_pct").alias("delta %"),
        pl.format("[{}, {}]", pl.col("ci_low_ms").round(3), pl.col("ci_high_ms").round(3)).alias("95% CI"),
        pl.col("p_adjusted").alias("p (Holm)"),
        pl.col("verdict").replace(_VERDICT_STYLE),
    )


def _shares(row: dict, side: str) -> str:
    parts = [(short, row.get(f"{side}_share_{p}")) for p, short in _PHASE_SHORT.items()]
    return " ".join(f"{s}{100 * v:.0f}" for s, v in parts if v)


def short_name(name: str, width: int = 60) -> str:
    """A kernel name for a table cell: no ``void``, no glued parameter list, no namespace
    qualifiers, the middle elided (the JSON keeps the full names).

    Example:
        >>> short_name("void at::native::k<float, at::detail::Array<char*, 3> >(float*, int)")
        'k<float, Array<char*, 3> >'
        >>> len(short_name("x" * 100))
        60
    """
    s = name[5:] if name.startswith("void ") else name
    if s.endswith(")") and ">(" in s:
        s = s[: s.rindex(">(") + 1]
    if "<" in s:  # C++ template names; CPU op names such as aten::mm keep their namespace
        s = re.sub(r"\b(?:[A-Za-z_]\w*::)+(?=[A-Za-z_~])", "", s)
    if len(s) <= width:
        return s
    keep = (width - 3) // 2
    return s[:keep] + "..." + s[len(s) - (width - 3 - keep):]


def _kernel_table(kernels: pl.DataFrame, top: int) -> pl.DataFrame:
    head = kernels.head(top)
    shares_a = [_shares(r, "a") for r in head.iter_rows(named=True)]
    shares_b = [_shares(r, "b") for r in head.iter_rows(named=True)]
    names = [short_name(n) for n in head["name"].to_list()]
    return head.select(
        pl.Series("name", names), pl.col("category").alias("cat"),
        pl.col("a_count").alias("n A"), pl.col("b_count").alias("n B"),
        pl.col("a_total_us").alias("A us"), pl.col("b_total_us").alias("B us"),
        pl.col("a_mean_us").alias("A mean"), pl.col("b_mean_us").alias("B mean"),
        pl.col("delta_self_us").alias("d own us"), (100 * pl.col("share_of_change")).alias("% chg"),
        pl.Series("A phase %", shares_a), pl.Series("B phase %", shares_b),
    )


def _show(result, *, top: int, all_steps: bool) -> None:
    console.print(f"[bold]A[/] {result.a} ({result.a_kind})    [bold]B[/] {result.b} ({result.b_kind})")
    for comp in result.comparisons:
        console.rule(f"[bold]{comp.title}[/]")
        for note in comp.notes:
            console.print(f"[dim]note: {note}[/]")
        if comp.phases is not None:
            steps = comp.phases.filter(pl.col("family") == "step")
            caption = "" if all_steps or not steps.height else \
                f" ({steps.height} decode steps: {_step_summary(steps)}; --steps shows them)"
            print_frame(_phase_table(comp.phases, all_steps),
                        "Phases: ms per request, delta = median(B) - median(A)" + caption, digits=3)
        if comp.kernels is not None:
            what = ("GPU kernels, ranked by |change|" if comp.level == "gpu" else
                    "CPU ops (no GPU activity), ranked by |change of own time|")
            print_frame(_kernel_table(comp.kernels, top),
                        f"Kernel level ({comp.level}): {what}; us summed over the trace, "
                        "% chg = share of the net change", digits=1, max_rows=top)
            for presence, label in (("only_a", "only in A"), ("only_b", "only in B")):
                names = comp.kernels.filter(pl.col("presence") == presence)["name"].to_list()
                if names:
                    shown = ", ".join(names[:top]) + (f", ... ({len(names) - top} more)" if len(names) > top else "")
                    console.print(f"[bold]{label}[/] ({len(names)}): {shown}")
            print_frame(comp.categories.select("category", pl.col("a_count").alias("n A"),
                                               pl.col("b_count").alias("n B"), pl.col("a_us").alias("A us"),
                                               pl.col("b_us").alias("B us"), pl.col("delta_us").alias("delta us"),
                                               pl.col("a_share").alias("A share"), pl.col("b_share").alias("B share")),
                        "Per category (own time)", digits=3)
            if comp.phase_ops["a_instances"].is_not_null().any() or comp.phase_ops["b_instances"].is_not_null().any():
                print_frame(comp.phase_ops.select(
                    "phase", pl.col("a_instances").alias("ranges A"), pl.col("b_instances").alias("ranges B"),
                    pl.col("a_count_per_instance").alias("ops/range A"),
                    pl.col("b_count_per_instance").alias("ops/range B"),
                    pl.col("a_us_per_instance").alias("us/range A"), pl.col("b_us_per_instance").alias("us/range B"),
                    pl.col("a_us").alias("A us"), pl.col("b_us").alias("B us")),
                    "Per phase: kernels (or ops) per range and their own time", digits=1)
    console.print(f"[dim]verdict rule: {result.rule}[/]")


def _step_summary(steps: pl.DataFrame) -> str:
    counts = steps.group_by("verdict").len().sort("verdict")
    return ", ".join(f"{n} {v}" for v, n in counts.iter_rows())


@app.command("diff")
def diff_command(
    a: Path = typer.Argument(..., help="A: a Kineto trace (.json/.json.gz) or a run directory"),
    b: Path = typer.Argument(..., help="B: a Kineto trace or a run directory; deltas are B - A"),
    config: Optional[str] = typer.Option(None, "--config", help="configuration id of A (run directory)"),
    config_b: Optional[str] = typer.Option(None, "--config-b", help="configuration id of B (default: --config)"),
    normalize: bool = typer.Option(False, "--normalize", help="align kernels by names without template "
                                   "arguments and launch suffixes"),
    level: str = typer.Option("auto", "--level", help="auto, gpu or cpu_op (auto: gpu when both traces have "
                              "GPU activities)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG waterfall path (default: next to B)"),
    no_plot: bool = typer.Option(False, "--no-plot", help="write no PNG"),
    top: int = typer.Option(20, "--top", help="kernel rows shown in the terminal (JSON has all)"),
    steps: bool = typer.Option(False, "--steps", help="show every decode step row in the terminal"),
    alpha: float = typer.Option(0.05, "--alpha", help="significance level of the Mann-Whitney test (Holm)"),
    min_effect_pct: float = typer.Option(1.0, "--min-effect-pct", help="smallest change worth a verdict, "
                                         "in % of A's median"),
    resamples: int = typer.Option(2000, "--resamples", help="bootstrap resamples"),
    seed: int = typer.Option(0, "--seed", help="bootstrap seed"),
) -> None:
    """What changed from A to B, phase by phase (with noise told apart from change) and kernel by kernel."""
    from molmo_latency.diff import DiffError, diff
    from molmo_latency.diff.waterfall import plot_waterfall

    if top < 1:
        raise DiffError(f"--top must be at least 1, got {top}")
    result = diff(a, b, config=config, config_b=config_b, level=level, normalize=normalize, alpha=alpha,
                  min_effect_pct=min_effect_pct, resamples=resamples, seed=seed)
    png = None
    if not no_plot:
        first = result.comparisons[0]
        png = plot if plot is not None else default_plot_path(a, b, first.a_config, first.b_config)
        try:
            png = plot_waterfall(result, png)
        except OSError as exc:
            raise DiffError(f"cannot write the waterfall to {png} ({exc.strerror or exc}); pass --plot PATH "
                            "or --no-plot") from None
    if as_json:
        print_json({**result.to_dict(), "plot": str(png) if png else None})
        return
    _show(result, top=top, all_steps=steps)
    if png:
        console.print(f"waterfall: {png}")
