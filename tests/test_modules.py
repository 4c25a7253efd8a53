"""Inside the phases (molmo_latency.modules): module sites found structurally on the reference
model (both transformers lines lay OLMoE out differently), and the modules table of nested spans,
whose kinds sum to each phase (expectations computed by hand)."""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest

from molmo_latency.adapters import find_phases
from molmo_latency.models import PRESETS
from molmo_latency.modules import module_sites, module_table


def test_the_reference_models_sites_follow_its_config(tiny):
    sites = module_sites(tiny.model, find_phases(tiny.model))
    p = PRESETS["tiny"]
    counts = Counter(s.kind for s in sites)
    assert counts["attention"] == counts["moe_router"] == counts["moe_experts"] == p.text_layers
    assert counts["norm"] == 4 * p.text_layers  # input, post-attention, q and k norms per block
    assert counts["vision_block"] == p.vision_layers and counts["projector"] == 1 and counts["lm_head"] == 1
    assert "mlp" not in counts  # a mixture of experts, not a dense MLP
    assert [s.block for s in sites if s.kind == "attention"] == list(range(p.text_layers))


def test_nested_spans_are_charged_their_exclusive_time_and_other_closes_the_phase():
    phases = pl.DataFrame({"request": [0, 0], "phase": ["prefill", "decode"], "step": [0, 0],
                           "start_ns": [0, 1000], "end_ns": [900, 1300]})
    spans = pl.DataFrame({
        "request": [0] * 6,
        "module_kind": ["attention", "norm", "moe_experts", "moe_router", "attention", "lm_head"],
        "start_ns": [100, 110, 400, 410, 1010, 1200], "end_ns": [300, 130, 800, 450, 1100, 1290]})
    t = module_table(spans, phases)
    prefill = dict(t.filter(pl.col("phase") == "prefill").select("module_kind", "ms").rows())
    assert prefill == pytest.approx({"attention": 180e-6, "norm": 20e-6, "moe_experts": 360e-6,
                                     "moe_router": 40e-6, "other": 300e-6})
    decode = dict(t.filter(pl.col("phase") == "decode").select("module_kind", "ms").rows())
    assert decode == pytest.approx({"attention": 90e-6, "lm_head": 90e-6, "other": 120e-6})
    sums = t.group_by("phase").agg(pl.col("ms").sum())
    assert dict(sums.rows()) == pytest.approx({"prefill": 900e-6, "decode": 300e-6})
