"""Model sources: what the sweep profiles, and how a configuration becomes generate() inputs.

- :class:`ReferenceSource`: a reference preset (`tiny`, `molmoe-1b-shape`), random weights.
- :class:`LocalHFSource`: a local Hugging Face model directory (nothing is downloaded;
  `trust_remote_code` for Molmo). A directory saved from a LLaVA-style model (e.g.
  ``reference_vlm(...).model.save_pretrained(dir)``) gets synthetic inputs built from its config
  (image size, patch size, pooling, image token); a MolmoE checkpoint directory (its own model
  code, ``auto_map``) gets synthetic ``images`` / ``image_masks`` / ``image_input_idx`` for
  `crops` crops built from its config, and a ``GenerationConfig`` as its generate() expects; any
  other model needs its processor: inputs are then built by the processor from a synthetic image
  with ``max_crops=crops``.

Every source hands out model inputs (:meth:`ModelSource.inputs`) and generation settings
(:meth:`ModelSource.generation_kwargs`) separately, and runs generate() inside
:meth:`ModelSource.generation_context`: ``torch.inference_mode()``, plus
``torch.autocast(device, bf16)`` for a model whose config asks for automatic mixed precision
(MolmoE: ``precision = "amp_bf16"``) when ``--dtype bf16`` is given: the path MolmoE's users run.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import torch

from molmo_latency import knobs
from molmo_latency.errors import MolmoLatencyError, SweepError
from molmo_latency.sweep.spec import Config
from molmo_latency.transformers_lines import check_version, dtype_kwargs

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise SweepError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32") from None


class ModelSource:
    """A loaded model plus an inputs builder for sweep configurations."""

    name: str
    model: torch.nn.Module
    autocast_dtype: torch.dtype | None = None  # generate() under torch.autocast in this dtype

    def inputs(self, config: Config) -> dict[str, Any]:
        """The model inputs of one request of `config` (no generation settings)."""
        raise NotImplementedError

    def generation_kwargs(self, config: Config, *, free_generation: bool = False) -> dict[str, Any]:
        """generate() settings: greedy, exactly `new_tokens` tokens unless `free_generation`."""
        gen = getattr(self.model, "generation_config", None)
        pad = getattr(gen, "pad_token_id", None)
        eos = getattr(gen, "eos_token_id", None)
        kw: dict[str, Any] = {"max_new_tokens": config.new_tokens, "do_sample": False}
        if pad is not None or eos is not None:
            kw["pad_token_id"] = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
        if not free_generation:
            kw["min_new_tokens"] = config.new_tokens
        return kw

    @contextlib.contextmanager
    def generation_context(self):
        """inference_mode, and autocast where the model runs in mixed precision."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.autocast_dtype is not None:
                device = next(self.model.parameters()).device.type
                stack.enter_context(torch.autocast(device, dtype=self.autocast_dtype))
            yield

    @contextlib.contextmanager
    def configured(self, config: Config):
        with knobs.configured(self.model, top_k=config.top_k, blocks=config.blocks):
            yield

    def active_block_indices(self) -> tuple[int, ...] | None:
        """The blocks the model runs now (None for a model without a known block list)."""
        try:
            return knobs.get_block_indices(self.model)
        except MolmoLatencyError:
            return None

    def check_configs(self, configs: list[Config]) -> None:
        """Refuse, before anything is measured or written, a knob value this model cannot take."""
        for top_k in sorted({c.top_k for c in configs if c.top_k is not None}):
            try:
                knobs._plan_top_k(self.model, top_k)
            except MolmoLatencyError as exc:
                raise SweepError(f"sweep: {exc}") from None
        for blocks in {c.blocks for c in configs if c.blocks is not None}:
            try:
                knobs.resolve_blocks(self.model, blocks)
            except MolmoLatencyError as exc:
                raise SweepError(f"sweep: {exc}") from None

    def describe(self) -> dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        to_dict = getattr(cfg, "to_dict", None)
        config_dict = to_dict() if callable(to_dict) else {}
        param = next(self.model.parameters())
        info = {"name": self.name, "class": type(self.model).__name__, "dtype": str(param.dtype),
                "device": str(param.device), "parameters": sum(p.numel() for p in self.model.parameters()),
                "config": _jsonable(config_dict),
                "autocast": str(self.autocast_dtype) if self.autocast_dtype is not None else None}
        with contextlib.suppress(Exception):
            info["top_k_default"] = knobs.get_top_k(self.model)
        with contextlib.suppress(Exception):
            info["blocks_total"] = knobs.total_blocks(self.model)
        return info


class ReferenceSource(ModelSource):
    def __init__(self, preset: str, *, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0):
        from molmo_latency.models import reference_vlm

        self.name = preset
        self.ref = reference_vlm(preset, seed=seed, device=device, dtype=dtype)
        self.model = self.ref.model

    def inputs(self, config: Config) -> dict[str, Any]:
        return self.ref.inputs(crops=config.crops, prompt_tokens=config.prompt_tokens,
                               batch_size=config.batch_size)

    def generation_kwargs(self, config: Config, *, free_generation: bool = False) -> dict[str, Any]:
        return self.ref.generation_kwargs(config.new_tokens, free_generation=free_generation)


class LocalHFSource(ModelSource):
    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, seed: int = 0):
        version = check_version()
        import transformers

        p = Path(path)
        if p.is_file():
            raise SweepError(f"--model {path}: is a file; pass a preset ({', '.join(_presets())}) or a "
                             "local Hugging Face model directory (with config.json)")
        if not (p / "config.json").is_file():
            raise SweepError(f"--model {path}: not a preset ({', '.join(_presets())}) and not a local "
                             "Hugging Face model directory (no config.json); nothing is downloaded")
        self.name = str(p)
        self.seed = seed
        mixed = _amp_precision(p) if dtype in (torch.bfloat16, torch.float16) else False
        # a mixed-precision model (MolmoE: precision "amp_bf16") keeps fp32 weights and runs
        # generate() under autocast, as its users do; any other model is cast to `dtype`
        weights = torch.float32 if mixed else (dtype or torch.float32)
        self.autocast_dtype = dtype if mixed else None
        kwargs = {"trust_remote_code": trust_remote_code, **dtype_kwargs(weights)}
        model = None
        errors = []
        for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
            cls = getattr(transformers, auto, None)
            if cls is None:
                continue
            try:
                model = cls.from_pretrained(p, local_files_only=True, **kwargs)
                break
            except (ValueError, KeyError, OSError) as exc:
                errors.append(f"{auto}: {exc}")
            except (ImportError, AttributeError, TypeError, NameError) as exc:  # remote code vs this line
                raise SweepError(f"--model {path}: its model code does not load on transformers {version} "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); MolmoE's own code "
                                 "needs transformers 4.51.3 (see README: 'MolmoE beside transformers 4.5x')") from None
        if model is None:
            raise SweepError(f"--model {path}: cannot load it as a VLM ({'; '.join(errors)[:400]}); "
                             "Molmo checkpoints need --trust-remote-code")
        self.model = model.to(device).eval()
        self.molmo = _is_molmo_remote(self.model)
        if self.molmo and not _can_generate(self.model):
            raise SweepError(f"--model {path}: {type(self.model).__name__}.generate() calls super().generate, "
                             f"which transformers {version} no longer provides; MolmoE's own code needs "
                             "transformers 4.51.3 (see README: 'MolmoE beside transformers 4.5x')")
        self.processor = None
        if not self.molmo and ((p / "preprocessor_config.json").is_file() or (p / "processor_config.json").is_file()):
            self.processor = transformers.AutoProcessor.from_pretrained(
                p, local_files_only=True, trust_remote_code=trust_remote_code)

    def inputs(self, config: Config) -> dict[str, Any]:
        if self.molmo:
            return molmo_inputs(self.model, crops=config.crops, prompt_tokens=config.prompt_tokens,
                                batch_size=config.batch_size, seed=self.seed)
        if self.processor is not None:
            return self._processor_inputs(config)
        return self._config_inputs(config)

    def generation_kwargs(self, config: Config, *, free_generation: bool = False) -> dict[str, Any]:
        kw = super().generation_kwargs(config, free_generation=free_generation)
        if not self.molmo:
            return kw
        # MolmoE's generate() reads max_new_tokens from a GenerationConfig and asserts use_cache
        from transformers import GenerationConfig

        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        return {"generation_config": GenerationConfig(use_cache=True, eos_token_id=eos, **kw)}

    def _config_inputs(self, config: Config) -> dict[str, Any]:
        cfg = self.model.config
        if getattr(cfg, "model_type", None) == "molmo2":  # crops of pooled patches between image ids
            from molmo_latency.models import molmo2_inputs

            return molmo2_inputs(self.model, crops=config.crops, prompt_tokens=config.prompt_tokens,
                                 batch_size=config.batch_size, seed=self.seed)
        vision = getattr(cfg, "vision_config", None)
        token = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
        if vision is None or token is None:
            raise SweepError(f"{self.name}: no processor files and no vision_config/image token in "
                             "config.json, so inputs cannot be built; save the processor with the model")
        down = getattr(cfg, "downsample_factor", 1) or 1
        per_crop = (vision.image_size // vision.patch_size) ** 2 // (down * down)
        text_cfg = cfg.get_text_config()
        vocab = text_cfg.vocab_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + config.crops * 1009 + config.prompt_tokens)
        text = torch.randint(3, min(vocab, token) if token > 3 else vocab, (config.batch_size, config.prompt_tokens), generator=gen)
        bos = getattr(text_cfg, "bos_token_id", None) or 1
        ids = torch.cat([torch.full((config.batch_size, 1), bos),
                         torch.full((config.batch_size, config.crops * per_crop), token), text], dim=1)
        param = next(self.model.parameters())
        kw = {"input_ids": ids.to(param.device), "attention_mask": torch.ones_like(ids, device=param.device)}
        if config.crops:
            px = torch.randn(config.batch_size * config.crops, 3, vision.image_size, vision.image_size, generator=gen)
            kw["pixel_values"] = px.to(param.device, param.dtype)
        return kw

    def _processor_inputs(self, config: Config) -> dict[str, Any]:  # pragma: no cover - needs a real checkpoint
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(self.seed)
        image = Image.fromarray(rng.integers(0, 255, (672, 672, 3), dtype=np.uint8))
        words = " ".join(["describe"] * max(config.prompt_tokens, 1))
        try:
            batch = self.processor(images=[image] * config.batch_size, text=[words] * config.batch_size,
                                   images_kwargs={"max_crops": config.crops}, return_tensors="pt")
        except TypeError:
            batch = self.processor(images=[image] * config.batch_size, text=[words] * config.batch_size,
                                   return_tensors="pt")
        param = next(self.model.parameters())
        return {k: (v.to(param.device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}


def _is_molmo_remote(model: torch.nn.Module) -> bool:
    """MolmoE's own model code: a transformer with .blocks and a vision backbone, image_input_idx inputs."""
    inner = getattr(model, "model", None)
    return (getattr(getattr(model, "config", None), "model_type", None) == "molmo"
            and hasattr(inner, "transformer") and hasattr(inner, "vision_backbone"))


def _can_generate(model: torch.nn.Module) -> bool:
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin)


def _amp_precision(path: Path) -> bool:
    """Does the checkpoint's config ask for automatic mixed precision (``precision: amp_*``)?"""
    import json

    try:
        precision = json.loads((path / "config.json").read_text(encoding="utf-8")).get("precision")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(precision, str) and precision.startswith("amp")


def molmo_inputs(model: torch.nn.Module, *, crops: int, prompt_tokens: int, batch_size: int = 1,
                 seed: int = 0) -> dict[str, Any]:
    """Synthetic MolmoE inputs for `crops` crops, from the model's config.

    ``images`` (B, crops, patches, patch pixels), ``image_masks`` (B, crops, patches) and
    ``image_input_idx`` (B, crops, tokens per crop): the positions in ``input_ids`` that receive
    each crop's pooled features, right after a first text token; the prompt follows. With 0 crops
    there are no image inputs. Image tokens = entries of image_input_idx >= 0 = crops x tokens
    per crop (144 for MolmoE-1B's 336 px / 14 px patches pooled 2x2).
    """
    cfg = model.config
    vision = cfg.vision_backbone
    get = (lambda k: vision[k]) if isinstance(vision, dict) else (lambda k: getattr(vision, k))
    height, width = get("image_default_input_size")
    patch = get("image_patch_size")
    patches = (height // patch) * (width // patch)
    pool_h, pool_w = cfg.llm_patches_per_crop
    per_crop = pool_h * pool_w
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(seed * 1_000_003 + crops * 1009 + prompt_tokens * 7 + batch_size)
    image_len = crops * per_crop
    text = torch.randint(3, vocab, (batch_size, 1 + prompt_tokens), generator=gen)
    # the image positions hold the first token of the extra vocabulary (Molmo's special tokens)
    image_ids = torch.full((batch_size, image_len), cfg.embedding_size or vocab)
    ids = torch.cat([text[:, :1], image_ids, text[:, 1:]], dim=1)
    param = next(model.parameters())
    out: dict[str, Any] = {"input_ids": ids.to(param.device)}
    if crops:
        out["images"] = torch.randn(batch_size, crops, patches, patch * patch * 3, generator=gen).to(
            param.device, param.dtype)
        out["image_masks"] = torch.ones(batch_size, crops, patches, device=param.device, dtype=param.dtype)
        idx = (1 + torch.arange(image_len)).view(1, crops, per_crop).expand(batch_size, -1, -1)
        out["image_input_idx"] = idx.contiguous().to(param.device)
    return out


def open_source(model: str, *, device: str = "cpu", dtype: str | None = None,
                trust_remote_code: bool = False, seed: int = 0) -> ModelSource:
    """A preset name or a local HF model directory, loaded on `device` in `dtype`."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SweepError(f"--device {device}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); use --device cpu")
    torch_dtype = parse_dtype(dtype, device)
    if model in _presets():
        return ReferenceSource(model, device=device, dtype=torch_dtype, seed=seed)
    return LocalHFSource(model, device=device, dtype=torch_dtype, trust_remote_code=trust_remote_code, seed=seed)


def _presets() -> tuple[str, ...]:
    from molmo_latency.models import PRESETS

    return tuple(PRESETS)


def host_name() -> str:
    return platform.node()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
