"""Adapters: where the phases of a VLM live, as module paths.

A phase is timed from a forward *pre*-hook on its start module to a forward hook on its end
module (often the same module). The LLM phase (`llm`) covers one forward of the text model
(decoder blocks and LM head); its first call in a request is `prefill`, later calls are
`decode` steps.

Known layouts:

- ``llava``: LLaVA-style HF models (LLaVA, AyaVision, the reference model, HF Molmo2):
  ``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model`` + ``lm_head``
  on transformers 5.x; ``vision_tower``, ``multi_modal_projector``, ``language_model`` on 4.5x.
- ``molmo``: the Molmo / MolmoE remote-code layout: ``model.vision_backbone.image_vit`` (vision),
  ``image_pooling_2d`` .. ``image_projector`` (projector), ``model.transformer.blocks[0]`` ..
  ``lm_head`` (or ``ff_out`` / ``ln_f`` with tied weights) (LLM).

Any other model: pass an explicit mapping, phase name to a module path or a (start, end) pair.

Example:
    >>> from molmo_latency.models import reference_vlm
    >>> m = reference_vlm("tiny").model
    >>> found = find_phases(m)
    >>> found.layout, sorted(found.spans)
    ('llava', ['llm', 'projector', 'vision'])
    >>> find_phases(m, {"llm": found.describe()["llm"]}).layout
    'explicit'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch

from molmo_latency.errors import AdapterError
from molmo_latency.transformers_lines import LLM_SPANS, PROJECTOR_PATHS, VISION_PATHS

PathSpec = Union[str, Sequence[str]]
ADAPTER_PHASES = ("vision", "projector", "llm")


@dataclass(frozen=True)
class PhaseSpan:
    """One phase: timed from a pre-hook on `start` to a hook on `end`."""

    start_path: str
    end_path: str
    start: torch.nn.Module = field(repr=False, compare=False)
    end: torch.nn.Module = field(repr=False, compare=False)


@dataclass(frozen=True)
class PhaseMap:
    """Where each phase lives in one model."""

    layout: str
    spans: dict[str, PhaseSpan]
    image_token_id: int | None = None

    def describe(self) -> dict[str, tuple[str, str]]:
        return {name: (s.start_path, s.end_path) for name, s in self.spans.items()}


# Candidate paths per layout: phase -> list of (start, end) alternatives, tried in order.
LAYOUTS: dict[str, dict[str, list[tuple[str, str]]]] = {
    # the LLaVA-style paths differ between transformers lines: see transformers_lines
    "llava": {
        "vision": [(p, p) for p in VISION_PATHS],
        "projector": [(p, p) for p in PROJECTOR_PATHS],
        "llm": list(LLM_SPANS),
    },
    "molmo": {
        "vision": [("model.vision_backbone.image_vit", "model.vision_backbone.image_vit"),
                   ("vision_backbone.image_vit", "vision_backbone.image_vit")],
        "projector": [("model.vision_backbone.image_pooling_2d", "model.vision_backbone.image_projector"),
                      ("vision_backbone.image_pooling_2d", "vision_backbone.image_projector")],
        # blocks through the LM head: MolmoForCausalLM.lm_head (untied weights), else the
        # transformer's own ff_out, else the final norm (tied weights: logits are a plain F.linear)
        "llm": [("model.transformer.blocks.0", "lm_head"),
                ("model.transformer.blocks.0", "model.transformer.ff_out"),
                ("model.transformer.blocks.0", "model.transformer.ln_f"),
                ("transformer.blocks.0", "transformer.ff_out"),
                ("transformer.blocks.0", "transformer.ln_f")],
    },
}


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The submodule at a dotted path ('' is the model), or None."""
    module = model
    for part in path.split(".") if path else ():
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and part.isdigit():
            idx = int(part)
            module = module[idx] if idx < len(module) else None
        else:
            module = getattr(module, part, None)
        if not isinstance(module, torch.nn.Module):
            return None
    return module


def _image_token_id(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("image_token_id", "image_token_index", "image_patch_id"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


def _span(model: torch.nn.Module, start: str, end: str) -> PhaseSpan | None:
    s, e = get_module(model, start), get_module(model, end)
    if s is None or e is None:
        return None
    return PhaseSpan(start, end, s, e)


def _from_layout(model: torch.nn.Module, layout: str) -> PhaseMap | None:
    spans = {}
    for phase, candidates in LAYOUTS[layout].items():
        for start, end in candidates:
            span = _span(model, start, end)
            if span is not None:
                spans[phase] = span
                break
    if "llm" not in spans or "vision" not in spans:
        return None
    return PhaseMap(layout, spans, _image_token_id(model))


def find_phases(model: torch.nn.Module, mapping: Mapping[str, PathSpec] | None = None) -> PhaseMap:
    """Find the vision, projector and LLM modules of `model`.

    `mapping` (optional) names them explicitly: ``{"vision": path, "projector": path,
    "llm": (start_path, end_path)}``; only `llm` is required. Raises :class:`AdapterError`
    naming what was looked for when nothing fits.
    """
    if mapping is not None:
        return _explicit(model, mapping)
    for layout in LAYOUTS:
        found = _from_layout(model, layout)
        if found is not None:
            return found
    looked = "; ".join(
        f"{layout}: " + ", ".join(f"{ph}={'|'.join(s if s == e else f'{s}..{e}' for s, e in c)}"
                                  for ph, c in spec.items())
        for layout, spec in LAYOUTS.items()
    )
    raise AdapterError(
        f"cannot find the phases of {type(model).__name__}; looked for {looked}. "
        "Pass an explicit mapping, e.g. profile_phases(model, phases={'vision': 'path.to.vit', "
        "'projector': 'path.to.projector', 'llm': ('path.to.decoder', 'path.to.lm_head')})"
    )


def _explicit(model: torch.nn.Module, mapping: Mapping[str, PathSpec]) -> PhaseMap:
    unknown = set(mapping) - set(ADAPTER_PHASES)
    if unknown:
        raise AdapterError(
            f"unknown phase name(s) {sorted(unknown)} in the mapping; use {list(ADAPTER_PHASES)}"
        )
    if "llm" not in mapping:
        raise AdapterError("the phase mapping needs an 'llm' entry (the text model's forward)")
    spans = {}
    for phase, spec in mapping.items():
        start, end = (spec, spec) if isinstance(spec, str) else tuple(spec)
        span = _span(model, start, end)
        if span is None:
            missing = [p for p in (start, end) if get_module(model, p) is None]
            raise AdapterError(
                f"phase {phase!r}: {type(model).__name__} has no submodule {missing[0]!r}; "
                "check the path against model.named_modules()"
            )
        spans[phase] = span
    return PhaseMap("explicit", spans, _image_token_id(model))
