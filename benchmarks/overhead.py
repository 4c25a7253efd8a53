"""Profiler overhead: generate() wall time with and without `profile_phases`, with and without
its NVML sampler thread, side by side with torch.profiler (the peer), interleaved over many
repeats in one run.

    python benchmarks/overhead.py                      # tiny model on CPU (and GPU if present)
    python benchmarks/overhead.py --device cuda --preset molmoe-1b-shape --dtype bf16

Arms, rotated every round so drift hits all alike:
  none                    plain generate()
  molmo-latency           inside profile_phases(model) (NVTX on, record_function gated, nvml off)
  + detail=modules        the same with detail="modules": module hooks and ranges on every block's
                          attention, MoE router / experts, norms, the vision layers, the projector
                          and the LM head (issue 25), nvml off
  + sampler @ N ms        the same with the NVML sampler thread on, at the default interval and at
                          the floor. On a machine without NVML (this CPU machine) the sampler
                          reads a FakeGpu whose read() hands the GIL over 7 times, as the 7 NVML
                          queries of one real sample do (each ctypes call releases the GIL), so
                          what is measured is the sampler thread's cost on the loop, not NVML's
                          own latency; with --device cuda and NVML present, the real GPU is read.
  torch.profiler          inside torch.profiler.profile(CPU [+ CUDA] activities), the peer
Only the generate() call is timed (host perf_counter_ns, CUDA synchronised before and after,
outside generate). The per-decode-step overhead is (median_ours - median_none) / LLM forwards,
compared with the median decode step that profile_phases measured in the same run; the decode
step measured by profile_phases is also reported per arm (sampler on vs off).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import update_section  # noqa: E402
from molmo_latency import profile_phases  # noqa: E402
from molmo_latency.models import reference_vlm  # noqa: E402
from molmo_latency.telemetry import FakeGpu  # noqa: E402
from molmo_latency.telemetry.policy import DEFAULT_INTERVAL_MS, MIN_INTERVAL_MS  # noqa: E402


class GilReleasingFakeGpu(FakeGpu):
    """A FakeGpu whose read() releases and re-takes the GIL 7 times, like the 7 NVML queries of
    one real sample (clocks x2, temperature, power, energy, utilisation, throttle reasons)."""

    def read(self):
        for _ in range(7):
            time.sleep(0)  # a blocking call: drops the GIL and must win it back
        return super().read()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _nvml_device(device: str):
    """The real GPU where NVML works, else the GIL-releasing fake (and say which)."""
    if device.startswith("cuda"):
        try:
            from molmo_latency.telemetry import open_gpu

            open_gpu(torch.cuda.current_device()).close()
            return None, "NVML (real GPU)"
        except Exception:  # noqa: BLE001 - fall back to the fake, and say so
            pass
    return GilReleasingFakeGpu(), "FakeGpu releasing the GIL 7x per read (no NVML here)"


def run(preset: str, device: str, dtype: torch.dtype | None, rounds: int, crops: int, new_tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    ref = reference_vlm(preset, device=device, dtype=dtype)
    kwargs = ref.request(crops=crops, prompt_tokens=32, new_tokens=new_tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    nvml_device, nvml_what = _nvml_device(device)
    profiled = {
        "molmo-latency": dict(nvml="off"),
        "+ detail=modules": dict(nvml="off", detail="modules"),
        f"+ sampler @ {DEFAULT_INTERVAL_MS:g} ms (default)": dict(
            nvml="required", nvml_device=nvml_device, nvml_interval_ms=DEFAULT_INTERVAL_MS),
        f"+ sampler @ {MIN_INTERVAL_MS:g} ms (floor)": dict(
            nvml="required", nvml_device=nvml_device, nvml_interval_ms=MIN_INTERVAL_MS),
    }
    arms = ["none", *profiled, "torch.profiler"]
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    steps: dict[str, list[float]] = {arm: [] for arm in profiled}
    achieved: dict[str, list[float]] = {arm: [] for arm in profiled}

    def timed() -> float:
        gc.collect()  # every arm starts clean: no arm pays for another's garbage
        _sync(device)
        t0 = time.perf_counter_ns()
        ref.model.generate(**kwargs)
        _sync(device)
        return (time.perf_counter_ns() - t0) / 1e6

    def one(arm: str, record: bool) -> None:
        if arm == "none":
            ms = timed()
        elif arm == "torch.profiler":
            with profile(activities=activities):
                ms = timed()
        else:
            with profile_phases(ref.model, **profiled[arm]) as prof:
                ms = timed()
            if record:
                rep = prof.report()
                steps[arm].extend(rep.phases.filter(rep.phases["phase"] == "decode")["ms"].to_list())
                hz = rep.requests["telemetry_hz"][0]
                if hz is not None:
                    achieved[arm].append(hz)
        if record:
            times[arm].append(ms)

    for _ in range(3):  # warm-up, all arms
        for arm in arms:
            one(arm, record=False)
    for r in range(rounds):
        k = r % len(arms)
        for arm in arms[k:] + arms[:k]:
            one(arm, record=True)
    # one long request at the default interval: the per-request rate where it means something
    long_kwargs = {**kwargs, "max_new_tokens": 150, "min_new_tokens": 150}
    default_sampler = f"+ sampler @ {DEFAULT_INTERVAL_MS:g} ms (default)"
    with profile_phases(ref.model, **profiled[default_sampler]) as prof:
        ref.model.generate(**long_kwargs)
    rep = prof.report()
    gaps = rep.telemetry["t_ns"].diff().drop_nulls().to_list()[1:-1]  # between the thread's ticks
    long_rate = (rep.requests["total_ms"][0], rep.requests["telemetry_hz"][0],
                 statistics.mean(gaps) / 1e6 if gaps else None, statistics.pstdev(gaps) / 1e6 if gaps else None)
    return {"times": times, "decode_step_ms": {a: statistics.median(v) for a, v in steps.items()},
            "long_rate": long_rate,
            "achieved_hz": {a: (statistics.median(v) if v else None) for a, v in achieved.items()},
            "forwards": new_tokens, "hook_us": hook_cost_us(ref.model), "nvml": nvml_what,
            "module_hooks": module_hook_cost_us(ref.model),
            "conditions_us": conditions_cost_us()}


def conditions_cost_us(n: int = 20000) -> float:
    """Cost of recording one request's conditions (issue 21: RequestProbe start + stop, two
    getrusage calls, a process-clock and a load read), once per request: median of 5 loops."""
    from molmo_latency.conditions import RequestProbe

    loops = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            RequestProbe.start(1).stop(warm=True)
        loops.append((time.perf_counter_ns() - t0) / n / 1000)
    return statistics.median(loops)


def hook_cost_us(model, n: int = 20000) -> float:
    """Direct cost of the hooks of one decode step on the hot path: the model-call hooks (shape
    classification, two timer marks) and the LLM phase hooks (two timer marks, NVTX push/pop, the
    record_function check), measured in a tight loop: median of 5 loops."""
    from molmo_latency.profiler import RunningRequest

    step = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "past_key_values": object(), "use_cache": True}
    loops = []
    with profile_phases(model, nvml="off") as prof:
        for _ in range(5):
            req = RunningRequest(index=0, input_tokens=1, fed=1)  # prompt fed: every call a decode step
            prof._active = req
            t0 = time.perf_counter_ns()
            for _ in range(n):
                prof._on_call_start(None, (), step)
                prof._on_start("llm")
                prof._on_end("llm")
                prof._on_call_end(None, (), None)
            loops.append((time.perf_counter_ns() - t0) / n / 1000)
            prof._active = None
    return statistics.median(loops)


def module_hook_cost_us(model, n: int = 2000) -> tuple[float, int]:
    """Direct cost of the module hooks of one decode step with detail="modules" (each LLM site's
    start and end: two timer marks, NVTX push/pop, the record_function check), tight loop:
    (median of 5 loops in us, sites per decode step)."""
    from molmo_latency.profiler import RunningRequest
    from molmo_latency.ranges import MODULE_RANGE_PREFIX

    loops = []
    with profile_phases(model, nvml="off", detail="modules") as prof:
        sites = [(MODULE_RANGE_PREFIX + s.kind, -1 if s.block is None else s.block) for s in prof.sites
                 if s.kind not in ("vision_block", "projector")]
        for _ in range(5):
            req = RunningRequest(index=0, input_tokens=1, fed=1)
            prof._active = req
            t0 = time.perf_counter_ns()
            for _ in range(n):
                for kind, block in sites:
                    prof._on_module_start(kind, block)
                    prof._on_module_end(kind, block)
                req.marks.clear()
                req.module_spans.clear()
            loops.append((time.perf_counter_ns() - t0) / n / 1000)
            prof._active = None
    return statistics.median(loops), len(sites)


def _iqr(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def _bootstrap_ratio_ci(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    import random

    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        ra = statistics.median(rng.choices(a, k=len(a)))
        rb = statistics.median(rng.choices(b, k=len(b)))
        ratios.append(ra / rb)
    ratios.sort()
    return ratios[int(0.025 * n)], ratios[int(0.975 * n)]


def table(label: str, res: dict) -> str:
    t = res["times"]
    base = statistics.median(t["none"])
    lines = [f"### {label}", "",
             "| arm | median generate() ms | IQR ms | vs none | 95% CI of ratio | median decode step ms (profile_phases) | NVML samples/s inside a request (median; coarse: a request spans < 1 default interval) |",
             "|---|---|---|---|---|---|---|"]
    for arm, xs in t.items():
        med = statistics.median(xs)
        lo, hi = _bootstrap_ratio_ci(xs, t["none"])
        step = res["decode_step_ms"].get(arm)
        hz = res["achieved_hz"].get(arm)
        lines.append(f"| {arm} | {med:.3f} | {_iqr(xs):.3f} | {med / base:.3f}x | {lo:.3f}-{hi:.3f} | "
                     f"{'' if step is None else f'{step:.3f}'} | {'' if hz is None else f'{hz:.1f}'} |")
    off_step = res["decode_step_ms"]["molmo-latency"]
    ours = statistics.median(t["molmo-latency"]) - base
    per_step = ours / res["forwards"]
    lo, hi = _bootstrap_ratio_ci(t["molmo-latency"], t["none"])
    lines += ["", f"- repeats per arm: {len(t['none'])}, interleaved with rotating order",
              f"- the sampler read: {res['nvml']}",
              f"- median decode step measured by profile_phases, sampler off: {off_step:.3f} ms"]
    for arm, step in res["decode_step_ms"].items():
        if arm not in ("molmo-latency", "+ detail=modules"):  # detail=modules: its own line below
            gen = statistics.median(t[arm]) / statistics.median(t["molmo-latency"])
            lines.append(f"- {arm.lstrip('+ ')}: decode step {step:.3f} ms = {100 * (step / off_step - 1):+.1f}% "
                         f"vs sampler off; generate() {100 * (gen - 1):+.1f}%")
    lines += [f"- overhead of profile_phases (sampler off) per LLM forward: {per_step * 1000:.1f} us "
              f"= {100 * per_step / off_step:.2f}% of a decode step "
              f"(95% CI {100 * (lo - 1) * base / res['forwards'] / off_step:+.2f}% to "
              f"{100 * (hi - 1) * base / res['forwards'] / off_step:+.2f}%; goal on GPU: <= 1%)",
              f"- direct cost of the hooks of one decode step (model call + LLM phase, tight loop, no model): {res['hook_us']:.2f} us "
              f"= {100 * res['hook_us'] / 1000 / off_step:.2f}% of the decode step above",
              f"- recording a request's conditions (cpu_time_ratio, involuntary_switches, host_load_1m, warm; "
              f"once per request, included in the profile_phases arm): {res['conditions_us']:.1f} us per request"]
    if "+ detail=modules" in t:
        extra = (statistics.median(t["+ detail=modules"]) - statistics.median(t["molmo-latency"])) / res["forwards"]
        lo, hi = _bootstrap_ratio_ci(t["+ detail=modules"], t["molmo-latency"])
        mod_step = res["decode_step_ms"]["+ detail=modules"]
        hook_us, n_sites = res["module_hooks"]
        lines += [f"- detail=\"modules\" on top of detail=\"phases\", per LLM forward: {extra * 1000:.1f} us "
                  f"= {100 * extra / off_step:.2f}% of a decode step (generate() ratio modules/phases, 95% CI "
                  f"{lo:.3f}-{hi:.3f}); the decode step it measures: {mod_step:.3f} ms = "
                  f"{100 * (mod_step / off_step - 1):+.1f}% vs detail=\"phases\"",
                  f"- direct cost of the module hooks of one decode step ({n_sites} module calls: start + end each, "
                  f"tight loop, no model): {hook_us:.2f} us = {100 * hook_us / 1000 / off_step:.2f}% of the decode step "
                  f"above ({hook_us / n_sites:.2f} us per module call)"]
    total, hz, spacing, jitter = res["long_rate"]
    if hz is not None:
        lines.append(f"- one long request (150 new tokens, {total:.0f} ms) at the default {DEFAULT_INTERVAL_MS:g} ms: "
                     f"{hz:.1f} samples/s inside it (sample spacing {spacing:.1f} +- {jitter:.1f} ms); the "
                     "`telemetry_hz` of a request shorter than a few intervals counts 0-2 samples and says little")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None)
    ap.add_argument("--device", default=None, help="cpu, cuda, or both (default: cpu, plus cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--crops", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    ap.add_argument("--section", default="Profiler overhead and the NVML sampler (issue 13)",
                    help="the RESULTS.md section to write")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default 1: on a shared machine two OpenMP "
                         "threads stall each other at every barrier, 5-10x slower and noisier)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sections = []
    for device in devices:
        preset = args.preset or ("molmoe-1b-shape" if device.startswith("cuda") else "tiny")
        dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else None)
        res = run(preset, device, dtype, args.rounds, args.crops, args.new_tokens)
        label = f"{preset} on {device}{' in ' + str(dtype).split('.')[-1] if dtype else ''}, " \
                f"{args.crops} crops, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}"
        sections.append(table(label, res))
        print(sections[-1], flush=True)
    load = os.getloadavg()
    body = (f"`python benchmarks/overhead.py {' '.join(sys.argv[1:])}`".replace(" `", "`") +
            " — generate() wall time with no profiler, inside `profile_phases` (detail=\"phases\", and "
            "detail=\"modules\"), with the NVML sampler off and on (default interval and floor), and inside "
            "torch.profiler (the peer), side by side in one run, interleaved. "
            f"Load average when it finished (1/5/15 min, the machine is shared): "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; nproc {os.cpu_count()}; uname -m {platform.machine()}.\n\n" + "\n\n".join(sections))
    if not args.no_write:
        update_section(args.section, body)


if __name__ == "__main__":
    main()
