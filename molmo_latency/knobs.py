"""Adaptive-inference knobs: MoE top-k and active transformer blocks (crops go through inputs).

Works on the reference model (OLMoE text model: ``layer.mlp.gate.top_k``, first N of
``config.num_hidden_layers`` layers), HF models with the same layout (Molmo2 and other
LLaVA-style models with an MoE text model), and the MolmoE remote-code layout
(``model.transformer.blocks[i].mlp.top_k``; its forward asserts one cache entry per configured
layer, so the block list itself is cut and restored).

Example:
    >>> from molmo_latency.models import reference_vlm
    >>> from molmo_latency import knobs
    >>> m = reference_vlm("tiny").model
    >>> knobs.set_top_k(m, 1), knobs.get_top_k(m)
    (2, 1)
    >>> knobs.set_active_blocks(m, 2), knobs.get_active_blocks(m)
    (4, 2)
    >>> with knobs.configured(m, top_k=2, blocks=4):
    ...     knobs.get_top_k(m), knobs.get_active_blocks(m)
    (2, 4)
    >>> knobs.get_top_k(m), knobs.get_active_blocks(m)
    (1, 2)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from molmo_latency.errors import MolmoLatencyError

_FULL_BLOCKS_ATTR = "_molmo_latency_all_blocks"


# ---------------------------------------------------------------------------------- top-k
def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that hold an integer `top_k` for MoE routing (routers or MoE blocks)."""
    found = []
    for module in model.modules():
        k = getattr(module, "top_k", None)
        if isinstance(k, int) and not isinstance(k, bool):
            found.append(module)
    return found


def _num_experts(module: torch.nn.Module) -> int | None:
    for attr in ("num_experts", "n_experts", "num_local_experts"):
        n = getattr(module, attr, None)
        if isinstance(n, int):
            return n
    experts = getattr(module, "experts", None)
    if isinstance(experts, (torch.nn.ModuleList, list)):
        return len(experts)
    return None


def get_top_k(model: torch.nn.Module) -> int:
    """The MoE top-k the model uses now (the first router's, they are set together)."""
    routers = _routers(model)
    if not routers:
        raise MolmoLatencyError(
            f"{type(model).__name__} has no MoE router with a `top_k` attribute "
            "(looked for modules such as layer.mlp.gate.top_k or transformer.blocks[i].mlp.top_k)"
        )
    return routers[0].top_k


def set_top_k(model: torch.nn.Module, k: int) -> int:
    """Make every MoE layer route each token to `k` experts; returns the previous top-k."""
    previous = get_top_k(model)
    routers = _routers(model)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MolmoLatencyError(f"set_top_k: k must be a positive integer, got {k!r}")
    for module in routers:
        n = _num_experts(module)
        if n is not None and k > n:
            raise MolmoLatencyError(f"set_top_k: k={k} exceeds the {n} experts of this model")
    for module in routers:
        module.top_k = k
    for cfg in _configs(model):
        for attr in ("num_experts_per_tok", "moe_top_k"):
            if isinstance(getattr(cfg, attr, None), int):
                setattr(cfg, attr, k)
    return previous


# --------------------------------------------------------------------------- active blocks
def _hf_decoder(model: torch.nn.Module):
    """The HF text decoder: a module with `.layers` and `.config.num_hidden_layers`."""
    for path in ("model.language_model", "language_model", "model.text_model", "model", ""):
        module = _get(model, path)
        if module is None:
            continue
        layers = getattr(module, "layers", None)
        cfg = getattr(module, "config", None)
        if isinstance(layers, torch.nn.ModuleList) and hasattr(cfg, "num_hidden_layers"):
            return module
    return None


def _molmo_transformer(model: torch.nn.Module):
    for path in ("model.transformer", "transformer"):
        module = _get(model, path)
        if module is not None and isinstance(getattr(module, "blocks", None), torch.nn.ModuleList):
            return module
    return None


def _block_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(owner, attribute) of the text model's block ModuleList: HF `.layers` or Molmo `.blocks`."""
    decoder = _hf_decoder(model)
    if decoder is not None:
        return decoder, "layers"
    transformer = _molmo_transformer(model)
    if transformer is not None:
        return transformer, "blocks"
    raise MolmoLatencyError(_no_blocks_message(model))


def get_active_blocks(model: torch.nn.Module) -> int:
    """How many transformer blocks the text model runs now."""
    owner, attr = _block_list(model)
    n = len(getattr(owner, attr))
    configured_n = getattr(getattr(owner, "config", None), "num_hidden_layers", None)
    return min(n, configured_n) if isinstance(configured_n, int) else n


def total_blocks(model: torch.nn.Module) -> int:
    """How many transformer blocks the text model has (whatever is active)."""
    owner, attr = _block_list(model)
    return len(getattr(owner, _FULL_BLOCKS_ATTR, getattr(owner, attr)))


def set_active_blocks(model: torch.nn.Module, n: int) -> int:
    """Run only the first `n` transformer blocks; returns the previous count.

    The block list itself is cut to its first `n` entries (the full list is kept aside and put
    back by a later call), and the configured layer counts follow, so that decoders that loop
    over every block (Molmo2), over `config.num_hidden_layers` (OLMoE) or assert one cache
    entry per configured layer (MolmoE remote code) all run exactly `n` blocks.
    """
    total = total_blocks(model)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= total:
        raise MolmoLatencyError(f"set_active_blocks: n must be an integer in 1..{total}, got {n!r}")
    previous = get_active_blocks(model)
    owner, attr = _block_list(model)
    full = getattr(owner, _FULL_BLOCKS_ATTR, None)
    if full is None:
        full = list(getattr(owner, attr))
        object.__setattr__(owner, _FULL_BLOCKS_ATTR, full)
    setattr(owner, attr, torch.nn.ModuleList(full[:n]))
    for cfg in [getattr(owner, "config", None), *_configs(model)]:
        for name in ("num_hidden_layers", "n_layers"):
            if cfg is not None and isinstance(getattr(cfg, name, None), int):
                setattr(cfg, name, n)
    if n == len(full):
        object.__delattr__(owner, _FULL_BLOCKS_ATTR)
    return previous


@contextlib.contextmanager
def configured(model: torch.nn.Module, *, top_k: int | None = None, blocks: int | None = None) -> Iterator[None]:
    """Set knobs for the duration of a block, restoring the previous values afterwards."""
    old_k = set_top_k(model, top_k) if top_k is not None else None
    try:
        old_blocks = set_active_blocks(model, blocks) if blocks is not None else None
    except BaseException:
        if old_k is not None:
            set_top_k(model, old_k)
        raise
    try:
        yield
    finally:
        if old_blocks is not None:
            set_active_blocks(model, old_blocks)
        if old_k is not None:
            set_top_k(model, old_k)


# ---------------------------------------------------------------------------------- helpers
def _get(model: torch.nn.Module, path: str):
    if not path:
        return model
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _configs(model: torch.nn.Module):
    seen = []
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "llm_config", None)):
        if c is not None and all(c is not s for s in seen):
            seen.append(c)
    return seen


def _no_blocks_message(model: torch.nn.Module) -> str:
    return (
        f"{type(model).__name__}: cannot find its transformer blocks (looked for an HF decoder "
        "with .layers and config.num_hidden_layers at model.language_model / language_model / "
        "model, and a Molmo transformer with .blocks at model.transformer / transformer)"
    )
