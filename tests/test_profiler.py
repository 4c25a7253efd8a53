"""The phase profiler on the tiny reference model (CPU), as a user would check it."""

import gzip
import json
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from molmo_latency import knobs, profile_phases
from molmo_latency.errors import AdapterError, MolmoLatencyError
from molmo_latency.models import reference_vlm
from tests.layout import phase_module, phase_paths, text_decoder


def _hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_every_phase_of_every_request_on_one_timeline(tiny):
    walls = []
    with profile_phases(tiny.model) as prof:
        for crops in (1, 2, 4):
            kw = tiny.request(crops=crops, prompt_tokens=12, new_tokens=8)
            t0 = time.perf_counter_ns()
            tiny.model.generate(**kw)
            walls.append((t0, time.perf_counter_ns()))
    rep = prof.report()
    req, ph = rep.requests, rep.phases
    assert req.height == 3 and req["valid"].all() and req["complete"].all()
    assert req["output_tokens"].to_list() == [8, 8, 8]
    assert (req["decode_steps"] == req["output_tokens"] - 1).all()
    for r in req.iter_rows(named=True):
        p = ph.filter(pl.col("request") == r["request"]).sort("start_ns")
        counts = p.group_by("phase").len().sort("phase")
        assert dict(counts.iter_rows()) == {"vision": 1, "projector": 1, "prefill": 1, "decode": 7}
        assert p.filter(pl.col("phase") == "decode")["step"].to_list() == list(range(7))
        # inside the request, no overlap, in order vision -> projector -> prefill -> decode
        assert p["start_ns"].min() >= r["start_ns"] and p["end_ns"].max() <= r["end_ns"]
        assert (p["start_ns"].shift(-1).drop_nulls() >= p["end_ns"].head(p.height - 1)).all()
        assert p["phase"].to_list()[:3] == ["vision", "projector", "prefill"]
        assert r["other_ms"] >= 0
        # placed by the test's own clock: the request lies inside the generate() call it timed
        t0, t1 = walls[r["request"]]
        assert t0 <= r["start_ns"] <= r["end_ns"] <= t1
        # the gaps are found by walking the timeline, other_ms by subtraction: they must agree
        gaps = r["input_prep_ms"] + r["embed_merge_ms"] + r["between_steps_ms"] + r["after_last_ms"]
        assert gaps == pytest.approx(r["other_ms"], rel=1e-9, abs=1e-9)
        assert r["decode_per_token_ms"] == pytest.approx(p.filter(pl.col("phase") == "decode")["ms"].mean())
    assert req["image_tokens"].to_list() == [16, 32, 64]
    assert (req["input_tokens"] == 1 + req["image_tokens"] + 12).all()


def test_model_is_left_as_it_was(tiny):
    before = _hook_counts(tiny.model)
    with profile_phases(tiny.model):
        assert "generate" in vars(tiny.model)
        assert _hook_counts(tiny.model) != before
    assert _hook_counts(tiny.model) == before
    assert "generate" not in vars(tiny.model)


def _work_of(ref, blocks: int, **inputs) -> tuple[int, list[int]]:
    """What one request does, counted by the test's own hooks (not timed: a timing would measure
    how busy the machine is): images through the vision tower, decoder-layer forwards per LLM call."""
    images, layers = [], []
    vision = phase_module(ref.model, "vision")
    handles = [vision.register_forward_pre_hook(lambda _m, args, kwargs: images.append(
        int((kwargs.get("pixel_values") if kwargs.get("pixel_values") is not None else args[0]).shape[0])),
        with_kwargs=True)]
    handles.append(ref.model.register_forward_pre_hook(lambda *_: layers.append(0)))  # one LLM call
    for layer in text_decoder(ref.model).layers:
        handles.append(layer.register_forward_pre_hook(lambda *_: layers.__setitem__(-1, layers[-1] + 1)))
    try:
        with knobs.configured(ref.model, blocks=blocks), profile_phases(ref.model) as prof:
            ref.model.generate(**ref.request(**inputs))
    finally:
        for h in handles:
            h.remove()
    assert prof.report().requests["valid"][0]
    return sum(images), layers


def test_knobs_change_what_they_should(tiny):
    """More crops send more images through the vision tower; fewer active blocks run fewer decoder
    layers in every LLM call; the model is restored after each."""
    few, _ = _work_of(tiny, 4, crops=1, new_tokens=2)
    many, _ = _work_of(tiny, 4, crops=16, new_tokens=2)
    assert (few, many) == (1, 16)
    _, full = _work_of(tiny, 4, crops=1, new_tokens=8)
    _, short = _work_of(tiny, 1, crops=1, new_tokens=8)
    assert full == [4] * 8 and short == [1] * 8  # prefill + 7 decode steps
    assert knobs.get_active_blocks(tiny.model) == 4


def test_top_k_knob_reaches_every_router(tiny):
    with knobs.configured(tiny.model, top_k=1):
        routers = [m for m in tiny.model.modules() if isinstance(getattr(m, "top_k", None), int)]
        assert len(routers) == 4 and all(m.top_k == 1 for m in routers)
        out = tiny.model.generate(**tiny.request(crops=1, new_tokens=3))
        assert out.shape[1] == tiny.inputs(crops=1)["input_ids"].shape[1] + 3
    assert knobs.get_top_k(tiny.model) == 2
    with pytest.raises(MolmoLatencyError, match=r"top_k=9 is out of range.*8 experts.*1..8"):
        knobs.set_top_k(tiny.model, 9)
    with pytest.raises(MolmoLatencyError, match="1..4"):
        knobs.set_active_blocks(tiny.model, 5)


def test_exception_inside_generate_keeps_partial_request_and_restores_model(tiny):
    layer = text_decoder(tiny.model).layers[0]
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 4:  # prefill + 2 decode steps, then fail in decode step 2
            raise RuntimeError("injected failure")

    before = _hook_counts(tiny.model)
    handle = layer.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            with profile_phases(tiny.model) as prof:
                tiny.model.generate(**tiny.request(crops=1, new_tokens=8))
    finally:
        handle.remove()
    assert _hook_counts(tiny.model) == before and "generate" not in vars(tiny.model)
    req = prof.report().requests.row(0, named=True)
    assert req["complete"] is False and req["valid"] is False
    assert "injected failure" in req["invalid_reason"] and "decode never ended" in req["invalid_reason"]
    phases = prof.report().phases
    assert phases.filter(pl.col("phase") == "decode").height == 2
    assert set(phases["phase"]) == {"vision", "projector", "prefill", "decode"}
    # the profiler still works afterwards
    with profile_phases(tiny.model) as prof2:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=3))
    assert prof2.report().requests["valid"].to_list() == [True]


def test_negative_other_is_flagged_not_clamped():
    from molmo_latency.records import RequestRecord, build_report

    rec = RequestRecord(index=0, spans=[("prefill", 0, 1, 2)], output_tokens=1)
    rec.times_ns = [0, 0, 2_000_000, 1_000_000]  # a phase reaching past the request end
    row = build_report([rec], "perf_counter").requests.row(0, named=True)
    assert row["other_ms"] == pytest.approx(-1.0)
    assert row["valid"] is False and "more than the request" in row["invalid_reason"]
    assert "outside the request" in row["invalid_reason"]


def test_parquet_round_trip(tiny, tmp_path):
    with profile_phases(tiny.model) as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=4))
    rep = prof.report()
    rep.write_parquet(tmp_path)
    assert pl.read_parquet(tmp_path / "requests.parquet").equals(rep.requests)
    assert pl.read_parquet(tmp_path / "phases.parquet").equals(rep.phases)


def test_unmappable_model_error_names_what_was_looked_for():
    with pytest.raises(AdapterError, match=r"model\.vision_tower.*vision_backbone\.image_vit"):
        profile_phases(torch.nn.Linear(2, 2))
    with pytest.raises(AdapterError, match="no submodule 'nope'"):
        profile_phases(torch.nn.Sequential(torch.nn.Linear(2, 2)), phases={"llm": "nope"})


def test_explicit_mapping(tiny):
    paths = phase_paths(tiny.model)
    mapping = {"vision": paths["vision"][0], "llm": paths["llm"]}
    with profile_phases(tiny.model, phases=mapping) as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=3))
    req = prof.report().requests.row(0, named=True)
    assert req["projector_ms"] is None and req["vision_ms"] > 0 and req["decode_steps"] == 2


def test_nvtx_and_record_function_ranges(tiny, tmp_path, monkeypatch):
    import nvtx

    events = []

    class Domain:
        def get_registered_string(self, s):
            return s

        def get_event_attributes(self, message=None, payload=None):
            return (message, payload)

        def push_range(self, attrs):
            events.append(("push", *attrs))

        def pop_range(self):
            events.append(("pop",))

    monkeypatch.setattr(nvtx, "get_domain", lambda name: Domain() if name == "molmo_latency" else None)
    with profile_phases(tiny.model, trace_dir=tmp_path) as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=3))
    pushes = [e[1:] for e in events if e[0] == "push"]
    assert pushes == [("request", 0), ("vision", 0), ("projector", 0), ("prefill", 0),
                      ("decode", 0), ("decode", 1)]
    assert sum(e[0] == "pop" for e in events) == len(pushes)
    [trace] = prof.traces
    assert trace["requests"] == [0]
    with gzip.open(trace["path"], "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"] if e.get("cat") == "user_annotation"}
    assert {"request[0]", "vision", "projector", "prefill", "decode[0]", "decode[1]"} <= names


def test_torch_profiler_schedule_writes_one_trace_per_cycle(tiny, tmp_path):
    from torch.profiler import schedule

    with profile_phases(tiny.model, torch_profiler=schedule(wait=1, warmup=0, active=1, repeat=2),
                        trace_dir=tmp_path) as prof:
        for _ in range(5):
            tiny.model.generate(**tiny.request(crops=1, new_tokens=2))
    assert [t["requests"] for t in prof.traces] == [[1], [3]]
    assert len(list(tmp_path.iterdir())) == 2
    assert all(Path(t["path"]).exists() and Path(t["path"]).parent == tmp_path for t in prof.traces)


def test_bad_arguments_get_clear_errors(tiny):
    with pytest.raises(MolmoLatencyError, match="nvml must be"):
        profile_phases(tiny.model, nvml="sometimes")
    with pytest.raises(MolmoLatencyError, match="needs trace_dir"):
        with profile_phases(tiny.model, torch_profiler=True):
            pass
    assert "generate" not in vars(tiny.model)
    with pytest.raises(MolmoLatencyError, match="unknown reference preset"):
        reference_vlm("huge")


@pytest.mark.gpu
def test_phases_on_cuda_with_events():
    ref = reference_vlm("tiny", device="cuda")
    with profile_phases(ref.model) as prof:
        for crops in (1, 4):
            ref.model.generate(**ref.request(crops=crops, new_tokens=8))
    req = prof.report().requests
    assert req["timer"].to_list() == ["cuda_event", "cuda_event"]
    assert req["valid"].all() and (req["decode_steps"] == 7).all() and (req["other_ms"] >= 0).all()


def test_nvml_telemetry_lands_on_phases_and_requests(tiny):
    from molmo_latency.telemetry import FakeGpu

    gpu = FakeGpu(sm_clock_mhz=1755.0, temp_c=61.0, power_w=250.0, throttle_reasons=0x4)
    with profile_phases(tiny.model, nvml="required", nvml_device=gpu, nvml_interval_ms=5) as prof:
        for _ in range(2):
            tiny.model.generate(**tiny.request(crops=1, new_tokens=4))
    rep = prof.report()
    assert rep.telemetry is not None and rep.telemetry.height >= 2
    for table in (rep.requests, rep.phases):
        assert table["sm_clock_mean_mhz"].to_list() == [1755.0] * table.height
        assert table["temp_max_c"].to_list() == [61.0] * table.height
        assert table["throttle_reasons"].to_list() == [4] * table.height
    assert (rep.requests["energy_j"] > 0).all()


def test_nvml_off_and_unavailable_leave_null_columns(tiny, monkeypatch):
    from molmo_latency.errors import NvmlUnavailable
    from molmo_latency.telemetry import device as tdev

    with profile_phases(tiny.model, nvml="off") as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=2))
    req = prof.report().requests
    assert req["sm_clock_mean_mhz"].null_count() == 1 and req["throttle_reasons"].null_count() == 1
    with pytest.raises(NvmlUnavailable):
        with profile_phases(tiny.model, nvml="required"):
            pass
    assert "generate" not in vars(tiny.model)


def test_report_gains_gpu_columns_from_a_trace_with_gpu_activity(tiny, tmp_path):
    """A CPU run has no kernels, so a trace with GPU activity and the same phase names (the trace
    package's demo: request[0] with vision, projector, prefill, decode[0], decode[1]) stands in
    for the one a CUDA run writes."""
    from molmo_latency.trace import phase_gpu_table, read_kineto
    from molmo_latency.trace._demo import write_demo_trace

    demo = write_demo_trace(tmp_path)
    with profile_phases(tiny.model) as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=3))
    prof.traces.append({"path": str(demo), "requests": [0]})
    rep = prof.report()
    expected = phase_gpu_table(read_kineto(demo))
    joined = rep.phases.select("phase", "step", "gpu_kernel_ms", "gpu_activities")
    assert joined.rows() == expected.select("phase", "step", "gpu_kernel_ms", "gpu_activities").rows()
    assert rep.requests["gpu_busy_ms"][0] == pytest.approx(expected["gpu_busy_ms"].sum())
    assert rep.phases["ms"].null_count() == 0  # the event-timed ms stays beside them


def test_nvml_counter_tracks_are_written_into_the_trace(tiny, tmp_path):
    from molmo_latency.telemetry import FakeGpu

    gpu = FakeGpu(sm_clock_mhz=1980.0, temp_c=55.0)
    with profile_phases(tiny.model, trace_dir=tmp_path, nvml="required", nvml_device=gpu,
                        nvml_interval_ms=5) as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=4))
    [trace] = prof.traces
    with gzip.open(trace["path"], "rt") as f:
        events = json.load(f)["traceEvents"]
    counters = [e for e in events if e.get("ph") == "C"]
    assert counters and {v for e in counters for v in e["args"].values()} >= {1980.0, 55.0}
    [req] = [e for e in events if e.get("name") == "request[0]" and e.get("ph") == "X"]
    inside = [e for e in counters if req["ts"] <= float(e["ts"]) <= req["ts"] + req["dur"]]
    assert inside, "samples taken during the request must land inside its range"


def test_hooks_outside_any_request_are_reported(tiny):
    with pytest.warns(UserWarning, match="outside any profiled request"):
        with profile_phases(tiny.model, entry_points=["generate"]):
            phase_module(tiny.model, "vision")(tiny.inputs(crops=1)["pixel_values"])


def test_a_users_own_torch_profiler_is_stepped_per_request(tiny):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        with profile_phases(tiny.model, torch_profiler=tprof):
            for _ in range(3):
                tiny.model.generate(**tiny.request(crops=1, new_tokens=2))
    assert tprof.step_num == 3


class _FakeEvent:
    """A CUDA event on a fake GPU clock; elapsed_time in float32 ms like the real one."""

    clock_ns = 0
    syncs = 0
    streams = []

    def __init__(self, enable_timing=False):
        self.ts = None

    def record(self, stream=None):
        _FakeEvent.streams.append(stream)
        _FakeEvent.clock_ns += 1_234_567  # 1.234567 ms between marks
        self.ts = _FakeEvent.clock_ns

    def synchronize(self):
        _FakeEvent.syncs += 1

    def elapsed_time(self, other):
        import numpy as np

        return float(np.float32((other.ts - self.ts) / 1e6))


def test_cuda_event_timer_without_a_gpu(monkeypatch):
    from molmo_latency.timers import CudaEventTimer

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _FakeEvent.clock_ns = 10**15  # a long-running GPU clock: float32 offsets would lose precision
    timer = CudaEventTimer(torch.device("cuda", 1), pool_size=4)
    for _request in range(2):  # the free list is reused across requests, and grows past its size
        timer.begin()
        _FakeEvent.syncs = 0
        marks = [timer.mark() for _ in range(50_000)]
        assert _FakeEvent.syncs == 0, "marking must never synchronise"
        assert len({id(event) for event, _host in marks}) == len(marks), "a request never reuses its own events"
        ns = timer.resolve(marks)
        timer.release(marks)
        # 60 s into the request each step keeps its length to 1 ns (float32 offsets from the
        # first event would quantise steps to ~4 us there)
        gaps = {b - a for a, b in zip(ns, ns[1:])}
        assert gaps <= {1_234_566, 1_234_567, 1_234_568}
        assert abs((ns[-1] - ns[0]) - (len(ns) - 1) * 1_234_567) < 1e-7 * (ns[-1] - ns[0])
    assert set(_FakeEvent.streams) == {"stream of cuda:1"}, "events go on the model device's stream"
    assert timer.created == 50_000, "the second request reused the first one's released events"


def test_pop_report_hands_out_each_sample_once_and_keeps_memory_bounded(tiny):
    from molmo_latency.telemetry import FakeGpu

    with profile_phases(tiny.model, nvml="required", nvml_device=FakeGpu(), nvml_interval_ms=5) as prof:
        seen, held = [], []
        for _ in range(4):
            tiny.model.generate(**tiny.request(crops=1, new_tokens=3))
            rep = prof.pop_report()
            assert rep.requests.height == 1 and rep.requests["sm_clock_mean_mhz"][0] == 1410.0
            seen.extend(rep.telemetry["t_ns"].to_list())
            held.append(prof._sampler.samples().height)
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    # handed-out samples are dropped (but the one in effect): what is held does not pile up
    assert prof._sampler._discarded >= len(seen) - held[-1] - 1 > 0
    assert max(held) < len(seen)
