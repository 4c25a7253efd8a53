"""Shared by the profiler tests: generate() keyword arguments with the generation settings given
explicitly (ReferenceVLM.inputs() may or may not carry them, depending on its version), and the
tiny reference model built with eager attention and experts."""

from __future__ import annotations

from molmo_latency.models import EOS_ID, PAD_ID


def gen_kwargs(ref, *, crops=1, prompt_tokens=32, batch_size=1, new_tokens=8, fixed=True, **extra):
    """Inputs from `ref.inputs(...)`, then exactly `new_tokens` greedy tokens (``fixed``: no EOS
    stop before them), then `extra` (any generate() keyword)."""
    kw = ref.inputs(crops=crops, prompt_tokens=prompt_tokens, batch_size=batch_size)
    for key in ("max_new_tokens", "min_new_tokens", "do_sample"):
        kw.pop(key, None)
    kw.update(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    if fixed:
        kw["min_new_tokens"] = new_tokens
    kw.update(extra)
    return kw


def eager_reference():
    """The tiny reference model built with eager attention (4.51's OLMoE picks its attention class
    at construction) and eager experts (5.x: a loop of F.linear over the routed experts), so that
    every matrix product runs as an op a counter or a module hook sees."""
    import torch
    from transformers import AyaVisionForConditionalGeneration

    from molmo_latency.models import reference_config, reference_vlm

    ref = reference_vlm("tiny", seed=0)
    cfg = reference_config("tiny")
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
        c._experts_implementation = "eager"
    torch.manual_seed(0)
    ref.model = AyaVisionForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    return ref
