"""PNG figures of a ``detail="modules"`` run (show): where the time goes inside each phase.
One renderer each, all written by the one PNG writer (:func:`molmo_latency.show.png.write_png`):

- :func:`plot_module_stacks`: per configuration, the mean request's vision / projector /
  prefill / decode time, each split into module kinds (``module_stacks`` of the report);
- :func:`plot_module_knobs`: attention / FFN / MoE router / experts per prefill and per decode
  step against top-k and active blocks (``modules`` of the report, medians);
- :func:`plot_flops_vs_wall`: FLOPs against measured time per phase instance and module kind,
  with lines of constant achieved FLOP/s (``modules`` of the report).

Example:
    >>> import tempfile
    >>> written, skipped = write_module_plots({"modules": pl.DataFrame(), "module_stacks": pl.DataFrame()},
    ...                                       Path(tempfile.mkdtemp()))
    >>> written, [name for name, _ in skipped]
    ([], ['module_stacks.png', 'modules_vs_knobs.png', 'flops_vs_wall.png'])
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from molmo_latency.show.png import pyplot as _plt
from molmo_latency.show.png import write_png
from molmo_latency.show.report_plots import NothingToShow

KIND_COLORS = {"vision_block": "#4C72B0", "projector": "#8172B2", "attention": "#DD8452", "mlp": "#C44E52",
               "moe_router": "#937860", "moe_experts": "#55A868", "norm": "#DA8BC3", "lm_head": "#8C8C8C",
               "other": "#DDDDDD"}
PHASES = ("vision", "projector", "prefill", "decode")
FFN_KINDS = ("attention", "mlp", "moe_router", "moe_experts")


def plot_module_stacks(stacks: pl.DataFrame, path: Path) -> Path:
    """One panel per phase, one bar per configuration: the phase's mean time per request split
    into its module kinds (decode: all steps of the request)."""
    plt = _plt()
    phases = [p for p in PHASES if p in set(stacks["phase"].to_list())]
    configs = stacks["config_id"].unique(maintain_order=True).to_list()
    n = dict(stacks.select("config_id", "n").unique("config_id").rows())
    cols = min(2, len(phases))
    rows = (len(phases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(6, cols * (0.42 * len(configs) + 1.8)), 3.6 * rows + 0.8),
                             squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(phases):]:
        ax.set_visible(False)
    seen: dict[str, object] = {}
    for ax, phase in zip(flat, phases):
        part = stacks.filter(pl.col("phase") == phase)
        bottom = [0.0] * len(configs)
        for kind in [k for k in KIND_COLORS if k in set(part["module_kind"].to_list())]:
            values = dict(part.filter(pl.col("module_kind") == kind).select("config_id", "mean_ms").rows())
            heights = [values.get(c, 0.0) for c in configs]
            bars = ax.bar(range(len(configs)), heights, bottom=bottom, color=KIND_COLORS[kind], width=0.7,
                          edgecolor="white", linewidth=0.3)
            seen.setdefault(kind, bars)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(phase + (" (all steps)" if phase == "decode" else ""), fontsize=9)
        ax.set_xticks(range(len(configs)), [f"{c} (n={n[c]})" for c in configs], rotation=60, ha="right",
                      fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel("ms per request (mean)", fontsize=8)
    order = [k for k in KIND_COLORS if k in seen]
    fig.legend([seen[k] for k in order], order, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
               title="module kind")
    fig.suptitle("Inside each phase: the mean request of each configuration, by module kind "
                 "(other = the phase outside every module)", fontsize=9)
    fig.tight_layout()
    return write_png(fig, path)


def plot_module_knobs(modules: pl.DataFrame, path: Path) -> Path:
    """Median ms per prefill and per decode step of attention, MLP, MoE router and experts,
    against each knob that takes several values (top-k, active blocks), the other knobs pooled
    (median over their configurations)."""
    knobs = [k for k in ("top_k", "blocks") if k in modules.columns and modules[k].drop_nulls().n_unique() > 1]
    if not knobs:
        raise NothingToShow("top_k and blocks take one value each in this run (sweep them to see the split move)")
    plt = _plt()
    phases = [p for p in ("prefill", "decode") if p in set(modules["phase"].to_list())]
    fig, axes = plt.subplots(len(phases), len(knobs), figsize=(4.6 * len(knobs) + 1.5, 3.3 * len(phases)),
                             squeeze=False)
    handles: dict[str, object] = {}
    for i, phase in enumerate(phases):
        for j, knob in enumerate(knobs):
            ax = axes[i][j]
            part = modules.filter((pl.col("phase") == phase) & pl.col("module_kind").is_in(FFN_KINDS)
                                  & pl.col(knob).is_not_null())
            per = part.group_by(knob, "module_kind").agg(pl.col("median_ms").median()).sort(knob)
            for kind in [k for k in FFN_KINDS if k in set(per["module_kind"].to_list())]:
                line = per.filter(pl.col("module_kind") == kind)
                (h,) = ax.plot(line[knob].to_list(), line["median_ms"].to_list(), marker="o",
                               color=KIND_COLORS[kind])
                handles.setdefault(kind, h)
            ax.set_xlabel(knob)
            ax.set_xticks(sorted(per[knob].unique().to_list()))
            ax.set_ylabel(f"ms per {'prefill' if phase == 'prefill' else 'decode step'} (median)")
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
               title="module kind")
    fig.suptitle("Attention, FFN and MoE time against top-k and active blocks (other knobs pooled: median)",
                 fontsize=9)
    fig.tight_layout()
    return write_png(fig, path)


def plot_flops_vs_wall(modules: pl.DataFrame, path: Path) -> Path:
    """Per configuration, phase and module kind with known FLOPs: FLOPs per instance (median)
    against its median time, log-log, with dotted lines of constant achieved FLOP/s."""
    part = modules.filter(pl.col("flops_median").is_not_null() & (pl.col("median_ms") > 0)
                          & (pl.col("flops_median") > 0))
    if part.height == 0:
        raise NothingToShow("no module kind with known FLOPs (FLOPs are modelled for the LLM phases only)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"prefill": "s", "decode": "o"}
    for (phase, kind), group in part.group_by("phase", "module_kind", maintain_order=True):
        ax.scatter(group["flops_median"].to_list(), group["median_ms"].to_list(), s=28, alpha=0.8,
                   marker=markers.get(phase, "^"), color=KIND_COLORS.get(kind, "black"), label=f"{phase}: {kind}")
    lo, hi = float(part["flops_median"].min()) / 2, float(part["flops_median"].max()) * 2
    ms_lo, ms_hi = float(part["median_ms"].min()) / 2, float(part["median_ms"].max()) * 2
    for rate in (1e8, 1e9, 1e10, 1e11, 1e12):
        xs = [lo, hi]
        ys = [x / rate * 1e3 for x in xs]
        if ys[1] < ms_lo or ys[0] > ms_hi:
            continue
        ax.plot(xs, ys, ":", color="grey", linewidth=0.8)
        x_label = min(hi, ms_hi * 0.7 / 1e3 * rate)  # where the line leaves the plot (top or right)
        ax.annotate(f"{rate / 1e9:g} GFLOP/s", (x_label, x_label / rate * 1e3), fontsize=7, color="grey",
                    ha="right", va="bottom", annotation_clip=True)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(ms_lo, ms_hi)
    ax.set_xlabel("FLOPs per phase instance (matrix products, from the config and the shapes fed)")
    ax.set_ylabel("measured ms per phase instance (median)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    ax.set_title("FLOPs against wall-clock: one point per configuration, phase and module kind\n"
                 "(dotted: constant achieved FLOP/s; points far below the FLOPs trend are not compute-bound)",
                 fontsize=9)
    return write_png(fig, path)


def write_module_plots(report: dict[str, pl.DataFrame], out_dir: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The module figures in `out_dir`: (written paths, [(file name, why it was not written)])."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    skipped: list[tuple[str, str]] = []
    jobs = (("module_stacks.png", report["module_stacks"], plot_module_stacks),
            ("modules_vs_knobs.png", report["modules"], plot_module_knobs),
            ("flops_vs_wall.png", report["modules"], plot_flops_vs_wall))
    for name, frame, plot in jobs:
        if frame.height == 0:
            skipped.append((name, "no valid request with module times"))
            continue
        try:
            written.append(plot(frame, out_dir / name))
        except NothingToShow as why:
            skipped.append((name, str(why)))
    return written, skipped
