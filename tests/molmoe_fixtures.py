"""A tiny, randomly initialised MolmoE built from the real model code users run.

The code is read from ``../shared/molmo_remote`` (beside the repository; ``MOLMO_REMOTE_DIR``
overrides it) and never copied into the package. Two ways in, as users load it:

- :func:`tiny_molmoe`: the ``molmo`` package on ``sys.path``
  (``from molmo.models.modeling_molmoe import MolmoForCausalLM``);
- :func:`write_checkpoint`: an HF-style checkpoint directory (``config.json`` with ``auto_map``,
  the two model files, ``model.safetensors``) loaded with ``trust_remote_code``.

MolmoE's code runs on transformers 4.5x only (its README): on 5.x these tests skip, saying so;
CI runs them in its transformers 4.51.3 environment.

The tiny configuration keeps what the profiler and the knobs see of MolmoE-1B (336 px crops of
24x24 patches of 14 px, 2x2 attention pooling -> 144 image tokens per crop, ``vit_layers``
[-2, -9], MoE blocks with ``mlp.top_k``) and shrinks the widths: d_model 64, 4 blocks, 8 experts
(top-2), a 9-layer ViT of width 64 (``image_padding_embed`` off: its size is fixed to the default
ViT width, see the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

MOLMO_REMOTE = Path(os.environ.get("MOLMO_REMOTE_DIR")
                    or Path(__file__).resolve().parents[2] / "shared" / "molmo_remote")
TOKENS_PER_CROP = 144
TINY_BLOCKS, TINY_EXPERTS, TINY_TOP_K = 4, 8, 2


def require_molmoe_code() -> None:
    """Skip, with the reason, where the MolmoE code is absent (it builds on any line)."""
    if not (MOLMO_REMOTE / "molmo" / "models" / "modeling_molmoe.py").is_file():
        pytest.skip(f"the MolmoE model code is not at {MOLMO_REMOTE} (../shared/molmo_remote beside the "
                    "repository, or MOLMO_REMOTE_DIR)")
    pytest.importorskip("einops", reason="MolmoE's model code imports einops (the test extra has it)")


def require_molmoe() -> None:
    """Skip, with the reason, where the MolmoE code is absent or cannot run."""
    require_molmoe_code()
    import transformers

    if not transformers.__version__.startswith("4."):
        pytest.skip(f"MolmoE's own model code runs on transformers 4.5x only (this is "
                    f"{transformers.__version__}); CI runs these tests with transformers 4.51.3")


def tiny_config_dict() -> dict:
    cfg = json.loads((MOLMO_REMOTE / "configs" / "model" / "config.json").read_text())
    cfg.update(d_model=64, n_heads=4, n_layers=TINY_BLOCKS, moe_num_experts=TINY_EXPERTS,
               moe_top_k=TINY_TOP_K, embedding_size=512, vocab_size=384, additional_vocab_size=128,
               image_padding_embed=None, residual_dropout=0.0, init_device="cpu")
    vision = dict(cfg["vision_backbone"])
    vision.update(image_emb_dim=64, image_num_heads=4, image_num_key_value_heads=4, image_head_dim=16,
                  image_mlp_dim=128, image_num_layers=9)
    cfg["vision_backbone"] = vision
    return cfg


def _import_molmo():
    if str(MOLMO_REMOTE) not in sys.path:
        sys.path.insert(0, str(MOLMO_REMOTE))
    from molmo.models.config_molmoe import MolmoConfig
    from molmo.models.modeling_molmoe import MolmoForCausalLM

    return MolmoConfig, MolmoForCausalLM


def tiny_molmoe(seed: int = 0, *, any_line: bool = False):
    """A tiny MolmoForCausalLM from the `molmo` package, random weights, eval mode, CPU
    (`any_line`: also on transformers 5.x, where it builds but cannot generate)."""
    import torch

    require_molmoe_code() if any_line else require_molmoe()
    MolmoConfig, MolmoForCausalLM = _import_molmo()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MolmoForCausalLM(MolmoConfig(**tiny_config_dict()))
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = 2
    return model.eval()


def _local_imports(source: str) -> str:
    """What a checkpoint's copy of the model file changes: package-relative imports become local."""
    source = source.replace("from ..aliases import PathOrStr", "from .config_molmoe import PathOrStr")
    # two lazy FSDP-only imports of the training package; inference never reaches them
    return re.sub(r"from molmo\.config import (\w+)", r"\1 = None  # FSDP only (training package)", source)


def write_checkpoint(model, directory: str | os.PathLike) -> Path:
    """Save `model` as an HF checkpoint directory loadable with trust_remote_code."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    # weights as save_pretrained writes them (its config writer cannot serialise MolmoE's
    # VisionBackboneConfig dataclass, so config.json is written from the JSON config below)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_config_dict()
    cfg["auto_map"] = {"AutoConfig": "config_molmoe.MolmoConfig",
                       "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    src = MOLMO_REMOTE / "molmo" / "models"
    shutil.copyfile(src / "config_molmoe.py", out / "config_molmoe.py")
    (out / "modeling_molmoe.py").write_text(_local_imports((src / "modeling_molmoe.py").read_text()))
    (out / "generation_config.json").write_text(json.dumps({"pad_token_id": 1, "eos_token_id": 2}))
    return out


def molmoe_request(model, crops: int = 1, prompt_tokens: int = 8, batch_size: int = 1, new_tokens: int = 4):
    """generate() keyword arguments as MolmoE users pass them (a GenerationConfig)."""
    from transformers import GenerationConfig

    from molmo_latency.sweep.source import molmo_inputs

    inputs = molmo_inputs(model, crops=crops, prompt_tokens=prompt_tokens, batch_size=batch_size)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=1, eos_token_id=2)
    return {**inputs, "generation_config": gen}
