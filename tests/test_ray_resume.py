"""A driver of a sweep on Ray killed with SIGKILL mid-sweep, then the same command again: exactly
one row per (configuration, repeat), workers of both sessions named in the rows."""

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.ray

SWEEP = ('crops = [1, 2]\ntop_k = [1, 2]\nblocks = [2]\nprompt_tokens = [8]\nnew_tokens = [4]\n'
         'repeats = 4\nwarmup = 1\nseed = 0\ncooldown_ms = 200\n')


def test_sigkilled_driver_resumes_to_exactly_one_row_per_unit(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text(SWEEP)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "molmo_latency", "profile", "--model", "tiny", "--sweep", str(sweep),
           "--out", str(out), "--ray", "local"]
    # its own session: SIGKILL reaches the driver and the local Ray it started
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / "parts" / "requests"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and (
            not parts.is_dir() or len(list(parts.glob("*.parquet"))) < 4):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.parquet")))
    assert 4 <= done_before < 16, "the driver must be killed mid-sweep"

    again = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["sweep"]["measured"] == 16 - done_before and result["sweep"]["skipped"] == done_before
    assert len(result["configs"]) == 4

    req = pl.read_parquet(out / "requests.parquet")
    assert req.height == 16 and req.select("config_id", "repeat").n_unique() == 16
    assert sorted(req["order"]) == list(range(16))
    sessions = json.loads((out / "run.json").read_text())["ray_sessions"]
    assert len(sessions) == 2
    by_session = req["worker_id"].str.slice(0, 2).value_counts().sort("worker_id")
    assert dict(by_session.iter_rows()) == {"s0": done_before, "s1": 16 - done_before}
    assert not list(out.rglob("*.tmp"))
