"""`molmo-latency diff A B`: what changed between two traces or two run directories (show only)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from molmo_latency.cli.app import app, examples

if TYPE_CHECKING:  # imported when the command runs, not at start-up
    import polars as pl

_PHASE_SHORT = {"vision": "vis", "projector": "prj", "prefill": "pre", "decode": "dec", "other": "oth"}
LEGEND = ("self = own time (a CPU op without its children; a GPU kernel's duration); incl = inclusive "
          "(with children); Δ = B - A; % chg = share of the net change of self time; A/B phase % = "
          "where its self time fell: vis vision, prj projector, pre prefill, dec decode, oth outside "
          "every phase (e.g. dec90 = 90% in decode)")


def _phase_table(phases: "pl.DataFrame", all_steps: bool) -> "pl.DataFrame":
    import polars as pl

    shown = phases if all_steps else phases.filter(pl.col("family") == "phase")
    return shown.select(
        "phase", pl.col("a_n").alias("n A"), pl.col("b_n").alias("n B"),
        pl.col("a_median_ms").alias("A median"), pl.col("a_p95_ms").alias("A p95"),
        pl.col("b_median_ms").alias("B median"), pl.col("b_p95_ms").alias("B p95"),
        pl.col("delta_ms").alias("delta"), pl.col("delta_pct").alias("delta %"),
        pl.format("[{}, {}]", pl.col("ci_low_ms").round(3), pl.col("ci_high_ms").round(3)).alias("95% CI"),
        pl.col("p_adjusted").alias("p (Holm)"), "verdict",
    )


_PHASE_COMPACT = ["phase", "n A", "n B", "A median", "B median", "delta", "delta %", "verdict"]


def _shares(row: dict, side: str) -> str:
    """`vis0 pre10 dec90`: the % of a kernel's time in each phase (see LEGEND)."""
    parts = [(short, row.get(f"{side}_share_{p}")) for p, short in _PHASE_SHORT.items()]
    return " ".join(f"{s}{100 * v:.0f}" for s, v in parts if v)


def short_name(name: str, width: int = 60) -> str:
    """A kernel name for a table cell: no ``void``, no glued parameter list, no namespace
    qualifiers, cut at the end (the name and its first template arguments are what tells
    kernels apart; the JSON keeps the full names).

    Example:
        >>> short_name("void at::native::k<float, at::detail::Array<char*, 3> >(float*, int)")
        'k<float, Array<char*, 3> >'
        >>> short_name("elementwise_kernel<128, 4, Lambda>" + "x" * 60, width=30)
        'elementwise_kernel<128, 4, La…'
    """
    s = name[5:] if name.startswith("void ") else name
    if s.endswith(")") and ">(" in s:
        s = s[: s.rindex(">(") + 1]
    if "<" in s:  # C++ template names; CPU op names such as aten::mm keep their namespace
        s = re.sub(r"\b(?:[A-Za-z_]\w*::)+(?=[A-Za-z_~])", "", s)
    if len(s) <= width:
        return s
    return s[: width - 1] + "…"


def short_names(names: list[str], width: int = 60) -> list[str]:
    """:func:`short_name` of each, with ``#2``, ``#3`` ... added where two different names would
    read the same.

    Example:
        >>> short_names(["k<" + "a" * 70 + ">", "k<" + "a" * 70 + "b>", "mm"], width=10)
        ['k<aaaaaaa…', 'k<aaaaaaa… #2', 'mm']
    """
    out, seen = [], {}
    for name in names:
        short = short_name(name, width)
        seen[short] = seen.get(short, 0) + 1
        out.append(short if seen[short] == 1 else f"{short} #{seen[short]}")
    return out


def _kernel_table(kernels: "pl.DataFrame", top: int) -> "pl.DataFrame":
    import polars as pl

    head = kernels.head(top)
    shares_a = [_shares(r, "a") for r in head.iter_rows(named=True)]
    shares_b = [_shares(r, "b") for r in head.iter_rows(named=True)]
    names = short_names(head["name"].to_list())
    return head.select(
        pl.Series("name", names), pl.col("category").alias("cat"),
        pl.col("a_count").alias("n A"), pl.col("b_count").alias("n B"),
        pl.col("a_self_us").alias("A self us"), pl.col("b_self_us").alias("B self us"),
        pl.col("delta_self_us").alias("Δ self us"), (100 * pl.col("share_of_change")).alias("% chg"),
        pl.col("a_total_us").alias("A incl us"), pl.col("b_total_us").alias("B incl us"),
        pl.col("a_mean_us").alias("A incl mean"), pl.col("b_mean_us").alias("B incl mean"),
        pl.Series("A phase %", shares_a), pl.Series("B phase %", shares_b),
    )


_KERNEL_COMPACT = ["name", "n A", "n B", "A self us", "B self us", "Δ self us", "% chg"]


def _shared_notes(comparisons) -> tuple[list[str], list[list[str]]]:
    """(notes every comparison carries, with its configuration ids read as "any configuration";
    per comparison, its other notes). One comparison keeps all its notes as they are.

    Example:
        >>> from types import SimpleNamespace as C
        >>> comps = [C(a_config=c, b_config=c, notes=[f"A: no trace of {c}", "x"] if c == "c1" else [f"A: no trace of {c}"])
        ...          for c in ("c1", "c2")]
        >>> _shared_notes(comps)
        (['A: no trace of any configuration'], [['x'], []])
    """
    def generic(comp, note: str) -> str:
        for cid in sorted({c for c in (comp.a_config, comp.b_config) if c}, key=len, reverse=True):
            note = note.replace(cid, "any configuration")
        return note

    if len(comparisons) < 2:
        return [], [list(c.notes) for c in comparisons]
    per = [[generic(c, n) for n in c.notes] for c in comparisons]
    shared = [n for n in dict.fromkeys(per[0]) if all(n in p for p in per[1:])]
    own = [[n for n, g in zip(c.notes, p) if g not in shared] for c, p in zip(comparisons, per)]
    return shared, own


def _show(result, *, top: int, all_steps: bool) -> None:
    import polars as pl

    from molmo_latency.show import console, print_frame

    console.print(f"A {result.a} ({result.a_kind})    B {result.b} ({result.b_kind})", markup=False,
                  highlight=False)
    if result.conditions:
        console.print("conditions that differ between A and B (a machine change is not a code change):",
                      markup=False, highlight=False)
        for line in result.conditions:
            console.print(f"  - {line}", markup=False, highlight=False)
    elif result.a_kind == result.b_kind == "run":
        console.print("conditions: A and B recorded the same device, dtype, threads, model and versions",
                      markup=False, highlight=False)
    if result.quality:
        said = ", ".join(f"{side} {verdict}" for side, verdict in result.quality.items())
        busy = [side for side, verdict in result.quality.items() if verdict != "clean"]
        console.print(f"data quality: {said}" + (
            f": a change may be the machine's, not the code's (molmo-latency report "
            f"{' / '.join(busy)} says why)" if busy else ""), markup=False, highlight=False)
    summary = result.summary()
    if summary is not None and len(result.comparisons) > 1:
        changed = summary.filter(pl.col("verdict").is_in(["faster", "slower"]))
        console.print(f"overall: {changed.height} of {summary.height} configurations changed "
                      f"({(changed['verdict'] == 'slower').sum()} slower, {(changed['verdict'] == 'faster').sum()} "
                      "faster); details per configuration follow", markup=False, highlight=False)
        print_frame(summary.select(pl.col("a_config").alias("config A"), pl.col("b_config").alias("config B"),
                                   pl.col("a_median_ms").alias("A total ms"), pl.col("b_median_ms").alias("B total ms"),
                                   pl.col("delta_pct").alias("delta %"),
                                   pl.format("[{}, {}]", pl.col("ci_low_ms").round(2), pl.col("ci_high_ms").round(2))
                                   .alias("95% CI ms"), "verdict"),
                    "Summary: the whole request (total) per configuration, B vs A", digits=2, max_rows=10_000,
                    compact=["config A", "A total ms", "B total ms", "delta %", "verdict"])
    shared, own = _shared_notes(result.comparisons)
    for note in shared:  # said of every configuration: once, not once per configuration
        console.print(f"note (every configuration): {note}", markup=False, highlight=False, style="dim")
    legend = False
    for comp, notes in zip(result.comparisons, own):
        console.rule(f"[bold]{comp.title}[/]")
        for note in notes:
            console.print(f"note: {note}", markup=False, highlight=False, style="dim")
        if comp.phases is not None:
            steps = comp.phases.filter(pl.col("family") == "step")
            caption = "" if all_steps or not steps.height else \
                f" ({steps.height} decode steps: {_step_summary(steps)}; --steps shows them)"
            print_frame(_phase_table(comp.phases, all_steps),
                        "Phases: ms per request, delta = median(B) - median(A)" + caption, digits=3,
                        compact=_PHASE_COMPACT, max_rows=10_000)
        if comp.kernels is not None:
            what = ("GPU kernels, ranked by |change|" if comp.level == "gpu" else
                    "CPU ops (no GPU activity), ranked by |change of self time|")
            print_frame(_kernel_table(comp.kernels, top),
                        f"Kernel level ({comp.level}): {what}; us summed over the trace", digits=1,
                        max_rows=top, compact=_KERNEL_COMPACT)
            for presence, label in (("only_a", "only in A"), ("only_b", "only in B")):
                names = comp.kernels.filter(pl.col("presence") == presence)["name"].to_list()
                if names:
                    shown = ", ".join(short_names(names[:top])) + \
                        (f", ... ({len(names) - top} more)" if len(names) > top else "")
                    console.print(f"{label} ({len(names)}): {shown}", markup=False, highlight=False)
            print_frame(comp.categories.select("category", pl.col("a_count").alias("n A"),
                                               pl.col("b_count").alias("n B"), pl.col("a_us").alias("A self us"),
                                               pl.col("b_us").alias("B self us"),
                                               pl.col("delta_us").alias("Δ self us"),
                                               pl.col("a_share").alias("A share"), pl.col("b_share").alias("B share")),
                        "Per category (self time)", digits=3)
            if comp.phase_ops["a_instances"].is_not_null().any() or comp.phase_ops["b_instances"].is_not_null().any():
                print_frame(comp.phase_ops.select(
                    "phase", pl.col("a_instances").alias("ranges A"), pl.col("b_instances").alias("ranges B"),
                    pl.col("a_count_per_instance").alias("ops/range A"),
                    pl.col("b_count_per_instance").alias("ops/range B"),
                    pl.col("a_us_per_instance").alias("self us/range A"),
                    pl.col("b_us_per_instance").alias("self us/range B"),
                    pl.col("a_us").alias("A self us"), pl.col("b_us").alias("B self us")),
                    "Per phase: kernels (or ops) per range and their self time", digits=1)
            legend = True
    if legend:  # once, after every comparison
        console.print(f"legend: {LEGEND}", markup=False, highlight=False, style="dim")
    if any(c.phases is not None and (c.phases["verdict"] == "too few samples").any() for c in result.comparisons):
        console.print("too few samples: with this many repeats per side no change could be significant, "
                      "whatever its size; the reason in --json says how many repeats would do",
                      markup=False, highlight=False)
    console.print(f"verdict rule: {result.rule}", markup=False, highlight=False, style="dim")


def _step_summary(steps: pl.DataFrame) -> str:
    counts = steps.group_by("verdict").len().sort("verdict")
    return ", ".join(f"{n} {v}" for v, n in counts.iter_rows())


@app.command("diff", epilog=examples("molmo-latency diff runs/before runs/after --plot diff.png",
                                      "molmo-latency diff base.pt.trace.json.gz test.pt.trace.json.gz --normalize"))
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
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the PNG waterfall to this path (default: "
                                        "no file; diff never writes beside its inputs)"),
    no_plot: bool = typer.Option(False, "--no-plot", help="write no PNG (the default; kept for scripts)"),
    top: int = typer.Option(20, "--top", help="kernel rows shown in the terminal (JSON has all)"),
    steps: bool = typer.Option(False, "--steps", help="show every decode step row in the terminal"),
    alpha: float = typer.Option(0.05, "--alpha", help="significance level of the Mann-Whitney test (Holm)"),
    min_effect_pct: float = typer.Option(1.0, "--min-effect-pct", help="smallest change worth a verdict, "
                                         "in % of A's median"),
    resamples: int = typer.Option(2000, "--resamples", help="bootstrap resamples"),
    seed: int = typer.Option(0, "--seed", help="bootstrap seed"),
    wide: bool = typer.Option(False, "--wide", help="show every column at its natural width"),
    no_cache: bool = typer.Option(False, "--no-cache", help="read traces themselves, neither reading nor writing "
                                  "the Parquet cache (.molmo-latency-cache/ beside each trace)"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="keep the Parquet cache of the traces' "
                                             "tables in this folder (default: beside each trace, or "
                                             "$MOLMO_LATENCY_CACHE_DIR)"),
) -> None:
    """What changed from A to B, phase by phase (with noise told apart from change) and kernel by kernel."""
    from molmo_latency.show import console, print_json, set_wide
    from molmo_latency.diff import DiffError, diff
    from molmo_latency.show.waterfall import plot_waterfall

    set_wide(wide)
    if top < 1:
        raise DiffError(f"--top must be at least 1 row, got {top}")
    if not 0 < alpha < 1:
        raise DiffError(f"--alpha is a significance level between 0 and 1 (e.g. 0.05), got {alpha}")
    if min_effect_pct < 0:
        raise DiffError(f"--min-effect-pct is a percentage of A's median, 0 or more, got {min_effect_pct}")
    if resamples < 100:
        raise DiffError(f"--resamples must be at least 100 bootstrap resamples (default 2000), got {resamples}")
    if plot is not None and plot.is_dir():
        raise DiffError(f"--plot {plot} is a directory; pass a file path such as {plot / 'diff.png'}")
    result = diff(a, b, config=config, config_b=config_b, level=level, normalize=normalize, alpha=alpha,
                  min_effect_pct=min_effect_pct, resamples=resamples, seed=seed,
                  trace_cache=False if no_cache else None, cache_dir=cache_dir)
    png = None
    if plot is not None and not no_plot:
        try:
            png = plot_waterfall(result, plot)
        except OSError as exc:
            raise DiffError(f"cannot write the waterfall to {plot} ({exc.strerror or exc}); pass a --plot "
                            "path in a folder you can write") from None
    if as_json:
        print_json({**result.to_dict(), "plot": str(png) if png else None})
        return
    _show(result, top=top, all_steps=steps)
    console.print(f"waterfall: {png}" if png else "waterfall: not written (pass --plot PATH for a PNG)",
                  markup=False, highlight=False)
