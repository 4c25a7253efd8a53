"""The sweep runner: warm-up, interleaved measurement, one cache policy, rows written as they
finish, failures recorded and skipped, resumable.

Example:
    >>> import tempfile
    >>> from molmo_latency.sweep import SweepSpec, run_sweep
    >>> spec = SweepSpec.from_dict({"crops": [1, 2], "repeats": 2, "warmup": 1, "new_tokens": [3]})
    >>> out = run_sweep("tiny", spec, tempfile.mkdtemp())
    >>> out["measured"], out["failed_configs"]
    (4, 0)
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import polars as pl
import torch

from molmo_latency.conditions import SpeedReference, run_conditions
from molmo_latency.errors import SweepError
from molmo_latency.profiler import profile_phases
from molmo_latency.safe_fs import inside
from molmo_latency.sweep.machine import device_columns, versions
from molmo_latency.hold.rundir import RunDir
from molmo_latency.sweep.schedule import LocalSweepResult, Progress, ProgressFn, Schedule, SweepRecorder, no_progress
from molmo_latency.sweep.source import ModelSource, open_source, parse_dtype
from molmo_latency.sweep.spec import Config, SweepSpec


# The top-level tables take in the new parts at least this often while a sweep runs.
CONSOLIDATE_EVERY_S = 30.0


def run_identity(model: str, device: str, dtype: str | None, spec: SweepSpec) -> dict[str, Any]:
    """What must match to resume a run directory, normalised so that equal runs compare equal.

    The dtype is the torch dtype's name (``--dtype fp32`` and no ``--dtype`` on CPU are both
    ``float32``), the device a torch device with an index for CUDA (``cuda`` is ``cuda:0``), a
    local model directory its absolute path plus a short sha256 of its config.json (presets stay
    by name).

    Example:
        >>> from molmo_latency.sweep import SweepSpec
        >>> spec = SweepSpec.from_dict({"crops": [1]})
        >>> run_identity("tiny", "cpu", "fp32", spec) == run_identity("tiny", "cpu", None, spec)
        True
        >>> run_identity("tiny", "cuda", "bf16", spec)["device"], run_identity("tiny", "cuda", "bf16", spec)["dtype"]
        ('cuda:0', 'bfloat16')
    """
    dev = torch.device(device)
    device_name = f"cuda:{dev.index or 0}" if dev.type == "cuda" else str(dev)
    identity: dict[str, Any] = {"model": model, "device": device_name,
                                "dtype": str(parse_dtype(dtype, device_name)).removeprefix("torch."),
                                "sweep_digest": spec.digest()}
    path = Path(model)
    if (path / "config.json").is_file():
        identity["model"] = str(path.resolve())
        identity["model_config_sha256"] = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    return identity


def measure_config(source: ModelSource, prof, config: Config, spec: SweepSpec) -> tuple[int, ...] | None:
    """One generate() of `config` under the run's cache policy (the profiler is active);
    returns the indices of the blocks that ran."""
    kwargs = source.inputs(config)
    gen = source.generation_kwargs(config, free_generation=spec.protocol["free_generation"])
    if spec.protocol["cache_policy"] == "empty_before_each" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    cooldown = spec.protocol["cooldown_ms"]
    if cooldown:
        time.sleep(cooldown / 1000)
    with source.configured(config):
        indices = source.active_block_indices()
        with source.generation_context():
            source.model.generate(**kwargs, **gen)
    return indices


def unit_tables(report, config: Config, repeat: int, order: int, device_cols: dict[str, Any],
                block_indices: tuple[int, ...] | None = None) -> dict[str, pl.DataFrame]:
    """Tag a one-request report with its configuration (`blocks`: the count; `block_indices`:
    the exact blocks that ran), repeat, order and device."""
    keys = {"config_id": config.config_id, "repeat": repeat}
    cfg = config.as_dict()
    indices = None if block_indices is None else list(block_indices)
    requests = report.requests.drop("batch_size").with_columns(
        *[pl.lit(v, dtype=pl.Int64).alias(k) for k, v in cfg.items()],
        pl.Series("block_indices", [indices] * report.requests.height, dtype=pl.List(pl.Int64)),
        pl.lit(config.config_id).alias("config_id"), pl.lit(repeat, dtype=pl.Int64).alias("repeat"),
        pl.lit(order, dtype=pl.Int64).alias("order"),
        *[pl.lit(v, dtype=pl.Int64 if k == "gpu_index" else pl.Utf8).alias(k) for k, v in device_cols.items()],
    )
    phases = report.phases.with_columns(pl.lit(keys["config_id"]).alias("config_id"),
                                        pl.lit(repeat, dtype=pl.Int64).alias("repeat"))
    tables = {"requests": requests, "phases": phases}
    if report.modules is not None:
        tables["modules"] = report.modules.with_columns(pl.lit(keys["config_id"]).alias("config_id"),
                                                        pl.lit(repeat, dtype=pl.Int64).alias("repeat"))
    if report.telemetry is not None:
        tables["telemetry"] = report.telemetry
    return tables


class Worker:
    """What measures: one loaded model, its phase profiler and the warm-up of each configuration.

    The local sweep loop owns one; on Ray (:mod:`molmo_latency.scale`) each actor owns one. A
    worker measures one (configuration, repeat) at a time and returns that unit's tables; it
    writes nothing (the caller writes them into the run directory).

    Example:
        >>> from molmo_latency.sweep import SweepSpec
        >>> from molmo_latency.sweep.runner import Worker
        >>> spec = SweepSpec.from_dict({"crops": [1], "repeats": 1, "warmup": 1, "new_tokens": [3]})
        >>> [(config, repeat)] = spec.units()
        >>> with Worker.open("tiny", spec) as worker:
        ...     worker.warm_up(config)
        ...     tables = worker.measure(config, repeat, order=0)
        >>> tables["requests"].select("config_id", "repeat", "decode_steps", "device").row(0)
        ('c1-kdef-ball-p32-n3-bs1', 0, 2, 'cpu')
    """

    def __init__(self, source: ModelSource, spec: SweepSpec, *, device: str = "cpu", nvml: str = "auto",
                 columns: dict[str, Any] | None = None):
        self.source = source
        self.spec = spec
        self.nvml = nvml
        # host and device columns of every row (plus any the caller adds, e.g. a worker id)
        self.columns = {**device_columns(device), **(columns or {})}
        self.speed = SpeedReference()  # timed beside each measured request: reference_ms
        self.warmed: set[str] = set()
        # warm-up requests' totals per configuration, to tell when it is steady
        self.warmup_ms: dict[str, list[float]] = {}
        # the GPU the model runs on (device layer; None on a CPU or where NVML cannot open it),
        # for the thermal mode, and what each thermal wait did
        self.gpu = None
        self.thermal_waits: list[dict[str, Any]] = []
        # after a failed request, the next measurement is preceded by one unmeasured request
        self.rewarm = False
        self.post_failure_warmups = 0
        self._profiler = None
        self._prof = None

    @classmethod
    def open(cls, model: str | ModelSource, spec: SweepSpec, *, device: str = "cpu", dtype: str | None = None,
             nvml: str = "auto", trust_remote_code: bool = False, columns: dict[str, Any] | None = None) -> "Worker":
        """Load `model` (a preset, a local HF directory or a loaded source) for `spec`'s seed."""
        source = model if isinstance(model, ModelSource) else open_source(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, seed=spec.protocol["seed"])
        return cls(source, spec, device=device, nvml=nvml, columns=columns)

    def __enter__(self) -> "Worker":
        self._profiler = profile_phases(self.source.model, nvml=self.nvml,
                                        detail=self.spec.protocol.get("detail", "phases"))
        self._prof = self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        profiler, self._profiler, self._prof = self._profiler, None, None
        if profiler is not None:
            profiler.__exit__(*exc)

    def warm_up(self, config: Config) -> None:
        """One unmeasured request of `config` (its report is dropped, its total kept to judge
        steadiness); raises what generate() raised."""
        report = None
        try:
            measure_config(self.source, self._prof, config, self.spec)
        finally:
            report = self._prof.pop_report()
        totals = report.requests["total_ms"].drop_nulls().to_list() if report is not None else []
        self.warmup_ms.setdefault(config.config_id, []).extend(totals)
        self.warmed.add(config.config_id)
        self.rewarm = False

    def steady(self, config: Config) -> bool:
        """Whether `config`'s last warm-up requests agree (the protocol's window and tolerance),
        or the warm-up cap is reached; True when steadiness is not asked for (tolerance 0)."""
        p = self.spec.protocol
        seen = self.warmup_ms.get(config.config_id, [])
        if p["warmup_tolerance_pct"] <= 0 or len(seen) >= max(p["warmup_max"], p["warmup"]):
            return True
        last = seen[-p["warmup_window"]:]
        if len(last) < p["warmup_window"]:
            return False
        median = sorted(last)[len(last) // 2]
        return median > 0 and (max(last) - min(last)) / median * 100 <= p["warmup_tolerance_pct"]

    def warmup_record(self) -> dict[str, dict[str, Any]]:
        """Per configuration: how many warm-up requests ran, whether the last window agreed
        (steady) or the cap stopped it, and the spread of that window (for run.json)."""
        p = self.spec.protocol
        out = {}
        for config_id, seen in self.warmup_ms.items():
            last = seen[-p["warmup_window"]:]
            median = sorted(last)[len(last) // 2] if last else 0.0
            spread = (max(last) - min(last)) / median * 100 if median > 0 and len(last) > 1 else None
            out[config_id] = {"requests": len(seen), "window_spread_pct": None if spread is None else round(spread, 2),
                              "steady": spread is not None and len(last) >= p["warmup_window"]
                              and spread <= p["warmup_tolerance_pct"]}
        return out

    def measure(self, config: Config, repeat: int, order: int) -> dict[str, pl.DataFrame]:
        """One measured request of `config`: the unit's tables (requests, phases, telemetry).

        After a failed request (see :meth:`after_failure`) one unmeasured warm-up request of
        `config` runs first, so that no measurement starts from the state a failure left."""
        if self.rewarm:
            self.warm_up(config)
            self.post_failure_warmups += 1
        self._thermal_wait()
        before = self.speed.time_ms()
        try:
            indices = measure_config(self.source, self._prof, config, self.spec)
        finally:
            report = self._prof.pop_report()
        reference = (before + self.speed.time_ms()) / 2  # the host's speed around the request
        tables = unit_tables(report, config, repeat, order, self.columns, block_indices=indices)
        tables["requests"] = tables["requests"].with_columns(pl.lit(reference, dtype=pl.Float64).alias("reference_ms"))
        return tables

    def _thermal_wait(self) -> None:
        """The protocol's thermal mode: wait for an idle GPU at most gpu_max_temp_c hot (off
        without a GPU to read, or with gpu_max_temp_c 0); every wait is kept for run.json."""
        p = self.spec.protocol
        if not p["gpu_max_temp_c"] or self.gpu is None:
            return
        from molmo_latency.conditions import ThermalWait, wait_until_cool

        self.thermal_waits.append(wait_until_cool(self.gpu, ThermalWait(max_temp_c=float(p["gpu_max_temp_c"]),
                                                                      timeout_s=float(p["gpu_wait_max_s"]))))

    def thermal_record(self) -> dict[str, Any] | None:
        """What the thermal waits did (for run.json): how many, the total and longest wait, and
        how many gave up at their timeout; None when the thermal mode was off."""
        if not self.thermal_waits:
            return None
        waited = [w["waited_s"] for w in self.thermal_waits]
        return {"waits": len(waited), "total_s": round(sum(waited), 3), "max_s": max(waited),
                "timed_out": sum(bool(w["timed_out"]) for w in self.thermal_waits)}

    def after_failure(self) -> None:
        """Give back what a failed request held; the next measurement is warmed up again first
        (the allocator cache is then as full as for any other measurement)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.rewarm = True


def run_meta(spec: SweepSpec, *, device: str, nvml: str, command: str | None, **extra: Any) -> dict[str, Any]:
    """What run.json records about a new run: the command, the sweep, the protocol, versions."""
    return {"created_unix": time.time(), "command": command, "sweep": spec.as_dict(),
            "protocol": {**spec.protocol, "min_new_tokens": "= max_new_tokens" if not spec.protocol["free_generation"] else None,
                         "warmup_kept_out_of_data": True, "timer": "cuda_event" if device.startswith("cuda") else "perf_counter",
                         "synchronize_inside_generate": False, "kineto_requests_measured": False},
            "versions": versions(), "nvml": nvml, **extra}


def run_sweep(
    model: str | ModelSource,
    spec: SweepSpec,
    out: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    kineto: bool = False,
    nvml: str = "auto",
    trust_remote_code: bool = False,
    progress: ProgressFn = no_progress,
    command: str | None = None,
    threads: int | None = None,
) -> LocalSweepResult:
    """Profile `model` over `spec` into the run directory `out` (resuming a run made by the
    same sweep and model). Returns counts (:class:`~molmo_latency.sweep.schedule.LocalSweepResult`,
    also readable as ``result["measured"]``): measured, skipped (already done), failed_configs,
    rows, resumed, post_failure_warmups.

    `threads`: torch's intra-op threads for the whole run (default on a CPU device:
    :data:`DEFAULT_CPU_THREADS`, never whatever the library picked; on a GPU: torch's current
    count). It is part of the run's identity and recorded, with the rest of the conditions, in
    run.json's ``conditions``."""
    threads = resolve_threads(threads, device)
    # Load the model (and check the device) before the run directory is touched: a start that
    # fails here leaves nothing behind.
    worker = Worker.open(model, spec, device=device, dtype=dtype, nvml=nvml, trust_remote_code=trust_remote_code)
    worker.source.check_configs(spec.configs())  # a knob value the model cannot take: refused now
    if nvml == "required":  # refused now, not after run.json is written
        from molmo_latency.telemetry.device import open_gpu
        from molmo_latency.telemetry.source import resolve_gpu

        open_gpu(resolve_gpu(worker.source.model).nvml_id).close()
    if isinstance(model, str):
        identity = run_identity(model, device, dtype, spec)
    else:
        loaded = str(next(model.model.parameters()).dtype).removeprefix("torch.")
        identity = run_identity(model.name, device, dtype or loaded, spec)
    identity["threads"] = threads
    rd = RunDir(out)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with rd.locked():
            rd, resumed = RunDir.create_or_resume(out, identity, run_meta(spec, device=device, nvml=nvml,
                                                                          command=command))
            worker.gpu = _conditions_gpu(worker.source.model, nvml)
            rd.update_meta(conditions=run_conditions(threads, torch.get_num_interop_threads(), gpu=worker.gpu))
            return _sweep_locked(worker, spec, rd, resumed, kineto=kineto, progress=progress)
    finally:
        torch.set_num_threads(before)


# torch threads of a CPU sweep unless told otherwise: one thread gives the steadiest labels on a
# shared machine (see benchmarks/RESULTS.md), and every label set then says how it was made
DEFAULT_CPU_THREADS = 1


def resolve_threads(threads: int | None, device: str) -> int:
    """The thread count a run uses: `threads`, else DEFAULT_CPU_THREADS on a CPU device, else
    torch's current count; refused in one line when it is not a positive integer."""
    from molmo_latency.errors import SweepError

    if threads is None:
        return DEFAULT_CPU_THREADS if not str(device).startswith("cuda") else torch.get_num_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise SweepError(f"--threads must be a whole number of threads >= 1, got {threads!r}")
    return threads


def _conditions_gpu(model, nvml: str):
    """The GPU (device layer) the model runs on, for run.json's conditions; None on a CPU, with
    NVML off, or where NVML cannot open it (the run is not refused for that here)."""
    param = next(model.parameters(), None)
    if nvml == "off" or param is None or param.device.type != "cuda":
        return None
    try:
        from molmo_latency.telemetry.device import open_gpu
        from molmo_latency.telemetry.source import resolve_gpu

        return open_gpu(resolve_gpu(model).nvml_id)  # the same GPU, by UUID, as the profiler reads
    except Exception:  # noqa: BLE001 - conditions are recorded where they can be read
        return None


def _sweep_locked(worker: Worker, spec: SweepSpec, rd: RunDir, resumed: bool, *, kineto: bool,
                  progress: ProgressFn) -> LocalSweepResult:
    """The in-process executor of the sweep's schedule: every configuration with work is warmed
    up first (interleaved, kept out of the data), then the units are measured in order."""
    rd.update_meta(model=worker.source.describe(), device=worker.columns, resumed=resumed)
    previous_rewarms = int(rd.meta().get("post_failure_warmups") or 0)
    schedule = Schedule.of(spec, rd.done_units(), rd.failed_configs())
    recorder = SweepRecorder(rd, schedule, progress, consolidate_every_s=CONSOLIDATE_EVERY_S)

    with worker:
        rounds = 0
        while True:  # interleaved rounds: the fixed count, then until each configuration is steady
            todo = [c for c in schedule.configs_with_work()
                    if rounds < spec.protocol["warmup"] or (spec.protocol["warmup"] and not worker.steady(c))]
            if not todo:
                break
            for config in todo:
                try:
                    worker.warm_up(config)
                except Exception as exc:  # noqa: BLE001 - record (that reports progress) and go on
                    recorder.failed(config, exc, "warmup")
                    worker.after_failure()
                    continue
                recorder.warmed_up(config)
            rounds += 1
        rd.update_meta(warmup_record={**(rd.meta().get("warmup_record") or {}), **worker.warmup_record()})
        while (unit := schedule.next()) is not None:
            config, repeat = schedule.units[unit]
            try:
                tables = worker.measure(config, repeat, unit)
            except Exception as exc:  # noqa: BLE001
                recorder.failed(config, exc, "measure")
                worker.after_failure()
                continue
            recorder.measured_unit(unit, tables)
    if kineto:
        _trace_configs(worker.source, spec, rd, [c for c in schedule.configs if c.config_id not in schedule.failed],
                       progress)
    counts = rd.consolidate()
    rd.update_meta(post_failure_warmups=previous_rewarms + worker.post_failure_warmups,
                   thermal_waits=worker.thermal_record())
    return LocalSweepResult(run_dir=str(rd.path), measured=recorder.measured, skipped=schedule.skipped,
                            failed_configs=len(schedule.failed), rows=counts.get("requests", 0), resumed=resumed,
                            post_failure_warmups=worker.post_failure_warmups)


def _trace_configs(source: ModelSource, spec: SweepSpec, rd: RunDir, configs: Iterable[Config],
                   progress: ProgressFn) -> None:
    """Extra, unmeasured requests per configuration under torch.profiler -> RUN_DIR/traces/."""
    traces = inside(rd.path / "traces", rd.path, SweepError)  # never write through a link out of the run
    traces.mkdir(exist_ok=True)
    n = spec.protocol["kineto_per_config"]
    configs = list(configs)
    for i, config in enumerate(configs):
        target = traces / f"{config.config_id}.pt.trace.json.gz"
        if target.exists() or n == 0:
            continue
        tmp = Path(tempfile.mkdtemp(dir=traces, prefix=".tmp-"))
        try:
            with profile_phases(source.model, trace_dir=tmp, nvml="off") as prof:
                for _ in range(n):
                    measure_config(source, prof, config, spec)
            [trace] = prof.traces
            Path(trace["path"]).replace(target)
        except Exception as exc:  # noqa: BLE001
            rd.record_failure(config.as_dict(), config.config_id, exc, "kineto")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(Progress(i + 1, len(configs), i + 1, len(configs), None, config.config_id, "kineto"))
