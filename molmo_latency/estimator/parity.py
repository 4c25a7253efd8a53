"""Parity plot of held-out predictions (show): measured against predicted P50, with the P95.

Example:
    >>> import tempfile, pathlib
    >>> from molmo_latency.estimator import example_requests, fit_estimator
    >>> est = fit_estimator(example_requests(seed=0))
    >>> path = write_parity_plot(est.evaluation, est.metrics, pathlib.Path(tempfile.mkdtemp()) / "parity.png")
    >>> path.stat().st_size > 1000
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from molmo_latency.estimator.features import TARGETS

TITLES = {"prefill_total_ms": "prefill total (vision + projector + prefill)", "decode_per_token_ms": "decode per token"}


def write_parity_plot(evaluation: pl.DataFrame, metrics: dict[str, Any], path: str | Path) -> Path:
    """One panel per target: measured (x) against predicted P50 (dots) and P95 (ticks) of every
    held-out request, the identity line and the +-10% band; metrics in the title."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from molmo_latency.estimator.model import output_names

    targets = [t for t in TARGETS if t in evaluation.columns and output_names(t)[0] in evaluation.columns]
    fig, axes = plt.subplots(1, max(1, len(targets)), figsize=(5.5 * max(1, len(targets)), 5), squeeze=False)
    for ax, t in zip(axes[0], targets):
        p50, p95 = output_names(t)
        ok = evaluation.filter(pl.col(t).is_not_null() & pl.col(t).is_finite())
        y = ok[t].to_numpy()
        ax.scatter(y, ok[p95].to_numpy(), s=30, marker="_", linewidths=1.2, color="#C44E52", alpha=0.7, label="P95")
        ax.scatter(y, ok[p50].to_numpy(), s=12, alpha=0.7, color="#4C72B0", label="P50")
        if y.size:
            lo = min(y.min(), ok[p50].min()) * 0.9
            hi = max(y.max(), ok[p95].max()) * 1.05
            ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="measured = predicted")
            ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15,
                            label="+-10%")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        m = (metrics.get(t) or {}).get("requests") or {}
        if m:
            ax.set_title(f"{TITLES.get(t, t)}\nR^2 {m['r2']:.3f}  MAPE {m['mape_pct']:.1f}%  "
                         f"P95 coverage {100 * m['p95_coverage']:.0f}%  (n={m['n']})", fontsize=9)
        else:
            ax.set_title(TITLES.get(t, t), fontsize=9)
        ax.set_xlabel("measured ms (held-out configurations)")
        ax.set_ylabel("predicted ms")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
