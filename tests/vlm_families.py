"""Tiny image-text models of many transformers families, built the way transformers' own tests
build them: a config class with tiny sizes, random weights, no download.

Each :class:`Family` knows how to build its model and one request (input_ids with the image
placeholders the test itself placed, pixel inputs of the shape the family takes), and carries
the test's OWN reading of where its phases live (``own``: phase -> module paths, written by hand
from the family's modeling code, never from the adapter under test). The tests hook those
modules themselves and compare with what the profiler reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

PAD, EOS, BOS = 0, 1, 2
VOCAB = 128
IMAGE = 100  # the image placeholder id every family is given (where the config takes one)

# tiny sizes, applied to the config and every sub-config that has the attribute
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "d_model": 32, "encoder_layers": 2,
        "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_layers": 2, "num_heads": 4,
        "embed_dim": 32, "moe_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4,
        "num_experts_per_tok": 2, "n_routed_experts": 4, "shared_expert_intermediate_size": 32,
        "projection_dim": 32, "out_hidden_size": 32, "depth": 2, "vocab_size": VOCAB,
        "word_embed_proj_dim": 32, "ffn_dim": 64}


def tiny_config(model_type: str, init: dict | None = None, **overrides: Any):
    """The family's default config (built with `init`: sub-configs a family has none of by
    default) with tiny sizes everywhere, then `overrides` (dotted keys reach sub-configs:
    ``"vision_config.image_size": 32``)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type](**(init or {}))

    def shrink(c: Any) -> None:
        for key, value in list(vars(c).items()):
            if isinstance(value, PretrainedConfig):
                shrink(value)
            elif key in TINY and isinstance(value, int) and not isinstance(value, bool):
                setattr(c, key, TINY[key])
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if isinstance(getattr(c, key, None), int) and getattr(c, key) >= VOCAB:
                setattr(c, key, {"pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS}[key])

    shrink(cfg)
    for key, value in overrides.items():
        target = cfg
        *parents, last = key.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, last, value)
    return cfg


def prompt(image_tokens: int, text_before: int = 3, text_after: int = 4, image_id: int = IMAGE,
           start: list[int] | None = None, end: list[int] | None = None) -> torch.Tensor:
    """One prompt row: text, `image_tokens` placeholders (between optional start/end ids), text."""
    ids = [BOS] + list(range(10, 10 + text_before)) + (start or []) + [image_id] * image_tokens \
        + (end or []) + list(range(20, 20 + text_after))
    return torch.tensor([ids])


@dataclass
class Family:
    name: str                      # transformers model_type
    cls: str                       # transformers class name
    build_config: Callable[[], Any]
    build_inputs: Callable[[Any], dict]   # config -> generate() keyword arguments
    own: dict[str, Any]            # the test's own reading: phase -> [paths] | "inside:<path>"
    image_tokens: int | None       # image placeholders the test put in the prompt (None: none)
    encoder_decoder: bool = False
    slow: bool = False
    lines: tuple[str, ...] = ("5",)  # transformers major lines the family exists on
    knobs: dict[str, Any] = field(default_factory=dict)  # knob -> a value to try
    own4: dict[str, Any] | None = None  # the own reading on transformers 4.5x, where it differs
    skip: str | None = None  # why this family cannot run here (a package this machine cannot load)
    # its own generate() fails without the profiler on some releases (why): the test runs it first
    # and skips, with the error, only where it fails, so a release that fixes it gets tested
    fails_upstream: str | None = None
    sets_token_ids: bool = False  # its generate() passes pad/eos ids itself (BLIP): the test does not

    def own_on(self, line: str) -> dict[str, Any]:
        return self.own4 if line == "4" and self.own4 is not None else self.own

    def build(self, seed: int = 0):
        import transformers

        if not hasattr(transformers, self.cls):  # an older 5.x than the newest, which CI runs
            pytest.skip(f"{self.cls} is not in transformers {transformers.__version__}")
        torch.manual_seed(seed)
        cfg = self.build_config()
        model = getattr(transformers, self.cls)(cfg).eval()
        return model, self.build_inputs(cfg)


def _pix(*shape: int) -> dict:
    return {"pixel_values": torch.randn(*shape)}


LLAVA_OWN = {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"],
             "llm": ("model.language_model", "lm_head")}
LLAVA_OWN4 = {"vision": ["vision_tower"], "projector": ["multi_modal_projector"],
              "llm": ("language_model.model", "language_model.lm_head")}
QWEN_OWN4 = {"vision": ["visual"], "projector": "inside:visual.merger", "llm": ("model", "lm_head")}
BOTH = dict(lines=("4", "5"))
QWEN_OWN = {"vision": ["model.visual"], "projector": "inside:model.visual.merger",
            "llm": ("model.language_model", "lm_head")}


def _qwen_inputs(merge: int = 2, patch: int = 8, temporal: int = 2, grid: tuple = (1, 4, 4)):
    def build(cfg: Any) -> dict:
        t, h, w = grid
        patches = t * h * w
        return {"input_ids": prompt(patches // merge ** 2), "image_grid_thw": torch.tensor([grid]),
                **_pix(patches, 3 * temporal * patch * patch)}
    return build


def _qwen_config(model_type: str, mrope: tuple = (1, 1, 2), **extra: Any) -> Callable[[], Any]:
    def build() -> Any:
        over = {"image_token_id": IMAGE, "video_token_id": IMAGE + 1, "vision_start_token_id": IMAGE + 2,
                "vision_end_token_id": IMAGE + 3, "vision_config.patch_size": 8,
                "vision_config.spatial_merge_size": 2, "vision_config.temporal_patch_size": 2}
        over.update(extra)
        cfg = tiny_config(model_type, **over)
        text = getattr(cfg, "text_config", cfg)
        # head_dim 8: the sections sum to head_dim / 2 (5.x: rope_parameters, 4.5x: rope_scaling)
        if hasattr(text, "rope_parameters"):
            rope = dict(text.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
            rope["mrope_section"] = list(mrope)
            text.rope_parameters = rope
        else:
            text.rope_scaling = {"type": "mrope", "rope_type": "default", "mrope_section": list(mrope)}
        return cfg
    return build


def _molmo2_config(layers: int = 2, rope_scaling_layers: list[int] | None = None) -> Callable[[], Any]:
    def build() -> Any:
        cfg = tiny_config("molmo2", image_patch_id=IMAGE, image_start_token_id=IMAGE + 1,
                          image_end_token_id=IMAGE + 2, low_res_image_start_token_id=IMAGE + 3, **{
                              "vision_config.image_size": [32, 32], "vision_config.patch_size": 8,
                              "vision_config.num_position_embeddings": 16,
                              "adapter_config.vision_feature_layer": [-1],
                              "adapter_config.text_hidden_size": 32,
                              "text_config.num_hidden_layers": layers,
                              "text_config.rope_scaling_layers": (list(range(layers)) if rope_scaling_layers is None
                                                                  else rope_scaling_layers)})
        if rope_scaling_layers is not None:  # scaled and unscaled RoPE differ
            cfg.text_config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
        return cfg
    return build


def _molmo2_inputs(cfg: Any) -> dict:
    # one crop of 4x4 patches (8x8 pixels each), pooled 2x2 into 4 image tokens
    pooling = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    return {"input_ids": prompt(4, start=[IMAGE + 1], end=[IMAGE + 2]), **_pix(1, 16, 8 * 8 * 3),
            "image_token_pooling": pooling, "image_grids": torch.tensor([[2, 2, 0, 0]]),
            "image_num_crops": torch.tensor([1])}


def _idefics_inputs(tokens: int) -> Callable[[Any], dict]:
    return lambda cfg: {"input_ids": prompt(tokens), **_pix(1, 1, 3, 32, 32),
                        "pixel_attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.bool)}


IDEFICS_OWN = {"vision": ["model.vision_model"], "projector": ["model.connector"],
               "llm": ("model.text_model", "lm_head")}
BLIP2_OWN = {"vision": ["vision_model"], "projector": ["qformer", "language_projection"],
             "llm": ("language_model", "language_model.lm_head")}
_VISION_32 = {"vision_config.image_size": 32, "vision_config.patch_size": 8}


def _chameleon_config() -> Any:
    # codebook entry i is the BPE token 110 + i, named IMGIMG<digits as letters>Z as in Chameleon's vocabulary
    vocab = {"<image>": IMAGE, **{"IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z": 110 + i
                                  for i in range(16)}}
    from transformers import ChameleonVQVAEConfig

    return tiny_config("chameleon", vocabulary_map=vocab, image_token_id=IMAGE, vq_config=ChameleonVQVAEConfig(
        embed_dim=8, num_embeddings=16, latent_channels=8, resolution=32, base_channels=32,
        channel_multiplier=[1, 1, 1, 2], num_res_blocks=1))


def _vit_gpt2_config() -> Any:
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig

    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8)
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=BOS,
                      eos_token_id=EOS, add_cross_attention=True, is_decoder=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
    cfg.decoder_start_token_id, cfg.pad_token_id = BOS, PAD
    return cfg


def _florence2_config() -> Any:
    return tiny_config("florence2", image_token_id=IMAGE, **{
        "vision_config.depths": [1, 1], "vision_config.patch_size": [7, 3], "vision_config.patch_stride": [4, 2],
        "vision_config.patch_padding": [3, 1], "vision_config.patch_prenorm": [False, True],
        "vision_config.embed_dim": [16, 32], "vision_config.num_heads": [2, 2], "vision_config.num_groups": [2, 2],
        "vision_config.window_size": 2, "vision_config.projection_dim": 32, "text_config.decoder_start_token_id": EOS,
        "text_config.max_position_embeddings": 64})


def _emu3_config() -> Any:
    from transformers import Emu3VQVAEConfig

    # codebook entry i is the BPE token 110 + i, named as in Emu3's vocabulary; 127 ends an image row
    vocab = {"<image>": IMAGE, "<|extra_200|>": 127, **{f"<|visual token{i:06d}|>": 110 + i for i in range(16)}}
    return tiny_config("emu3", vocabulary_map=vocab, vq_config=Emu3VQVAEConfig(
        codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
        num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=2, hidden_size=32))


def _unbuildable(*_: Any) -> Any:
    raise RuntimeError("this family is skipped here (see its skip reason)")


MINICPM_OWN = {"vision": ["model.vision_tower"], "projector": ["model.merger"],
               "llm": ("model.language_model", "lm_head")}


def _minicpm_config(model_type: str) -> Callable[[], Any]:
    return lambda: tiny_config(model_type, image_token_id=IMAGE, video_token_id=IMAGE + 1, insert_layer_id=0, **{
        "vision_config.image_size": 64, "vision_config.patch_size": 8, "vision_config.insert_layer_id": 0,
        "text_config.layer_types": ["linear_attention", "full_attention"]})


def _minicpm_inputs(tokens: int) -> Callable[[Any], dict]:
    # NaViT-packed: the 64 patches of one 8x8-patch image side by side in one row of pixels
    return lambda cfg: {"input_ids": prompt(tokens), **_pix(1, 3, 8, 64 * 8), "target_sizes": torch.tensor([[8, 8]])}


def _ernie_config() -> Any:
    cfg = tiny_config("ernie4_5_vl_moe", image_token_id=IMAGE, video_token_id=IMAGE + 1, image_start_token_id=IMAGE + 2,
                      image_end_token_id=IMAGE + 3, video_start_token_id=IMAGE + 4, video_end_token_id=IMAGE + 5, **{
                          "vision_config.patch_size": 8, "text_config.moe_intermediate_size": [32, 32],
                          "text_config.moe_num_experts": 4, "text_config.moe_k": 2,
                          "text_config.moe_num_shared_experts": 1})
    rope = dict(cfg.text_config.rope_parameters)
    rope["mrope_section"] = [1, 1, 2]  # head_dim 8: the sections sum to head_dim / 2
    cfg.text_config.rope_parameters = rope
    return cfg


# --- fam-a (2026-12-07) --- helpers of the families added in the fam-a block at the end of FAMILIES
def _sam_ocr_config(model_type: str, sam: dict, encoder: dict) -> Callable[[], Any]:
    """DeepSeek-OCR-2 / Unlimited-OCR: a SAM encoder whose neck downsamples 4x to the second encoder's
    width (downsample_channels[-1] = 32, the tiny hidden size), a MoE text model (one dense, one sparse layer)."""
    sam = {"output_channels": 16, "window_size": 4, "global_attn_indexes": [1], "mlp_dim": 64,
           "downsample_channels": [16, 32], **sam}
    text = {"num_hidden_layers": 2, "mlp_layer_types": ["dense", "sparse"], "n_shared_experts": 1}
    return lambda: tiny_config(model_type, init={"vision_config": {"sam_config": sam, "encoder_config": encoder},
                                                 "text_config": text},
                               image_token_id=IMAGE, **{"text_config.num_experts_per_tok": 2})


def _granite4_vision_config() -> Any:
    # the window Q-Former's heads are vision hidden_size // 64: a vision width of 64, one head
    return tiny_config("granite4_vision", image_token_index=IMAGE, image_grid_pinpoints=[[32, 32]],
                       downsample_rate="1/2", deepstack_layer_map=[[1, 0]], spatial_target_layers=[0, 1, 1, 0],
                       projector_dropout=0.0, **{**_VISION_32, "vision_config.hidden_size": 64,
                                                 "qformer_config.hidden_size": 64,
                                                 "qformer_config.encoder_hidden_size": 64,
                                                 "qformer_config.num_attention_heads": 1})


def _hunyuan_vl_config() -> Any:
    cfg = tiny_config("hunyuan_vl", image_token_id=IMAGE, im_start_id=IMAGE + 1, im_end_id=IMAGE + 2,
                      im_newline_id=IMAGE + 3, **{"vision_config.patch_size": 8, "vision_config.max_image_size": 32,
                                                  "vision_config.min_image_size": 32, "vision_config.max_vit_seq_len": 16,
                                                  "vision_config.text_hidden_size": 32, "text_config.head_dim": 8})
    rope = dict(cfg.text_config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    rope["mrope_section"] = [1, 1, 1, 1]  # 4 axes; head_dim 8: the sections sum to head_dim / 2
    cfg.text_config.rope_parameters = rope
    return cfg


def _hy_v4_vl_config() -> Any:
    # an MLA text model (rope head 8: mrope sections summing to 4); its post-init derives per-layer lists, so the
    # layer count goes in at construction
    text = {"num_hidden_layers": 2, "num_attention_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "index_topk": 8, "index_head_dim": 8,
            "index_n_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 1, 1]}}
    return tiny_config("hy_v4_vl", init={"text_config": text}, image_token_id=IMAGE, video_token_id=IMAGE + 1,
                       **{"vision_config.patch_size": 8, "vision_config.max_image_size": 32,
                          "text_config.num_key_value_heads": 4})


def _grid_inputs(tokens: int, flat: bool = True, type_ids: bool = False) -> Callable[[Any], dict]:
    """One image of 4x4 patches of 8x8 pixels (flattened, or as 3x8x8 crops) with its (1, 4, 4) grid."""
    def build(cfg: Any) -> dict:
        ids = prompt(tokens)
        pix = _pix(16, 3 * 8 * 8) if flat else _pix(16, 3, 8, 8)
        extra = {"mm_token_type_ids": (ids == IMAGE).int()} if type_ids else {}
        return {"input_ids": ids, **pix, "image_grid_thw": torch.tensor([[1, 4, 4]]), **extra}
    return build


def _dots3_note_config() -> Any:
    from transformers import Dots3NoteConfig

    # the text settings sit on the top-level config (as in the released checkpoints); layer 0 full
    # attention, layer 1 sliding (a window longer than the request); a pyramid of one dense, one MoE vision layer
    vision = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "patch_size": 8, "spatial_merge_size": 2, "pyramid_num_routed": [-1, 2],
              "capacity_factor": 2, "adapter_in_dim": 32, "adapter_out_dim": 32, "adapter_merge_size": 2}
    audio = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 1,
             "feature_size": 8, "downsample_hidden_size": 4, "adapter_input_size": 32, "adapter_out_dim": 32}
    mla = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
           "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 4}
    return Dots3NoteConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
        layer_types=["full_attention", "sliding_attention"], sliding_window_size=64, use_dsa=False,
        **mla, **{f"swa_{k}": v for k, v in mla.items()}, index_n_heads=2, index_head_dim=8, index_topk=4,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16, first_k_dense_replace=1, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS, vision_config=vision, audio_config=audio, image_token_id=IMAGE, video_token_id=IMAGE + 1,
        audio_token_id=IMAGE + 2)
# --- end fam-a helpers ---


def _inkling2_config(model_type: str, **text: Any) -> Callable[[], Any]:
    def build() -> Any:
        return tiny_config(model_type, init={"text_config": {
            "num_hidden_layers": 2, "layer_types": ["hybrid_sliding", "hybrid"], "n_routed_experts": 4,
            "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8,
            "unpadded_vocab_size": VOCAB, "sliding_window_size": 16, "rel_extent": 32, "d_rel": 4,
            "n_layers_per_attn_res_block": 1, **text}}, image_token_id=IMAGE, **{
                "vision_config.text_hidden_size": 32, "vision_config.patch_size": 4,
                "vision_config.posemb_grid_size": 4, "vision_config.projection_hidden_dim": 64})
    return build


def diffusion_gemma_config() -> Any:
    """DiffusionGemma (block diffusion): a Gemma 4 vision tower in its encoder, canvases of 4 tokens."""
    return tiny_config("diffusion_gemma", init={"text_config": {
        "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"], "global_head_dim": 8,
        "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}},
        image_token_id=IMAGE, boi_token_id=IMAGE + 1, eoi_token_id=IMAGE + 2, canvas_length=4, **{
            "vision_config.patch_size": 8, "vision_config.pooling_kernel_size": 3,
            "vision_config.position_embedding_size": 64})


# Inkling 2's vision model takes one 8x8 block of pixels (2x2 patches of 4x4, channels last) per image
# token, and a grid counted in image tokens: a 2x2 grid, 4 image tokens
def _inkling2_inputs(cfg: Any) -> dict:
    return {"input_ids": prompt(4), "pixel_values": torch.randn(4, 8, 8, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}


# its merger (an MLP from 2x2 merged patches into the text width) runs inside the vision model
INKLING2_OWN = {"vision": ["model.vision_tower"], "projector": "inside:model.vision_tower.merger",
                "llm": ("model.language_model", "lm_head")}


FAMILIES: list[Family] = [
    Family("llava", "LlavaForConditionalGeneration",
           lambda: tiny_config("llava", image_token_index=IMAGE, **{
               "vision_config.image_size": 32, "vision_config.patch_size": 8}),
           lambda cfg: {"input_ids": prompt(16), **_pix(1, 3, 32, 32)},
           LLAVA_OWN, 16, own4=LLAVA_OWN4, **BOTH),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", _qwen_config("qwen2_vl"),
           _qwen_inputs(), QWEN_OWN, 4, own4=QWEN_OWN4, **BOTH),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
           _qwen_config("qwen2_5_vl", **{"vision_config.fullatt_block_indexes": [1],
                                         "vision_config.window_size": 16}),
           _qwen_inputs(), QWEN_OWN, 4, own4=QWEN_OWN4, **BOTH),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration",
           _qwen_config("qwen3_vl", **{"vision_config.deepstack_visual_indexes": [0],
                                       "vision_config.num_position_embeddings": 16}),
           _qwen_inputs(), QWEN_OWN, 4),
    Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration",
           _qwen_config("qwen3_vl_moe", **{"vision_config.deepstack_visual_indexes": [0],
                                           "vision_config.num_position_embeddings": 16}),
           _qwen_inputs(), QWEN_OWN, 4, knobs={"top_k": 1, "blocks": [1]}),
    Family("glm4v", "Glm4vForConditionalGeneration",
           _qwen_config("glm4v", **{"vision_config.image_size": 32}),
           _qwen_inputs(), {**QWEN_OWN, "projector": "inside:model.visual.merger"}, 4),
    Family("molmo2", "Molmo2ForConditionalGeneration", _molmo2_config(), _molmo2_inputs,
           LLAVA_OWN, 4, knobs={"blocks": [1]}),
    Family("vipllava", "VipLlavaForConditionalGeneration",
           lambda: tiny_config("vipllava", image_token_index=IMAGE, vision_feature_layers=[-2, -1], **_VISION_32),
           lambda cfg: {"input_ids": prompt(16), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 16, own4=LLAVA_OWN4, **BOTH),
    Family("aya_vision", "AyaVisionForConditionalGeneration",
           lambda: tiny_config("aya_vision", image_token_id=IMAGE, image_token_index=IMAGE, **_VISION_32),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 4, own4=LLAVA_OWN4, **BOTH),
    Family("paligemma", "PaliGemmaForConditionalGeneration",
           lambda: tiny_config("paligemma", image_token_index=IMAGE, **_VISION_32),
           lambda cfg: {"input_ids": prompt(16, text_before=0), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 16, own4=LLAVA_OWN4, **BOTH),
    Family("gemma3", "Gemma3ForConditionalGeneration",
           lambda: tiny_config("gemma3", image_token_index=IMAGE, boi_token_index=IMAGE + 1,
                               eoi_token_index=IMAGE + 2, mm_tokens_per_image=4, **_VISION_32),
           lambda cfg: {"input_ids": prompt(4, start=[IMAGE + 1], end=[IMAGE + 2]), **_pix(1, 3, 32, 32)},
           LLAVA_OWN, 4, own4=LLAVA_OWN4, **BOTH),
    Family("internvl", "InternVLForConditionalGeneration",
           lambda: tiny_config("internvl", image_token_id=IMAGE, **{
               "vision_config.image_size": [32, 32], "vision_config.patch_size": [8, 8]}),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 4),
    Family("mistral3", "Mistral3ForConditionalGeneration",
           lambda: tiny_config("mistral3", image_token_index=IMAGE, spatial_merge_size=2, **_VISION_32),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
           LLAVA_OWN, 4, own4=LLAVA_OWN4, **BOTH),
    Family("video_llava", "VideoLlavaForConditionalGeneration",
           lambda: tiny_config("video_llava", image_token_index=IMAGE, video_token_index=IMAGE + 1, **_VISION_32),
           lambda cfg: {"input_ids": prompt(16), "pixel_values_images": torch.randn(1, 3, 32, 32)},
           {"vision": ["model.image_tower", "model.video_tower"], "projector": ["model.multi_modal_projector"],
            "llm": ("model.language_model", "lm_head")}, 16),
    Family("idefics3", "Idefics3ForConditionalGeneration",
           lambda: tiny_config("idefics3", image_token_id=IMAGE, scale_factor=2, **_VISION_32),
           _idefics_inputs(4), IDEFICS_OWN, 4, **BOTH),
    Family("smolvlm", "SmolVLMForConditionalGeneration",
           lambda: tiny_config("smolvlm", image_token_id=IMAGE, scale_factor=2, **_VISION_32),
           _idefics_inputs(4), IDEFICS_OWN, 4, **BOTH),
    Family("idefics2", "Idefics2ForConditionalGeneration",
           lambda: tiny_config("idefics2", image_token_id=IMAGE, **{
               **_VISION_32, "perceiver_config.resampler_n_latents": 4, "perceiver_config.resampler_depth": 1,
               "perceiver_config.resampler_n_heads": 2, "perceiver_config.resampler_head_dim": 8,
               "perceiver_config.num_key_value_heads": 1}),
           _idefics_inputs(4), IDEFICS_OWN, 4, **BOTH),
    Family("blip-2", "Blip2ForConditionalGeneration",
           lambda: tiny_config("blip-2", image_token_index=IMAGE, num_query_tokens=4, **{
               **_VISION_32, "qformer_config.encoder_hidden_size": 32}),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32)}, BLIP2_OWN, 4, **BOTH),
    Family("instructblip", "InstructBlipForConditionalGeneration",
           lambda: tiny_config("instructblip", image_token_index=IMAGE, num_query_tokens=4, **{
               **_VISION_32, "qformer_config.encoder_hidden_size": 32}),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32),
                        "qformer_input_ids": torch.tensor([[BOS, 10, 11]])},
           BLIP2_OWN, 4, **BOTH),
    Family("kosmos-2", "Kosmos2ForConditionalGeneration",
           lambda: tiny_config("kosmos-2", latent_query_num=4, **_VISION_32),
           lambda cfg: {"input_ids": prompt(4, image_id=IMAGE), **_pix(1, 3, 32, 32),
                        "image_embeds_position_mask": (prompt(4, image_id=IMAGE) == IMAGE)},
           {"vision": ["vision_model"], "projector": ["image_to_text_projection"],
            "llm": ("text_model", "text_model.lm_head")}, 4, **BOTH),
    Family("janus", "JanusForConditionalGeneration",
           lambda: tiny_config("janus", image_token_id=IMAGE, **{**_VISION_32, "vision_config.num_image_tokens": 16}),
           lambda cfg: {"input_ids": prompt(16), **_pix(1, 3, 32, 32)},
           {"vision": ["model.vision_model"], "projector": ["model.aligner"],
            "llm": ("model.language_model", "lm_head")}, 16),
    Family("deepseek_vl_hybrid", "DeepseekVLHybridForConditionalGeneration",
           lambda: tiny_config("deepseek_vl_hybrid", image_token_id=IMAGE, **{
               **_VISION_32, "high_res_vision_config.image_size": 64, "high_res_vision_config.patch_size": 8,
               "high_res_vision_config.window_size": 4, "high_res_vision_config.global_attn_indexes": [1],
               "high_res_vision_config.output_channels": 8, "high_res_vision_config.mlp_dim": 64}),
           lambda cfg: {"input_ids": prompt(16), **_pix(1, 3, 32, 32), "high_res_pixel_values": torch.randn(1, 3, 64, 64)},
           {"vision": ["model.vision_model", "model.high_res_vision_model"],
            "projector": ["model.high_res_vision_neck", "model.high_res_vision_proj", "model.aligner"],
            "llm": ("model.language_model", "lm_head")}, 16),
    Family("deepseek_vl", "DeepseekVLForConditionalGeneration",
           lambda: tiny_config("deepseek_vl", image_token_id=IMAGE, **_VISION_32),
           lambda cfg: {"input_ids": prompt(16), **_pix(1, 3, 32, 32)},
           {"vision": ["model.vision_model"], "projector": ["model.aligner"],
            "llm": ("model.language_model", "lm_head")}, 16),
    Family("cohere2_vision", "Cohere2VisionForConditionalGeneration",
           lambda: tiny_config("cohere2_vision", image_token_id=IMAGE, **_VISION_32),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 4),
    Family("lighton_ocr", "LightOnOcrForConditionalGeneration",
           lambda: tiny_config("lighton_ocr", image_token_id=IMAGE, spatial_merge_size=2, **_VISION_32),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
           {"vision": ["model.vision_encoder"], "projector": ["model.vision_projection"],
            "llm": ("model.language_model", "lm_head")}, 4),
    Family("glm4v_moe", "Glm4vMoeForConditionalGeneration",
           _qwen_config("glm4v_moe", mrope=(0, 1, 1), **{"vision_config.image_size": 32}),
           _qwen_inputs(), QWEN_OWN, 4, knobs={"top_k": 1, "blocks": [1]}),
    Family("t5gemma2", "T5Gemma2ForConditionalGeneration",
           lambda: tiny_config("t5gemma2", **{
               "encoder.mm_tokens_per_image": 4, "encoder.image_token_index": IMAGE, "image_token_index": IMAGE,
               "encoder.boi_token_index": IMAGE + 1, "encoder.eoi_token_index": IMAGE + 2,
               "encoder.vision_config.image_size": 32, "encoder.vision_config.patch_size": 8,
               "decoder_start_token_id": EOS}),
           lambda cfg: {"input_ids": prompt(4, start=[IMAGE + 1], end=[IMAGE + 2]), **_pix(1, 3, 32, 32)},
           {"vision": ["model.encoder.vision_tower"], "projector": ["model.encoder.multi_modal_projector"],
            "encoder": ["model.encoder.text_model"], "llm": ("model.decoder", "lm_head")},
           4, encoder_decoder=True),
    Family("got_ocr2", "GotOcr2ForConditionalGeneration",
           lambda: tiny_config("got_ocr2", image_token_index=IMAGE, **{
               "vision_config.image_size": 64, "vision_config.patch_size": 8, "vision_config.window_size": 4,
               "vision_config.global_attn_indexes": [1], "vision_config.output_channels": 8,
               "vision_config.mlp_dim": 64}),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 64, 64)}, LLAVA_OWN, 4),
    Family("vision-encoder-decoder", "VisionEncoderDecoderModel", _vit_gpt2_config,
           lambda cfg: {**_pix(1, 3, 32, 32)},
           {"vision": ["encoder"], "llm": ("decoder", "decoder.lm_head")}, None, **BOTH),
    Family("mllama", "MllamaForConditionalGeneration",
           lambda: tiny_config("mllama", image_token_index=IMAGE, **{
               "vision_config.image_size": 32, "vision_config.patch_size": 8, "vision_config.num_global_layers": 1,
               "vision_config.attention_heads": 4, "vision_config.intermediate_layers_indices": [0],
               "vision_config.vision_output_dim": 64, "vision_config.max_num_tiles": 1,
               "vision_config.supported_aspect_ratios": [[1, 1]], "text_config.cross_attention_layers": [1]}),
           lambda cfg: {"input_ids": prompt(1), "pixel_values": torch.randn(1, 1, 1, 3, 32, 32),
                        "aspect_ratio_ids": torch.tensor([[1]]), "aspect_ratio_mask": torch.ones(1, 1, 1, dtype=torch.long),
                        "cross_attention_mask": torch.ones(1, 9, 1, 1, dtype=torch.long)},
           {"vision": ["model.vision_model"], "projector": ["model.multi_modal_projector"],
            "llm": ("model.language_model", "lm_head")}, 1),
    Family("llama4", "Llama4ForConditionalGeneration",
           lambda: tiny_config("llama4", image_token_index=IMAGE, boi_token_index=IMAGE + 1,
                               eoi_token_index=IMAGE + 2, **{
               **_VISION_32, "vision_config.vision_output_dim": 32, "vision_config.projector_input_dim": 32,
               "vision_config.intermediate_size": 128,
               "vision_config.projector_output_dim": 32, "text_config.intermediate_size_mlp": 64,
               "text_config.attention_chunk_size": 64}),
           lambda cfg: {"input_ids": prompt(4, start=[IMAGE + 1], end=[IMAGE + 2]), **_pix(1, 3, 32, 32)},
           {"vision": ["vision_model"], "projector": ["multi_modal_projector"],
            "llm": ("language_model", "language_model.lm_head")}, 4, knobs={"top_k": 1},
           fails_upstream="Llama4ForConditionalGeneration.forward reads image_outputs from the text model's "
                          "MoeCausalLMOutputWithPast (seen on transformers 5.24; 5.25 runs it)"),
    Family("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration",
           _qwen_config("qwen2_5_omni_thinker", **{"vision_config.fullatt_block_indexes": [1],
                                                   "vision_config.window_size": 16,
                                                   "audio_token_id": IMAGE + 5}),
           _qwen_inputs(), QWEN_OWN, 4),
    Family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration",
           _qwen_config("qwen3_5_moe", **{"vision_config.deepstack_visual_indexes": [],
                                          "text_config.layer_types": ["linear_attention", "full_attention"],
                                          "vision_config.num_position_embeddings": 16}),
           _qwen_inputs(), QWEN_OWN, 4, knobs={"top_k": 1, "blocks": [1]}),
    Family("blip", "BlipForConditionalGeneration",
           lambda: tiny_config("blip", **{**_VISION_32, "text_config.encoder_hidden_size": 32,
                                          "text_config.bos_token_id": BOS, "text_config.sep_token_id": EOS,
                                          "text_config.pad_token_id": PAD}),
           lambda cfg: {"input_ids": torch.tensor([[BOS, 10, 11, 12, EOS]]), **_pix(1, 3, 32, 32)},
           {"vision": ["vision_model"], "llm": ("text_decoder", "text_decoder")}, None, sets_token_ids=True, **BOTH),
    Family("paddleocr_vl", "PaddleOCRVLForConditionalGeneration",
           _qwen_config("paddleocr_vl", **{"vision_config.image_size": 32}),
           lambda cfg: {**_qwen_inputs(temporal=1)(cfg), **_pix(16, 3, 8, 8)},
           {"vision": ["model.visual"], "projector": ["model.projector"],
            "llm": ("model.language_model", "lm_head")}, 4),
    Family("video_llama_3", "VideoLlama3ForConditionalGeneration",
           _qwen_config("video_llama_3"),
           lambda cfg: {**_qwen_inputs(temporal=1)(cfg), "image_merge_sizes": torch.tensor([2])},
           {"vision": ["model.vision_model"], "projector": ["model.projector"],
            "llm": ("model.language_model", "lm_head")}, 4),
    Family("llava_next", "LlavaNextForConditionalGeneration",
           lambda: tiny_config("llava_next", image_token_index=IMAGE, image_grid_pinpoints=[[32, 32]], **_VISION_32),
           # the base image (16) and one 4x4 tile with a newline after each row (20)
           lambda cfg: {"input_ids": prompt(36), **_pix(1, 2, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
           LLAVA_OWN, 36, own4=LLAVA_OWN4, **BOTH),
    Family("chameleon", "ChameleonForConditionalGeneration", _chameleon_config,
           lambda cfg: {"input_ids": prompt(16), **_pix(1, 3, 32, 32)},
           {"vision": ["model.vqmodel.encode"], "llm": ("model.layers.0", "lm_head")}, 16, **BOTH),
    Family("florence2", "Florence2ForConditionalGeneration", _florence2_config,
           lambda cfg: {"input_ids": prompt(17), **_pix(1, 3, 32, 32)},
           {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"],
            "llm": ("model.language_model.decoder", "lm_head"), "encoder": ["model.language_model.encoder"]},
           17, encoder_decoder=True),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration",
           lambda: tiny_config("llava_onevision", image_token_index=IMAGE, image_grid_pinpoints=[[32, 32]],
                               **_VISION_32),
           # the base image (16) and one 4x4 tile with a newline after each row (20)
           lambda cfg: {"input_ids": prompt(36), **_pix(1, 2, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
           LLAVA_OWN, 36, own4=LLAVA_OWN4, **BOTH),
    Family("lfm2_vl", "Lfm2VlForConditionalGeneration",
           lambda: tiny_config("lfm2_vl", image_token_id=IMAGE, projector_hidden_size=32, **{
               "vision_config.patch_size": 8, "vision_config.num_patches": 16}),
           # one image of 4x4 patches (8x8 pixels each, flattened), downsampled 2x2 into 4 tokens
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 16, 8 * 8 * 3), "spatial_shapes": torch.tensor([[4, 4]]),
                        "pixel_attention_mask": torch.ones(1, 16, dtype=torch.long)},
           LLAVA_OWN, 4),
    Family("fuyu", "FuyuForCausalLM",
           lambda: tiny_config("fuyu", image_token_id=IMAGE, patch_size=4),
           # 9 patches of 4x4 pixels, flattened, each one image token (Fuyu has no vision tower: a linear patch embedding)
           lambda cfg: {"input_ids": prompt(9), **_pix(1, 9, 4 * 4 * 3)},
           # (4.51 takes image_patches and image_patches_indices instead: tested on 5.x)
           {"vision": ["model.vision_embed_tokens"], "llm": ("model.language_model", "lm_head")}, 9),
    Family("git", "GitForCausalLM",
           lambda: tiny_config("git", **_VISION_32),
           # the image's 16 patches and its class token are put before the prompt (no placeholders)
           lambda cfg: {"input_ids": torch.tensor([[BOS, 10, 11, 12]]), **_pix(1, 3, 32, 32)},
           {"vision": ["git.image_encoder"], "projector": ["git.visual_projection"],
            "llm": ("git.encoder.layer.0", "output")}, 17, **BOTH),
    Family("pix2struct", "Pix2StructForConditionalGeneration",
           lambda: tiny_config("pix2struct", **{
               "vision_config.patch_embed_hidden_size": 8 * 8 * 3, "vision_config.d_kv": 8,
               "vision_config.d_ff": 64, "vision_config.seq_len": 16, "text_config.d_kv": 8,
               "text_config.d_ff": 64}),
           # 16 flattened patches, each led by its (row, column), counted from 1
           lambda cfg: {"flattened_patches": torch.cat([
               torch.tensor([[r, c] for r in range(1, 5) for c in range(1, 5)], dtype=torch.float)[None],
               torch.randn(1, 16, 8 * 8 * 3)], dim=-1), "attention_mask": torch.ones(1, 16, dtype=torch.long)},
           {"vision": ["encoder"], "llm": ("decoder", "decoder.lm_head")}, None),
    Family("ovis2", "Ovis2ForConditionalGeneration",
           lambda: tiny_config("ovis2", image_token_id=IMAGE, hidden_size=32,
                               visual_indicator_token_ids=[IMAGE + 1 + i for i in range(5)], **_VISION_32),
           # 16 patches, each a probability over the visual vocabulary looked up in the embedding table;
           # the image is framed by two of the visual indicator tokens
           lambda cfg: {"input_ids": prompt(16, start=[IMAGE + 1], end=[IMAGE + 2]), **_pix(1, 3, 32, 32)},
           {"vision": ["model.vision_tower"], "projector": ["model.visual_embeddings_table"],
            "llm": ("model.language_model", "lm_head")}, 16),
    Family("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration", _minicpm_config("minicpmv4_6"),
           # one image of 8x8 patches packed in a row; merged 2x2 inside the vision tower, then 2x2 by the merger
           _minicpm_inputs(4), MINICPM_OWN, 4),
    Family("minicpmv4_7", "MiniCPMV4_7ForConditionalGeneration", _minicpm_config("minicpmv4_7"),
           _minicpm_inputs(4), MINICPM_OWN, 4),
    Family("minicpm_ocr", "MiniCPMOcrForConditionalGeneration", _minicpm_config("minicpm_ocr"),
           # "4x" downsampling: no merge inside the vision tower, 2x2 by the merger
           _minicpm_inputs(16), MINICPM_OWN, 16),
    Family("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration", _ernie_config,
           lambda cfg: {"input_ids": prompt(4, start=[IMAGE + 2], end=[IMAGE + 3]), "image_grid_thw": torch.tensor([[1, 4, 4]]),
                        **_pix(16, 3 * 8 * 8)},
           {"vision": ["model.vision_tower"], "projector": ["model.resampler_model"],
            "llm": ("model.language_model", "lm_head")}, 4, knobs={"top_k": 1, "blocks": [1]}),
    Family("qwen3_5", "Qwen3_5ForConditionalGeneration",
           _qwen_config("qwen3_5", **{"vision_config.deepstack_visual_indexes": [],
                                      "text_config.layer_types": ["linear_attention", "full_attention"],
                                      "vision_config.num_position_embeddings": 16}),
           _qwen_inputs(), QWEN_OWN, 4, knobs={"blocks": [1]}),
    Family("glm46v", "Glm46VForConditionalGeneration",
           _qwen_config("glm46v", **{"vision_config.image_size": 32}), _qwen_inputs(), QWEN_OWN, 4),
    Family("glm_ocr", "GlmOcrForConditionalGeneration",
           _qwen_config("glm_ocr", **{"vision_config.image_size": 32}), _qwen_inputs(), QWEN_OWN, 4),
    Family("qwen3_omni_moe_thinker", "Qwen3OmniMoeThinkerForConditionalGeneration",
           _qwen_config("qwen3_omni_moe_thinker", **{"vision_config.deepstack_visual_indexes": [0],
                                                     "vision_config.num_position_embeddings": 16,
                                                     "audio_token_id": IMAGE + 5}),
           _qwen_inputs(), QWEN_OWN, 4),
    Family("llava_next_video", "LlavaNextVideoForConditionalGeneration",
           lambda: tiny_config("llava_next_video", image_token_index=IMAGE, video_token_index=IMAGE + 1,
                               image_grid_pinpoints=[[32, 32]], **_VISION_32),
           lambda cfg: {"input_ids": prompt(36), **_pix(1, 2, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
           # the video resampler only runs on videos: an image request never calls it
           {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector", "model.vision_resampler"],
            "llm": ("model.language_model", "lm_head")}, 36),
    Family("instructblipvideo", "InstructBlipVideoForConditionalGeneration",
           lambda: tiny_config("instructblipvideo", video_token_index=IMAGE, num_query_tokens=4, **{
               **_VISION_32, "qformer_config.encoder_hidden_size": 32}),
           # a video of 2 frames: 4 query tokens per frame
           lambda cfg: {"input_ids": prompt(8), "pixel_values": torch.randn(1, 2, 3, 32, 32),
                        "qformer_input_ids": torch.tensor([[BOS, 10, 11]])},
           BLIP2_OWN, 8, **BOTH),
    Family("granite_docling", "GraniteDoclingForConditionalGeneration",
           lambda: tiny_config("granite_docling", image_token_id=IMAGE, scale_factor=2, **_VISION_32),
           # one tile, marked real by a (batch, tiles) mask; the connector runs inside the vision model
           # (its connector shuffles 4x4 patches into one token: 16 patches, 1 image token)
           lambda cfg: {"input_ids": prompt(1), **_pix(1, 1, 3, 32, 32),
                        "pixel_attention_mask": torch.ones(1, 1, dtype=torch.bool)},
           {"vision": ["model.vision_model"], "projector": "inside:model.vision_model.connector",
                                "llm": ("model.text_model", "lm_head")}, 1),
    Family("exaone4_5", "Exaone4_5_ForConditionalGeneration", _qwen_config("exaone4_5"), _qwen_inputs(), QWEN_OWN, 4),
    Family("glm5_next", "Glm5NextForConditionalGeneration",
           _qwen_config("glm5_next", **{"vision_config.image_size": 32, "text_config.kv_lora_rank": 16,
                                        "text_config.q_lora_rank": 16, "text_config.v_head_dim": 8,
                                        "text_config.index_head_dim": 8, "text_config.linear_head_dim": 8}),
           _qwen_inputs(), QWEN_OWN, 4),
    Family("cosmos3_omni", "Cosmos3OmniForConditionalGeneration",
           _qwen_config("cosmos3_omni", **{"vision_config.deepstack_visual_indexes": [],
                                           "vision_config.num_position_embeddings": 16}), _qwen_inputs(), QWEN_OWN, 4),
    Family("step3p7", "Step3p7ForConditionalGeneration",
           lambda: tiny_config("step3p7", image_token_id=IMAGE, **{**_VISION_32, "text_config.sliding_window": 64}),
           # its projector pools the 4x4 patches into 1 token
           lambda cfg: {"input_ids": prompt(1), **_pix(1, 3, 32, 32)},
           {"vision": ["model.vision_model"], "projector": ["model.multi_modal_projector"],
            "llm": ("model.language_model", "lm_head")}, 1),
    Family("aria", "AriaForConditionalGeneration",
           lambda: tiny_config("aria", image_token_index=IMAGE, image_token_id=IMAGE,
                               projector_patch_to_query_dict={16: 4}, **_VISION_32),
           # the projector's cross-attention turns 16 patches into 4 queries
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 4),
    # need a package this machine cannot load: their vision towers are timm models (TimmWrapperModel)
    *[Family(name, cls, _unbuildable, _unbuildable, {}, None,
             skip=f"{cls} needs timm (its vision tower is a TimmWrapperModel); timm is not installed here")
      for name, cls in (("fast_vlm", "FastVlmForConditionalGeneration"), ("gemma3n", "Gemma3nForConditionalGeneration"),
                        ("perception_lm", "PerceptionLMForConditionalGeneration"))],
    Family("emu3", "Emu3ForConditionalGeneration", _emu3_config,
           # an 8x8 image: 4x4 codes, each row ended by an end-of-line token (4 x 5 = 20 image tokens)
           lambda cfg: {"input_ids": prompt(20), **_pix(1, 3, 8, 8), "image_sizes": torch.tensor([[8, 8]])},
           {"vision": ["model.vqmodel.encode"], "llm": ("model.text_model", "lm_head")}, 20),
    Family("gemma4", "Gemma4ForConditionalGeneration",
           lambda: tiny_config("gemma4", init={"vision_config": {}}, image_token_id=IMAGE, boi_token_id=IMAGE + 1, eoi_token_id=IMAGE + 2,
                               video_token_id=IMAGE + 3, boa_token_id=IMAGE + 4, eoa_token_index=IMAGE + 5,
                               audio_token_id=IMAGE + 6, **{
                                   "vision_config.patch_size": 8, "vision_config.pooling_kernel_size": 3,
                                   "vision_config.position_embedding_size": 64, "text_config.num_kv_shared_layers": 0,
                                   "text_config.layer_types": ["sliding_attention", "full_attention"],
                                   "text_config.vocab_size_per_layer_input": VOCAB,
                                   "text_config.hidden_size_per_layer_input": 8}),
           # a 6x6 grid of 8x8 patches, pooled 3x3 into 4 image tokens
           lambda cfg: {"input_ids": prompt(4, start=[IMAGE + 1], end=[IMAGE + 2]), **_pix(1, 36, 3 * 8 * 8),
                        "image_position_ids": torch.tensor([[[x, y] for y in range(6) for x in range(6)]])},
           {"vision": ["model.vision_tower"], "projector": ["model.embed_vision"],
            "llm": ("model.language_model", "lm_head")}, 4),
    Family("gemma4_unified", "Gemma4UnifiedForConditionalGeneration",
           lambda: tiny_config("gemma4_unified", init={"vision_config": {}}, image_token_id=IMAGE, **{
               "vision_config.patch_size": 4, "vision_config.pooling_kernel_size": 2, "text_config.num_kv_shared_layers": 0,
               "text_config.layer_types": ["sliding_attention", "full_attention"],
               "text_config.vocab_size_per_layer_input": VOCAB, "text_config.hidden_size_per_layer_input": 8}),
           # no vision tower: a patch embedder puts each of the 2x2 patches in the text space (4 image tokens)
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 4, 3 * 8 * 8),
                        "image_position_ids": torch.tensor([[[0, 0], [1, 0], [0, 1], [1, 1]]])},
           {"vision": ["model.embed_vision"], "llm": ("model.language_model", "lm_head")}, 4),
    Family("hyperclovax_vision_v2", "HyperCLOVAXVisionV2ForConditionalGeneration",
           _qwen_config("hyperclovax_vision_v2", **{"vision_config.image_size": 32}), _qwen_inputs(),
           {"vision": ["model.vision_model"], "projector": ["model.projector"],
            "llm": ("model.language_model", "lm_head")}, 4),
    Family("cosmos3_edge", "Cosmos3EdgeForConditionalGeneration",
           _qwen_config("cosmos3_edge", **{"vision_config.image_size": 32}),
           # image positions marked by type ids (1: image) as its processor returns them
           lambda cfg: {**_qwen_inputs(temporal=1)(cfg), "mm_token_type_ids": (prompt(4) == IMAGE).int()},
           {"vision": ["model.visual"], "projector": ["model.projector"],
            "llm": ("model.language_model", "lm_head")}, 4),
    Family("idefics", "IdeficsForVisionText2Text",
           lambda: tiny_config("idefics", **_VISION_32),
           # gated cross-attention to one image (no image placeholders in the sequence)
           lambda cfg: {"input_ids": prompt(0), **_pix(1, 1, 3, 32, 32),
                        "image_attention_mask": torch.ones(1, 8, 1, dtype=torch.long)},
           {"vision": ["model.vision_model"], "llm": ("model.layers.0", "lm_head")}, None),
    Family("kosmos-2.5", "Kosmos2_5ForConditionalGeneration",
           lambda: tiny_config("kosmos-2.5", latent_query_num=4, **{
               "text_config.layers": 2, "text_config.attention_heads": 4, "text_config.embed_dim": 32,
               "text_config.ffn_dim": 64, "vision_config.patch_embed_hidden_size": 8 * 8 * 3,
               "vision_config.head_dim": 8, "vision_config.max_num_patches": 16}),
           # 16 flattened patches led by (row, column); 4 latent queries marked by a position mask
           lambda cfg: {"input_ids": prompt(4, image_id=IMAGE), "flattened_patches": torch.cat([
               torch.tensor([[r, c] for r in range(1, 5) for c in range(1, 5)], dtype=torch.float)[None],
               torch.randn(1, 16, 8 * 8 * 3)], dim=-1), "attention_mask": torch.ones(1, 12, dtype=torch.long),
                        "image_embeds_position_mask": (prompt(4, image_id=IMAGE) == IMAGE)},
           {"vision": ["vision_model"], "projector": ["image_to_text_projection"],
            "llm": ("text_model", "text_model.lm_head")}, 4),
    Family("qianfan_ocr", "QianfanOCRForConditionalGeneration",
           lambda: tiny_config("qianfan_ocr", image_token_id=IMAGE, **{
               "vision_config.image_size": [32, 32], "vision_config.patch_size": [8, 8]}),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 4),
    Family("apertus1p5", "Apertus1p5ForConditionalGeneration",
           lambda: tiny_config("apertus1p5", image_token_id=IMAGE, image_token_offset=110, **{
               "vision_config.codebook_size": 16, "vision_config.embed_dim": 4, "vision_config.latent_channels": 4,
               "vision_config.base_channels": 32, "vision_config.channel_multiplier": [1, 1],
               "vision_config.num_res_blocks": 1, "vision_config.attn_resolutions": [], "vision_config.resolution": 8}),
           # an image tokenizer called through encode(): an 8x8 image, 4x4 codes (the BPE tokens 110 + code)
           lambda cfg: {"input_ids": prompt(16), **_pix(1, 3, 8, 8), "image_sizes": torch.tensor([[8, 8]])},
           {"vision": ["model.vision_tokenizer.encode"], "llm": ("model.language_model", "lm_head")}, 16),
    Family("pp_formulanet", "PPFormulaNetForConditionalGeneration",
           lambda: tiny_config("pp_formulanet", **{"vision_config.image_size": 64, "vision_config.patch_size": 8,
                                                   "vision_config.window_size": 4, "vision_config.global_attn_indexes": [1],
                                                   "vision_config.output_channels": 8, "vision_config.mlp_dim": 64,
                                                   "vision_config.post_conv_in_channels": 8,
                                                   "vision_config.post_conv_mid_channels": 16,
                                                   "vision_config.post_conv_out_channels": 32,
                                                   "vision_config.decoder_hidden_size": 32}),
           lambda cfg: {**_pix(1, 3, 64, 64)},
           {"vision": ["model.encoder"], "projector": "inside:model.encoder.multi_modal_projector",
            "llm": ("model.decoder", "lm_head")}, None),
    Family("nemotron_h_omni", "NemotronH_Omni_Reasoning_V3",
           lambda: tiny_config("nemotron_h_omni", image_token_id=IMAGE, video_token_id=IMAGE + 1, audio_token_id=IMAGE + 2,
                               vision_hidden_size=32, projector_hidden_size=32),
           # 4x4 patches of 16x16 pixels, flattened; pixel-shuffled 2x2 into 4 image tokens
           lambda cfg: {"input_ids": prompt(4), **_pix(16, 3 * 16 * 16), "image_grid_hw": torch.tensor([[4, 4]])},
           {"vision": ["vision_model"], "projector": ["multi_modal_projector"],
            "llm": ("language_model", "language_model")}, 4),
    Family("lfm3_vl", "Lfm3VlForConditionalGeneration",
           _qwen_config("lfm3_vl", **{"vision_config.image_size": 32,
                                      "text_config.layer_types": ["conv", "full_attention"]}),
           _qwen_inputs(), LLAVA_OWN, 4),
    # a vision adapter (4 merged patches: 4 x 32 wide) and a projection after it: two projector parts
    *[Family(name, cls, _qwen_config(name, projector_hidden_size=32, out_hidden_size=128,
                                     **{"vision_config.image_size": 32}),
             _qwen_inputs(), {"vision": ["model.vision_tower"], "projector": ["model.vision_adapter", "model.vision_projection"],
                              "llm": ("model.language_model", "lm_head")}, 4)
      for name, cls in (("muse_glimmer", "MuseGlimmerForConditionalGeneration"),
                        ("muse_spark", "MuseSparkForConditionalGeneration"))],
    Family("minimax_m3_vl", "MiniMaxM3SparseForConditionalGeneration",
           _qwen_config("minimax_m3_vl", projector_hidden_size=32, merged_hidden_size=128, **{
               "vision_config.image_size": 32, "text_config.dense_intermediate_size": 64,
               "text_config.shared_intermediate_size": 32, "text_config.index_block_size": 4}),
           _qwen_inputs(), LLAVA_OWN, 4, knobs={"top_k": 1, "blocks": [1]}),
    Family("cohere_compass", "CohereCompassForConditionalGeneration",
           lambda: tiny_config("cohere_compass", image_token_id=IMAGE, **{
               "vision_config.patch_size": 8, "vision_config.image_size": 32, "vision_config.spatial_merge_size": 2,
               "vision_config.temporal_patch_size": 2, "text_config.layer_types": ["sliding_attention", "full_attention"],
               "text_config.rope_parameters": {kind: {"rope_type": "default", "rope_theta": 10000.0}
                                               for kind in ("sliding_attention", "full_attention")}}),
           _qwen_inputs(), QWEN_OWN, 4),
    # --- fam-a (2026-12-07) ---
    # DeepSeek-OCR-2: SAM (16x16 image, 8x8 patches downsampled 4x) then a Qwen2 encoder whose 144 learned
    # queries (the 768-pixel set) are the image's tokens, and one view separator: 145 image tokens
    Family("deepseek_ocr2", "DeepseekOcr2ForConditionalGeneration",
           _sam_ocr_config("deepseek_ocr2", {"hidden_size": 32, "image_size": 16, "patch_size": 2},
                           {"hidden_size": 32, "num_key_value_heads": 4}),
           lambda cfg: {"input_ids": prompt(145), **_pix(1, 3, 16, 16)}, LLAVA_OWN, 145),
    # Unlimited-OCR: SAM (32x32 image, 8x8 patches downsampled 4x to 2x2) then CLIP over them; each of the
    # 2 rows ends in a newline, then a view separator: 2 x 3 + 1 = 7 image tokens
    Family("unlimited_ocr", "UnlimitedOcrForConditionalGeneration",
           _sam_ocr_config("unlimited_ocr", {"image_size": 32, "patch_size": 4}, {"image_size": 16, "patch_size": 8}),
           lambda cfg: {"input_ids": prompt(7), **_pix(1, 3, 32, 32)}, LLAVA_OWN, 7),
    # Granite 4 Vision: no single projector; one window Q-Former per deepstack layer and 4 spatial ones, each a
    # projector instance. LLaVA-NeXT tiling: the base view and one 32x32 tile; 4x4 patches downsampled to 2x2:
    # 4 base + 4 tile + 2 row newlines = 10 image tokens
    Family("granite4_vision", "Granite4VisionForConditionalGeneration", _granite4_vision_config,
           lambda cfg: {"input_ids": prompt(10), **_pix(1, 2, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
           {"vision": ["model.vision_tower"],
            "projector": ["model.layerwise_projectors.0", *(f"model.spatial_projectors.{i}" for i in range(4))],
            "llm": ("model.language_model", "lm_head")}, 10),
    # HunYuan-VL: the patch merger (inside the vision tower) merges 2x2: 2 rows of 2 tokens and a newline each,
    # between a begin and an end token: 8 image tokens
    Family("hunyuan_vl", "HunYuanVLForConditionalGeneration", _hunyuan_vl_config, _grid_inputs(8, type_ids=True),
           {"vision": ["model.vision_tower"], "projector": "inside:model.vision_tower.patch_merger",
            "llm": ("model.language_model", "lm_head")}, 8),
    # HY-V4-VL: the same merger with no begin/end tokens: 2 rows of 2 tokens and a newline each
    Family("hy_v4_vl", "HYV4VLForConditionalGeneration", _hy_v4_vl_config, _grid_inputs(6, type_ids=True),
           {"vision": ["model.vision_tower"], "projector": "inside:model.vision_tower.patch_merger",
            "llm": ("model.language_model", "lm_head")}, 6),
    # Kimi K2.5: the vision tower pools 2x2 patches; its projector is `mm_projector` (DeepSeek-V3 text model)
    Family("kimi_k25", "Kimi_K25ForConditionalGeneration",
           lambda: tiny_config("kimi_k25", image_token_id=IMAGE, video_token_id=IMAGE + 1, vision_start_token_id=IMAGE + 2,
                               vision_end_token_id=IMAGE + 3, projection_hidden_size=32, **{
                                   "vision_config.patch_size": 8, "vision_config.pos_emb_height": 4,
                                   "vision_config.pos_emb_width": 4, "text_config.q_lora_rank": 16,
                                   "text_config.kv_lora_rank": 16, "text_config.qk_nope_head_dim": 8,
                                   "text_config.qk_rope_head_dim": 8, "text_config.v_head_dim": 8,
                                   "text_config.n_group": 1, "text_config.topk_group": 1,
                                   "text_config.first_k_dense_replace": 1, "text_config.num_key_value_heads": 4}),
           _grid_inputs(4, flat=False),
           {"vision": ["model.vision_tower"], "projector": ["model.mm_projector"],
            "llm": ("model.language_model", "lm_head")}, 4),
    # Mistral Large 4: Pixtral and Mistral 3's projector (patch merger inside it: 4x4 patches into 4 tokens)
    Family("mistral_large4", "MistralLarge4ForConditionalGeneration",
           lambda: tiny_config("mistral_large4", init={"text_config": {
               "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
               "qk_nope_head_dim": 8, "v_head_dim": 8, "index_topk": 8, "index_head_dim": 8, "index_n_heads": 2}},
               image_token_index=IMAGE, spatial_merge_size=2, **{**_VISION_32, "text_config.num_key_value_heads": 4}),
           lambda cfg: {"input_ids": prompt(4), **_pix(1, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
           LLAVA_OWN, 4),
    # dots3 note: the merger (2x2) runs inside the vision tower; an audio tower beside it is not vision
    Family("dots3_note", "Dots3NoteForConditionalGeneration", _dots3_note_config, _grid_inputs(4),
           {"vision": ["model.vision_tower"], "projector": "inside:model.vision_tower.merger",
            "llm": ("model.language_model", "lm_head")}, 4),
    # --- end fam-a ---

    # --- fam-b (2026-12-07) ---
    Family("llava_onevision1_5", "LlavaOnevision15ForConditionalGeneration",
           lambda: tiny_config("llava_onevision1_5", image_token_id=IMAGE, video_token_id=IMAGE + 1,
                               vision_start_token_id=IMAGE + 2, vision_end_token_id=IMAGE + 3,
                               **{"vision_config.patch_size": 8, "vision_config.spatial_merge_size": 2}),
           # 4x4 patches of 8x8 pixels (one frame: no temporal patch), merged 2x2 by the merger
           # inside the vision model (model.visual.merger) into 4 image tokens
           _qwen_inputs(temporal=1), QWEN_OWN, 4),
    Family("ovis2_5", "Ovis2_5ForConditionalGeneration",
           lambda: tiny_config("ovis2_5", image_token_id=IMAGE, video_token_id=IMAGE + 1, image_start_token_id=IMAGE + 2,
                               image_end_token_id=IMAGE + 3, video_start_token_id=IMAGE + 4,
                               video_end_token_id=IMAGE + 5, **{**_VISION_32, "vision_config.window_size": 16,
                                                                "vision_config.layer_types": ["full_attention"] * 2}),
           # 4x4 patches of 8x8 pixels; the projector's visual tokenizer merges 2x2 of them into each of
           # 4 image tokens (a probability over the visual vocabulary, looked up in its embedding table);
           # the image is framed by its start and end tokens, replaced by learned indicator embeddings
           lambda cfg: {**_qwen_inputs(temporal=1)(cfg), "input_ids": prompt(4, start=[IMAGE + 2], end=[IMAGE + 3])},
           LLAVA_OWN, 4),
    Family("inkling_mm_model", "InklingForConditionalGeneration",
           lambda: tiny_config("inkling_mm_model", init={
               "text_config": {"num_hidden_layers": 2, "layer_types": ["hybrid_sliding", "hybrid"],
                               "mlp_layer_types": ["dense", "sparse"], "n_routed_experts": 4,
                               "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8,
                               "sliding_window_size": 16, "rel_extent": 32, "d_rel": 4},
               "vision_config": {"patch_size": 4, "temporal_patch_size": 2}},
               image_token_id=IMAGE, image_bos_token_id=IMAGE + 1, audio_token_id=IMAGE + 2,
               audio_bos_token_id=IMAGE + 3, **{"vision_config.text_hidden_size": 32,
                                                "audio_config.text_hidden_size": 32}),
           # 4 patches of 2 frames x 4x4 pixels (patch, frame, row, column, channel), one image token each;
           # the vision tower is a stack of per-patch linear layers, the last one projecting into the
           # text width: no projector module of its own (the test expects the warning)
           lambda cfg: {"input_ids": prompt(4, start=[IMAGE + 1]), "pixel_values": torch.randn(4, 2, 4, 4, 3)},
           {"vision": ["model.vision_tower"], "llm": ("model.language_model", "lm_head")}, 4),
    Family("inkling2", "Inkling2ForConditionalGeneration", _inkling2_config("inkling2"), _inkling2_inputs,
           INKLING2_OWN, 4),
    # the same vision model; its text model runs the looped layer 1 twice (2 passes, the second
    # fed messages from the first)
    Family("inkling2_loop", "Inkling2LoopForConditionalGeneration",
           _inkling2_config("inkling2_loop", loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2,
                            loop_gate_rank=4), _inkling2_inputs, INKLING2_OWN, 4),
    # Qwen-style vision with its merger inside; a hybrid text model (gated delta net, then attention whose
    # tokens an indexer selects), so the indexer needs its own tiny sizes
    Family("qwen4_exp", "Qwen4ExpForConditionalGeneration",
           _qwen_config("qwen4_exp", **{
               "vision_config.num_position_embeddings": 16,
               "text_config.layer_types": ["linear_attention", "indexed_attention"],
               "text_config.linear_key_head_dim": 8, "text_config.linear_value_head_dim": 8,
               "text_config.linear_num_key_heads": 2, "text_config.linear_num_value_heads": 4,
               "text_config.hc_lowrank": 8, "text_config.indexer_n_heads": 2, "text_config.indexer_kv_heads": 1,
               "text_config.indexer_head_dim": 8, "text_config.indexer_budget": 8,
               "text_config.indexer_compress_ratio": 4}),
           _qwen_inputs(), QWEN_OWN, 4),
]


def by_name(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)
