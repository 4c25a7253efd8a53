"""Inside the phases: where each decoder block's attention, MLP, MoE router and experts, norms,
the vision blocks, the projector and the LM head are (found structurally, like the phases), and
how their timed spans become a ``modules`` table (collect: the sites; transform: the table).

Sites (:func:`module_sites`) are found from the model's structure, on every layout the knobs
know (Hugging Face decoders, Molmo's remote code):

- per decoder block: ``attention`` (``self_attn`` / ``attn`` / ``attention``), ``mlp`` (a dense
  MLP) or, for a mixture of experts, ``moe_router`` (its ``gate`` / ``router``) and
  ``moe_experts`` (its ``experts`` when that is one module that is called; otherwise the MoE
  block's time outside the router, which then includes dispatch), and ``norm`` (the block's own
  norm layers, wherever they sit);
- ``vision_block`` (each layer of the vision encoder), ``projector`` (the projector's parts),
  ``lm_head``.

Times (:func:`module_table`): spans nest (a norm inside attention, a router inside the MoE
block), so each span is charged its *exclusive* time (its duration minus the spans directly
inside it), and ``other`` is the part of the phase no module covers (embeddings, residual adds,
the final norm, ...): the module kinds of a phase instance sum to the phase exactly.

Example:
    >>> import polars as pl
    >>> phases = pl.DataFrame({"request": [0], "phase": ["decode"], "step": [0], "start_ns": [0], "end_ns": [100]})
    >>> spans = pl.DataFrame({"request": [0, 0, 0], "module_kind": ["attention", "norm", "moe_experts"],
    ...                       "start_ns": [10, 12, 50], "end_ns": [40, 15, 90]})
    >>> module_table(spans, phases).select("module_kind", "ms", "calls").rows()
    [('attention', 2.7e-05, 1), ('moe_experts', 4e-05, 1), ('norm', 3e-06, 1), ('other', 3e-05, None)]
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import polars as pl

MODULE_KINDS = ("attention", "mlp", "moe_router", "moe_experts", "norm", "vision_block", "projector",
                "lm_head", "other")
_ATTENTION = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe")
_ROUTER = ("gate", "router")
_VISION_LAYERS = ("layers", "layer", "blocks", "resblocks")


@dataclass(frozen=True)
class ModuleSite:
    """One module to time: its kind, the decoder block (or vision layer) it belongs to, the
    module, and its qualified name (for messages)."""

    kind: str
    block: int | None
    module: Any
    name: str


def _is_norm(module: Any) -> bool:
    return "norm" in type(module).__name__.lower()


def _child(module: Any, names: tuple[str, ...]) -> tuple[str, Any] | None:
    for name in names:
        child = getattr(module, name, None)
        if child is not None and hasattr(child, "register_forward_hook"):
            return name, child
    return None


def _called_module(module: Any) -> bool:
    """A module that is called (has its own forward), not a container such as ModuleList."""
    forward = getattr(type(module), "forward", None)
    import torch

    return forward is not None and forward is not torch.nn.Module.forward and not isinstance(
        module, (torch.nn.ModuleList, torch.nn.ModuleDict))


def decoder_sites(blocks: list[Any], prefix: str) -> list[ModuleSite]:
    """The sites inside each decoder block (see the module docstring)."""
    sites: list[ModuleSite] = []
    for i, block in enumerate(blocks):
        attn = _child(block, _ATTENTION)
        if attn is not None:
            sites.append(ModuleSite("attention", i, attn[1], f"{prefix}.{i}.{attn[0]}"))
        mlp = _child(block, _MLP)
        if mlp is not None:
            name, ffn = mlp
            router = _child(ffn, _ROUTER)
            experts = getattr(ffn, "experts", None)
            if router is not None and experts is not None:
                sites.append(ModuleSite("moe_router", i, router[1], f"{prefix}.{i}.{name}.{router[0]}"))
                if _called_module(experts):
                    sites.append(ModuleSite("moe_experts", i, experts, f"{prefix}.{i}.{name}.experts"))
                else:  # a list of experts called one by one: the MoE block minus its router
                    sites.append(ModuleSite("moe_experts", i, ffn, f"{prefix}.{i}.{name}"))
            else:
                sites.append(ModuleSite("mlp", i, ffn, f"{prefix}.{i}.{name}"))
        for name, sub in block.named_modules():
            if name and _is_norm(sub) and not any(_is_norm(p) for p in _parents(block, name)):
                sites.append(ModuleSite("norm", i, sub, f"{prefix}.{i}.{name}"))
    return sites


def _parents(root: Any, name: str) -> list[Any]:
    parts = name.split(".")
    out, node = [], root
    for part in parts[:-1]:
        node = getattr(node, part)
        out.append(node)
    return out


def vision_sites(tower: Any) -> list[ModuleSite]:
    """Each layer of the vision encoder (the longest list of layers found in the tower)."""
    import torch

    best: tuple[str, Any] | None = None
    for name, sub in tower.named_modules():
        if isinstance(sub, torch.nn.ModuleList) and name.split(".")[-1] in _VISION_LAYERS:
            if best is None or len(sub) > len(best[1]):
                best = (name, sub)
    if best is None:
        return []
    return [ModuleSite("vision_block", i, layer, f"{best[0]}.{i}") for i, layer in enumerate(best[1])]


def module_sites(model: Any, phase_map: Any) -> list[ModuleSite]:
    """Every site of `model` (decoder blocks from the knobs' block list, vision and projector from
    the phase map, the LM head). Raises MolmoLatencyError when no decoder block is found."""
    from molmo_latency.errors import MolmoLatencyError
    from molmo_latency.knobs import _block_list, _full_blocks

    try:
        owner, attr = _block_list(model)
    except MolmoLatencyError as exc:
        raise MolmoLatencyError(f"detail='modules': {exc}") from None
    sites = decoder_sites(_full_blocks(owner, attr), attr)
    spans = getattr(phase_map, "spans", {})
    if "vision" in spans:
        sites += vision_sites(spans["vision"].start)
    if "projector" in spans and spans["projector"].start is spans["projector"].end:
        sites.append(ModuleSite("projector", None, spans["projector"].start, "projector"))
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    get_input = getattr(model, "get_input_embeddings", None)
    tied = callable(get_input) and head is not None and head is get_input()
    # a tied head is the embedding module: its forward is the lookup, not the logits' GEMM
    if head is not None and not tied and hasattr(head, "register_forward_hook"):
        sites.append(ModuleSite("lm_head", None, head, "lm_head"))
    return sites


def _exclusive(spans: list[tuple[int, int, str]]) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """Exclusive ns and calls per kind of nested spans (start, end, kind), and the problems found
    (a span that starts inside another and ends after it: the two are not nested)."""
    out: dict[str, int] = {}
    calls: dict[str, int] = {}
    problems: list[str] = []
    stack: list[list] = []  # [end, kind, own ns less the spans directly inside]
    for start, end, kind in sorted(spans, key=lambda s: (s[0], -s[1])):
        while stack and stack[-1][0] <= start:
            e, k, child = stack.pop()
            out[k] = out.get(k, 0) + child
        if stack and end > stack[-1][0]:
            problems.append(f"{kind} ends after the {stack[-1][1]} it starts in (spans not nested)")
        stack.append([end, kind, end - start])
        calls[kind] = calls.get(kind, 0) + 1
        if len(stack) > 1:
            stack[-2][2] -= end - start
    for e, k, child in stack:
        out[k] = out.get(k, 0) + child
    return out, calls, problems


MODULE_COLUMNS = {"request": pl.Int64, "phase": pl.Utf8, "step": pl.Int64, "module_kind": pl.Utf8,
                  "ms": pl.Float64, "calls": pl.Int64, "flag": pl.Utf8}


def module_table(spans: pl.DataFrame, phases: pl.DataFrame) -> pl.DataFrame:
    """Per phase instance and module kind: exclusive time (``ms``) and how many spans
    (``calls``), with ``other`` = the rest of the phase (``calls`` null), so the kinds of a phase
    sum to it. ``other`` is never clamped: where it comes out negative (spans that are not nested)
    its row says why in ``flag``. Spans that lie in no phase are kept as rows with a null phase
    and step (flagged), never dropped.

    `spans`: ``request, module_kind, start_ns, end_ns`` (and ``config_id``, ``repeat`` when the
    phases have them); `phases`: ``request, phase, step, start_ns, end_ns``."""
    keys = [k for k in ("config_id", "repeat") if k in phases.columns and k in spans.columns]
    out: list[dict[str, Any]] = []
    by_request: dict[tuple, list[tuple[int, int, str]]] = {}
    for row in spans.iter_rows(named=True):
        by_request.setdefault(tuple(row[k] for k in (*keys, "request")), []).append(
            (row["start_ns"], row["end_ns"], row["module_kind"]))
    placed: set[tuple] = set()
    starts: dict[tuple, list[int]] = {}
    for key, items in by_request.items():  # by start, so each phase looks only at its own stretch
        items.sort()
        starts[key] = [item[0] for item in items]
    for p in phases.sort("start_ns").iter_rows(named=True):
        key = tuple(p[k] for k in (*keys, "request"))
        items = by_request.get(key, [])
        first = bisect.bisect_left(starts.get(key, []), p["start_ns"])
        last = bisect.bisect_right(starts.get(key, []), p["end_ns"])
        inside = [s for s in items[first:last] if s[1] <= p["end_ns"]]
        if not inside:
            continue
        placed.update((key, s) for s in inside)
        times, calls, problems = _exclusive(inside)
        other = (p["end_ns"] - p["start_ns"]) - sum(times.values())
        if other < 0:
            problems.append(f"module spans sum to more than the phase ({other / 1e6:.6f} ms left)")
        flag = "; ".join(problems) if problems else None
        base = {**{k: p[k] for k in keys}, "request": p["request"], "phase": p["phase"], "step": p["step"]}
        for kind in sorted(times):
            out.append({**base, "module_kind": kind, "ms": times[kind] / 1e6, "calls": calls[kind],
                        "flag": flag})
        out.append({**base, "module_kind": "other", "ms": other / 1e6, "calls": None, "flag": flag})
    outside: dict[tuple, list[tuple[int, int, str]]] = {}
    for key, items in by_request.items():
        for s in items:
            if (key, s) not in placed:
                outside.setdefault(key, []).append(s)
    for key, items in outside.items():
        times, calls, _ = _exclusive(items)
        base = {**dict(zip(keys, key[:-1])), "request": key[-1], "phase": None, "step": None}
        for kind in sorted(times):
            out.append({**base, "module_kind": kind, "ms": times[kind] / 1e6, "calls": calls[kind],
                        "flag": "outside every phase"})
    schema = {**{k: phases.schema[k] for k in keys}, **MODULE_COLUMNS}
    return pl.DataFrame(out, schema=schema, orient="row")
