"""Labels you can trust (issue 21), measured: the same small sweep of the tiny model, run quietly
with --threads 1 and again while two busy processes compete for the cores; the data-quality
verdict and the decode-step CV per configuration of each; `fit` of two runs made with different
--threads (refused, the difference named); and what recording the conditions costs per request.

    python benchmarks/conditions.py            # writes the section "Conditions and data quality (issue 21)"

Run it on a machine with nothing else running: the quiet arm is the point.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import update_section  # noqa: E402

SWEEP = {"crops": [1, 4], "top_k": [1, 2], "blocks": [2, 4], "prompt_tokens": [16], "new_tokens": [8],
         "repeats": 8, "warmup": 2, "seed": 0}
SECTION = "Conditions and data quality (issue 21)"


def _busy(stop_at: float) -> None:
    x = 0
    while time.monotonic() < stop_at:
        x += 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True,
                          timeout=1800)


def _run(out: Path, sweep: Path, threads: int, hogs: int) -> dict:
    procs = []
    if hogs:
        stop_at = time.monotonic() + 3600
        procs = [mp.Process(target=_busy, args=(stop_at,), daemon=True) for _ in range(hogs)]
        for p in procs:
            p.start()
    t0 = time.perf_counter()
    try:
        res = _cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out), "--threads", str(threads),
                   "--json")
    finally:
        for p in procs:
            p.terminate()
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"profile failed: {res.stderr[-2000:]}")
    doc = json.loads(res.stdout)
    cvs = [c["decode_step_cv_pct"] for c in doc["quality_configs"]]
    adj = [c["decode_step_cv_adjusted_pct"] for c in doc["quality_configs"] if c.get("decode_step_cv_adjusted_pct") is not None]
    ref = [c["reference_cv_pct"] for c in doc["quality_configs"] if c.get("reference_cv_pct") is not None]
    return {"wall_s": wall, "verdict": doc["quality"]["verdict"], "reasons": doc["quality"]["reasons"],
            "cv_max": max(cvs), "cv_median": statistics.median(cvs),
            "adj_max": max(adj) if adj else float("nan"), "adj_median": statistics.median(adj) if adj else float("nan"),
            "ref_median": statistics.median(ref) if ref else float("nan"),
            "contended": sum(c["contended_requests"] for c in doc["quality_configs"]),
            "configs": len(cvs)}


def _probe_cost(n: int = 20000) -> float:
    from molmo_latency.conditions import RequestProbe

    t0 = time.perf_counter_ns()
    for _ in range(n):
        RequestProbe.start(1).stop(warm=True)
    return (time.perf_counter_ns() - t0) / n / 1000


def _reference_alone(seconds: float = 10.0, block_ms: float = 25.0) -> dict:
    """The machine's own steadiness, with no model: the fixed reference workload timed back to back
    in blocks of about one tiny request (25 ms) for `seconds`: the CV of the blocks is the spread
    this host puts into any label of that length."""
    from molmo_latency.conditions import SpeedReference

    ref = SpeedReference()
    one = statistics.median(ref.time_ms() for _ in range(20))
    per_block = max(1, round(block_ms / one))
    blocks, t_end = [], time.monotonic() + seconds
    while time.monotonic() < t_end:
        blocks.append(sum(ref.time_ms() for _ in range(per_block)))
    cv = 100 * statistics.stdev(blocks) / statistics.mean(blocks)
    return {"one_ms": one, "blocks": len(blocks), "block_ms": statistics.median(blocks), "cv": cv,
            "min": min(blocks), "max": max(blocks)}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="conditions-"))
    sweep = root / "sweep.toml"
    sweep.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in SWEEP.items()) + "\n")
    alone = _reference_alone()
    quiet = _run(root / "quiet", sweep, threads=1, hogs=0)
    loaded = _run(root / "loaded", sweep, threads=1, hogs=2)
    two = _run(root / "two", sweep, threads=2, hogs=0)
    fit = _cli("fit", str(root / "quiet"), str(root / "two"), "--out", str(root / "model"))
    cost_us = _probe_cost()
    rows = [("quiet, --threads 1", quiet), ("two busy processes, --threads 1", loaded), ("quiet, --threads 2", two)]
    body = [f"`python benchmarks/conditions.py`: the tiny model, {SWEEP} ({len(SWEEP['crops']) * 4} configurations "
            f"x {SWEEP['repeats']} repeats), `molmo-latency profile ... --threads N --json`; the verdict and the "
            "per-configuration decode-step CV come from `report`'s quality judge (NoisePolicy defaults: CV 5%, "
            "drift 5%, CPU share 75%).", "",
            "| run | wall s | verdict | decode-step CV % (median / max over configurations) | same, host speed "
            "taken out (median / max) | reference workload CV % (median) | contended requests |",
            "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        body.append(f"| {name} | {r['wall_s']:.1f} | {r['verdict']} | {r['cv_median']:.1f} / {r['cv_max']:.1f} | "
                    f"{r['adj_median']:.1f} / {r['adj_max']:.1f} | {r['ref_median']:.1f} | {r['contended']} |")
    body += ["", f"The host alone, no model (`SpeedReference` timed back to back in {alone['blocks']} blocks of "
                 f"{alone['block_ms']:.1f} ms, about one tiny request, for 10 s, just before the sweeps): block time "
                 f"{alone['min']:.1f}-{alone['max']:.1f} ms, **CV {alone['cv']:.1f}%**. One reference is "
                 f"{alone['one_ms']:.2f} ms; the sweep times it before and after each request (outside the request's "
                 "timeline).",
             "", "Reasons given for the quiet `--threads 1` run:", ""] + [f"- {reason}" for reason in quiet["reasons"]]
    body += ["", "Reasons given for the loaded run:", ""] + [f"- {reason}" for reason in loaded["reasons"]]
    body += ["", f"`fit` of the `--threads 1` and `--threads 2` runs: exit {fit.returncode}: "
                 f"`{fit.stderr.strip().splitlines()[-1] if fit.stderr.strip() else ''}`", "",
             f"Recording the conditions of one request (`RequestProbe.start` + `stop`: two `getrusage`, a "
             f"process-clock read, a load read): {cost_us:.1f} us per request, against requests of milliseconds "
             "(tiny model on CPU) to seconds."]
    update_section(SECTION, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
