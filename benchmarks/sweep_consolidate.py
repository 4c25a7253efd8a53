"""Consolidation cost of a long sweep: every table rebuilt from every part (before issue 26) and
only the new parts taken in (after), side by side in one run, on the same parts.

    python benchmarks/sweep_consolidate.py                 # writes "## Sweep consolidation (issue 26)"
    python benchmarks/sweep_consolidate.py --units 1000 --every 250 --no-write   # a quick look

One real unit of the tiny reference model (requests, phases and telemetry tables as a sweep writes
them; NVML telemetry is faked with a few samples per request, as a GPU run has them) is measured
once; `--units` copies of it, each with its own configuration id, repeat and times, are written as
part files into two run directories. Every `--every` units (the parts a sweep writes between two
30 s consolidations) and at the end both arms consolidate, alternating which goes first:

  full         every table rebuilt from every part (the code before issue 26, kept here verbatim)
  incremental  RunDir.consolidate(): the consolidated table plus only the parts new since the last

Writing the parts is not timed. Both arms' tables are checked equal at the end.
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
from benchmarks._common import machine, update_section  # noqa: E402

CONFIGS = 50
TELEMETRY_SAMPLES = 20


def one_unit():
    """The tables of one measured request of the tiny model (plus fake NVML samples)."""
    import polars as pl

    from molmo_latency.sweep import SweepSpec
    from molmo_latency.sweep.runner import Worker

    spec = SweepSpec.from_dict({"crops": [2], "repeats": 1, "warmup": 1, "new_tokens": [8], "prompt_tokens": [16]})
    [(config, repeat)] = spec.units()
    with Worker.open("tiny", spec, nvml="off") as worker:
        worker.warm_up(config)
        tables = worker.measure(config, repeat, order=0)
    t0 = int(tables["phases"]["start_ns"].min())
    tables["telemetry"] = pl.DataFrame({
        "t_ns": [t0 + 1_000_000 * k for k in range(TELEMETRY_SAMPLES)], "gpu_index": [0] * TELEMETRY_SAMPLES,
        "sm_clock_mhz": [1980.0] * TELEMETRY_SAMPLES, "mem_clock_mhz": [2619.0] * TELEMETRY_SAMPLES,
        "temp_c": [55.0] * TELEMETRY_SAMPLES, "power_w": [310.5] * TELEMETRY_SAMPLES,
        "util_gpu_pct": [97.0] * TELEMETRY_SAMPLES, "throttle_reasons": [0] * TELEMETRY_SAMPLES})
    return tables


def copy_of(tables, i: int):
    import polars as pl

    config_id, repeat, shift = f"c{i % CONFIGS}-fake", i // CONFIGS, i * 1_000_000_000
    out = {"requests": tables["requests"].with_columns(pl.lit(config_id).alias("config_id"),
                                                       pl.lit(repeat, dtype=pl.Int64).alias("repeat"),
                                                       pl.lit(i, dtype=pl.Int64).alias("order")),
           "phases": tables["phases"].with_columns(pl.lit(config_id).alias("config_id"),
                                                   pl.lit(repeat, dtype=pl.Int64).alias("repeat"),
                                                   pl.col("start_ns") + shift, pl.col("end_ns") + shift),
           "telemetry": tables["telemetry"].with_columns(pl.col("t_ns") + shift)}
    return config_id, repeat, out


def full_rebuild(rd) -> dict[str, int]:
    """RunDir.consolidate before issue 26: every table read from every part, sorted, written."""
    import polars as pl

    from molmo_latency.hold.rundir import ALL_TABLES, atomic_write_parquet, read_part

    counts = {}
    for table in ALL_TABLES:
        files = sorted((rd.path / "parts" / table).glob("*.parquet"))
        if not files:
            continue
        frame = pl.concat([read_part(f) for f in files], how="diagonal_relaxed")
        for key in ("order", "start_ns", "t_ns"):
            if key in frame.columns:
                frame = frame.sort(key)
                break
        atomic_write_parquet(frame, rd.path / f"{table}.parquet")
        counts[table] = frame.height
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=5000)
    ap.add_argument("--every", type=int, default=1250, help="units written between two consolidations")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    import polars as pl

    from molmo_latency.hold import RunDir

    tables = one_unit()
    load = [os.getloadavg()[0]]
    times: dict[str, list[float]] = {"full": [], "incremental": []}
    cpu: dict[str, list[float]] = {"full": [], "incremental": []}
    at: list[int] = []
    with tempfile.TemporaryDirectory() as work:
        rds = {arm: RunDir.create_or_resume(Path(work) / arm, {"sweep_digest": "bench"}, {})[0] for arm in times}
        consolidate = {"full": full_rebuild, "incremental": lambda rd: rd.consolidate()}
        for i in range(args.units):
            unit = copy_of(tables, i)
            for rd in rds.values():
                rd.write_unit(*unit)
            if (i + 1) % args.every == 0 or i + 1 == args.units:
                at.append(i + 1)
                arms = list(times) if len(at) % 2 else list(times)[::-1]
                for arm in arms:
                    t0, c0 = time.perf_counter(), time.process_time()
                    counts = consolidate[arm](rds[arm])
                    times[arm].append(time.perf_counter() - t0)
                    cpu[arm].append(time.process_time() - c0)
                    assert counts["requests"] == i + 1, (arm, counts)
                print(f"{i + 1:6d} units: full {times['full'][-1]:6.2f} s (CPU {cpu['full'][-1]:6.2f} s), "
                      f"incremental {times['incremental'][-1]:6.2f} s (CPU {cpu['incremental'][-1]:6.2f} s)",
                      flush=True)
        for table in ("requests", "phases", "telemetry"):
            full, inc = (pl.read_parquet(rds[arm].path / f"{table}.parquet") for arm in ("full", "incremental"))
            key = {"requests": "order", "phases": "start_ns", "telemetry": "t_ns"}[table]
            assert full.sort(key, maintain_order=True).equals(inc), table
        rows = {t: pl.read_parquet(rds["incremental"].path / f"{t}.parquet").height
                for t in ("requests", "phases", "telemetry")}
    load.append(os.getloadavg()[0])

    lines = ["| units written | full rebuild: wall s | full rebuild: CPU s | incremental: wall s | "
             "incremental: CPU s |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {f:.2f} | {fc:.2f} | {i:.2f} | {ic:.2f} |"
              for n, f, fc, i, ic in zip(at, times["full"], cpu["full"], times["incremental"], cpu["incremental"])]
    lines.append(f"| **all {len(at)}** | **{sum(times['full']):.1f}** | **{sum(cpu['full']):.1f}** | "
                 f"**{sum(times['incremental']):.1f}** | **{sum(cpu['incremental']):.1f}** |")
    body = "\n".join([
        f"_Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on: {machine()}_",
        "",
        f"`python benchmarks/sweep_consolidate.py --units {args.units} --every {args.every}`: {args.units} units "
        f"(one real request of the tiny model, copied; {rows['requests']} request rows, {rows['phases']} phase "
        f"rows, {rows['telemetry']} telemetry rows at the end, {TELEMETRY_SAMPLES} fake NVML samples per "
        f"request), consolidated every {args.every} units and at the end, by both arms on identical parts, "
        "alternating which goes first.",
        "",
        *lines,
        "",
        f"The last consolidation took {times['full'][-1]:.2f} s rebuilt from every part and "
        f"{times['incremental'][-1]:.2f} s taking in the last {at[-1] - at[-2] if len(at) > 1 else at[-1]} "
        f"units' parts (median over the run: {statistics.median(times['full']):.2f} s against "
        f"{statistics.median(times['incremental']):.2f} s; CPU time, less moved by other jobs: "
        f"{cpu['full'][-1]:.2f} s against {cpu['incremental'][-1]:.2f} s for the last). Wall time includes the "
        "fsync of each atomic write. A full rebuild reads every part file (3 per unit), "
        "so it grows with the run; the incremental one reads the parts new since the last consolidation "
        "(its manifest lists the parts a table holds), reads the table back once (not even that within the "
        "sweep that wrote it) and writes the table, which grows with the run's rows, not its files. "
        f"2-core CPU machine shared with other jobs (1-minute load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end).",
    ])
    print(body)
    if not args.no_write:
        update_section("Sweep consolidation (issue 26)", body)


if __name__ == "__main__":
    main()
