"""NvmlSampler with a fake GPU: rate, columns, cost, stopping and errors from the thread."""

import threading
import time

import polars as pl
import pytest

from molmo_latency.errors import MolmoLatencyError, NvmlUnavailable
from molmo_latency.schema import TELEMETRY_SAMPLE_COLUMNS
from molmo_latency.telemetry import FakeGpu, NvmlSampler
from tests.test_telemetry_device import FakeNvml
from tests.waiting import wait_until


def test_samples_on_the_phase_clock_with_the_contract_columns():
    before = time.perf_counter_ns()
    with NvmlSampler(device=FakeGpu(index=3, sm_clock_mhz=1755.0, throttle_reasons=4),
                     interval_ms=5) as sampler:
        time.sleep(0.3)
    after = time.perf_counter_ns()
    df = sampler.samples()
    assert df.columns == list(TELEMETRY_SAMPLE_COLUMNS)
    assert {c: str(t) for c, t in df.schema.items()} == {
        c: {"int64": "Int64", "float64": "Float64"}[t] for c, t in TELEMETRY_SAMPLE_COLUMNS.items()}
    assert df["t_ns"].is_sorted() and df["t_ns"].n_unique() == df.height
    assert before <= df["t_ns"].min() and df["t_ns"].max() <= after
    assert df["gpu_index"].unique().to_list() == [3]
    assert df["sm_clock_mhz"].unique().to_list() == [1755.0]
    assert df["throttle_reasons"].unique().to_list() == [4]
    # energy integrates the power like the NVML counter: never decreasing
    assert (df["energy_mj"].diff().drop_nulls() >= 0).all()
    # 5 ms asked for 0.3 s: about 60 samples on a quiet machine. However loaded the machine, the
    # start and stop samples are there, and the thread never takes more than one per 5 ms tick
    # (it skips the ticks it missed instead of catching up)
    span_s = (after - before) / 1e9
    assert 2 <= df.height <= 2 + span_s / 0.005 + 1
    expected_hz = (df.height - 1) * 1e9 / (df["t_ns"].max() - df["t_ns"].min())
    assert sampler.achieved_hz == pytest.approx(expected_hz)


def test_it_reports_its_own_cost_and_the_rate_it_really_achieved():
    with NvmlSampler(device=FakeGpu(read_delay_s=0.004), interval_ms=1) as sampler:
        time.sleep(0.2)
    df = sampler.samples()
    assert (df["read_cost_ns"] >= 4_000_000).all()
    assert sampler.mean_read_cost_ns == pytest.approx(df["read_cost_ns"].mean())
    assert sampler.achieved_hz < 260  # a 4 ms read cannot give the 1000 Hz asked for
    stats = sampler.stats()
    assert stats["requested_hz"] == 1000.0 and stats["samples"] == df.height
    assert stats["achieved_hz"] == sampler.achieved_hz and stats["error"] is None


def test_start_and_stop_bracket_the_run_with_a_sample_each():
    sampler = NvmlSampler(device=FakeGpu(), interval_ms=1000)
    t0 = time.perf_counter_ns()
    sampler.start()
    assert sampler.samples().height == 1 and sampler.samples()["t_ns"][0] >= t0
    assert sampler.running
    t1 = time.perf_counter_ns()
    sampler.stop()
    df = sampler.samples()
    assert df.height == 2 and df["t_ns"][1] >= t1  # the stop sample, the thread never ticked
    assert not sampler.running
    assert not any(t.name.startswith("molmo-latency-nvml") for t in threading.enumerate())
    sampler.stop()  # idempotent
    time.sleep(0.02)
    assert sampler.samples().height == 2
    with pytest.raises(RuntimeError, match="runs once"):
        sampler.start()


def test_samples_can_be_read_while_running():
    with NvmlSampler(device=FakeGpu(), interval_ms=2) as sampler:
        assert wait_until(lambda: sampler.samples().height >= 2)  # the start sample and one tick
        first = sampler.samples().height
        assert wait_until(lambda: sampler.samples().height > first)


def test_an_error_in_the_thread_is_kept_and_raised_at_stop():
    gpu = FakeGpu(fail_after=3)
    sampler = NvmlSampler(device=gpu, interval_ms=1).start()
    wait_until(lambda: sampler.error is not None, timeout_s=5, poll_s=0.005)
    assert isinstance(sampler.error, RuntimeError)
    assert not sampler._thread.is_alive()  # the thread ended instead of raising
    assert sampler.running                 # still to be stopped, which reports the failure
    with pytest.raises(NvmlUnavailable, match="failed after 3 samples.*read 4 failed") as info:
        sampler.stop()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sampler.samples().height == 3  # what was read before the failure is kept
    assert sampler.stop(raise_error=False) is sampler.error


def test_the_body_exception_is_not_hidden_by_a_sampler_failure():
    with pytest.raises(KeyError):
        with NvmlSampler(device=FakeGpu(fail_after=1), interval_ms=1):
            time.sleep(0.02)
            raise KeyError("from the profiled code")


def test_a_device_that_cannot_be_read_fails_at_start():
    with pytest.raises(NvmlUnavailable, match="first read of GPU 0 .*failed"):
        NvmlSampler(device=FakeGpu(fail_after=0)).start()


@pytest.mark.parametrize("interval_ms", [0, -5])
def test_a_bad_interval_is_a_user_error(interval_ms):
    with pytest.raises(MolmoLatencyError, match="interval must be > 0 ms"):
        NvmlSampler(device=FakeGpu(), interval_ms=interval_ms)


def test_an_index_is_opened_through_nvml_and_closed_at_stop(monkeypatch):
    nvml = FakeNvml().install(monkeypatch)
    with NvmlSampler(device=0, interval_ms=2) as sampler:
        time.sleep(0.03)
    assert sampler.device.name == "NVIDIA H100 80GB HBM3"
    assert sampler.samples()["power_w"].unique().to_list() == [pytest.approx(123.456)]
    assert nvml.shutdowns == 1


def test_an_injected_device_is_left_open():
    gpu = FakeGpu()
    with NvmlSampler(device=gpu):
        pass
    assert not gpu.closed
    with NvmlSampler(device=gpu, owns_device=True):
        pass
    assert gpu.closed


def test_no_samples_gives_an_empty_typed_table():
    df = NvmlSampler(device=FakeGpu()).samples()
    assert df.height == 0 and df.columns == list(TELEMETRY_SAMPLE_COLUMNS)
    assert df.schema["t_ns"] == pl.Int64
