"""nvml="auto" | "off" | "required" on machines without NVML (CI has neither driver nor GPU)."""

import sys
import warnings

import polars as pl
import pynvml
import pytest

from molmo_latency.errors import MolmoLatencyError, NvmlUnavailable
from molmo_latency.schema import TELEMETRY_AGG_COLUMNS
from molmo_latency.telemetry import (
    FakeGpu,
    NvmlSampler,
    NvmlWarning,
    attach_telemetry,
    open_gpu,
    start_telemetry,
    stop_telemetry,
)
from molmo_latency.telemetry import policy
from tests.test_telemetry_device import FakeNvml
from tests.waiting import wait_until


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts as a process that has not warned yet."""
    monkeypatch.setattr(policy, "_warned", False)


def nvml_types(record):
    return [w for w in record if issubclass(w.category, NvmlWarning)]


@pytest.fixture(params=["no library", "no driver", "no GPU", "permission denied", "no pynvml"])
def broken_nvml(request, monkeypatch):
    """NVML failing in each way a machine can lack it; yields words the message must hold."""
    kind = request.param
    if kind == "no library":
        FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
        return "no NVIDIA driver installed"
    if kind == "no driver":
        FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).install(monkeypatch)
        return "driver is not loaded"
    if kind == "no GPU":
        FakeNvml(count=0).install(monkeypatch)
        return "no NVIDIA GPU"
    if kind == "permission denied":
        FakeNvml(init_error=pynvml.NVML_ERROR_NO_PERMISSION).install(monkeypatch)
        return "permission denied"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    return "nvidia-ml-py package"


def test_auto_warns_once_per_process_and_gives_null_columns(broken_nvml):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert start_telemetry("auto", 0) is None
        assert start_telemetry("auto", 0) is None
        assert start_telemetry("auto", 1) is None
    found = nvml_types(record)
    assert len(found) == 1
    assert broken_nvml in str(found[0].message) and "columns stay null" in str(found[0].message)
    samples = stop_telemetry(None, "auto")
    assert samples is None
    report = {"requests": pl.DataFrame({"request": [0], "start_ns": [0], "end_ns": [5]})}
    req = attach_telemetry(report, samples)["requests"]
    assert all(req[c].to_list() == [None] for c in TELEMETRY_AGG_COLUMNS)


def test_required_raises_saying_why(broken_nvml):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and does not warn
        with pytest.raises(NvmlUnavailable, match=broken_nvml) as info:
            start_telemetry("required", 0)
    assert isinstance(info.value, MolmoLatencyError)  # the CLI shows one line, exit code 2


def test_off_neither_touches_nvml_nor_warns(monkeypatch):
    def boom():
        raise AssertionError("NVML touched with nvml='off'")

    monkeypatch.setattr(pynvml, "nvmlInit", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert start_telemetry("off", 0) is None
        assert stop_telemetry(None, "off") is None


def test_on_this_machine_auto_and_required_match_what_nvml_says():
    try:
        open_gpu(0).close()
    except NvmlUnavailable as exc:
        reason = str(exc)
    else:
        pytest.skip("this machine has a working NVML")
    with pytest.warns(NvmlWarning, match="NVML telemetry is off"):
        assert start_telemetry("auto", 0) is None
    with pytest.raises(NvmlUnavailable) as info:
        start_telemetry("required", 0)
    assert str(info.value) == reason


def test_a_bad_mode_is_a_user_error():
    with pytest.raises(MolmoLatencyError, match="nvml must be one of 'auto', 'off', 'required', got 'on'"):
        start_telemetry("on", 0)


def test_available_device_gives_a_running_sampler_and_its_samples():
    sampler = start_telemetry("auto", FakeGpu(sm_clock_mhz=1700.0), interval_ms=2)
    assert isinstance(sampler, NvmlSampler) and sampler.running
    wait_until(lambda: sampler.samples().height >= 2)  # a busy machine may hold the sampler's thread back
    samples = stop_telemetry(sampler, "auto")  # the start sample, a tick or more, the stop sample
    assert samples.height >= 3 and samples["sm_clock_mhz"].unique().to_list() == [1700.0]


def test_a_sampler_failing_mid_run(monkeypatch):
    def failed(sampler):  # the thread's third read failed (a busy machine may take a while to get there)
        wait_until(lambda: sampler.error is not None)
        return sampler

    sampler = failed(start_telemetry("auto", FakeGpu(fail_after=2), interval_ms=1))
    with pytest.warns(NvmlWarning, match="stopped early"):
        samples = stop_telemetry(sampler, "auto")
    assert samples.height == 2
    sampler = failed(start_telemetry("required", FakeGpu(fail_after=2), interval_ms=1))
    with pytest.raises(NvmlUnavailable, match="failed after 2 samples"):
        stop_telemetry(sampler, "required")


def test_an_opened_device_is_closed_by_the_sampler(monkeypatch):
    nvml = FakeNvml().install(monkeypatch)
    sampler = start_telemetry("required", 0, interval_ms=5)
    assert sampler.device.uuid == "GPU-1234"
    stop_telemetry(sampler, "required")
    assert nvml.shutdowns == 1


def test_profile_phases_required_on_a_machine_without_nvml(tiny):
    try:
        open_gpu(0).close()
    except NvmlUnavailable:
        pass
    else:
        pytest.skip("this machine has a working NVML")
    from molmo_latency import profile_phases

    with pytest.raises(NvmlUnavailable, match="cannot use NVML"):
        with profile_phases(tiny.model, nvml="required"):
            tiny.model.generate(**tiny.request(crops=1, new_tokens=2))


def test_profile_phases_with_nvml_fills_the_telemetry_columns(tiny, monkeypatch):
    """End to end on CPU: NVML answered by a fake driver, the real sampler, the profiler's tables."""
    FakeNvml().install(monkeypatch)
    from molmo_latency import profile_phases

    with profile_phases(tiny.model, nvml="required", nvml_interval_ms=5) as prof:
        for _ in range(2):
            tiny.model.generate(**tiny.request(crops=1, new_tokens=4))
    rep = prof.report()
    req, ph = rep.requests, rep.phases
    assert (req["sm_clock_mean_mhz"] == 1980.0).all() and (req["temp_max_c"] == 47.0).all()
    assert (req["telemetry_samples"] >= 1).all() and (req["throttle_reasons"] == 0x4).all()
    assert (ph["telemetry_samples"] >= 1).all() and (ph["power_mean_w"] - 123.456).abs().max() < 1e-9
    assert (req["energy_j"] == 0.0).all()  # from the counter, which the fake driver never moves
    assert rep.telemetry.height >= 2


def test_profile_phases_required_surfaces_a_sampler_failing_mid_run(tiny):
    from molmo_latency import profile_phases

    gpu = FakeGpu(fail_after=2)
    with pytest.raises(NvmlUnavailable, match="failed after 2 samples"):
        with profile_phases(tiny.model, nvml="required", nvml_device=gpu, nvml_interval_ms=5):
            tiny.model.generate(**tiny.request(crops=1, new_tokens=4))
            wait_until(lambda: gpu.failures > 0, timeout_s=5, poll_s=0.005)
