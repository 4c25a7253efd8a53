"""GPU truth in one prepared command (issue 28): every GPU figure molmo-latency claims, measured in
one run that stops itself before 8 minutes, each stage writing its results as soon as it finishes.

    bash benchmarks/gpu_truth.sh OUT_DIR                 # on the GPU machine (see benchmarks/GPU.md)
    python benchmarks/gpu_truth.py --rehearsal --out /tmp/rehearsal   # CPU, tiny model, seconds

Stages, in order, each with its own time budget (a stage that would start with less than its
minimum left is skipped and says so; loops inside a stage stop at its budget and say `cut_short`):

  env              device, versions, torch threads, one NVML reading (clocks, temperature, power)
  build            the molmoe-1b-shape model in bf16 on CUDA (rehearsal: "tiny" on CPU), warmed up
  overhead         generate() with no profiler / profile_phases / + NVML sampler / torch.profiler,
                   interleaved with rotating order; paired per-round differences against "none",
                   per request and per decode step, with a bootstrap 95% confidence interval
  stability        >= 30 repeats after warm-up of one configuration: CV of each decode step position
                   and of prefill, with the conditions (threads, device, clocks) recorded
  event_vs_kineto  one profile_phases block under torch.profiler: each phase's CUDA-event time vs the
                   GPU span of the same phase in the Kineto trace; kernels charged to each phase; the
                   trace is kept in OUT/traces/
  nvml             samples per second achieved inside requests; clocks, temperature, power and
                   throttle reasons per phase; energy per request
  compile          (child process) torch.compile and transformers' static-cache auto-compile:
                   requests valid, phases present
  gpu_tests        (child process) `pytest -m gpu` on the test files that hold gpu-marked tests
  sweep            (child process, last) crops {1,4,12} x top-k {2,8} x blocks {8,16} with
                   run_sweep, then fit_estimator on it; skipped when the budget is near

`--rehearsal` runs the very same stages on CPU with the tiny model, a fake CUDA clock (the
profiler's CudaEventTimer over fake events that read the host clock) and a FakeGpu for NVML, so
CI checks on every run that every stage runs and gpu.json has every key
(tests/test_gpu_truth.py). Rehearsal figures are not GPU figures: gpu.json says `"rehearsal": true`.

Written into OUT: gpu.json (rewritten after every stage), RESULTS-section.md (the same figures as
a benchmarks/RESULTS.md section), traces/*.pt.trace.json.gz, stages/*.json (child stages),
gpu_tests.xml and sweep_run/ (the sweep's run directory). `--apply OUT` copies gpu.json into
benchmarks/results/, the trace into traces/ and the section into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: The headline keys of gpu.json (issue 28), null only when their stage could not produce them.
HEADLINE_KEYS = ("device", "overhead_decode_step_pct", "decode_per_token_cv_pct_median",
                 "event_vs_kineto_phase_diff_pct_max", "nvml_achieved_hz")
#: Every stage, in the order it runs.
STAGE_NAMES = ("env", "build", "overhead", "stability", "event_vs_kineto", "nvml", "compile",
               "gpu_tests", "sweep")
TRACE_NAME = "gpu_truth_profile_phases.pt.trace.json.gz"
SECTION_TITLE = "GPU truth (issue 28)"


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run: the GPU plan and the rehearsal plan are two values of this."""

    preset: str
    device: str
    dtype: str | None
    deadline_s: float                       # the whole run stops itself here (from the start)
    budgets_s: dict[str, float]             # per stage: at most this long
    min_start_s: dict[str, float]           # per stage: skipped when less than this is left
    crops: int = 1
    prompt_tokens: int = 32
    new_tokens: int = 16
    warmup: int = 2
    overhead_rounds_max: int = 60
    overhead_rounds_min: int = 5
    stability_repeats: int = 30
    stability_repeats_max: int = 60
    kineto_new_tokens: int = 8
    nvml_long_new_tokens: int = 64
    compile_preset: str = "tiny"
    compile_backend: str = "inductor"
    compile_parts: tuple[str, ...] = ("torch_compile", "static_cache")
    sweep: dict[str, Any] = field(default_factory=dict)
    children_in_process: tuple[str, ...] = ()  # child stages whose code runs in this process

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


GPU_PLAN = Plan(
    preset="molmoe-1b-shape", device="cuda", dtype="bf16", deadline_s=450.0,
    budgets_s={"env": 15, "build": 90, "overhead": 70, "stability": 40, "event_vs_kineto": 40,
               "nvml": 25, "compile": 90, "gpu_tests": 40, "sweep": 130},
    min_start_s={"env": 1, "build": 30, "overhead": 20, "stability": 15, "event_vs_kineto": 15,
                 "nvml": 10, "compile": 25, "gpu_tests": 15, "sweep": 60},
    sweep={"crops": [1, 4, 12], "top_k": [2, 8], "blocks": [8, 16], "prompt_tokens": [32],
           "new_tokens": [8], "repeats": 3, "warmup": 1},
)

REHEARSAL_PLAN = Plan(
    # budgets far above what each stage needs (seconds on an idle 2-core CPU): a loaded CI machine
    # must never cut the rehearsal short
    # (the sweep child took 37-54 s on a CPU loaded 5x over, on transformers 4.51.3)
    preset="tiny", device="cpu", dtype=None, deadline_s=420.0,
    budgets_s={"env": 30, "build": 60, "overhead": 60, "stability": 60, "event_vs_kineto": 40,
               "nvml": 30, "compile": 90, "gpu_tests": 90, "sweep": 150},
    min_start_s={"env": 1, "build": 1, "overhead": 1, "stability": 1, "event_vs_kineto": 1,
                 "nvml": 1, "compile": 1, "gpu_tests": 1, "sweep": 1},
    crops=1, prompt_tokens=16, new_tokens=6, warmup=1, overhead_rounds_max=3, overhead_rounds_min=3,
    stability_repeats=30, stability_repeats_max=30, kineto_new_tokens=4, nvml_long_new_tokens=24,
    compile_preset="tiny", compile_backend="eager",
    # an explicit torch.compile of the whole call costs 15-45 s of Dynamo tracing on a 2-core CPU;
    # CI covers it in tests/test_profiler_cases.py, the rehearsal runs the static-cache auto-compile
    compile_parts=("static_cache",),
    # a 4-configuration grid (the tiny model has 4 blocks and 8 experts); the GPU grid's spec is
    # parsed by the rehearsal too (sweep stage: gpu_plan_configs)
    sweep={"crops": [1, 4], "top_k": [2, 8], "blocks": [4], "prompt_tokens": [16],
           "new_tokens": [3], "repeats": 2, "warmup": 0},
    # compile in this process (a second interpreter costs seconds on a 2-core CPU); the sweep as a
    # child process, as on the GPU, so the child protocol (--child, part file, kill) is rehearsed
    children_in_process=("compile",),
)


# ------------------------------------------------------------------------------- the results
def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (never written as a number we cannot trust)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return str(value)


class Results:
    """What the run measured so far; written to OUT/gpu.json (and the section) on every flush."""

    def __init__(self, out: Path, rehearsal: bool, plan: Plan, started: float):
        self.out = out
        self.started = started
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {
            "schema": 1,
            "rehearsal": rehearsal,
            **{k: None for k in HEADLINE_KEYS},
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - started))),
            "deadline_s": plan.deadline_s,
            "elapsed_s": 0.0,
            "finished": False,
            "plan": plan.to_json(),
            "stages": {name: {"status": "pending"} for name in STAGE_NAMES},
        }

    def put(self, **values: Any) -> None:
        with self.lock:
            self.data.update(values)

    def stage(self, name: str, **values: Any) -> None:
        with self.lock:
            self.data["stages"].setdefault(name, {}).update(values)

    def flush(self) -> None:
        """Rewrite gpu.json and RESULTS-section.md (each replaced whole: a reader never sees half)."""
        with self.lock:  # also held while writing: the deadline watchdog may flush at any time
            self.data["elapsed_s"] = round(time.monotonic() - self.started, 3)
            text = json.dumps(_clean(self.data), indent=1, sort_keys=False)
            section = results_section(self.data)
            self.out.mkdir(parents=True, exist_ok=True)
            for name, body in (("gpu.json", text), ("RESULTS-section.md", section)):
                tmp = self.out / f".{name}.tmp"
                tmp.write_text(body + "\n")
                os.replace(tmp, self.out / name)


# ------------------------------------------------------------------------ budgets and stages
class Budget:
    """Time left to a stage: its own budget, capped by the whole run's deadline."""

    def __init__(self, started: float, deadline_s: float, budget_s: float):
        self.stage_end = min(time.monotonic() + budget_s, started + deadline_s)

    def left(self) -> float:
        return self.stage_end - time.monotonic()


@dataclass
class Context:
    plan: Plan
    rehearsal: bool
    out: Path
    results: Results
    started: float
    ref: Any = None          # the built reference model
    cut_short: bool = False  # set by a stage whose loop stopped at its budget
    nvml_error: str | None = None  # why NVML cannot be read here (set by the env stage)

    def timer(self):
        """The profiler's timer: None (its default, CUDA events on a GPU) or, in the rehearsal,
        a CudaEventTimer over the fake CUDA clock."""
        if not self.rehearsal:
            return None
        from molmo_latency.timers import CudaEventTimer
        import torch

        return CudaEventTimer(torch.device("cuda", 0), pool_size=64)

    def gpu_device(self):
        """What the NVML sampler reads: None (the model's GPU) or, in the rehearsal, a FakeGpu."""
        if not self.rehearsal:
            return None
        from molmo_latency.telemetry import FakeGpu

        return FakeGpu(name="FakeGpu (rehearsal)")

    def nvml_mode(self) -> str:
        """"required" where NVML (or the rehearsal's FakeGpu) works, else "off": a GPU whose NVML
        is refused still gets every other figure, and the NVML figures say why they are missing."""
        return "off" if self.nvml_error else "required"

    def sync(self) -> None:
        import torch

        if self.plan.device.startswith("cuda"):
            torch.cuda.synchronize()

    def request(self, new_tokens: int | None = None, crops: int | None = None) -> dict[str, Any]:
        return self.ref.request(crops=self.plan.crops if crops is None else crops,
                                prompt_tokens=self.plan.prompt_tokens,
                                new_tokens=self.plan.new_tokens if new_tokens is None else new_tokens)


class FakeCudaClock:
    """Rehearsal only: torch.cuda.Event / current_stream replaced by events that read the host
    clock when recorded (a GPU that runs every kernel synchronously), so the profiler's
    CudaEventTimer runs its real code on a CPU. elapsed_time is float32 ms like the real one."""

    class Event:
        def __init__(self, enable_timing: bool = False):
            self.ns: int | None = None

        def record(self, stream: Any = None) -> None:
            self.ns = time.perf_counter_ns()

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: "FakeCudaClock.Event") -> float:
            import numpy as np

            return float(np.float32((other.ns - self.ns) / 1e6))

    def __enter__(self) -> "FakeCudaClock":
        import torch

        self._saved = (torch.cuda.Event, torch.cuda.current_stream)
        torch.cuda.Event = FakeCudaClock.Event
        torch.cuda.current_stream = lambda device=None: f"fake stream of {device}"
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.cuda.Event, torch.cuda.current_stream = self._saved


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]


# ---------------------------------------------------------------------------------- statistics
def _cv_pct(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mean = statistics.fmean(xs)
    return 100.0 * statistics.stdev(xs) / mean if mean else None


def _bootstrap_ci(xs: list[float], stat: Callable[[list[float]], float], n: int = 2000,
                  seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of `stat` over resamples of `xs` (None below 3 values)."""
    if len(xs) < 3:
        return None
    rng = random.Random(seed)
    vals = sorted(stat(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [vals[int(0.025 * n)], vals[int(0.975 * n) - 1]]


def _iqr(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


# --------------------------------------------------------------------------------- the stages
def stage_env(ctx: Context, budget: Budget) -> None:
    import platform

    import torch
    import transformers

    from benchmarks._common import machine

    env: dict[str, Any] = {
        "machine": machine(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
    }
    for name in ("polars", "msgspec", "nvtx", "pynvml", "scipy", "pytest"):
        try:
            module = __import__(name)
            env[f"{name}_version"] = getattr(module, "__version__", "present")
        except ImportError as exc:
            env[f"{name}_version"] = f"missing ({_one_line(exc)})"
    if ctx.rehearsal:
        device = f"cpu (rehearsal: fake CUDA clock, FakeGpu; {platform.processor() or platform.machine()})"
        gpu = ctx.gpu_device()
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available here: run with --rehearsal on a CPU machine")
        props = torch.cuda.get_device_properties(0)
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        from molmo_latency.telemetry import open_gpu

        uuid = str(getattr(props, "uuid", "") or "")
        try:
            gpu = open_gpu(uuid if uuid.startswith("GPU-") else (f"GPU-{uuid}" if uuid else 0))
        except Exception as exc:  # noqa: BLE001 - recorded, and the nvml stage will say the same
            gpu = None
            env["nvml_error"] = ctx.nvml_error = _one_line(exc)
    if gpu is not None:
        reading = gpu.read()
        env["gpu_name"] = getattr(gpu, "name", None)
        env["gpu_uuid"] = getattr(gpu, "uuid", None)
        env["driver"] = getattr(gpu, "driver", None)
        env["reading_at_start"] = asdict(reading)
        gpu.close()
    ctx.results.put(device=device, env=env)


def stage_build(ctx: Context, budget: Budget) -> None:
    import torch

    from molmo_latency.models import reference_vlm

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}
    t0 = time.perf_counter()
    ctx.ref = reference_vlm(ctx.plan.preset, seed=0, device=ctx.plan.device, dtype=dtypes[ctx.plan.dtype])
    ctx.sync()
    built_s = time.perf_counter() - t0
    params = sum(p.numel() for p in ctx.ref.model.parameters())
    t0 = time.perf_counter()
    for _ in range(ctx.plan.warmup):
        ctx.ref.model.generate(**ctx.request())
        ctx.sync()
    info = {"preset": ctx.plan.preset, "dtype": str(next(ctx.ref.model.parameters()).dtype),
            "parameters": params, "build_s": built_s, "warmup_s": time.perf_counter() - t0,
            "request": {"crops": ctx.plan.crops, "prompt_tokens": ctx.plan.prompt_tokens,
                        "new_tokens": ctx.plan.new_tokens}}
    if ctx.plan.device.startswith("cuda"):
        info["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ctx.results.put(model=info)


def stage_overhead(ctx: Context, budget: Budget) -> None:
    from torch.profiler import ProfilerActivity, profile

    from molmo_latency import profile_phases

    model, kwargs = ctx.ref.model, ctx.request()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.plan.device.startswith("cuda") else [])
    arms = ["none", "profile_phases", "profile_phases+nvml", "torch.profiler"]
    if ctx.nvml_error:  # the sampler arm needs NVML
        arms.remove("profile_phases+nvml")
    times: dict[str, list[float]] = {a: [] for a in arms}
    step_ms: dict[str, list[float]] = {"profile_phases": [], "profile_phases+nvml": []}
    steps_seen: list[int] = []

    def timed() -> float:
        gc.collect()
        ctx.sync()
        t0 = time.perf_counter_ns()
        model.generate(**kwargs)
        ctx.sync()
        return (time.perf_counter_ns() - t0) / 1e6

    def one(arm: str, record: bool) -> None:
        if arm == "none":
            ms = timed()
        elif arm == "torch.profiler":
            with profile(activities=activities):
                ms = timed()
        else:
            nvml = dict(nvml="off") if arm == "profile_phases" else dict(
                nvml=ctx.nvml_mode(), nvml_device=ctx.gpu_device())
            with profile_phases(model, timer=ctx.timer(), **nvml) as prof:
                ms = timed()
            if record:
                rep = prof.report()
                req = rep.requests.row(0, named=True)
                if not req["valid"]:
                    raise RuntimeError(f"overhead: an invalid request ({req['invalid_reason']})")
                steps_seen.append(req["decode_steps"])
                step_ms[arm].append(req["decode_per_token_ms"])
        if record:
            times[arm].append(ms)

    for arm in arms:  # warm-up of every arm (CUPTI, the sampler thread, the allocator)
        one(arm, record=False)
    per_round = None
    rounds = 0
    while rounds < ctx.plan.overhead_rounds_max:
        # as many rounds as the budget holds (at least the minimum): stopping here is the plan
        if rounds >= ctx.plan.overhead_rounds_min and per_round and budget.left() < 1.5 * per_round:
            break
        t0 = time.monotonic()
        k = rounds % len(arms)
        for arm in arms[k:] + arms[:k]:
            one(arm, record=True)
        rounds += 1
        per_round = time.monotonic() - t0
    decode_steps = statistics.median(steps_seen)
    base = statistics.median(times["none"])
    step_ref = statistics.median(step_ms["profile_phases"])
    by_arm: dict[str, Any] = {}
    for arm in arms:
        xs = times[arm]
        entry = {"median_ms": statistics.median(xs), "iqr_ms": _iqr(xs), "n": len(xs)}
        if arm != "none":
            diffs = [a - b for a, b in zip(xs, times["none"])]  # paired by round: drift cancels
            med = statistics.median(diffs)
            ci = _bootstrap_ci(diffs, statistics.median)
            entry.update({
                "paired_diff_median_ms": med,
                "request_pct": 100 * med / base,
                "request_pct_ci95": None if ci is None else [100 * c / base for c in ci],
                "decode_step_pct": 100 * med / decode_steps / step_ref,
                "decode_step_pct_ci95": None if ci is None else [100 * c / decode_steps / step_ref for c in ci],
            })
        if arm in step_ms:
            entry["decode_step_ms_median"] = statistics.median(step_ms[arm])
        by_arm[arm] = entry
    pp = by_arm["profile_phases"]
    ctx.results.put(
        overhead_decode_step_pct=pp["decode_step_pct"],
        overhead_decode_step_pct_ci95=pp["decode_step_pct_ci95"],
        overhead_request_pct=pp["request_pct"],
        overhead_request_pct_ci95=pp["request_pct_ci95"],
        overhead_decode_step_pct_nvml=by_arm.get("profile_phases+nvml", {}).get("decode_step_pct"),
        overhead_decode_step_pct_torch_profiler=by_arm["torch.profiler"]["decode_step_pct"],
        overhead={"arms": by_arm, "rounds": rounds, "decode_steps_per_request": decode_steps,
                  "nvml_arm": f"dropped: {ctx.nvml_error}" if ctx.nvml_error else "measured",
                  "decode_step_ms_reference": step_ref,
                  "method": "generate() wall time (host clock, synchronised outside generate), arms "
                            "interleaved with rotating order; per arm the median of the per-round "
                            "differences against 'none'; per decode step = that / decode steps / the "
                            "median decode step profile_phases measured (an upper bound: the request's "
                            "fixed costs, vision and prefill hooks included, are charged to its decode "
                            "steps); CI: bootstrap of rounds",
                  "goal_decode_step_pct": 1.0},
    )


def stage_stability(ctx: Context, budget: Budget) -> None:
    import polars as pl
    import torch

    from molmo_latency import profile_phases

    model = ctx.ref.model
    with profile_phases(model, timer=ctx.timer(), nvml=ctx.nvml_mode(), nvml_device=ctx.gpu_device()) as prof:
        for _ in range(ctx.plan.warmup):
            model.generate(**ctx.request())
        prof.pop_report()  # warm-up requests are not measured
        n, per = 0, None
        while n < ctx.plan.stability_repeats_max:
            if n >= ctx.plan.stability_repeats and budget.left() < 3 * (per or 0):
                break
            if per is not None and budget.left() < 1.5 * per:
                ctx.cut_short = True
                break
            t0 = time.monotonic()
            model.generate(**ctx.request())
            ctx.sync()
            n += 1
            per = time.monotonic() - t0
        rep = prof.pop_report()
    req, ph = rep.requests, rep.phases
    invalid = req.filter(~pl.col("valid"))
    decode = ph.filter(pl.col("phase") == "decode")
    per_step = (decode.group_by("step").agg(pl.col("ms").std().alias("sd"), pl.col("ms").mean().alias("mean"),
                                            pl.len().alias("n"))
                .filter(pl.col("n") >= 2).with_columns((100 * pl.col("sd") / pl.col("mean")).alias("cv_pct"))
                .sort("step"))
    cvs = per_step["cv_pct"].drop_nulls().to_list()
    conditions = {
        "repeats": req.height, "repeats_goal": ctx.plan.stability_repeats, "warmup": ctx.plan.warmup,
        "torch_threads": torch.get_num_threads(), "device": ctx.results.data.get("device"),
        "request": {"crops": ctx.plan.crops, "prompt_tokens": ctx.plan.prompt_tokens, "new_tokens": ctx.plan.new_tokens},
        "sm_clock_min_mhz": req["sm_clock_min_mhz"].min(), "sm_clock_max_mhz": req["sm_clock_max_mhz"].max(),
        "sm_clock_mean_mhz": req["sm_clock_mean_mhz"].mean(), "temp_max_c": req["temp_max_c"].max(),
        "throttle_reasons_seen": _throttle_names(req["throttle_reasons"]),
    }
    if ctx.plan.device.startswith("cuda"):
        conditions["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        conditions["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    ctx.results.put(
        decode_per_token_cv_pct_median=statistics.median(cvs) if cvs else None,
        prefill_cv_pct=_cv_pct(req["prefill_ms"].to_list()),
        stability={
            "decode_step_cv_pct_by_step": per_step.select("step", "n", "mean", "cv_pct").rename({"mean": "mean_ms"}).to_dicts(),
            "decode_per_token_ms_cv_pct": _cv_pct(req["decode_per_token_ms"].to_list()),
            "vision_cv_pct": _cv_pct(req["vision_ms"].to_list()),
            "total_cv_pct": _cv_pct(req["total_ms"].to_list()),
            "prefill_ms_median": req["prefill_ms"].median(),
            "decode_per_token_ms_median": req["decode_per_token_ms"].median(),
            "invalid_requests": invalid.height,
            "invalid_reasons": invalid["invalid_reason"].unique().to_list(),
            "repeats_below_30": req.height < 30,
            "conditions": conditions,
            "method": "decode_per_token_cv_pct_median: the median, over decode step positions, of each "
                      "position's CV across the repeats (one configuration, after warm-up, NVML sampler on)",
        },
    )


def _throttle_names(column) -> list[str]:
    from molmo_latency.telemetry import throttle_reason_names

    mask = 0
    for v in column.drop_nulls().to_list():
        mask |= int(v)
    return throttle_reason_names(mask)


def _annotation_spans(trace) -> "Any":
    """Each phase range's host-side span in the trace (the CPU ``user_annotation``): request,
    phase, step, annotation_ms; for the rehearsal, where no GPU activity exists."""
    import polars as pl

    from molmo_latency.trace import phase_of, request_of

    ann = trace.annotations.sort("start_ns")
    rows, requests = [], []
    for name, start, end in ann.select("name", "start_ns", "end_ns").iter_rows():
        r = request_of(name)
        if r is not None:
            requests.append((start, end, r))
    seen: dict[tuple[int | None, str], int] = {}
    for name, start, end in ann.select("name", "start_ns", "end_ns").iter_rows():
        parsed = phase_of(name)
        if parsed is None:
            continue
        phase, step = parsed
        req = next((r for s, e, r in requests if s <= start and end <= e), None)
        if step is None:
            step = seen.get((req, phase), 0)
            seen[(req, phase)] = step + 1
        rows.append({"request": req, "phase": phase, "step": step, "annotation_ms": (end - start) / 1e6})
    return pl.DataFrame(rows, schema={"request": pl.Int64, "phase": pl.String, "step": pl.Int64,
                                      "annotation_ms": pl.Float64})


def compare_event_to_trace(phases, trace) -> tuple[Any, str]:
    """Each phase instance's event-timed ``ms`` against the same phase in the trace: its GPU span
    (``gpu_span_ms``, joined by the profiler's report) when the trace has GPU activity, else its
    CPU range (the rehearsal). Returns (phases compared, with ``kineto_ms`` and ``diff_pct`` =
    100 * (ms - kineto_ms) / kineto_ms; the name of the reference). Instances without a reference
    (no GPU span) are left out, and the caller reports how many were compared."""
    import polars as pl

    if trace.gpu.height > 0:
        reference = "gpu_span"
        compared = phases.filter(pl.col("gpu_span_ms").is_not_null() & (pl.col("gpu_span_ms") > 0)
                                 ).with_columns(pl.col("gpu_span_ms").alias("kineto_ms"))
    else:
        reference = "cpu_annotation_span (no GPU activity: rehearsal)"
        compared = phases.join(_annotation_spans(trace).rename({"annotation_ms": "kineto_ms"}),
                               on=["request", "phase", "step"], how="inner")
    compared = compared.with_columns((100 * (pl.col("ms") - pl.col("kineto_ms")) / pl.col("kineto_ms")).alias("diff_pct"))
    return compared, reference


def kernels_per_phase(phases, trace) -> dict[str, Any]:
    """GPU activities and time charged to each phase (vision, projector, prefill, decode), per
    kernel category, the top 10 kernels, and the activities charged to no phase; {} without GPU
    activity."""
    import polars as pl

    from molmo_latency.trace import kernel_breakdown, phase_category_table

    if trace.gpu.height == 0:
        return {}
    charged = phases.group_by("phase").agg(pl.col("gpu_activities").sum(), pl.col("gpu_kernel_ms").sum(),
                                           pl.col("gpu_busy_ms").sum(), pl.col("gpu_span_ms").sum())
    return {
        "per_phase": charged.sort("phase").to_dicts(),
        "per_phase_category": (phase_category_table(trace).group_by("phase", "category")
                               .agg(pl.col("gpu_activities").sum(), pl.col("gpu_kernel_ms").sum())
                               .sort("phase", "category").to_dicts()),
        "top_kernels": kernel_breakdown(trace.gpu).head(10).to_dicts(),
        "uncharged_gpu_activities": int(trace.gpu.height - (charged["gpu_activities"].sum() or 0)),
    }


def stage_event_vs_kineto(ctx: Context, budget: Budget) -> None:
    import polars as pl

    from molmo_latency import profile_phases
    from molmo_latency.trace import read_kineto

    model = ctx.ref.model
    traces = ctx.out / "traces"
    scratch = ctx.out / "traces" / ".scratch"
    kwargs = ctx.request(new_tokens=ctx.plan.kineto_new_tokens)
    with profile_phases(model, timer=ctx.timer(), nvml="off", trace_dir=scratch) as prof:
        for _ in range(2):  # the first traced request pays the tracer's start; both are compared
            model.generate(**kwargs)
            ctx.sync()
    rep = prof.report()
    paths = [Path(t["path"]) for t in rep.traces]
    if not paths:
        raise RuntimeError("profile_phases wrote no Kineto trace")
    kept = traces / (TRACE_NAME.replace(".pt.", ".rehearsal.pt.") if ctx.rehearsal else TRACE_NAME)
    shutil.move(str(paths[-1]), kept)
    shutil.rmtree(scratch, ignore_errors=True)
    with warnings.catch_warnings():
        if ctx.rehearsal:  # a CPU trace: the reader's "no GPU activities" warning is expected
            warnings.simplefilter("ignore")
        trace = read_kineto(kept)
    ph = rep.phases
    compared, reference = compare_event_to_trace(ph, trace)
    per_phase = (compared.group_by("phase").agg(
        pl.len().alias("instances"), pl.col("ms").sum().alias("event_ms"), pl.col("kineto_ms").sum(),
        pl.col("diff_pct").median().alias("diff_pct_median"), pl.col("diff_pct").abs().max().alias("diff_pct_abs_max"))
        .sort("phase"))
    kernels = kernels_per_phase(ph, trace)
    diff_max = compared["diff_pct"].abs().max() if compared.height else None
    ctx.results.put(
        event_vs_kineto_phase_diff_pct_max=diff_max,
        event_vs_kineto={
            "reference": reference, "compared_instances": compared.height, "phase_instances": ph.height,
            "per_phase": per_phase.to_dicts(), "kernels": kernels, "goal_pct": 2.0,
            "trace": str(kept.relative_to(ctx.out)), "trace_bytes": kept.stat().st_size,
            "trace_gpu_activities": trace.gpu.height, "requests_traced": rep.requests.height,
            "method": "per phase instance: (CUDA-event ms - the same phase's span in the trace) / span",
        },
    )


def stage_nvml(ctx: Context, budget: Budget) -> None:
    import polars as pl

    from molmo_latency import profile_phases
    from molmo_latency.telemetry.policy import DEFAULT_INTERVAL_MS

    if ctx.nvml_error:
        raise RuntimeError(f"NVML cannot be read here: {ctx.nvml_error}")
    model = ctx.ref.model
    with profile_phases(model, timer=ctx.timer(), nvml=ctx.nvml_mode(), nvml_device=ctx.gpu_device(),
                        nvml_interval_ms=DEFAULT_INTERVAL_MS) as prof:
        model.generate(**ctx.request(new_tokens=ctx.plan.nvml_long_new_tokens))
        ctx.sync()
        for _ in range(3):
            if budget.left() < 2:
                ctx.cut_short = True
                break
            model.generate(**ctx.request())
            ctx.sync()
    rep = prof.report()
    req, ph = rep.requests, rep.phases
    # a request shorter than a few intervals counts 0-2 samples: its rate says little
    long_enough = req.filter(pl.col("total_ms") >= 5 * DEFAULT_INTERVAL_MS)
    rated = long_enough if long_enough.height else req
    per_phase = ph.group_by("phase").agg(
        pl.len().alias("instances"), pl.col("sm_clock_mean_mhz").mean(), pl.col("sm_clock_min_mhz").min(),
        pl.col("sm_clock_max_mhz").max(), pl.col("mem_clock_mean_mhz").mean(), pl.col("temp_max_c").max(),
        pl.col("power_mean_w").mean(), pl.col("energy_j").sum(),
    ).sort("phase")
    throttle = {p: _throttle_names(ph.filter(pl.col("phase") == p)["throttle_reasons"])
                for p in per_phase["phase"].to_list()}
    samples = rep.telemetry
    ctx.results.put(
        nvml_achieved_hz=rated["telemetry_hz"].median(),
        nvml={
            "interval_ms": DEFAULT_INTERVAL_MS, "target_hz": 1000 / DEFAULT_INTERVAL_MS,
            "achieved_hz_per_request": req.select("request", "total_ms", "telemetry_samples", "telemetry_hz").to_dicts(),
            "rate_from": "requests of >= 5 intervals" if long_enough.height else "all requests (none was >= 5 intervals)",
            "per_phase": per_phase.to_dicts(), "throttle_reasons_per_phase": throttle,
            "energy_j_per_request": req["energy_j"].to_list(),
            "power_from_energy_w_per_request": req["power_from_energy_w"].to_list(),
            "read_cost_us_median": (samples["read_cost_ns"].median() / 1e3
                                    if samples is not None and samples.height else None),
            "samples": 0 if samples is None else samples.height,
            "source": "FakeGpu (rehearsal)" if ctx.rehearsal else "NVML",
        },
    )


# ------------------------------------------------------------------------- child-process stages
def child_compile(plan: Plan, rehearsal: bool, out: Path, put: Callable[..., None]) -> None:
    """torch.compile of the model's call, then transformers' static-cache auto-compile."""
    import torch
    import transformers

    from molmo_latency import profile_phases
    from molmo_latency.models import reference_vlm

    ref = reference_vlm(plan.compile_preset, seed=1, device=plan.device,
                        dtype=torch.bfloat16 if plan.device.startswith("cuda") else None)
    timer = (lambda: _rehearsal_timer()) if rehearsal else (lambda: None)
    kw = ref.request(crops=1, prompt_tokens=16, new_tokens=5)

    def check(prof) -> dict[str, Any]:
        r = prof.report().requests.row(-1, named=True)
        phases = sorted(set(prof.report().phases["phase"].to_list()))
        ok = bool(r["valid"] and r["prefill_ms"] and r["prefill_ms"] > 0 and r["decode_steps"] == 4)
        return {"ok": ok, "valid": r["valid"], "invalid_reason": r["invalid_reason"], "phases": phases,
                "decode_steps": r["decode_steps"], "prefill_ms": r["prefill_ms"],
                "decode_per_token_ms": r["decode_per_token_ms"], "unsplit_regions": r["unsplit_regions"]}

    put(preset=plan.compile_preset, backend=plan.compile_backend, transformers=transformers.__version__,
        parts=list(plan.compile_parts))
    original = ref.model.forward
    try:
        if "torch_compile" not in plan.compile_parts:
            raise _NotPlanned("not in this plan (see Plan.compile_parts)")
        t0 = time.perf_counter()
        ref.model.forward = torch.compile(original, backend=plan.compile_backend)
        ref.model.generate(**kw)  # compiles
        compile_s = time.perf_counter() - t0
        with profile_phases(ref.model, timer=timer(), nvml="off") as prof:
            ref.model.generate(**kw)
        put(torch_compile={**check(prof), "compile_s": compile_s})
    except _NotPlanned as why:
        put(torch_compile={"ok": None, "skipped": str(why)})
    except Exception as exc:  # noqa: BLE001 - recorded, the static-cache part still runs
        put(torch_compile={"ok": False, "error": _one_line(exc)})
    finally:
        vars(ref.model).pop("forward", None)
        torch._dynamo.reset()
    try:
        if "static_cache" not in plan.compile_parts:
            raise _NotPlanned("not in this plan (see Plan.compile_parts)")
        if transformers.__version__.startswith("4."):
            raise _NotPlanned("the reference model (AyaVision) refuses cache_implementation='static' "
                              f"on transformers {transformers.__version__}")
        from transformers import CompileConfig

        config = CompileConfig(backend=plan.compile_backend)
        if rehearsal:
            config._compile_all_devices = True  # transformers auto-compiles on CUDA only otherwise
        t0 = time.perf_counter()
        ref.model.generate(**kw, cache_implementation="static", compile_config=config)  # compiles
        compile_s = time.perf_counter() - t0
        with profile_phases(ref.model, timer=timer(), nvml="off") as prof:
            ref.model.generate(**kw, cache_implementation="static", compile_config=config)
        put(static_cache={**check(prof), "compile_s": compile_s})
    except _NotPlanned as why:
        put(static_cache={"ok": None, "skipped": str(why)})
    except Exception as exc:  # noqa: BLE001
        put(static_cache={"ok": False, "error": _one_line(exc)})
    finally:
        torch._dynamo.reset()


class _NotPlanned(Exception):
    """A part of a stage its plan leaves out (or this transformers line cannot run); the message
    says which."""


def _rehearsal_timer():
    import torch

    from molmo_latency.timers import CudaEventTimer

    return CudaEventTimer(torch.device("cuda", 0), pool_size=64)


def child_sweep(plan: Plan, rehearsal: bool, out: Path, put: Callable[..., None]) -> None:
    """The short crops x top-k x blocks sweep with run_sweep, then fit_estimator on it."""
    from molmo_latency.sweep import SweepSpec, run_sweep

    spec = SweepSpec.from_dict(dict(plan.sweep))
    run_dir = out / "sweep_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: never resume an older one's data
    put(spec=dict(plan.sweep), run_dir="sweep_run", configs=len(spec.configs()),
        gpu_plan_configs=len(SweepSpec.from_dict(dict(GPU_PLAN.sweep)).configs()))
    t0 = time.perf_counter()
    counts = run_sweep(plan.preset, spec, run_dir, device=plan.device, dtype=plan.dtype,
                       nvml="off" if rehearsal else "auto", command="benchmarks/gpu_truth.py (sweep stage)")
    put(sweep_s=time.perf_counter() - t0, counts=dict(counts))  # a typed result, read as a mapping
    try:
        import scipy  # noqa: F401 - fit_estimator needs it; the host may lack it
    except ImportError as exc:
        put(fit={"status": "skipped", "reason": f"scipy is not importable ({_one_line(exc)}): carry its wheel"})
        return
    from molmo_latency.estimator import fit_estimator

    t0 = time.perf_counter()
    est = fit_estimator(run_dir)
    put(fit={"status": "ok", "fit_s": time.perf_counter() - t0, "metrics": est.metrics})


CHILDREN: dict[str, Callable[..., None]] = {"compile": child_compile, "sweep": child_sweep}


def run_child_stage(name: str, ctx: Context, budget: Budget) -> None:
    """A stage in its own process, killed at its budget; what it wrote so far is kept."""
    part = ctx.out / "stages" / f"{name}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(ctx.out)]
    if ctx.rehearsal:
        cmd.append("--rehearsal")
    if name in ctx.plan.children_in_process:  # the same code and files, without a second interpreter
        CHILDREN[name](ctx.plan, ctx.rehearsal, ctx.out, _part_writer(part))
        timed_out, rc, tail = False, 0, ""
    else:
        timed_out, rc, tail = _run_bounded(cmd, budget.left())
    data = json.loads(part.read_text()) if part.exists() else {}
    ctx.results.put(**{name: {**data, "rc": rc, "timed_out": timed_out, "output_tail": tail}})
    if timed_out:
        ctx.cut_short = True
    elif rc != 0:
        raise RuntimeError(f"the {name} child exited {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")


def _run_bounded(cmd: list[str], timeout_s: float) -> tuple[bool, int | None, str]:
    log = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        _CHILDREN_RUNNING.add(proc)
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout_s))
            log.append(out)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, _ = proc.communicate()
            log.append(out or "")
            timed_out = True
        finally:
            _CHILDREN_RUNNING.discard(proc)
    return timed_out, (None if timed_out else proc.returncode), "".join(log)[-3000:]


_CHILDREN_RUNNING: set[subprocess.Popen] = set()


def _kill(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started, by its group id


def stage_compile(ctx: Context, budget: Budget) -> None:
    run_child_stage("compile", ctx, budget)
    data = ctx.results.data["compile"]
    for part in ("torch_compile", "static_cache"):
        if part in data and data[part].get("ok") is False:
            raise RuntimeError(f"compile: {part} failed: {data[part].get('error') or data[part].get('invalid_reason')}")


def stage_gpu_tests(ctx: Context, budget: Budget) -> None:
    import xml.etree.ElementTree as ET

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    xml = ctx.out / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
           f"--junitxml={xml}", *files]
    timed_out, rc, tail = _run_bounded(cmd, budget.left())
    cases = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "time_s": float(case.get("time") or 0)})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    ctx.results.put(gpu_tests={"files": files, "rc": rc, "timed_out": timed_out, **counts, "cases": cases,
                               "output_tail": tail})
    if timed_out:
        ctx.cut_short = True
    elif rc not in (0, 5) or counts["failed"] or counts["error"]:  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu: {counts['failed']} failed, {counts['error']} errors (rc {rc})")


def stage_sweep(ctx: Context, budget: Budget) -> None:
    import torch

    ctx.ref = None  # the sweep builds its own model in its own process: free this one first
    gc.collect()
    if ctx.plan.device.startswith("cuda"):
        torch.cuda.empty_cache()
    run_child_stage("sweep", ctx, budget)


STAGES: dict[str, Callable[[Context, Budget], None]] = {
    "env": stage_env, "build": stage_build, "overhead": stage_overhead, "stability": stage_stability,
    "event_vs_kineto": stage_event_vs_kineto, "nvml": stage_nvml, "compile": stage_compile,
    "gpu_tests": stage_gpu_tests, "sweep": stage_sweep,
}
NEEDS_MODEL = {"overhead", "stability", "event_vs_kineto", "nvml"}


# ---------------------------------------------------------------------------------- the driver
def run(plan: Plan, out: Path, rehearsal: bool, started: float) -> Results:
    results = Results(out, rehearsal, plan, started)
    ctx = Context(plan=plan, rehearsal=rehearsal, out=out, results=results, started=started)
    results.flush()
    _start_watchdog(results, started + plan.deadline_s)
    clock = FakeCudaClock() if rehearsal else contextlib.nullcontext()
    with clock:
        for name in STAGE_NAMES:
            left = started + plan.deadline_s - time.monotonic()
            if left < plan.min_start_s[name]:
                results.stage(name, status="skipped", reason=f"{left:.0f} s left of the run's "
                              f"{plan.deadline_s:.0f} s, the stage needs {plan.min_start_s[name]:.0f} s")
                results.flush()
                continue
            if name in NEEDS_MODEL and ctx.ref is None:
                results.stage(name, status="skipped", reason="no model: the build stage did not finish")
                results.flush()
                continue
            budget = Budget(started, plan.deadline_s, plan.budgets_s[name])
            ctx.cut_short = False
            results.stage(name, status="running", budget_s=plan.budgets_s[name])
            t0 = time.monotonic()
            try:
                STAGES[name](ctx, budget)
                status = "cut_short" if ctx.cut_short else "ok"
                results.stage(name, status=status, elapsed_s=round(time.monotonic() - t0, 3))
            except Exception as exc:  # noqa: BLE001 - one stage failing must not lose the others
                results.stage(name, status="failed", elapsed_s=round(time.monotonic() - t0, 3),
                              error=_one_line(exc), traceback=traceback.format_exc()[-2000:])
            results.flush()
            print(f"[gpu_truth] {name}: {results.data['stages'][name]['status']} "
                  f"({time.monotonic() - t0:.1f} s; {time.monotonic() - started:.0f} s of {plan.deadline_s:.0f})",
                  flush=True)
    results.put(finished=True)
    results.flush()
    return results


def _start_watchdog(results: Results, deadline: float) -> None:
    """Stops the whole run at its deadline even when a stage hangs: what was measured stays written."""

    def fire() -> None:
        for proc in list(_CHILDREN_RUNNING):
            _kill(proc)
        running = [n for n, s in results.data["stages"].items() if s.get("status") == "running"]
        for name in running:
            results.stage(name, status="killed", reason="the run's deadline passed inside this stage")
        results.put(stopped_by_deadline=True)
        results.flush()
        print("[gpu_truth] deadline reached: stopped; gpu.json holds what was measured", flush=True)
        os._exit(3)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
    timer.daemon = True
    timer.start()


def _part_writer(part: Path) -> Callable[..., None]:
    """put(**values): a child stage's results so far, rewritten to its part file on every call."""
    part.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}

    def put(**values: Any) -> None:
        data.update(values)
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps(_clean(data), indent=1))
        os.replace(tmp, part)

    return put


def run_child(name: str, plan: Plan, out: Path, rehearsal: bool) -> None:
    with FakeCudaClock() if rehearsal else contextlib.nullcontext():
        CHILDREN[name](plan, rehearsal, out, _part_writer(out / "stages" / f"{name}.json"))


# ---------------------------------------------------------------------------- the RESULTS section
def _f(value: Any, fmt: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{value[0]:{fmt}} to {value[1]:{fmt}}{unit}"
    if isinstance(value, float):
        return f"{value:{fmt}}{unit}"
    return f"{value}{unit}"


def results_section(data: dict[str, Any]) -> str:
    """The figures of gpu.json as the body of a benchmarks/RESULTS.md section (markdown)."""
    lines = []
    if data.get("rehearsal"):
        lines.append("**Rehearsal on CPU (tiny model, fake CUDA clock, FakeGpu): not GPU figures.**\n")
    lines += [f"`bash benchmarks/gpu_truth.sh OUT` — device: {data.get('device') or 'n/a'}; "
              f"{data.get('elapsed_s', 0):.0f} s of the {data.get('deadline_s', 0):.0f} s budget"
              f"{'' if data.get('finished') else ' (run not finished)'}.", "",
              "| figure | value | goal |", "|---|---|---|",
              f"| profile_phases overhead per decode step | {_f(data.get('overhead_decode_step_pct'), '.2f', ' %')} "
              f"(95% CI {_f(data.get('overhead_decode_step_pct_ci95'), '.2f', ' %')}) | <= 1 % |",
              f"| profile_phases overhead per request | {_f(data.get('overhead_request_pct'), '.2f', ' %')} "
              f"(95% CI {_f(data.get('overhead_request_pct_ci95'), '.2f', ' %')}) | |",
              f"| + NVML sampler, per decode step | {_f(data.get('overhead_decode_step_pct_nvml'), '.2f', ' %')} | |",
              f"| torch.profiler (the peer), per decode step | {_f(data.get('overhead_decode_step_pct_torch_profiler'), '.2f', ' %')} | |",
              f"| decode step CV across repeats (median over positions) | {_f(data.get('decode_per_token_cv_pct_median'), '.2f', ' %')} | |",
              f"| prefill CV across repeats | {_f(data.get('prefill_cv_pct'), '.2f', ' %')} | |",
              f"| CUDA-event phase time vs Kineto span, max abs diff | {_f(data.get('event_vs_kineto_phase_diff_pct_max'), '.2f', ' %')} | <= 2 % |",
              f"| NVML samples per second inside requests | {_f(data.get('nvml_achieved_hz'), '.1f', ' Hz')} | "
              f"{1000 / 50:.0f} Hz (50 ms) |", ""]
    stages = data.get("stages", {})
    lines += ["| stage | status | s | note |", "|---|---|---|---|"]
    for name in STAGE_NAMES:
        s = stages.get(name, {})
        note = s.get("error") or s.get("reason") or ""
        lines.append(f"| {name} | {s.get('status', 'missing')} | {_f(s.get('elapsed_s'), '.1f')} | {note} |")
    lines.append("")
    comp = data.get("compile") or {}
    for part in ("torch_compile", "static_cache"):
        if part in comp:
            p = comp[part]
            verdict = ("valid, phases " + ", ".join(p.get("phases", [])) if p.get("ok")
                       else p.get("skipped") if p.get("ok") is None
                       else "FAILED: " + str(p.get("error") or p.get("invalid_reason")))
            lines.append(f"- {part}: {verdict}")
    tests = data.get("gpu_tests")
    if tests:
        lines.append(f"- pytest -m gpu: {tests.get('passed')} passed, {tests.get('failed')} failed, "
                     f"{tests.get('error')} errors, {tests.get('skipped')} skipped")
    sweep = data.get("sweep")
    if sweep and "counts" in sweep:
        fit = sweep.get("fit") or {}
        counts = sweep["counts"]
        lines.append(f"- sweep: {sweep.get('configs')} configurations, {counts.get('measured')} requests measured, "
                     f"{counts.get('failed_configs')} configurations failed; fit: {fit.get('status', 'not reached')}")
    return "\n".join(lines)


def apply(out: Path) -> None:
    """Bring a GPU run's OUT folder into the repository: gpu.json, the trace, the RESULTS section."""
    from benchmarks._common import update_section

    data = json.loads((out / "gpu.json").read_text())
    if data.get("rehearsal"):
        raise SystemExit(f"{out}/gpu.json is a rehearsal: only a GPU run's figures go into the repository")
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(exist_ok=True)
    shutil.copy(out / "gpu.json", dest / "gpu.json")
    for trace in (out / "traces").glob("*.pt.trace.json.gz"):
        shutil.copy(trace, ROOT / "traces" / trace.name)
    update_section(SECTION_TITLE, (out / "RESULTS-section.md").read_text())
    print(f"copied gpu.json to {dest}, the trace to traces/, the section into benchmarks/RESULTS.md")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_truth"),
                    help="folder for gpu.json, RESULTS-section.md, traces/ (default benchmarks/results/gpu_truth)")
    ap.add_argument("--rehearsal", action="store_true", help="CPU, tiny model, fake CUDA clock and FakeGpu")
    ap.add_argument("--deadline-s", type=float, default=None, help="stop the whole run after this many seconds")
    ap.add_argument("--started-at", type=float, default=None,
                    help="unix time the run started (the shell passes it: the wheel install counts)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--apply", metavar="OUT", help="copy a GPU run's OUT folder into the repository")
    args = ap.parse_args(argv)
    if args.apply:
        apply(Path(args.apply))
        return 0
    plan = REHEARSAL_PLAN if args.rehearsal else GPU_PLAN
    if args.deadline_s is not None:
        plan = Plan(**{**asdict(plan), "deadline_s": args.deadline_s})
    out = Path(args.out).resolve()
    if args.child:
        run_child(args.child, plan, out, args.rehearsal)
        return 0
    if args.rehearsal:
        import torch

        torch.set_num_threads(1)  # a shared CPU: two OpenMP threads stall each other
    started = time.monotonic()
    if args.started_at is not None:
        started -= max(0.0, time.time() - args.started_at)
    results = run(plan, out, args.rehearsal, started)
    bad = [n for n, s in results.data["stages"].items() if s["status"] not in ("ok", "cut_short", "skipped")]
    print(f"[gpu_truth] wrote {out / 'gpu.json'}; stages not ok: {', '.join(bad) or 'none'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
