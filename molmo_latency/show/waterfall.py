"""PNG waterfall of a diff (``diff --plot``): from A's time to B's, one bar per phase and per
kernel category, written by the one PNG writer (:func:`molmo_latency.show.png.write_png`).

Phase panel: mean time per request (means add up: the phase bars sum exactly to the change of
the mean total; medians do not add up), titled with the change of the mean and, apart, the
tested change of the median. A bar is red or green only when its phase's verdict says the change
is significant, hatched otherwise. Kernel panel: own time of all kernels (or CPU ops), per
category, of one trace per side: nothing is tested there, so its bars are grey. At most MAX_ROWS
comparisons are drawn, those whose total changed significantly first; the title names the ones
left out. A column no comparison can fill (no trace on either side) is not drawn; the title says why.

Example:
    >>> import tempfile, pathlib
    >>> from molmo_latency.diff import diff
    >>> from molmo_latency.trace._demo import write_demo_trace
    >>> d = tempfile.mkdtemp()
    >>> t = write_demo_trace(d)
    >>> plot_waterfall(diff(t, t), pathlib.Path(d) / "w.png").stat().st_size > 0
    True
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import polars as pl

_STEPS = ("vision", "projector", "prefill", "decode", "other")
_UP, _DOWN, _ENDS = "#C44E52", "#55A868", "#4C72B0"
# kernel categories of one trace per side are not tested: no significance colours for them
_UP_UNTESTED, _DOWN_UNTESTED = "#7F7F7F", "#C7C7C7"
MAX_ROWS = 4


from molmo_latency.show.png import pyplot as _plt
from molmo_latency.show.png import write_png


def _bars(ax, labels: list[str], start: float, deltas: list[float], end: float, hatched: list[bool],
          unit: str, title: str, colors: tuple[str, str] = (_UP, _DOWN),
          bar_colors: list[str] | None = None) -> None:
    xs = list(range(len(labels) + 2))
    ax.bar(xs[0], start, color=_ENDS)
    ax.annotate(f"{start:.4g}", (xs[0], start), ha="center", va="bottom", fontsize=7)
    level = start
    for i, (d, h) in enumerate(zip(deltas, hatched), start=1):
        color = bar_colors[i - 1] if bar_colors else (colors[0] if d > 0 else colors[1])
        ax.bar(i, d, bottom=level, color=color, hatch="//" if h else None,
               edgecolor="white" if h else None)
        ax.annotate(f"{d:+.3g}", (i, level + max(d, 0)), ha="center", va="bottom", fontsize=7)
        level += d
    ax.bar(xs[-1], end, color=_ENDS)
    ax.annotate(f"{end:.4g}", (xs[-1], end), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, ["A", *labels, "B"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    levels = [start, end, *(start + sum(deltas[:i + 1]) for i in range(len(deltas)))]
    low, high = min(0.0, *levels), max(0.0, *levels)
    ax.set_ylim(low * 1.12 if low < 0 else 0.0, high * 1.15 if high > 0 else 1.0)  # from zero: sizes read true
    ax.grid(True, axis="y", alpha=0.3)


def _phase_panel(ax, phases: pl.DataFrame) -> bool:
    rows = {r["phase"]: r for r in phases.iter_rows(named=True)}
    if "total" not in rows:
        return False
    steps = [p for p in _STEPS if p in rows]
    deltas = [rows[p]["b_mean_ms"] - rows[p]["a_mean_ms"] for p in steps]
    significant = [rows[p]["verdict"] in ("faster", "slower") for p in steps]
    hatched = [not sig for sig in significant]
    bar_colors = [(_UP if d > 0 else _DOWN) if sig else (_UP_UNTESTED if d > 0 else _DOWN_UNTESTED)
                  for d, sig in zip(deltas, significant)]
    total = rows["total"]
    mean_delta = total["b_mean_ms"] - total["a_mean_ms"]
    _bars(ax, steps, total["a_mean_ms"], deltas, total["b_mean_ms"], hatched, "ms per request (mean)",
          f"phases, means (they add up): {mean_delta:+.3g} ms; total {total['verdict']} "
          f"(tested on medians: {total['delta_ms']:+.3g} ms, n={total['a_n']}/{total['b_n']})",
          bar_colors=bar_colors)
    return True


def _kernel_panel(ax, categories: pl.DataFrame, level: str | None) -> bool:
    if categories.height == 0:
        return False
    cats = categories.sort(pl.col("delta_us").abs(), descending=True)
    a_ms, b_ms = cats["a_us"].sum() / 1e3, cats["b_us"].sum() / 1e3
    what = "CPU ops (self time)" if level == "cpu_op" else "GPU kernels"
    _bars(ax, cats["category"].to_list(), a_ms, [d / 1e3 for d in cats["delta_us"].to_list()], b_ms,
          [False] * cats.height, "ms (sum over the trace)",
          f"{what} by category: one trace per side, not tested (grey)", colors=(_UP_UNTESTED, _DOWN_UNTESTED))
    return True


def _drawing_order(comps: list) -> list:
    """Comparisons in the order they are drawn: those whose total changed significantly first,
    then the rest, each by the size of the tested change of the total (|delta %|, largest first);
    a comparison without phases last, in its own order."""
    def key(item):
        i, comp = item
        total = None if comp.phases is None else comp.phases.filter(pl.col("phase") == "total")
        if total is None or total.height == 0:
            return (2, 0.0, i)
        row = total.row(0, named=True)
        size = abs(row.get("delta_pct") or 0.0)
        return (0 if row["verdict"] in ("faster", "slower") else 1, -size, i)

    return [c for _, c in sorted(enumerate(comps), key=key)]


def plot_waterfall(result, path: str | Path) -> Path:
    """Write the waterfall of a :class:`~molmo_latency.diff.DiffResult` to `path` (PNG): at most
    MAX_ROWS comparisons (the changed ones first, then the largest changes; the others named), a
    phase column and a kernel column, a column that no comparison can fill left out and said why
    in the title."""
    plt = _plt()
    drawable = _drawing_order([c for c in result.comparisons if c.phases is not None or c.categories is not None])
    comps = drawable[:MAX_ROWS]
    why = ("no phases on both sides (needs run directories or profile_phases traces)",
           "no trace on both sides: no kernel level (record one with --kineto)")
    kinds = [k for k, has in enumerate((any(c.phases is not None for c in comps),
                                        any(c.categories is not None and c.categories.height for c in comps))) if has]
    kinds = kinds or [0, 1]
    rows = max(1, len(comps))
    fig, axes = plt.subplots(rows, len(kinds), figsize=(6.5 * len(kinds) + (1 if len(kinds) == 1 else -1),
                                                         3.4 * rows + 0.8), squeeze=False, layout="constrained")
    for row, comp in zip(axes, comps):
        drawn = {0: comp.phases is not None and _phase_panel(row[kinds.index(0)], comp.phases) if 0 in kinds else None,
                 1: comp.categories is not None and _kernel_panel(row[kinds.index(1)], comp.categories, comp.level)
                 if 1 in kinds else None}
        for kind in kinds:
            if not drawn[kind]:
                ax = row[kinds.index(kind)]
                ax.axis("off")
                ax.text(0.5, 0.5, why[kind], ha="center", va="center", fontsize=9)
        if len(comps) > 1:
            row[0].set_title(f"{comp.title}: " + row[0].get_title(), fontsize=9, wrap=True)
    if not comps:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][0].text(0.5, 0.5, "nothing to compare", ha="center")
    left_out = [c.title for c in drawable[len(comps):]]
    title = "Where the time went, A -> B" + (f": {comps[0].title}" if len(comps) == 1 else "")
    note = ""
    if left_out:
        names = ", ".join(left_out[:4]) + (f" and {len(left_out) - 4} more" if len(left_out) > 4 else "")
        note = (f"\n{len(comps)} of {len(drawable)} comparisons drawn (significant changes of the total first, "
                f"then the largest); not drawn: {names} (all in --json)")
    missing = "".join(f"\n{why[k]}" for k in (0, 1) if k not in kinds and comps)
    key = ("phases: red slower, green faster (significant); grey hatched: no significant change or too few samples"
           + ("; kernels: grey, not tested" if 1 in kinds else ""))
    width = 75 if len(kinds) == 1 else 140
    lines = [title, *textwrap.wrap(key, width), *missing.splitlines()[1:], *textwrap.wrap(note.strip(), width)]
    fig.suptitle("\n".join(lines), fontsize=9)
    return write_png(fig, path)
