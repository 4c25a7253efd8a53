"""The profiler where users take it: compiled models, threads, no KV cache, chunked prefill,
batches and beams, profilers closed out of order, a fake GPU clock, NVML rates, and an `other_ms`
that is split into named gaps. Expectations come from the test's own clock and settings, not from
the profiler's code."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest
import torch

from molmo_latency import profile_phases
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.models import EOS_ID, PAD_ID, reference_vlm
from tests.profiler_helpers import gen_kwargs

GAPS = ("input_prep_ms", "embed_merge_ms", "between_steps_ms", "after_last_ms")


def _kw(ref, new_tokens, *, crops=1, prompt_tokens=8, batch_size=1, fixed=True, **extra):
    return gen_kwargs(ref, crops=crops, prompt_tokens=prompt_tokens, batch_size=batch_size,
                      new_tokens=new_tokens, fixed=fixed, **extra)


def _hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def _module(model, phase, end=False):
    """The module a phase starts (or ends) at, wherever this transformers line puts it."""
    from molmo_latency.adapters import find_phases

    span = find_phases(model).spans[phase]
    return span.end if end else span.start


def _phases_of(rep, request):
    return rep.phases.filter(pl.col("request") == request).sort("start_ns")


# ------------------------------------------------------------------------------ compiled models
def _graph_counts():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_compiled_models_get_prefill_and_every_decode_step_and_no_new_graph_breaks():
    import torch._dynamo
    from torch._dynamo.utils import counters

    ref = reference_vlm("tiny", seed=1)
    model = ref.model
    kw = _kw(ref, 5)
    original = model.forward
    try:
        # A first compiled generate() in a process can break graphs where later ones do not
        # (transformers 5.17 initialises things once, under a lock, on its first call): the
        # reference counts come from a second compilation, as the one inside the block is.
        torch._dynamo.reset()
        model.forward = torch.compile(original, backend="eager")
        model.generate(**kw)
        # compiled BEFORE the block (the usual warm-up, then measure)
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(original, backend="eager")
        model.generate(**kw)
        compiled_alone = _graph_counts()
        with profile_phases(model) as prof:
            model.generate(**kw)
        assert _graph_counts() == compiled_alone, "the profiler's hooks recompiled or split the graph"
        req = prof.report().requests.row(0, named=True)
        assert req["valid"], req["invalid_reason"]
        assert req["prefill_ms"] > 0 and req["decode_steps"] == 4 and req["output_tokens"] == 5
        assert "AyaVisionForConditionalGeneration.forward" in req["unsplit_regions"]

        # compiled INSIDE the block: Dynamo traces the hooks, which must add no graph break
        torch._dynamo.reset()
        counters.clear()
        model.forward = original
        with profile_phases(model) as prof:
            model.forward = torch.compile(original, backend="eager")
            model.generate(**kw)
        assert _graph_counts() == compiled_alone
        req = prof.report().requests.row(0, named=True)
        assert req["valid"], req["invalid_reason"]
        assert req["prefill_ms"] > 0 and req["decode_steps"] == 4
        assert req["unsplit_regions"] is not None
    finally:
        vars(model).pop("forward", None)
        torch._dynamo.reset()


def test_a_model_split_by_hooks_names_no_unsplit_region(tiny):
    with profile_phases(tiny.model) as prof:
        tiny.model.generate(**_kw(tiny, 3))
    req = prof.report().requests.row(0, named=True)
    assert req["unsplit_regions"] is None and req["vision_ms"] > 0 and req["projector_ms"] > 0


# ------------------------------------------------------------------------------------ threads
def test_two_threads_give_two_valid_requests(tiny):
    lengths = (4, 9)
    kwargs = {n: _kw(tiny, n, crops=2) for n in lengths}
    barrier = threading.Barrier(len(lengths))
    errors, idents = [], {}

    def run(n):
        try:
            idents[n] = threading.get_ident()
            barrier.wait()
            tiny.model.generate(**kwargs[n])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with profile_phases(tiny.model) as prof:
        threads = [threading.Thread(target=run, args=(n,)) for n in lengths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    rep = prof.report()
    req = rep.requests.sort("output_tokens")
    assert req.height == 2
    assert req["valid"].all(), req["invalid_reason"].to_list()
    assert req["output_tokens"].to_list() == list(lengths)
    assert req["decode_steps"].to_list() == [n - 1 for n in lengths]
    assert req["thread_id"].to_list() == [idents[n] for n in lengths]
    a, b = req.iter_rows(named=True)
    assert a["start_ns"] < b["end_ns"] and b["start_ns"] < a["end_ns"], "the requests ran concurrently"
    for r in (a, b):
        p = _phases_of(rep, r["request"])
        assert p.filter(pl.col("phase") == "decode")["step"].to_list() == list(range(r["output_tokens"] - 1))
        assert p["start_ns"].min() >= r["start_ns"] and p["end_ns"].max() <= r["end_ns"]
        assert r["other_ms"] >= 0


def test_each_thread_opens_and_closes_its_own_ranges(tiny, monkeypatch):
    """NVTX push/pop ranges are per thread: every thread's pushes must be closed by that thread,
    innermost first, and name its own request."""
    import nvtx

    events = []

    class Domain:
        def get_registered_string(self, s):
            return s

        def get_event_attributes(self, message=None, payload=None):
            return (message, payload)

        def push_range(self, attrs):
            events.append((threading.get_ident(), "push", attrs))

        def pop_range(self):
            events.append((threading.get_ident(), "pop", None))

    monkeypatch.setattr(nvtx, "get_domain", lambda name: Domain())
    barrier = threading.Barrier(2)

    def run(n):
        barrier.wait()
        tiny.model.generate(**_kw(tiny, n))

    with profile_phases(tiny.model) as prof:
        threads = [threading.Thread(target=run, args=(n,)) for n in (3, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    req = prof.report().requests
    assert req["valid"].all(), req["invalid_reason"].to_list()
    by_thread = {}
    for ident, what, attrs in events:
        stack = by_thread.setdefault(ident, [])
        if what == "push":
            stack.append(attrs)
        else:
            assert stack, "a thread closed a range it never opened"
            stack.pop()
    assert set(by_thread) == set(req["thread_id"]) and all(not s for s in by_thread.values())
    for r in req.iter_rows(named=True):
        pushes = [a for i, w, a in events if i == r["thread_id"] and w == "push"]
        assert pushes[0] == ("request", r["request"])
        assert [a for a in pushes if a[0] == "decode"] == [("decode", k) for k in range(r["decode_steps"])]


# ------------------------------------------------------------ what one LLM call processes
def test_no_kv_cache_is_never_a_valid_request_with_decode_steps(tiny):
    with profile_phases(tiny.model) as prof:
        tiny.model.generate(**_kw(tiny, 5, use_cache=False))
        tiny.model.generate(**_kw(tiny, 5))
    nocache, cached = prof.report().requests.iter_rows(named=True)
    assert nocache["valid"] is False and "use_cache=False" in nocache["invalid_reason"]
    assert nocache["decode_steps"] == 0 and nocache["decode_per_token_ms"] is None
    assert nocache["recompute_steps"] == 4 and nocache["recompute_ms"] > 0 and nocache["prefill_ms"] > 0
    assert cached["valid"] and cached["decode_steps"] == 4 and cached["recompute_steps"] == 0


def test_chunked_prefill_is_measured_as_prefill_chunks(tiny):
    import transformers

    kw = _kw(tiny, 4, crops=1, prompt_tokens=12)
    prompt = kw["input_ids"].shape[1]  # BOS + 16 image tokens + 12 = 29
    with profile_phases(tiny.model) as prof:
        tiny.model.generate(**kw, prefill_chunk_size=8)
    rep = prof.report()
    req = rep.requests.row(0, named=True)
    if transformers.__version__.startswith("4."):
        # 4.5x chunks all but the last prompt token, in a compiled model call, then feeds the
        # last one in its decode loop
        chunks = -(-(prompt - 1) // 8) + 1
        assert "AyaVisionForConditionalGeneration.forward" in req["unsplit_regions"]
    else:
        chunks = -(-prompt // 8)
    assert req["valid"], req["invalid_reason"]
    assert req["prefill_chunks"] == chunks and req["decode_steps"] == 3
    prefill = rep.phases.filter(pl.col("phase") == "prefill")
    assert prefill["step"].to_list() == list(range(chunks))
    assert req["prefill_ms"] == pytest.approx(prefill["ms"].sum())


def test_static_cache_auto_compile_gets_every_decode_step():
    """transformers compiles the model's whole call for the decode loop with a static cache (on
    CUDA by itself; on CPU when the compile config allows every device)."""
    import torch._dynamo
    import transformers
    from transformers import CompileConfig

    if transformers.__version__.startswith("4."):
        pytest.skip("the reference model (AyaVision) refuses cache_implementation='static' on 4.5x")
    ref = reference_vlm("tiny", seed=2)
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    try:
        with profile_phases(ref.model) as prof:
            ref.model.generate(**_kw(ref, 4), cache_implementation="static", compile_config=config)
        assert "get_compiled_call" not in vars(ref.model) and "generate" not in vars(ref.model)
    finally:
        torch._dynamo.reset()
    req = prof.report().requests.row(0, named=True)
    assert req["valid"], req["invalid_reason"]
    assert req["decode_steps"] == 3 and req["prefill_ms"] > 0 and req["unsplit_regions"] is not None


def test_prompt_lookup_verification_calls_are_their_own_kind(tiny):
    """Assisted (prompt-lookup) decoding feeds several candidate tokens per call: those calls are
    `verify` steps, the single-token calls decode steps, as the test's own hook on the model call
    counts them; the request is measured and flagged."""
    fed = []
    handle = tiny.model.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        with profile_phases(tiny.model) as prof:
            tiny.model.generate(**_kw(tiny, 12, prompt_tokens=12, fixed=False),
                                prompt_lookup_num_tokens=3, max_matching_ngram_size=1)
    finally:
        handle.remove()
    rep = prof.report()
    req = rep.requests.row(0, named=True)
    multi = sum(n > 1 for n in fed[1:])
    if not multi:
        pytest.skip("the random model proposed no prompt-lookup candidate this time")
    assert req["verify_steps"] == multi and req["decode_steps"] == sum(n == 1 for n in fed[1:])
    assert req["recompute_steps"] == 0, "the KV cache was on: no call recomputed the sequence"
    assert req["verify_ms"] > 0 and req["valid"] is False and "phase 'verify'" in req["invalid_reason"]
    assert "use_cache=False" not in req["invalid_reason"]
    assert rep.phases.filter(pl.col("phase") == "verify")["step"].to_list() == list(range(multi))


@pytest.mark.parametrize("cache_kwargs, expected", [
    ({"past_key_values": object()}, "verify"),            # transformers 4.5x
    ({"cache": object(), "use_cache": True}, "verify"),   # transformers 5.24
    ({"cache_params": object()}, "verify"),               # state-space models
    ({"use_cache": False}, "recompute"),
    ({"past_key_values": None, "use_cache": False}, "recompute"),
    ({}, "recompute"),                                    # nothing said: the whole sequence again
])
def test_a_multi_token_call_after_the_prompt_is_labelled_by_whether_a_cache_is_in_use(cache_kwargs, expected):
    """Each LLM-call kind from what the call feeds and whether it runs against a cache, whatever
    the keyword a transformers line names the cache with."""
    from molmo_latency.profiler import RunningRequest, _classify

    req = RunningRequest(index=0)
    req.input_tokens = 6
    kinds = []
    for length in (4, 2, 1):  # a prompt in two chunks, then one decode step
        kinds.append(_classify(req, (), {"input_ids": torch.zeros(1, length, dtype=torch.long), "use_cache": True}))
    if expected == "recompute":  # without a cache each call feeds the whole sequence so far
        kinds.append(_classify(req, (), {"input_ids": torch.zeros(1, 8, dtype=torch.long), **cache_kwargs}))
    else:  # with one, only the candidate tokens
        kinds.append(_classify(req, (), {"input_ids": torch.zeros(1, 3, dtype=torch.long), **cache_kwargs}))
    assert kinds == [("prefill", 0), ("prefill", 1), ("decode", 0), (expected, 0)]


# -------------------------------------------------------------------------- batches and beams
class _StopRowEarly:
    """A logits processor: row `row` ends with EOS as its `at`-th new token; no other row may."""

    def __init__(self, prompt_len, row, at):
        self.prompt_len, self.row, self.at = prompt_len, row, at

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, EOS_ID] = -float("inf")
        if input_ids.shape[1] - self.prompt_len == self.at - 1:
            scores[self.row, :] = -float("inf")
            scores[self.row, EOS_ID] = 0.0
        return scores


def test_batch_with_a_row_stopping_early_reports_per_row_tokens(tiny):
    from transformers import LogitsProcessorList

    kw = _kw(tiny, 6, batch_size=2, fixed=False)
    prompt = kw["input_ids"].shape[1]
    kw["logits_processor"] = LogitsProcessorList([_StopRowEarly(prompt, row=0, at=3)])
    with profile_phases(tiny.model) as prof:
        out = tiny.model.generate(**kw)
    assert out[0, prompt + 2].item() == EOS_ID and (out[0, prompt + 3:] == PAD_ID).all()
    req = prof.report().requests.row(0, named=True)
    assert req["valid"], req["invalid_reason"]
    assert req["output_tokens_per_row"] == [3, 6]
    assert req["output_tokens"] == 6 and req["decode_steps"] == 5
    assert req["batch_size"] == 2 and req["tokens_per_step"] == 2.0 and req["num_beams"] == 1
    assert req["image_tokens_per_row"] == [tiny.tokens_per_crop] * 2
    assert req["decode_per_token_ms"] == pytest.approx(req["decode_ms"] / 5)  # per STEP


def test_beams_are_recorded_and_steps_advance_every_beam(tiny):
    with profile_phases(tiny.model) as prof:
        tiny.model.generate(**_kw(tiny, 4, crops=2, num_beams=3))
    req = prof.report().requests.row(0, named=True)
    assert req["valid"], req["invalid_reason"]
    assert req["num_beams"] == 3 and req["tokens_per_step"] == 3.0 and req["decode_steps"] == 3
    assert req["image_tokens"] == 2 * tiny.tokens_per_crop and req["output_tokens_per_row"] == [4]


# ------------------------------------------------------------------ nested / out-of-order exit
def test_profilers_closed_out_of_order_leave_the_model_clean_and_closed_ones_record_nothing(tiny):
    model = tiny.model
    before = _hook_counts(model)
    kw = _kw(tiny, 2)
    a, b = profile_phases(model), profile_phases(model)
    a.__enter__()
    b.__enter__()
    model.generate(**kw)
    a.__exit__(None, None, None)
    model.generate(**kw)
    b.__exit__(None, None, None)
    model.generate(**kw)
    assert _hook_counts(model) == before
    assert "generate" not in vars(model) and "generate_from_batch" not in vars(model)
    assert a.report().requests.height == 1 and b.report().requests.height == 2
    assert a.report().requests["valid"].all() and b.report().requests["valid"].all()


def test_an_instance_level_generate_is_put_back_as_it_was(tiny):
    model = tiny.model
    own = model.generate  # a bound method, set on the instance like a user's own wrapper
    model.generate = own
    try:
        a, b = profile_phases(model), profile_phases(model)
        a.__enter__()
        b.__enter__()
        assert vars(model)["generate"] is not own
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
        assert vars(model)["generate"] is own
    finally:
        del model.generate


# --------------------------------------------------------------- "other", split into named gaps
def test_other_is_split_into_named_gaps_placed_by_an_independent_clock(tiny):
    """Known pauses put where each gap lives: before the first phase (a hook that runs before the
    profiler's on the vision tower), between projector and prefill (a hook that runs after the
    profiler's on the projector), after each LLM call (a logits processor, which runs between
    decode steps and after the last one). The test notes when each pause ran on its own clock:
    each named gap must hold its pauses, and no phase may overlap one (load-independent)."""
    from transformers import LogitsProcessorList

    model, n = tiny.model, 3
    pause = {"input": 0.060, "merge": 0.040, "logits": 0.050}
    ran: dict[str, list[tuple[int, int]]] = {k: [] for k in pause}

    def sleep(kind):
        a = time.perf_counter_ns()
        time.sleep(pause[kind])
        ran[kind].append((a, time.perf_counter_ns()))

    def slow_logits(input_ids, scores):
        sleep("logits")
        return scores

    early = _module(model, "vision").register_forward_pre_hook(lambda *_: sleep("input"))
    try:
        with profile_phases(model) as prof:
            late = _module(model, "projector", end=True).register_forward_hook(lambda *_: sleep("merge"))
            t0 = time.perf_counter_ns()
            model.generate(**_kw(tiny, n), logits_processor=LogitsProcessorList([slow_logits]))
            t1 = time.perf_counter_ns()
            late.remove()
    finally:
        early.remove()
    rep = prof.report()
    r = rep.requests.row(0, named=True)
    assert r["valid"], r["invalid_reason"]
    assert t0 <= r["start_ns"] and r["end_ns"] <= t1
    assert [len(v) for v in ran.values()] == [1, 1, n]
    assert r["input_prep_ms"] >= pause["input"] * 1e3
    assert r["embed_merge_ms"] >= pause["merge"] * 1e3
    assert r["between_steps_ms"] >= (n - 1) * pause["logits"] * 1e3
    assert r["after_last_ms"] >= pause["logits"] * 1e3
    phases = rep.phases.sort("start_ns")
    for kind, spans in ran.items():
        for a, b in spans:
            overlapping = phases.filter((pl.col("start_ns") < b) & (pl.col("end_ns") > a))
            assert overlapping.height == 0, f"the {kind} pause was charged to {overlapping['phase'].to_list()}"
    first, last = phases.row(0, named=True), phases.row(-1, named=True)
    projector = phases.filter(pl.col("phase") == "projector").row(0, named=True)
    prefill = phases.filter(pl.col("phase") == "prefill").row(0, named=True)
    assert r["start_ns"] <= ran["input"][0][0] and ran["input"][0][1] <= first["start_ns"]
    assert projector["end_ns"] <= ran["merge"][0][0] and ran["merge"][0][1] <= prefill["start_ns"]
    assert last["end_ns"] <= ran["logits"][-1][0] and ran["logits"][-1][1] <= r["end_ns"]
    assert sum(r[g] for g in GAPS) == pytest.approx(r["other_ms"], rel=1e-9, abs=1e-9)


def test_gaps_sum_to_other_on_every_request(tiny):
    with profile_phases(tiny.model) as prof:
        for crops, batch in ((0, 1), (1, 2), (3, 1)):
            tiny.model.generate(**_kw(tiny, 4, crops=crops, batch_size=batch))
    req = prof.report().requests
    assert req["valid"].all(), req["invalid_reason"].to_list()
    for r in req.iter_rows(named=True):
        assert all(r[g] >= 0 for g in GAPS)
        assert sum(r[g] for g in GAPS) == pytest.approx(r["other_ms"], rel=1e-9, abs=1e-9)
    no_image = req.row(0, named=True)
    assert no_image["vision_ms"] is None and no_image["embed_merge_ms"] == 0.0


# -------------------------------------------------------------- the CUDA event path, end to end
class _SlowGpu:
    """A fake CUDA device: events on a GPU clock that runs `SLOWDOWN` times the host's time since
    the stream's first event (a GPU slower than the host launches), so a timer that mixed up host
    and GPU time would show it. Records the host time of each record() and every synchronize()."""

    SLOWDOWN = 3
    origin_host = None
    sync_times: list[int] = []

    class Event:
        def __init__(self, enable_timing=False):
            self.gpu_ns = None

        def record(self, stream=None):
            now = time.perf_counter_ns()
            if _SlowGpu.origin_host is None:
                _SlowGpu.origin_host = now
            self.gpu_ns = _SlowGpu.SLOWDOWN * (now - _SlowGpu.origin_host)

        def synchronize(self):
            _SlowGpu.sync_times.append(time.perf_counter_ns())

        def elapsed_time(self, other):
            import numpy as np

            return float(np.float32((other.gpu_ns - self.gpu_ns) / 1e6))


def test_cuda_event_path_end_to_end_on_a_fake_gpu_clock(tiny, monkeypatch):
    """Each LLM phase lasts SLOWDOWN x its host duration on the fake GPU clock. The test's own
    hooks bracket the profiler's: an outer pair runs before its start hook and after its end hook,
    an inner pair after its start hook and before its end hook, so each phase's GPU time lies
    between SLOWDOWN x the inner and SLOWDOWN x the outer host interval, however long the
    machine's scheduler stalls between two hooks (a 5% tolerance failed under load)."""
    from molmo_latency.timers import CudaEventTimer

    monkeypatch.setattr(torch.cuda, "Event", _SlowGpu.Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    host = {}

    def mark(key):
        def hook(*_args):
            host.setdefault(key, []).append(time.perf_counter_ns())
        return hook

    start, end = _module(tiny.model, "llm"), _module(tiny.model, "llm", end=True)
    handles = [start.register_forward_pre_hook(mark("outer_start"))]  # runs before ours
    timer = CudaEventTimer(0, pool_size=2)
    try:
        with profile_phases(tiny.model, timer=timer) as prof:
            handles += [start.register_forward_pre_hook(mark("inner_start")),  # after ours
                        end.register_forward_hook(mark("inner_end"), prepend=True),  # before ours
                        end.register_forward_hook(mark("outer_end"))]  # after ours
            t0 = time.perf_counter_ns()
            tiny.model.generate(**_kw(tiny, 4))
            t1 = time.perf_counter_ns()
    finally:
        for h in handles:
            h.remove()
    assert _SlowGpu.sync_times and min(_SlowGpu.sync_times) > host["outer_end"][-1], \
        "events are waited for once, after the last LLM call, never inside generate()'s loop"
    rep = prof.report()
    r = rep.requests.row(0, named=True)
    assert r["timer"] == "cuda_event" and r["valid"], r["invalid_reason"]
    # GPU durations, not host ones
    llm = rep.phases.filter(pl.col("phase").is_in(["prefill", "decode"])).sort("start_ns")
    assert llm.height == len(host["outer_start"]) == len(host["inner_end"]) == 4
    k, slack = _SlowGpu.SLOWDOWN, 1e-6  # float32 milliseconds from elapsed_time
    for i, got in enumerate(llm["ms"].to_list()):
        inner = (host["inner_end"][i] - host["inner_start"][i]) / 1e6
        outer = (host["outer_end"][i] - host["outer_start"][i]) / 1e6
        assert k * inner * (1 - slack) <= got <= k * outer * (1 + slack), (i, got, inner, outer)
    # the whole request: inside t0..t1, and around every LLM call of it
    assert k * (host["inner_end"][-1] - host["outer_start"][0]) / 1e6 * (1 - slack) <= r["total_ms"] \
        <= k * (t1 - t0) / 1e6 * (1 + slack)
    assert len(_SlowGpu.sync_times) == timer.created, "each event of the request waited for once"


# ------------------------------------------------------------------------------------ NVML
def test_nvml_rate_per_request_and_power_from_the_energy_counter(tiny):
    from molmo_latency.telemetry import FakeGpu

    gpu = FakeGpu(power_w=250.0)  # its energy counter integrates 250 W over time
    with profile_phases(tiny.model, nvml="required", nvml_device=gpu, nvml_interval_ms=5) as prof:
        for _ in range(2):
            tiny.model.generate(**_kw(tiny, 12, crops=2))
    rep = prof.report()
    for r in rep.requests.iter_rows(named=True):
        inside = rep.telemetry.filter(pl.col("t_ns").is_between(r["start_ns"], r["end_ns"])).height
        assert r["telemetry_hz"] == pytest.approx(inside / (r["total_ms"] / 1e3))
        # at most one sample per 5 ms interval (+ the start and stop samples); none is possible where a
        # busy machine held the sampler's thread back for a whole request
        assert 0 <= inside <= r["total_ms"] / 5 + 2
        if inside >= 2:
            assert r["power_from_energy_w"] == pytest.approx(250.0, rel=0.05)
    assert rep.telemetry.height >= 2  # the samples taken when the sampler started and stopped, at least
    short = rep.phases.filter(pl.col("telemetry_hz") * pl.col("ms") / 1e3 < 1.5)  # < 2 samples inside
    assert short["power_from_energy_w"].null_count() == short.height  # too short to say


def test_nvml_interval_below_the_floor_is_refused(tiny):
    from molmo_latency.telemetry.policy import MIN_INTERVAL_MS

    with pytest.raises(MolmoLatencyError, match="below the floor"):
        profile_phases(tiny.model, nvml="auto", nvml_interval_ms=MIN_INTERVAL_MS / 2)
    assert "generate" not in vars(tiny.model)
    profile_phases(tiny.model, nvml="off", nvml_interval_ms=1)  # off: the interval is unused
