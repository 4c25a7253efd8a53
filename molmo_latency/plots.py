"""PNG figures of a run report (show). matplotlib with the Agg backend: no display needed."""

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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prefill_vs_tokens(df: pl.DataFrame, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(df["input_tokens"], df["prefill_ms"], s=12, alpha=0.7, label="prefill (LLM)")
    ax.scatter(df["input_tokens"], df["prefill_total_ms"], s=12, alpha=0.7, label="vision+projector+prefill")
    ax.set_xlabel("input tokens (image + text)")
    ax.set_ylabel("ms")
    ax.set_title("Prefill latency against input tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LINE_STYLES = ("-", "--", ":", "-.")


def line_style(i: int, cmap) -> dict:
    """Colour and dash of the i-th line: 20 colours of tab20, then the next dash pattern, so that
    up to 80 lines are each distinct.

    >>> cmap = _plt().get_cmap("tab20")
    >>> len({(tuple(s["color"]), s["linestyle"]) for s in (line_style(i, cmap) for i in range(80))})
    80
    """
    return {"color": cmap(i % cmap.N), "linestyle": LINE_STYLES[(i // cmap.N) % len(LINE_STYLES)]}


def plot_decode_steps(df: pl.DataFrame, path: Path, max_lines: int = 40) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    configs = df["config_id"].unique(maintain_order=True).to_list()
    cmap = plt.get_cmap("tab20")
    for i, cid in enumerate(configs[:max_lines]):
        part = df.filter(pl.col("config_id") == cid)
        ax.plot(part["step"], part["median_ms"], marker=".", linewidth=1, label=cid, **line_style(i, cmap))
    ax.set_xlabel("decode step index (KV length = input tokens + step + 1)")
    ax.set_ylabel("median step time (ms)")
    title = "Decode step time against step index"
    if len(configs) > max_lines:
        title += f" (first {max_lines} of {len(configs)} configurations)"
    ax.set_title(title, fontsize=10)
    if configs:
        ax.legend(fontsize=5 if len(configs) > 20 else 6, ncol=2 if len(configs) <= 20 else 3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report_plots(report: dict[str, pl.DataFrame], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_phase_shares(report["shares"], out_dir / "phase_shares.png"),
        plot_prefill_vs_tokens(report["prefill_vs_tokens"], out_dir / "prefill_vs_input_tokens.png"),
        plot_decode_steps(report["decode_steps"], out_dir / "decode_step_vs_index.png"),
    ]
