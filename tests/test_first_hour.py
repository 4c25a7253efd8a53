"""What a new user sees in the first hour: quiet Kineto, tables that fit, errors that name the
problem, sweeps whose failures are told first, help texts with examples."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, **kw)


# ------------------------------------------------------------------ Kineto's C++ lines


def test_quiet_kineto_drops_the_profiler_lines_of_a_real_profiler_and_keeps_ours(capfd):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from molmo_latency._quiet import quiet_kineto

    with quiet_kineto():
        prof = profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
        os.write(2, b"our own error line\n")
        print("our own stdout line", flush=True)
    torch.ones(2) + 1
    with quiet_kineto():
        prof.__exit__(None, None, None)
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "profiler_start" not in err and "profiler_stop" not in err
    assert "our own error line" in err and "our own stdout line" in out


def test_without_quieting_the_profiler_does_write_those_lines(capfd):
    """The test above can fail: unquieted, this torch writes the lines onto fd 2."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]):
        torch.ones(2) + 1
    _, err = capfd.readouterr()
    if "profiler_start" not in err:
        pytest.skip("this torch build prints no Kineto marker lines")
    assert "USDT" in err


def test_demo_output_has_no_kineto_lines_and_keeps_its_own(tmp_path):
    res = _cli("demo", "--out", str(tmp_path / "demo"), env={"COLUMNS": "100"})
    assert res.returncode == 0, res.stderr
    assert "USDT" not in res.stdout + res.stderr
    assert "profiler_start" not in res.stdout + res.stderr
    assert "demo: tiny reference VLM" in res.stderr and "requests measured" in res.stderr
    assert "Per configuration" in res.stdout
