"""Bad input: a clear one-line TraceError naming the file, or a valid result with a warning.

Never any other exception: checked case by case and with hypothesis on mutated real traces.
"""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys
import warnings
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molmo_latency.errors import MolmoLatencyError, TraceError
from molmo_latency.trace import KinetoTrace, TraceWarning, read_kineto
from tests.test_trace_reader import DATA, raw_trace

REPO = Path(__file__).resolve().parents[1]
SMALL = DATA / "event_sync_multi_stream.json.gz"


def small_doc() -> dict:
    return json.loads(json.dumps(raw_trace(SMALL), default=float))


def write(tmp_path: Path, content: bytes | str | dict, name: str = "trace.json") -> Path:
    path = tmp_path / name
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def assert_trace_error(path: Path, *words: str) -> str:
    with pytest.raises(TraceError) as info:
        read_kineto(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), message
    assert isinstance(info.value, MolmoLatencyError)
    return message


# ------------------------------------------------------------------------------------------
# One-line errors.


def test_truncated_gzip(tmp_path):
    data = SMALL.read_bytes()
    path = write(tmp_path, data[: len(data) // 2], "trace.json.gz")
    assert_trace_error(path, "gzip")


def test_corrupt_gzip(tmp_path):
    data = bytearray(SMALL.read_bytes())
    data[40:60] = b"\x00" * 20
    assert_trace_error(write(tmp_path, bytes(data), "trace.json.gz"), "gzip")


@pytest.mark.parametrize("text", ['{"traceEvents": [', '{"traceEvents": [{"ph": "X",}]}', "nope", '{"a": 1,,}'])
def test_invalid_json(tmp_path, text):
    assert_trace_error(write(tmp_path, text), "json")


def test_truncated_json_of_a_real_trace(tmp_path):
    text = gzip.decompress(SMALL.read_bytes())
    assert_trace_error(write(tmp_path, text[: len(text) * 2 // 3]), "truncated")


@pytest.mark.parametrize("content", ['{"schemaVersion": 1, "deviceProperties": []}', '{"foo": [1, 2]}'])
def test_missing_trace_events(tmp_path, content):
    assert_trace_error(write(tmp_path, content), "traceEvents")


@pytest.mark.parametrize("content", ["42", '"a string"', '{"traceEvents": {"ph": "X"}}', "[1, 2, 3]",
                                     '{"traceEvents": [["X", "kernel"]]}'])
def test_not_a_trace(tmp_path, content):
    assert_trace_error(write(tmp_path, content))


def test_a_png_is_not_a_trace(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
    assert_trace_error(write(tmp_path, png, "plot.png"))


@pytest.mark.parametrize(("field", "where"), [
    ("ts", None), ("dur", None), ("pid", None), ("correlation", "args"), ("device", "args"),
    ("External id", "args"), ("baseTimeNanoseconds", "top"),
])
def test_integers_beyond_int64(tmp_path, field, where):
    doc = small_doc()
    event = next(e for e in doc["traceEvents"] if e.get("cat") == "kernel")
    if where == "top":
        doc[field] = 2**64 + 1
    elif where == "args":
        event["args"][field] = 2**70
    else:
        event[field] = 2**70
    message = assert_trace_error(write(tmp_path, doc))
    assert ("int64" in message or "range" in message or "9223372036854775807" in message
            or "9007199254740992" in message), message


def test_invalid_utf8(tmp_path):
    text = json.dumps(small_doc()).encode()
    bad = text.replace(b'"ampere_sgemm_128x64_nn"', b'"ampere_\xff\xfe_nn"', 1)
    assert bad != text
    assert_trace_error(write(tmp_path, bad), "utf-8")


def test_invalid_utf8_in_metadata(tmp_path):
    text = b'{"traceName": "\xc3\x28", "traceEvents": []}'
    assert_trace_error(write(tmp_path, text), "utf-8")


def test_wrong_types_name_the_event(tmp_path):
    doc = small_doc()
    index = next(i for i, e in enumerate(doc["traceEvents"]) if e.get("cat") == "kernel")
    doc["traceEvents"][index]["ts"] = "yesterday"
    message = assert_trace_error(write(tmp_path, doc))
    assert f"traceEvents[{index}]" in message and "ts" in message


@pytest.mark.parametrize("content", [b"", b"   \n"])
def test_empty_file(tmp_path, content):
    assert_trace_error(write(tmp_path, content), "empty")


def test_missing_file_and_directory(tmp_path):
    assert_trace_error(tmp_path / "nope.json", "no such file")
    assert_trace_error(tmp_path, "directory")


# ------------------------------------------------------------------------------------------
# Valid results with a warning.


def test_empty_trace_is_valid_with_a_warning(tmp_path):
    with pytest.warns(TraceWarning, match="no GPU activities"):
        trace = read_kineto(write(tmp_path, '{"traceEvents": []}'))
    assert trace.events == 0
    for table in (trace.gpu, trace.runtime, trace.cpu_ops, trace.annotations, trace.gpu_annotations):
        assert table.height == 0 and table["start_ns"].dtype == pl.Int64


def test_cpu_only_trace_is_valid_with_a_warning():
    with pytest.warns(TraceWarning, match="CPU-only"):
        trace = read_kineto(DATA / "cpu_only.json.gz")
    assert trace.gpu.height == 0 and trace.annotations.height == 11


def test_events_without_dur_are_skipped_with_a_warning(tmp_path):
    doc = small_doc()
    kernels = [e for e in doc["traceEvents"] if e.get("cat") == "kernel"]
    del kernels[0]["dur"]
    with pytest.warns(TraceWarning, match="skipped 1 event"):
        trace = read_kineto(write(tmp_path, doc))
    assert trace.skipped == 1
    assert trace.gpu.filter(pl.col("kind") == "kernel").height == len(kernels) - 1


def test_events_without_args_are_kept(tmp_path):
    doc = small_doc()
    kernel = next(e for e in doc["traceEvents"] if e.get("cat") == "kernel")
    del kernel["args"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        trace = read_kineto(write(tmp_path, doc))
    row = trace.gpu.filter(pl.col("correlation").is_null())
    assert row.height == 1
    assert row["device"].item() == kernel["pid"] and row["stream"].item() == kernel["tid"]


def test_events_without_ph_take_the_slow_path(tmp_path):
    doc = small_doc()
    for event in doc["traceEvents"]:
        if event.get("cat") == "ac2g":
            del event["ph"]
    assert read_kineto(write(tmp_path, doc)).gpu.equals(read_kineto(SMALL).gpu)


# ------------------------------------------------------------------------------------------
# Mutated traces: nothing but TraceError escapes.

_BASE = None


def _base() -> dict:
    global _BASE
    if _BASE is None:
        _BASE = small_doc()
    return _BASE


_ODD_VALUES = st.sampled_from([
    None, "", "x", "0x0", 1.5, -1, 0, 2**63, -(2**63) - 1, 2**53 + 1, 2**70, 1e300, -1e300, True, False,
    [], [1, 2], [1, "a", None], {}, {"a": 1}, 4458676522690.655, 1695835542514261.123,
])
_KEYS = st.sampled_from(["ph", "cat", "name", "pid", "tid", "ts", "dur", "args", "id", "s"])
_ARG_KEYS = st.sampled_from(["correlation", "device", "stream", "External id", "grid", "block"])
_TOP_KEYS = st.sampled_from(["traceEvents", "baseTimeNanoseconds", "deviceProperties", "schemaVersion",
                             "distributedInfo", "traceName"])


@st.composite
def mutated_traces(draw) -> bytes:
    def odd():  # a fresh copy: sampled lists / dicts must not be shared between examples
        return copy.deepcopy(draw(_ODD_VALUES))

    doc = copy.deepcopy(_base())
    events = doc["traceEvents"]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["delete", "retype", "arg_delete", "arg_retype", "top", "drop_event"]))
        i = draw(st.integers(0, len(events) - 1)) if events else 0
        event = events[i] if events and isinstance(events[i], dict) else {}
        if kind == "delete":
            event.pop(draw(_KEYS), None)
        elif kind == "retype":
            event[draw(_KEYS)] = odd()
        elif kind == "arg_delete" and isinstance(event.get("args"), dict):
            event["args"].pop(draw(_ARG_KEYS), None)
        elif kind == "arg_retype" and isinstance(event.get("args"), dict):
            event["args"][draw(_ARG_KEYS)] = odd()
        elif kind == "top":
            doc[draw(_TOP_KEYS)] = odd()
        elif kind == "drop_event" and events:
            events.pop(i)
        if not isinstance(doc.get("traceEvents"), list):
            break
        events = doc["traceEvents"]
    data = json.dumps(doc).encode()
    byte_mutation = draw(st.sampled_from(["none", "truncate", "insert", "overwrite", "gzip", "gzip_truncate"]))
    if byte_mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif byte_mutation == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif byte_mutation == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=8))
        data = data[:at] + junk + data[at + len(junk):]
    elif byte_mutation == "gzip":
        data = gzip.compress(data)
    elif byte_mutation == "gzip_truncate":
        data = gzip.compress(data)
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=mutated_traces())
def test_mutated_traces_raise_only_trace_error(tmp_path, data):
    path = tmp_path / "mutated.json"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        try:
            trace = read_kineto(path)
        except TraceError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
    assert isinstance(trace, KinetoTrace)
    for table in (trace.gpu, trace.runtime, trace.cpu_ops, trace.annotations, trace.gpu_annotations):
        assert table["start_ns"].dtype == pl.Int64
        assert (table["end_ns"] == table["start_ns"] + table["dur_ns"]).all()


# ------------------------------------------------------------------------------------------
# The CLI maps every bad input to exit 2 and one line.


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


BAD_FILES = {
    "truncated.json.gz": SMALL.read_bytes()[:1500],
    "invalid.json": b'{"traceEvents": [',
    "notrace.json": b'{"foo": 1}',
    "utf8.json": b'{"traceEvents": [{"ph": "X", "cat": "kernel", "name": "\xff"}]}',
    "big.json": b'{"traceEvents": [{"ph": "X", "cat": "kernel", "ts": 1, "dur": 1, "args": {"correlation": '
                + str(2**70).encode() + b"}}]}",
    "empty.json": b"",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, name, as_json):
    from molmo_latency.cli.main import main

    path = write(tmp_path, BAD_FILES[name], name)
    code = main(["trace", "summary", str(path), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("molmo-latency: error: "), err
    assert str(path) in lines[0] and out == ""


def test_cli_bad_input_in_a_real_process(tmp_path):
    path = write(tmp_path, BAD_FILES["truncated.json.gz"], "truncated.json.gz")
    result = run_cli("trace", "summary", str(path), "--json")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"molmo-latency: error: {path}: truncated or corrupt gzip (Compressed file ended before the "
        "end-of-stream marker was reached); re-export or re-copy the trace"
    )
    assert result.stdout == ""
