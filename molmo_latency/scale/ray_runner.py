"""One sweep sharded over many GPUs and machines on Ray, into one run directory.

Shape:

- **Units.** The unit of work is one (configuration, repeat), handed out in the sweep's own
  measurement order (interleaved A B C A B C by default) to whichever worker has room. Each
  worker therefore measures an interleaved subsequence of the protocol, and the repeats of a
  configuration are spread over workers: the difference between GPUs of one model (about 8 %,
  up to 22 %) lands *within* configurations, where ``explain`` attributes it by ``gpu_uuid``,
  instead of being confounded with the configuration (as it would be if a configuration with
  all its repeats ran on one GPU). Small units also balance the load and bound what a lost
  worker costs (the at most ``IN_FLIGHT_PER_WORKER`` units it held).
- **Workers.** One Ray actor per GPU (``num_gpus=1``), or per ``cpus_per_worker`` CPUs on a
  CPU device, each owning a :class:`molmo_latency.sweep.runner.Worker`: the model is loaded
  once per actor, under one phase profiler. A worker warms a configuration up (``warmup``
  unmeasured requests) the first time it receives it, so warm-up costs at most
  ``min(workers, repeats) x configurations x warmup`` requests; the local runner instead warms
  every configuration up front.
- **Writing.** Workers send each unit's tables to the driver, the only writer, which writes them
  with :meth:`RunDir.write_unit` (atomic parts, the request row last). A unit is written at most
  once (results are deduplicated by (config_id, repeat)); a worker that dies (killed, OOM, node
  lost) has its in-flight units handed to the other workers and is replaced by a fresh actor.
  A killed driver loses nothing written: the same command resumes, skipping done units.
- **Rows.** Every request row carries the host, the GPU (``gpu_index`` in NVML numbering,
  ``gpu_uuid``, ``gpu_name``, ``driver``) and the ``worker_id`` (``s<session>-w<k>``).

Ray is imported only here, and only when a sweep runs on Ray.
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from molmo_latency.errors import MolmoLatencyError, SweepError
from molmo_latency.hold.rundir import RunDir
from molmo_latency.sweep import runner
from molmo_latency.sweep.runner import Worker, run_identity, run_meta
from molmo_latency.sweep.schedule import Progress, RaySweepResult, Schedule, SweepRecorder, no_progress
from molmo_latency.sweep.spec import Config, SweepSpec

IN_FLIGHT_PER_WORKER = 2  # units queued on a worker: the next one is ready when one finishes
MAX_UNIT_ATTEMPTS = 3     # a unit whose worker died this often is recorded as failed (stage "worker")
ACTOR_PREFIX = "molmo-latency"


@dataclass
class WorkerProgress(Progress):
    """Progress of a sweep on Ray: which worker (and Ray actor name) measured the last unit."""

    worker_id: str | None = None
    actor_name: str | None = None


# --------------------------------------------------------------------------- the worker actor
class SweepActor:
    """A Ray worker: loads the model once, then measures (configuration, repeat) units.

    A plain class (Ray wraps it with ``ray.remote`` in the driver); without Ray it works the same:

    >>> from molmo_latency.sweep import SweepSpec
    >>> spec = SweepSpec.from_dict({"crops": [1], "repeats": 1, "warmup": 1, "new_tokens": [3]})
    >>> actor = SweepActor("tiny", spec, worker_id="s0-w0")
    >>> actor.start()["worker_id"]
    's0-w0'
    >>> [(config, repeat)] = spec.units()
    >>> result = actor.measure(config, repeat, 0)
    >>> result["status"], result["tables"]["requests"].select("worker_id", "repeat").row(0)
    ('ok', ('s0-w0', 0))
    """

    def __init__(self, model: str, spec: SweepSpec, *, device: str = "cpu", dtype: str | None = None,
                 nvml: str = "auto", trust_remote_code: bool = False, worker_id: str = "w0",
                 threads: int | None = None):
        self.model, self.spec, self.dtype, self.nvml = model, spec, dtype, nvml
        self.trust_remote_code = trust_remote_code
        # Ray gives a GPU actor exactly one visible GPU: it is cuda:0 in here.
        self.device = "cuda:0" if device.startswith("cuda") else "cpu"
        self.worker_id = worker_id
        self.threads = threads
        self.worker: Worker | None = None

    def start(self) -> dict[str, Any]:
        """Load the model and open the profiler; returns the worker's facts, or the user error."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            worker = Worker.open(self.model, self.spec, device=self.device, dtype=self.dtype, nvml=self.nvml,
                                 trust_remote_code=self.trust_remote_code, columns={"worker_id": self.worker_id})
            if self.device.startswith("cuda"):
                gpu = gpu_identity(str(torch.cuda.get_device_properties(0).uuid))
                worker.columns.update(gpu, device=f"cuda:{gpu['gpu_index']}" if gpu["gpu_index"] is not None
                                      else worker.columns["device"])
                worker.nvml = telemetry_mode(self.nvml, gpu["gpu_index"])
            worker.__enter__()
        except MolmoLatencyError as exc:
            return {"worker_id": self.worker_id, "host": platform.node(), "error": f"{type(exc).__name__}: {exc}"}
        self.worker = worker
        return {**worker.columns, "pid": os.getpid(), "threads": torch.get_num_threads(), "nvml": worker.nvml,
                "model": worker.source.describe()}

    def measure(self, config: Config, repeat: int, order: int) -> dict[str, Any]:
        """Warm `config` up if this worker has not yet, then measure it once: its tables, or why not."""
        worker = self.worker
        stage = "warmup"
        try:
            if config.config_id not in worker.warmed:
                for _ in range(self.spec.protocol["warmup"]):
                    worker.warm_up(config)
                while self.spec.protocol["warmup"] and not worker.steady(config):  # until steady, capped
                    worker.warm_up(config)
                worker.warmed.add(config.config_id)
            stage = "measure"
            tables = worker.measure(config, repeat, order)
        except Exception as exc:  # noqa: BLE001 - the driver records it in failures.parquet
            worker.after_failure()
            return {"status": "failed", "stage": stage, "error_type": type(exc).__name__, "message": str(exc)}
        telemetry = tables.get("telemetry")
        if telemetry is not None:  # samples of many hosts and GPUs end up in one table
            import polars as pl

            tables["telemetry"] = telemetry.with_columns(
                *[pl.lit(worker.columns[k], dtype=pl.Utf8).alias(k) for k in ("worker_id", "host", "gpu_uuid")])
        return {"status": "ok", "tables": tables}

    def ping(self) -> str:
        return self.worker_id


def gpu_identity(torch_uuid: str, nvml: Any = None) -> dict[str, Any]:
    """``gpu_index`` (NVML numbering), ``gpu_uuid`` and ``driver`` of the GPU torch calls cuda:0.

    NVML ignores ``CUDA_VISIBLE_DEVICES``, which Ray sets for every GPU actor, so NVML's GPU 0 is
    not this actor's GPU in general; the GPU is found by its UUID. Without NVML: the UUID only.

    >>> class FakeNvml:
    ...     def nvmlInit(self): pass
    ...     def nvmlDeviceGetCount(self): return 2
    ...     def nvmlDeviceGetHandleByIndex(self, i): return i
    ...     def nvmlDeviceGetUUID(self, h): return ["GPU-aaaa", "GPU-bbbb"][h]
    ...     def nvmlSystemGetDriverVersion(self): return b"550.54"
    >>> gpu_identity("bbbb", FakeNvml())
    {'gpu_uuid': 'GPU-bbbb', 'gpu_index': 1, 'driver': '550.54'}
    >>> gpu_identity("cccc", FakeNvml())
    {'gpu_uuid': 'GPU-cccc', 'gpu_index': None}
    """
    bare = torch_uuid.removeprefix("GPU-")
    found: dict[str, Any] = {"gpu_uuid": f"GPU-{bare}", "gpu_index": None}
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if _text(nvml.nvmlDeviceGetUUID(handle)).removeprefix("GPU-") == bare:
                found.update(gpu_index=index, driver=_text(nvml.nvmlSystemGetDriverVersion()))
                break
    except Exception:  # noqa: BLE001 - NVML is optional: the UUID from CUDA still names the GPU
        pass
    return found


def telemetry_mode(nvml: str, gpu_index: int | None) -> str:
    """The NVML mode a GPU actor can honour. The phase profiler opens NVML by the GPU's UUID, so
    any GPU NVML found (gpu_index not None) is sampled correctly whatever CUDA_VISIBLE_DEVICES
    says; a GPU NVML cannot find gets no telemetry ("auto") or a clear refusal ("required").

    >>> telemetry_mode("auto", 0), telemetry_mode("auto", 3), telemetry_mode("auto", None), telemetry_mode("off", 3)
    ('auto', 'auto', 'off', 'off')
    """
    if nvml == "off" or gpu_index is not None:
        return nvml
    if nvml == "required":
        raise SweepError("--nvml required on Ray: NVML does not find this worker's GPU by its UUID; "
                         "use --nvml auto (telemetry off on such workers) or --nvml off")
    return "off"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------- driver
@dataclass
class _Slot:
    """A place for one worker; a dead worker's slot gets a fresh actor (up to max_restarts)."""

    actor: Any = None
    worker_id: str = ""
    name: str = ""
    ready: bool = False
    inflight: int = 0
    restarts: int = 0
    alive: bool = True


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("--ray needs Ray, which is not installed; install the extra with "
                         "`pip install 'molmo-latency[ray]'` (or `pip install 'ray>=2.9'`)") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Use the Ray of this process, or start a local one (address None), or join a cluster.
    Returns whether this call started the connection (and must shut it down)."""
    if ray.is_initialized():
        return False
    import logging

    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        where = "a local Ray" if address is None else f"the Ray cluster at {address}"
        raise SweepError(f"cannot start or reach {where}: {exc}; start a cluster with `ray start --head` "
                         "and pass its HEAD:6379, or use --ray local") from None
    return True


def _plan_workers(ray, device: str, workers: int | None, cpus_per_worker: float, units: int) -> int:
    resources = ray.cluster_resources()
    if device.startswith("cuda"):
        have = int(resources.get("GPU", 0))
        if have == 0:
            raise SweepError(f"--device {device} on Ray, but the Ray cluster has no GPUs "
                             f"(resources: {dict(sorted(resources.items()))}); start it on GPU nodes or use --device cpu")
        what = "GPUs"
    else:
        have = int(resources.get("CPU", 0) // cpus_per_worker)
        if have == 0:
            raise SweepError(f"the Ray cluster has {resources.get('CPU', 0)} CPUs, fewer than "
                             f"cpus_per_worker={cpus_per_worker}")
        what = f"workers of {cpus_per_worker:g} CPUs"
    if workers is not None:
        if workers < 1:
            raise SweepError(f"workers must be >= 1, got {workers}")
        if workers > have:
            raise SweepError(f"asked for {workers} Ray workers but the cluster has room for {have} {what}; "
                             "ask for fewer or add nodes")
        have = workers
    return max(1, min(have, units))


def _named_error(error_type: str, message: str) -> Exception:
    """An exception whose type name is the worker's (for failures.parquet's error_type)."""
    return type(error_type, (Exception,), {})(message)


def run_sweep_ray(
    model: str,
    spec: SweepSpec,
    out: str | Path,
    *,
    address: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    nvml: str = "auto",
    trust_remote_code: bool = False,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    max_restarts: int = 3,
    progress: Callable[[Progress], None] = no_progress,
    command: str | None = None,
) -> RaySweepResult:
    """Profile `model` over `spec` on Ray into the run directory `out` (one worker per GPU, or
    per `cpus_per_worker` CPUs with ``device="cpu"``), resuming a run of the same sweep and model
    (made on Ray or not).

    `address`: None starts a local Ray (or uses the one this process already started with
    ``ray.init``); ``"HEAD:6379"`` joins a running cluster. `workers`: how many (default: every
    GPU, or every `cpus_per_worker` CPUs, of the cluster). `max_restarts`: how often a worker's
    place gets a fresh actor after its actor died. `model` is a preset or a model directory that
    every node can read.

    Returns counts (:class:`~molmo_latency.sweep.schedule.RaySweepResult`, also readable as
    ``result["measured"]``): measured, skipped (already done), failed_configs, rows, resumed,
    workers, actors_started (workers plus replacements), worker_deaths, units_redone (handed out
    again after their worker died), duplicates_dropped, run_dir.

    Example:
        >>> import tempfile, ray
        >>> from molmo_latency.sweep import SweepSpec
        >>> _ = ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
        >>> spec = SweepSpec.from_dict({"crops": [1, 2], "repeats": 2, "warmup": 1, "new_tokens": [3]})
        >>> out = run_sweep_ray("tiny", spec, tempfile.mkdtemp(), workers=2)
        >>> out["measured"], out["workers"], out["failed_configs"]
        (4, 2, 0)
        >>> ray.shutdown()
    """
    if not isinstance(model, str):
        raise SweepError("on Ray the model must be a preset name or a model directory every node can read "
                         f"(got a {type(model).__name__}); pass its name or path")
    if device != "cpu" and not device.startswith("cuda"):
        raise SweepError(f"--device must be cpu or cuda[:N], got {device!r}")
    if cpus_per_worker <= 0:
        raise SweepError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
    ray = _import_ray()  # refused before anything is written: no run.json, no .lock left behind
    with RunDir(out).locked():  # one sweep at a time writes into a run directory
        identity = run_identity(model, device, dtype, spec)
        rd, resumed = RunDir.create_or_resume(out, identity, run_meta(spec, device=device, nvml=nvml, command=command))

        schedule = Schedule.of(spec, rd.done_units(), rd.failed_configs())
        result = RaySweepResult(run_dir=str(rd.path), measured=0, skipped=schedule.skipped,
                                failed_configs=len(schedule.failed), rows=0, resumed=resumed)
        if schedule.has_next():
            owned = _connect(ray, address)
            try:
                recorder = SweepRecorder(rd, schedule, progress, consolidate_every_s=runner.CONSOLIDATE_EVERY_S)
                try:
                    _RayExecutor(ray, recorder, result, model=model, spec=spec, device=device, dtype=dtype,
                                 nvml=nvml, trust_remote_code=trust_remote_code, cpus_per_worker=cpus_per_worker,
                                 max_restarts=max_restarts, address=address).run(workers)
                finally:
                    result.measured = recorder.measured
            finally:
                if owned:
                    ray.shutdown()
        counts = rd.consolidate()
        result.rows, result.failed_configs = counts.get("requests", 0), len(rd.failed_configs())
    return result


class _RayExecutor:
    """The Ray executor of a sweep's schedule: hand units to workers with room, hand what comes
    back to the recorder, queue again what a lost worker held."""

    def __init__(self, ray, recorder: SweepRecorder, result: RaySweepResult, *, model: str, spec: SweepSpec,
                 device: str, dtype: str | None, nvml: str, trust_remote_code: bool, cpus_per_worker: float,
                 max_restarts: int, address: str | None):
        self.ray, self.recorder, self.result = ray, recorder, result
        self.schedule, self.rd = recorder.schedule, recorder.rd
        self.device, self.cpus_per_worker, self.max_restarts = device, cpus_per_worker, max_restarts
        self.actor_args = dict(model=model, spec=spec, device=device, dtype=dtype, nvml=nvml,
                               trust_remote_code=trust_remote_code)
        if device.startswith("cuda"):
            self.actor_cls = ray.remote(num_gpus=1, num_cpus=cpus_per_worker, max_restarts=0)(SweepActor)
            self.threads = None
        else:
            self.actor_cls = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(SweepActor)
            self.threads = max(1, int(cpus_per_worker))
        self.token = uuid.uuid4().hex[:8]
        self.sessions = self.rd.meta().get("ray_sessions", [])
        self.session = {"started_unix": time.time(), "address": address or "local",
                        "unit": "(configuration, repeat)",
                        "warmup": "per worker, before its first unit of a configuration", "workers": []}
        self.refs: dict[Any, tuple[str, _Slot, str, int]] = {}  # ref -> (kind, slot, worker_id, unit)

    def spawn(self, slot: _Slot) -> None:
        slot.worker_id = f"s{len(self.sessions)}-w{self.result.actors_started}"
        self.result.actors_started += 1
        slot.name = f"{ACTOR_PREFIX}-{self.token}-{slot.worker_id}"
        slot.actor = self.actor_cls.options(name=slot.name).remote(
            **self.actor_args, worker_id=slot.worker_id, threads=self.threads)
        slot.ready, slot.inflight, slot.alive = False, 0, True
        self.refs[slot.actor.start.remote()] = ("start", slot, slot.worker_id, -1)

    def lose(self, slot: _Slot, worker_id: str) -> None:
        """The actor behind `worker_id` is gone: give its slot a fresh actor (once per death)."""
        if slot.worker_id != worker_id or not slot.alive:
            return
        self.result.worker_deaths += 1
        slot.alive = False
        with _quiet():
            self.ray.kill(slot.actor)
        if slot.restarts < self.max_restarts:
            slot.restarts += 1
            self.spawn(slot)

    def give_back(self, unit: int, worker_id: str, exc: BaseException) -> None:
        """A unit whose worker died: queued again, or recorded failed (stage "worker") after
        MAX_UNIT_ATTEMPTS deaths."""
        if not self.schedule.wanted(unit):
            return
        if self.schedule.retry(unit, MAX_UNIT_ATTEMPTS):
            self.result.units_redone += 1
            return
        err = _named_error("WorkerDied", f"the Ray worker measuring this configuration died "
                                         f"{self.schedule.attempts[unit]} times (last: {type(exc).__name__}: "
                                         f"{str(exc)[:500]})")
        self.recorder.failed(self.schedule.units[unit][0], err, "worker", cls=WorkerProgress, worker_id=worker_id)

    def started(self, slot: _Slot, worker_id: str, value: dict[str, Any]) -> None:
        if "error" in value:
            raise SweepError(f"Ray worker {worker_id} on {value.get('host', '?')} cannot start: {value['error']}")
        slot.ready = True
        if not self.rd.meta().get("model"):
            self.rd.update_meta(model=value["model"])
        self.session["workers"].append({k: v for k, v in value.items() if k != "model"})
        self.rd.update_meta(ray_sessions=[*self.sessions, self.session])

    def fill(self, slots: list[_Slot]) -> None:
        """Give every ready worker units up to IN_FLIGHT_PER_WORKER."""
        for slot in slots:
            while slot.alive and slot.ready and slot.inflight < IN_FLIGHT_PER_WORKER:
                unit = self.schedule.next()
                if unit is None:
                    break
                config, repeat = self.schedule.units[unit]
                self.refs[slot.actor.measure.remote(config, repeat, unit)] = ("unit", slot, slot.worker_id, unit)
                slot.inflight += 1

    def run(self, workers: int | None) -> None:
        ray = self.ray
        n_workers = _plan_workers(ray, self.device, workers, self.cpus_per_worker, self.schedule.pending)
        self.result.workers = n_workers
        self.rd.update_meta(ray_sessions=[*self.sessions, self.session])
        from molmo_latency.conditions import run_conditions

        conditions = run_conditions(self.threads or torch.get_num_threads(), None)
        conditions["executor"] = {"ray_workers": n_workers, "cpus_per_worker": self.cpus_per_worker}
        self.rd.update_meta(conditions=conditions)  # the driver host's; each worker's are in ray_sessions
        slots = [_Slot() for _ in range(n_workers)]
        for slot in slots:
            self.spawn(slot)
        try:
            while True:
                self.fill(slots)
                if not self.schedule.has_next() and not any(kind == "unit" for kind, *_ in self.refs.values()):
                    break  # all measured or failed (a replacement still starting is not waited for)
                if not self.refs:
                    raise SweepError(f"every Ray worker died (after {self.max_restarts} restarts each) with "
                                     f"{self.schedule.pending} units left; the measured ones are kept: run the "
                                     "same command again to resume")
                [ref], _ = ray.wait(list(self.refs), num_returns=1)
                self.receive(ref)
        finally:
            for slot in slots:
                if slot.actor is not None:
                    with _quiet():
                        ray.kill(slot.actor)

    def receive(self, ref: Any) -> None:
        """One result from a worker: started, a measured unit, a failure, or a lost worker."""
        ray = self.ray
        kind, slot, worker_id, unit = self.refs.pop(ref)
        current = slot.worker_id == worker_id and slot.alive
        if kind == "unit" and current:
            slot.inflight -= 1
        try:
            value = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                ray.exceptions.OwnerDiedError, ray.exceptions.NodeDiedError) as exc:
            self.lose(slot, worker_id)
            if kind == "unit":
                self.give_back(unit, worker_id, exc)
            return
        except ray.exceptions.RayTaskError as exc:  # a bug in the worker's own code, not a user error
            if kind == "start":
                raise
            self.recorder.failed(self.schedule.units[unit][0], exc, "ray", cls=WorkerProgress, worker_id=worker_id)
            return
        if kind == "start":
            self.started(slot, worker_id, value)
            return
        config, repeat = self.schedule.units[unit]
        if value["status"] == "failed":
            self.recorder.failed(config, _named_error(value["error_type"], value["message"]), value["stage"],
                                 cls=WorkerProgress, worker_id=worker_id, actor_name=slot.name if current else None)
            return
        if (config.config_id, repeat) in self.schedule.done:
            self.result.duplicates_dropped += 1
            return
        self.recorder.measured_unit(unit, value["tables"], cls=WorkerProgress, worker_id=worker_id,
                                    actor_name=slot.name if current else None)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)
