"""GPU-time attribution against deliberately naive reference loops written here.

The rule under test: a GPU activity belongs to the innermost CPU user_annotation, on the thread
of its launching runtime call (joined on `correlation`), that contains that whole call.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import warnings
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmo_latency.trace import (
    PHASE_GPU_COLUMNS,
    TraceWarning,
    annotation_gpu_stats,
    annotation_name_stats,
    attribute,
    busy_ns,
    charged_name_stats,
    innermost_range,
    kernel_category,
    phase_category_table,
    phase_gpu_table,
    phase_of,
    read_kineto,
    request_of,
    with_category,
)
from tests.test_trace_reader import DATA, GPU_CATS, RUNTIME_CATS, WITH_GPU, raw_events

WITH_ANNOTATIONS = [n for n in WITH_GPU if n != "event_sync_multi_stream.json.gz"]


def read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        return read_kineto(path)


# ------------------------------------------------------------------------------------------
# Naive reference.


def naive_attribution(gpu: list[dict], runtime: list[dict], annotations: list[dict]) -> list[tuple]:
    """(gpu event, launch call or None, index into annotations or None) per GPU event.

    The launch lookup is a dict (nccl_training has 3774 activities x 8740 calls); the
    annotation search is the O(n*m) scan.
    """
    launch_of: dict = {}
    for call in sorted(runtime, key=lambda c: c["start_ns"]):
        launch_of.setdefault(call["args"].get("correlation"), call)
    out = []
    for g in gpu:
        corr = g.get("args", {}).get("correlation")
        call = launch_of.get(corr) if corr is not None else None
        best = None
        if call is not None:
            c_start, c_end = call["start_ns"], call["start_ns"] + call["dur_ns"]
            for i, a in enumerate(annotations):
                a_start, a_end = a["start_ns"], a["start_ns"] + a["dur_ns"]
                if a["pid"] != call["pid"] or a["tid"] != call["tid"]:
                    continue
                if not (a_start <= c_start and c_end <= a_end):
                    continue
                if best is None:
                    best = i
                    continue
                b_start, b_end = annotations[best]["start_ns"], annotations[best]["start_ns"] + annotations[best]["dur_ns"]
                if a_start > b_start or (a_start == b_start and a_end < b_end):
                    best = i
        out.append((g, call, best))
    return out


def naive_union(intervals: list[tuple[int, int]]) -> int:
    total, cur_start, cur_end = 0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def naive_stats(charged: list[tuple]) -> dict:
    """Per annotation index: count, kernel ns, busy, span, idle, delay mean and max."""
    groups = collections.defaultdict(list)
    for g, call, idx in charged:
        if idx is not None:
            groups[idx].append((g, call))
    out = {}
    for idx, items in groups.items():
        intervals = [(g["start_ns"], g["start_ns"] + g["dur_ns"]) for g, _ in items]
        delays = [g["start_ns"] - call["start_ns"] for g, call in items]
        span = max(e for _, e in intervals) - min(s for s, _ in intervals)
        busy = naive_union(intervals)
        out[idx] = {
            "count": len(items),
            "kernel_ns": sum(g["dur_ns"] for g, _ in items),
            "busy_ns": busy,
            "span_ns": span,
            "idle_ns": span - busy,
            "delay_mean_ns": sum(delays) / len(delays),
            "delay_max_ns": max(delays),
        }
    return out


def raw(path: Path) -> tuple[list, list, list]:
    return (
        raw_events(path, GPU_CATS),
        raw_events(path, RUNTIME_CATS),
        raw_events(path, ("user_annotation",)),
    )


# ------------------------------------------------------------------------------------------
# Real traces.


@pytest.mark.parametrize("name", WITH_ANNOTATIONS)
def test_per_annotation_name_kernels_match_naive_attribution(name):
    gpu, runtime, annotations = raw(DATA / name)
    expected: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for g, _, idx in naive_attribution(gpu, runtime, annotations):
        if idx is not None:
            expected[annotations[idx]["name"]][0] += 1
            expected[annotations[idx]["name"]][1] += g["dur_ns"]
    instances = collections.Counter(a["name"] for a in annotations)

    trace = read(DATA / name)
    attributed = attribute(trace.gpu, trace.runtime, trace.annotations)
    per_name = annotation_name_stats(annotation_gpu_stats(attributed, trace.annotations))
    charged = charged_name_stats(attributed, trace.annotations)  # what `trace summary` computes
    for table in (per_name, charged):
        got = {r["name"]: [r["gpu_activities"], r["gpu_kernel_ns"]] for r in table.iter_rows(named=True)
               if r["gpu_activities"]}
        assert got == dict(expected)
        assert dict(zip(table["name"], table["instances"])) == dict(instances)
    # the busy/span/idle sums and the launch delays: the same figures, rows and order by both ways
    assert charged.equals(per_name)


@pytest.mark.parametrize("name", WITH_ANNOTATIONS)
def test_per_instance_busy_span_idle_and_launch_delay_match_naive(name):
    gpu, runtime, annotations = raw(DATA / name)
    expected = naive_stats(naive_attribution(gpu, runtime, annotations))
    trace = read(DATA / name)
    stats = annotation_gpu_stats(attribute(trace.gpu, trace.runtime, trace.annotations), trace.annotations)
    by_key = {}
    for idx, a in enumerate(annotations):
        by_key.setdefault((a["name"], a["pid"], a["tid"], a["start_ns"], a["start_ns"] + a["dur_ns"]), []).append(idx)
    assert stats.height == len(annotations)
    for row in stats.iter_rows(named=True):
        idx = by_key[(row["name"], row["pid"], row["tid"], row["start_ns"], row["end_ns"])].pop(0)
        exp = expected.get(idx)
        if exp is None:
            assert row["gpu_activities"] == 0 and row["gpu_busy_ns"] == 0 and row["launch_delay_mean_ns"] is None
            continue
        assert row["gpu_activities"] == exp["count"]
        assert row["gpu_kernel_ns"] == exp["kernel_ns"]
        assert row["gpu_busy_ns"] == exp["busy_ns"]
        assert row["gpu_span_ns"] == exp["span_ns"]
        assert row["gpu_idle_ns"] == exp["idle_ns"]
        assert row["launch_delay_mean_ns"] == pytest.approx(exp["delay_mean_ns"], rel=1e-12)
        assert row["launch_delay_max_ns"] == exp["delay_max_ns"]


def test_alexnet_annotations_charge_every_activity():
    """The `[param|...]` ranges of alexnet enclose every launch: nothing is left unattributed."""
    trace = read(DATA / "alexnet_a100_forward.json.gz")
    out = attribute(trace.gpu, trace.runtime, trace.annotations)
    assert out["annotation_id"].null_count() == 0
    assert set(out["annotation"]) == {
        "[param|cuda]",
        "[param|pytorch.model.alex_net|0|0|0|warmup|forward]",
        "[param|pytorch.model.alex_net|0|0|0|measure|forward]",
    }


def test_amd_hip_launches_join_on_correlation():
    gpu, runtime, _ = raw(DATA / "amd_mi250_minitoy.json.gz")
    trace = read(DATA / "amd_mi250_minitoy.json.gz")
    out = attribute(trace.gpu, trace.runtime, trace.annotations)
    linked = {g["start_ns"]: call["name"] for g, call, _ in naive_attribution(gpu, runtime, []) if call}
    assert len(linked) == len(gpu) == out["launch_name"].is_not_null().sum()
    assert dict(zip(out["start_ns"], out["launch_name"])) == linked
    assert out["launch_name"].str.starts_with("hip").all()


def test_triton_annotation_on_another_pid_does_not_take_the_kernel():
    trace = read(DATA / "triton_single_kernel.json.gz")
    out = attribute(trace.gpu, trace.runtime, trace.annotations)
    assert out["launch_name"].to_list() == ["cuLaunchKernel"]
    assert out["annotation"].to_list() == [None]  # ProfilerStep#1 is on pid 3100453, the launch on 1670242


# ------------------------------------------------------------------------------------------
# Phases: a trace shaped like the ones profile_phases records, built here.

MAIN, OTHER = (10, 10), (10, 11)


def _profiler_like_trace() -> dict:
    events: list[dict] = []
    corr = iter(range(1, 10_000))

    def ann(name, ts, dur, thread=MAIN):
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": thread[0], "tid": thread[1],
                       "ts": ts, "dur": dur, "args": {"External id": 1}})

    def launch(ts, kernel_ts, kernel_dur, name="gemv_kernel", stream=7, thread=MAIN, runtime=True):
        c = next(corr)
        if runtime:
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": thread[0],
                           "tid": thread[1], "ts": ts, "dur": 1.25, "args": {"correlation": c}})
        events.append({"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": kernel_ts,
                       "dur": kernel_dur, "args": {"device": 0, "stream": stream, "correlation": c}})

    ann("request[0]", 1000.0, 1000.0)
    ann("vision", 1010.0, 90.0)
    launch(1011.5, 1015.25, 20.5, "siglip_gemm")
    launch(1020.0, 1040.0, 10.0, "flash_fwd_kernel")
    ann("projector", 1110.0, 40.0)
    launch(1111.0, 1112.0, 3.0, "projector_gemm")
    ann("prefill", 1160.0, 240.0)
    ann("aten::helper_range", 1170.0, 30.0)  # a non-phase annotation nested in prefill
    launch(1171.0, 1180.0, 50.0, "flash_fwd_kernel", stream=7)
    launch(1175.0, 1190.0, 20.0, "rms_norm_kernel", stream=13)  # overlaps on another stream
    launch(1250.0, 1260.0, 5.0, "fused_moe_kernel")
    launch(1251.0, 1265.0, 5.0, "gemv_kernel", thread=OTHER)  # other thread: not prefill's
    ann("decode[0]", 1410.0, 90.0)
    launch(1411.0, 1500.0, 7.125, "gemv_kernel")
    ann("decode[1]", 1510.0, 90.0)
    launch(1511.0, 1600.0, 6.875, "gemv_kernel")
    launch(1520.0, 1620.0, 1.0, "gemv_kernel", runtime=False)  # launch missing: unattributed

    ann("request[1]", 3000.0, 1000.0)
    ann("vision", 3010.0, 50.0)
    launch(3011.0, 3012.0, 8.0, "siglip_gemm")
    ann("vision", 3070.0, 20.0)  # a second vision instance: step 1
    launch(3071.0, 3072.0, 2.0, "siglip_gemm")
    ann("prefill", 3100.0, 100.0)
    ann("molmo_latency/decode#0", 3210.0, 40.0)
    launch(3211.0, 3230.0, 4.0, "gemv_kernel")
    ann("decode", 3260.0, 40.0)  # no step in the name: occurrence index within the request
    launch(3261.0, 3280.0, 4.5, "gemv_kernel")

    ann("prefill", 5000.0, 100.0)  # outside any request
    launch(5001.0, 5002.0, 1.0, "rms_norm_kernel")
    return {"baseTimeNanoseconds": 1_700_000_000_000_000_000, "traceEvents": events}


PHASE_RE = re.compile(r"^(molmo_latency/)?(vision|projector|prefill|decode)(\[(\d+)\]|#(\d+))?$")


def _naive_phase_table(path: Path) -> list[dict]:
    gpu, runtime, annotations = raw(path)
    phases = [a for a in annotations if PHASE_RE.match(a["name"])]
    requests = [a for a in annotations if re.match(r"^request\[(\d+)\]$", a["name"])]
    rows = []
    charged = naive_attribution(gpu, runtime, phases)
    stats = naive_stats(charged)
    seen = collections.Counter()
    for i, p in enumerate(sorted(phases, key=lambda a: a["start_ns"])):
        m = PHASE_RE.match(p["name"])
        request = None
        for r in requests:
            if r["start_ns"] <= p["start_ns"] and p["start_ns"] + p["dur_ns"] <= r["start_ns"] + r["dur_ns"]:
                request = int(r["name"][8:-1])
        step = m.group(4) or m.group(5)
        step = int(step) if step is not None else seen[(request, m.group(2))]
        seen[(request, m.group(2))] += 1
        s = stats.get(phases.index(p), {"count": 0, "kernel_ns": 0, "busy_ns": 0, "span_ns": 0, "idle_ns": 0,
                                         "delay_mean_ns": None})
        rows.append({
            "phase": m.group(2), "step": step, "request": request, "gpu_activities": s["count"],
            "gpu_kernel_ms": s["kernel_ns"] / 1e6, "gpu_busy_ms": s["busy_ns"] / 1e6,
            "gpu_span_ms": s["span_ns"] / 1e6, "gpu_idle_ms": s["idle_ns"] / 1e6,
            "launch_delay_mean_us": None if s["delay_mean_ns"] is None else s["delay_mean_ns"] / 1e3,
        })
    return rows


@pytest.fixture()
def profiler_trace(tmp_path) -> Path:
    path = tmp_path / "requests_0-1.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_profiler_like_trace(), f)
    return path


def test_phase_gpu_table_matches_naive(profiler_trace):
    table = phase_gpu_table(read(profiler_trace))
    assert dict(table.schema) == PHASE_GPU_COLUMNS
    expected = _naive_phase_table(profiler_trace)
    got = table.to_dicts()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert {k: g[k] for k in ("phase", "step", "request", "gpu_activities")} == {
            k: e[k] for k in ("phase", "step", "request", "gpu_activities")}
        for k in ("gpu_kernel_ms", "gpu_busy_ms", "gpu_span_ms", "gpu_idle_ms", "launch_delay_mean_us"):
            if e[k] is None:  # a phase with no kernel has no launch delay
                assert g[k] is None, (g, k)
            else:
                assert g[k] == pytest.approx(e[k], rel=1e-12, abs=1e-15), (g, k)


def test_phase_gpu_table_by_hand(profiler_trace):
    """A few figures worked out by hand from _profiler_like_trace."""
    table = phase_gpu_table(read(profiler_trace))
    keys = [(r["request"], r["phase"], r["step"]) for r in table.iter_rows(named=True)]
    assert keys == [
        (0, "vision", 0), (0, "projector", 0), (0, "prefill", 0), (0, "decode", 0), (0, "decode", 1),
        (1, "vision", 0), (1, "vision", 1), (1, "prefill", 0), (1, "decode", 0), (1, "decode", 1),
        (None, "prefill", 0),
    ]
    prefill = table.row(2, named=True)
    # flash 1180-1230 on stream 7, rms_norm 1190-1210 on stream 13 (inside the helper range, still
    # prefill's), fused_moe 1260-1265; the OTHER-thread gemv is not prefill's.
    assert prefill["gpu_activities"] == 3
    assert prefill["gpu_kernel_ms"] == pytest.approx(0.075)
    assert prefill["gpu_busy_ms"] == pytest.approx(0.055)
    assert prefill["gpu_span_ms"] == pytest.approx(0.085)
    assert prefill["gpu_idle_ms"] == pytest.approx(0.030)
    assert prefill["launch_delay_mean_us"] == pytest.approx((9 + 15 + 10) / 3)
    assert table.row(4, named=True)["gpu_kernel_ms"] == pytest.approx(0.006875)  # decode[1] without the orphan
    assert table.filter(pl.col("request") == 1, pl.col("phase") == "prefill")["gpu_activities"].item() == 0


def test_phase_category_table(profiler_trace):
    table = phase_category_table(read(profiler_trace))
    prefill0 = table.filter(pl.col("request") == 0, pl.col("phase") == "prefill")
    assert dict(zip(prefill0["category"], prefill0["gpu_activities"])) == {
        "attention": 1, "norm": 1, "moe_experts": 1}


def test_summary_keeps_nested_annotations_innermost(profiler_trace):
    """With all annotations, the helper range nested in prefill takes the kernels it launched."""
    trace = read(profiler_trace)
    out = attribute(trace.gpu, trace.runtime, trace.annotations)
    by_kernel = dict(zip(out["start_ns"] - trace.base_time_ns, out["annotation"]))
    assert by_kernel[1_180_000] == "aten::helper_range"
    assert by_kernel[1_190_000] == "aten::helper_range"
    assert by_kernel[1_260_000] == "prefill"
    assert by_kernel[1_265_000] is None  # launched on the other thread, inside no annotation there
    assert by_kernel[1_620_000] is None  # no launch call


def test_phase_names():
    assert phase_of("vision") == ("vision", None)
    assert phase_of("decode[12]") == ("decode", 12)
    assert phase_of("molmo_latency/decode#3") == ("decode", 3)
    assert phase_of("decode") == ("decode", None)
    for other in ("ProfilerStep#3", "decoder", "nccl:all_reduce", "request[0]", "aten::mm"):
        assert phase_of(other) is None
    assert request_of("request[7]") == 7 and request_of("request") is None and request_of("decode[1]") is None


# ------------------------------------------------------------------------------------------
# Building blocks against brute force.

_times = st.integers(min_value=0, max_value=60)


@settings(max_examples=150, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 1), _times, st.integers(0, 40)), max_size=12),
    queries=st.lists(st.tuples(st.integers(0, 2), _times, st.integers(0, 10)), max_size=12),
)
def test_innermost_range_is_latest_start_then_earliest_end(ranges, queries):
    r = pl.DataFrame({"pid": [1] * len(ranges), "tid": [t for t, _, _ in ranges],
                      "start_ns": [s for _, s, _ in ranges], "end_ns": [s + d for _, s, d in ranges]},
                     schema={"pid": pl.Int64, "tid": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64})
    q = pl.DataFrame({"pid": [1] * len(queries), "tid": [t for t, _, _ in queries],
                      "start_ns": [s for _, s, _ in queries], "end_ns": [s + d for _, s, d in queries]},
                     schema={"pid": pl.Int64, "tid": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64})
    expected = []
    for qt, qs, qd in queries:
        best = None
        for i, (rt, rs, rd) in enumerate(ranges):
            if rt == qt and rs <= qs and qs + qd <= rs + rd:
                if best is None or (rs, -(rs + rd)) > (ranges[best][1], -(ranges[best][1] + ranges[best][2])):
                    best = i
        expected.append(best)
    assert innermost_range(q, r).to_list() == expected


def _brute_innermost(ranges, queries):
    """(thread, start, end) tuples: the rule read directly (latest start, earliest end, first row)."""
    expected = []
    for qt, qs, qe in queries:
        best = None
        for i, (rt, rs, re_) in enumerate(ranges):
            if rt == qt and rs <= qs and qe <= re_ and (best is None or (rs, -re_) > (ranges[best][1], -ranges[best][2])):
                best = i
        expected.append(best)
    return expected


def _frame(rows):
    return pl.DataFrame({"pid": [7] * len(rows), "tid": [t for t, _, _ in rows], "start_ns": [s for _, s, _ in rows],
                         "end_ns": [e for _, _, e in rows]},
                        schema={"pid": pl.Int64, "tid": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64})


@st.composite
def _nested(draw):
    """Push/pop ranges of a few threads, as a profiler writes them: every range inside the one open
    when it opened. Steps of 0 ns make ranges start or end together, and identical ranges."""
    rows = []
    for thread in range(draw(st.integers(1, 3))):
        t, stack = 0, []
        for push in draw(st.lists(st.booleans(), max_size=24)):
            t += draw(st.integers(0, 3))
            if push or not stack:
                stack.append(len(rows))
                rows.append([thread, t, None])
            else:
                rows[stack.pop()][2] = t
        for i in reversed(stack):
            t += draw(st.integers(0, 2))
            rows[i][2] = t
    order = draw(st.permutations(range(len(rows))))  # row order is not time order
    return [tuple(rows[i]) for i in order]


@settings(max_examples=300, deadline=None)
@given(ranges=_nested(), queries=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 80), st.integers(0, 6)),
                                          max_size=16))
def test_innermost_range_in_nested_ranges_walks_their_tree(ranges, queries):
    queries = [(t, s, s + d) for t, s, d in queries]
    assert innermost_range(_frame(queries), _frame(ranges)).to_list() == _brute_innermost(ranges, queries)


def test_innermost_range_where_ranges_overlap_without_nesting():
    """C overlaps B without nesting in it: walking up from E (the last range to start before the
    query) through its parents B and A would miss C, the innermost range containing the query."""
    a, b, c, e = (0, 0, 100), (0, 10, 50), (0, 45, 70), (0, 60, 65)
    ranges = [a, b, c, e, (1, 0, 100)]  # thread 1 nests: walked as a tree beside thread 0's join
    queries = [(0, 66, 68), (0, 61, 64), (0, 47, 49), (0, 5, 6), (1, 3, 4), (0, 101, 102)]
    got = innermost_range(_frame(queries), _frame(ranges)).to_list()
    assert got == [2, 3, 2, 0, 4, None] == _brute_innermost(ranges, queries)


@settings(max_examples=200, deadline=None)
@given(nested=_nested(), loose=st.lists(st.tuples(_times, st.integers(0, 40)), max_size=8),
       queries=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 80), st.integers(0, 6)), max_size=16))
def test_innermost_range_with_nested_and_overlapping_threads(nested, loose, queries):
    """Thread 3's ranges overlap without nesting (answered by the join), beside nested threads."""
    ranges = nested + [(3, s, s + d) for s, d in loose]
    queries = [(t, s, s + d) for t, s, d in queries]
    assert innermost_range(_frame(queries), _frame(ranges)).to_list() == _brute_innermost(ranges, queries)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), _times, st.integers(0, 15)), max_size=20))
def test_busy_time_is_the_union_length(intervals):
    frame = pl.DataFrame({"g": [g for g, _, _ in intervals], "start_ns": [s for _, s, _ in intervals],
                          "end_ns": [s + d for _, s, d in intervals]},
                         schema={"g": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64})
    expected = {}
    for group in {g for g, _, _ in intervals}:
        covered = {t for g, s, d in intervals if g == group for t in range(s, s + d)}  # unit cells
        expected[group] = len(covered)
    assert dict(busy_ns(frame, ["g"]).iter_rows()) == expected
    # the same intervals spread over ~2**60 ns (too far to lay the groups end to end on one axis:
    # the per-group running maximum), and grouped by two columns
    scale = 2**56
    far = frame.with_columns(pl.col("start_ns") * scale, pl.col("end_ns") * scale, g2=pl.col("g") % 2)
    assert {g: b for g, _, b in busy_ns(far, ["g", "g2"]).iter_rows()} == {g: v * scale for g, v in expected.items()}


# ------------------------------------------------------------------------------------------
# Categories.


@pytest.mark.parametrize(("name", "kind", "category"), [
    ("Memcpy HtoD (Pageable -> Device)", "gpu_memcpy", "memory"),
    ("Memset (Device)", "gpu_memset", "memory"),
    ("ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*, unsigned long, ncclWork*)", "kernel", "communication"),
    ("fused_moe_kernel", "kernel", "moe_experts"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "kernel", "moe_routing"),
    ("void moe_align_block_size_kernel<int>", "kernel", "moe_routing"),
    ("flash_fwd_splitkv_kernel", "kernel", "attention"),
    ("fmha_cutlassF_f16_aligned_64x128_rf_sm80", "kernel", "attention"),
    ("void (anonymous namespace)::softmax_warp_forward<float, float, float, 10, true, false>", "kernel", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "kernel", "norm"),
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 128, true, 1, true>", "kernel", "norm"),
    ("ampere_sgemm_128x64_nn", "kernel", "gemm"),
    ("Cijk_Alik_Bljk_SB_Bias_AS_SAV_UserArgs_MT64x16x32_MI16x16x1", "kernel", "gemm"),
    ("void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_256x64_16x4_nn_align4>", "kernel", "gemm"),
    ("triton_poi_fused_add_cos_sin_0", "kernel", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "kernel", "elementwise"),
    ("void fbgemm_gpu::permute_2D_lengths_kernel<int>", "kernel", "other"),
])
def test_kernel_categories(name, kind, category):
    assert kernel_category(name, kind) == category
    assert with_category(pl.DataFrame({"name": [name], "kind": [kind]}))["category"].item() == category


@pytest.mark.parametrize("name", WITH_GPU)
def test_vectorised_categories_agree_with_the_per_name_rules(name):
    gpu = read(DATA / name).gpu
    got = with_category(gpu)
    assert got.height == gpu.height
    assert got["category"].to_list() == [kernel_category(n, k) for n, k in zip(gpu["name"], gpu["kind"])]


def test_a_trace_exported_by_the_installed_torch_profiler(tmp_path):
    """This torch's own export (CPU only here): the profiler's range names come back as phases."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(32, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("request[0]"):
            with record_function("vision"):
                y = x @ x
            with record_function("prefill"):
                y = torch.relu(y @ x)
            for step in range(3):
                with record_function(f"decode[{step}]"):
                    y = y @ x
    path = tmp_path / "torch_cpu.pt.trace.json"
    prof.export_chrome_trace(str(path))

    doc = json.loads(path.read_text(), parse_float=Decimal)
    names = [e["name"] for e in doc["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    with pytest.warns(TraceWarning, match="no GPU activities"):
        trace = read_kineto(path)
    assert sorted(trace.annotations["name"]) == sorted(names)
    assert trace.cpu_ops.height == sum(1 for e in doc["traceEvents"] if e.get("cat") == "cpu_op")
    table = phase_gpu_table(trace)
    assert table.select("phase", "step", "request").rows() == [
        ("vision", 0, 0), ("prefill", 0, 0), ("decode", 0, 0), ("decode", 1, 0), ("decode", 2, 0)]
    assert table["gpu_activities"].sum() == 0
