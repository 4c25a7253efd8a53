"""Trace reading (issue 3): read one big Kineto trace and break its GPU time down per kernel,
with molmo-latency and with Holistic Trace Analysis 0.5.0 (the peer), in one run.

    python benchmarks/trace_read.py                          # 60 and 120 MB traces, write RESULTS.md
    python benchmarks/trace_read.py --size-mb 60 --runs 5 --hta-runs 2 --no-write
    python benchmarks/trace_read.py --summary-process        # issue 15: `trace summary` of a 54 MB
                                                             # trace as a whole process, beside HTA
    python benchmarks/trace_read.py --scale --lock /work/bench.lock   # issue 29: 54 MB, 500 MB, 2 GB:
                      # first read, cached read, gzip, memory; HTA beside

Each trace (not committed) is built in a temporary directory from the real traces in
tests/data/kineto (HTA's test data): their events replicated one after another in time, with
correlation / External id / flow ids shifted per copy, into one valid newer-layout trace
(``baseTimeNanoseconds``, fractional microseconds), written the way Kineto writes it.

Every measurement runs in its own fresh subprocess and times, after the imports:
  ours     ``read_kineto(path)`` + ``kernel_breakdown(trace.gpu)``; run twice over: with only the
           reader's modules imported (``molmo_latency/__init__`` skipped), and through
           ``import molmo_latency.trace`` as a user would (the package imports torch lazily, only
           for the profiler, so this should match);
  HTA      ``TraceAnalysis(trace_dir=...)`` + ``get_gpu_kernel_breakdown(visualize=False,
           num_kernels=10**9, duration_ratio=1.0)``, with the Python of a separate venv
           (``python -m venv --system-site-packages /tmp/hta-venv`` + ``pip install
           holistictraceanalysis==0.5.0``; created when missing).
Reported: wall and CPU seconds, MB/s of uncompressed JSON (1 MB = 1e6 bytes), peak RSS
(``ru_maxrss``) and RSS before the read; the speed-up is HTA's median wall time over ours.
Both breakdowns are cross-checked: the same kernel names with the same totals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "kineto"
SOURCES = [
    "nccl_training.json.gz",
    "training_sampled_rank0.json.gz",
    "alexnet_a100_forward.json.gz",
    "amd_mi250_minitoy.json.gz",
    "event_sync_multi_stream.json.gz",
    "triton_single_kernel.json.gz",
]
HTA_VENV = Path("/tmp/hta-venv")
HTA_VERSION = "0.5.0"
BASE_TIME_NS = 1_700_000_000_000_000_000
START_US = 4_400_000_000_000  # like Kineto's relative ts: well below 2**43 us
ID_STRIDE = 10_000_000
SECTION = "Trace reading (issue 3)"
SUMMARY_SECTION = "trace summary as a whole process (issue 15)"
SCALE_SECTION = "Trace reading at scale: first read, cached read, memory (issue 29)"


# ------------------------------------------------------------------------------------------
# The trace.


def _load(name: str) -> dict:
    import gzip

    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        return json.load(f, parse_float=Decimal)


def build_trace(path: Path, target_bytes: int) -> dict:
    """Write a Kineto trace of at least `target_bytes` made of copies of the shared traces."""
    sources = []
    for name in SOURCES:
        doc = _load(name)
        base = doc.get("baseTimeNanoseconds", 0)
        events = [e for e in doc["traceEvents"] if isinstance(e.get("ts"), (int, Decimal))]
        start = min(base + int(Decimal(e["ts"]) * 1000) for e in events)
        end = max(base + int((Decimal(e["ts"]) + Decimal(e.get("dur", 0) or 0)) * 1000) for e in events)
        sources.append((name, doc, base, start, end))
    device_properties = sources[0][1].get("deviceProperties", [])
    cursor_ns = START_US * 1000
    written, copies, n_events = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        head = json.dumps({"schemaVersion": 1, "deviceProperties": device_properties,
                           "distributedInfo": {"backend": "nccl", "rank": 0, "world_size": 1}}, default=float)
        f.write(head[:-1] + ',\n  "traceEvents": [\n')
        written += len(head) + 20
        first = True
        while written < target_bytes:
            for name, doc, base, start, end in sources:
                shift_ids = copies * ID_STRIDE
                for event in doc["traceEvents"]:
                    if not isinstance(event.get("ts"), (int, Decimal)):
                        continue
                    if event.get("ph") == "M" and copies:
                        continue  # process / thread names once
                    e = dict(event)
                    ns = base + int(Decimal(e["ts"]) * 1000) - start + cursor_ns
                    e["ts"] = float(Decimal(ns) / 1000)  # <= 3 decimals, exact as a double here
                    if isinstance(e.get("dur"), Decimal):
                        e["dur"] = float(e["dur"])
                    if isinstance(e.get("id"), int):
                        e["id"] += shift_ids
                    args = e.get("args")
                    if isinstance(args, dict):
                        args = dict(args)
                        for key in ("correlation", "External id"):
                            if isinstance(args.get(key), int) and args[key] > 0:
                                args[key] += shift_ids
                        e["args"] = args
                    text = json.dumps(e, default=float)
                    f.write(("" if first else ",\n") + "  " + text)
                    first = False
                    written += len(text) + 4
                    n_events += 1
                cursor_ns += end - start + 1_000_000
                copies += 1
        f.write('\n  ],\n  "traceName": "trace_read_benchmark.json",\n  "displayTimeUnit": "ms",\n'
                f'  "baseTimeNanoseconds": {BASE_TIME_NS}\n}}\n')
    return {"events": n_events, "copies": copies, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------
# Workers (each in its own process).


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def worker_ours(path: str, isolated: bool, out: str | None) -> dict:
    t0 = time.perf_counter()
    if isolated:  # the reader's modules only: skip molmo_latency/__init__ (it imports torch)
        import types

        package = types.ModuleType("molmo_latency")
        package.__path__ = [str(ROOT / "molmo_latency")]
        sys.modules["molmo_latency"] = package
    sys.path.insert(0, str(ROOT))
    import warnings

    from molmo_latency.trace.attribution import kernel_breakdown
    from molmo_latency.trace.reader import read_kineto

    import polars as pl

    import_s = time.perf_counter() - t0
    # polars starts its thread pool (and allocator arenas) on the first parallel operation: a fixed
    # ~10 MB that does not grow with the trace; start it here so "before the read" includes it.
    pl.DataFrame({"a": list(range(100_000))}).with_columns(b=pl.col("a") * 2).sort("b")
    rss_before, peak_before = _rss_now_mb(), _peak_mb()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = read_kineto(path)
    per_kernel = kernel_breakdown(trace.gpu)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    result = {
        "import_s": import_s, "wall_s": wall, "cpu_s": cpu, "rss_before_mb": rss_before,
        "peak_before_mb": peak_before, "peak_mb": _peak_mb(), "kernels": per_kernel.height,
        "activities": trace.gpu.height, "torch_imported": "torch" in sys.modules,
    }
    if out:
        Path(out).write_text(json.dumps({r["name"]: [r["count"], r["total_ns"] / 1000]
                                         for r in per_kernel.iter_rows(named=True)}))
    return result


def worker_hta(trace_dir: str, out: str | None) -> dict:
    t0 = time.perf_counter()
    from hta.trace_analysis import TraceAnalysis

    import_s = time.perf_counter() - t0
    rss_before, peak_before = _rss_now_mb(), _peak_mb()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    analyzer = TraceAnalysis(trace_dir=trace_dir)
    _, per_kernel = analyzer.get_gpu_kernel_breakdown(
        visualize=False, num_kernels=10**9, duration_ratio=1.0, include_memory_kernels=True)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    result = {
        "import_s": import_s, "wall_s": wall, "cpu_s": cpu, "rss_before_mb": rss_before,
        "peak_before_mb": peak_before, "peak_mb": _peak_mb(), "kernels": len(per_kernel),
    }
    if out:  # HTA gives sum and mean per kernel: the count is their ratio
        rows = {}
        for name, total, mean in zip(per_kernel["name"], per_kernel["sum (us)"], per_kernel["mean (us)"]):
            count, old_total = rows.get(str(name), (0, 0.0))
            rows[str(name)] = (count + (round(total / mean) if mean else 0), old_total + float(total))
        Path(out).write_text(json.dumps(rows))
    return result


def _spawn(python: str, args: list[str], timeout: int = 1800) -> dict:
    proc = subprocess.run([python, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {args[:2]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------
# The run.


def _hta_python() -> str:
    python = HTA_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {HTA_VENV} with holistictraceanalysis=={HTA_VERSION} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(HTA_VENV)], check=True)
        # psutil: imported by hta.utils but not declared by HTA 0.5.0
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"holistictraceanalysis=={HTA_VERSION}", "psutil"],
                       check=True)
    return str(python)


def _versions(python: str) -> str:
    code = ("import importlib.metadata as m;"
            "print(m.version('HolisticTraceAnalysis'), m.version('pandas'))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.split()
    return f"HolisticTraceAnalysis {out[0]}, pandas {out[1]}" if len(out) == 2 else "unknown"


def _summary(runs: list[dict], size: int) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    return {
        "runs": len(runs),
        "wall_s": wall,
        "wall_min_s": min(r["wall_s"] for r in runs),
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "mb_per_s": size / 1e6 / wall,
        "peak_mb": max(r["peak_mb"] for r in runs),
        "rss_before_mb": statistics.median(r["rss_before_mb"] for r in runs),
        "import_s": statistics.median(r["import_s"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, nargs="+", default=[60.0, 120.0],
                        help="uncompressed trace sizes to build, one after the other (each >= 50)")
    parser.add_argument("--runs", type=int, default=5, help="runs of ours (each a fresh process)")
    parser.add_argument("--hta-runs", type=int, default=2, help="runs of HTA (each a fresh process)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--keep", type=Path, default=None, help="keep the built trace in this directory")
    parser.add_argument("--summary-process", action="store_true",
                        help="instead: time `trace summary` of one trace as a whole process beside HTA (issue 15); "
                             "--size-mb defaults to 54 here")
    parser.add_argument("--scale", action="store_true",
                        help="instead: issue 29 - `trace summary` as a whole process at 54, 500 and 2000 MB "
                             "(--size-mb), first read, cached read and gzip, wall / CPU / peak RSS, beside HTA")
    parser.add_argument("--traces", type=Path, default=None,
                        help="--scale: keep (and reuse) the built traces in this folder, one subfolder per size")
    parser.add_argument("--lock", type=Path, default=None,
                        help="--scale: hold this lock file (flock) while measuring each size, not while building")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="--scale: also time `trace summary` with the molmo_latency package in this folder "
                             "(e.g. `git archive BASE molmo_latency | tar -x -C DIR`): the reader before a change")
    parser.add_argument("--baseline-label", default="before", help=argparse.SUPPRESS)
    parser.add_argument("--hta-max-mb", type=float, default=None,
                        help="--scale: run HTA only on traces up to this size (MB); e.g. when its larger runs "
                             "were measured before (HTA took ~6 minutes on 500 MB here)")
    parser.add_argument("--hta-cap-gb", type=float, default=12.0,
                        help="--scale: address-space cap of each HTA process (GB), so it fails alone")
    parser.add_argument("--worker", choices=["ours", "ours-package", "hta"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "hta":
            result = worker_hta(args.path, args.out)
        else:
            result = worker_ours(args.path, isolated=args.worker == "ours", out=args.out)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.summary_process:
        summary_process(args)
        return
    if args.scale:
        scale(args)
        return
    if min(args.size_mb) < 50:
        parser.error("--size-mb must be at least 50 (issue 3)")
    if args.runs < 1 or not 1 <= args.hta_runs <= args.runs:
        parser.error("need --runs >= 1 and 1 <= --hta-runs <= --runs")
    hta_python = _hta_python()
    versions = _versions(hta_python)
    sections = []
    for size_mb in args.size_mb:
        sections.append(measure(size_mb, args, hta_python))
    report(sections, versions, args)


def measure(size_mb: float, args: argparse.Namespace, hta_python: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="trace_read_"))
    trace_dir = work / "trace"
    path = trace_dir / "rank0_trace.json"
    try:
        trace_dir.mkdir()
        t0 = time.perf_counter()
        built = build_trace(path, int(size_mb * 1e6))
        size = built["bytes"]
        print(f"built {path} ({size / 1e6:.1f} MB, {built['events']:,} events, {built['copies']} copies "
              f"of the shared traces) in {time.perf_counter() - t0:.1f} s", flush=True)
        load_before = os.getloadavg()[0]

        ours, package, hta = [], [], []
        ours_kernels, hta_kernels = work / "ours.json", work / "hta.json"
        for i in range(args.runs):  # ours and HTA alternate, so load drift hits both
            ours.append(_spawn(sys.executable, ["--worker", "ours", "--path", str(path)]
                               + (["--out", str(ours_kernels)] if i == 0 else [])))
            print(f"ours run {i + 1}: {ours[-1]['wall_s']:.3f} s wall, peak RSS {ours[-1]['peak_mb']:.0f} MB",
                  flush=True)
            if i < args.hta_runs:
                hta.append(_spawn(hta_python, ["--worker", "hta", "--path", str(trace_dir)]
                                  + (["--out", str(hta_kernels)] if i == 0 else [])))
                print(f"HTA run {i + 1}: {hta[-1]['wall_s']:.3f} s wall, peak RSS {hta[-1]['peak_mb']:.0f} MB",
                      flush=True)
        for i in range(max(1, args.runs // 2)):
            package.append(_spawn(sys.executable, ["--worker", "ours-package", "--path", str(path)]))
            print(f"ours via the package, run {i + 1}: {package[-1]['wall_s']:.3f} s wall, "
                  f"peak RSS {package[-1]['peak_mb']:.0f} MB", flush=True)
        load_after = os.getloadavg()[0]

        ours_k = json.loads(ours_kernels.read_text())  # name -> [count, total us]
        hta_k = json.loads(hta_kernels.read_text())  # name -> [count (sum / mean), total us]
        common = set(ours_k) & set(hta_k)
        check = {
            "ours_names": len(ours_k), "hta_names": len(hta_k), "common": len(common),
            "only_hta": sorted(set(hta_k) - set(ours_k))[:5], "only_ours": sorted(set(ours_k) - set(hta_k))[:5],
            "same_count": sum(1 for n in common if ours_k[n][0] == hta_k[n][0]),
            "count_differs": sorted((n for n in common if ours_k[n][0] != hta_k[n][0]),
                                    key=lambda n: -abs(ours_k[n][0] - hta_k[n][0]))[:3],
            "ours_total_us": sum(v[1] for v in ours_k.values()), "hta_total_us": sum(v[1] for v in hta_k.values()),
            "ours_k": {n: ours_k[n] for n in common}, "hta_k": {n: hta_k[n] for n in common},
        }
        return {"size": size, "built": built, "ours": _summary(ours, size), "package": _summary(package, size),
                "hta": _summary(hta, size), "check": check, "load": (load_before, load_after)}
    finally:
        if args.keep and path.exists():
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(args.keep / f"trace_{size_mb:g}mb.json"))
        shutil.rmtree(work, ignore_errors=True)


def report(sections: list[dict], hta_versions: str, args: argparse.Namespace) -> None:
    import msgspec
    import polars as pl

    table = [
        "| trace MB | reader | runs | wall s, median (min) | CPU s, median | MB/s (median wall) | "
        "peak RSS MB | RSS before the read MB | peak RSS / trace size | import s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts, checks, loads = [], [], []
    for sec in sections:
        mb = sec["size"] / 1e6
        ours, package, hta, check = sec["ours"], sec["package"], sec["hta"], sec["check"]
        for label, s in (
            ("molmo-latency (reader modules only)", ours),
            ("molmo-latency via `import molmo_latency.trace`", package),
            (f"HTA {HTA_VERSION}", hta),
        ):
            table.append(
                f"| {mb:.1f} | {label} | {s['runs']} | {s['wall_s']:.3f} ({s['wall_min_s']:.3f}) | "
                f"{s['cpu_s']:.3f} | {s['mb_per_s']:.0f} | {s['peak_mb']:.0f} | {s['rss_before_mb']:.0f} | "
                f"{s['peak_mb'] / mb:.2f}x | {s['import_s']:.2f} |"
            )
        speedup = hta["wall_s"] / ours["wall_s"]
        added = ours["peak_mb"] - ours["rss_before_mb"]
        verdicts += [
            f"- **{mb:.0f} MB trace** ({sec['built']['events']:,} events, {sec['built']['copies']} copies):",
            f"  - speed: HTA / ours = **{speedup:.1f}x** (target >= 10x): "
            + ("met." if speedup >= 10 else f"missed by {10 / speedup:.2f}x."),
            f"  - throughput: **{ours['mb_per_s']:.0f} MB/s** of uncompressed JSON at the median wall time "
            f"(target >= 150): " + ("met." if ours["mb_per_s"] >= 150 else
                                    f"missed by {150 / ours['mb_per_s']:.2f}x."),
            f"  - memory: peak RSS **{ours['peak_mb']:.0f} MB = {ours['peak_mb'] / mb:.2f}x** the trace, whole "
            "process with the reader's modules imported (target <= 2x): "
            + ("met" if ours["peak_mb"] <= 2 * mb else f"missed by {ours['peak_mb'] / (2 * mb):.2f}x")
            + f"; the read itself added {added:.0f} MB ({added / mb:.2f}x) to the {ours['rss_before_mb']:.0f} MB "
            "held before it (interpreter, polars and msgspec imports, polars' thread pool), which does not "
            "grow with the trace. Through `import molmo_latency.trace` "
            f"the peak is {package['peak_mb']:.0f} MB = {package['peak_mb'] / mb:.2f}x "
            f"({package['rss_before_mb']:.0f} MB before the read).",
        ]
        line = (
            f"- {mb:.0f} MB: {check['common']} kernel names in common (ours {check['ours_names']}, HTA "
            f"{check['hta_names']}), {check['same_count']} with the same count; total GPU time ours "
            f"{check['ours_total_us'] / 1e6:.6f} s, HTA {check['hta_total_us'] / 1e6:.6f} s."
        )
        if check["only_hta"] or check["only_ours"]:
            line += f" Only in HTA: {check['only_hta']}; only in ours: {check['only_ours']}."
        for n in check["count_differs"]:
            line += (f" `{n[:60]}`: ours {check['ours_k'][n][0]}x / {check['ours_k'][n][1]:.3f} us, "
                     f"HTA {check['hta_k'][n][0]}x / {check['hta_k'][n][1]:.3f} us.")
        checks.append(line)
        loads.append(f"{sec['load'][0]:.1f} -> {sec['load'][1]:.1f}")
    uname = " ".join(platform.uname()).strip()
    sizes = " ".join(f"{s:g}" for s in args.size_mb)
    body = "\n".join([
        f"`python benchmarks/trace_read.py --size-mb {sizes} --runs {args.runs} --hta-runs {args.hta_runs}`. "
        "Each trace: copies, one after another in time with correlation / External id / flow ids shifted, "
        "of the six GPU traces in tests/data/kineto (HTA's own test data), written as one trace in "
        "Kineto's newer layout (`baseTimeNanoseconds`, fractional us). Timed after the imports, in a "
        "fresh process per run: our `read_kineto(path)` + `kernel_breakdown(trace.gpu)` vs HTA's "
        "`TraceAnalysis(trace_dir=...)` + `get_gpu_kernel_breakdown(visualize=False)`; ours and HTA "
        "runs alternated. MB = 1e6 bytes of uncompressed JSON; peak RSS = `ru_maxrss` of the process; "
        "\"RSS before the read\" is after the imports and, for ours, after one small polars query that "
        "starts polars' thread pool (a fixed cost that does not grow with the trace).",
        "",
        f"Machine: `{uname}`, {os.cpu_count()} cores shared with other jobs while this ran (1-min load "
        f"average {', '.join(loads)}). Python {platform.python_version()}, polars {pl.__version__}, "
        f"msgspec {msgspec.__version__}; HTA in its own venv: {hta_versions}.",
        "",
        *table,
        "",
        *verdicts,
        "",
        "Cross-check of the two per-kernel breakdowns:",
        "",
        *checks,
        "",
        "Where they differ: HTA rounds every event of a fractional-microsecond trace to whole "
        "microseconds (start up, end down: `round_down_time_stamps` in hta/common/trace_parser.py) and "
        "counts as kernels all events it puts on a stream, which include a cpu_op whose args carry "
        '`"stream"` (the Triton launch of triton_single_kernel) and `cuda_sync` events ("Stream Wait '
        "Event\"). Ours sums Kineto's `dur` exactly, in ns, over kernel, gpu_memcpy and gpu_memset "
        "events (and is checked against an independent reading of the raw JSON in tests/test_trace_*.py).",
    ])
    print("\n" + body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import update_section

        update_section(SECTION, body)
        print(f"\nupdated the '{SECTION}' section of benchmarks/RESULTS.md")


# ------------------------------------------------------------------------------------------
# `trace summary` as a whole process (issue 15): what a user waits for, interpreter start included.

# The trace-summary path alone: the app with only the trace command registered (what
# `molmo-latency trace summary` costs once the CLI entry point loads only the command it runs).
_TRACE_ONLY = (
    "import sys; sys.path.insert(0, {root!r}); from molmo_latency.cli.app import app; "
    "import molmo_latency.cli.trace_cmd; app(args=sys.argv[1:], prog_name='molmo-latency', standalone_mode=False)"
)
_HTA_WHOLE = (
    "from hta.trace_analysis import TraceAnalysis; a = TraceAnalysis(trace_dir={d!r}); "
    "a.get_gpu_kernel_breakdown(visualize=False, num_kernels=10**9, duration_ratio=1.0, include_memory_kernels=True)"
)


def _whole(cmd: list[str]) -> tuple[float, float]:
    """(wall s from spawn to exit, CPU s user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary_process(args: argparse.Namespace) -> None:
    size_mb = args.size_mb[0] if args.size_mb != [60.0, 120.0] else 54.0
    hta_python = _hta_python()
    versions = _versions(hta_python)
    work = Path(tempfile.mkdtemp(prefix="trace_summary_"))
    try:
        trace_dir = work / "trace"
        trace_dir.mkdir()
        path = trace_dir / "rank0_trace.json"
        built = build_trace(path, int(size_mb * 1e6))
        mb = built["bytes"] / 1e6
        print(f"built {path} ({mb:.1f} MB, {built['events']:,} events)", flush=True)
        arms = {
            "`python -c pass` (interpreter start)": [sys.executable, "-c", "pass"],
            "`molmo-latency trace summary T --json` (the CLI as it is)":
                [sys.executable, "-m", "molmo_latency", "trace", "summary", str(path), "--json"],
            "`molmo-latency trace summary T` (tables)":
                [sys.executable, "-m", "molmo_latency", "trace", "summary", str(path)],
            "trace-summary path only (app + trace command), `--json`":
                [sys.executable, "-c", _TRACE_ONLY.format(root=str(ROOT)), "trace", "summary", str(path), "--json"],
            f"HTA {HTA_VERSION}: TraceAnalysis + get_gpu_kernel_breakdown": [hta_python, "-c",
                                                                            _HTA_WHOLE.format(d=str(trace_dir))],
        }
        hta_label = list(arms)[-1]
        load_before = os.getloadavg()[0]
        walls: dict[str, list[float]] = {a: [] for a in arms}
        cpus: dict[str, list[float]] = {a: [] for a in arms}
        for i in range(args.runs):  # arms alternate, so load drift hits all of them
            for label, cmd in arms.items():
                if label == hta_label and i >= args.hta_runs:
                    continue
                wall, cpu = _whole(cmd)
                walls[label].append(wall)
                cpus[label].append(cpu)
                print(f"{label}: run {i + 1}: {wall:.3f} s wall, {cpu:.3f} s CPU", flush=True)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ["| command (whole process) | runs | wall s, median | wall min | wall max | CPU s (user + sys), median |",
             "|---|---|---|---|---|---|"]
    for label, w in walls.items():
        table.append(f"| {label} | {len(w)} | {statistics.median(w):.3f} | {min(w):.3f} | {max(w):.3f} | "
                     f"{statistics.median(cpus[label]):.3f} |")
    cli = statistics.median(walls[list(arms)[1]])
    alone = statistics.median(walls[list(arms)[3]])
    hta = statistics.median(walls[hta_label])
    cli_min, alone_min = min(walls[list(arms)[1]]), min(walls[list(arms)[3]])
    body = "\n".join([
        f"`python benchmarks/trace_read.py --summary-process --size-mb {size_mb:g} --runs {args.runs} "
        f"--hta-runs {args.hta_runs}`. One {mb:.1f} MB Kineto trace ({built['events']:,} events; built as in the "
        "section above), each command a fresh process timed from spawn to exit (output to /dev/null), "
        "arms alternated.",
        "",
        f"Machine: `{' '.join(platform.uname()).strip()}`, {os.cpu_count()} cores shared with other jobs while "
        f"this ran (1-min load average {load_before:.1f} -> {load_after:.1f}); HTA in its own venv: {versions}.",
        "",
        *table,
        "",
        f"- target `trace summary` of a ~54 MB trace <= 0.5 s as a whole process: the CLI as it is takes "
        f"**{cli:.2f} s** (" + ("met" if cli <= 0.5 else f"missed by {cli / 0.5:.2f}x") + "); the trace-summary path "
        f"alone (what remains once the CLI entry point stops importing every command) **{alone:.2f} s** ("
        + ("met" if alone <= 0.5 else f"missed by {alone / 0.5:.2f}x") + f"). HTA as a whole process: {hta:.2f} s "
        f"({hta / cli:.1f}x the CLI). Fastest runs: CLI {cli_min:.2f} s, path alone {alone_min:.2f} s. The machine's "
        "load inflates every wall time here (see the CPU column: polars starts several threads, so CPU can exceed "
        "wall); the read itself (`read_kineto`, issue 3's reader) is most of the path.",
    ])
    print("\n" + body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import update_section

        update_section(SUMMARY_SECTION, body)
        print(f"\nupdated the '{SUMMARY_SECTION}' section of benchmarks/RESULTS.md")



# ------------------------------------------------------------------------------------------
# Issue 29: first read, cached read and memory at 54 MB, 500 MB and 2 GB, beside HTA.

_SCALE_SIZES = [54.0, 500.0, 2000.0]


def _scale_trace(folder: Path, size_mb: float) -> tuple[Path, Path, dict]:
    """(plain trace, gzip of it, what was built) in folder/<size>/, built when missing."""
    import gzip as gzip_module

    sub = folder / f"{size_mb:g}"
    sub.mkdir(parents=True, exist_ok=True)
    path, packed = sub / "rank0_trace.json", folder / f"{size_mb:g}-gz" / "rank0_trace.json.gz"
    info = folder / f"{size_mb:g}-built.json"  # not in the folder HTA reads
    if not (path.exists() and info.exists()):
        t0 = time.perf_counter()
        built = build_trace(path, int(size_mb * 1e6))
        info.write_text(json.dumps(built))
        print(f"built {path} ({built['bytes'] / 1e6:.0f} MB, {built['events']:,} events) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not packed.exists():
        packed.parent.mkdir(exist_ok=True)
        with open(path, "rb") as src, gzip_module.open(packed.with_suffix(".tmp"), "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        packed.with_suffix(".tmp").rename(packed)
    return path, packed, json.loads(info.read_text())


def _locked(lock: Path | None):
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def hold():
        if lock is None:
            yield
            return
        with open(lock, "a") as f:
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            print(f"holding {lock} (waited {time.perf_counter() - t0:.0f} s)", flush=True)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    return hold()


def scale(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import run_process, update_section

    sizes = args.size_mb if args.size_mb != [60.0, 120.0] else _SCALE_SIZES
    if args.hta_max_mb is None or any(size <= args.hta_max_mb for size in sizes):
        hta_python = _hta_python()
        versions = _versions(hta_python)
    else:  # HTA runs at no size: its venv is neither needed nor built
        hta_python, versions = "", "not run"
    folder = args.traces or Path(tempfile.mkdtemp(prefix="trace_scale_"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MOLMO_LATENCY_CACHE_DIR", None)
    env.pop("MOLMO_LATENCY_NO_CACHE", None)
    summary = [sys.executable, "-m", "molmo_latency", "trace", "summary"]
    rows, notes = [], []
    try:
        for size_mb in sizes:
            path, packed, built = _scale_trace(folder, size_mb)
            mb = built["bytes"] / 1e6
            cache = folder / f"{size_mb:g}-cache"  # beside, not inside, the folder HTA reads
            runs = args.runs if size_mb < 100 else 2 if size_mb < 1000 else 1
            hta_runs = min(args.hta_runs, runs) if size_mb < 100 else 1
            arms = {
                "ours: first read (`--no-cache`)": summary + [str(path), "--json", "--no-cache"],
                "ours: first read, writing the cache": summary + [str(path), "--json", "--cache-dir", str(cache)],
                "ours: first read, `--parts kernels` (`--no-cache`)": summary + [str(path), "--json", "--parts",
                                                                             "kernels", "--no-cache"],
                "ours: cached read": summary + [str(path), "--json", "--cache-dir", str(cache)],
                "ours: cached tables, document not kept": summary + [str(path), "--json", "--cache-dir", str(cache)],
                "ours: cached tables, `--parts kernels`": summary + [str(path), "--json", "--parts", "kernels",
                                                                     "--cache-dir", str(cache)],
                "ours: gzip, first read (`--no-cache`)": summary + [str(packed), "--json", "--no-cache"],
                f"HTA {HTA_VERSION}: TraceAnalysis + get_gpu_kernel_breakdown":
                    [hta_python, "-c", _HTA_WHOLE.format(d=str(path.parent))],
            }
            if args.hta_max_mb is not None and size_mb > args.hta_max_mb:
                arms = {k: v for k, v in arms.items() if not k.startswith("HTA")}
            if args.baseline_src is not None:
                arms = {f"{args.baseline_label}: first read": ["BASELINE", *summary[1:], str(path), "--json"], **arms}
            if size_mb < 100:
                arms = {"`python -c pass` (interpreter start)": [sys.executable, "-c", "pass"], **arms}
            results: dict[str, list[dict]] = {a: [] for a in arms}
            with _locked(args.lock):
                load_before = os.getloadavg()[0]
                for i in range(runs):  # arms alternate, so load drift hits all of them
                    for label, cmd in arms.items():
                        hta = label.startswith("HTA")
                        if hta and i >= hta_runs:
                            continue
                        if "writing the cache" in label:  # each round starts from an empty cache folder
                            shutil.rmtree(cache, ignore_errors=True)
                        if "cached tables" in label:  # the tables' path (as a diff or another part set reads it)
                            for kept in cache.glob("*-doc.*"):
                                kept.unlink()
                        where, run_env = str(ROOT), env
                        if cmd[0] == "BASELINE":  # the package as it was, run from its own folder
                            cmd = [sys.executable, *cmd[1:]]
                            where = str(args.baseline_src)
                            # a first read: a package with the cache would read its own entry from run 2 on
                            # (and leave it in the folder HTA reads); one without ignores the variable
                            run_env = {**env, "PYTHONPATH": str(args.baseline_src), "MOLMO_LATENCY_NO_CACHE": "1"}
                        r = run_process(cmd, env=run_env, cwd=where, timeout_s=900,
                                        address_space_cap_bytes=int(args.hta_cap_gb * 1e9) if hta else None)
                        results[label].append(r)
                        state = "ok" if r["returncode"] == 0 else f"FAILED (exit {r['returncode']})"
                        print(f"{mb:.0f} MB | {label} | run {i + 1}: {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, "
                              f"peak RSS {r['peak_rss_mb']:.0f} MB, {state}", flush=True)
                        if r["returncode"] != 0:
                            last = r["stderr"].strip().splitlines()[-1:] or ["(no message)"]
                            notes.append(f"{mb:.0f} MB, {label}: exit {r['returncode']}: `{last[0][:200]}`")
                load_after = os.getloadavg()[0]
            shutil.rmtree(cache, ignore_errors=True)
            rows.append({"size_mb": mb, "gz_mb": packed.stat().st_size / 1e6, "events": built["events"],
                         "results": results, "load": (load_before, load_after)})
    finally:
        if args.traces is None:
            shutil.rmtree(folder, ignore_errors=True)
    body = _scale_report(rows, notes, versions, sizes, args)
    print("\n" + body)
    if not args.no_write:
        update_section(SCALE_SECTION, body)
        print(f"\nupdated the '{SCALE_SECTION}' section of benchmarks/RESULTS.md")


def _scale_report(rows: list[dict], notes: list[str], versions: str, sizes: list[float],
                  args: argparse.Namespace) -> str:
    table = ["| trace | command (whole process) | runs | wall s, median (min) | CPU s, median | peak RSS MB | "
             "peak RSS / trace |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for row in rows:
        mb, res = row["size_mb"], row["results"]
        med = {}
        for label, runs in res.items():
            ok = [r for r in runs if r["returncode"] == 0]
            if not ok:
                table.append(f"| {mb:.0f} MB | {label} | {len(runs)} | failed | - | "
                             f"{max(r['peak_rss_mb'] for r in runs):.0f} (at failure) | - |")
                continue
            wall = statistics.median(r["wall_s"] for r in ok)
            peak = max(r["peak_rss_mb"] for r in ok)
            base = row["gz_mb"] if "gzip" in label else mb
            med[label] = {"wall": wall, "cpu": statistics.median(r["cpu_s"] for r in ok), "peak": peak}
            table.append(f"| {mb:.0f} MB{' (gzip: ' + format(row['gz_mb'], '.0f') + ' MB)' if 'gzip' in label else ''} | "
                         f"{label} | {len(ok)} | {wall:.3f} ({min(r['wall_s'] for r in ok):.3f}) | "
                         f"{med[label]['cpu']:.3f} | {peak:.0f} | {peak / mb:.2f}x |")
        first, cached = med.get("ours: first read (`--no-cache`)"), med.get("ours: cached read")
        kernels = med.get("ours: cached tables, `--parts kernels`")
        tables = med.get("ours: cached tables, document not kept")
        writing = med.get("ours: first read, writing the cache")
        gz = med.get("ours: gzip, first read (`--no-cache`)")
        hta = next((v for k, v in med.items() if k.startswith("HTA")), None)
        before = next((v for k, v in med.items() if k.startswith(f"{args.baseline_label}:")), None)
        parts = [f"- **{mb:.0f} MB** ({row['events']:,} events; 1-min load {row['load'][0]:.1f} -> {row['load'][1]:.1f}):"]
        first_kernels = med.get("ours: first read, `--parts kernels` (`--no-cache`)")
        if first and hta:
            parts.append(f"  - HTA / ours, first read: **{hta['wall'] / first['wall']:.1f}x** wall, "
                         f"{hta['cpu'] / first['cpu']:.1f}x CPU (goal >= 10x wall)"
                         + (f"; the plain command (a first read writing the cache): **{hta['wall'] / writing['wall']:.1f}x**"
                            f" wall, {hta['cpu'] / writing['cpu']:.1f}x CPU" if writing else "")
                         + (f"; first read `--parts kernels` (what HTA computes): {hta['wall'] / first_kernels['wall']:.1f}x"
                            if first_kernels else "")
                         + (f"; HTA / ours cached: {hta['wall'] / cached['wall']:.1f}x" if cached else "")
                         + (f"; cached `--parts kernels` (what HTA computes): {hta['wall'] / kernels['wall']:.1f}x"
                            if kernels else "") + ".")
        elif first and not any(k.startswith("HTA") for k in row["results"]):
            parts.append(f"  - HTA not run at this size in this run (`--hta-max-mb {args.hta_max_mb:g}`).")
        elif first:
            parts.append("  - HTA did not finish (see below); nothing to compare against.")
        if writing and cached:
            parts.append(f"  - cached read vs first read writing the cache: **{writing['wall'] / cached['wall']:.1f}x** "
                         f"faster wall (goal >= 5x); vs a first read without the cache: "
                         f"{first['wall'] / cached['wall']:.1f}x. Writing the cache costs "
                         f"{writing['wall'] - first['wall']:+.2f} s on the first read."
                         + (f" The cached tables alone (the kept summary removed first): "
                            f"{writing['wall'] / tables['wall']:.1f}x faster than the first read writing the cache."
                            if tables else ""))
        if before and first:
            parts.append(f"  - the package before this change (`{args.baseline_label}`): {before['wall']:.2f} s wall, "
                         f"{before['cpu']:.2f} s CPU, peak RSS {before['peak']:.0f} MB "
                         f"({before['peak'] / mb:.2f}x); now {first['wall']:.2f} s, {first['cpu']:.2f} s CPU, "
                         f"{first['peak']:.0f} MB ({first['peak'] / mb:.2f}x) without the cache"
                         + (f", HTA / before {hta['wall'] / before['wall']:.1f}x" if hta else "") + ".")
        if first:
            parts.append(f"  - peak RSS of the first read: **{first['peak']:.0f} MB = {first['peak'] / mb:.2f}x** the trace"
                         + (f"; gzip: {gz['peak']:.0f} MB = {gz['peak'] / mb:.2f}x the uncompressed size" if gz else "")
                         + (f"; cached read {cached['peak']:.0f} MB" if cached else "")
                         + " (goal at 2 GB: below 0.5x).")
        verdicts += parts
    uname = " ".join(platform.uname()).strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=str(ROOT)).stdout.strip() or "unknown"
    return "\n".join([
        f"Code at commit `{commit}`. `python benchmarks/trace_read.py --scale --size-mb {' '.join(format(s, 'g') for s in sizes)} --runs "
        f"{args.runs} --hta-runs {args.hta_runs} --lock /work/bench.lock`: every figure below is from this one run, "
        "side by side (arms alternated run by run, each size measured while holding the machine's benchmark lock). "
        "Traces built as in the sections above (copies of tests/data/kineto's GPU traces, newer layout), the "
        "gzip ones at compression level 1. Each command is a fresh process timed from spawn to exit (output to "
        "/dev/null): wall, CPU = user + system of the process (all threads), peak RSS = its `ru_maxrss` "
        "(1 MB = 1e6 bytes). Ours is `python -m molmo_latency trace summary T --json` (every part: devices, "
        "categories, kernels, annotations with the launch join, CPU ops) unless the arm says `--parts kernels`; "
        "\"writing the cache\" starts from an empty `--cache-dir` (next to the trace folder, so HTA never sees "
        "it); \"cached read\" is the same command again: it prints the summary kept beside the entry "
        "(molmo_latency/trace/cache.py `cached_document`; SHA-256 of the trace skipped only when its stat is as "
        "recorded and settled); \"cached tables\" reads the entry's tables (the kept summary removed first; "
        "`--parts kernels` decodes the GPU table alone), as a `diff` or another part set does. Runs per arm: "
        f"{args.runs} at 54 MB (HTA {args.hta_runs}), 2 at 500 MB (HTA 1), 1 at 2 GB. HTA runs under an address-space cap of "
        f"{args.hta_cap_gb:g} GB so that it fails alone instead of exhausting the machine.",
        "",
        f"Machine: `{uname}`, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} "
        f"GiB RAM. HTA in its own venv: {versions}.",
        "",
        *table,
        "",
        *verdicts,
        *(["", "Failures:", "", *[f"- {n}" for n in notes]] if notes else []),
    ])


if __name__ == "__main__":
    main()
