"""Sweep throughput on Ray: the plain runner, one Ray worker and two Ray workers, side by side in
one run, on the tiny reference model (CPU; `--device cuda` on a GPU machine gives one worker per GPU).

    python benchmarks/sweep_ray.py                 # writes "## Sweep on Ray (issue 8)" of RESULTS.md
    python benchmarks/sweep_ray.py --repeats 5 --rounds 1 --no-write   # a quick look

Arms, rotated (A B C, then C B A, ...) so that drift and other jobs on the machine hit all alike:
  plain    run_sweep in this process, torch threads = --plain-threads (default 1, as a Ray CPU worker)
  ray x1   run_sweep_ray, workers=1 (1 CPU, 1 torch thread per worker)
  ray x2   run_sweep_ray, workers=2
The Ray arms share one local Ray (started once; its start time is reported apart). For each arm:
  steady req/s  measured requests per second between the first and the last measured request
                (model loading, Ray actor start and the first warm-ups excluded)
  end-to-end    measured requests / wall time of the whole call (model load and actors included)
  median total  the median request latency (total_ms) of the run
and, once, the median request latency of the same units measured by a SweepActor inside a bare Ray
task (no driver receiving and writing rows meanwhile) and in this process: what a Ray worker costs
a request by itself, apart from the driver's work on the same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import update_section  # noqa: E402

SWEEP = {"crops": [1, 2], "top_k": [1, 2], "blocks": [2], "prompt_tokens": [16], "new_tokens": [8],
         "warmup": 1, "seed": 0}


def one_arm(arm: str, spec, device: str, workdir: Path, plain_threads: int) -> dict:
    import polars as pl
    import torch

    from molmo_latency.scale import run_sweep_ray
    from molmo_latency.sweep import run_sweep

    stamps: list[float] = []

    def progress(p) -> None:
        if p.stage == "measure":
            stamps.append(time.perf_counter())

    out = Path(tempfile.mkdtemp(dir=workdir, prefix=arm.replace(" ", "") + "-"))
    t0 = time.perf_counter()
    if arm == "plain":
        torch.set_num_threads(plain_threads)
        result = run_sweep("tiny", spec, out, device=device, nvml="off", progress=progress)
        threads = torch.get_num_threads()
    else:
        result = run_sweep_ray("tiny", spec, out, device=device, nvml="off", workers=int(arm[-1]), progress=progress)
        threads = 1 if device == "cpu" else None
    wall = time.perf_counter() - t0
    req = pl.read_parquet(out / "requests.parquet")
    assert req.height == result["measured"] == len(spec.units()), (arm, result)
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"arm": arm, "n": result["measured"], "steady_rps": steady, "e2e_rps": result["measured"] / wall,
            "wall_s": wall, "median_total_ms": float(req["total_ms"].median()), "threads": threads,
            "workers_used": req["worker_id"].n_unique() if "worker_id" in req.columns else 1}


def worker_alone(spec) -> tuple[float, float]:
    """Median total_ms of the sweep's units measured in a loop inside a Ray task, and in-process."""
    import ray
    import torch

    from molmo_latency.scale.ray_runner import SweepActor

    def loop(actor: SweepActor) -> float:
        actor.start()
        ms = [actor.measure(c, r, i)["tables"]["requests"]["total_ms"][0] for i, (c, r) in enumerate(spec.units())]
        return statistics.median(ms)

    task = ray.remote(num_cpus=1)(lambda: loop(SweepActor("tiny", spec, nvml="off", worker_id="alone", threads=1)))
    in_ray = ray.get(task.remote())
    torch.set_num_threads(1)
    return in_ray, loop(SweepActor("tiny", spec, nvml="off", worker_id="here", threads=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=12, help="repeats per configuration (4 configurations)")
    ap.add_argument("--rounds", type=int, default=2, help="rotations of the three arms")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plain-threads", type=int, default=1, help="torch threads of the plain runner")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    import ray

    from molmo_latency.sweep import SweepSpec

    spec = SweepSpec.from_dict({**SWEEP, "repeats": args.repeats})
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    ray.init(num_cpus=2 if args.device == "cpu" else None, include_dashboard=False, logging_level="warning")
    ray_start_s = time.perf_counter() - t0
    arms = ["plain", "ray x1", "ray x2"]
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as work:
            for r in range(args.rounds):
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    row = one_arm(arm, spec, args.device, Path(work), args.plain_threads)
                    rows.append(row)
                    print(f"round {r} {arm:7s} steady {row['steady_rps']:6.2f} req/s  end-to-end "
                          f"{row['e2e_rps']:5.2f} req/s  wall {row['wall_s']:5.1f} s  median total "
                          f"{row['median_total_ms']:6.1f} ms  workers used {row['workers_used']}", flush=True)
        alone_ray_ms, alone_here_ms = worker_alone(spec)
    finally:
        ray.shutdown()
    load.append(os.getloadavg()[0])

    def med(arm: str, key: str) -> float:
        return statistics.median(x[key] for x in rows if x["arm"] == arm)

    lines = ["| arm | torch threads / worker | steady req/s (each round) | steady req/s, median | "
             "end-to-end req/s, median | wall s, median | median request total ms |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        each = ", ".join(f"{x['steady_rps']:.2f}" for x in rows if x["arm"] == arm)
        threads = next(x["threads"] for x in rows if x["arm"] == arm)
        lines.append(f"| {arm} | {threads if threads is not None else '-'} | {each} | {med(arm, 'steady_rps'):.2f} | "
                     f"{med(arm, 'e2e_rps'):.2f} | {med(arm, 'wall_s'):.1f} | {med(arm, 'median_total_ms'):.1f} |")
    speedup = med("ray x2", "steady_rps") / med("ray x1", "steady_rps")
    body = "\n".join([
        f"`python benchmarks/sweep_ray.py --repeats {args.repeats} --rounds {args.rounds} --plain-threads "
        f"{args.plain_threads}`: the tiny reference "
        f"model on {args.device}, {len(spec.configs())} configurations x {args.repeats} repeats = "
        f"{len(spec.units())} measured requests per arm (warm-up 1, NVML off), arms rotated over "
        f"{args.rounds} round(s). One local Ray (`num_cpus=2`), started once in {ray_start_s:.1f} s, "
        "serves both Ray arms.",
        "",
        *lines,
        "",
        f"Two Ray workers over one: {speedup:.2f}x the steady throughput. The same units measured in a loop "
        f"inside a bare Ray task: median request {alone_ray_ms:.1f} ms; in this process: {alone_here_ms:.1f} ms "
        "(a Ray worker by itself does not slow a request: the slower requests of the Ray arms come from what "
        "shares the cores with the workers, i.e. the driver receiving and writing rows, Ray's own processes "
        "and other jobs). Steady = measured requests per "
        "second between the first and the last measured request; end-to-end includes loading the model "
        "(and starting the Ray actors: each imports torch and loads the model). This machine has 2 CPU "
        f"cores, shared with other jobs while this ran (1-minute load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end), so the 2-worker figure is bounded by 2 cores "
        f"(and by whatever else ran); the plain runner ran with {args.plain_threads} torch thread(s), each Ray "
        "CPU worker with 1. No GPU figure: no GPU machine was available to this session.",
    ])
    print(body)
    if not args.no_write:
        update_section("Sweep on Ray (issue 8)", body)


if __name__ == "__main__":
    main()
