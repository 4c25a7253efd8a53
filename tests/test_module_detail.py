"""detail="modules" (issue 25): inside each phase, the time of each decoder block's attention, MoE
router and experts, norms and the LM head, on the tiny reference VLM (AyaVision: SigLIP + OLMoE),
a plain OLMoE (transformers' own OlmoeForCausalLM from the tiny config) and MolmoE's own code
(transformers 4.5x; skips elsewhere).

Expectations come from the tests' own readings: the test's own hooks count the LLM calls and time
the attention modules it finds by name (its intervals contain ours: its hooks go on first), and
PyTorch's FlopCounterMode counts the FLOPs of each module it sees run.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import polars as pl
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from molmo_latency import profile_phases
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.models import PRESETS, reference_config
from tests.profiler_helpers import eager_reference

# The kinds of a phase instance plus `other` sum to the phase: int64 ns divided by 1e6 and
# summed as floats, so they agree to far better than a nanosecond.
SUM_TOLERANCE_MS = 1e-6
# FLOPs per module kind against torch's counter: what it sees beyond the matrix products the
# config gives (nothing today).
FLOP_TOLERANCE = 0.01
LLM = ("prefill", "decode")


def _olmoe():
    from transformers import OlmoeForCausalLM

    cfg = reference_config("tiny").text_config
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # 5.x: a loop of F.linear, which the counter sees
    torch.manual_seed(0)
    return OlmoeForCausalLM._from_config(cfg, attn_implementation="eager").eval()


def _olmoe_request(model, new_tokens):
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}




def _molmoe():
    from tests.molmoe_fixtures import tiny_molmoe

    return tiny_molmoe()


def _molmoe_request(model, new_tokens):
    from transformers import GenerationConfig

    from tests.molmoe_fixtures import TOKENS_PER_CROP

    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(1, 1 + TOKENS_PER_CROP).reshape(1, 1, TOKENS_PER_CROP)
    return {"input_ids": torch.randint(3, 300, (1, 1 + TOKENS_PER_CROP + 8), generator=gen),
            "images": torch.randn(1, 1, 576, 588, generator=gen), "image_masks": torch.ones(1, 1, 576),
            "image_input_idx": idx,
            "generation_config": GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                  do_sample=False, use_cache=True, pad_token_id=1,
                                                  eos_token_id=2)}


# model name -> (build, request(model, new_tokens), decoder attention names, number of blocks,
# the phases to pass: a text-only OLMoE has only its LLM span, named)
ATTENTION_HF = r"(^|\.)layers\.\d+\.self_attn$"
MODELS = {
    "reference": (eager_reference, None, ATTENTION_HF, PRESETS["tiny"].text_layers, None),
    "olmoe": (_olmoe, _olmoe_request, ATTENTION_HF, PRESETS["tiny"].text_layers, {"llm": ("model", "lm_head")}),
    "molmoe": (_molmoe, _molmoe_request, r"transformer\.blocks\.\d+\.attn$", 4, None),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, make_request, attention, blocks, phases = MODELS[request.param]
    built = build()
    if request.param == "reference":
        model = built.model
        make_request = lambda _m, n: built.request(crops=1, new_tokens=n)  # noqa: E731
    else:
        model = built
    model.generate(**make_request(model, 2))  # lazy initialisation (and transformers' own hooks) first
    return request.param, model, make_request, attention, blocks, phases


def _hooks(model):
    """Every hook of every module, by identity (what the model holds, as the test reads it)."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()}


def _own_timing(model, attention_pattern):
    """The test's own hooks: LLM calls of the model itself, and per call the summed duration of
    the decoder attention modules (found by name), with perf_counter_ns."""
    calls, spans, opened = [], defaultdict(int), {}
    handles = [model.register_forward_pre_hook(lambda *_: calls.append(len(calls)))]
    for name, module in model.named_modules():
        if re.search(attention_pattern, name) and "vision" not in name:
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, _n=name: opened.__setitem__(_n, time.perf_counter_ns())))
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o, _n=name: spans.__setitem__(len(calls) - 1, spans[len(calls) - 1]
                                                               + time.perf_counter_ns() - opened.pop(_n))))
    return calls, spans, handles


def test_module_times_sum_to_each_llm_phase_and_every_decode_step_has_its_breakdown(case):
    name, model, make_request, attention, blocks, phases = case
    new_tokens = 5
    before = _hooks(model)
    calls, own_attention_ns, handles = _own_timing(model, attention)
    try:
        with profile_phases(model, detail="modules", phases=phases) as prof, torch.inference_mode():
            model.generate(**make_request(model, new_tokens))
    finally:
        for h in handles:
            h.remove()
    assert _hooks(model) == before  # every hook the block added is gone
    report = prof.report()
    assert report.requests["valid"].all(), report.requests["invalid_reason"].to_list()
    modules, phases = report.modules, report.phases
    llm = phases.filter(pl.col("phase").is_in(LLM)).sort("start_ns")
    # every LLM call of the test's own count is a phase instance with its own breakdown
    assert llm.height == len(calls) == new_tokens
    assert llm["phase"].to_list() == ["prefill"] + ["decode"] * (new_tokens - 1)
    assert modules["phase"].null_count() == 0 and modules["flag"].null_count() == modules.height
    for i, (phase, step, phase_ms) in enumerate(llm.select("phase", "step", "ms").rows()):
        rows = modules.filter((pl.col("phase") == phase) & (pl.col("step") == step))
        kinds = dict(rows.select("module_kind", "ms").rows())
        n_calls = dict(rows.select("module_kind", "calls").rows())
        assert sum(kinds.values()) == pytest.approx(phase_ms, abs=SUM_TOLERANCE_MS), (name, phase, step)
        assert kinds["other"] >= 0 and sum(v for k, v in kinds.items() if k != "other") <= phase_ms + SUM_TOLERANCE_MS
        assert n_calls["attention"] == n_calls["moe_router"] == n_calls["moe_experts"] == blocks, (name, phase, n_calls)
        assert n_calls["lm_head"] == 1
        # ours lies inside the test's own attention intervals (its hooks wrap ours)
        assert kinds["attention"] <= own_attention_ns[i] / 1e6 + SUM_TOLERANCE_MS
        assert kinds["attention"] > 0


def _counter_by_kind(fc: FlopCounterMode, attention_pattern: str) -> dict[str, int]:
    """FLOPs torch's counter charged to the decoder's attention modules, MoE gates, experts and
    LM head (by module name, each counted once: its own name, not its parents')."""
    patterns = {"attention": attention_pattern, "moe_router": r"\.mlp\.gate$",
                "moe_experts": r"\.mlp\.experts(\.\d+)?$", "lm_head": r"(^|\.)lm_head$"}
    out = dict.fromkeys(patterns, 0)
    for module, counts in fc.get_flop_counts().items():
        if re.search(r"(?i)vision(_tower|model|_backbone)", module):  # the image encoder's own blocks
            continue
        for kind, pattern in patterns.items():
            if re.search(pattern, module):
                if kind == "moe_experts" and re.search(r"\.experts\.\d+$", module) and \
                        re.sub(r"\.\d+$", "", module) in fc.get_flop_counts():
                    continue  # counted with the experts module itself
                out[kind] += sum(counts.values())
    return out


def _math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
    """Attention as two matrix products, so that the counter sees them (CPU SDPA is not counted)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1 + k.shape[-2] - q.shape[-2])
        scores = scores.masked_fill(mask, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def test_module_flops_agree_with_pytorchs_counter(case, monkeypatch):
    name, model, make_request, attention, _blocks, phases = case
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _math_sdpa)
    counter = FlopCounterMode(display=False)
    with profile_phases(model, detail="modules", phases=phases) as prof, torch.no_grad(), counter:
        model.generate(**make_request(model, 4))
    modules = prof.report().modules
    assert modules.filter(pl.col("phase").is_in(LLM))["flops"].is_not_null().any()
    ours = dict(modules.filter(pl.col("flops").is_not_null()).group_by("module_kind").agg(
        pl.col("flops").sum()).rows())
    counted = _counter_by_kind(counter, attention)
    for kind, expected in counted.items():
        assert expected > 0, (name, kind, counted)
        assert ours[kind] == pytest.approx(expected, rel=FLOP_TOLERANCE), (name, kind)


def test_default_detail_adds_no_module_hook_and_a_bad_detail_is_refused(tiny):
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny.model.modules())
    with profile_phases(tiny.model) as plain:
        during = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny.model.modules())
        tiny.model.generate(**tiny.request(crops=1, new_tokens=2))
    with profile_phases(tiny.model, detail="modules") as detailed:
        more = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny.model.modules())
    phase_hooks = 2 + 2 * len(plain.phase_map.spans)  # the model's call and each phase's start/end
    assert during - hooks == phase_hooks
    assert more - hooks == phase_hooks + 2 * len(detailed.sites)
    assert plain.report().modules is None
    with pytest.raises(MolmoLatencyError, match="detail='everything' is not known"):
        profile_phases(tiny.model, detail="everything")


def test_a_hook_that_fails_to_go_on_leaves_the_model_as_it_was(tiny, monkeypatch):
    before = _hooks(tiny.model)
    generate = tiny.model.generate
    prof = profile_phases(tiny.model, detail="modules")
    victim = prof.sites[len(prof.sites) // 2].module

    def broken(*_a, **_k):
        raise RuntimeError("no hooks here")

    monkeypatch.setattr(victim, "register_forward_hook", broken)
    with pytest.raises(RuntimeError, match="no hooks here"):
        prof.__enter__()
    monkeypatch.undo()
    assert _hooks(tiny.model) == before
    assert tiny.model.generate == generate and "generate" not in vars(tiny.model)


def _cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True,
                          env=env, cwd=root, timeout=600)


def test_the_detail_key_leaves_existing_sweeps_digest_alone():
    from molmo_latency.sweep import SweepSpec

    base = {"crops": [1], "new_tokens": [3]}
    plain, phases = SweepSpec.from_dict(base), SweepSpec.from_dict({**base, "detail": "phases"})
    modules = SweepSpec.from_dict({**base, "detail": "modules"})
    assert "detail" not in plain.as_dict()["protocol"] and plain.digest() == phases.digest()
    assert modules.as_dict()["protocol"]["detail"] == "modules" and modules.digest() != plain.digest()
    from molmo_latency.errors import SweepError

    with pytest.raises(SweepError, match="'detail' must be one of"):
        SweepSpec.from_dict({**base, "detail": "kernels"})


def test_a_modules_sweep_holds_the_table_and_the_report_shows_it(tmp_path):
    import json

    sweep = tmp_path / "sweep.toml"
    sweep.write_text("crops = [1]\ntop_k = [1, 2]\nprompt_tokens = [8]\nnew_tokens = [3]\nrepeats = 1\n"
                     "warmup = 1\nwarmup_max = 1\n")
    out = tmp_path / "run"
    done = _cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out), "--detail", "modules",
                "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    table = pl.read_parquet(out / "modules.parquet")
    requests = pl.read_parquet(out / "requests.parquet")
    assert set(table["config_id"]) == set(requests["config_id"]) and table["repeat"].to_list().count(0) == table.height
    # per run: every decode step of every request has its breakdown
    steps = table.filter(pl.col("phase") == "decode").select("config_id", "step").unique()
    assert steps.height == 2 * 2  # 2 configurations x (3 - 1) steps
    # the report's breakdown: the shares of the kinds of each phase add up to 1
    shares = pl.DataFrame(doc["modules"]).group_by("config_id", "phase").agg(pl.col("share").sum())
    assert shares["share"].to_list() == pytest.approx([1.0] * shares.height)
    # FLOPs of the experts double from top-k 1 to 2 (the other kinds stay)
    flops = {(r["top_k"], r["phase"], r["module_kind"]): r["flops_median"] for r in doc["modules"]}
    assert flops[(2, "decode", "moe_experts")] == 2 * flops[(1, "decode", "moe_experts")]
    assert flops[(2, "decode", "attention")] == flops[(1, "decode", "attention")]
    names = {p.rsplit("/", 1)[-1] for p in doc["plots"]}
    assert {"module_stacks.png", "modules_vs_knobs.png", "flops_vs_wall.png"} <= names
    text = _cli("report", str(out))
    assert text.returncode == 0 and "Inside the phases" in text.stdout
    bad = _cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(tmp_path / "x"), "--detail", "ops")
    assert bad.returncode == 2 and "--detail must be phases or modules" in bad.stderr
    assert "Traceback" not in bad.stderr
