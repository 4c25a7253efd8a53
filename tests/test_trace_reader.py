"""The Kineto reader against an independent reading of the raw JSON of real traces.

Every expected number here comes from `json` + `gzip` + Python loops over the raw events (see
`raw_trace`), with microseconds turned into nanoseconds through `decimal.Decimal`, never from
molmo_latency. The traces are HTA's test data (tests/data/kineto/README.md).
"""

from __future__ import annotations

import collections
import gzip
import json
import warnings
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.trace import KinetoTrace, TraceWarning, kernel_breakdown, read_kineto

DATA = Path(__file__).parent / "data" / "kineto"
TRACES = sorted(p.name for p in DATA.glob("*.json.gz"))
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver")
WITH_GPU = [
    "alexnet_a100_forward.json.gz",
    "amd_mi250_minitoy.json.gz",
    "compare_base.json.gz",
    "compare_test.json.gz",
    "event_sync_multi_stream.json.gz",
    "nccl_training.json.gz",
    "training_sampled_rank0.json.gz",
    "triton_single_kernel.json.gz",
]
WITHOUT_GPU = ["cpu_only.json.gz", "cupti_profiler_ranges.json.gz", "non_gpu.json.gz"]


# ------------------------------------------------------------------------------------------
# The independent reading (shared by the other test_trace_* modules).


def raw_trace(path: Path) -> dict:
    """The trace as plain JSON, floats kept exact as Decimal."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f, parse_float=Decimal)


def us_to_ns(value) -> int:
    return int((Decimal(value) * 1000).to_integral_value(rounding=ROUND_HALF_EVEN))


def raw_events(path: Path, cats: tuple[str, ...]) -> list[dict]:
    """Complete events of the given categories, with exact `start_ns` / `dur_ns` added."""
    doc = raw_trace(path)
    base = doc.get("baseTimeNanoseconds", 0)
    out = []
    for event in doc["traceEvents"]:
        if event.get("ph") == "X" and event.get("cat") in cats:
            event = dict(event)
            event["start_ns"] = base + us_to_ns(event["ts"])
            event["dur_ns"] = us_to_ns(event["dur"])
            out.append(event)
    return out


def read(name: str) -> KinetoTrace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        return read_kineto(DATA / name)


# ------------------------------------------------------------------------------------------


def test_data_is_the_shared_set():
    assert len(TRACES) == 11
    assert sorted(WITH_GPU + WITHOUT_GPU) == TRACES


@pytest.mark.parametrize("name", TRACES)
def test_per_kernel_counts_and_totals_are_exact(name):
    expected: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for event in raw_events(DATA / name, GPU_CATS):
        expected[event["name"]][0] += 1
        expected[event["name"]][1] += event["dur_ns"]

    got = {r["name"]: [r["count"], r["total_ns"]] for r in kernel_breakdown(read(name).gpu).iter_rows(named=True)}

    assert got == dict(expected)
    assert (len(got) > 0) == (name in WITH_GPU)


@pytest.mark.parametrize("name", TRACES)
def test_every_table_holds_exactly_the_raw_events(name):
    trace = read(name)
    tables = {
        GPU_CATS: (trace.gpu, "name"),
        RUNTIME_CATS: (trace.runtime, "name"),
        ("cpu_op",): (trace.cpu_ops, "name"),
        ("user_annotation",): (trace.annotations, "name"),
        ("gpu_user_annotation",): (trace.gpu_annotations, "name"),
    }
    for cats, (table, _) in tables.items():
        expected = collections.Counter((e["name"], e["start_ns"], e["dur_ns"]) for e in raw_events(DATA / name, cats))
        got = collections.Counter(table.select("name", "start_ns", "dur_ns").iter_rows())
        assert got == expected, cats
        assert (table["end_ns"] == table["start_ns"] + table["dur_ns"]).all()
        assert table["start_ns"].is_sorted()


@pytest.mark.parametrize("name", WITH_GPU)
def test_gpu_columns_come_from_args(name):
    raw = raw_events(DATA / name, GPU_CATS)
    expected = collections.Counter(
        (e["args"].get("device"), e["args"].get("stream"), e["args"].get("correlation"), e["start_ns"])
        for e in raw
    )
    got = collections.Counter(read(name).gpu.select("device", "stream", "correlation", "start_ns").iter_rows())
    assert got == expected
    kernels = [e for e in raw if e["cat"] == "kernel"]
    grids = collections.Counter(tuple(e["args"]["grid"]) if "grid" in e["args"] else None for e in kernels)
    table = read(name).gpu.filter(pl.col("kind") == "kernel")
    assert collections.Counter(tuple(g) if g is not None else None for g in table["grid"].to_list()) == grids


@pytest.mark.parametrize("name", WITH_GPU)
def test_runtime_calls_keep_thread_and_correlation(name):
    raw = raw_events(DATA / name, RUNTIME_CATS)
    expected = collections.Counter((e["pid"], e["tid"], e["args"].get("correlation"), e["start_ns"]) for e in raw)
    got = collections.Counter(read(name).runtime.select("pid", "tid", "correlation", "start_ns").iter_rows())
    assert got == expected


def test_layouts_and_metadata():
    nccl = read("nccl_training.json.gz")
    assert nccl.layout == "relative"
    assert nccl.base_time_ns == raw_trace(DATA / "nccl_training.json.gz")["baseTimeNanoseconds"]
    assert nccl.device_properties[0]["name"] == "NVIDIA A100-PG509-200"
    alexnet = read("alexnet_a100_forward.json.gz")
    assert alexnet.layout == "absolute" and alexnet.base_time_ns == 0
    assert alexnet.devices == [0]
    amd = read("amd_mi250_minitoy.json.gz")
    assert amd.devices == [2]
    assert amd.runtime["name"].str.starts_with("hip").all()
    # Times are ns since the epoch in both layouts: the traces were recorded 2023 and 2024.
    assert 1.6e18 < alexnet.gpu["start_ns"].min() < 1.8e18
    assert 1.6e18 < nccl.gpu["start_ns"].min() < 1.8e18
    for table in ("gpu", "runtime", "cpu_ops", "annotations", "gpu_annotations"):
        for column in ("start_ns", "end_ns", "dur_ns"):
            assert getattr(nccl, table)[column].dtype == pl.Int64


def test_both_layouts_of_the_same_events_give_the_same_tables(tmp_path):
    """alexnet (older layout: absolute integer us) rewritten in the newer layout must read the same."""
    doc = raw_trace(DATA / "alexnet_a100_forward.json.gz")
    base_ns = 1_695_835_000_000_000_000
    for event in doc["traceEvents"]:
        if isinstance(event.get("ts"), int):
            # absolute us -> fractional us relative to base; 3 decimals like Kineto writes
            event["ts"] = Decimal(event["ts"] * 1000 - base_ns) / 1000 + Decimal("0.000")
    doc["baseTimeNanoseconds"] = base_ns
    path = tmp_path / "alexnet_relative.json"
    path.write_text(json.dumps(doc, default=lambda d: float(d) if d % 1 else int(d)))
    old, new = read("alexnet_a100_forward.json.gz"), read_kineto(path)
    assert new.layout == "relative"
    for table in ("gpu", "runtime", "cpu_ops", "annotations"):
        assert getattr(new, table).equals(getattr(old, table)), table


def test_fractional_microseconds_become_exact_nanoseconds(tmp_path):
    """Doubles cannot hold 1.7e15 us to the nanosecond; the reader must still be exact."""
    times = [
        ("1695835542514261.123", "0.001"),  # absolute us with a fraction: beyond a double's ns
        ("4458676522690.655", "156.777"),   # newer layout, as in nccl_training
        ("8796093022207.999", "1.5"),       # just below 2**43 us
        ("0.0005", "2.0004"),               # below 1 ns: rounded half to even
    ]
    body = ",".join(
        f'{{"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": {ts}, "dur": {dur}, '
        f'"args": {{"device": 0, "stream": 7, "correlation": {i}}}}}'
        for i, (ts, dur) in enumerate(times)
    )
    path = tmp_path / "fractions.json"
    path.write_text('{"traceEvents": [' + body + "]}")
    gpu = read_kineto(path).gpu.sort("correlation")
    assert gpu["start_ns"].to_list() == [1695835542514261123, 4458676522690655, 8796093022207999, 0]
    assert gpu["dur_ns"].to_list() == [1, 156777, 1500, 2000]
    assert gpu["start_ns"].to_list() == [us_to_ns(ts) for ts, _ in times]


def test_triton_cpu_op_args_with_string_grid_are_tolerated():
    trace = read("triton_single_kernel.json.gz")
    assert trace.gpu["grid"].to_list() == [[1, 1, 1]]
    assert trace.runtime["kind"].to_list() == ["cuda_driver", "cuda_runtime"]
    assert trace.cpu_ops.height == 3


@pytest.mark.parametrize("name", WITHOUT_GPU)
def test_traces_without_gpu_activity_warn_and_have_empty_gpu_tables(name):
    with pytest.warns(TraceWarning, match="no GPU activities"):
        trace = read_kineto(DATA / name)
    assert trace.gpu.height == 0
    assert trace.gpu.columns[:4] == ["name", "kind", "device", "stream"]
    assert trace.cpu_ops.height + trace.annotations.height == len(
        raw_events(DATA / name, ("cpu_op", "user_annotation")))


def test_plain_json_and_bare_event_list(tmp_path):
    doc = raw_trace(DATA / "event_sync_multi_stream.json.gz")
    plain = tmp_path / "t.json"
    plain.write_text(json.dumps(doc, default=float))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(doc["traceEvents"], default=float))
    gz = read("event_sync_multi_stream.json.gz")
    assert read_kineto(plain).gpu.equals(gz.gpu)
    assert read_kineto(bare).gpu.equals(gz.gpu)


# ------------------------------------------------------------------------------------------
# The streaming path (text read in blocks, cut between events) against the whole-text path.


def _whole_text(path: Path) -> KinetoTrace:
    from molmo_latency.trace import _text as text_module, reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        return reader._assemble(path, *reader._parse(path, [reader._read_bytes(path)]))


def _streamed(path: Path) -> KinetoTrace:
    from molmo_latency.trace import _text as text_module, reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        return reader._assemble(path, *reader._stream(path))  # raises if the stream gives up


def _same(a: KinetoTrace, b: KinetoTrace) -> bool:
    tables = ("gpu", "runtime", "cpu_ops", "annotations", "gpu_annotations")
    return all(getattr(a, t).equals(getattr(b, t)) for t in tables) and (
        a.base_time_ns, a.layout, a.events, a.device_properties, a.trace_name
    ) == (b.base_time_ns, b.layout, b.events, b.device_properties, b.trace_name)


@pytest.mark.parametrize("name", TRACES)
def test_streaming_reads_every_shared_trace_like_the_whole_text(name, monkeypatch):
    from molmo_latency.trace import _text as text_module, reader

    assert _same(_streamed(DATA / name), _whole_text(DATA / name))
    # tiny chunks and blocks: hundreds of cuts, gzip blocks ending anywhere
    monkeypatch.setattr(text_module, "_CHUNK_BYTES", 3000)
    monkeypatch.setattr(text_module, "_READ_BYTES", 777)
    assert _same(_streamed(DATA / name), _whole_text(DATA / name))


def test_streaming_copes_with_odd_but_valid_layouts(tmp_path, monkeypatch):
    from molmo_latency.trace import _text as text_module, reader

    monkeypatch.setattr(text_module, "_CHUNK_BYTES", 500)
    monkeypatch.setattr(text_module, "_READ_BYTES", 300)
    doc = raw_trace(DATA / "amd_mi250_minitoy.json.gz")
    for event in doc["traceEvents"]:  # cut candidates inside strings and nested objects
        if event.get("cat") == "kernel":
            event["name"] = "k}, {\"ph\": \"X\"} ]" + event["name"]
            event["args"]["nested"] = [{"a": 1}, {"b": [{"c": 2}]}]
    events = doc.pop("traceEvents")
    tail_first = {"traceName": "x", "deviceProperties": doc.pop("deviceProperties"), "traceEvents": events}
    tail_first.update(doc)  # metadata (with a list of objects) after the events
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(tail_first, default=float, separators=(",", ":")))
    pretty = tmp_path / "pretty.json.gz"
    with gzip.open(pretty, "wt") as f:
        json.dump(tail_first, f, default=float, indent=1)
    two_members = tmp_path / "two_members.json.gz"
    text = json.dumps(tail_first, default=float).encode()
    two_members.write_bytes(gzip.compress(text[:1000]) + gzip.compress(text[1000:]))
    expected = read("amd_mi250_minitoy.json.gz")
    for path in (compact, pretty, two_members):
        got = read_kineto(path)
        assert got.gpu.height == expected.gpu.height == 16
        assert got.gpu.drop("name").equals(expected.gpu.drop("name"))
        assert got.device_properties == expected.device_properties
        assert _same(got, _whole_text(path))
