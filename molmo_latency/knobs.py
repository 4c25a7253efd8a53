"""Adaptive-inference knobs: MoE top-k and active transformer blocks (crops go through inputs).

Works on the reference model (OLMoE text model: ``layer.mlp.gate.top_k``), HF models with the
same layout (Molmo2 and other LLaVA-style models with an MoE text model) on both transformers
lines, and the MolmoE remote code (``model.transformer.blocks[i].mlp.top_k``; its forward asserts
one cache entry per configured layer, so the block list itself is cut and restored).

Active blocks are either the first ``n`` (an int) or an explicit subset of block indices (a
sequence: sorted, unique, in range), as users who pick blocks by importance do: the block list
becomes those blocks, in order, and the layer counts of the configs follow.

Every knob checks everything first, then changes the model, and undoes every change on any
failure: a refused value is a :class:`MolmoLatencyError` naming the knob, the value and the valid
range, and leaves the model exactly as it was.

Example:
    >>> from molmo_latency.models import reference_vlm
    >>> from molmo_latency import knobs
    >>> m = reference_vlm("tiny").model
    >>> knobs.set_top_k(m, 1), knobs.get_top_k(m)
    (2, 1)
    >>> knobs.set_active_blocks(m, 2), knobs.get_active_blocks(m)
    (4, 2)
    >>> knobs.set_active_blocks(m, [0, 2, 3]), knobs.get_block_indices(m)
    (2, (0, 2, 3))
    >>> with knobs.configured(m, top_k=2, blocks=4):
    ...     knobs.get_top_k(m), knobs.get_active_blocks(m)
    (2, 4)
    >>> knobs.get_top_k(m), knobs.get_block_indices(m)
    (1, (0, 2, 3))
    >>> knobs.set_active_blocks(m, 4), knobs.set_top_k(m, 2)
    ((0, 2, 3), 1)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence, Union

import torch

from molmo_latency.errors import MolmoLatencyError
from molmo_latency.transformers_lines import TEXT_DECODER_PATHS

Blocks = Union[int, Sequence[int]]

_FULL_BLOCKS_ATTR = "_molmo_latency_all_blocks"      # the full block list, while cut
_ORIGINAL_ATTR = "_molmo_latency_block_originals"    # values changed by the cut, to put back
_INDICES_ATTR = "_molmo_latency_block_indices"       # the active indices, while cut
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layers")
# config lists of block indices that a cut renumbers (Molmo2: the layers that run scaled RoPE)
_LAYER_INDEX_LISTS = ("rope_scaling_layers",)


# ------------------------------------------------------------------------- transactions
class _Plan:
    """Changes to make together: each (object, attribute, new value); all or none."""

    def __init__(self) -> None:
        self.changes: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self.changes.append((obj, name, value))

    def apply(self) -> None:
        done: list[tuple[Any, str, bool, Any]] = []
        try:
            for obj, name, value in self.changes:
                had = name in vars(obj) or hasattr(obj, name)
                old = getattr(obj, name, None)
                _assign(obj, name, value)
                done.append((obj, name, had, old))
        except BaseException:
            for obj, name, had, old in reversed(done):
                if had:
                    _assign(obj, name, old)
                else:
                    _delete(obj, name)
            raise


def _assign(obj: Any, name: str, value: Any) -> None:
    if name.startswith("_molmo_latency"):
        object.__setattr__(obj, name, value)  # bookkeeping, not a submodule
    else:
        setattr(obj, name, value)


def _delete(obj: Any, name: str) -> None:
    if name in vars(obj):
        object.__delattr__(obj, name)


def _settable(cfg: Any, name: str) -> bool:
    """A plain config attribute (not a read-only property such as MolmoConfig.num_hidden_layers)."""
    if name in vars(cfg):
        return True
    return name in (getattr(type(cfg), "attribute_map", None) or {})


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
            f"top_k: {type(model).__name__} has no MoE router with a `top_k` attribute "
            "(looked for modules such as layer.mlp.gate.top_k or transformer.blocks[i].mlp.top_k)"
        )
    return routers[0].top_k


def max_top_k(model: torch.nn.Module) -> int | None:
    """The largest top-k every MoE layer allows (its number of experts), None if unknown."""
    counts = [n for n in (_num_experts(m) for m in _routers(model)) if n is not None]
    return min(counts) if counts else None


def _plan_top_k(model: torch.nn.Module, k: Any) -> _Plan:
    routers = _routers(model)
    if not routers:
        get_top_k(model)  # raises the error naming what was looked for
    limit = max_top_k(model)
    allowed = f"1..{limit}" if limit is not None else "a positive integer"
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or (limit is not None and k > limit):
        experts = f" (this model has {limit} experts per MoE layer)" if limit is not None else ""
        raise MolmoLatencyError(f"top_k={k!r} is out of range{experts}; use {allowed}")
    plan = _Plan()
    for module in routers:
        plan.set(module, "top_k", k)
    for cfg in _configs(model):
        for attr in ("num_experts_per_tok", "moe_top_k"):
            if isinstance(getattr(cfg, attr, None), int) and _settable(cfg, attr):
                plan.set(cfg, attr, k)
    return plan


def set_top_k(model: torch.nn.Module, k: int) -> int:
    """Make every MoE layer route each token to `k` experts; returns the previous top-k."""
    previous = get_top_k(model)
    _plan_top_k(model, k).apply()
    return previous


# --------------------------------------------------------------------------- active blocks
def _is_hf_decoder(module: Any) -> bool:
    layers = getattr(module, "layers", None)
    cfg = getattr(module, "config", None)
    return isinstance(layers, torch.nn.ModuleList) and hasattr(cfg, "num_hidden_layers")


def _hf_decoder(model: torch.nn.Module):
    """The HF text decoder: a module with `.layers` and `.config.num_hidden_layers`, found through
    ``get_decoder()`` (followed while it leads further: BLIP-2's language model is a whole
    ...ForCausalLM), else at the known paths."""
    module: Any = model
    for _ in range(4):
        getter = getattr(module, "get_decoder", None)
        try:
            inner = getter() if callable(getter) else None
        except Exception:  # e.g. NotImplementedError from a base class
            inner = None
        if not isinstance(inner, torch.nn.Module) or inner is module:
            break
        module = inner
        if _is_hf_decoder(module):
            return module
    for path in TEXT_DECODER_PATHS:
        module = _get(model, path)
        if module is not None and _is_hf_decoder(module):
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
    transformer = _molmo_transformer(model)
    if transformer is not None:
        return transformer, "blocks"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise MolmoLatencyError(
            f"blocks: {type(model).__name__} has an encoder-decoder text model; the blocks knob cuts "
            "decoder-only text models only (profile it without blocks=)")
    decoder = _hf_decoder(model)
    if decoder is not None:
        return decoder, "layers"
    raise MolmoLatencyError(_no_blocks_message(model))


def _full_blocks(owner: torch.nn.Module, attr: str) -> list[torch.nn.Module]:
    full = getattr(owner, _FULL_BLOCKS_ATTR, None)
    return list(full) if full is not None else list(getattr(owner, attr))


def total_blocks(model: torch.nn.Module) -> int:
    """How many transformer blocks the text model has (whatever is active)."""
    owner, attr = _block_list(model)
    return len(_full_blocks(owner, attr))


def get_block_indices(model: torch.nn.Module) -> tuple[int, ...]:
    """The indices of the blocks the text model runs now, in order."""
    owner, attr = _block_list(model)
    indices = getattr(owner, _INDICES_ATTR, None)
    if indices is not None:
        return tuple(indices)
    n = len(getattr(owner, attr))
    configured_n = getattr(getattr(owner, "config", None), "num_hidden_layers", None)
    return tuple(range(min(n, configured_n) if isinstance(configured_n, int) else n))


def get_active_blocks(model: torch.nn.Module) -> int:
    """How many transformer blocks the text model runs now."""
    return len(get_block_indices(model))


def blocks_run(model: torch.nn.Module) -> int | None:
    """How many transformer blocks the text model runs now, or None where its blocks cannot be
    found (no error: a request row says null)."""
    try:
        return get_active_blocks(model)
    except MolmoLatencyError:
        return None


def resolve_blocks(model: torch.nn.Module, blocks: Blocks) -> tuple[int, ...]:
    """The block indices a `blocks` value means on this model (first n, or a subset), checked."""
    return _check_blocks(blocks, total_blocks(model))


def _check_blocks(blocks: Any, total: int) -> tuple[int, ...]:
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        if not 1 <= blocks <= total:
            raise MolmoLatencyError(f"blocks={blocks} is out of range; this model has {total} "
                                    f"blocks: use a count in 1..{total} or a list of indices in 0..{total - 1}")
        return tuple(range(blocks))
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise MolmoLatencyError(f"blocks={blocks!r} must be a count (1..{total}) or a list of block "
                                f"indices in 0..{total - 1}")
    indices = list(blocks)
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < total]
    if not indices or bad:
        raise MolmoLatencyError(f"blocks={indices!r}: block indices must be integers in 0..{total - 1} "
                                f"(this model has {total} blocks)" + (f"; {bad[0]!r} is not" if bad else ""))
    if indices != sorted(set(indices)):
        raise MolmoLatencyError(f"blocks={indices!r}: block indices must be sorted and unique, "
                                f"e.g. {sorted(set(indices))}")
    return tuple(indices)


def _layer_idx_modules(block: torch.nn.Module) -> list[torch.nn.Module]:
    """Submodules of a block that carry its position for the KV cache (HF `layer_idx`)."""
    return [m for m in block.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and not isinstance(m.layer_idx, bool)]


def _originals(model: torch.nn.Module, owner: torch.nn.Module, full: list[torch.nn.Module]) -> dict:
    """What a cut changes, as it is on the uncut model (taken once, before the first cut)."""
    stored = getattr(owner, _ORIGINAL_ATTR, None)
    if stored is not None:
        return stored
    configs = [c for c in _unique([getattr(owner, "config", None), *_configs(model)]) if c is not None]
    return {
        "configs": [(cfg, {name: getattr(cfg, name)
                           for name in (*_LAYER_COUNT_ATTRS, "layer_types", *_LAYER_INDEX_LISTS)
                           if _settable(cfg, name) and getattr(cfg, name, None) is not None})
                    for cfg in configs],
        "layer_idx": [[(m, m.layer_idx) for m in _layer_idx_modules(block)] for block in full],
        # per-block lists the decoder indexes by a block's place in its list (Molmo2's rope_types:
        # which RoPE each layer runs): cut with the blocks, or a kept block would run another's
        "per_block": {name: value for name, value in vars(owner).items()
                      if not name.startswith("_") and isinstance(value, (list, tuple))
                      and len(value) == len(full) and value
                      and all(isinstance(v, (str, int, float, bool)) for v in value)},
    }


def _plan_blocks(model: torch.nn.Module, blocks: Any) -> tuple[_Plan, tuple[int, ...]]:
    owner, attr = _block_list(model)
    full = _full_blocks(owner, attr)
    indices = _check_blocks(blocks, len(full))
    looped = _looped(model)
    if looped is not None and indices != tuple(range(len(full))):
        raise MolmoLatencyError(f"blocks={blocks!r}: {looped}; use all {len(full)} blocks")
    originals = _originals(model, owner, full)
    _check_layer_types(model, originals, indices, len(full))
    everything = indices == tuple(range(len(full)))
    plan = _Plan()
    plan.set(owner, attr, torch.nn.ModuleList(full) if everything else
             torch.nn.ModuleList([full[i] for i in indices]))
    position = {block_index: j for j, block_index in enumerate(indices)}
    for block_index, modules in enumerate(originals["layer_idx"]):
        for module, original in modules:
            # a kept block is numbered by its place in the cut list (its KV-cache slot)
            plan.set(module, "layer_idx", original if everything else position.get(block_index, original))
    for name, original in originals.get("per_block", {}).items():
        plan.set(owner, name, original if everything else type(original)(original[i] for i in indices))
    for cfg, values in originals["configs"]:
        for name, original in values.items():
            if everything:
                plan.set(cfg, name, original)
            elif name == "layer_types" and isinstance(original, list) and len(original) == len(full):
                plan.set(cfg, name, [original[i] for i in indices])
            elif name in _LAYER_INDEX_LISTS and isinstance(original, list):
                # block indices -> their places in the cut list (blocks not kept drop out)
                plan.set(cfg, name, [position[i] for i in original if i in position])
            elif name in _LAYER_COUNT_ATTRS and isinstance(original, int):
                plan.set(cfg, name, len(indices))
    if everything:
        for name in (_FULL_BLOCKS_ATTR, _ORIGINAL_ATTR, _INDICES_ATTR):
            if name in vars(owner):
                plan.set(owner, name, None)
    else:
        plan.set(owner, _FULL_BLOCKS_ATTR, full)
        plan.set(owner, _ORIGINAL_ATTR, originals)
        plan.set(owner, _INDICES_ATTR, indices)
    return plan, indices


def _looped(model: torch.nn.Module) -> str | None:
    """Why no block subset keeps what the model runs, or None: its text config visits more blocks
    per forward than it has (``total_num_hidden_layers``: Inkling 2 Loop runs a range of its blocks
    again, a range its config gives by position, which a cut would not renumber)."""
    for cfg in _configs(model):
        visited, count = getattr(cfg, "total_num_hidden_layers", None), getattr(cfg, "num_hidden_layers", None)
        if isinstance(visited, int) and isinstance(count, int) and visited != count:
            return (f"{type(model).__name__} runs some of its {count} blocks again in a loop ({visited} block "
                    "passes per forward, the loop given by block positions), which a subset of blocks would not keep")
    return None


def _is_softmax_attention(layer_type: Any) -> bool:
    return isinstance(layer_type, str) and "attention" in layer_type and "linear" not in layer_type


def _check_layer_types(model: torch.nn.Module, originals: dict, indices: tuple[int, ...], total: int) -> None:
    """A hybrid model (linear-attention and attention blocks: Qwen3.5) needs an attention block
    among those kept: its cache reads the sequence length from one, and generate() fails without."""
    for _cfg, values in originals["configs"]:
        types = values.get("layer_types")
        if not (isinstance(types, list) and len(types) == total and any(map(_is_softmax_attention, types))):
            continue
        if not any(_is_softmax_attention(types[i]) for i in indices):
            attention = [i for i, t in enumerate(types) if _is_softmax_attention(t)]
            raise MolmoLatencyError(
                f"blocks={list(indices)!r}: {type(model).__name__} mixes linear-attention and attention blocks "
                f"and needs at least one attention block kept (its cache reads the sequence length from one); "
                f"add one of {attention}")


def _drop_bookkeeping(model: torch.nn.Module) -> None:
    owner, _ = _block_list(model)
    for name in (_FULL_BLOCKS_ATTR, _ORIGINAL_ATTR, _INDICES_ATTR):
        if name in vars(owner) and vars(owner)[name] is None:
            object.__delattr__(owner, name)


def set_active_blocks(model: torch.nn.Module, blocks: Blocks) -> Blocks:
    """Run only some transformer blocks: the first `blocks` (an int) or the listed indices.

    Returns the previous setting in a form this function takes back: the count when the first
    n blocks ran, else the tuple of indices. The block list itself is cut (the full list is kept
    aside and put back when every block is active again), the configured layer counts follow, and
    the kept blocks' ``layer_idx`` (their KV-cache slot in HF models) is renumbered, so decoders
    that loop over every block (Molmo2), over `config.num_hidden_layers` (OLMoE) or assert one
    cache entry per configured layer (MolmoE remote code) all run exactly those blocks.
    """
    current = get_block_indices(model)
    previous: Blocks = len(current) if current == tuple(range(len(current))) else current
    plan, _ = _plan_blocks(model, blocks)
    plan.apply()
    _drop_bookkeeping(model)
    return previous


@contextlib.contextmanager
def configured(model: torch.nn.Module, *, top_k: int | None = None,
               blocks: Blocks | None = None) -> Iterator[None]:
    """Set knobs for the duration of a block, restoring the previous values afterwards.

    Both values are checked before anything changes; a refused value changes nothing.
    """
    if top_k is not None:
        _plan_top_k(model, top_k)
    if blocks is not None:
        _plan_blocks(model, blocks)
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
        try:
            if old_blocks is not None:
                set_active_blocks(model, old_blocks)
        finally:
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


def _unique(items: list) -> list:
    seen: list = []
    for item in items:
        if all(item is not s for s in seen):
            seen.append(item)
    return seen


def _configs(model: torch.nn.Module) -> list:
    cfg = getattr(model, "config", None)
    return [c for c in _unique([cfg, getattr(cfg, "text_config", None), getattr(cfg, "llm_config", None)])
            if c is not None]


def _no_blocks_message(model: torch.nn.Module) -> str:
    return (
        f"blocks: {type(model).__name__}: cannot find its transformer blocks (looked for a Molmo "
        "transformer with .blocks at model.transformer / transformer, and an HF decoder with "
        f".layers and config.num_hidden_layers at {' / '.join(p or '(the model)' for p in TEXT_DECODER_PATHS)})"
    )


# ---------------------------------------------------------------------------- what applies
def knob_ranges(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Which knobs apply to `model`, their valid range and current value, or why not (the
    one-line refusal the knob itself gives). Reads the model only (works on a meta-device model).

    Example:
        >>> from molmo_latency.models import reference_vlm
        >>> [(k["knob"], k["applies"], k["range"], k["now"]) for k in knob_ranges(reference_vlm("tiny").model)]
        [('top_k', True, '1..8', '2'), ('blocks', True, 'a count in 1..4, or sorted block indices in 0..3', '4')]
    """
    rows: list[dict[str, Any]] = []
    try:
        k = get_top_k(model)
        limit = max_top_k(model)
        rows.append({"knob": "top_k", "applies": True,
                     "range": f"1..{limit}" if limit is not None else "a positive integer",
                     "now": str(k), "why_not": None})
    except MolmoLatencyError as exc:
        rows.append({"knob": "top_k", "applies": False, "range": None, "now": None, "why_not": str(exc)})
    try:
        total = total_blocks(model)
        looped = _looped(model)
        if looped is not None:
            raise MolmoLatencyError(f"blocks: {looped}; only all {total} blocks")
        rows.append({"knob": "blocks", "applies": True,
                     "range": f"a count in 1..{total}, or sorted block indices in 0..{total - 1}",
                     "now": str(get_active_blocks(model)), "why_not": None})
    except MolmoLatencyError as exc:
        rows.append({"knob": "blocks", "applies": False, "range": None, "now": None, "why_not": str(exc)})
    return rows
