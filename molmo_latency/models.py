"""Reference vision-language models, randomly initialised from configs (no weights, ever).

The reference VLM is MolmoE-shaped and built from transformers classes: a SigLIP vision tower,
an AyaVision projector (2x2 pixel-shuffle pooling, then an MLP: the same 4x token reduction as
Molmo's 2x2 attention pooling) and an OLMoE mixture-of-experts text model. It has the three
adaptive-inference knobs of MolmoE: image crops, MoE top-k and active transformer blocks.

Example:
    >>> from molmo_latency.models import reference_vlm
    >>> ref = reference_vlm("tiny")
    >>> out = ref.model.generate(**ref.inputs(crops=2, prompt_tokens=8), max_new_tokens=4, min_new_tokens=4)
    >>> out.shape[1] - ref.inputs(crops=2, prompt_tokens=8)["input_ids"].shape[1]
    4
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from molmo_latency.errors import MolmoLatencyError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_FIRST_TEXT_ID = 3  # prompt tokens are drawn from [_FIRST_TEXT_ID, image_token_id)


@dataclass(frozen=True)
class Preset:
    """Dimensions of a reference model."""

    name: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    experts: int
    top_k: int
    expert_intermediate: int
    vocab_size: int
    max_positions: int
    downsample: int = 2
    description: str = ""

    @property
    def tokens_per_crop(self) -> int:
        patches = (self.image_size // self.patch_size) ** 2
        return patches // (self.downsample**2)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        image_size=112, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2,
        vision_intermediate=64, text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=4,
        experts=8, top_k=2, expert_intermediate=64, vocab_size=512, max_positions=4096,
        description="a few MB; generate() of 8 tokens in tens of ms on a 2-core CPU (tests, CI, demo)",
    ),
    "molmoe-1b-shape": Preset(
        # MolmoE-1B: OLMoE-1B-7B text model (16 layers, d_model 2048, 64 experts, top-8, expert
        # FFN 1024), ViT-L/14 at 336 px (576 patches -> 144 tokens per crop after 2x2 pooling).
        name="molmoe-1b-shape",
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=23, vision_heads=16,
        vision_intermediate=4096, text_hidden=2048, text_layers=16, text_heads=16, text_kv_heads=16,
        experts=64, top_k=8, expert_intermediate=1024, vocab_size=50304, max_positions=4096,
        description="MolmoE-1B dimensions (about 7B parameters); for GPU runs in bf16",
    ),
}


@dataclass
class ReferenceVLM:
    """A reference model and the inputs builder for its knobs."""

    model: torch.nn.Module
    preset: Preset
    seed: int
    image_token_id: int
    _generator: torch.Generator = field(repr=False, default_factory=torch.Generator)

    @property
    def tokens_per_crop(self) -> int:
        return self.preset.tokens_per_crop

    def inputs(self, crops: int = 1, prompt_tokens: int = 32, batch_size: int = 1) -> dict[str, Any]:
        """The model inputs of one request: `crops` image crops and `prompt_tokens` text tokens.

        The sequence is BOS, `crops * tokens_per_crop` image placeholders, then the prompt.
        Inputs only, as Hugging Face processors return them: generation settings are the
        caller's (see :meth:`generation_kwargs`), so ``model.generate(**ref.inputs(crops=1),
        max_new_tokens=16)`` works. Deterministic for a given (seed, crops, prompt_tokens,
        batch_size).
        """
        for name, value, low in (("crops", crops, 0), ("prompt_tokens", prompt_tokens, 0),
                                 ("batch_size", batch_size, 1)):
            _check_int(name, value, low)
        p = self.preset
        image_len = crops * self.tokens_per_crop
        total = 1 + image_len + prompt_tokens
        if total >= p.max_positions:
            raise MolmoLatencyError(
                f"inputs(): {total} input tokens exceed the model's {p.max_positions} positions; "
                "use fewer crops or prompt tokens"
            )
        gen = torch.Generator().manual_seed(hash((self.seed, crops, prompt_tokens, batch_size)) % 2**31)
        text = torch.randint(_FIRST_TEXT_ID, self.image_token_id, (batch_size, prompt_tokens), generator=gen)
        ids = torch.cat(
            [
                torch.full((batch_size, 1), BOS_ID),
                torch.full((batch_size, image_len), self.image_token_id),
                text,
            ],
            dim=1,
        )
        param = next(self.model.parameters())
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(param.device),
            "attention_mask": torch.ones_like(ids, device=param.device),
        }
        if crops:
            pixels = torch.randn(batch_size * crops, 3, p.image_size, p.image_size, generator=gen)
            kwargs["pixel_values"] = pixels.to(device=param.device, dtype=param.dtype)
        return kwargs

    def generation_kwargs(self, new_tokens: int = 8, *, free_generation: bool = False) -> dict[str, Any]:
        """generate() settings: greedy, `new_tokens` tokens (exactly that many unless
        `free_generation`, which lets EOS stop earlier), the model's pad and EOS ids."""
        _check_int("new_tokens", new_tokens, 1)
        kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": False,
                                  "pad_token_id": PAD_ID, "eos_token_id": EOS_ID}
        if not free_generation:
            kwargs["min_new_tokens"] = new_tokens
        return kwargs

    def request(self, crops: int = 1, prompt_tokens: int = 32, batch_size: int = 1, new_tokens: int = 8,
                *, free_generation: bool = False) -> dict[str, Any]:
        """Everything one generate() call needs: :meth:`inputs` and :meth:`generation_kwargs`.

        Example:
            >>> ref = reference_vlm("tiny")
            >>> out = ref.model.generate(**ref.request(crops=1, prompt_tokens=4, new_tokens=3))
            >>> out.shape[1] - ref.inputs(crops=1, prompt_tokens=4)["input_ids"].shape[1]
            3
        """
        p = self.preset
        total = 1 + crops * self.tokens_per_crop + prompt_tokens if isinstance(crops, int) else 0
        if isinstance(new_tokens, int) and isinstance(prompt_tokens, int) and total + new_tokens > p.max_positions:
            raise MolmoLatencyError(
                f"request(): {total} input + {new_tokens} new tokens exceed the model's "
                f"{p.max_positions} positions; use fewer crops, prompt or new tokens"
            )
        return {**self.inputs(crops, prompt_tokens, batch_size),
                **self.generation_kwargs(new_tokens, free_generation=free_generation)}


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise MolmoLatencyError(f"{name} must be an integer >= {low}, got {value!r}")


def reference_config(preset: str = "tiny"):
    """The transformers config of a reference preset (AyaVision: SigLIP + OLMoE)."""
    from molmo_latency.transformers_lines import check_version

    check_version()  # an unsupported line: one line naming it and the range, not a traceback
    from transformers import AyaVisionConfig, OlmoeConfig, SiglipVisionConfig

    p = _preset(preset)
    vision = SiglipVisionConfig(
        hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
        num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
        image_size=p.image_size, patch_size=p.patch_size, vision_use_head=False,
    )
    text = OlmoeConfig(
        vocab_size=p.vocab_size, hidden_size=p.text_hidden, intermediate_size=p.expert_intermediate,
        num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
        num_key_value_heads=p.text_kv_heads, num_experts=p.experts, num_experts_per_tok=p.top_k,
        max_position_embeddings=p.max_positions, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    cfg = AyaVisionConfig(
        vision_config=vision, text_config=text, downsample_factor=p.downsample,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_token_index=p.vocab_size - 1, tie_word_embeddings=False,
    )
    cfg.image_token_id = p.vocab_size - 1
    cfg.alignment_intermediate_size = p.text_hidden
    # AyaVision's text model is Cohere2, whose logits are scaled; from transformers 5.25 its forward
    # reads text_config.logit_scale, which OLMoE's config lacks. 1.0 leaves the logits exactly as
    # they are on the lines that do not scale.
    cfg.text_config.logit_scale = 1.0
    for c in (cfg, cfg.text_config):
        c.pad_token_id, c.bos_token_id, c.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    return cfg


def reference_vlm(
    preset: str = "tiny",
    seed: int = 0,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ReferenceVLM:
    """Build a randomly initialised MolmoE-like VLM (no download) in eval mode.

    Example:
        >>> ref = reference_vlm("tiny", seed=0)
        >>> ref.tokens_per_crop
        16
        >>> sorted(ref.inputs(crops=1))
        ['attention_mask', 'input_ids', 'pixel_values']
    """
    from transformers import AyaVisionForConditionalGeneration

    p = _preset(preset)
    cfg = reference_config(preset)
    cpu_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if device is not None and torch.device(device).type == "cuda":
            with torch.device(device):
                model = AyaVisionForConditionalGeneration(cfg)
        else:
            model = AyaVisionForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(cpu_state)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return ReferenceVLM(model=model, preset=p, seed=seed, image_token_id=cfg.image_token_id)


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise MolmoLatencyError(
            f"unknown reference preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


# ------------------------------------------------------------- inputs for a loaded HF VLM
def molmo2_inputs(model: torch.nn.Module, *, crops: int = 1, prompt_tokens: int = 16, batch_size: int = 1,
                  seed: int = 0) -> dict[str, Any]:
    """generate() inputs for a transformers Molmo2 model built from its config alone (no processor
    files): each row one image of `crops` crops, each crop's patches pooled 2x2 into image tokens
    (as Molmo2's processor pools them), between the image start and end ids, then random text.

    Example (transformers 5.x, where Molmo2 is native; tests/test_vlm_knobs.py runs it)::

        model = Molmo2ForConditionalGeneration(config)   # 4x4 patches of 8x8 pixels per crop
        kw = molmo2_inputs(model, crops=2, prompt_tokens=4)
        # 8 image tokens per row (2 crops x 2x2 pooled), pixel_values of shape (2, 16, 192)
        model.generate(**kw, max_new_tokens=4)
    """
    cfg = model.config
    _check_int("crops", crops, 1)
    _check_int("prompt_tokens", prompt_tokens, 0)
    _check_int("batch_size", batch_size, 1)
    vision = cfg.vision_config
    size = vision.image_size if isinstance(vision.image_size, (list, tuple)) else [vision.image_size] * 2
    rows, cols = size[0] // vision.patch_size, size[1] // vision.patch_size
    pool = 2 if rows % 2 == 0 and cols % 2 == 0 else 1
    out_rows, out_cols = rows // pool, cols // pool
    patches = rows * cols
    # Up to transformers 5.24 the pooling indices address the patches of all images at once; from
    # 5.25 each image's indices address its own patches, and the model adds each image's offset
    # (its get_image_features takes the crops per image to do so).
    import inspect

    per_image_indices = "image_num_crops" in inspect.signature(model.get_image_features).parameters
    pooling = []
    for crop in range(batch_size * crops):
        first = (crop % crops if per_image_indices else crop) * patches
        for r in range(out_rows):
            for c in range(out_cols):
                pooling.append([first + (r * pool + i) * cols + c * pool + j
                                for i in range(pool) for j in range(pool)])
    per_image = crops * out_rows * out_cols
    gen = torch.Generator().manual_seed(seed * 1_000_003 + crops * 1009 + prompt_tokens)
    text_cfg = cfg.get_text_config()
    special = [cfg.image_token_id, cfg.image_start_token_id, cfg.image_end_token_id]
    high = max(_FIRST_TEXT_ID + 1, min([text_cfg.vocab_size, *[s for s in special if s > _FIRST_TEXT_ID]]))
    text = torch.randint(_FIRST_TEXT_ID, high, (batch_size, prompt_tokens), generator=gen)
    bos = getattr(text_cfg, "bos_token_id", None)
    bos = bos if isinstance(bos, int) else BOS_ID
    ids = torch.cat([torch.full((batch_size, 1), bos), torch.full((batch_size, 1), cfg.image_start_token_id),
                     torch.full((batch_size, per_image), cfg.image_token_id),
                     torch.full((batch_size, 1), cfg.image_end_token_id), text], dim=1)
    param = next(model.parameters())
    pixels = torch.randn(batch_size * crops, patches, vision.patch_size ** 2 * vision.num_channels, generator=gen)
    return {"input_ids": ids.to(param.device), "attention_mask": torch.ones_like(ids, device=param.device),
            "pixel_values": pixels.to(param.device, param.dtype),
            "image_token_pooling": torch.tensor(pooling, device=param.device),
            "image_grids": torch.tensor([[crops * out_rows, out_cols, 0, 0]] * batch_size, device=param.device),
            "image_num_crops": torch.tensor([crops] * batch_size, device=param.device)}
