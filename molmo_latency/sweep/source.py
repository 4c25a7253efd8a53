"""Model sources: what the sweep profiles, and how a configuration becomes generate() inputs.

- :class:`ReferenceSource`: a reference preset (`tiny`, `molmoe-1b-shape`), random weights.
- :class:`LocalHFSource`: a local Hugging Face model directory (nothing is downloaded;
  `trust_remote_code` for Molmo). A directory saved from a LLaVA-style model (e.g.
  ``reference_vlm(...).model.save_pretrained(dir)``) gets synthetic inputs built from its config
  (image size, patch size, pooling, image token); any other model needs its processor: inputs are
  then built by the processor from a synthetic image with ``max_crops=crops``.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import torch

from molmo_latency import knobs
from molmo_latency.errors import SweepError
from molmo_latency.sweep.spec import Config

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

    def inputs(self, config: Config, *, free_generation: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    @contextlib.contextmanager
    def configured(self, config: Config):
        with knobs.configured(self.model, top_k=config.top_k, blocks=config.blocks):
            yield

    def describe(self) -> dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        to_dict = getattr(cfg, "to_dict", None)
        config_dict = to_dict() if callable(to_dict) else {}
        param = next(self.model.parameters())
        info = {"name": self.name, "class": type(self.model).__name__, "dtype": str(param.dtype),
                "device": str(param.device), "parameters": sum(p.numel() for p in self.model.parameters()),
                "config": _jsonable(config_dict)}
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

    def inputs(self, config: Config, *, free_generation: bool = False) -> dict[str, Any]:
        return self.ref.inputs(crops=config.crops, prompt_tokens=config.prompt_tokens,
                               batch_size=config.batch_size, new_tokens=config.new_tokens,
                               free_generation=free_generation)


class LocalHFSource(ModelSource):
    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, seed: int = 0):
        import transformers

        p = Path(path)
        if not (p / "config.json").is_file():
            raise SweepError(f"--model {path}: not a preset ({', '.join(_presets())}) and not a local "
                             "Hugging Face model directory (no config.json); nothing is downloaded")
        self.name = str(p)
        self.seed = seed
        kwargs = {"trust_remote_code": trust_remote_code, "dtype": dtype or torch.float32}
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
        if model is None:
            raise SweepError(f"--model {path}: cannot load it as a VLM ({'; '.join(errors)[:400]}); "
                             "Molmo checkpoints need --trust-remote-code")
        self.model = model.to(device).eval()
        self.processor = None
        if (p / "preprocessor_config.json").is_file() or (p / "processor_config.json").is_file():
            self.processor = transformers.AutoProcessor.from_pretrained(
                p, local_files_only=True, trust_remote_code=trust_remote_code)

    def inputs(self, config: Config, *, free_generation: bool = False) -> dict[str, Any]:
        if self.processor is not None:
            return self._processor_inputs(config, free_generation)
        return self._config_inputs(config, free_generation)

    def _generation_kwargs(self, config: Config, free_generation: bool) -> dict[str, Any]:
        gen = getattr(self.model, "generation_config", None)
        pad = getattr(gen, "pad_token_id", None)
        eos = getattr(gen, "eos_token_id", None)
        kw: dict[str, Any] = {"max_new_tokens": config.new_tokens, "do_sample": False}
        if pad is not None or eos is not None:
            kw["pad_token_id"] = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
        if not free_generation:
            kw["min_new_tokens"] = config.new_tokens
        return kw

    def _config_inputs(self, config: Config, free_generation: bool) -> dict[str, Any]:
        cfg = self.model.config
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
        kw.update(self._generation_kwargs(config, free_generation))
        return kw

    def _processor_inputs(self, config: Config, free_generation: bool) -> dict[str, Any]:  # pragma: no cover - needs a real checkpoint
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
        kw = {k: (v.to(param.device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}
        kw.update(self._generation_kwargs(config, free_generation))
        return kw


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
