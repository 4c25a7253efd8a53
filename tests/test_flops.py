"""FLOPs per phase from the config and the shapes fed (molmo_latency.flops), checked against
PyTorch's own counter (torch.utils.flop_counter.FlopCounterMode) on the real forward calls of the
tiny reference model (SigLIP + AyaVision projector + OLMoE), with the eager attention and experts
paths (the only ones the counter sees: CPU SDPA and grouped expert GEMMs are not counted by it)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from molmo_latency.flops import (ACCELERATORS, TextShape, VisionShape, accelerator, request_flops,
                                 speed_of_light)
from tests.profiler_helpers import eager_reference

TOLERANCE = 0.01  # relative: what the counter sees beyond the matrix products we model (none today)


@pytest.fixture(scope="module")
def eager():
    return eager_reference()


def _counted(fc: FlopCounterMode, suffix: str) -> int:
    """FLOPs the counter charged to the module whose name ends with `suffix` (any layout), or to
    everything (``Global``)."""
    found = [sum(v.values()) for k, v in fc.get_flop_counts().items() if k.endswith(suffix)]
    assert len(found) == 1, (suffix, list(fc.get_flop_counts()))
    return found[0]


def _ours(ref, crops, prompt_tokens, output_tokens, **kw):
    cfg = ref.model.config
    from molmo_latency.adapters import find_phases

    projector = find_phases(ref.model).spans["projector"].start  # where this transformers line puts it
    linears = [(m.in_features, m.out_features) for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    ids = ref.inputs(crops=crops, prompt_tokens=prompt_tokens)["input_ids"]
    return request_flops(TextShape.from_config(cfg.text_config), input_tokens=ids.shape[1],
                         output_tokens=output_tokens, vision=VisionShape.from_config(cfg.vision_config),
                         crops=crops, projector=linears, pooled_tokens=ref.tokens_per_crop, **kw)


@pytest.mark.parametrize("crops, prompt_tokens, top_k, blocks", [(2, 8, 2, 4), (1, 20, 1, 2), (3, 5, 4, 3)])
def test_flops_of_each_phase_agree_with_pytorchs_counter(eager, crops, prompt_tokens, top_k, blocks):
    from molmo_latency import knobs

    model = eager.model
    kw = eager.inputs(crops=crops, prompt_tokens=prompt_tokens)
    with torch.no_grad(), knobs.configured(model, top_k=top_k, blocks=blocks):
        prefill = FlopCounterMode(display=False)
        with prefill:
            out = model(**kw, use_cache=True, logits_to_keep=1)
        decode = FlopCounterMode(display=False)
        with decode:
            model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, kw["input_ids"].shape[1] + 1,
                                                                           dtype=torch.long),
                  past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    ours = _ours(eager, crops, prompt_tokens, 2, top_k=top_k, blocks=blocks)
    by_phase = {p: int(ours.filter(ours["phase"] == p)["flops"].sum()) for p in ("vision", "projector", "prefill", "decode")}
    image = {"vision": _counted(prefill, ".vision_tower"), "projector": _counted(prefill, ".multi_modal_projector")}
    counted = {**image, "prefill": _counted(prefill, "Global") - sum(image.values()),
               "decode": _counted(decode, "Global")}
    for phase, expected in counted.items():
        assert by_phase[phase] == pytest.approx(expected, rel=TOLERANCE), phase


def test_decode_flops_grow_with_the_kv_length_and_top_k_moves_only_the_experts():
    text = TextShape(hidden=2048, layers=16, heads=16, kv_heads=16, head_dim=128, intermediate=1024,
                     experts=64, top_k=8, vocab=50304)
    t = request_flops(text, input_tokens=600, output_tokens=5)
    steps = t.filter((t["phase"] == "decode") & (t["module_kind"] == "attention"))["flops"].to_list()
    assert all(b - a == 16 * 2 * 2 * 2048 for a, b in zip(steps, steps[1:]))  # one more cached token per step
    k2 = request_flops(text, input_tokens=600, output_tokens=5, top_k=2)
    for kind in ("attention", "moe_router", "lm_head"):
        assert k2.filter(k2["module_kind"] == kind)["flops"].sum() == t.filter(t["module_kind"] == kind)["flops"].sum()
    ratio = (k2.filter(k2["module_kind"] == "moe_experts")["flops"].sum()
             / t.filter(t["module_kind"] == "moe_experts")["flops"].sum())
    assert ratio == pytest.approx(2 / 8)


def test_speed_of_light_names_the_bound_of_each_phase():
    text = TextShape(hidden=2048, layers=16, heads=16, kv_heads=16, head_dim=128, intermediate=1024,
                     experts=64, top_k=8, vocab=50304)
    sol = speed_of_light(request_flops(text, input_tokens=2000, output_tokens=3), accelerator("NVIDIA H200"))
    bounds = dict(zip(sol["phase"], sol["bound"]))
    assert bounds["prefill"] == "compute" and bounds["decode"] == "memory"
    assert set(ACCELERATORS) == {"A100", "H100", "H200"}


def _math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
    """Attention as two matrix products, so that the counter sees them (CPU SDPA is not counted)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1 + k.shape[-2] - q.shape[-2]),
                                    float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def test_molmoe_llm_flops_agree_with_pytorchs_counter(monkeypatch):
    """MolmoE's own model code (transformers 4.5x): a forward over the prompt (logits of every
    position), and generate() of two tokens (prefill with the last logits only, one decode step)."""
    from tests.molmoe_fixtures import tiny_molmoe

    from transformers import GenerationConfig

    model = tiny_molmoe()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _math_sdpa)
    ids = torch.randint(3, 300, (1, 20))
    gen = GenerationConfig(max_new_tokens=2, min_new_tokens=2, do_sample=False, use_cache=True,
                           pad_token_id=1, eos_token_id=2)
    with torch.no_grad():
        prefill = FlopCounterMode(display=False)
        with prefill:
            model(input_ids=ids, use_cache=True)
        both = FlopCounterMode(display=False)  # prefill and one decode step, as generate() runs them
        with both:
            model.generate(input_ids=ids, generation_config=gen)
    shape = TextShape.from_config(model.config)
    forward = request_flops(shape, input_tokens=20, output_tokens=1, prefill_logits_rows=20)  # every position
    assert forward["flops"].sum() == pytest.approx(prefill.get_total_flops(), rel=TOLERANCE)
    generated = request_flops(shape, input_tokens=20, output_tokens=2)  # generate(): the last logits only
    assert generated["flops"].sum() == pytest.approx(both.get_total_flops(), rel=TOLERANCE)
