"""Issue 27: a fuzz suite over both trace readers, run directories and estimator directories.

Mutants are generated from seeded ``random.Random`` streams (deterministic: the same mutants on
every run, never a flake). Each is read the way a user reads it; allowed outcomes are a one-line
:class:`~molmo_latency.errors.MolmoLatencyError` naming the input, or a result whose totals are
finite, non-negative and possible (no GPU span longer than the window the readers keep, busy
time within the span, skipped counts adding up). Anything else (another exception, a hang, an
impossible total) fails with the mutant's seed and what was done to it.

CI runs a few dozen mutants of each kind (a few tens of seconds). ``MOLMO_FUZZ_SCALE=10`` runs
ten times as many (the issue's acceptance run: several hundred trace mutants);
``MOLMO_FUZZ_SEED=anything`` draws another family of mutants.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import warnings
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.errors import MolmoLatencyError
from molmo_latency.trace import TraceWarning, load_trace, summarize
from molmo_latency.trace._checks import MAX_TRACE_SPAN_NS

SCALE = int(os.environ.get("MOLMO_FUZZ_SCALE", "1"))
SEED = os.environ.get("MOLMO_FUZZ_SEED", "")  # another family of mutants (CI: the default, fixed)
KINETO_DIR = Path(__file__).resolve().parent / "data" / "kineto"
NSYS_DIR = Path("/work/shared/traces/nsys")
KINETO_BASES = ("event_sync_multi_stream", "compare_base", "amd_mi250_minitoy", "alexnet_a100_forward")
ODD = [None, "", "abc", "X", "kernel", "Q", 7, -1, -1_000_000, 0, 1.5, 2**63 - 1, 2**63, -(2**63), 2**53 + 1,
       1e300, -1e300, True, [], {}, {"a": 1}, [1, 2, 3], 4458676522690.655, 3 * 86_400e6]


@contextlib.contextmanager
def no_hang(seconds: int = 30, what: str = "reading"):
    """Raise TimeoutError in this (main) thread when the block runs past `seconds`: a hang fails."""
    def stop(*_):
        raise TimeoutError(f"{what}: still running after {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line_error(exc: BaseException, path: Path, what: str) -> None:
    message = str(exc)
    assert "\n" not in message, f"{what}: error of several lines: {message!r}"
    assert str(path) in message or path.name in message, f"{what}: the error does not name the input: {message}"


# ------------------------------------------------------------------------------------------
# What a summary may say.


def check_summary(path: Path, what: str) -> None:
    """Read `path` as `trace summary --json` does; the document must hold only possible totals."""
    from molmo_latency.cli.trace_cmd import summary_document

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TraceWarning)
            trace = load_trace(path)
        doc = summary_document(summarize(trace), [str(w.message) for w in caught])
    except MolmoLatencyError as exc:
        one_line_error(exc, path, what)
        return
    json.dumps(doc, allow_nan=False)  # what --json prints: no NaN, no bytes
    t = doc["trace"]
    assert t["skipped_events"] == sum(t["skipped_reasons"].values()) >= 0, what
    span_limit_us = 2 * MAX_TRACE_SPAN_NS / 1000
    for row in doc["gpu"]:
        for key in ("kernel_us", "busy_us", "span_us", "idle_us"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] >= 0, (what, key, row)
        assert row["busy_us"] <= row["span_us"] + 1e-3, (what, row)
        assert row["span_us"] <= span_limit_us, (what, "a GPU span of years", row)
    for section, keys in (("categories", ("total_us",)), ("kernels", ("total_us", "mean_us", "min_us", "max_us")),
                          ("annotations", ("gpu_kernel_us", "gpu_busy_us", "gpu_span_us", "gpu_idle_us")),
                          ("cpu_ops", ("total_us", "mean_us"))):
        for row in doc[section]:
            for key in keys:
                value = row[key]
                assert value is None or (math.isfinite(value) and value >= 0), (what, section, key, row)
    for table in (trace.gpu, trace.runtime, trace.cpu_ops, trace.annotations):
        assert (table["end_ns"] >= table["start_ns"]).all(), what


# ------------------------------------------------------------------------------------------
# Kineto mutants.


def _kineto_doc(name: str) -> dict:
    return json.loads(gzip.decompress((KINETO_DIR / f"{name}.json.gz").read_bytes()))


def mutate_kineto(doc: dict, rng: random.Random) -> tuple[bytes, list[str]]:
    doc = copy.deepcopy(doc)
    events = doc["traceEvents"]
    done = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(events))
        event = events[i]
        op = rng.choice(["odd", "odd", "odd", "delete", "duplicate", "shift", "args", "top"])
        if op == "odd":
            key = rng.choice(["ts", "ts", "dur", "dur", "ph", "cat", "name", "pid", "tid"])
            event[key] = copy.deepcopy(rng.choice(ODD))
            done.append(f"event {i} {key}={event[key]!r}")
        elif op == "delete":
            key = rng.choice(["ts", "dur", "ph", "cat", "name", "args"])
            event.pop(key, None)
            done.append(f"event {i} without {key}")
        elif op == "duplicate":
            events.insert(rng.randrange(len(events) + 1), copy.deepcopy(event))
            done.append(f"event {i} duplicated")
        elif op == "shift" and isinstance(event.get("ts"), (int, float)):
            event["ts"] += rng.choice([-1, 1]) * rng.choice([10, 10**6, 10**9, 10**12])
            done.append(f"event {i} ts shifted to {event['ts']}")
        elif op == "args" and isinstance(event.get("args"), dict):
            key = rng.choice(["correlation", "device", "stream", "External id", "grid", "block"])
            event["args"][key] = copy.deepcopy(rng.choice(ODD))
            done.append(f"event {i} args.{key}={event['args'][key]!r}")
        elif op == "top":
            key = rng.choice(["baseTimeNanoseconds", "deviceProperties", "traceName", "schemaVersion"])
            doc[key] = copy.deepcopy(rng.choice(ODD))
            done.append(f"top {key}={doc[key]!r}")
    data = json.dumps(doc).encode()
    byte_op = rng.choice(["none"] * 6 + ["truncate", "junk", "gzip", "gzip_truncate", "nest"])
    if byte_op == "truncate":
        data = data[: rng.randrange(len(data))]
    elif byte_op == "junk":
        at = rng.randrange(len(data))
        data = data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]
    elif byte_op == "gzip":
        data = gzip.compress(data, 1)
    elif byte_op == "gzip_truncate":
        packed = gzip.compress(data, 1)
        data = packed[: rng.randrange(len(packed))]
    elif byte_op == "nest":
        depth = rng.choice([100, 3000, 20000])
        data = data.replace(b'"traceEvents": [', b'"traceEvents": [' + b"[" * depth + b"]" * depth + b",", 1)
    done.append(f"bytes: {byte_op}")
    return data, done


@pytest.mark.parametrize("base", KINETO_BASES)
def test_kineto_mutants(tmp_path, base):
    doc = _kineto_doc(base)
    rng = random.Random(f"kineto-{base}{SEED}")
    for n in range(30 * SCALE):
        data, done = mutate_kineto(doc, rng)
        path = tmp_path / f"m{n}.json"
        path.write_bytes(data)
        what = f"{base} mutant {n}: {'; '.join(done)}"
        with no_hang(60, what):
            check_summary(path, what)
        path.unlink()


# ------------------------------------------------------------------------------------------
# nsys mutants.

_NSYS_TABLES = ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_MEMCPY", "CUPTI_ACTIVITY_KIND_MEMSET",
                "CUPTI_ACTIVITY_KIND_RUNTIME", "NVTX_EVENTS", "StringIds", "TARGET_INFO_SESSION_START_TIME")
_NSYS_ODD = [None, "abc", b"\xff\x00blob", 1e300, -1.5, -1, 0, 2**63 - 1, -(2**63), 2**40, "gpu0"]


@pytest.fixture(scope="module")
def nsys_bases(tmp_path_factory) -> list[Path]:
    """The small shared export and the demo export (NVTX ranges), tables rebuilt without
    constraints so any value can be written (as a damaged or hand-made export may hold)."""
    from molmo_latency.trace._nsys_demo import write_demo_export

    folder = tmp_path_factory.mktemp("nsys_bases")
    small = folder / "small.sqlite"
    small.write_bytes(gzip.decompress((NSYS_DIR / "torch_zeros_sum_no_nvtx.sqlite.gz").read_bytes()))
    demo = Path(write_demo_export(folder / "demo"))
    for path in (small, demo):
        db = sqlite3.connect(path)
        have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in _NSYS_TABLES:
            if table in have:
                db.executescript(f"CREATE TABLE tmp_copy AS SELECT * FROM {table}; DROP TABLE {table}; "
                                 f"ALTER TABLE tmp_copy RENAME TO {table};")
        db.commit()
        db.close()
    return [small, demo]


def mutate_nsys(base: Path, path: Path, rng: random.Random) -> list[str]:
    shutil.copyfile(base, path)
    db = sqlite3.connect(path)
    have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables = [t for t in _NSYS_TABLES if t in have]
    done = []
    for _ in range(rng.randint(1, 3)):
        table = rng.choice(tables)
        columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
        rows = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        op = rng.choice(["odd", "odd", "odd", "duplicate", "shift", "empty"])
        if op == "odd" and rows:
            column = rng.choice([c for c in columns if c in ("start", "end", "deviceId", "streamId", "correlationId",
                                                             "globalPid", "globalTid", "value", "id", "textId",
                                                             "eventType", "domainId", "nameId", "demangledName",
                                                             "utcEpochNs", "int64Value")] or columns)
            value = rng.choice(_NSYS_ODD)
            db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (value, rng.randint(1, rows)))
            done.append(f"{table}.{column}={value!r}")
        elif op == "duplicate" and rows:
            db.execute(f"INSERT INTO {table} SELECT * FROM {table} WHERE rowid = ?", (rng.randint(1, rows),))
            done.append(f"{table} row duplicated")
        elif op == "shift" and "start" in columns and "end" in columns and rows:
            delta = rng.choice([-1, 1]) * rng.choice([10**3, 10**9, 10**14, 10**17])
            db.execute(f"UPDATE {table} SET start = start + ?, end = end + ? WHERE rowid = ?",
                       (delta, delta, rng.randint(1, rows)))
            done.append(f"{table} row shifted {delta} ns")
        elif op == "empty":
            db.execute(f"DELETE FROM {table}")
            done.append(f"{table} emptied")
    db.commit()
    db.close()
    if rng.random() < 0.1:
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
        done.append("file truncated")
    return done


@pytest.mark.parametrize("which", [0, 1], ids=["shared_small", "demo_nvtx"])
def test_nsys_mutants(tmp_path, nsys_bases, which):
    base = nsys_bases[which]
    rng = random.Random(f"nsys-{which}{SEED}")
    for n in range(30 * SCALE):
        path = tmp_path / f"m{n}.sqlite"
        done = mutate_nsys(base, path, rng)
        what = f"{base.name} mutant {n}: {'; '.join(done)}"
        with no_hang(60, what):
            check_summary(path, what)
        path.unlink()


# ------------------------------------------------------------------------------------------
# Run directories.


@pytest.fixture(scope="module")
def run_base(tmp_path_factory) -> Path:
    from molmo_latency.sweep import SweepSpec, run_sweep

    out = tmp_path_factory.mktemp("fuzz_run") / "run"
    run_sweep("tiny", SweepSpec.from_dict({"crops": [1, 2], "top_k": [2], "blocks": [2], "prompt_tokens": [4],
                                           "new_tokens": [3], "repeats": 2, "warmup": 0, "seed": 0}), out)
    return out


def mutate_run(run: Path, rng: random.Random, outside: Path) -> list[str]:
    parts = sorted(p for p in (run / "parts").rglob("*.parquet"))
    done = []
    for _ in range(rng.randint(1, 2)):
        op = rng.choice(["truncate_part", "junk_part", "copy_part", "run_json", "drop_table", "dir_part",
                         "fifo_part", "empty_frame_part", "report_link", "drop_parts", "junk_table"])
        part = rng.choice(parts) if parts else None
        if part is None or not part.exists() or not part.is_file():
            continue
        if op == "truncate_part":
            data = part.read_bytes()
            part.write_bytes(data[: rng.randrange(len(data))])
        elif op == "junk_part":
            data = bytearray(part.read_bytes())
            at = rng.randrange(len(data))
            data[at:at + 8] = rng.randbytes(8)
            part.write_bytes(bytes(data))
        elif op == "copy_part":
            other = rng.choice([p for p in parts if p.parent == part.parent])
            if other != part:
                shutil.copyfile(part, other)
        elif op == "run_json":
            (run / "run.json").write_bytes(rng.choice([b"", b"[]", b"null", b'{"identity": 5}', b"\xff\xfe{",
                                                       b'{"identity": {}', rng.randbytes(40)]))
        elif op == "drop_table":
            (run / "requests.parquet").unlink(missing_ok=True)
        elif op == "dir_part":
            part.unlink()
            part.mkdir()
        elif op == "fifo_part":
            part.unlink()
            os.mkfifo(part)
        elif op == "empty_frame_part":
            pl.DataFrame({"x": [1]}).write_parquet(part)
        elif op == "report_link" and not (run / "report").is_symlink():
            shutil.rmtree(run / "report", ignore_errors=True)
            (run / "report").symlink_to(outside)
        elif op == "drop_parts":
            shutil.rmtree(run / "parts")
            parts = []
        elif op == "junk_table":
            (run / "phases.parquet").write_bytes(rng.randbytes(100))
        done.append(f"{op} {part.relative_to(run) if part else ''}")
    return done


def test_run_directory_mutants(tmp_path, run_base, monkeypatch):
    from molmo_latency.cli.main import main

    rng = random.Random(f"rundir{SEED}")
    outside = tmp_path / "outside"
    outside.mkdir()
    for n in range(12 * SCALE):
        run = tmp_path / f"run{n}"
        shutil.copytree(run_base, run, symlinks=True)
        done = mutate_run(run, rng, outside)
        what = f"run mutant {n}: {'; '.join(done)}"
        if n % 4:  # plots are slow to draw; a quarter of the mutants draw them
            monkeypatch.setattr("molmo_latency.show.report_plots.write_report_plots", lambda rep, d: ([], []))
        else:
            monkeypatch.undo()
        out, err = io.StringIO(), io.StringIO()
        with no_hang(60, what), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["report", str(run), "--json"])
        assert code in (0, 2), (what, code, err.getvalue())
        if code == 2:
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("molmo-latency: error: "), (what, err.getvalue())
        else:
            doc = json.loads(out.getvalue())
            assert sum(c["n_valid"] for c in doc["configs"]) <= 4, what
        assert list(outside.iterdir()) == [], f"{what}: something was written outside the run"
        shutil.rmtree(run)


# ------------------------------------------------------------------------------------------
# Estimator directories: loading never tracebacks.


@pytest.fixture(scope="module")
def model_base(tmp_path_factory) -> Path:
    from molmo_latency.estimator import example_requests, fit_estimator

    return fit_estimator(example_requests(seed=0), hold_out_new_tokens=False).save(
        tmp_path_factory.mktemp("fuzz_model") / "model")


def _json_odd(value, rng: random.Random):
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        if rng.random() < 0.3:
            value.pop(key)
        else:
            value[key] = _json_odd(value[key], rng) if rng.random() < 0.5 else copy.deepcopy(rng.choice(ODD))
        return value
    if isinstance(value, list) and value:
        i = rng.randrange(len(value))
        value[i] = _json_odd(value[i], rng) if rng.random() < 0.5 else copy.deepcopy(rng.choice(ODD))
        return value
    return copy.deepcopy(rng.choice(ODD))


def test_estimator_directory_mutants(tmp_path, model_base):
    from molmo_latency.estimator import Estimator

    rng = random.Random(f"estimator{SEED}")
    meta = json.loads((model_base / "model.json").read_text())
    for n in range(25 * SCALE):
        d = tmp_path / f"model{n}"
        shutil.copytree(model_base, d)
        op = rng.choice(["json_field", "json_field", "json_bytes", "weights_bytes", "weights_truncate", "missing",
                         "fifo"])
        if op == "json_field":
            (d / "model.json").write_text(json.dumps(_json_odd(copy.deepcopy(meta), rng)))
        elif op == "json_bytes":
            data = bytearray((d / "model.json").read_bytes())
            at = rng.randrange(len(data))
            data[at:at + 4] = rng.randbytes(4)
            (d / "model.json").write_bytes(bytes(data))
        elif op == "weights_bytes":
            data = bytearray((d / "weights.safetensors").read_bytes())
            at = rng.randrange(len(data))
            data[at:at + 4] = rng.randbytes(4)
            (d / "weights.safetensors").write_bytes(bytes(data))
        elif op == "weights_truncate":
            data = (d / "weights.safetensors").read_bytes()
            (d / "weights.safetensors").write_bytes(data[: rng.randrange(len(data))])
        elif op == "missing":
            (d / rng.choice(["model.json", "weights.safetensors"])).unlink()
        elif op == "fifo":
            victim = d / rng.choice(["model.json", "weights.safetensors"])
            victim.unlink()
            os.mkfifo(victim)
        what = f"model mutant {n}: {op}"
        with no_hang(60, what):
            try:
                Estimator.load(d)
            except MolmoLatencyError as exc:
                assert "\n" not in str(exc), (what, str(exc))
        shutil.rmtree(d)
