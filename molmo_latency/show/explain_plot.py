"""The ``explain`` command's PNG: decode per-token time against SM clock, coloured by max
temperature, written by the one PNG writer (:func:`molmo_latency.show.png.write_png`).

Example:
    >>> import tempfile, os
    >>> import polars as pl
    >>> from molmo_latency.explain import PHASE_MS_COLUMNS, explain
    >>> r = explain(pl.DataFrame({c: [1.0, 1.2] for c in PHASE_MS_COLUMNS}))
    >>> why_no_clock_plot(r)
    'no SM clock readings (NVML was off or unavailable, e.g. on CPU); profile on a GPU with --nvml required to get this plot'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from molmo_latency.show.png import pyplot, write_png

if TYPE_CHECKING:
    from molmo_latency.explain import Explanation

def why_no_clock_plot(result: "Explanation") -> str | None:
    """Why there is nothing to plot (None when there is)."""
    if result.decode_points.height:
        return None
    if not result.has_telemetry:
        return ("no SM clock readings (NVML was off or unavailable, e.g. on CPU); profile on a GPU "
                "with --nvml required to get this plot")
    return "no request has both a decode per-token time and an SM clock reading"


def write_decode_vs_clock_plot(result: "Explanation", path: str | os.PathLike) -> Path | None:
    """PNG of decode per-token time against SM clock, coloured by max temperature, or None (and
    no file) when there is nothing to plot (:func:`why_no_clock_plot` says why).

    Left: the time itself; right: the time over its configuration's median (so that
    configurations share an axis). Throttled requests are ringed in red.

    >>> import tempfile, os
    >>> import polars as pl
    >>> from molmo_latency.explain import PHASE_MS_COLUMNS, explain
    >>> r = explain(pl.DataFrame({c: [1.0, 1.2] for c in PHASE_MS_COLUMNS}))
    >>> write_decode_vs_clock_plot(r, os.path.join(tempfile.mkdtemp(), "x.png")) is None
    True
    """
    pts = result.decode_points
    if why_no_clock_plot(result) is not None:
        return None
    fig = pyplot().figure(figsize=(11, 4.5), layout="constrained")  # labels of the two panels never overlap
    clock = pts["sm_clock_mean_mhz"].to_numpy()
    temp = pts["temp_max_c"]
    has_temp = temp.null_count() < temp.len()
    throttled = pts["throttled"].fill_null(False).to_numpy()
    sc = None
    for i, (col, label) in enumerate((
            ("decode_per_token_ms", "decode per token (ms)"),
            ("ratio_to_config_median", "decode per token / configuration median"))):
        ax = fig.add_subplot(1, 2, i + 1)
        y = pts[col].to_numpy()
        kw: dict[str, Any] = {"s": 22, "alpha": 0.85, "edgecolors": "none"}
        if has_temp:
            temps = temp.fill_null(float("nan")).to_numpy()
            # one colour scale for both panels (and the colour bar)
            low, high = float(temp.min()), float(temp.max())
            if high - low < 1.0:  # one temperature: a 1 C wide scale centred on it, not a degenerate one
                low, high = (low + high) / 2 - 0.5, (low + high) / 2 + 0.5
            kw.update(c=temps, cmap="plasma", vmin=low, vmax=high)
        sc = ax.scatter(clock, y, **kw)
        if throttled.any():
            ax.scatter(clock[throttled], y[throttled], s=70, facecolors="none",
                       edgecolors="red", linewidths=1.2, label="throttled")
            ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.02), fontsize=8, frameon=False)  # above the data
        ax.set_xlabel("SM clock, mean over the request (MHz)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if has_temp and sc is not None:
        fig.colorbar(sc, ax=fig.axes, label="max temperature (C)", shrink=0.9)
    r2 = result.hardware.filter(pl.col("target") == "decode_per_token_ms")["r2"]
    share = "" if r2.len() == 0 or r2[0] is None else f" (hardware R\u00b2 = {r2[0]:.2f})"
    fig.suptitle(f"Decode step time against SM clock, {pts.height} requests{share}")
    return write_png(fig, path)
