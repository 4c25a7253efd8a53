"""Shared by the benchmarks: the machine's description and RESULTS.md section updates."""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """One line naming the machine the figures were measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc = f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    try:
        import torch

        desc += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    except ImportError:
        pass
    return desc


def update_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of benchmarks/RESULTS.md, under a file lock."""
    header = f"## {title}"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"{header}\n\n_Measured {stamp} on: {machine()}_\n\n{body.strip()}\n"
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEvery figure here was measured by the benchmark named in its section, on the machine named there.\n"
        pattern = re.compile(rf"^{re.escape(header)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text, count=1)
        else:
            text = text.rstrip() + "\n\n" + section
        RESULTS.write_text(text.rstrip() + "\n")


def run_process(cmd: list[str], *, env: dict | None = None, cwd: str | None = None, timeout_s: float = 1800,
                address_space_cap_bytes: int | None = None) -> dict:
    """Run `cmd` as a fresh process (output to /dev/null, stderr kept) and measure it whole:
    ``wall_s`` from spawn to exit, ``cpu_s`` (user + system of the process and its threads),
    ``peak_rss_mb`` (its own ``ru_maxrss``, from ``wait4``; 1 MB = 1e6 bytes), ``returncode``
    and the end of ``stderr``. `address_space_cap_bytes`: a RLIMIT_AS for the child, so a peer
    that would exhaust the machine's memory fails alone (MemoryError) instead."""
    import resource
    import subprocess
    import tempfile
    import threading
    import time

    def cap() -> None:
        if address_space_cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (address_space_cap_bytes, address_space_cap_bytes))

    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd, preexec_fn=cap)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-3000:].decode("utf-8", "replace")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,
            "returncode": proc.returncode, "stderr": tail}
