"""Trace reading (issue 3): read one big Kineto trace and break its GPU time down per kernel,
with molmo-latency and with Holistic Trace Analysis 0.5.0 (the peer), in one run.

    python benchmarks/trace_read.py                          # ~100 MB trace, write RESULTS.md
    python benchmarks/trace_read.py --size-mb 60 --runs 5 --hta-runs 2 --no-write

The trace (not committed) is built in a temporary directory from the real traces in
tests/data/kineto (HTA's test data): their events replicated one after another in time, with
correlation / External id / flow ids shifted per copy, into one valid newer-layout trace
(``baseTimeNanoseconds``, fractional microseconds), written the way Kineto writes it.

Every measurement runs in its own fresh subprocess and times, after the imports:
  ours     ``read_kineto(path)`` + ``kernel_breakdown(trace.gpu)``; run twice over: with only the
           reader's modules imported (``molmo_latency/__init__`` skipped), and through
           ``import molmo_latency.trace`` as a user would (that package import pulls torch);
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

    import_s = time.perf_counter() - t0
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
    if out:
        sums = per_kernel.groupby("name")["sum (us)"].sum()
        Path(out).write_text(json.dumps({str(k): float(v) for k, v in sums.items()}))
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
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"holistictraceanalysis=={HTA_VERSION}"],
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
    parser.add_argument("--size-mb", type=float, default=100.0, help="uncompressed trace size to build (>= 50)")
    parser.add_argument("--runs", type=int, default=5, help="runs of ours (each a fresh process)")
    parser.add_argument("--hta-runs", type=int, default=2, help="runs of HTA (each a fresh process)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--keep", type=Path, default=None, help="keep the built trace in this directory")
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

    if args.size_mb < 50:
        parser.error("--size-mb must be at least 50 (issue 3)")
    hta_python = _hta_python()
    work = Path(tempfile.mkdtemp(prefix="trace_read_"))
    try:
        trace_dir = work / "trace"
        trace_dir.mkdir()
        path = trace_dir / "rank0_trace.json"
        t0 = time.perf_counter()
        built = build_trace(path, int(args.size_mb * 1e6))
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

        ours_k = json.loads(ours_kernels.read_text())
        hta_k = json.loads(hta_kernels.read_text())
        common = set(ours_k) & set(hta_k)
        worst = max((abs(ours_k[n][1] - hta_k[n]) / max(ours_k[n][1], 1e-9) for n in common), default=0.0)
        check = {
            "ours_names": len(ours_k), "hta_names": len(hta_k), "common": len(common),
            "only_hta": sorted(set(hta_k) - set(ours_k))[:5], "only_ours": sorted(set(ours_k) - set(hta_k))[:5],
            "worst_rel_diff": worst,
            "ours_total_us": sum(v[1] for v in ours_k.values()), "hta_total_us": sum(hta_k.values()),
        }
        report(size, built, _summary(ours, size), _summary(package, size), _summary(hta, size), check,
               load_before, load_after, _versions(hta_python), args)
    finally:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(args.keep / path.name))
        shutil.rmtree(work, ignore_errors=True)


def report(size: int, built: dict, ours: dict, package: dict, hta: dict, check: dict,
           load_before: float, load_after: float, hta_versions: str, args: argparse.Namespace) -> None:
    import msgspec
    import polars as pl

    mb = size / 1e6
    speedup = hta["wall_s"] / ours["wall_s"]
    rows = [
        ("molmo-latency (reader modules only)", ours),
        ("molmo-latency via `import molmo_latency.trace` (imports torch)", package),
        (f"HTA {HTA_VERSION}", hta),
    ]
    table = [
        "| reader | runs | wall s, median (min) | CPU s, median | MB/s (median wall) | peak RSS MB | "
        "RSS before the read MB | peak RSS / trace size | import s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in rows:
        table.append(
            f"| {label} | {s['runs']} | {s['wall_s']:.3f} ({s['wall_min_s']:.3f}) | {s['cpu_s']:.3f} | "
            f"{s['mb_per_s']:.0f} | {s['peak_mb']:.0f} | {s['rss_before_mb']:.0f} | "
            f"{s['peak_mb'] / mb:.2f}x | {s['import_s']:.2f} |"
        )
    added = ours["peak_mb"] - ours["rss_before_mb"]
    verdict = [
        f"- speed: HTA / ours = **{speedup:.1f}x** (target >= 10x): "
        + ("met." if speedup >= 10 else f"missed by {10 / speedup:.2f}x."),
        f"- throughput: **{ours['mb_per_s']:.0f} MB/s** of uncompressed JSON, median wall "
        f"(target >= 150): " + ("met." if ours["mb_per_s"] >= 150 else
                                f"missed by {150 / ours['mb_per_s']:.2f}x."),
        f"- memory: peak RSS **{ours['peak_mb']:.0f} MB = {ours['peak_mb'] / mb:.2f}x** the {mb:.0f} MB trace, "
        f"whole process with the reader's modules imported (target <= 2x): "
        + ("met" if ours["peak_mb"] <= 2 * mb else f"missed by {ours['peak_mb'] / (2 * mb):.2f}x")
        + f"; the read itself added {added:.0f} MB ({added / mb:.2f}x) over the {ours['rss_before_mb']:.0f} MB "
        f"the interpreter held after its imports. Through `import molmo_latency.trace` the peak is "
        f"{package['peak_mb']:.0f} MB = {package['peak_mb'] / mb:.2f}x, because molmo_latency/__init__.py "
        f"imports the profiler and with it torch ({package['rss_before_mb']:.0f} MB before the read).",
    ]
    agree = (
        f"Cross-check: both breakdowns name {check['common']} kernels in common (ours {check['ours_names']}, "
        f"HTA {check['hta_names']}); over those, the largest relative difference of a per-kernel total is "
        f"{check['worst_rel_diff']:.1e}; total GPU time ours {check['ours_total_us'] / 1e6:.6f} s, "
        f"HTA {check['hta_total_us'] / 1e6:.6f} s."
    )
    if check["only_hta"] or check["only_ours"]:
        agree += f" Names only in HTA: {check['only_hta']}; only in ours: {check['only_ours']}."
    uname = " ".join(platform.uname())
    body = "\n".join([
        f"`python benchmarks/trace_read.py --size-mb {args.size_mb:g} --runs {args.runs} "
        f"--hta-runs {args.hta_runs}`. One trace of **{mb:.1f} MB** of uncompressed JSON "
        f"({built['events']:,} events: {built['copies']} copies, one after another in time with ids "
        "shifted, of the six GPU traces of tests/data/kineto, which are HTA's own test data), written "
        "in Kineto's newer layout. Timed, after the imports, in a fresh process per run: our "
        "`read_kineto` + `kernel_breakdown` vs HTA's `TraceAnalysis(trace_dir)` + "
        "`get_gpu_kernel_breakdown(visualize=False)`; ours and HTA alternated.",
        "",
        f"Machine: `{uname}`; {os.cpu_count()} cores, shared with other jobs (1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after). Python {platform.python_version()}, "
        f"polars {pl.__version__}, msgspec {msgspec.__version__}; HTA in its own venv: {hta_versions}.",
        "",
        *table,
        "",
        *verdict,
        "",
        agree,
    ])
    print("\n" + body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import update_section

        update_section(SECTION, body)
        print(f"\nupdated the '{SECTION}' section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
