"""A repeat `trace summary --json` prints the document kept beside the trace's tables (issue 29:
instant repeat reads), byte for byte what a fresh read prints, and never a stale or damaged one.

Expectations come from `trace summary --json --no-cache` of the same file (the reader and the
summary from scratch); that the kept document was used is seen from outside: the trace's reader
is replaced by one that fails.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from molmo_latency.cli import trace_summary
from molmo_latency.cli.trace_summary import run_summary
from molmo_latency.trace import cache, load
from molmo_latency.trace.cache import CACHE_DIR_ENV, NO_CACHE_ENV

DATA = Path(__file__).parent / "data" / "kineto"


@pytest.fixture(autouse=True)
def _settled(monkeypatch):
    """No environment cache settings; a file counts as settled at once (the 2 s "racy" rule would
    keep a file copied by the test from being trusted by its stat for 2 s)."""
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv(NO_CACHE_ENV, raising=False)
    monkeypatch.setattr(cache, "_RACY_NS", -(10**18))


def _text(path: Path, **options) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_summary(path, as_json=True, **options)
    return out.getvalue()


@pytest.fixture
def no_reader(monkeypatch):
    """Turn the trace readers off: a summary printed now did not read the trace."""
    def fail(*args, **kwargs):
        raise AssertionError("the trace was read")

    def off():
        monkeypatch.setattr(load, "load_trace", fail)
        monkeypatch.setattr(trace_summary, "load_trace", fail, raising=False)
    return off


def _copy(tmp_path: Path, name: str = "training_sampled_rank0.json.gz") -> Path:
    target = tmp_path / "traces" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DATA / name, target)
    return target


@pytest.mark.parametrize("parts", [None, "kernels", "annotations,cpu_ops"])
def test_a_repeat_prints_the_kept_document_byte_for_byte(tmp_path, no_reader, parts):
    trace = _copy(tmp_path)
    fresh = _text(trace, parts=parts, no_cache=True)
    assert _text(trace, parts=parts) == fresh  # computed, then kept
    assert len(list((trace.parent / cache.CACHE_FOLDER).glob("*-doc.*"))) == 1
    no_reader()
    assert _text(trace, parts=parts) == fresh  # printed from what was kept


def test_no_cache_keeps_nothing_and_other_parts_are_computed(tmp_path, no_reader):
    trace = _copy(tmp_path)
    _text(trace, no_cache=True)
    assert not (trace.parent / cache.CACHE_FOLDER).exists()
    kernels = _text(trace, parts="kernels")
    no_reader()
    assert _text(trace, parts="kernels") == kernels
    with pytest.raises(AssertionError, match="the trace was read"):
        _text(trace, parts="gpu")  # another part set: not what was kept


def test_a_changed_trace_is_summarised_again(tmp_path):
    trace = _copy(tmp_path)
    first = _text(trace)
    shutil.copyfile(DATA / "nccl_training.json.gz", trace)  # same name, other content
    again = _text(trace)
    assert again != first and again == _text(trace, no_cache=True)
    kept = list((trace.parent / cache.CACHE_FOLDER).glob("*-doc.*"))
    assert len(kept) == 1  # the old content's document is gone


def test_a_damaged_document_is_never_printed(tmp_path):
    trace = _copy(tmp_path)
    fresh = _text(trace, no_cache=True)
    _text(trace)
    [kept] = (trace.parent / cache.CACHE_FOLDER).glob("*-doc.*")
    raw = bytearray(kept.read_bytes())
    at = raw.index(b'"total_us": ') + len('"total_us": ')
    raw[at] = ord("9") if raw[at] != ord("9") else ord("8")  # one digit of a number: still valid JSON
    kept.write_bytes(bytes(raw))
    assert _text(trace) == fresh
    assert _text(trace) == fresh


def test_new_code_never_trusts_an_older_document(tmp_path, monkeypatch, no_reader):
    trace = _copy(tmp_path)
    _text(trace)
    monkeypatch.setattr(trace_summary, "summary_version", lambda: "another version")
    fresh = _text(trace, no_cache=True)
    no_reader()
    with pytest.raises(AssertionError, match="the trace was read"):
        _text(trace)


def test_the_path_as_given_is_part_of_the_key(tmp_path, monkeypatch, no_reader):
    trace = _copy(tmp_path)
    _text(trace)
    monkeypatch.chdir(trace.parent)
    relative = _text(Path(trace.name), no_cache=True)
    assert f'"path": "{trace.name}"' in relative
    no_reader()
    with pytest.raises(AssertionError, match="the trace was read"):
        _text(Path(trace.name))  # its document says the path as given: not the one kept


def test_a_repeat_from_the_command_line_imports_no_polars(tmp_path):
    """As a whole process: the second `trace summary --json` prints the kept document without
    importing polars (what a repeat costs is the interpreter and this package's start-up)."""
    import os
    import subprocess
    import sys
    import time

    trace = _copy(tmp_path)
    time.sleep(2.2)  # settled: a file hashed within 2 s of its last change is hashed again next time
    env = {k: v for k, v in os.environ.items() if k not in (CACHE_DIR_ENV, NO_CACHE_ENV)}
    command = [sys.executable, "-X", "importtime", "-m", "molmo_latency", "trace", "summary", str(trace), "--json"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == again.returncode == 0, first.stderr[-500:] + again.stderr[-500:]
    assert again.stdout == first.stdout == _text(trace, no_cache=True)
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "molmo_latency.trace.cache" in imported and "polars" not in imported
    assert "polars" in {line.split("|")[-1].strip() for line in first.stderr.splitlines()
                        if line.startswith("import time:")}
