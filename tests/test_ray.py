"""Sweeps on Ray: two workers measure exactly the units of the local runner; a killed worker's
units are redone once each; GPU identity; no Ray without --ray; user errors."""

import json
import subprocess
import sys

import polars as pl
import pytest

ray = pytest.importorskip("ray")

from molmo_latency.errors import SweepError  # noqa: E402
from molmo_latency.scale import WorkerProgress, gpu_identity, run_sweep_ray  # noqa: E402
from molmo_latency.scale.ray_runner import telemetry_mode  # noqa: E402
from molmo_latency.sweep import SweepSpec, run_sweep  # noqa: E402

pytestmark = pytest.mark.ray

SMALL = {"crops": [1, 2], "top_k": [1, 2], "blocks": [2], "prompt_tokens": [8], "new_tokens": [4],
         "repeats": 3, "warmup": 1, "seed": 0}
KEY = ["config_id", "repeat"]
# What does not depend on timing: equal, key by key, with and without Ray.
FIXED = ["order", "crops", "top_k", "blocks", "prompt_tokens", "new_tokens", "input_tokens", "image_tokens",
         "output_tokens", "decode_steps", "valid", "device", "host"]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def _workers_of(run) -> list[dict]:
    meta = json.loads((run / "run.json").read_text())
    return [w for s in meta["ray_sessions"] for w in s["workers"]]


def test_two_workers_measure_the_same_rows_as_the_local_runner(ray_session, tmp_path):
    spec = SweepSpec.from_dict(SMALL)
    seen: list[WorkerProgress] = []
    result = run_sweep_ray("tiny", spec, tmp_path / "ray", workers=2, progress=seen.append)
    run_sweep("tiny", spec, tmp_path / "local")
    assert result["measured"] == 12 and result["workers"] == 2 and result["failed_configs"] == 0
    assert result["worker_deaths"] == 0 and result["units_redone"] == 0

    on_ray = pl.read_parquet(tmp_path / "ray" / "requests.parquet").sort(KEY)
    local = pl.read_parquet(tmp_path / "local" / "requests.parquet").sort(KEY)
    assert on_ray.height == 12 and on_ray.select(KEY).n_unique() == 12
    assert on_ray.select(KEY).equals(local.select(KEY))
    assert on_ray.select(FIXED).equals(local.select(FIXED))
    assert set(local.columns) <= set(on_ray.columns) and "worker_id" not in local.columns

    # every row names its worker, one of the two that started, with the worker's host and device
    workers = {w["worker_id"]: w for w in _workers_of(tmp_path / "ray")}
    # two were planned; on a loaded 2-core machine the sweep may end before the second reports
    assert 1 <= len(workers) <= 2 and set(on_ray["worker_id"]) <= set(workers)
    for row in on_ray.iter_rows(named=True):
        w = workers[row["worker_id"]]
        assert (row["host"], row["device"], row["gpu_uuid"]) == (w["host"], w["device"], w["gpu_uuid"])
    assert sorted(p.done for p in seen) == list(range(1, 13))
    assert {p.worker_id for p in seen} == set(on_ray["worker_id"])

    phases = pl.read_parquet(tmp_path / "ray" / "phases.parquet")
    local_phases = pl.read_parquet(tmp_path / "local" / "phases.parquet")
    cols = [*KEY, "phase", "step"]
    assert phases.select(cols).sort(cols).equals(local_phases.select(cols).sort(cols))

    # the same command again: nothing left to do, Ray not even needed
    again = run_sweep_ray("tiny", spec, tmp_path / "ray", workers=2)
    assert again["measured"] == 0 and again["skipped"] == 12 and again["resumed"] and again["workers"] == 0


def test_a_killed_worker_has_its_units_redone_with_no_duplicate_and_none_missing(ray_session, tmp_path):
    spec = SweepSpec.from_dict({**SMALL, "cooldown_ms": 100})
    killed: list[str] = []
    delivered: list[str] = []

    def kill_the_first_worker_that_reports(p: WorkerProgress) -> None:
        delivered.append(p.worker_id)
        # that worker holds its next unit (IN_FLIGHT_PER_WORKER = 2) while it sleeps cooldown_ms
        if not killed and p.actor_name:
            killed.append(p.worker_id)
            ray.kill(ray.get_actor(p.actor_name))

    result = run_sweep_ray("tiny", spec, tmp_path, workers=2, progress=kill_the_first_worker_that_reports)
    assert killed and result["worker_deaths"] == 1 and result["units_redone"] >= 1
    assert result["measured"] == 12 and result["failed_configs"] == 0
    req = pl.read_parquet(tmp_path / "requests.parquet")
    assert req.height == 12 and req.select(KEY).n_unique() == 12
    assert set(map(tuple, req.select(KEY).rows())) == {(c.config_id, r) for c, r in spec.units()}
    # each row is the one its worker delivered: the killed worker's lost unit came from another
    assert dict(req["worker_id"].value_counts().iter_rows()) == {w: delivered.count(w) for w in set(delivered)}
    assert delivered.count(killed[0]) == 1
    assert result["actors_started"] == 3  # the dead worker's place got a fresh actor
    assert not (tmp_path / "failures.parquet").exists()
    assert len(list((tmp_path / "parts" / "requests").glob("*.parquet"))) == 12


def test_failing_configuration_on_ray_is_recorded_and_the_others_complete(ray_session, tmp_path):
    # 300 crops exceed the tiny model's 4096 positions: that configuration fails in its warm-up
    spec = SweepSpec.from_dict({**SMALL, "crops": [1, 300], "top_k": [2], "repeats": 2})
    seen: list[WorkerProgress] = []
    result = run_sweep_ray("tiny", spec, tmp_path, workers=2, progress=seen.append)
    assert result["failed_configs"] == 1 and result["measured"] == 2
    # 2 configurations x 2 repeats: progress ends at 4 of 4 whichever came last, failure or unit
    assert (seen[-1].done, seen[-1].total, seen[-1].configs_done, seen[-1].configs_total) == (4, 4, 2, 2)
    failures = pl.read_parquet(tmp_path / "failures.parquet")
    assert failures["config_id"].to_list() == ["c300-k2-b2-p8-n4-bs1"]
    assert failures["stage"].to_list() == ["warmup"] and failures["error_type"][0] == "MolmoLatencyError"
    assert "exceed" in failures["message"][0]
    assert pl.read_parquet(tmp_path / "requests.parquet")["crops"].to_list() == [1, 1]


def test_user_errors_on_ray_say_what_to_do(ray_session, tmp_path):
    spec = SweepSpec.from_dict({**SMALL, "repeats": 1})
    with pytest.raises(SweepError, match="has no GPUs"):
        run_sweep_ray("tiny", spec, tmp_path / "a", device="cuda")
    with pytest.raises(SweepError, match="asked for 5 Ray workers.*room for 2"):
        run_sweep_ray("tiny", spec, tmp_path / "b", workers=5)
    with pytest.raises(SweepError, match="preset name or a model directory"):
        run_sweep_ray(object(), spec, tmp_path / "c")
    # a model the workers cannot load: the worker's own error, naming its host
    with pytest.raises(SweepError, match=r"Ray worker s0-w0 on \S+ cannot start: SweepError: --model .*no-model"):
        run_sweep_ray(str(tmp_path / "no-model"), spec, tmp_path / "d", workers=1)


def test_without_ray_installed_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(SweepError, match=r"molmo-latency\[ray\]"):
        run_sweep_ray("tiny", SweepSpec.from_dict({**SMALL, "repeats": 1}), tmp_path)


def test_gpu_identity_finds_the_actors_gpu_by_uuid_not_by_cuda_index():
    class Nvml:  # NVML numbers GPUs in PCI order; CUDA_VISIBLE_DEVICES does not apply to it
        uuids = ["GPU-0000", "GPU-1111", "GPU-2222"]

        def nvmlInit(self):
            pass

        def nvmlDeviceGetCount(self):
            return 3

        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetUUID(self, h):
            return self.uuids[h].encode()

        def nvmlSystemGetDriverVersion(self):
            return "560.35.03"

    assert gpu_identity("2222", Nvml()) == {"gpu_uuid": "GPU-2222", "gpu_index": 2, "driver": "560.35.03"}
    assert gpu_identity("GPU-1111", Nvml())["gpu_index"] == 1

    class Broken(Nvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    assert gpu_identity("1111", Broken()) == {"gpu_uuid": "GPU-1111", "gpu_index": None}


def test_telemetry_is_off_or_refused_only_where_nvml_cannot_find_the_gpu():
    assert telemetry_mode("auto", 0) == "auto" and telemetry_mode("required", 0) == "required"
    # the profiler opens NVML by UUID: a GPU NVML found keeps its telemetry whatever its index
    assert telemetry_mode("auto", 2) == "auto" and telemetry_mode("required", 2) == "required"
    assert telemetry_mode("auto", None) == "off" and telemetry_mode("off", 2) == "off"
    with pytest.raises(SweepError, match="by its UUID"):
        telemetry_mode("required", None)


def test_a_sweep_without_ray_never_imports_ray(tmp_path):
    code = ("import sys\n"
            "import molmo_latency, molmo_latency.cli.main, molmo_latency.cli.profile_cmd\n"
            "from molmo_latency.sweep import SweepSpec, run_sweep\n"
            f"run_sweep('tiny', SweepSpec.from_dict({{'crops': [1], 'repeats': 1, 'new_tokens': [2]}}), {str(tmp_path)!r})\n"
            "import molmo_latency.scale\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert (tmp_path / "requests.parquet").is_file()
