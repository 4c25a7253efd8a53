"""Plots of an estimator's held-out predictions (``fit``): measured against predicted for prefill
and the whole request (parity), and decode step latency by position; written by the one PNG
writer (:func:`molmo_latency.show.png.write_png`).

Only frames and metrics come in (no estimator object), so this module imports nothing of the
estimator but the names of its outputs; :func:`write_estimator_plots` is the ``plots`` policy
that ``Estimator.save(model_dir, plots=...)`` takes.

Example:
    >>> import tempfile, pathlib
    >>> from molmo_latency.estimator import example_requests, fit_estimator
    >>> est = fit_estimator(example_requests(seed=0))
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_parity_plot(est.evaluation, est.metrics, d / "parity.png").stat().st_size > 1000
    True
    >>> write_position_plot(est.steps_evaluation, est.metrics, d / "position.png").stat().st_size > 1000
    True
    >>> write_estimator_plots(est.evaluation, est.steps_evaluation, est.metrics, d)
    {'parity_plot': 'parity.png', 'position_plot': 'decode_by_position.png'}
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from molmo_latency.estimator.features import output_names
from molmo_latency.show.png import pyplot as _pyplot
from molmo_latency.show.png import write_png

TITLES = {"prefill_total_ms": "prefill total (vision + projector + prefill)",
          "decode_total_ms": "decode total (every step)",
          "request_ms": "whole request (prefill + decode + gaps)"}
SPLITS = {"held_out_configs": "held-out configurations", "held_out_new_tokens": "held-out N (longest outputs)"}
DECADES_LOG = 10.0  # log axes when the largest value is at least this many times the smallest

PARITY_PNG = "parity.png"
POSITION_PNG = "decode_by_position.png"


def use_log_axes(values: np.ndarray) -> bool:
    """Log axes when positive values span at least a decade.

    Example:
        >>> use_log_axes(np.array([0.5, 3.0, 80.0])), use_log_axes(np.array([10.0, 30.0]))
        (True, False)
    """
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    return bool(v.size and v.max() / v.min() >= DECADES_LOG)


def _log_axes(ax) -> None:
    """Log x and y with plain numbers on the major ticks and no labels on the minor ones."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def write_parity_plot(evaluation: pl.DataFrame, metrics: dict[str, Any], path: str | Path) -> Path | None:
    """Prefill total and whole request of every held-out request (held-out configurations, and
    held-out N where present): measured (x) against predicted P50 (dots) and P95 (ticks), the
    identity line and the +-10% band; log axes when the values span a decade or more; one legend
    below the panels. Returns None (and writes nothing) when there is nothing to plot."""
    targets = [t for t in ("prefill_total_ms", "request_ms") if t in evaluation.columns]
    if evaluation.height == 0 or not targets:
        return None
    plt = _pyplot()
    splits = [s for s in SPLITS if "split" in evaluation.columns and (evaluation["split"] == s).any()] or [None]
    fig, axes = plt.subplots(len(splits), len(targets), figsize=(5.6 * len(targets), 4.9 * len(splits) + 0.4),
                             squeeze=False, layout="constrained")
    for row, split in zip(axes, splits):
        part = evaluation if split is None else evaluation.filter(pl.col("split") == split)
        m_split = (metrics.get(split) or {}) if split else {}
        for ax, t in zip(row, targets):
            p50, p95 = output_names(t)
            ok = part.filter(pl.col(t).is_not_null() & pl.col(t).is_finite() & (pl.col(t) > 0))
            y = ok[t].to_numpy()
            ax.scatter(y, ok[p95].to_numpy(), s=30, marker="_", linewidths=1.2, color="#C44E52", alpha=0.7, label="P95")
            ax.scatter(y, ok[p50].to_numpy(), s=12, alpha=0.7, color="#4C72B0", label="P50")
            if y.size:
                allv = np.concatenate([y, ok[p50].to_numpy(), ok[p95].to_numpy()])
                log = use_log_axes(allv)
                lo, hi = allv.min() * (0.8 if log else 0.9), allv.max() * (1.25 if log else 1.05)
                line = np.geomspace(lo, hi, 50) if log else np.linspace(lo, hi, 50)
                ax.plot(line, line, color="black", lw=1, label="measured = predicted")
                ax.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.15, label="+-10%")
                if log:
                    _log_axes(ax)
                ax.set_xlim(lo, hi)
                ax.set_ylim(lo, hi)
            m = (m_split.get(t) or {}).get("requests") or {}
            head = f"{TITLES.get(t, t)}" + (f"\n{SPLITS[split]}" if split else "")
            if m.get("n"):
                head += (f": MAPE {m['mape_pct']:.1f}%, P95 coverage {100 * m['coverage_p95']:.0f}% "
                         f"(n={m['n']})")
            ax.set_title(head, fontsize=9)
            ax.set_xlabel("measured ms")
            ax.set_ylabel("predicted ms")
    # one legend for every panel, below them: never on the data
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, ncol=4, frameon=False, loc="outside lower center")
    return write_png(fig, path)


NAMED_LEFT_OUT = 6  # a plot that leaves out more configurations than this names a few and counts the rest


def _left_out(keys: list[str], where: str) -> str:
    """``"not shown: a, b"`` or ``"not shown: a, b, ... and 7 more (where)"``; empty when none."""
    if not keys:
        return ""
    if len(keys) <= NAMED_LEFT_OUT:
        return "not shown: " + ", ".join(keys)
    return f"not shown: {', '.join(keys[:3])} and {len(keys) - 3} more ({where})"


def write_position_plot(steps: pl.DataFrame, metrics: dict[str, Any], path: str | Path,
                        max_configs: int = 4) -> Path | None:
    """Decode step latency by position on held-out configurations. Left: every held-out step
    relative to its predicted P50, by position (median and 10-90% band, with the predicted P95 /
    P50). Right: small multiples, one panel per held-out configuration (those with the most
    steps, spread over latency levels, at most `max_configs`; the others are named or counted in
    the title), each with the measured median and 10-90% of its requests per position (dots and
    band) against the predicted P50 (line) and P95 (dashed), so no configuration's prediction
    hides another's. Legends sit outside the axes. Returns None when there are no steps."""
    if steps.height == 0:
        return None
    plt = _pyplot()
    data = steps.filter(pl.col("split") == "held_out_configs") if "split" in steps.columns else steps
    if data.height == 0:
        data = steps
    longest = (data.group_by("config_key").agg(pl.col("step").max().alias("last"),
                                               pl.col("decode_step_p50_ms").mean().alias("level"))
               .sort(["last", "level", "config_key"], descending=[True, True, False]))
    # the configurations with the most steps, spread over latency levels
    picks = longest.filter(pl.col("last") == longest["last"].max()).sort(["level", "config_key"])
    if picks.height > max_configs:
        idx = np.unique(np.linspace(0, picks.height - 1, max_configs).round().astype(int))
        picks = picks[idx.tolist()]
    shown = picks["config_key"].to_list()
    left_out = sorted(set(longest["config_key"].to_list()) - set(shown))
    cols = 1 if len(shown) == 1 else 2
    rows = (len(shown) + cols - 1) // cols
    fig = plt.figure(figsize=(5.4 + 3.5 * cols, 2.4 + 2.4 * rows), layout="constrained")
    whole, parts = fig.subfigures(1, 2, width_ratios=[1.5, 1.0 * cols], wspace=0.03)
    ax1 = whole.subplots()
    ratio = data.with_columns((pl.col("decode_step_ms") / pl.col("decode_step_p50_ms")).alias("r"),
                              (pl.col("decode_step_p95_ms") / pl.col("decode_step_p50_ms")).alias("f95"))
    by = ratio.group_by("step").agg(pl.col("r").median().alias("med"), pl.col("r").quantile(0.1).alias("q10"),
                                    pl.col("r").quantile(0.9).alias("q90"), pl.col("f95").median().alias("f95"),
                                    pl.len().alias("n")).sort("step")
    x = by["step"].to_numpy()
    ax1.fill_between(x, by["q10"].to_numpy(), by["q90"].to_numpy(), color="#4C72B0", alpha=0.2,
                     label="measured / P50: 10-90% of the steps")
    ax1.plot(x, by["med"].to_numpy(), color="#4C72B0", lw=1.5, marker="o", ms=3,
             label="measured / P50: median")
    ax1.axhline(1.0, color="black", lw=1, label="predicted P50")
    ax1.plot(x, by["f95"].to_numpy(), color="#C44E52", lw=1.2, ls="--", label="predicted P95 / P50")
    ax1.set_xlabel("decode step (position after the prompt)")
    ax1.set_ylabel("measured / predicted P50")
    m = ((metrics.get("held_out_configs") or {}).get("decode_step_ms") or {}).get("steps") or {}
    title = f"every held-out decode step ({longest.height} configurations), relative to its prediction"
    if m.get("n"):
        title += f"\nMAPE {m['mape_pct']:.1f}%, P95 coverage {100 * m['coverage_p95']:.0f}% (n={m['n']} steps)"
    ax1.set_title(title, fontsize=9)
    whole.legend(*ax1.get_legend_handles_labels(), fontsize=7.5, ncol=2, frameon=False, loc="outside lower center")

    # each panel its own y range: a fast configuration's P50 and P95 stay apart (levels: the y ticks)
    axes = parts.subplots(rows, cols, sharex=True, squeeze=False).ravel()
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for i, (key, ax) in enumerate(zip(shown, axes)):
        c = data.filter(pl.col("config_key") == key)
        g = c.group_by("step").agg(pl.col("decode_step_ms").median().alias("med"),
                                   pl.col("decode_step_ms").quantile(0.1).alias("q10"),
                                   pl.col("decode_step_ms").quantile(0.9).alias("q90"),
                                   pl.col("decode_step_p50_ms").median().alias("p50"),
                                   pl.col("decode_step_p95_ms").median().alias("p95")).sort("step")
        n = c["request_index"].n_unique() if "request_index" in c.columns else None
        ax.fill_between(g["step"].to_numpy(), g["q10"].to_numpy(), g["q90"].to_numpy(), color="#4C72B0",
                        alpha=0.18, lw=0, label="measured: 10-90% of its requests")
        ax.scatter(g["step"].to_numpy(), g["med"].to_numpy(), s=12, color="#4C72B0", zorder=3,
                   label="measured: median")
        ax.plot(g["step"].to_numpy(), g["p50"].to_numpy(), color="#DD8452", lw=1.6, label="predicted P50")
        ax.plot(g["step"].to_numpy(), g["p95"].to_numpy(), color="#C44E52", lw=1.2, ls="--",
                label="predicted P95")
        ax.set_title(key + (f" (n={n} requests)" if n else ""), fontsize=8)
        ax.tick_params(labelsize=7.5)
        if i + cols >= len(shown):  # the lowest panel of its column
            ax.set_xlabel("decode step", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_ylabel("decode step ms", fontsize=8)
    head = (f"{len(shown)} of {longest.height} held-out configurations, one panel each\n(those with the most "
            "steps, spread over latency)")
    rest = _left_out(left_out, "in evaluation_steps.parquet and the left panel")
    parts.suptitle(head + ("\n" + "\n".join(textwrap.wrap(rest, 40 + 34 * cols)) if rest else ""), fontsize=8.5)
    parts.legend(*axes[0].get_legend_handles_labels(), fontsize=7.5, ncol=2, frameon=False,
                 loc="outside lower center")
    return write_png(fig, path)


def write_estimator_plots(evaluation: pl.DataFrame | None, steps_evaluation: pl.DataFrame | None,
                          metrics: dict[str, Any], model_dir: str | Path) -> dict[str, str | None]:
    """Both plots of a fitted estimator into `model_dir`, as ``Estimator.save``'s ``plots`` policy:
    ``{"parity_plot": file name or None, "position_plot": file name or None}`` (None: nothing to
    plot, no file)."""
    d = Path(model_dir)
    parity = None if evaluation is None else write_parity_plot(evaluation, metrics, d / PARITY_PNG)
    position = None if steps_evaluation is None else write_position_plot(steps_evaluation, metrics, d / POSITION_PNG)
    return {"parity_plot": None if parity is None else PARITY_PNG,
            "position_plot": None if position is None else POSITION_PNG}
