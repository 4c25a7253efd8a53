"""The profiler as a small collector (issue 26, part A): its policies are values checked once
(NvmlSettings, TraceCapture), the GPU is named in one place (resolve_gpu, by UUID) for the
profiler, the sweep runner and the CLI, and it hands out a plain Session from which the report
is a pure function."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from molmo_latency import profile_phases
from molmo_latency.capture import TraceCapture
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.records import session_report
from molmo_latency.telemetry import FakeGpu, NvmlSettings
from molmo_latency.telemetry import source as telemetry_source
from molmo_latency.telemetry.policy import MIN_INTERVAL_MS
from molmo_latency.telemetry.source import GpuIdentity, open_telemetry, resolve_gpu
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def three_cuda_gpus(monkeypatch):
    """torch as it looks in a process that sees three GPUs (CUDA_VISIBLE_DEVICES=5,2,7 on a
    bigger machine): CUDA index i is the GPU whose UUID this test gives it, never NVML index i."""
    uuids = ["5f1e-aaaa", "GPU-2c0b-bbbb", "7d9a-cccc"]  # torch reports them with or without "GPU-"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[i]))
    return ["GPU-5f1e-aaaa", "GPU-2c0b-bbbb", "GPU-7d9a-cccc"]


# ------------------------------------------------------------------------------ which GPU


def test_resolve_gpu_names_a_cuda_device_by_its_uuid(three_cuda_gpus):
    assert resolve_gpu("cuda:2") == GpuIdentity(nvml_id=three_cuda_gpus[2], cuda_index=2)
    assert resolve_gpu(torch.device("cuda", 0)).nvml_id == three_cuda_gpus[0]
    assert resolve_gpu(0).nvml_id == three_cuda_gpus[0]
    assert resolve_gpu("cuda") == GpuIdentity(nvml_id=three_cuda_gpus[1], cuda_index=1)  # the current one


def test_resolve_gpu_of_a_cpu_model_or_device(tiny):
    for where in (tiny.model, "cpu", torch.device("cpu")):
        gpu = resolve_gpu(where)
        assert gpu == GpuIdentity(nvml_id=0, cuda_index=None) and not gpu.on_gpu
    with pytest.raises(MolmoLatencyError, match="resolve_gpu needs"):
        resolve_gpu("tpu:0")


def test_without_cuda_a_cuda_device_keeps_its_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_gpu("cuda:3") == GpuIdentity(nvml_id=3, cuda_index=3)


def test_the_cli_check_opens_the_gpu_the_profiler_reads(three_cuda_gpus, monkeypatch):
    """`--nvml required --device cuda:2` checks the GPU by its UUID, the one the profiler's
    sampler then opens for a model on cuda:2, not NVML's GPU 2."""
    from molmo_latency.cli.profile_cmd import check_nvml_required
    from molmo_latency.telemetry import device as telemetry_device

    opened = []
    monkeypatch.setattr(telemetry_device, "open_gpu", lambda nvml_id: opened.append(nvml_id) or FakeGpu())
    check_nvml_required("cuda:2")
    started = []
    monkeypatch.setattr(telemetry_source, "start_telemetry",
                        lambda mode, device, interval_ms: started.append(device))
    open_telemetry(NvmlSettings("required"), "cuda:2")
    assert opened == started == [three_cuda_gpus[2]]


def test_the_sweep_runner_asks_resolve_gpu_not_the_profiler():
    source = (ROOT / "molmo_latency" / "sweep" / "runner.py").read_text()
    assert "_nvml_id" not in source and "resolve_gpu(" in source


def test_open_telemetry_follows_the_settings(monkeypatch):
    started = []
    monkeypatch.setattr(telemetry_source, "start_telemetry",
                        lambda mode, device, interval_ms: started.append((mode, device, interval_ms)) or "sampler")
    assert open_telemetry(NvmlSettings("off"), "cpu") is None
    assert open_telemetry(NvmlSettings("auto"), "cpu") is None  # a CPU model: nothing to explain
    assert open_telemetry(NvmlSettings("required", 20.0), "cpu") == "sampler"
    gpu = FakeGpu()
    assert open_telemetry(NvmlSettings("auto", 10.0, gpu), "cpu") == "sampler"
    assert started == [("required", 0, 20.0), ("auto", gpu, 10.0)]


# ------------------------------------------------------------------------ settings as values


def test_nvml_settings_are_checked_once_when_made():
    with pytest.raises(MolmoLatencyError, match="nvml must be 'auto', 'off' or 'required', got 'on'"):
        NvmlSettings("on")
    with pytest.raises(MolmoLatencyError, match="below the floor"):
        NvmlSettings("auto", MIN_INTERVAL_MS / 2)
    assert NvmlSettings("off", 1).interval_ms == 1  # off: the interval is never used


def test_trace_capture_takes_the_five_shapes_of_torch_profiler(tmp_path):
    from torch.profiler import ProfilerActivity, profile, schedule

    assert TraceCapture.from_args(None, None) is None
    assert TraceCapture.from_args(False, tmp_path) is None
    assert TraceCapture.from_args(None, tmp_path) == TraceCapture(trace_dir=tmp_path)
    assert TraceCapture.from_args(True, str(tmp_path)) == TraceCapture(trace_dir=tmp_path)
    every_other = schedule(wait=1, warmup=1, active=1)
    assert TraceCapture.from_args(every_other, tmp_path).schedule is every_other
    assert dict(TraceCapture.from_args({"record_shapes": True}, tmp_path).options) == {"record_shapes": True}
    own = profile(activities=[ProfilerActivity.CPU])
    assert TraceCapture.from_args(own, None) == TraceCapture(profile=own)
    with pytest.raises(MolmoLatencyError, match="torch_profiler must be True"):
        TraceCapture.from_args("yes", tmp_path)
    with pytest.raises(MolmoLatencyError, match="needs trace_dir"):
        TraceCapture.from_args(every_other, None)


# ---------------------------------------------------------------------------- the session


def test_the_report_is_a_function_of_the_session(tiny):
    with profile_phases(tiny.model, nvml="required", nvml_device=FakeGpu(temp_c=57.0), nvml_interval_ms=5) as prof:
        for crops in (1, 2):
            tiny.model.generate(**tiny.request(crops=crops, new_tokens=3))
    session = prof.session()
    assert [r.index for r in session.records] == [0, 1]
    assert session.timer_kind == "perf_counter" and session.traces == []
    assert session.samples.height >= 2 and set(session.samples["temp_c"].to_list()) == {57.0}
    assert session.records[0].spans[0].phase == "vision"  # named, not indexed
    rebuilt, report = session_report(session), prof.report()
    assert rebuilt.requests.equals(report.requests) and rebuilt.phases.equals(report.phases)


def test_pop_session_hands_out_each_request_once(tiny):
    with profile_phases(tiny.model, nvml="off") as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=2))
        first = prof.pop_session()
        tiny.model.generate(**tiny.request(crops=1, new_tokens=2))
        second = prof.pop_session()
    assert [r.index for r in first.records] == [0] and [r.index for r in second.records] == [1]
    assert first.samples is None and first.new_samples is None
    assert prof.session().records == []


def test_the_collector_reads_no_trace_back():
    tree = ast.parse((ROOT / "molmo_latency" / "profiler.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in modules if m == "molmo_latency.trace" or m.startswith("molmo_latency.trace.")}


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_sampler_failing_under_required_still_leaves_the_model_as_it_was(tiny, tmp_path):
    """Closing runs every undo step (torch.profiler, sampler, wrappers, hooks) even when stopping
    the sampler raises."""
    from molmo_latency.errors import NvmlUnavailable

    before = _hook_count(tiny.model)
    gpu = FakeGpu(fail_after=2)
    with pytest.raises(NvmlUnavailable, match="failed after 2 samples"):
        with profile_phases(tiny.model, trace_dir=tmp_path, nvml="required", nvml_device=gpu,
                            nvml_interval_ms=5):
            tiny.model.generate(**tiny.request(crops=1, new_tokens=2))
            wait_until(lambda: gpu.failures > 0, timeout_s=5, poll_s=0.005)
    assert "generate" not in vars(tiny.model) and "get_compiled_call" not in vars(tiny.model)
    assert _hook_count(tiny.model) == before
    assert not torch.autograd._profiler_enabled()  # our torch.profiler was stopped too
