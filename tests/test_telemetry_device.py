"""The thin NVML device layer, on CPU: NVML is replaced by fakes patched into pynvml."""

from types import SimpleNamespace

import pynvml
import pytest

from molmo_latency.errors import MolmoLatencyError, NvmlUnavailable
from molmo_latency.telemetry import (
    SLOWDOWN_REASONS_MASK,
    FakeGpu,
    GpuReading,
    NvmlGpu,
    is_slowdown,
    open_gpu,
    throttle_reason_names,
)


def err(code):
    return pynvml.NVMLError(code)


# ------------------------------------------------------------------ throttle reasons


def test_reason_bits_are_the_ones_pynvml_defines():
    assert throttle_reason_names(pynvml.nvmlClocksEventReasonHwThermalSlowdown) == ["HwThermalSlowdown"]
    assert throttle_reason_names(pynvml.nvmlClocksEventReasonSwPowerCap
                                 | pynvml.nvmlClocksEventReasonGpuIdle) == ["GpuIdle", "SwPowerCap"]
    assert throttle_reason_names(pynvml.nvmlClocksThrottleReasonBoardLimit) == ["BoardLimit"]
    every = throttle_reason_names(pynvml.nvmlClocksEventReasonAll)
    assert {"GpuIdle", "ApplicationsClocksSetting", "SwPowerCap", "HwSlowdown", "SyncBoost",
            "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown",
            "DisplayClockSetting"} <= set(every)
    assert throttle_reason_names(0) == [] and throttle_reason_names(None) == []
    assert throttle_reason_names(0x4 | 0x10000) == ["SwPowerCap", "Unknown(0x10000)"]


def test_idle_and_user_clock_settings_are_not_slowdowns():
    for bit in (pynvml.nvmlClocksEventReasonGpuIdle,
                pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
                pynvml.nvmlClocksEventReasonDisplayClockSetting):
        assert not is_slowdown(bit)
    for bit in (pynvml.nvmlClocksEventReasonSwPowerCap, pynvml.nvmlClocksEventReasonHwSlowdown,
                pynvml.nvmlClocksEventReasonSwThermalSlowdown,
                pynvml.nvmlClocksEventReasonHwThermalSlowdown,
                pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown):
        assert is_slowdown(bit) and is_slowdown(bit | pynvml.nvmlClocksEventReasonGpuIdle)
        assert SLOWDOWN_REASONS_MASK & bit


# ------------------------------------------------------------------ NvmlGpu over a fake NVML


class FakeNvml:
    """Stands in for the NVML C library behind pynvml's functions."""

    def __init__(self, *, count=1, init_error=None, unsupported=(), event_reasons_missing=False,
                 handle_error=None):
        self.count, self.init_error, self.unsupported = count, init_error, set(unsupported)
        self.event_reasons_missing = event_reasons_missing
        self.handle_error = handle_error
        self.calls = {}
        self.shutdowns = 0

    def _call(self, key, value):
        self.calls[key] = self.calls.get(key, 0) + 1
        if key in self.unsupported:
            raise err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def install(self, monkeypatch):
        def init():
            if self.init_error is not None:
                raise err(self.init_error)

        def handle(i):
            if self.handle_error is not None:
                raise err(self.handle_error)
            return f"handle{i}"

        def event_reasons(h):
            if self.event_reasons_missing:
                raise err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            return self._call("event_reasons", 0x4)

        def clock(h, kind):
            return self._call(f"clock{kind}", {pynvml.NVML_CLOCK_SM: 1980, pynvml.NVML_CLOCK_MEM: 2619}[kind])

        patches = {
            "nvmlInit": init,
            "nvmlShutdown": lambda: setattr(self, "shutdowns", self.shutdowns + 1),
            "nvmlDeviceGetCount": lambda: self.count,
            "nvmlDeviceGetHandleByIndex": handle,
            "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
            "nvmlDeviceGetUUID": lambda h: "GPU-1234",
            "nvmlSystemGetDriverVersion": lambda: "550.54.15",
            "nvmlDeviceGetClockInfo": clock,
            "nvmlDeviceGetTemperature": lambda h, s: self._call("temp", 47),
            "nvmlDeviceGetPowerUsage": lambda h: self._call("power", 123456),  # milliwatts
            "nvmlDeviceGetTotalEnergyConsumption": lambda h: self._call("energy", 98765),
            "nvmlDeviceGetUtilizationRates": lambda h: self._call(
                "util", SimpleNamespace(gpu=97, memory=41)),
            "nvmlDeviceGetCurrentClocksEventReasons": event_reasons,
            "nvmlDeviceGetCurrentClocksThrottleReasons": lambda h: self._call("throttle_reasons", 0x40),
        }
        for name, fn in patches.items():
            monkeypatch.setattr(pynvml, name, fn)
        return self


def test_nvml_gpu_reads_every_sensor_in_our_units(monkeypatch):
    nvml = FakeNvml().install(monkeypatch)
    gpu = open_gpu(0)
    assert isinstance(gpu, NvmlGpu)
    assert (gpu.index, gpu.name, gpu.uuid, gpu.driver) == (0, "NVIDIA H100 80GB HBM3", "GPU-1234", "550.54.15")
    assert gpu.read() == GpuReading(sm_clock_mhz=1980.0, mem_clock_mhz=2619.0, temp_c=47.0,
                                    power_w=123.456, energy_mj=98765.0, util_gpu_pct=97.0,
                                    util_mem_pct=41.0, throttle_reasons=0x4)
    gpu.close()
    gpu.close()
    assert nvml.shutdowns == 1


def test_a_sensor_the_gpu_lacks_reads_none_and_is_not_asked_again(monkeypatch):
    nvml = FakeNvml(unsupported={"temp", "energy", "util"}).install(monkeypatch)
    gpu = open_gpu(0)
    for _ in range(3):
        r = gpu.read()
        assert r.temp_c is None and r.energy_mj is None
        assert r.util_gpu_pct is None and r.util_mem_pct is None
        assert r.sm_clock_mhz == 1980.0 and r.power_w == pytest.approx(123.456)
    assert nvml.calls["temp"] == 1 and nvml.calls["energy"] == 1
    assert nvml.calls["power"] == 3


def test_old_driver_falls_back_to_the_throttle_reasons_call(monkeypatch):
    FakeNvml(event_reasons_missing=True).install(monkeypatch)
    gpu = open_gpu(0)
    assert gpu.read().throttle_reasons == 0x40
    assert gpu.read().throttle_reasons == 0x40


@pytest.mark.parametrize("code, words", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "permission denied"),
    (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "versions differ"),
])
def test_open_gpu_says_why_nvml_cannot_start(monkeypatch, code, words):
    FakeNvml(init_error=code).install(monkeypatch)
    with pytest.raises(NvmlUnavailable, match=words) as info:
        open_gpu(0)
    assert isinstance(info.value, MolmoLatencyError)
    assert "\n" not in str(info.value)


def test_open_gpu_without_gpus_or_with_a_bad_index(monkeypatch):
    nvml = FakeNvml(count=0).install(monkeypatch)
    with pytest.raises(NvmlUnavailable, match="no NVIDIA GPU"):
        open_gpu(0)
    assert nvml.shutdowns == 1  # what was initialised is shut down again
    FakeNvml(count=2).install(monkeypatch)
    with pytest.raises(NvmlUnavailable, match=r"bad GPU index 5.*2 GPU\(s\), indices 0\.\.1"):
        open_gpu(5)


def test_open_gpu_permission_denied_on_the_device(monkeypatch):
    FakeNvml(handle_error=pynvml.NVML_ERROR_NO_PERMISSION).install(monkeypatch)
    with pytest.raises(NvmlUnavailable, match="permission denied"):
        open_gpu(0)


def test_open_gpu_on_this_machine_without_a_driver():
    try:
        gpu = open_gpu(0)
    except NvmlUnavailable as exc:
        assert str(exc).startswith("cannot use NVML for GPU 0")
    else:  # a GPU machine
        gpu.close()
        pytest.skip("this machine has a working NVML")


def test_fake_gpu_scripts_and_integrates_energy():
    clock = iter(range(0, 10**10, 10**9)).__next__  # 1 s per call
    gpu = FakeGpu(power_w=200.0, clock=clock)
    energies = [gpu.read().energy_mj for _ in range(3)]
    assert energies == [0, 200_000, 400_000]          # 200 W for 1 s = 200 J = 200000 mJ
    scripted = FakeGpu(readings=[GpuReading(temp_c=40.0), {"temp_c": 90.0}], power_w=None)
    assert [scripted.read().temp_c for _ in range(3)] == [40.0, 90.0, 90.0]
    assert scripted.temp_c() == 90.0
    failing = FakeGpu(fail_after=2)
    failing.read(), failing.read()
    with pytest.raises(RuntimeError, match="read 3 failed"):
        failing.read()
