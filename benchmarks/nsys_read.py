"""Nsight Systems export reading (issue 17): read a ~100 MB nsys SQLite export with ``read_nsys``
and break its GPU time down per kernel, beside plain-SQL baselines, in one run.

    python benchmarks/nsys_read.py                       # 100 MB, 5 runs each, write RESULTS.md
    python benchmarks/nsys_read.py --size-mb 100 --runs 3 --no-write

The export (not committed) is built in a temporary directory from the shared 2-process FSDP
capture (/work/shared/traces/nsys/fsdp_2gpu_h100_window.sqlite.gz, 2.3 MB): its event rows
(kernels, memcpy, memset, runtime calls, NVTX ranges) are replicated with SQL, copy k shifted
by k windows in time and by k * 2,000,000 in correlationId, until the file reaches the size.

Every measurement runs in its own fresh process and times, after the imports:
  ours           ``read_nsys(path)`` + ``kernel_breakdown(trace.gpu)`` (every table read);
  ours+summary   ``read_nsys(path)`` + ``summarize(trace)`` (adds the launch join and the
                 innermost-NVTX-range attribution of every GPU activity);
  sql group-by   one ``SELECT name, count(*), sum(end - start) ... GROUP BY`` per GPU table: the
                 per-kernel breakdown done by SQLite alone (what ``nsys stats`` reports);
  sql fetch      the reader's own SELECTs (names joined from StringIds) fetched with
                 ``cursor.fetchall()`` into Python tuples, no frames: the cost of getting the
                 rows out of SQLite.
Reported: wall and CPU seconds, MB/s of export (1 MB = 1e6 bytes), peak RSS (``ru_maxrss``) and
RSS before the read. The per-kernel counts and totals of ours and of the SQL group-by are checked
equal.

``--versus`` (issue 29): whole processes side by side, at several sizes (default ~100 MB, ~500 MB
and ~2 GB), each export built first, then measured under ``--lock`` (the machine's benchmark lock)
and deleted after:

    python benchmarks/nsys_read.py --versus --lock /work/bench.lock            # 100, 500, 2000 MB
    python benchmarks/nsys_read.py --versus --sizes-mb 20 --runs 1 --no-write   # a quick look

  ours sql       ``python -m molmo_latency trace summary EXPORT --json --parts gpu,categories,kernels``:
                 the per-device, per-category and per-kernel tables computed by SQLite
                 (molmo_latency/trace/nsys_sql.py), what nsys-ai's ``summary`` shows too;
  ours full      ``python -m molmo_latency trace summary EXPORT --json --no-cache`` (every part:
                 NVTX attribution, launch join; the full reader, a first read) at the smallest
                 size, and at every size up to ``--full-max-mb``;
  ours cached    a second ``trace summary EXPORT --json`` (every part) of the same export: the
                 first fills the cache (tables and the kept document), the measured one prints
                 the kept document (:data:`CACHED_READ_ARGS`);
  nsys-ai        ``nsys-ai summary EXPORT`` of nsys-ai 0.3.0, installed in its own venv
                 (:data:`NSYS_AI_VENV`). Its DuckDB path needs DuckDB's ``sqlite_scanner``
                 extension, which it tries to download; this machine has no network for that, so it
                 falls back to sqlite3 (it says so): its wall time includes the failed download;
  sqlite         the plain per-kernel ``GROUP BY`` (the ``sql group-by`` worker) as a process.
Each is a fresh process; wall, CPU (user + system of the process and its children) and peak RSS
come from ``os.wait4``. Ours' per-kernel counts and totals are checked equal to the SQL GROUP BY.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("/work/shared/traces/nsys/fsdp_2gpu_h100_window.sqlite.gz")
SECTION = "Nsight Systems export reading (issue 17)"
EVENT_TABLES = ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_MEMCPY", "CUPTI_ACTIVITY_KIND_MEMSET",
                "CUPTI_ACTIVITY_KIND_RUNTIME", "NVTX_EVENTS")
GPU_TABLES = EVENT_TABLES[:3]
CORRELATION_STRIDE = 2_000_000
SECTION_VERSUS = "Nsight Systems trace summary against nsys-ai (issue 29)"
NSYS_AI_VERSION = "0.3.0"
NSYS_AI_VENV = Path("/tmp/nsys-ai-venv")
OUR_PARTS = "gpu,categories,kernels"
#: Hook for the cached read (issue 29's Parquet cache lives on another branch): the arguments of a
#: `python -m molmo_latency` run that reads EXPORT through the cache, ``{path}`` standing for the
#: export, e.g. ``["trace", "summary", "{path}", "--json", "--parts", OUR_PARTS]`` once the cache is
#: wired into `trace summary`. None: not measured. The first of two runs fills the cache, the second
#: is timed.
#: The repeat of the default summary (every part, NVTX attribution included): the first run reads
#: the export into the table cache and keeps the document; the one measured prints it again.
CACHED_READ_ARGS: list[str] | None = ["trace", "summary", "{path}", "--json"]


# ------------------------------------------------------------------------------------------
# The export.


def build_export(path: Path, target_bytes: int) -> dict:
    """Copy the shared export to `path` and replicate its event rows until it holds `target_bytes`."""
    with gzip.open(SOURCE, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = OFF")  # a scratch file: no journal, no sync
    db.execute("PRAGMA synchronous = OFF")
    first, last = db.execute("SELECT min(start), max(end) FROM CUPTI_ACTIVITY_KIND_RUNTIME").fetchone()
    window = last - first + 1_000_000
    counts = {t: db.execute(f"SELECT max(rowid) FROM {t}").fetchone()[0] for t in EVENT_TABLES}
    columns = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in EVENT_TABLES}
    copies = 0
    page = db.execute("PRAGMA page_size").fetchone()[0]
    while db.execute("PRAGMA page_count").fetchone()[0] * page < target_bytes:
        copies += 1
        shift = copies * window
        for table in EVENT_TABLES:
            items = []
            for c in columns[table]:
                if c in ("start", "end"):
                    items.append(f"{c} + {shift}")
                elif c == "correlationId":
                    items.append(f"{c} + {copies * CORRELATION_STRIDE}")
                else:
                    items.append(c)
            db.execute(f"INSERT INTO {table} ({', '.join(columns[table])}) SELECT {', '.join(items)} "
                       f"FROM {table} WHERE rowid <= {counts[table]}")
        db.commit()
    rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in EVENT_TABLES}
    db.close()
    return {"bytes": path.stat().st_size, "copies": copies + 1, "rows": rows}


# ------------------------------------------------------------------------------------------
# Workers (each in its own process).


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def _timed(fn) -> dict:
    rss_before = _rss_now_mb()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    extra = fn()
    return {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
            "rss_before_mb": rss_before, "peak_mb": _peak_mb(), **extra}


def worker(kind: str, path: str, out: str | None) -> dict:
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    if kind.startswith("ours"):
        import warnings

        import polars as pl

        from molmo_latency.trace import kernel_breakdown, read_nsys, summarize

        pl.DataFrame({"a": list(range(100_000))}).with_columns(b=pl.col("a") * 2).sort("b")  # thread pool up
        import_s = time.perf_counter() - t0

        def run() -> dict:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trace = read_nsys(path)
            per_kernel = kernel_breakdown(trace.gpu)
            if kind == "ours+summary":
                summary = summarize(trace)
                extra = {"unattributed": summary.unattributed}
            else:
                extra = {}
            if out:
                Path(out).write_text(json.dumps({r["name"]: [r["count"], r["total_ns"]]
                                                 for r in per_kernel.iter_rows(named=True)}))
            return {"activities": trace.gpu.height, "runtime": trace.runtime.height,
                    "ranges": trace.annotations.height, **extra}

        return {"import_s": import_s, **_timed(run)}

    uri = f"file:{path}?mode=ro&immutable=1"
    import_s = time.perf_counter() - t0
    if kind == "sql group-by":
        def run() -> dict:
            db = sqlite3.connect(uri, uri=True)
            result: dict[str, list[int]] = {}
            kernel = ("SELECT s.value, count(*), sum(t.end - t.start) FROM CUPTI_ACTIVITY_KIND_KERNEL t "
                      "JOIN StringIds s ON s.id = t.demangledName GROUP BY s.value")
            memcpy = ("SELECT 'Memcpy ' || substr(o.label, 1, 1) || 'to' || substr(o.label, instr(o.label, '-to-') + 4, 1)"
                      " || ' (' || a.label || ' -> ' || b.label || ')', count(*), sum(t.end - t.start) "
                      "FROM CUPTI_ACTIVITY_KIND_MEMCPY t JOIN ENUM_CUDA_MEMCPY_OPER o ON o.id = t.copyKind "
                      "JOIN ENUM_CUDA_MEM_KIND a ON a.id = t.srcKind JOIN ENUM_CUDA_MEM_KIND b ON b.id = t.dstKind "
                      "GROUP BY 1")
            memset = ("SELECT 'Memset (' || k.label || ')', count(*), sum(t.end - t.start) "
                      "FROM CUPTI_ACTIVITY_KIND_MEMSET t JOIN ENUM_CUDA_MEM_KIND k ON k.id = t.memKind GROUP BY 1")
            for sql in (kernel, memcpy, memset):
                for name, n, total in db.execute(sql):
                    result[name] = [n, total]
            db.close()
            if out:
                Path(out).write_text(json.dumps(result))
            return {"kernels": len(result)}

        return {"import_s": import_s, **_timed(run)}

    def run() -> dict:  # sql fetch: the reader's queries, rows as Python tuples
        db = sqlite3.connect(uri, uri=True)
        n = 0
        queries = [
            "SELECT s.value, t.start, t.end, t.deviceId, t.streamId, t.correlationId, t.gridX, t.gridY, t.gridZ, "
            "t.blockX, t.blockY, t.blockZ FROM CUPTI_ACTIVITY_KIND_KERNEL t LEFT JOIN StringIds s ON s.id = t.demangledName",
            "SELECT start, end, deviceId, streamId, correlationId, copyKind, srcKind, dstKind FROM CUPTI_ACTIVITY_KIND_MEMCPY",
            "SELECT start, end, deviceId, streamId, correlationId, memKind FROM CUPTI_ACTIVITY_KIND_MEMSET",
            "SELECT s.value, t.eventClass, t.globalTid, t.correlationId, t.start, t.end FROM CUPTI_ACTIVITY_KIND_RUNTIME t "
            "LEFT JOIN StringIds s ON s.id = t.nameId",
            "SELECT COALESCE(t.text, s.value), t.globalTid, t.start, t.end, t.domainId, "
            "COALESCE(t.int64Value, t.uint64Value, t.int32Value, t.uint32Value) FROM NVTX_EVENTS t "
            "LEFT JOIN StringIds s ON s.id = t.textId WHERE t.eventType IN (59, 60) AND t.end IS NOT NULL",
        ]
        for sql in queries:
            rows = db.execute(sql).fetchall()
            n += len(rows)
            del rows
        db.close()
        return {"rows": n}

    return {"import_s": import_s, **_timed(run)}


def _spawn(args: list[str], timeout: int = 1800) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {args[:2]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------
# The run.

KINDS = ("ours", "ours+summary", "sql group-by", "sql fetch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the export to build (MB)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each reader (each a fresh process)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--versus", action="store_true",
                        help="issue 29: whole-process trace summary against nsys-ai at --sizes-mb")
    parser.add_argument("--sizes-mb", default="100,500,2000", help="--versus: export sizes (MB), comma list")
    parser.add_argument("--baseline-src", help="--versus: a folder holding an earlier molmo_latency package "
                        "(`git archive REV molmo_latency`): its whole first-read summary measured beside ours full")
    parser.add_argument("--baseline-label", default="before", help=argparse.SUPPRESS)
    parser.add_argument("--full-max-mb", type=float, default=0.0,
                        help="--versus: measure `ours full` at every export up to this size too (default: the smallest only)")
    parser.add_argument("--lock", help="--versus: a lock file held (flock) while measuring, not while building")
    parser.add_argument("--work", help="--versus: build the exports in this folder and reuse those already there "
                                       "(kept after: delete it yourself); default a temporary folder, deleted after")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.path, args.out)), flush=True)
        return
    if args.versus:
        versus(args)
        return

    work = Path(tempfile.mkdtemp(prefix="nsys_read_"))
    try:
        path = work / "export.sqlite"
        t0 = time.perf_counter()
        built = build_export(path, int(args.size_mb * 1e6))
        print(f"built {path} ({built['bytes'] / 1e6:.1f} MB, {built['copies']} copies, rows {built['rows']}) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        load_before = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {k: [] for k in KINDS}
        ours_k, sql_k = work / "ours.json", work / "sql.json"
        for i in range(args.runs):  # kinds alternate, so load drift hits all of them
            for kind in KINDS:
                out = {"ours": ours_k, "sql group-by": sql_k}.get(kind) if i == 0 else None
                runs[kind].append(_spawn(["--worker", kind, "--path", str(path)] + (["--out", str(out)] if out else [])))
                print(f"{kind} run {i + 1}: {runs[kind][-1]['wall_s']:.3f} s wall, "
                      f"peak RSS {runs[kind][-1]['peak_mb']:.0f} MB", flush=True)
        load_after = os.getloadavg()[0]
        ours = json.loads(ours_k.read_text())
        sql = json.loads(sql_k.read_text())
        same = ours == sql
        report(built, runs, same, (load_before, load_after), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(built: dict, runs: dict[str, list[dict]], same: bool, load: tuple[float, float],
           args: argparse.Namespace) -> None:
    import polars as pl

    mb = built["bytes"] / 1e6
    table = [
        "| reader | runs | wall s, median (min) | CPU s, median | MB/s (median wall) | peak RSS MB | "
        "RSS before MB | peak / export size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    medians, cpus = {}, {}
    for kind, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        medians[kind] = wall
        cpus[kind] = statistics.median(r["cpu_s"] for r in rs)
        peak = max(r["peak_mb"] for r in rs)
        table.append(
            f"| {kind} | {len(rs)} | {wall:.3f} ({min(r['wall_s'] for r in rs):.3f}) | "
            f"{statistics.median(r['cpu_s'] for r in rs):.3f} | {mb / wall:.0f} | {peak:.0f} | "
            f"{statistics.median(r['rss_before_mb'] for r in rs):.0f} | {peak / mb:.2f}x |"
        )
    o = runs["ours"][0]
    rows = ", ".join(f"{t.replace('CUPTI_ACTIVITY_KIND_', '')} {n:,}" for t, n in built["rows"].items())
    body = "\n".join([
        f"`python benchmarks/nsys_read.py --size-mb {args.size_mb:g} --runs {args.runs}`. The export: the shared "
        f"2-process FSDP capture with its event rows replicated {built['copies']} times by SQL (times and "
        f"correlation ids shifted per copy): {mb:.1f} MB, rows: {rows}. Each run is a fresh process, timed "
        "after the imports; the four readers alternate. MB = 1e6 bytes of export; peak RSS = `ru_maxrss` of "
        "the whole process; \"RSS before\" is after the imports (for ours: after one small polars query that "
        "starts polars' thread pool).",
        "",
        f"Machine: `{' '.join(platform.uname()).strip()}`, {os.cpu_count()} cores"
        f"{' shared with other jobs while this ran' if max(load) >= 1 else ''} (1-min load average {load[0]:.1f} -> "
        f"{load[1]:.1f}). Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, polars {pl.__version__}.",
        "",
        *table,
        "",
        f"- read in seconds: `read_nsys` + per-kernel breakdown **{medians['ours']:.2f} s wall, "
        f"{cpus['ours']:.2f} s CPU** for {mb:.0f} MB ({o['activities']:,} GPU activities, {o['runtime']:,} runtime "
        f"calls, {o['ranges']:,} NVTX ranges); with the whole `summarize` (launch join + innermost-range "
        f"attribution) {medians['ours+summary']:.2f} s wall, {cpus['ours+summary']:.2f} s CPU. "
        + ("On this shared machine wall time exceeds CPU time by the load: CPU seconds are the steadier figure."
           if max(load) >= 1 else "CPU time exceeds wall time where polars works on both cores."),
        f"- against plain SQL: fetching the same rows with `sqlite3` alone takes {medians['sql fetch']:.2f} s wall, "
        f"{cpus['sql fetch']:.2f} s CPU (ours / fetch: {medians['ours'] / medians['sql fetch']:.2f}x wall, "
        f"{cpus['ours'] / cpus['sql fetch']:.2f}x CPU; the fetch checks nothing: ours has SQLite check every row "
        f"as the reader must, and builds typed polars frames, names and sorts); SQLite's own per-kernel GROUP BY takes {medians['sql group-by']:.2f} s but gives only that "
        "one table.",
        f"- memory: peak RSS of the whole process {max(r['peak_mb'] for r in runs['ours']):.0f} MB = "
        f"{max(r['peak_mb'] for r in runs['ours']) / mb:.2f}x the export (a table none of whose rows is set aside "
        "comes out of SQLite a column at a time, 131,072 rowids per query; the tables themselves are what remains).",
        f"- cross-check: per-kernel counts and ns totals of ours and of the SQL group-by are "
        + ("**identical**." if same else "**different** (a bug: see the worker outputs)."),
    ])
    print("\n" + body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import update_section

        update_section(SECTION, body)
        print(f"\nupdated the '{SECTION}' section of benchmarks/RESULTS.md")


# ------------------------------------------------------------------------------------------
# --versus (issue 29): whole processes, ours against nsys-ai.


def nsys_ai() -> Path:
    """nsys-ai's command in its own venv (created on first use)."""
    command = NSYS_AI_VENV / "bin" / "nsys-ai"
    if not command.exists():
        print(f"creating {NSYS_AI_VENV} with nsys-ai=={NSYS_AI_VERSION} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(NSYS_AI_VENV)], check=True)
        subprocess.run([str(NSYS_AI_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                        f"nsys-ai=={NSYS_AI_VERSION}"], check=True)
    return command


def measure(command: list[str], cwd: Path, stdout: Path | None = None, env: dict | None = None) -> dict:
    """Run `command` as a fresh process: wall s, CPU s (user + system, its children included) and
    peak RSS MB (``ru_maxrss``) from ``os.wait4``."""
    with open(stdout or os.devnull, "wb") as out:
        wall0 = time.perf_counter()
        proc = subprocess.Popen(command, cwd=str(cwd), stdout=out, stderr=subprocess.PIPE, env=env)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - wall0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed (exit {code}):\n{err.decode()[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1e3,
            "stderr": err.decode(errors="replace")[-2000:]}


def versus(args: argparse.Namespace) -> None:
    sizes = [float(x) for x in args.sizes_mb.split(",") if x.strip()]
    tool = nsys_ai()
    ai_version = subprocess.run([str(NSYS_AI_VENV / "bin" / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('nsys-ai'), m.version('duckdb'))"],
                                capture_output=True, text=True).stdout.split()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ours = [sys.executable, "-m", "molmo_latency", "trace", "summary", "{path}", "--json"]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nsys_versus_"))
    work.mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        exports = []
        for size in sizes:  # built before the lock is taken
            path = work / f"export_{size:g}mb.sqlite"
            t0 = time.perf_counter()
            built = _reuse(path, size)
            if built is None:
                built = build_export(path, int(size * 1e6))
                path.with_suffix(".json").write_text(json.dumps(built))
            print(f"built {path.name}: {built['bytes'] / 1e6:.1f} MB, {built['copies']} copies in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            exports.append((path, built))
        if args.lock:
            lock = open(args.lock, "a")
            print(f"waiting for {args.lock} ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        load_before = os.getloadavg()[0]
        rows, checks = [], []
        for i, (path, built) in enumerate(exports):
            mb = built["bytes"] / 1e6
            runs = args.runs if mb < 200 else max(1, min(args.runs, 2 if mb < 1000 else 1))
            kinds = {
                "ours sql": [*ours, "--parts", OUR_PARTS],
                "nsys-ai": [str(tool), "summary", "{path}"],
                "sqlite group-by": [sys.executable, str(Path(__file__).resolve()), "--worker", "sql group-by",
                                    "--path", "{path}"],
            }
            if i == 0 or sizes[i] <= args.full_max_mb:  # a first read every time (not the document the cache keeps)
                kinds["ours full"] = [*ours, "--no-cache"]
                if args.baseline_src:  # the same, by the package as it was (run from its own folder)
                    kinds[f"{args.baseline_label}: full"] = [*ours, "--no-cache"]
            results: dict[str, list[dict]] = {k: [] for k in kinds}
            if CACHED_READ_ARGS is not None:
                results["ours cached"] = []
            for run in range(runs):  # kinds alternate, so load drift hits all of them
                for kind, command in kinds.items():
                    command = [c.replace("{path}", str(path)) for c in command]
                    out = work / "ours.json" if (kind == "ours sql" and run == 0) else None
                    before = kind.startswith(f"{args.baseline_label}:") and args.baseline_src
                    results[kind].append(measure(command, work, out, {**env, "PYTHONPATH": args.baseline_src}
                                                 if before else env))
                    print(f"{mb:.0f} MB {kind} run {run + 1}: {results[kind][-1]['wall_s']:.2f} s wall, "
                          f"{results[kind][-1]['cpu_s']:.2f} s CPU, {results[kind][-1]['peak_mb']:.0f} MB", flush=True)
                if CACHED_READ_ARGS is not None:
                    cached = [sys.executable, "-m", "molmo_latency",
                              *[c.replace("{path}", str(path)) for c in CACHED_READ_ARGS]]
                    measure(cached, work, None, env)  # fills the cache
                    results["ours cached"].append(measure(cached, work, None, env))
            checks.append(_same_as_group_by(work / "ours.json", path))
            fell_back = "falling back to sqlite3" in results["nsys-ai"][0]["stderr"]
            rows.append((mb, built, results, fell_back))
        load_after = os.getloadavg()[0]
    finally:
        if lock is not None:
            lock.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    versus_report(rows, checks, (load_before, load_after), ai_version, args)


def _reuse(path: Path, size_mb: float) -> dict | None:
    """What :func:`build_export` said of an export built before in ``--work`` (None: build it)."""
    info = path.with_suffix(".json")
    if path.exists() and info.exists():
        return json.loads(info.read_text())
    return None


def _same_as_group_by(ours_json: Path, path: Path) -> bool:
    """Ours' per-kernel counts and ns totals equal SQLite's own GROUP BY (the `sql group-by` worker)."""
    doc = json.loads(ours_json.read_text())
    ours = {k["name"]: [k["count"], round(k["total_us"] * 1000)] for k in doc["kernels"]}
    out = path.with_suffix(".groupby.json")
    _spawn(["--worker", "sql group-by", "--path", str(path), "--out", str(out)])
    return ours == json.loads(out.read_text())


def versus_report(rows, checks, load, ai_version, args) -> None:
    table = ["| export | reader | runs | wall s, median | CPU s, median | peak RSS MB | peak / export size |",
             "|---|---|---|---|---|---|---|"]
    lines = []
    for (mb, built, results, fell_back), same in zip(rows, checks):
        for kind, rs in results.items():
            if not rs:
                continue
            wall = statistics.median(r["wall_s"] for r in rs)
            cpu = statistics.median(r["cpu_s"] for r in rs)
            peak = max(r["peak_mb"] for r in rs)
            table.append(f"| {mb:.0f} MB | {kind} | {len(rs)} | {wall:.2f} | {cpu:.2f} | {peak:.0f} | "
                         f"{peak / mb:.2f}x |")
        ours = results["ours sql"]
        ai = results["nsys-ai"]
        cpu_o, cpu_a = (statistics.median(r["cpu_s"] for r in x) for x in (ours, ai))
        rss_o, rss_a = (max(r["peak_mb"] for r in x) for x in (ours, ai))
        lines.append(
            f"- {mb:.0f} MB ({built['copies']} copies; {built['rows']['CUPTI_ACTIVITY_KIND_KERNEL']:,} kernels, "
            f"{built['rows']['NVTX_EVENTS']:,} NVTX events): ours **{cpu_o:.2f} s CPU, {rss_o:.0f} MB** against "
            f"nsys-ai's {cpu_a:.2f} s CPU, {rss_a:.0f} MB ({cpu_a / cpu_o:.1f}x less CPU, {rss_a / rss_o:.1f}x less "
            f"memory); nsys-ai {'fell back to sqlite3 (no DuckDB extension download here)' if fell_back else 'ran on DuckDB'}; "
            f"ours' per-kernel counts and totals {'**equal**' if same else '**differ from**'} SQLite's GROUP BY."
        )
        full = results.get("ours full")
        if full:
            cpu_f, rss_f = statistics.median(r["cpu_s"] for r in full), max(r["peak_mb"] for r in full)
            before = results.get(f"{args.baseline_label}: full")
            lines.append(
                f"  - every part (NVTX attribution, launch join), a first read: ours full {cpu_f:.2f} s CPU, "
                f"{rss_f:.0f} MB ({rss_f / mb:.2f}x the export) = {cpu_f / cpu_a:.1f}x nsys-ai's CPU, "
                f"{rss_f / rss_a:.1f}x its memory"
                + (f"; {args.baseline_label}: {statistics.median(r['cpu_s'] for r in before):.2f} s CPU, "
                   f"{max(r['peak_mb'] for r in before):.0f} MB" if before else "") + ".")
    cached = ("- cached read: " + ("measured above (ours cached)." if CACHED_READ_ARGS is not None else
              "not measured: the Parquet cache is not in this tree (hook `CACHED_READ_ARGS` in "
              "benchmarks/nsys_read.py)."))
    body = "\n".join([
        f"`python benchmarks/nsys_read.py --versus --sizes-mb {args.sizes_mb} --runs {args.runs}"
        f"{' --full-max-mb ' + format(args.full_max_mb, 'g') if args.full_max_mb else ''}"
        f"{' --baseline-src DIR --baseline-label ' + repr(args.baseline_label) if args.baseline_src else ''}"
        f"{' --lock ' + args.lock if args.lock else ''}`. Side by side in one run: every reader is a fresh whole process "
        "(start-up and imports included; wall, CPU = user + system, peak RSS = `ru_maxrss`, from `os.wait4`), the "
        "readers alternate. The exports: the shared 2-process FSDP capture with its event rows replicated by SQL "
        f"(as in the section above), built before the measurement{' (in --work)' if args.work else ''} and deleted after. nsys-ai "
        f"{' '.join(ai_version[:1]) or '?'} (DuckDB {' '.join(ai_version[1:2]) or '?'}) runs in its own venv; its "
        "DuckDB path needs the `sqlite_scanner` extension, which it tries to download: there is no network for that "
        "here, so it falls back to sqlite3 after the failed download (its wall time includes it; its CPU time and "
        "memory are what ran). `ours sql` = `trace summary EXPORT --json --parts gpu,categories,kernels` (per "
        "device, per category, per kernel: what nsys-ai's summary shows too, computed by SQLite); `ours full` = "
        "`trace summary EXPORT --json --no-cache` with every part (NVTX attribution, launch join; a first read), "
        f"{'at exports up to ' + format(args.full_max_mb, 'g') + ' MB' if args.full_max_mb else 'smallest export only'}; `ours cached` = `trace summary EXPORT --json` run twice, the second measured: it "
        "prints the document the first kept beside the export's cached tables.",
        "",
        f"Machine: `{' '.join(platform.uname()).strip()}`, {os.cpu_count()} cores (1-min load average "
        f"{load[0]:.1f} -> {load[1]:.1f}). Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}.",
        "",
        *table,
        "",
        *lines,
        cached,
    ])
    print("\n" + body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import update_section

        update_section(SECTION_VERSUS, body)
        print(f"\nupdated the '{SECTION_VERSUS}' section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
