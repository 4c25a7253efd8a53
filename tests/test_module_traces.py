"""Module ranges in traces (detail="modules", issue 25): phase attribution still charges every
kernel and op to its phase; module attribution charges them to the innermost module range.

A synthetic GPU trace (the demo trace with module ranges added, expectations by hand) and a real
Kineto trace recorded on CPU by torch.profiler while the tiny reference model generated
(expectations from the model's structure: each attention call runs 4 linear projections, each
router 1, the LM head 1)."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from molmo_latency import profile_phases
from molmo_latency.models import PRESETS
from molmo_latency.trace import module_gpu_table, module_op_table, phase_gpu_table, read_kineto
from molmo_latency.trace._demo import _PID, _TID, demo_trace_dict


def _with_modules(tmp_path):
    doc = demo_trace_dict()
    # inside prefill (1031-1091): attention around launches 5 (rms_norm) and 6 (flash), a norm
    # around launch 5 only; the memcpy (launch 4, at 1032) stays outside every module range
    for name, ts, dur in (("module/attention[0]", 1035.0, 10.0), ("module/norm[0]", 1035.5, 3.0)):
        doc["traceEvents"].append({"ph": "X", "cat": "user_annotation", "name": name, "pid": _PID, "tid": _TID,
                                   "ts": ts, "dur": dur, "args": {"External id": 1}})
    path = tmp_path / "modules.pt.trace.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(doc, f)
    plain = tmp_path / "plain.pt.trace.json.gz"
    with gzip.open(plain, "wt", encoding="utf-8") as f:
        json.dump(demo_trace_dict(), f)
    return read_kineto(path), read_kineto(plain)


def test_module_ranges_take_kernels_for_modules_and_leave_phases_whole(tmp_path):
    with_modules, plain = _with_modules(tmp_path)
    assert phase_gpu_table(with_modules).equals(phase_gpu_table(plain))  # phase ranges still win
    prefill = module_gpu_table(with_modules).filter(pl.col("phase") == "prefill")
    kinds = {k: (n, round(ms * 1e3, 6)) for k, n, ms in prefill.select("module_kind", "gpu_activities",
                                                                      "gpu_kernel_ms").rows()}
    # by hand: rms_norm 3.0 us in the norm (innermost), flash 10.0 us in attention, memcpy 1.5 us other
    assert kinds == {"norm": (1, 3.0), "attention": (1, 10.0), "other": (1, 1.5)}
    decode = module_gpu_table(with_modules).filter(pl.col("phase") == "decode")
    assert decode["module_kind"].to_list() == ["other", "other"]


@pytest.fixture(scope="module")
def cpu_trace(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("kineto")
    with profile_phases(tiny.model, detail="modules", trace_dir=out) as prof:
        tiny.model.generate(**tiny.request(crops=1, new_tokens=3))
    [trace] = prof.traces
    return read_kineto(trace["path"]), prof.report()


def test_a_real_cpu_trace_keeps_its_phases_and_charges_ops_to_modules(cpu_trace):
    trace, report = cpu_trace
    names = trace.annotations["name"].to_list()
    assert any(n.startswith("module/attention[") for n in names) and "module/lm_head" in names
    # phase attribution: exactly the phase instances the profiler timed, module ranges ignored
    phases = phase_gpu_table(trace).select("phase", "step").rows()
    assert phases == report.phases.sort("start_ns").select("phase", "step").rows()
    # every module range lies inside one phase range (the test's own reading of the annotations)
    ann = trace.annotations.with_row_index()
    phase_rows = ann.filter(pl.col("name").str.contains(r"^(vision|projector|prefill|decode)(\[\d+\])?$"))
    module_rows = ann.filter(pl.col("name").str.starts_with("module/"))
    spans = phase_rows.select("start_ns", "end_ns").rows()
    for start, end in module_rows.select("start_ns", "end_ns").rows():
        assert sum(s <= start and end <= e for s, e in spans) == 1
    # module attribution of the linear layers, from the model's structure
    ops = module_op_table(trace, names=["aten::linear"])
    blocks = PRESETS["tiny"].text_layers
    for phase, step in report.phases.filter(pl.col("phase").is_in(["prefill", "decode"])).select("phase", "step").rows():
        per = dict(ops.filter((pl.col("phase") == phase) & (pl.col("step") == step))
                   .select("module_kind", "ops").rows())
        assert per["attention"] == 4 * blocks, (phase, step, per)  # q, k, v, o
        assert per["moe_router"] == blocks and per["lm_head"] == 1, (phase, step, per)
        assert per.get("other", 0) == 0  # no linear layer outside the modules in an LLM phase


@pytest.mark.gpu
def test_on_a_gpu_module_kernels_add_up_to_each_phase(tmp_path):
    """On CUDA (the GPU machine): a Kineto trace with kernels; each phase instance's kernels,
    charged to module kinds, add up to what phase attribution charges it, and attention launches
    kernels in every LLM phase; the event-timed modules table closes each phase."""
    from molmo_latency.models import reference_vlm

    ref = reference_vlm("tiny", device="cuda")
    ref.model.generate(**ref.request(crops=1, new_tokens=2))
    with profile_phases(ref.model, detail="modules", trace_dir=tmp_path, nvml="off") as prof:
        ref.model.generate(**ref.request(crops=1, new_tokens=4))
    report = prof.report()
    assert report.requests["timer"].to_list() == ["cuda_event"]
    trace = read_kineto(prof.traces[0]["path"])
    phases = phase_gpu_table(trace).filter(pl.col("gpu_activities") > 0)
    per = module_gpu_table(trace).group_by("request", "phase", "step").agg(
        pl.col("gpu_activities").sum().alias("n"), pl.col("gpu_kernel_ms").sum().alias("kernel_ms"))
    joined = phases.join(per, on=["request", "phase", "step"], how="left")
    assert joined["n"].to_list() == joined["gpu_activities"].to_list()
    assert joined["kernel_ms"].to_list() == pytest.approx(joined["gpu_kernel_ms"].to_list(), abs=1e-9)
    llm = module_gpu_table(trace).filter(pl.col("phase").is_in(["prefill", "decode"]))
    attention = llm.filter(pl.col("module_kind") == "attention")
    assert attention.height == report.phases.filter(pl.col("phase").is_in(["prefill", "decode"])).height
    sums = report.modules.group_by("phase", "step").agg(pl.col("ms").sum())
    expected = report.phases.select("phase", "step", "ms").join(sums, on=["phase", "step"], suffix="_modules")
    assert expected["ms_modules"].to_list() == pytest.approx(expected["ms"].to_list(), abs=1e-6)


def test_trace_summary_shows_gpu_time_per_phase_and_module_kind(tmp_path):
    import contextlib
    import io

    from molmo_latency.cli.main import main
    from molmo_latency.trace import summarize

    with_modules, plain = _with_modules(tmp_path)
    assert summarize(plain).modules is None
    rows = summarize(with_modules).modules.filter(pl.col("phase") == "prefill").select(
        "module_kind", "gpu_activities").rows()
    assert sorted(rows) == [("attention", 1), ("norm", 1), ("other", 1)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["trace", "summary", str(tmp_path / "modules.pt.trace.json.gz"), "--json"]) == 0
    doc = json.loads(out.getvalue())
    attention = [m for m in doc["modules"] if m["phase"] == "prefill" and m["module_kind"] == "attention"]
    assert attention == [{"phase": "prefill", "module_kind": "attention", "instances": 1, "kernels": 1,
                          "gpu_kernel_us": pytest.approx(10.0)}]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["trace", "summary", str(tmp_path / "modules.pt.trace.json.gz")]) == 0
    assert "module kind" in text.getvalue()
