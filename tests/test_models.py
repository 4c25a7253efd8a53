"""Reference presets and the adapters/knobs on other layouts (built on the meta device: no
memory, no weights, no download)."""

import pytest
import torch

from molmo_latency import knobs
from molmo_latency.adapters import find_phases
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.models import PRESETS, reference_config
import transformers


def test_molmoe_1b_shape_has_molmoe_dimensions():
    from transformers import AyaVisionForConditionalGeneration

    cfg = reference_config("molmoe-1b-shape")
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.num_hidden_layers, text.num_experts, text.num_experts_per_tok, text.hidden_size) == (16, 64, 8, 2048)
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert PRESETS["molmoe-1b-shape"].tokens_per_crop == 144  # 24 x 24 patches, 2x2 pooling
    with torch.device("meta"):
        model = AyaVisionForConditionalGeneration(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert 6.5e9 < params < 7.7e9  # OLMoE-1B-7B text model + ViT-L
    assert knobs.get_top_k(model) == 8 and knobs.total_blocks(model) == 16
    if transformers.__version__.startswith("4."):  # language_model is a whole OlmoeForCausalLM
        expected = {"vision": ("vision_tower", "vision_tower"),
                    "projector": ("multi_modal_projector", "multi_modal_projector"),
                    "llm": ("language_model.model", "language_model.lm_head")}
    else:
        expected = {"vision": ("model.vision_tower", "model.vision_tower"),
                    "projector": ("model.multi_modal_projector", "model.multi_modal_projector"),
                    "llm": ("model.language_model", "lm_head")}
    assert find_phases(model).describe() == expected


def test_hf_molmo2_layout_and_blocks_knob():
    try:
        from transformers import Molmo2Config, Molmo2ForConditionalGeneration
    except ImportError:
        pytest.skip(f"HF Molmo2 is not in transformers {transformers.__version__} (5.x has it)")

    cfg = Molmo2Config()
    cfg.text_config.num_hidden_layers = 4
    cfg.vision_config.num_hidden_layers = 2
    with torch.device("meta"):
        model = Molmo2ForConditionalGeneration(cfg)
    phases = find_phases(model)
    assert phases.layout == "discovered" and phases.describe()["llm"] == ("model.language_model", "lm_head")
    assert knobs.set_active_blocks(model, 2) == 4
    # Molmo2's decoder loops over every layer: the list itself must be cut
    assert len(model.model.language_model.layers) == 2
    knobs.set_active_blocks(model, 4)
    assert len(model.model.language_model.layers) == 4
    with pytest.raises(MolmoLatencyError, match="no MoE router"):
        knobs.set_top_k(model, 2)  # Molmo2 is dense
