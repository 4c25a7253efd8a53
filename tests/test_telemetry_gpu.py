"""The real NvmlSampler on GPU 0 (run on the GPU machine; skipped without CUDA or NVML).

Prints what it read (pytest -s) so the numbers can be recorded in benchmarks/RESULTS.md.
"""

import time

import polars as pl
import pytest
import torch

from molmo_latency.errors import NvmlUnavailable
from molmo_latency.telemetry import NvmlSampler, aggregate_intervals, open_gpu, throttle_reason_names

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu0():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        gpu = open_gpu(0)
    except NvmlUnavailable as exc:
        pytest.skip(f"needs NVML: {exc}")
    yield gpu
    gpu.close()


def test_real_sampler_reads_plausible_values_at_the_asked_rate(gpu0):
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    with NvmlSampler(device=gpu0, interval_ms=10) as sampler:
        busy_start = time.perf_counter_ns()
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:  # keep the GPU busy for ~1 s
            for _ in range(20):
                x = torch.tanh(x @ x)
            torch.cuda.synchronize()
        busy_end = time.perf_counter_ns()
    df = sampler.samples()
    stats = sampler.stats()
    print("\nNVML sampler on", stats["device_name"], stats["driver"], stats)
    print(df.describe())
    print("throttle reasons seen:",
          sorted({n for m in df["throttle_reasons"].drop_nulls().to_list() for n in throttle_reason_names(m)}))

    assert 80 <= df.height <= 130
    assert 70 <= sampler.achieved_hz <= 110             # 10 ms asked for
    assert sampler.mean_read_cost_ns < 5_000_000       # a read of every sensor: well under 5 ms
    assert df["sm_clock_mhz"].null_count() == 0
    assert 200 <= df["sm_clock_mhz"].median() <= 3500
    assert 100 <= df["mem_clock_mhz"].median() <= 15000
    if df["temp_c"].null_count() < df.height:
        assert 10 <= df["temp_c"].max() <= 110
    if df["power_w"].null_count() < df.height:
        assert 20 <= df["power_w"].max() <= 1500
    if df["energy_mj"].null_count() < df.height:
        assert (df["energy_mj"].drop_nulls().diff().drop_nulls() >= 0).all()
    if df["util_gpu_pct"].null_count() < df.height:
        assert df["util_gpu_pct"].max() >= 50             # the matmuls kept it busy

    busy = aggregate_intervals(pl.DataFrame({"start_ns": [busy_start], "end_ns": [busy_end]}), df)
    row = busy.row(0, named=True)
    print("busy second:", row)
    assert row["telemetry_samples"] >= 50
    if row["energy_j"] is not None:
        assert 10 <= row["energy_j"] <= 1500            # ~1 s at 10..1500 W
