"""A Chrome trace drawn as a PNG (show): one row per track, each slice a bar, nested slices one
level down, counters as a line under them. It draws what the trace file holds (the file that
Perfetto and chrome://tracing open), so the picture and the file cannot disagree.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> trace = {"traceEvents": [
    ...     {"ph": "X", "name": "request[0]", "pid": 1, "tid": 1, "ts": 0.0, "dur": 100.0},
    ...     {"ph": "X", "name": "prefill", "pid": 1, "tid": 1, "ts": 10.0, "dur": 50.0},
    ...     {"ph": "X", "name": "decode[0]", "pid": 1, "tid": 1, "ts": 70.0, "dur": 20.0}]}
    >>> write_timeline_png(trace, Path(tempfile.mkdtemp()) / "t.png").stat().st_size > 1000
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from molmo_latency.show.png import pyplot as _plt
from molmo_latency.show.png import write_png

COLORS = {"request": "#D9D9D9", "vision": "#4C72B0", "projector": "#8172B2", "prefill": "#DD8452",
          "decode": "#55A868", "recompute": "#C44E52", "verify": "#937860"}


def _kind(name: str) -> str:
    return name.split("[", 1)[0]


def write_timeline_png(trace: dict[str, Any], path: Path, *, title: str | None = None) -> Path:
    """Draw the slices (``ph == "X"``) of `trace` per thread track, nesting by time, and its
    first counter track under them; times in milliseconds from the first slice."""
    plt = _plt()
    slices = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    counters = [e for e in trace.get("traceEvents", []) if e.get("ph") == "C"]
    if not slices:
        raise ValueError("the trace holds no slice to draw")
    t0 = min(e["ts"] for e in slices)
    tracks = sorted({e["tid"] for e in slices})
    span_ms = max(1e-9, (max(x["ts"] + x["dur"] for x in slices) - t0) / 1000)
    counter_name = counters[0]["name"] if counters else None
    rows = len(tracks) + (1 if counter_name else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 1.6 * len(tracks) + (1.4 if counter_name else 0) + 0.6),
                             squeeze=False, sharex=True)
    for ax, tid in zip(axes[:, 0], tracks):
        mine = sorted((e for e in slices if e["tid"] == tid), key=lambda e: (e["ts"], -e["dur"]))
        stack: list[float] = []  # end times of the open slices: depth = how many contain this one
        for e in mine:
            start, end = (e["ts"] - t0) / 1000, (e["ts"] + e["dur"] - t0) / 1000
            while stack and stack[-1] <= start + 1e-9:
                stack.pop()
            depth = len(stack)
            stack.append(end)
            kind = _kind(e["name"])
            ax.barh(-depth, end - start, left=start, height=0.8, color=COLORS.get(kind, "#999999"),
                    edgecolor="white", linewidth=0.4)
            if end - start > len(e["name"]) * span_ms / 150:  # only where the name fits inside the bar
                ax.text(start + (end - start) / 2, -depth, e["name"], ha="center", va="center", fontsize=7,
                        clip_on=True)
        ax.set_yticks([])
        ax.set_ylabel(f"thread {tid}", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    if counter_name:
        ax = axes[-1, 0]
        points = sorted(((e["ts"] - t0) / 1000, next(iter(e["args"].values()))) for e in counters
                        if e["name"] == counter_name and e.get("args"))
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="#333333")
        ax.set_ylim(bottom=0, top=max(1.0, 1.1 * max((p[1] for p in points if p[1] is not None), default=1.0)))
        ax.set_ylabel(counter_name, fontsize=7)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("ms from the first request's start")
    shown = [k for k in COLORS if any(_kind(e["name"]) == k for e in slices)]  # the kinds drawn, no others
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in shown]
    fig.legend(handles, shown, loc="upper right", fontsize=7, ncol=max(1, len(shown)), frameon=False)
    fig.suptitle(title or "Requests and their phases (the same slices Perfetto shows from the JSON)",
                 fontsize=9, x=0.01, ha="left")
    return write_png(fig, path)
