"""The Parquet cache of a trace's tables (molmo_latency.trace.cache), and the streaming reader
against the whole-text reader at the level of what `trace summary` shows.

Every expectation is a cold read of the same file by the reader itself, without the cache
(`read_kineto` / `read_nsys`), compared field by field and frame by frame (values and dtypes);
whether a read was served by the cache is seen from outside: the reader function is counted, and
the cache folder's files are looked at on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.trace import TraceWarning, read_kineto, read_nsys
from molmo_latency.trace.cache import CACHE_DIR_ENV, CACHE_FOLDER, NO_CACHE_ENV, cached_tables
from molmo_latency.trace.load import cached_trace, load_trace

DATA = Path(__file__).parent / "data" / "kineto"
TRACES = sorted(p.name for p in DATA.glob("*.json.gz"))


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    """Each test says where its cache goes (the suite's conftest points every command elsewhere)."""
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv(NO_CACHE_ENV, raising=False)


def _read_with_warnings(read, path) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = read(path)
    return trace, [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]


def _same_trace(a, b) -> None:
    """Every field equal; frames equal in values, column names and dtypes."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, pl.DataFrame):
            assert x.schema == y.schema, f.name
            assert x.equals(y, null_equal=True), f.name
        else:
            assert x == y and type(x) is type(y), f.name


class _Counted:
    """A reader that counts its calls (a hit must not call it)."""

    def __init__(self, read):
        self.read, self.calls = read, 0

    def __call__(self, path):
        self.calls += 1
        return self.read(path)


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.parametrize("name", TRACES)
def test_a_cache_hit_gives_exactly_the_tables_of_a_cold_read(name, tmp_path):
    path = tmp_path / name
    shutil.copy(DATA / name, path)
    cold, cold_warned = _read_with_warnings(read_kineto, path)
    reader = _Counted(read_kineto)
    first, first_warned = _read_with_warnings(lambda p: cached_trace(p, "kineto", reader), path)
    hit, hit_warned = _read_with_warnings(lambda p: cached_trace(p, "kineto", reader), path)
    assert reader.calls == 1  # the second read came from the cache
    (entry,) = _entries(tmp_path / CACHE_FOLDER)
    assert {p.name for p in entry.iterdir()} >= {"manifest.json", "gpu.parquet", "cpu_ops.parquet"}
    _same_trace(first, cold)
    _same_trace(hit, cold)
    assert first_warned == hit_warned == cold_warned  # a hit says what a fresh read says


def test_a_hit_through_load_trace_and_for_an_nsys_export(tmp_path):
    from molmo_latency.trace._demo import write_demo_trace
    from molmo_latency.trace._nsys_demo import write_demo_export

    for path, read in ((write_demo_trace(tmp_path), read_kineto), (write_demo_export(tmp_path), read_nsys)):
        cold = read(path)
        load_trace(path, cache=True)
        stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / CACHE_FOLDER).rglob("*.parquet")}
        _same_trace(load_trace(path, cache=True), cold)
        assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / CACHE_FOLDER).rglob("*.parquet")}
    assert len(_entries(tmp_path / CACHE_FOLDER)) == 2  # one per trace


def _dur_digit(text: bytes) -> tuple[int, bytes]:
    """Where a kernel's `"dur": N` starts, and the text with one digit of N changed (same size)."""
    at = text.index(b'"dur": ', text.index(b'"cat": "kernel"'))
    digit = at + len(b'"dur": ')
    old = text[digit:digit + 1]
    new = b"7" if old != b"7" else b"3"
    return digit, text[:digit] + new + text[digit + 1:]


@pytest.mark.parametrize("trust_stat", [False, True])
def test_a_changed_trace_is_read_again_even_with_its_size_and_mtime_restored(trust_stat, tmp_path, monkeypatch):
    from molmo_latency.trace import cache

    hashed = []
    digest = cache.trace_digest
    monkeypatch.setattr(cache, "trace_digest", lambda p: hashed.append(p) or digest(p))
    if trust_stat:  # the file counts as settled at once (normally: 2 s after its last write)
        monkeypatch.setattr(cache, "_RACY_NS", 0)
    path = tmp_path / "trace.json"
    path.write_bytes(gzip.decompress((DATA / "alexnet_a100_forward.json.gz").read_bytes()))
    reader = _Counted(read_kineto)
    before = cached_trace(path, "kineto", reader)
    cached_trace(path, "kineto", reader)
    assert reader.calls == 1
    assert len(hashed) == (1 if trust_stat else 2)  # an unchanged, settled file is not hashed again
    st = path.stat()
    _, changed = _dur_digit(path.read_bytes())
    path.write_bytes(changed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime moved
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    after = cached_trace(path, "kineto", reader)
    assert reader.calls == 2
    _same_trace(after, read_kineto(path))
    assert not after.gpu.equals(before.gpu)
    assert len(_entries(tmp_path / CACHE_FOLDER)) == 1  # the entry of the old content is gone
    cached_trace(path, "kineto", reader)
    assert reader.calls == 2


def test_a_read_only_folder_is_never_written_and_said_once(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "t.json.gz"
    shutil.copy(DATA / "triton_single_kernel.json.gz", path)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)  # r-x: read-only, even for root
    try:
        reader = _Counted(read_kineto)
        capsys.readouterr()
        first = cached_trace(path, "kineto", reader)
        second = cached_trace(path, "kineto", reader)
        err = capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == ["t.json.gz"]
    finally:
        folder.chmod(0o755)
    assert reader.calls == 2
    assert err.count("\n") == 1 and "cannot be written" in err and str(folder / CACHE_FOLDER) in err
    _same_trace(first, read_kineto(path))
    _same_trace(second, first)


def _summary(args: list[str]) -> dict:
    from molmo_latency.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["trace", "summary", *args, "--json"]) == 0
    return json.loads(out.getvalue())


def test_no_cache_and_cache_dir_options(tmp_path, monkeypatch):
    path = tmp_path / "t.json.gz"
    shutil.copy(DATA / "amd_mi250_minitoy.json.gz", path)
    plain = _summary([str(path), "--no-cache"])
    assert not (tmp_path / CACHE_FOLDER).exists()
    monkeypatch.setenv(NO_CACHE_ENV, "1")
    assert _summary([str(path)]) == plain
    assert not (tmp_path / CACHE_FOLDER).exists()
    monkeypatch.delenv(NO_CACHE_ENV)
    elsewhere = tmp_path / "elsewhere" / "cache"
    assert _summary([str(path), "--cache-dir", str(elsewhere)]) == plain
    assert len(_entries(elsewhere)) == 1 and not (tmp_path / CACHE_FOLDER).exists()
    assert _summary([str(path)]) == plain  # beside the trace by default
    assert _summary([str(path)]) == plain  # and read back from there
    assert len(_entries(tmp_path / CACHE_FOLDER)) == 1


@pytest.mark.parametrize("damage", ["flipped", "truncated", "other_table", "manifest", "missing"])
def test_a_corrupt_cache_entry_is_never_trusted_but_rebuilt(damage, tmp_path, capsys):
    path = tmp_path / "t.json.gz"
    shutil.copy(DATA / "alexnet_a100_forward.json.gz", path)
    reader = _Counted(read_kineto)
    cached_trace(path, "kineto", reader)
    (entry,) = _entries(tmp_path / CACHE_FOLDER)
    gpu = entry / "gpu.parquet"
    data = gpu.read_bytes()
    if damage == "flipped":  # one byte in the middle of the data, size unchanged
        middle = len(data) // 2
        gpu.write_bytes(data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:])
    elif damage == "truncated":
        gpu.write_bytes(data[: len(data) // 3])
    elif damage == "other_table":  # a valid Parquet file, but not the one the manifest recorded
        pl.DataFrame({"name": ["x"], "dur_ns": [1]}).write_parquet(gpu)
    elif damage == "manifest":
        (entry / "manifest.json").write_text('{"format": 1, "tab')
    else:
        gpu.unlink()
    capsys.readouterr()
    rebuilt = cached_trace(path, "kineto", reader)
    assert reader.calls == 2
    assert "rebuilding" in capsys.readouterr().err
    _same_trace(rebuilt, read_kineto(path))
    again = cached_trace(path, "kineto", reader)  # the rebuilt entry checks out
    assert reader.calls == 2
    _same_trace(again, rebuilt)


def test_cached_tables_writes_atomically_and_keeps_nothing_on_a_failed_build(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"traceEvents": []}')

    def failing():
        raise ValueError("not a trace")

    with pytest.raises(ValueError):
        cached_tables(path, "demo", failing, version="1")
    assert list((tmp_path / CACHE_FOLDER).iterdir()) == []  # no entry, no temporary folder left
    out = cached_tables(path, "demo", lambda: {"a": pl.DataFrame({"x": [1, 2]})}, version="1")
    assert out.status == "written" and [p.name for p in (tmp_path / CACHE_FOLDER).iterdir()] == [out.entry.name]
    assert cached_tables(path, "demo", failing, version="1")["a"]["x"].to_list() == [1, 2]
    # another reader version never trusts the entry, and replaces it
    assert cached_tables(path, "demo", lambda: {"a": pl.DataFrame({"x": [3]})}, version="2").status == "written"
    assert cached_tables(path, "demo", failing, version="2")["a"]["x"].to_list() == [3]
    assert len(_entries(tmp_path / CACHE_FOLDER)) == 1


# ------------------------------------------------------------------------------------------
# Streaming reader vs whole-text reader: the same `trace summary` document.


def _summary_of(trace) -> str:
    from molmo_latency.cli.trace_cmd import summary_document
    from molmo_latency.trace.summary import summarize

    return json.dumps(summary_document(summarize(trace), []), sort_keys=True, default=str)


def _both_readings(path: Path) -> tuple[str, str]:
    from molmo_latency.trace import reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        streamed = reader._assemble(path, *reader._stream(path))  # raises if the stream gives up
        whole = reader._assemble(path, *reader._parse(path, [reader._read_bytes(path)]))
    return _summary_of(streamed), _summary_of(whole)


@pytest.mark.parametrize("name", TRACES)
def test_streaming_and_whole_text_readers_give_the_same_summary(name, tmp_path, monkeypatch):
    from molmo_latency.trace import _text

    plain = tmp_path / name.removesuffix(".gz")
    plain.write_bytes(gzip.decompress((DATA / name).read_bytes()))
    monkeypatch.setattr(_text, "_CHUNK_BYTES", 4000)  # many chunks, gzip blocks ending anywhere
    monkeypatch.setattr(_text, "_READ_BYTES", 1111)
    for path in (DATA / name, plain):
        streamed, whole = _both_readings(path)
        assert streamed == whole


def test_streaming_summary_of_a_generated_multi_copy_trace(tmp_path, monkeypatch):
    from benchmarks.trace_read import build_trace
    from molmo_latency.trace import _text

    path = tmp_path / "generated.json"
    build_trace(path, 3_000_000)  # every shared GPU trace, copied one after another in time
    packed = tmp_path / "generated.json.gz"
    packed.write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
    monkeypatch.setattr(_text, "_CHUNK_BYTES", 64 << 10)
    for p in (path, packed):
        streamed, whole = _both_readings(p)
        assert streamed == whole


# ------------------------------------------------------------------------------------------
# The checks' cheaper paths (valid rows found in one pass; duplicates looked for among rows
# sharing a start only) set aside exactly what a plain Python reading does.


@pytest.mark.parametrize("seed", range(6))
def test_duplicates_and_impossible_times_match_a_plain_reading(seed):
    import random
    from collections import Counter

    from molmo_latency.trace._checks import drop_impossible

    rng = random.Random(seed)
    rows = []
    for _ in range(400):
        start = rng.choice([rng.randrange(-3, 60), 1000])
        dur = rng.choice([rng.randrange(-2, 4), 5])
        rows.append((rng.choice(["a", "b"]), rng.randrange(2), start, start + dur, dur,
                     rng.choice([None, [1, 1, 1], [2, 1, 1]])))
    if rng.random() < 0.5:  # sorted by start (as the Kineto reader gives its tables) or not
        rows.sort(key=lambda r: r[2])
    table = pl.DataFrame(rows, schema={"name": pl.String, "device": pl.Int64, "start_ns": pl.Int64,
                                       "end_ns": pl.Int64, "dur_ns": pl.Int64, "grid": pl.Array(pl.Int64, 3)},
                         orient="row")
    seen, kept, expected = set(), [], Counter()
    for row in rows:  # the first rule that applies names the reason; then duplicates among the rest
        if row[4] < 0:
            expected["negative_duration"] += 1
        elif row[2] < 0:
            expected["negative_time"] += 1
        elif (key := (row[0], row[1], row[2], row[3], row[4], tuple(row[5]) if row[5] else None)) in seen:
            expected["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(row)
    got = Counter()
    out = drop_impossible(table, None, got)
    assert got == expected
    assert out.rows() == [tuple(r[:5]) + (r[5],) for r in kept]


# ------------------------------------------------------------------------------------------
# `trace summary` straight from the command line (no Typer) is the command Typer declares.


def test_the_direct_command_line_reads_the_options_typer_declares(tmp_path, capsys):
    import inspect

    from typer.models import OptionInfo

    from molmo_latency.cli.app import app
    from molmo_latency.cli.trace_cmd import summary_command
    from molmo_latency.cli.trace_summary import SUMMARY_OPTIONS, direct_summary

    declared = {}
    for name, param in inspect.signature(summary_command).parameters.items():
        if isinstance(param.default, OptionInfo):
            for decl in param.default.param_decls:
                declared[decl] = (name, param.default.default)
    assert declared == {flag: (name, default) for flag, (name, _, default) in SUMMARY_OPTIONS.items()}
    path = tmp_path / "t.json.gz"
    shutil.copy(DATA / "nccl_training.json.gz", path)
    args = [str(path), "--json", "--top", "3", "--no-cache", "--parts", "kernels,gpu"]
    assert direct_summary(args) is not None
    direct = _summary(args[:1] + args[2:])  # main() takes the direct path
    capsys.readouterr()
    assert app(args=["trace", "summary", *args], prog_name="molmo-latency", standalone_mode=False) is None
    through_typer = json.loads(capsys.readouterr().out)
    assert direct == through_typer and direct["computed"] == ["gpu", "kernels"]
    for odd in (["--help"], [str(path), "--top", "x"], [str(path), "--top", "0"], [str(path), "--bogus"],
                [str(path), str(path)], [], [str(path), "--json=1"], [str(path), "--cache-dir"]):
        assert direct_summary(odd) is None, odd  # left to Typer and its messages


@pytest.mark.parametrize("size", [0, 1, 6, 7, 8, 100])
def test_the_digest_is_the_sha256_of_the_file_read_in_steps(tmp_path, monkeypatch, size):
    """The hashing thread reads the trace in large steps (few GIL hand-overs while the parser
    runs): the digest is still SHA-256 of the bytes, whatever the last step holds."""
    import hashlib

    from molmo_latency.trace import cache

    monkeypatch.setattr(cache, "_HASH_CHUNK", 7)  # steps of 7 bytes: 0, 1, exactly one, several
    data = bytes(range(256)) * 4
    path = tmp_path / "t.json"
    path.write_bytes(data[:size])
    assert cache.trace_digest(path) == hashlib.sha256(data[:size]).hexdigest()
