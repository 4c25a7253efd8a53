"""Issue 27, run directories: a full disk, a read-only filesystem, an undecodable run.json, a
misnamed part and symlinks leading out of the run are each one line and exit 2, nothing lost,
nothing written or deleted outside the run.

The full-disk and read-only cases run on a small tmpfs where this machine lets the test mount one
(root); elsewhere they are skipped with the reason, and the same faults are also injected by
monkeypatching (those tests always run).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.errors import SweepError
from molmo_latency.sweep import RunDir, SweepSpec, run_sweep
from molmo_latency.hold import rundir as rundir_module

SWEEP = {"crops": [1, 2], "top_k": [2], "blocks": [2], "prompt_tokens": [4], "new_tokens": [3],
         "repeats": 2, "warmup": 0, "seed": 0}
SWEEP_TOML = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SWEEP.items()) + "\n"
UNITS = 4  # 2 configurations x 2 repeats


def cli(*args: str) -> tuple[int, str, str]:
    from molmo_latency.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("molmo-latency: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run of SWEEP (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_sweep("tiny", SweepSpec.from_dict(SWEEP), out)
    return out


def copy_run(finished: Path, to: Path) -> Path:
    shutil.copytree(finished, to, symlinks=True)
    return to


def units_of(run: Path) -> list[tuple[str, int]]:
    frame = pl.read_parquet(run / "requests.parquet")
    return sorted(zip(frame["config_id"].to_list(), frame["repeat"].to_list()))


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); the same faults are "
                    "injected by the monkeypatching tests")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


# ------------------------------------------------------------------------------------------
# A full disk.


def test_a_full_disk_is_one_line_and_the_resume_is_exact(tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP_TOML)
    with tmpfs(tmp_path / "small", "64k") as disk:
        out = disk / "run"
        code, _, err = cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out), "--json")
        line = one_error_line(err)
        assert code == 2
        assert "disk is full" in line and "written so far is safe" in line and "run the same command again" in line
        assert str(out) in line
        done_before = RunDir(out).done_units()
        assert not list(out.rglob(".*.tmp"))  # no half-written temporary file left
        remount(disk, "size=8m")
        code, stdout, err = cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out), "--json")
        assert code == 0, err
        result = json.loads(stdout)["sweep"]
        assert result["skipped"] == len(done_before) and result["measured"] == UNITS - len(done_before)
        units = units_of(out)
        assert len(units) == UNITS and len(set(units)) == UNITS


def test_a_full_disk_injected_is_one_line_exit_2(tmp_path, monkeypatch):
    """polars words a full disk as a ComputeError: still one line saying the disk is full."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP_TOML)
    real = rundir_module.atomic_write_parquet
    writes = []

    def full_after_three(frame, path):
        writes.append(path)
        if len(writes) > 3:
            raise pl.exceptions.ComputeError("parquet: File out of specification: underlying IO error: No space "
                                             "left on device (os error 28)")
        real(frame, path)

    monkeypatch.setattr(rundir_module, "atomic_write_parquet", full_after_three)
    out = tmp_path / "run"
    code, _, err = cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out))
    line = one_error_line(err)
    assert code == 2 and "disk is full" in line and "safe" in line
    monkeypatch.undo()
    code, _, err = cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out))
    assert code == 0, err
    assert len(set(units_of(out))) == UNITS


def test_a_full_disk_polars_words_as_a_thrift_error_is_still_disk_full(tmp_path, monkeypatch):
    """polars sometimes reports a write the full disk cut short only as a thrift transport error."""
    from molmo_latency import safe_fs

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP_TOML)

    def cut_short(frame, path):
        raise pl.exceptions.ComputeError("parquet: File out of specification: Invalid thrift: transport error")

    monkeypatch.setattr(rundir_module, "atomic_write_parquet", cut_short)
    monkeypatch.setattr(safe_fs, "_nearly_full", lambda where: True)
    code, _, err = cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(tmp_path / "run"))
    assert code == 2 and "disk is full" in one_error_line(err)
    monkeypatch.setattr(safe_fs, "_nearly_full", lambda where: False)  # with space left it is not a disk fault
    with pytest.raises(pl.exceptions.ComputeError):
        cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------
# A read-only run directory.


def test_report_of_a_read_only_run_reads_the_parts_and_writes_nothing(finished, tmp_path):
    with tmpfs(tmp_path / "ro", "8m") as disk:
        run = copy_run(finished, disk / "run")
        (run / "requests.parquet").unlink()  # stale tables: report would have rebuilt them
        shutil.rmtree(run / "report", ignore_errors=True)
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        remount(disk, "ro")
        code, stdout, err = cli("report", str(run), "--json")
        assert code == 0, err
        doc = json.loads(stdout)
        # no warm-up in SWEEP: the run's first request (c1, repeat 0) is cold and out of the medians
        assert sorted((c["config_id"], c["n_valid"]) for c in doc["configs"]) == [
            ("c1-k2-b2-p4-n3-bs1", 1), ("c2-k2-b2-p4-n3-bs1", 2)]
        assert any("1 requests were measured cold" in r for r in doc["quality"]["reasons"])
        assert doc["plots"] == [] and doc["plots_skipped"]
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
        # a resume (a new run) into it: one line saying read-only
        sweep = tmp_path / "sweep.toml"
        sweep.write_text(SWEEP_TOML)
        code, _, err = cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(run))
        line = one_error_line(err)
        assert code == 2 and "read-only" in line
        remount(disk, "rw")


def test_report_with_writes_refused_injected(finished, tmp_path, monkeypatch):
    run = copy_run(finished, tmp_path / "run")
    (run / "requests.parquet").unlink()

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(run / ".lock"))

    monkeypatch.setattr(RunDir, "_try_lock", refuse)
    assert RunDir(run).table("requests").height == UNITS
    assert not (run / "requests.parquet").exists()


def test_a_write_fault_no_command_worded_is_still_one_line(finished, monkeypatch):
    from molmo_latency.cli import profile_cmd

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/somewhere/model.json")

    monkeypatch.setattr(profile_cmd, "_report", refuse)
    code, _, err = cli("report", str(finished))
    line = one_error_line(err)
    assert code == 2 and "/somewhere/model.json" in line and "read-only" in line


# ------------------------------------------------------------------------------------------
# run.json, parts.


def test_run_json_of_invalid_utf8_is_one_line(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "run.json").write_bytes(b'{"identity": "\xff\xfe"}')
    code, _, err = cli("report", str(run))
    line = one_error_line(err)
    assert code == 2 and str(run / "run.json") in line and "corrupted" in line


@pytest.mark.parametrize("name", ["run.json", "parts/requests/c1-k2-b2-p4-n3-bs1__r0.parquet"])
def test_a_fifo_in_place_of_a_file_of_the_run_is_refused_without_hanging(finished, tmp_path, name):
    import os
    import signal

    run = copy_run(finished, tmp_path / "run")
    (run / name).unlink()
    os.mkfifo(run / name)
    (run / "requests.parquet").unlink()

    def hang(*_):
        raise TimeoutError("report hangs on a FIFO")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        code, _, err = cli("report", str(run))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    line = one_error_line(err)
    assert code == 2
    assert ("not a regular file" in line and name.split("/")[-1] in line) or "no run.json" in line, line


def test_a_part_copied_over_another_units_name_is_named(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    parts = sorted((run / "parts" / "requests").glob("*.parquet"))
    shutil.copyfile(parts[0], parts[1])  # measured: report exit 0 with a unit counted twice
    (run / "requests.parquet").unlink()
    code, _, err = cli("report", str(run))
    line = one_error_line(err)
    assert code == 2 and str(parts[1]) in line and "its name says" in line


# ------------------------------------------------------------------------------------------
# Symlinks leading out of the run.


def test_report_does_not_write_plots_through_a_symlink_out(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.rmtree(run / "report", ignore_errors=True)
    (run / "report").symlink_to(outside)
    code, _, err = cli("report", str(run))
    line = one_error_line(err)
    assert code == 2 and "symlink" in line and str(run / "report") in line
    assert list(outside.iterdir()) == []


def test_a_resume_does_not_follow_a_traces_symlink_out(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    precious = tmp_path / "outside" / "tracesdir" / ".tmp-precious"
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("mine")
    (run / "traces").symlink_to(precious.parent)
    with pytest.raises(SweepError, match="symlink leading out"):
        run_sweep("tiny", SweepSpec.from_dict(SWEEP), run)
    assert (precious / "keep.txt").read_text() == "mine"


def test_a_resume_does_not_write_parts_through_a_symlink_out(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    outside = tmp_path / "outside_parts"
    shutil.move(run / "parts" / "phases", outside)
    (run / "parts" / "phases").symlink_to(outside)
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(SweepError, match=r"parts/phases is a symlink leading out"):
        run_sweep("tiny", SweepSpec.from_dict(SWEEP), run)
    assert sorted(p.name for p in outside.iterdir()) == before


def test_fit_out_on_a_read_only_filesystem_is_one_line(finished, tmp_path, monkeypatch):
    """`fit --out` (measured: an OSError traceback) on a read-only tmpfs: one line, exit 2."""
    import molmo_latency.estimator as estimator
    from molmo_latency.estimator import example_requests

    fitted = estimator.fit_estimator(example_requests(seed=0), hold_out_new_tokens=False)
    monkeypatch.setattr(estimator, "fit_estimator", lambda *args, **kwargs: fitted)
    with tmpfs(tmp_path / "ro", "1m") as disk:
        remount(disk, "ro")
        code, _, err = cli("fit", str(finished), "--out", str(disk / "model"))
        line = one_error_line(err)
        assert code == 2 and "read-only" in line and str(disk / "model") in line
        remount(disk, "rw")


def test_report_on_a_full_disk_prints_its_tables_and_says_why_there_are_no_plots(finished, monkeypatch):
    def full(rep, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "phase_shares.png"))

    monkeypatch.setattr("molmo_latency.show.report_plots.write_report_plots", full)
    code, stdout, err = cli("report", str(finished), "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert len(doc["configs"]) == 2 and doc["plots"] == []
    assert doc["plots_skipped"] == [{"file": "plots", "why": f"cannot write {finished / 'report'} "
                                                              "(No space left on device)"}]
