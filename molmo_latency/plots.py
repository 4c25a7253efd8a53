"""PNG figures of a run report (show). matplotlib with the Agg backend: no display needed.

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

from pathlib import Path

import polars as pl


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


PHASE_COLORS = {"vision": "#4C72B0", "projector": "#8172B2", "prefill": "#DD8452",
                "decode": "#55A868", "other": "#BBBBBB"}
KNOBS = ("crops", "top_k", "blocks", "prompt_tokens", "new_tokens")
LINE_STYLES = ("-", "--", ":", "-.")


def _save(fig, path: Path) -> Path:
    import io

    from molmo_latency.hold.rundir import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # tight: the outside legend is kept
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


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
    plt = _plt()
    phases = [p for p in PHASE_COLORS if f"{p}_ms" in shares.columns]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * shares.height + 3), 4.5))
    bottom = [0.0] * shares.height
    labels = shares["config_id"].to_list()
    for p in phases:
        vals = shares[f"{p}_ms"].to_list()
        ax.bar(labels, vals, bottom=bottom, label=p, color=PHASE_COLORS[p])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("median time per request (ms)")
    ax.set_title("Where each configuration's time goes (stacked medians)")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="phase")
    return _save(fig, path)


def plot_prefill_vs_tokens(df: pl.DataFrame, path: Path) -> Path:
    """Prefill (LLM) time against input tokens, one colour per value of the knob that moves it
    most at a given token count (blocks, usually); vision+projector+prefill as open markers."""
    plt = _plt()
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
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_title("Prefill latency against input tokens" + (f", coloured by {knob}" if knob else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def line_style(i: int, cmap) -> dict:
    """Colour and dash of the i-th line: 20 colours of tab20, then the next dash pattern, so that
    up to 80 lines are each distinct.

    >>> cmap = _plt().get_cmap("tab20")
    >>> len({(tuple(s["color"]), s["linestyle"]) for s in (line_style(i, cmap) for i in range(80))})
    80
    """
    return {"color": cmap(i % cmap.N), "linestyle": LINE_STYLES[(i // cmap.N) % len(LINE_STYLES)]}


MAX_LINES_PER_PANEL = 6
MAX_PANELS = 4


def plot_decode_steps(df: pl.DataFrame, path: Path) -> Path:
    """Decode step time by position: per configuration the median over its requests, with the
    band from the 25th to the 75th percentile. Faceted by the knob that moves decode time most
    (at most MAX_PANELS panels, MAX_LINES_PER_PANEL lines each); legends outside the data."""
    plt = _plt()
    configs = df.group_by("config_id", maintain_order=True).agg(
        *[pl.col(k).first() for k in KNOBS if k in df.columns], pl.col("median_ms").median().alias("_level"))
    knob = knob_that_matters(configs, "_level") if configs.height > MAX_LINES_PER_PANEL else None
    facets = [(None, configs)] if knob is None else [
        (v, configs.filter(pl.col(knob) == v)) for v in sorted(configs[knob].drop_nulls().unique().to_list())]
    facets = facets[:MAX_PANELS]
    fig, axes = plt.subplots(len(facets), 1, figsize=(8, 3.2 * len(facets)), squeeze=False, sharex=True)
    cmap = plt.get_cmap("tab10")
    shown = 0
    for ax, (value, group) in zip(axes[:, 0], facets):
        ids = group.sort("_level")["config_id"].to_list()[:MAX_LINES_PER_PANEL]
        for i, cid in enumerate(ids):
            part = df.filter(pl.col("config_id") == cid).sort("step")
            color = cmap(i % 10)
            ax.plot(part["step"], part["median_ms"], marker=".", linewidth=1.2, color=color, label=cid)
            if "q25_ms" in part.columns:
                ax.fill_between(part["step"].to_numpy(), part["q25_ms"].to_numpy(), part["q75_ms"].to_numpy(),
                                color=color, alpha=0.18, linewidth=0)
        shown += len(ids)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("step time (ms)")
        ax.grid(True, alpha=0.3)
        if value is not None:
            ax.set_title(f"{knob} = {value}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("decode step index (KV length = input tokens + step + 1)")
    title = "Decode step time by position: median over requests, band = 25th-75th percentile"
    if shown < configs.height:
        title += f"\n({shown} of {configs.height} configurations shown; all are in the report JSON)"
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


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
        written.append(plot(frame, out_dir / name))
    return written, skipped
