"""Benchmark of the whole-request latency estimator (issues 7 and 16): fit on a sweep with several
output lengths, evaluate on held-out whole configurations and on held-out N, per decode position,
against the in-sample noise floor; time batched prediction.

    python benchmarks/estimator.py                      # sweep the tiny model on CPU, then fit
    python benchmarks/estimator.py --run-dir RUN ...    # reuse run directories (e.g. a GPU sweep)
    python benchmarks/estimator.py --controller         # time the controller's calls (issue 23)
    python benchmarks/estimator.py --coverage           # held-out P50/P95 coverage per output (issue 23)

Reports whole-request (and prefill, decode total) MAPE and P95 coverage on held-out
configurations (by N) and on held-out N (the longest outputs, never fitted on), decode-step
MAPE and coverage by position bucket, the same for the `knobs` baseline, and the noise floor:
each held-out request predicted by the median of its own configuration (each step by the median
of its own configuration and position), in-sample, which no estimator giving one value per
configuration can beat on average. Times `Estimator.predict_arrays` on 1,000 configurations x one
N, `predict_grid` on 1,000 configurations x a vector of 64 N, and a budget over a distribution of
N. Writes or updates the subsection for this model and device in the section SECTION of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from molmo_latency.estimator import Estimator, OutputLengths, fit_estimator, load_requests, regression_metrics
from molmo_latency.estimator.fit import explode_steps, position_bucket

SECTION = "## Latency estimator: whole requests for N output tokens (issue 16)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# about 650 measured requests of the tiny model: 3-6 minutes on a shared 2-core CPU
SWEEP = {"crops": [0, 1, 4, 8], "top_k": [1, 2, 4], "blocks": [1, 2, 4], "prompt_tokens": [8, 64],
         "new_tokens": [4, 12, 32], "repeats": 3, "warmup": 1, "seed": 0}
OUTPUTS = ("prefill_total_ms", "decode_total_ms", "request_ms")
PREDICT_BUDGET_US = 1000.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def run_tiny_sweep(out: Path, threads: int, grid: dict | None = None) -> dict:
    import torch

    from molmo_latency.sweep import SweepSpec, run_sweep

    torch.set_num_threads(threads)
    load_before = loadavg()
    t0 = time.perf_counter()
    loads = []

    def progress(p):
        if p.stage == "measure" and p.done % 100 == 0:
            loads.append(loadavg())
            print(f"  sweep {p.done}/{p.total} requests", file=sys.stderr, flush=True)

    grid = SWEEP if grid is None else grid
    result = run_sweep("tiny", SweepSpec.from_dict(grid), out, progress=progress)
    return {"seconds": time.perf_counter() - t0, "threads": threads, "load_before": load_before, "grid": grid,
            "load_max": max([x for x in loads + [loadavg()] if x is not None], default=None), **result}


def mape_floor(frame: pl.DataFrame, y: str, keys: list[str]) -> pl.Series:
    """Per group, the one value that minimises the group's MAPE: the median of y weighted by 1/y
    (the plain median minimises the absolute error, not the relative one)."""
    w = frame.with_row_index("_i").with_columns((1.0 / pl.col(y)).alias("_w")).sort(*keys, y)
    w = w.with_columns((pl.col("_w").cum_sum().over(keys) / pl.col("_w").sum().over(keys)).alias("_c"))
    best = w.filter(pl.col("_c") >= 0.5).group_by(keys).agg(pl.col(y).first().alias("_best"))
    return frame.join(best, on=keys, how="left", maintain_order="left")["_best"]


def noise_floor(rows: pl.DataFrame, test_keys: list[str]) -> dict:
    """Each held-out request predicted by the best single value of its own configuration (each
    decode step by that of its configuration and position), chosen in-sample for each metric
    (MAPE: the 1/y-weighted median; MAE and within +-10%: the median; RMSE, R^2: the mean): no
    estimator giving one value per configuration (and position) can do better on these requests."""
    test = rows.filter(pl.col("config_key").is_in(test_keys)).with_columns(
        pl.col("decode_ms").alias("decode_total_ms"), pl.col("total_ms").alias("request_ms"))

    def floor(frame: pl.DataFrame, y: str, keys: list[str]) -> dict:
        frame = frame.with_columns(pl.col(y).median().over(keys).alias("_med"), pl.col(y).mean().over(keys).alias("_mean"))
        yv = frame[y].to_numpy()
        by_med, by_mean = regression_metrics(yv, frame["_med"].to_numpy()), regression_metrics(yv, frame["_mean"].to_numpy())
        by_mape = regression_metrics(yv, mape_floor(frame, y, keys).to_numpy())
        return {**by_med, "rmse_ms": by_mean["rmse_ms"], "r2": by_mean["r2"], "mape_pct": by_mape["mape_pct"]}

    out = {}
    for t in OUTPUTS:
        ok = test.filter(pl.col(t).is_not_null() & (pl.col(t) > 0))
        m = floor(ok, t, ["config_key"])
        per = ok.group_by("config_key").agg(((pl.col(t).max() - pl.col(t).min()) / pl.col(t).median()).alias("s"))
        m["within_config_spread"] = float(per["s"].median())
        out[t] = m
    steps = explode_steps(test).with_columns(position_bucket(pl.col("step")))
    out["decode_step_ms"] = floor(steps, "decode_step_ms", ["config_key", "step"])
    out["decode_step_by_position"] = {p["positions"][0]: floor(p, "decode_step_ms", ["config_key", "step"])
                                      for p in steps.partition_by("positions")}
    return out


def _timed(fn, runs: int) -> np.ndarray:
    for _ in range(min(50, runs)):
        fn()
    ns = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        ns[i] = time.perf_counter_ns() - t0
    return ns / 1e3


def time_predictions(est: Estimator, n: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    r = est.knob_ranges
    cfg = {k: rng.integers(int(r[k][0]), int(r[k][1]) + 1, n) for k in ("crops", "top_k", "blocks", "prompt_tokens")}
    one_n = _timed(lambda: est.predict_arrays(**cfg, new_tokens=64), 2000)
    grid = np.arange(1, 65) * 4
    per_grid = _timed(lambda: est.predict_grid(**cfg, new_tokens=grid), 100)
    lengths = OutputLengths(rng.integers(1, 257, 500))
    one_cfg = {k: v[:1] for k, v in cfg.items()}
    dist = _timed(lambda: est.predict_arrays(**one_cfg, new_tokens=lengths), 500)
    frame = pl.DataFrame({**cfg, "new_tokens": np.full(n, 64)})
    frame_us = _timed(lambda: est.predict(frame), 200)
    return {"configs": n, "one_n_median_us": float(np.median(one_n)), "one_n_p95_us": float(np.percentile(one_n, 95)),
            "grid_n": int(grid.size), "grid_median_us": float(np.median(per_grid)),
            "distribution_lengths": int(lengths.values.size), "distribution_median_us": float(np.median(dist)),
            "predict_frame_median_us": float(np.median(frame_us))}


CONTROLLER_SECTION = "## Latency estimator as the controller uses it (issue 23)"
PLAN_BUDGET_US = 1000.0


def time_controller(est: Estimator, n: int = 1000, budgets: int = 64) -> dict:
    """The controller's calls on `n` configurations: a budget sweep of `plan_arrays` (fits, Pareto
    frontier and best per budget), `check_budget_feasibility` (one budget per row),
    `estimate_max_output_tokens` (bisection over N up to 4096) and `plan` (polars frame out)."""
    rng = np.random.default_rng(0)
    r = est.knob_ranges
    cfg = {k: rng.integers(int(r[k][0]), int(r[k][1]) + 1, n) for k in ("crops", "top_k", "blocks", "prompt_tokens")}
    score = rng.uniform(0, 1, n)
    sweep = np.linspace(5.0, 60.0, budgets)
    plan_us = _timed(lambda: est.plan_arrays(sweep, **cfg, new_tokens=16, score=score), 1000)
    one_us = _timed(lambda: est.plan_arrays(30.0, **cfg, new_tokens=16, score=score), 1000)
    per_row = rng.uniform(5.0, 60.0, n)
    feas_us = _timed(lambda: est.check_budget_feasibility(per_row, **cfg, new_tokens=16), 1000)
    max_us = _timed(lambda: est.estimate_max_output_tokens(per_row, **cfg), 200)
    frame = pl.DataFrame(cfg)
    frame_us = _timed(lambda: est.plan(sweep[:8], configs=frame, new_tokens=16), 100)
    pred_us = _timed(lambda: est.predict_arrays(**cfg, new_tokens=16), 1000)
    return {"configs": n, "budgets": budgets, "predict_arrays_median_us": float(np.median(pred_us)), "plan_sweep_median_us": float(np.median(plan_us)),
            "plan_sweep_p95_us": float(np.percentile(plan_us, 95)), "plan_one_median_us": float(np.median(one_us)),
            "feasibility_median_us": float(np.median(feas_us)), "max_tokens_median_us": float(np.median(max_us)),
            "plan_frame_median_us": float(np.median(frame_us))}


def controller_markdown(label: str, tm: dict, machine: dict) -> str:
    ok = tm["plan_sweep_median_us"] < PLAN_BUDGET_US / 2  # "well under 1 ms": under half of it
    return "\n".join([
        f"### {label}", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {machine['arch']} {machine['cpu']} (nproc "
        f"{machine['nproc']}, shared with other jobs; load average {_fmt(machine.get('load_at_fit'))}), Python "
        f"{platform.python_version()}, numpy {np.__version__}, polars {pl.__version__}. Model: fitted on "
        "`example_requests(seed=0)` (timings do not depend on the data). Medians of repeated calls after warm-up.", "",
        "| call | input | median us |", "| --- | --- | ---: |",
        f"| `plan_arrays` (budget sweep: fits, Pareto frontier, best per budget) | {tm['configs']} configurations x "
        f"{tm['budgets']} budgets | {tm['plan_sweep_median_us']:.0f} (p95 {tm['plan_sweep_p95_us']:.0f}) |",
        f"| `plan_arrays` (one budget) | {tm['configs']} configurations | {tm['plan_one_median_us']:.0f} |",
        f"| `check_budget_feasibility` | {tm['configs']} rows, one budget each | {tm['feasibility_median_us']:.0f} |",
        f"| `estimate_max_output_tokens` (bisection over N <= 4096) | {tm['configs']} rows | "
        f"{tm['max_tokens_median_us']:.0f} |",
        f"| `plan` (polars frame out) | {tm['configs']} configurations x 8 budgets | {tm['plan_frame_median_us']:.0f} |",
        f"| `predict_arrays` (for reference) | {tm['configs']} configurations | {tm['predict_arrays_median_us']:.0f} |",
        "",
        f"Budget sweep over {tm['configs']} configurations x {tm['budgets']} budgets: target well under 1 ms (here: "
        f"a median under 0.5 ms): {'met' if ok else 'missed'}, {tm['plan_sweep_median_us'] / 1000:.2f} ms, at a load "
        f"average of {_fmt(machine.get('load_at_fit'))} on {machine['nproc']} cores. The sweep is one prediction of "
        f"the {tm['configs']} configurations (`predict_arrays` alone: {tm['predict_arrays_median_us']:.0f} us) and, on "
        "top, the fits matrix (budgets x configurations), one sort for the frontier and a search per budget; no "
        "loop over configurations or budgets in Python. All figures are side by side in one run.", ""])


CONTROLLER_INTRO = (CONTROLLER_SECTION + "\n\n`python benchmarks/estimator.py --controller` times the controller's "
                    "calls; `python benchmarks/estimator.py --coverage` sweeps the tiny model (or reads `--run-dir`), "
                    "fits and reports the held-out P50 and P95 coverage per output.\n\n")


def write_controller_section(text: str, label: str, path: Path = RESULTS) -> None:
    write_subsection(CONTROLLER_SECTION, CONTROLLER_INTRO, label, text, path)


# the coverage sweep: the issue-16 grid with 4 repeats and a fixed warm-up (1 request per configuration)
COVERAGE_SWEEP = {**SWEEP, "repeats": 4, "warmup_tolerance_pct": 0}
COVERAGE_OUTPUTS = {"prefill_total_ms": "prefill", "decode_total_ms": "decode total", "request_ms": "whole request",
                    "decode_step_ms": "decode step"}


def coverage_markdown(label: str, est: Estimator, info: dict, sweep: dict | None, machine: dict) -> str:
    """Held-out P50 and P95 coverage per output (held-out configurations and held-out N), by N."""
    meta, m = est.meta, est.metrics
    sp, mn = meta["split"], m["held_out_new_tokens"]
    gate = meta["quality"]["thresholds"]
    lo50, hi50 = gate["coverage_p50"]
    lo95, hi95 = gate["coverage_p95"]

    def inside(v, lo, hi):
        return "" if v is None else ("" if lo <= v <= hi else " (outside)")

    out = [f"### {label}", "",
           f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {machine['arch']} {machine['cpu']} "
           f"(nproc {machine['nproc']}), Python {platform.python_version()}, numpy {np.__version__}."]
    if sweep is not None:
        g = sweep["grid"]
        out.append(f"Data: a new sweep of the tiny reference model on this CPU ({sweep['threads']} torch thread), grid "
                   f"crops {g['crops']} x top_k {g['top_k']} x blocks {g['blocks']} x prompt_tokens "
                   f"{g['prompt_tokens']} x new_tokens {g['new_tokens']}, {g['repeats']} repeats (interleaved, "
                   f"{g['warmup']} warm-up request per configuration), {sweep['seconds']:.0f} s; load average "
                   f"{_fmt(sweep['load_before'])} before, up to {_fmt(sweep['load_max'])} during the sweep.")
    else:
        out.append("Data: existing run directories " + ", ".join(f"`{r['run_dir']}`" for r in info["run_dirs"]) + ".")
    out.append(f"{info['rows']} valid requests of {info['configs']} configurations. Held-out configurations: "
               f"split by setting (seed {sp['seed']}): train {sp['configs']['train']}, calibration "
               f"{sp['configs']['calib']}, test {sp['configs']['test']} settings. Held-out N: "
               + (mn.get("skipped") or f"{mn['holdout']} held out (every setting), fitted and calibrated on output "
                                        f"tokens {mn['trained_on_output_tokens']}") + ".")
    out += ["", f"Coverage = share of held-out requests (decode steps: steps) at or below the quantile; the gate "
                f"asks {100 * lo50:.0f}-{100 * hi50:.0f}% (P50) and {100 * lo95:.0f}-{100 * hi95:.0f}% (P95).", "",
            "| held out | output | n | P50 coverage | P95 coverage | MAPE % |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for split, name in (("held_out_configs", "configurations"), ("held_out_new_tokens", "N")):
        ms = m.get(split) or {}
        if "skipped" in ms:
            continue
        for o, text in COVERAGE_OUTPUTS.items():
            r = ms[o]["steps" if o == "decode_step_ms" else "requests"]
            out.append(f"| {name} | {text} | {r['n']} | {_pct(r['coverage_p50'])}{inside(r['coverage_p50'], lo50, hi50)} "
                       f"| {_pct(r['coverage_p95'])}{inside(r['coverage_p95'], lo95, hi95)} | {r['mape_pct']:.1f} |")
    out += ["", "By output tokens (whole request and decode total, held-out configurations and held-out N):", "",
            "| held out | output | output tokens | n | P50 coverage | P95 coverage |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for split, name in (("held_out_configs", "configurations"), ("held_out_new_tokens", "N")):
        ms = m.get(split) or {}
        if "skipped" in ms:
            continue
        for o in ("decode_total_ms", "request_ms"):
            for b in ms[o].get("by_output_tokens", []):
                out.append(f"| {name} | {COVERAGE_OUTPUTS[o]} | {b['output_tokens']} | {b['n']} | "
                           f"{_pct(b['coverage_p50'])} | {_pct(b['coverage_p95'])} |")
    nz, q = est.noise or {}, meta["quality"]
    out += ["", "Noise measured on the training requests (ratio of measured to the median model): one decode step "
            f"mean {nz.get('step_mean_ratio', float('nan')):.3f}, variance {nz.get('step_ratio_var', float('nan')):.3f}, "
            f"correlation of the steps of one request {nz.get('step_correlation', float('nan')):.2f}; prefill mean "
            f"{nz.get('prefill_mean_ratio', float('nan')):.3f}. A step mean above 1 is the skew that puts the median "
            "of a long request's decode total above the sum of its step medians (see `Estimator.spread`).",
            "", "Quality gate: " + ("passed." if q["passed"] else "FAILED: " + "; ".join(q["problems"])
                                    + ". Why: " + "; ".join(q["reasons"]) + "."), ""]
    return "\n".join(out)


def evaluate(run_dirs: list[str], seed: int) -> dict:
    rows, info = load_requests(run_dirs)
    phys = fit_estimator(run_dirs, seed=seed)
    base = fit_estimator(run_dirs, seed=seed, feature_set="knobs")
    return {"info": info, "physical": phys, "knobs": base.metrics,
            "floor": noise_floor(rows, phys.meta["split"]["test_configs"]), "timing": time_predictions(phys)}


# ------------------------------------------------------------------------------------- report
def _fmt(v, digits=1):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(label: str, res: dict, sweep: dict | None, machine: dict) -> str:
    phys = res["physical"]
    meta, info, floor = phys.meta, res["info"], res["floor"]
    mc, mn = phys.metrics["held_out_configs"], phys.metrics["held_out_new_tokens"]
    kc, kn = res["knobs"]["held_out_configs"], res["knobs"]["held_out_new_tokens"]
    out = [f"### {label}", ""]
    out.append(f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {machine['arch']} {machine['cpu']} "
               f"(nproc {machine['nproc']}), Python {platform.python_version()}, numpy {np.__version__}.")
    if sweep is not None:
        out.append(f"Data: a new sweep of the tiny reference model on this CPU ({sweep['threads']} torch thread), grid "
                   f"crops {SWEEP['crops']} x top_k {SWEEP['top_k']} x blocks {SWEEP['blocks']} x prompt_tokens "
                   f"{SWEEP['prompt_tokens']} x new_tokens {SWEEP['new_tokens']}, {SWEEP['repeats']} repeats "
                   f"(interleaved), {sweep['seconds']:.0f} s. Load average {_fmt(sweep['load_before'])} before, up to "
                   f"{_fmt(sweep['load_max'])} during the sweep"
                   + (" (other jobs were sharing the cores)" if (sweep['load_max'] or 0) > 1.5 else "") + ".")
    else:
        dev = ", ".join(f"{r['model']} on {r['gpu_name'] or r['device_type']}" for r in info["run_dirs"])
        out.append(f"Data: existing run directories ({dev}): " + ", ".join(f"`{r['run_dir']}`" for r in info["run_dirs"]))
    sp, tr = meta["split"], meta["training"]
    out.append(f"{info['rows']} valid requests ({tr['decode_steps']} decode steps) of {info['configs']} configurations "
               f"({info['invalid_rows']} invalid excluded). Held-out configurations: split by setting (a configuration "
               f"at every N; seed {sp['seed']}): train {sp['configs']['train']}, calibration {sp['configs']['calib']}, "
               f"test {sp['configs']['test']} settings ({sp['rows']['test']} held-out requests). Held-out N: "
               + (mn.get("skipped") or f"{mn['holdout']} held out (every setting), fitted and calibrated on output "
                                        f"tokens {mn['trained_on_output_tokens']}") + ".")
    out += ["", "Whole requests, P50 against every held-out request, P95 coverage (target 95%):", "",
            "| held out | output | features | n | MAPE % | R^2 | P50 coverage | P95 coverage | floor MAPE % |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for split, m, k in (("configurations", mc, kc), ("N", mn, kn)):
        if "skipped" in m:
            continue
        for t in OUTPUTS:
            for fs, mm in (("physical", m[t]["requests"]), ("knobs", (k.get(t) or {}).get("requests") or {})):
                if not mm.get("n"):
                    continue
                fl = floor[t]["mape_pct"] if split == "configurations" else None
                out.append(f"| {split} | {t} | {fs} | {mm['n']} | {mm['mape_pct']:.2f} | {mm['r2']:.3f} | "
                           f"{_pct(mm.get('coverage_p50'))} | {_pct(mm.get('coverage_p95'))} | {_fmt(fl, 2)} |")
    out += ["", "Whole request (`request_ms`, physical) by output tokens:", "",
            "| held out | output tokens | n | MAPE % | P95 coverage |", "| --- | ---: | ---: | ---: | ---: |"]
    for split, m in (("configurations", mc), ("N", mn)):
        for b in (m.get("request_ms") or {}).get("by_output_tokens", []) if "skipped" not in m else []:
            out.append(f"| {split} | {b['output_tokens']} | {b['n']} | {b['mape_pct']:.2f} | {_pct(b['coverage_p95'])} |")
    out += ["", "Decode steps by position (physical; floor: each step predicted by the in-sample MAPE-minimising value "
            "of its own configuration and position):", "",
            "| held out | positions | n | MAPE % | P95 coverage | floor MAPE % |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for split, m in (("configurations", mc), ("N", mn)):
        if "skipped" in m:
            continue
        for b in m["decode_step_ms"]["by_position"]:
            fl = floor["decode_step_by_position"].get(b["positions"], {}).get("mape_pct") if split == "configurations" else None
            out.append(f"| {split} | {b['positions']} | {b['n']} | {b['mape_pct']:.2f} | {_pct(b['coverage_p95'])} | "
                       f"{_fmt(fl, 2)} |")
    out += ["", "Floor: each held-out request predicted by the value that minimises its own configuration's MAPE (the "
            "1/y-weighted median), computed from the held-out requests themselves (in-sample); no estimator giving one "
            "value per configuration can have a lower MAPE on these requests. "
            "Repeats of one configuration differed by (max - min) / median = " + ", ".join(
                f"{t} {100 * floor[t]['within_config_spread']:.0f}%" for t in OUTPUTS) + " (median over held-out "
            "configurations). The held-out-N rows have no floor (their configurations were never fitted on at that N)."]
    tm = res["timing"]
    ok = tm["one_n_median_us"] < PREDICT_BUDGET_US
    out += ["", f"Batched prediction: `predict_arrays`, {tm['configs']} configurations x one N: median "
            f"{tm['one_n_median_us']:.0f} us, p95 {tm['one_n_p95_us']:.0f} us (target < 1 ms: {'met' if ok else 'missed'}); "
            f"`predict_grid`, {tm['configs']} configurations x a vector of {tm['grid_n']} N: median "
            f"{tm['grid_median_us']:.0f} us; one configuration's budget over a distribution of "
            f"{tm['distribution_lengths']} output lengths: median {tm['distribution_median_us']:.0f} us; `predict` "
            f"(polars frame in and out, 1,000 rows): median {tm['predict_frame_median_us']:.0f} us."]
    return "\n".join(out).rstrip() + "\n"


def write_section(text: str, label: str, path: Path = RESULTS) -> None:
    """Replace (or add) the subsection `### label` of SECTION in RESULTS.md; nothing else changes."""
    write_subsection(SECTION, INTRO, label, text, path)


def write_subsection(section: str, intro_text: str, label: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or add) the subsection `### label` of `section` in RESULTS.md (the section, with
    `intro_text`, is added at the end when missing); nothing else changes."""
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    start = doc.find(section + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + intro_text
        start = doc.find(section + "\n")
    end = doc.find("\n## ", start + len(section))
    end = len(doc) if end < 0 else end + 1
    parts = doc[start:end].split("\n### ")
    subs = {q.split("\n", 1)[0]: "### " + q for q in parts[1:]}
    subs[label] = text
    body = intro_text.rstrip("\n") + "\n\n" + "\n".join(t.rstrip("\n") + "\n" for t in subs.values())
    if end < len(doc):
        body += "\n"
    path.write_text(doc[:start] + body + doc[end:])


INTRO = (SECTION + "\n\n`python benchmarks/estimator.py` (add `--run-dir RUN` to use existing sweeps, e.g. of a GPU). "
         "Metrics are on held-out whole configurations and on held-out N; the P50 is compared with every held-out "
         "request, the P95 coverage is the share of held-out requests at or below their P95.\n\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", action="append", default=[], help="existing run directory (repeatable)")
    ap.add_argument("--keep-run", type=Path, default=None, help="where to write the new sweep (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the new sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default=None, help="subsection title (default: model on device)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--controller", action="store_true", help="only time the controller's calls (plan, feasibility, "
                    "max output tokens) on a synthetic fit; writes its own section")
    ap.add_argument("--coverage", action="store_true", help="sweep the tiny model (or read --run-dir), fit, and report "
                    "the held-out P50/P95 coverage per output in the controller's section")
    args = ap.parse_args(argv)
    machine = {"cpu": cpu_model(), "nproc": os.cpu_count(), "arch": platform.machine()}
    if args.controller:
        from molmo_latency.estimator import example_requests

        machine["load_at_fit"] = loadavg()
        tm = time_controller(fit_estimator(example_requests(seed=0)))
        text = controller_markdown(f"CPU ({machine['cpu']})", tm, machine)
        print(text)
        if not args.no_write:
            write_controller_section(text, f"CPU ({machine['cpu']})")
        return 0
    if args.coverage:
        sweep, run_dirs = None, [str(r) for r in args.run_dir]
        if not run_dirs:
            out = args.keep_run or Path(tempfile.mkdtemp(prefix="estimator-coverage-")) / "run"
            print(f"sweeping the tiny model into {out} ...", file=sys.stderr, flush=True)
            sweep = run_tiny_sweep(out, args.threads, COVERAGE_SWEEP)
            run_dirs = [str(out)]
        est = fit_estimator(run_dirs, seed=args.seed)
        _, info = load_requests(run_dirs)
        device = info["gpu_name"] or (machine["cpu"] if info["device_type"] == "cpu" else info["device_type"])
        label = args.label or (f"{info['model']} on {'CPU' if info['device_type'] == 'cpu' else 'GPU'} ({device}): "
                               "held-out P50 and P95 coverage")
        text = coverage_markdown(label, est, info, sweep, machine)
        print(text)
        if not args.no_write:
            write_controller_section(text, label)
        return 0
    sweep = None
    run_dirs = [str(r) for r in args.run_dir]
    if not run_dirs:
        out = args.keep_run or Path(tempfile.mkdtemp(prefix="estimator-bench-")) / "run"
        print(f"sweeping the tiny model into {out} ...", file=sys.stderr, flush=True)
        sweep = run_tiny_sweep(out, args.threads)
        run_dirs = [str(out)]
    load_fit = loadavg()
    res = evaluate(run_dirs, args.seed)
    machine["load_at_fit"] = load_fit
    info = res["info"]
    device = info["gpu_name"] or (machine["cpu"] if info["device_type"] == "cpu" else info["device_type"])
    label = args.label or f"{info['model']} on {info['device_type'].upper() if info['device_type'] == 'cpu' else 'GPU'} ({device})"
    text = markdown(label, res, sweep, machine)
    text = text.rstrip("\n") + f" Load average {_fmt(load_fit)} when fitting and timing.\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"label": label, "sweep": sweep, "machine": machine, "info": info,
                                         "metrics": res["physical"].metrics, "knobs": res["knobs"], "floor": res["floor"],
                                         "timing": res["timing"], "selection": res["physical"].meta["selection"],
                                         "calibration": res["physical"].meta["calibration"]}, indent=2, default=str))
    if not args.no_write:
        write_section(text, label)
        print(f"updated {RESULTS} ({SECTION} / ### {label})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
