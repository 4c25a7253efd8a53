"""PNG figures of a run report (``profile`` and ``report``), written by the one PNG writer
(:func:`molmo_latency.show.png.write_png`).

Every figure has its legend outside the data; a figure with nothing to show is not written (the
caller gets the reason instead of a blank image).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> empty = {"shares": pl.DataFrame(), "prefill_vs_tokens": pl.DataFrame(), "decode_steps": pl.DataFrame()}
    >>> written, skipped = write_report_plots(empty, Path(tempfile.mkdtemp()))
    >>> written, [name for name, _ in skipped]
    ([], ['phase_shares.png', 'prefill_vs_input_tokens.png', 'decode_step_vs_index.png'])
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import polars as pl

from molmo_latency.show.png import pyplot as _plt
from molmo_latency.show.png import write_png


class NothingToShow(Exception):
    """A figure that would show nothing (the message says why); it is skipped, not drawn."""


PHASE_COLORS = {"vision": "#4C72B0", "projector": "#8172B2", "prefill": "#DD8452",
                "decode": "#55A868", "other": "#BBBBBB"}
KNOBS = ("crops", "top_k", "blocks", "prompt_tokens", "new_tokens")
LINE_STYLES = ("-", "--", ":", "-.")


def knob_that_matters(df: pl.DataFrame, value: str, knobs=KNOBS) -> str | None:
    """The knob whose values move the median of `value` the most (the spread of its group
    medians, relative to the overall median), among knobs with more than one value.

    >>> df = pl.DataFrame({"blocks": [2, 2, 4, 4], "top_k": [1, 2, 1, 2], "ms": [1.0, 1.1, 2.0, 2.1]})
    >>> knob_that_matters(df, "ms")
    'blocks'
    """
    best, spread = None, 0.0
    for knob in knobs:
        if knob not in df.columns or df[knob].n_unique() < 2:
            continue
        medians = df.group_by(knob).agg(pl.col(value).median())[value].drop_nulls()
        if medians.len() < 2:
            continue
        s = float(medians.max() - medians.min())
        if s > spread:
            best, spread = knob, s
    return best


def plot_phase_shares(shares: pl.DataFrame, path: Path) -> Path:
    """The median request of each configuration: bar height = the median whole request, split
    by the phases' shares (of their medians), whisker = its 25th-75th percentile, n under each
    bar. (Stacking the phases' own medians would draw a request nobody measured.)"""
    plt = _plt()
    phases = [p for p in PHASE_COLORS if f"{p}_share" in shares.columns]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * shares.height + 3), 4.8))
    height = (shares["total_median_ms"] if "total_median_ms" in shares.columns
              else sum(shares[f"{p}_ms"] for p in phases)).to_list()
    n = shares["n"].to_list() if "n" in shares.columns else [None] * shares.height
    labels = [f"{c}\n(n={k})" if k is not None else c for c, k in zip(shares["config_id"].to_list(), n)]
    x = list(range(shares.height))
    bottom = [0.0] * shares.height
    for p in phases:
        vals = [h * s for h, s in zip(height, shares[f"{p}_share"].fill_null(0.0).to_list())]
        ax.bar(x, vals, bottom=bottom, label=p, color=PHASE_COLORS[p], width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if "total_q25_ms" in shares.columns:
        lo = [h - q for h, q in zip(height, shares["total_q25_ms"].to_list())]
        hi = [q - h for h, q in zip(height, shares["total_q75_ms"].to_list())]
        ax.errorbar(x, height, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, linewidth=1,
                    label="25th-75th percentile")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms per request")
    ax.set_ylim(bottom=0)
    ax.set_title("The median request per configuration, split by phase share")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="phase")
    return write_png(fig, path)


def plot_prefill_vs_tokens(df: pl.DataFrame, path: Path) -> Path:
    """Prefill (LLM) time against input tokens, one colour per value of the knob that moves it
    most at a given token count (blocks, usually); vision+projector+prefill as open markers."""
    plt = _plt()
    if df["input_tokens"].n_unique() < 2:
        raise NothingToShow(f"every request has {df['input_tokens'][0]} input tokens: one shape, no trend "
                            "to draw (vary crops or prompt_tokens)")
    per_token = df.with_columns((pl.col("prefill_ms") / pl.col("input_tokens")).alias("_ms_per_token"))
    knob = knob_that_matters(per_token, "_ms_per_token", tuple(k for k in KNOBS if k != "crops"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = [(None, df)] if knob is None else [
        (v, df.filter(pl.col(knob) == v)) for v in sorted(df[knob].drop_nulls().unique().to_list())]
    cmap = plt.get_cmap("viridis" if len(groups) > 10 else "tab10")
    for i, (value, part) in enumerate(groups):
        color = cmap(i / max(1, len(groups) - 1)) if len(groups) > 10 else cmap(i)
        label = "prefill" if knob is None else f"{knob} = {value}"
        ax.scatter(part["input_tokens"], part["prefill_ms"], s=16, alpha=0.8, color=color, label=label)
        ax.scatter(part["input_tokens"], part["prefill_total_ms"], s=16, alpha=0.5, facecolors="none",
                   edgecolors=[color])
    ax.scatter([], [], s=16, facecolors="none", edgecolors="grey", label="vision+projector+prefill")
    ax.set_xlabel("input tokens (image + text)")
    values = pl.concat([df["prefill_ms"], df["prefill_total_ms"]]).drop_nulls()
    values = values.filter(values > 0)
    if values.len() and float(values.max()) / float(values.min()) > 30:  # spans decades: one outlier
        ax.set_yscale("log")                                             # must not squash the rest
        ax.set_ylabel("ms (log scale)")
    else:
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
    ax.set_title("Prefill latency against input tokens" + (f", coloured by {knob}" if knob else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return write_png(fig, path)


def line_style(i: int, cmap) -> dict:
    """Colour and dash of the i-th line: the colours of `cmap`, then the next dash pattern, so
    that up to 4 x cmap.N lines are each distinct.

    >>> cmap = _plt().get_cmap("tab10")
    >>> len({(tuple(s["color"]), s["linestyle"]) for s in (line_style(i, cmap) for i in range(40))})
    40
    """
    return {"color": cmap(i % cmap.N), "linestyle": LINE_STYLES[(i // cmap.N) % len(LINE_STYLES)]}


MAX_LINES_PER_PANEL = 6
MAX_PANELS = 4


def _spread_picks(group: pl.DataFrame, k: int) -> list[str]:
    """At most `k` configurations of `group` (``config_id``, ``_level``, ``_last``): those with
    the most decode steps (spread evenly over their latency levels, in level order), then the
    shorter ones (longest first) when there are fewer than `k` of them.

    >>> g = pl.DataFrame({"config_id": list("abcdef"), "_level": [1.0, 2, 3, 4, 5, 6], "_last": [9, 9, 9, 9, 2, 9]})
    >>> _spread_picks(g, 3), _spread_picks(g, 6)
    (['a', 'c', 'f'], ['a', 'b', 'c', 'd', 'f', 'e'])
    """
    ordered = group.sort(["_last", "_level"], descending=[True, False])
    longest = ordered.filter(pl.col("_last") == ordered["_last"].max())
    if longest.height >= k:
        idx = sorted({round(i * (longest.height - 1) / max(1, k - 1)) for i in range(k)})
        return longest["config_id"].gather(idx).to_list()
    return ordered["config_id"].to_list()[:k]


def plot_decode_steps(df: pl.DataFrame, path: Path) -> Path:
    """Decode step time by position: per configuration the median over its requests, with the
    band from the 25th to the 75th percentile. Faceted by the knob that moves decode time most
    (at most MAX_PANELS panels, MAX_LINES_PER_PANEL lines each: the configurations with the most
    steps, spread over latency; the others named in the title); legends outside the data."""
    plt = _plt()
    configs = df.group_by("config_id", maintain_order=True).agg(
        *[pl.col(k).first() for k in KNOBS if k in df.columns], pl.col("median_ms").median().alias("_level"),
        pl.col("step").max().alias("_last"))
    knob = knob_that_matters(configs, "_level") if configs.height > MAX_LINES_PER_PANEL else None
    facets = [(None, configs)] if knob is None else [
        (v, configs.filter(pl.col(knob) == v)) for v in sorted(configs[knob].drop_nulls().unique().to_list())]
    facets = facets[:MAX_PANELS]
    fig, axes = plt.subplots(len(facets), 1, figsize=(9, 3.2 * len(facets)), squeeze=False, sharex=True,
                             layout="constrained")  # the wrapped title and outside legends get their room
    cmap = plt.get_cmap("tab10")  # distinct neighbours (tab20 pairs light and dark of one hue)
    shown_ids: list[str] = []
    for ax, (value, group) in zip(axes[:, 0], facets):
        ids = _spread_picks(group, MAX_LINES_PER_PANEL)
        for cid in ids:
            style = line_style(len(shown_ids), cmap)  # one colour per configuration in the whole figure
            shown_ids.append(cid)
            part = df.filter(pl.col("config_id") == cid).sort("step")
            n = int(part["n"].min()) if "n" in part.columns else None
            ax.plot(part["step"], part["median_ms"], marker=".", linewidth=1.3, label=cid + (f" (n={n})" if n else ""),
                    **style)
            if "q25_ms" in part.columns:
                ax.fill_between(part["step"].to_numpy(), part["q25_ms"].to_numpy(), part["q75_ms"].to_numpy(),
                                color=style["color"], alpha=0.10, linewidth=0)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("step time (ms)")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
        if value is not None:
            ax.set_title(f"{knob} = {value}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("decode step index (KV length = input tokens + step + 1)")
    title = "Decode step time by position: median over requests, band = 25th-75th percentile"
    left_out = [c for c in configs["config_id"].to_list() if c not in shown_ids]
    if left_out:
        names = ", ".join(left_out[:6]) + (f" and {len(left_out) - 6} more" if len(left_out) > 6 else "")
        title += "\n" + "\n".join(textwrap.wrap(
            f"{len(shown_ids)} of {configs.height} configurations shown (per panel the longest outputs, spread over "
            f"latency); not shown: {names} (all are in --json)", 150))
    fig.suptitle(title, fontsize=9)
    return write_png(fig, path)


def write_report_plots(report: dict[str, pl.DataFrame], out_dir: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The report's PNGs in `out_dir`: (written paths, [(file name, why it was not written)])."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    skipped: list[tuple[str, str]] = []
    jobs = (
        ("phase_shares.png", report["shares"], plot_phase_shares, "no valid request to take phase medians of"),
        ("prefill_vs_input_tokens.png", report["prefill_vs_tokens"], plot_prefill_vs_tokens,
         "no valid request with input tokens and a prefill time"),
        ("decode_step_vs_index.png", report["decode_steps"], plot_decode_steps,
         "no decode steps (new_tokens = 1, or no valid request)"),
    )
    for name, frame, plot, why in jobs:
        if frame.height == 0:
            skipped.append((name, why))
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            written.append(plot(frame, out_dir / name))
        except NothingToShow as why_not:
            skipped.append((name, str(why_not)))
    if "modules" in report:  # a detail="modules" run: inside the phases
        from molmo_latency.show.module_plots import write_module_plots

        more, why = write_module_plots(report, out_dir)
        written += more
        skipped += why
    return written, skipped
