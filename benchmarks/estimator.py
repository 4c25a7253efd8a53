"""Benchmark of the latency estimator (issue 7): fit on a sweep, evaluate on held-out whole
configurations, and time one batched prediction of 1,000 configurations.

    python benchmarks/estimator.py                      # sweep the tiny model on CPU, then fit
    python benchmarks/estimator.py --run-dir RUN ...    # reuse run directories (e.g. a GPU sweep)

Reports, per target, MAE/RMSE/MAPE/R^2/share within +-10%/P95 coverage on held-out requests
(and on configuration medians), against the issue's targets; the same for the `knobs` baseline
and for an extrapolation split (the largest crops and prompt lengths held out); the noise floor
(each held-out request predicted by the median of its own configuration, which no estimator can
beat on average); and the median cost of `Estimator.predict_arrays` on 1,000 configurations.
Writes or updates the subsection for this model and device in the section
"## Latency estimator (issue 7)" of benchmarks/RESULTS.md.
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

from molmo_latency.estimator import Estimator, fit_estimator, load_requests, regression_metrics

SECTION = "## Latency estimator (issue 7)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SWEEP = {"crops": [0, 1, 2, 4, 8, 16], "top_k": [1, 2, 4, 8], "blocks": [1, 2, 3, 4], "prompt_tokens": [8, 64, 160],
         "new_tokens": [16], "repeats": 5, "warmup": 1, "seed": 0}
TARGETS = {  # issue 7, per target: R^2 at least, MAPE at most (percent)
    "prefill_total_ms": {"r2": 0.99, "mape_pct": 2.0},
    "decode_per_token_ms": {"r2": 0.95, "mape_pct": 3.0},
}
COVERAGE_BAND = (0.93, 0.97)
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


def run_tiny_sweep(out: Path, threads: int) -> dict:
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

    result = run_sweep("tiny", SweepSpec.from_dict(SWEEP), out, progress=progress)
    return {"seconds": time.perf_counter() - t0, "threads": threads, "load_before": load_before,
            "load_max": max([x for x in loads + [loadavg()] if x is not None], default=None), **result}


def noise_floor(rows: pl.DataFrame, test_keys: list[str]) -> dict:
    """The best any estimator giving one value per configuration could score on the held-out
    requests, in-sample: MAE/MAPE/within +-10% of each configuration's own median, RMSE/R^2 of
    its own mean (the minimisers of those errors). Also how noisy the repeats were."""
    out = {}
    test = rows.filter(pl.col("config_key").is_in(test_keys))
    for t in TARGETS:
        ok = test.filter(pl.col(t).is_not_null() & (pl.col(t) > 0)).with_columns(
            pl.col(t).median().over("config_key").alias("med"), pl.col(t).mean().over("config_key").alias("mean"))
        y = ok[t].to_numpy()
        by_median = regression_metrics(y, ok["med"].to_numpy())
        by_mean = regression_metrics(y, ok["mean"].to_numpy())
        m = {**by_median, "rmse_ms": by_mean["rmse_ms"], "r2": by_mean["r2"]}
        per = ok.group_by("config_key").agg(((pl.col(t).max() - pl.col(t).min()) / pl.col(t).median()).alias("s"))
        m["within_config_spread"] = float(per["s"].median())
        m["slow_share"] = float((ok[t] > 2 * ok["med"]).mean())  # requests over twice their configuration's median
        out[t] = m
    return out


def time_predictions(est: Estimator, n: int = 1000, runs: int = 2000) -> dict:
    rng = np.random.default_rng(0)
    lo, hi = est.knob_ranges, est.knob_ranges
    cfg = {k: rng.integers(int(lo[k][0]), int(hi[k][1]) + 1, n) for k in ("crops", "top_k", "blocks", "prompt_tokens")}
    for _ in range(50):
        est.predict_arrays(**cfg)
    ns = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        est.predict_arrays(**cfg)
        ns[i] = time.perf_counter_ns() - t0
    frame_ns = np.empty(200)
    frame = pl.DataFrame(cfg)
    for i in range(200):
        t0 = time.perf_counter_ns()
        est.predict(frame)
        frame_ns[i] = time.perf_counter_ns() - t0
    return {"configs": n, "runs": runs, "median_us": float(np.median(ns) / 1e3), "p95_us": float(np.percentile(ns, 95) / 1e3),
            "min_us": float(ns.min() / 1e3), "predict_frame_median_us": float(np.median(frame_ns) / 1e3)}


def evaluate(run_dirs: list[str], seed: int) -> dict:
    rows, info = load_requests(run_dirs)
    phys = fit_estimator(run_dirs, seed=seed)
    base = fit_estimator(run_dirs, seed=seed, feature_set="knobs")
    crops_max, prompt_max = rows["crops"].max(), rows["prompt_tokens"].max()
    unseen = (pl.col("crops") == crops_max) | (pl.col("prompt_tokens") == prompt_max)
    extrap = {}
    for fs in ("physical", "knobs"):
        try:
            extrap[fs] = fit_estimator(run_dirs, seed=seed, feature_set=fs, holdout=unseen).metrics
        except Exception as exc:  # noqa: BLE001 - too few configurations for this split: say so
            extrap[fs] = {"error": str(exc)}
    return {"info": info, "physical": phys, "knobs": base.metrics, "extrapolation": extrap,
            "extrapolation_holdout": f"crops == {crops_max} or prompt_tokens == {prompt_max}",
            "floor": noise_floor(rows, phys.meta["split"]["test_configs"]), "timing": time_predictions(phys)}


# ------------------------------------------------------------------------------------- report
def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _verdict(value: float, goal: float, higher_is_better: bool, unit: str = "", digits: int = 3) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else f"missed by {abs(value - goal):.{digits}f}{unit}"


def verdicts(metrics: dict, timing: dict) -> list[str]:
    lines = []
    for t, goal in TARGETS.items():
        for basis, label in (("requests", "held-out requests"), ("config_medians", "held-out configuration medians")):
            m = metrics[t][basis]
            lines.append(f"- {t}, {label} (n={m['n']}): R^2 {m['r2']:.3f} (target >= {goal['r2']}: "
                         f"{_verdict(m['r2'], goal['r2'], True)}), MAPE {m['mape_pct']:.2f}% (target <= "
                         f"{goal['mape_pct']}%: {_verdict(m['mape_pct'], goal['mape_pct'], False, ' points', 2)})")
        cov, (lo, hi) = metrics[t]["requests"]["p95_coverage"], COVERAGE_BAND
        if lo <= cov <= hi:
            status = "met"
        elif cov < lo:
            status = "missed: {:.1f} points under".format(100 * (lo - cov))
        else:
            status = "missed: {:.1f} points over".format(100 * (cov - hi))
        lines.append(f"- {t}: P95 coverage {100 * cov:.1f}% of {metrics[t]['requests']['n']} held-out requests "
                     f"(target 93-97%: {status})")
    ok = timing["median_us"] < PREDICT_BUDGET_US
    lines.append(f"- batched prediction of {timing['configs']} configurations: median {timing['median_us']:.1f} us "
                 f"(target < 1 ms: {'met' if ok else 'missed'})")
    return lines


def markdown(label: str, res: dict, sweep: dict | None, machine: dict) -> str:
    phys = res["physical"]
    meta = phys.meta
    info = res["info"]
    out = [f"### {label}", ""]
    out.append(f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. Fit and prediction on "
               f"{machine['cpu']} ({machine['cores']} cores), Python {platform.python_version()}, numpy {np.__version__}.")
    if sweep is not None:
        out.append(f"Data: a new sweep of the tiny reference model on this CPU ({sweep['threads']} torch thread), grid "
                   f"crops {SWEEP['crops']} x top_k {SWEEP['top_k']} x blocks {SWEEP['blocks']} x prompt_tokens "
                   f"{SWEEP['prompt_tokens']}, new_tokens {SWEEP['new_tokens'][0]}, {SWEEP['repeats']} repeats "
                   f"(interleaved), {sweep['seconds']:.0f} s. Load average {_fmt(sweep['load_before'], 1)} before, up "
                   f"to {_fmt(sweep['load_max'], 1)} during the sweep"
                   + (": other jobs were sharing the 2 cores" if (sweep['load_max'] or 0) > 1.5 else "") + ".")
    else:
        dev = ", ".join(f"{r['model']} on {r['gpu_name'] or r['device_type']}" for r in info["run_dirs"])
        out.append(f"Data: existing run directories ({dev}): " + ", ".join(f"`{r['run_dir']}`" for r in info["run_dirs"]))
    if info["device_type"] == "cpu":
        out.append("CPU data: the issue's targets were set for GPU sweeps; `--run-dir GPU_RUN` adds a subsection for one.")
    sp = meta["split"]
    out.append(f"{info['rows']} valid requests of {info['configs']} configurations ({info['invalid_rows']} invalid "
               f"excluded); split by whole configuration (seed {sp['seed']}): train {sp['configs']['train']}, calibration "
               f"{sp['configs']['calib']}, test {sp['configs']['test']} ({sp['rows']['test']} held-out requests).")
    out += ["", "Held-out configurations, `physical` features (chosen: " + ", ".join(
        f"{t} {s['chosen']}" for t, s in meta["selection"].items()) + "):", ""]
    out.append("| target | basis | n | MAE ms | RMSE ms | MAPE % | R^2 | within +-10% | P95 coverage |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in TARGETS:
        pm = phys.metrics[t]
        for name, m in (("physical: requests", pm["requests"]), ("physical: config medians", pm["config_medians"]),
                        ("knobs baseline: requests", res["knobs"][t]["requests"]),
                        ("best per configuration (in-sample)", res["floor"][t])):
            cov = m.get("p95_coverage")
            out.append(f"| {t} | {name} | {m['n']} | {m['mae_ms']:.3f} | {m['rmse_ms']:.3f} | {m['mape_pct']:.2f} | "
                       f"{m['r2']:.3f} | {100 * m['within_10pct_share']:.0f}% | "
                       + ("-" if cov is None else f"{100 * cov:.1f}%") + " |")
    out += ["", "Best per configuration (in-sample): each held-out request predicted by its own configuration's "
            "median (MAE, MAPE, within +-10%) or mean (RMSE, R^2), computed from the held-out requests themselves: no "
            "estimator that gives one value per configuration can do better on these requests. Repeats of one "
            "configuration differed by (max - min) / median = " + ", ".join(
                f"{t} {100 * res['floor'][t]['within_config_spread']:.0f}%" for t in TARGETS) + " (median over held-out "
            "configurations); requests slower than twice their configuration's median: " + ", ".join(
                f"{t} {100 * res['floor'][t]['slow_share']:.1f}%" for t in TARGETS) + "."]
    ex = res["extrapolation"]
    out += ["", f"Extrapolation (held out: {res['extrapolation_holdout']}, never seen in fitting), held-out requests:", ""]
    out.append("| target | features | MAPE % | R^2 | P95 coverage |")
    out.append("| --- | --- | ---: | ---: | ---: |")
    for t in TARGETS:
        for fs in ("physical", "knobs"):
            m = ex[fs].get(t, {}).get("requests") if "error" not in ex[fs] else None
            if m is None:
                out.append(f"| {t} | {fs} | - | - | - |")
            else:
                out.append(f"| {t} | {fs} | {m['mape_pct']:.2f} | {m['r2']:.3f} | {100 * m['p95_coverage']:.1f}% |")
    tm = res["timing"]
    out += ["", f"Batched prediction (`Estimator.predict_arrays`, {tm['configs']} configurations, {tm['runs']} timings): "
            f"median {tm['median_us']:.1f} us, p95 {tm['p95_us']:.1f} us, min {tm['min_us']:.1f} us; "
            f"`Estimator.predict` (polars frame in and out): median {tm['predict_frame_median_us']:.0f} us.", "",
            "Against the issue's targets:", ""]
    out += verdicts(phys.metrics, tm)
    out += ["", *why_missed(res)]
    return "\n".join(out).rstrip() + "\n"


def why_missed(res: dict) -> list[str]:
    """Explain misses with what was measured: the best per-configuration score on the same requests."""
    lines = []
    for t, goal in TARGETS.items():
        m, f = res["physical"].metrics[t]["requests"], res["floor"][t]
        med = res["physical"].metrics[t]["config_medians"]
        if m["r2"] >= goal["r2"] and m["mape_pct"] <= goal["mape_pct"]:
            continue
        if f["mape_pct"] > goal["mape_pct"] or f["r2"] < goal["r2"]:
            lines.append(f"Why {t} misses: the requests vary more than the target allows. Even each held-out "
                         f"request's own configuration median/mean (in-sample) scores MAPE {f['mape_pct']:.2f}% and R^2 "
                         f"{f['r2']:.3f}; the estimator, which never saw these configurations, scores MAPE "
                         f"{m['mape_pct']:.2f}% and R^2 {m['r2']:.3f} on the requests, and MAPE {med['mape_pct']:.2f}% "
                         f"and R^2 {med['r2']:.3f} on the configuration medians (themselves noisy: medians of "
                         f"{SWEEP['repeats']} repeats).")
        else:
            lines.append(f"Why {t} misses: the requests allow it (in-sample per-configuration MAPE {f['mape_pct']:.2f}%, "
                         f"R^2 {f['r2']:.3f}), so the model is short by {m['mape_pct'] - f['mape_pct']:.2f} points of "
                         "MAPE: its features do not capture this device's costs fully.")
    return lines


def write_section(text: str, label: str, path: Path = RESULTS) -> None:
    """Replace (or add) the subsection `### label` of SECTION in RESULTS.md; nothing else changes."""
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    start = doc.find(SECTION + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + INTRO
        start = doc.find(SECTION + "\n")
    end = doc.find("\n## ", start + len(SECTION))
    end = len(doc) if end < 0 else end + 1
    section = doc[start:end]
    parts = section.split("\n### ")
    intro, subs = parts[0], {p.split("\n", 1)[0]: "### " + p for p in parts[1:]}
    subs[label] = text
    body = intro.rstrip("\n") + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in subs.values())
    if end < len(doc):
        body += "\n"
    path.write_text(doc[:start] + body + doc[end:])


INTRO = (SECTION + "\n\n`python benchmarks/estimator.py` (add `--run-dir RUN` to use existing sweeps, e.g. of a GPU). "
         "Metrics are on held-out whole configurations; the P50 is compared with every held-out request.\n\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", action="append", default=[], help="existing run directory (repeatable)")
    ap.add_argument("--keep-run", type=Path, default=None, help="where to write the new sweep (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the new sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default=None, help="subsection title (default: model on device)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count()}
    sweep = None
    run_dirs = [str(r) for r in args.run_dir]
    if not run_dirs:
        out = args.keep_run or Path(tempfile.mkdtemp(prefix="estimator-bench-")) / "run"
        print(f"sweeping the tiny model into {out} ...", file=sys.stderr, flush=True)
        sweep = run_tiny_sweep(out, args.threads)
        run_dirs = [str(out)]
    res = evaluate(run_dirs, args.seed)
    info = res["info"]
    device = info["gpu_name"] or (machine["cpu"] if info["device_type"] == "cpu" else info["device_type"])
    label = args.label or f"{info['model']} on {info['device_type'].upper() if info['device_type'] == 'cpu' else 'GPU'} ({device})"
    text = markdown(label, res, sweep, machine)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"label": label, "sweep": sweep, "machine": machine, "info": info,
                                         "metrics": res["physical"].metrics, "knobs": res["knobs"],
                                         "extrapolation": res["extrapolation"], "floor": res["floor"],
                                         "timing": res["timing"], "selection": res["physical"].meta["selection"]},
                                        indent=2, default=str))
    if not args.no_write:
        write_section(text, label)
        print(f"updated {RESULTS} ({SECTION} / ### {label})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
