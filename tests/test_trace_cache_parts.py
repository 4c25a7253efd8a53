"""A cached read decodes only the tables the asked parts of `trace summary` read (issue 29), and
the command line's allocator policy.

Expectations come from a read of the trace itself without the cache (`read_kineto`, `trace
summary --no-cache`); which tables a cached read decodes is seen from outside, by recording the
Parquet files polars reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.cli.trace_summary import run_summary
from molmo_latency.errors import TraceError
from molmo_latency.trace import read_kineto
from molmo_latency.trace.cache import CACHE_DIR_ENV, NO_CACHE_ENV
from molmo_latency.trace.load import load_trace
from molmo_latency.trace.parts import SUMMARY_PARTS

DATA = Path(__file__).parent / "data" / "kineto"
TRACE = DATA / "training_sampled_rank0.json.gz"  # GPU, runtime, CPU ops and annotations
TABLES = ("gpu", "runtime", "cpu_ops", "annotations", "gpu_annotations")


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv(NO_CACHE_ENV, raising=False)


@pytest.fixture
def decoded(monkeypatch):
    """The names of the Parquet files polars decodes, in order."""
    seen: list[str] = []
    read = pl.read_parquet

    def recording(source, *args, **kwargs):
        seen.append(Path(source).name)
        return read(source, *args, **kwargs)

    monkeypatch.setattr(pl, "read_parquet", recording)
    return seen


def _summary(path: Path, **options) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_summary(path, as_json=True, **options)
    return json.loads(out.getvalue())


def test_trace_has_every_table():
    trace = read_kineto(TRACE)
    assert all(getattr(trace, t).height for t in ("gpu", "runtime", "cpu_ops", "annotations"))


@pytest.mark.parametrize("parts, tables", [
    ("kernels", {"gpu"}),
    ("gpu,categories", {"gpu"}),
    ("cpu_ops", {"cpu_ops"}),
    ("annotations", {"gpu", "runtime", "annotations"}),
    ("kernels,cpu_ops", {"gpu", "cpu_ops"}),
    (None, {"gpu", "runtime", "annotations", "cpu_ops"}),
])
def test_cached_summary_decodes_only_its_tables(tmp_path, decoded, parts, tables):
    cache = tmp_path / "cache"
    expected = _summary(TRACE, parts=parts, no_cache=True)
    assert not decoded  # the trace itself: no Parquet
    _summary(TRACE, parts=parts, cache_dir=cache)  # writes the entry (and keeps the document)
    for kept in cache.glob("*-doc.*"):  # the tables' path: as a summary of other parts reads them
        kept.unlink()
    decoded.clear()
    assert _summary(TRACE, parts=parts, cache_dir=cache) == expected  # counts of unread tables included
    assert set(decoded) == {f"{t}.parquet" for t in tables} | {"_meta.parquet"}
    assert len(decoded) == len(set(decoded))


def test_deferred_tables_equal_the_read(tmp_path, decoded):
    fresh = read_kineto(TRACE)
    load_trace(TRACE, cache=True, cache_dir=tmp_path)
    decoded.clear()
    trace = load_trace(TRACE, cache=True, cache_dir=tmp_path, tables=("gpu",))
    assert set(decoded) == {"gpu.parquet", "_meta.parquet"}
    heights = {t: getattr(trace, t).height for t in TABLES}  # from the manifest: nothing read
    assert set(decoded) == {"gpu.parquet", "_meta.parquet"}
    assert heights == {t: getattr(fresh, t).height for t in TABLES}
    for t in TABLES:  # used: decoded then, equal to the trace's own tables (values, dtypes, sorted flag)
        mine, theirs = getattr(trace, t), getattr(fresh, t)
        assert isinstance(mine, pl.DataFrame)
        assert mine.schema == theirs.schema and mine.equals(theirs, null_equal=True), t
        assert mine["start_ns"].flags == theirs["start_ns"].flags, t
    assert sorted(decoded) == sorted(f"{t}.parquet" for t in (*TABLES, "_meta"))


def test_deferred_table_changed_after_the_check_is_refused(tmp_path):
    load_trace(TRACE, cache=True, cache_dir=tmp_path)
    trace = load_trace(TRACE, cache=True, cache_dir=tmp_path, tables=("gpu",))
    runtime_file = next(tmp_path.glob("*/runtime.parquet"))
    pl.DataFrame({"name": ["x"]}).write_parquet(runtime_file)  # the entry changes under the reader
    with pytest.raises(TraceError) as err:
        trace.runtime.select("name")
    message = str(err.value)
    assert "\n" not in message and str(runtime_file) in message and "--no-cache" in message


def test_every_part_lists_its_tables():
    from molmo_latency.trace.parts import PART_TABLES

    assert set(PART_TABLES) == set(SUMMARY_PARTS)
    assert all(set(tables) <= set(TABLES) for tables in PART_TABLES.values())


def _policy(env: dict, code: str = "") -> str:
    script = (f"import os, sys\n{code}\nfrom molmo_latency.cli.main import _allocator_policy\n_allocator_policy()\n"
              "print(os.environ.get('_RJEM_MALLOC_CONF'))")
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": root}, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_command_line_sets_polars_allocator_unless_set_or_too_late():
    from molmo_latency.cli.main import POLARS_ALLOCATOR_CONF

    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    assert _policy(env) == POLARS_ALLOCATOR_CONF
    assert _policy({**env, "_RJEM_MALLOC_CONF": "narenas:1"}) == "narenas:1"  # the user's own
    assert POLARS_ALLOCATOR_CONF not in _policy(env, "import polars")  # too late: polars configured its own
