"""Adapters: where the phases of a VLM live.

A phase is timed from a forward *pre*-hook on its start module to a forward hook on its end
module (often the same module). The LLM phase (`llm`) covers one forward of the text model
(decoder blocks and LM head); its first call in a request is `prefill`, later calls are
`decode` steps. A phase may have several parts (two vision towers: each run is one instance of
the phase) and a part may be a method rather than a module (``vqmodel.encode``: image tokenizers
that are called through a method, where a forward hook never fires).

How the phases are found, in order:

1. ``molmo``: the Molmo / MolmoE remote-code layout, by path: ``model.vision_backbone.image_vit``
   (vision), ``image_pooling_2d`` .. ``image_projector`` (projector), ``model.transformer.blocks[0]``
   .. ``lm_head`` (or ``ff_out`` / ``ln_f`` with tied weights) (LLM).
2. ``discovered``: from what transformers models expose, with no list of paths, so that a new
   family works without a code change (:func:`discover_phases`):

   - LLM: ``get_decoder()`` (else the base model, where the config is the text config) through
     ``get_output_embeddings()`` (the LM head); for an encoder-decoder model ``get_encoder()`` too
     (the encoder pass is part of the prefill). When the decoder holds the vision module itself
     (Chameleon, GIT), the LLM starts at its first block (its block list, however deep, outside
     the image modules); with no such list the model is refused in one line.
   - vision: the outermost modules whose ``config`` is one of the model's vision sub-configs
     (``vision_config``, ``high_res_vision_config``, ...) or whose attribute name says vision
     (:data:`VISION_NAMES`), outside the text decoder's blocks; audio towers are not vision.
     An image tokenizer (a VQ model with ``encode``, or a module with ``encode`` and no
     ``forward``: Apertus 1.5) is timed through its ``encode`` method. A
     model with a vision sub-config and no vision tower: its patch embedder named like a projector
     is the vision phase (Gemma 4 unified's ``embed_vision``).
   - projector: the outermost modules named like a projector (:data:`PROJECTOR_NAMES`) outside
     the vision and text modules, each timed as one instance (where a module list is named like
     projectors, ``layerwise_projectors``, each of its modules is one: a list is never called
     itself; Granite 4 Vision); else one inside the vision module
     is *reported* (:attr:`PhaseMap.projector_inside_vision`: its time is in ``vision_ms``);
     else the modules with weights beside the vision module that are no part of the text model
     (Ovis2's ``visual_embeddings_table``); else a warning says no projector was found (its time
     falls in ``embed_merge_ms``).
3. ``llava``: the LLaVA-style paths of both transformers lines (:mod:`transformers_lines`),
   as a fallback.

Any other model: pass an explicit mapping, phase name to a path, a (start, end) pair, or a list of
those (several parts); a path may end in a method name (``"model.vqmodel.encode"``).

Example:
    >>> from molmo_latency.models import reference_vlm
    >>> m = reference_vlm("tiny").model
    >>> found = find_phases(m)
    >>> found.layout, sorted(found.spans), found.projector_inside_vision
    ('discovered', ['llm', 'projector', 'vision'], False)
    >>> find_phases(m, {"llm": found.describe()["llm"]}).layout
    'explicit'
    >>> vision, projector = found.describe()["vision"][0], found.describe()["projector"][0]
    >>> two = find_phases(m, {"vision": [vision, projector], "llm": found.describe()["llm"]})
    >>> len(two.describe()["vision"]), two.missing
    (2, ('projector',))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from molmo_latency.errors import AdapterError
from molmo_latency.transformers_lines import LLM_SPANS, PROJECTOR_PATHS, VISION_PATHS

PathSpec = Union[str, Sequence[str], Sequence[Union[str, Sequence[str]]]]
ADAPTER_PHASES = ("vision", "projector", "llm")

#: Attribute names of vision modules (the last part of a module's path).
VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_tower",
                "video_tower", "high_res_vision_model", "vision_backbone", "image_encoder",
                "vqmodel", "vision_embed_tokens", "vision_tokenizer", "vision")
#: Attribute names of projectors (modules between the vision output and the text model).
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "projector", "merger", "resampler",
                   "resampler_model", "vision_resampler", "vision_adapter", "connector", "aligner",
                   "adapter", "image_projector", "qformer", "language_projection",
                   "image_to_text_projection", "vision_projection", "visual_projection",
                   "vision_proj", "image_projection", "mlp1", "high_res_vision_neck",
                   "high_res_vision_proj", "perceiver", "embed_vision", "vision_neck")
#: Name parts that rule a module out of vision / projector (audio towers, image generation heads).
EXCLUDED_NAME_PARTS = ("audio", "generation", "speech")
#: Attribute names of a text decoder's block list.
BLOCK_LIST_NAMES = ("layers", "layer", "blocks", "h")


class _MethodHooks:
    """Forward-style hooks on one method of one module instance (``vqmodel.encode``).

    The method is wrapped on the instance while a hook is registered; the last handle removed puts
    the original back (or removes the instance attribute it never had)."""

    _installed: dict[tuple[int, str], "_MethodHooks"] = {}

    def __init__(self, owner: torch.nn.Module, name: str):
        self.owner, self.name = owner, name
        self.own = name in vars(owner)
        self.original = getattr(owner, name)
        self.pre: list[Callable] = []
        self.post: list[Callable] = []
        hooks = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for hook in list(hooks.pre):
                hook(owner, args)
            out = hooks.original(*args, **kwargs)
            for hook in list(hooks.post):
                hook(owner, args, out)
            return out

        object.__setattr__(owner, name, wrapper)

    @classmethod
    def of(cls, owner: torch.nn.Module, name: str) -> "_MethodHooks":
        key = (id(owner), name)
        if key not in cls._installed:
            cls._installed[key] = cls(owner, name)
        return cls._installed[key]

    def remove(self, kind: str, hook: Callable) -> None:
        hooks = self.pre if kind == "pre" else self.post
        if hook in hooks:
            hooks.remove(hook)
        if self.pre or self.post:
            return
        if self.own:
            object.__setattr__(self.owner, self.name, self.original)
        else:
            object.__delattr__(self.owner, self.name)
        self._installed.pop((id(self.owner), self.name), None)


class _Handle:
    def __init__(self, remove: Callable[[], None]):
        self.remove = remove


@dataclass(frozen=True)
class MethodTarget:
    """A method of a module, hooked like a module's forward (``register_forward_*hook``)."""

    owner: torch.nn.Module
    name: str

    def register_forward_pre_hook(self, hook: Callable) -> _Handle:
        hooks = _MethodHooks.of(self.owner, self.name)
        hooks.pre.append(hook)
        return _Handle(lambda: hooks.remove("pre", hook))

    def register_forward_hook(self, hook: Callable) -> _Handle:
        hooks = _MethodHooks.of(self.owner, self.name)
        hooks.post.append(hook)
        return _Handle(lambda: hooks.remove("post", hook))


@dataclass(frozen=True)
class HookGroup:
    """Several hook targets that mark one phase (each run of any of them is one instance)."""

    targets: tuple[Any, ...]

    def register_forward_pre_hook(self, hook: Callable) -> _Handle:
        handles = [t.register_forward_pre_hook(hook) for t in self.targets]
        return _Handle(lambda: [h.remove() for h in handles] and None)

    def register_forward_hook(self, hook: Callable) -> _Handle:
        handles = [t.register_forward_hook(hook) for t in self.targets]
        return _Handle(lambda: [h.remove() for h in handles] and None)


@dataclass(frozen=True)
class PhaseSpan:
    """One phase: timed from a pre-hook on `start` to a hook on `end`.

    With several `parts` (start path, end path), `start` and `end` are :class:`HookGroup`s and
    `start_path` / `end_path` name the first part."""

    start_path: str
    end_path: str
    start: Any = field(repr=False, compare=False)
    end: Any = field(repr=False, compare=False)
    parts: tuple[tuple[str, str], ...] = ()

    def describe(self) -> tuple[str, str] | list[tuple[str, str]]:
        if len(self.parts) > 1:
            return list(self.parts)
        return (self.start_path, self.end_path)


@dataclass(frozen=True)
class PhaseMap:
    """Where each phase lives in one model, and what could not be found.

    `projector_inside_vision`: True when the projector runs inside the vision module (its time is
    part of ``vision_ms``; `projector_path` names it), False when it is timed as its own phase,
    None when no projector was found. `missing` lists, in words, what was looked for and not
    found. `encoder_decoder`: the LLM phase includes an encoder pass (part of the prefill)."""

    layout: str
    spans: dict[str, PhaseSpan]
    image_token_id: int | None = None
    projector_inside_vision: bool | None = None
    projector_path: str | None = None
    missing: tuple[str, ...] = ()
    encoder_decoder: bool = False

    def describe(self) -> dict[str, tuple[str, str] | list[tuple[str, str]]]:
        return {name: s.describe() for name, s in self.spans.items()}


# Candidate paths per layout: phase -> list of (start, end) alternatives, tried in order.
LAYOUTS: dict[str, dict[str, list[tuple[str, str]]]] = {
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
    # the LLaVA-style paths differ between transformers lines: see transformers_lines
    "llava": {
        "vision": [(p, p) for p in VISION_PATHS],
        "projector": [(p, p) for p in PROJECTOR_PATHS],
        "llm": list(LLM_SPANS),
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


def get_target(model: torch.nn.Module, path: str) -> Any:
    """The module at `path`, or a :class:`MethodTarget` when the path ends in a method of a
    module (``"model.vqmodel.encode"``); None when neither."""
    module = get_module(model, path)
    if module is not None:
        return module
    owner_path, _, name = path.rpartition(".")
    owner = get_module(model, owner_path)
    if owner is not None and name and callable(getattr(owner, name, None)) \
            and not isinstance(getattr(owner, name), torch.nn.Module):
        return MethodTarget(owner, name)
    return None


# ---------------------------------------------------------------------------- image tokens
_IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index", "image_patch_id", "image_token",
                      "img_context_token_id", "image_pad_token_id", "image_patch_token_id",
                      "image_context_token_id", "image_seq_token_id")


def image_token_id(model_or_config: Any) -> int | None:
    """The id that marks an image position in input_ids, wherever the config keeps it: on the
    config (``image_token_id``, ``image_token_index``, ...), its ``vision_config`` or
    ``text_config``, or a ``vocabulary_map`` entry ``"<image>"`` (Chameleon); for a model with no
    image id, the video placeholder id (a video-only model: InstructBLIP-Video); None if none."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for holder in (cfg, getattr(cfg, "vision_config", None), getattr(cfg, "text_config", None)):
        if holder is None:
            continue
        for attr in _IMAGE_TOKEN_ATTRS:
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    vocab = getattr(cfg, "vocabulary_map", None)
    if isinstance(vocab, Mapping) and isinstance(vocab.get("<image>"), int):
        return vocab["<image>"]
    for attr in ("video_token_index", "video_token_id"):  # a video-only model (InstructBLIP-Video):
        value = getattr(cfg, attr, None)                  # its frames' placeholders
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


_image_token_id = image_token_id  # the earlier private name


# ---------------------------------------------------------------------------------- spans
def _span(model: torch.nn.Module, start: str, end: str) -> PhaseSpan | None:
    s, e = get_target(model, start), get_target(model, end)
    if s is None or e is None:
        return None
    return PhaseSpan(start, end, s, e, ((start, end),))


def _group(model: torch.nn.Module, parts: Sequence[tuple[str, str]]) -> PhaseSpan:
    """One phase of one or several parts (each a (start, end) pair of paths that resolve)."""
    if len(parts) == 1:
        span = _span(model, *parts[0])
        assert span is not None
        return span
    starts = tuple(get_target(model, s) for s, _ in parts)
    ends = tuple(get_target(model, e) for _, e in parts)
    return PhaseSpan(parts[0][0], parts[0][1], HookGroup(starts), HookGroup(ends), tuple(parts))


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
    inside = False if "projector" in spans else None
    return PhaseMap(layout, spans, image_token_id(model), projector_inside_vision=inside,
                    projector_path=spans["projector"].start_path if "projector" in spans else None,
                    missing=() if "projector" in spans else ("projector",))


# ------------------------------------------------------------------------------- discovery
def _inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


def _outermost(paths: list[str]) -> list[str]:
    return [p for p in paths if not any(q != p and _inside(p, q) for q in paths)]


def _call(model: torch.nn.Module, name: str) -> Any:
    method = getattr(model, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # e.g. NotImplementedError from a base class
        return None


def _block_list_path(decoder_path: str, decoder: torch.nn.Module, depth: int = 1) -> str | None:
    """The path of a text model's block list: its own, or its text child's (T5Gemma2's encoder
    holds ``text_model`` beside the vision tower)."""
    for name in BLOCK_LIST_NAMES:
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return f"{decoder_path}.{name}" if decoder_path else name
    for name in ("text_model", "language_model") if depth else ():
        inner = getattr(decoder, name, None)
        if isinstance(inner, torch.nn.Module):
            return _block_list_path(f"{decoder_path}.{name}" if decoder_path else name, inner, 0)
    return None


def _nested_block_list(model: torch.nn.Module, decoder_path: str, image_modules: Sequence[str]) -> str | None:
    """The outermost non-empty block list (a ModuleList named like :data:`BLOCK_LIST_NAMES`) inside
    the text decoder and outside every image module, or None."""
    found = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and n.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES
             and _inside(n, decoder_path) and not any(_inside(n, p) for p in image_modules)]
    outer = _outermost(found)
    return outer[0] if len(outer) == 1 else None


def _sibling_projectors(model: torch.nn.Module, vision: Sequence[str], text: Sequence[str]) -> list[str]:
    """Where no module is named like a projector: the modules beside the vision module (children
    of its parent) that hold weights and are no part of the text model (decoder, encoder, LM head,
    input embeddings), e.g. Ovis2's ``visual_embeddings_table``. None where the vision module sits
    inside the text decoder (its siblings are the decoder's own parts)."""
    embeddings = _call(model, "get_input_embeddings")
    names = {id(m): n for n, m in model.named_modules()}
    embed_path = names.get(id(embeddings)) if isinstance(embeddings, torch.nn.Module) else None
    text = [*text, *([embed_path] if embed_path is not None else [])]
    found = []
    for v in vision:
        parent_path = v.rsplit(".", 1)[0] if "." in v else ""
        if any(_inside(parent_path, t) for t in text if t):
            continue  # the vision module is a part of the text model (Chameleon)
        parent = get_module(model, parent_path)
        for child, module in parent.named_children() if parent is not None else ():
            path = f"{parent_path}.{child}" if parent_path else child
            if (path in vision or _excluded(path) or any(_inside(path, t) or _inside(t, path) for t in text)
                    or isinstance(module, (torch.nn.ParameterList, torch.nn.ParameterDict))
                    or not any(True for _ in module.parameters())):
                continue
            found.append(path)
    return _outermost(sorted(set(found)))


def _in_projector_list(model: torch.nn.Module, path: str) -> bool:
    """Is `path` one module of a module list named like projectors (``projectors``,
    ``spatial_projectors``: a projector name in the plural, alone or after a prefix)? A list is
    never called, so its modules are the projector's instances (Granite 4 Vision's window Q-Formers)."""
    list_path, _, index = path.rpartition(".")
    if not index.isdigit() or not isinstance(get_module(model, list_path), torch.nn.ModuleList):
        return False
    name = list_path.rsplit(".", 1)[-1]
    return any(name == f"{p}s" or name.endswith(f"_{p}s") for p in PROJECTOR_NAMES)


def _vision_configs(cfg: Any) -> list[Any]:
    found = []
    for name, value in vars(cfg).items() if cfg is not None else ():
        if "vision" in name and "config" in name and value is not None and not isinstance(value, (dict, str)):
            found.append(value)
    return found


def _excluded(path: str) -> bool:
    return any(part in path for part in EXCLUDED_NAME_PARTS)


def _owns(module: torch.nn.Module, cfg: Any) -> bool:
    """Is `module` built from the sub-config `cfg`: the same object (5.x), or a copy of it (a
    config of the same class: 4.5x's from_config copies it)?"""
    own = getattr(module, "config", None)
    return own is cfg or (own is not None and type(own) is type(cfg) and type(cfg).__name__ != "PretrainedConfig")


def _text_decoder(model: torch.nn.Module, names: dict[int, str]) -> torch.nn.Module | None:
    """The text decoder: ``get_decoder()``; where a model has none (some 4.5x VLMs), the
    outermost module whose config is the model's ``text_config`` (followed through its own
    ``get_decoder()`` when it is a whole ...ForCausalLM), or, with no ``text_config`` (the model's
    config is the text config: 4.5x GIT), its ``base_model``."""
    decoder = _call(model, "get_decoder")
    if isinstance(decoder, torch.nn.Module) and id(decoder) in names and decoder is not model:
        return decoder
    text_cfg = getattr(getattr(model, "config", None), "text_config", None)
    if text_cfg is None:
        if isinstance(decoder, torch.nn.Module) and id(decoder) in names:
            return decoder
        base = getattr(model, "base_model", None)  # the config is the text config (4.5x GIT): its base model
        return base if isinstance(base, torch.nn.Module) and base is not model and id(base) in names else None
    owners = _outermost([n for n, m in model.named_modules() if n and _owns(m, text_cfg)])
    if not owners:
        return None
    found = get_module(model, owners[0])
    inner = _call(found, "get_decoder")
    return inner if isinstance(inner, torch.nn.Module) and id(inner) in names else found


def discover_phases(model: torch.nn.Module) -> PhaseMap | None:
    """The phases of `model` from what transformers models expose (see the module docstring);
    None when no text decoder or no vision module is found this way."""
    names = {id(m): n for n, m in model.named_modules()}
    decoder = _text_decoder(model, names)
    if decoder is None:
        return None
    decoder_path = names[id(decoder)]
    head = _call(model, "get_output_embeddings")
    head_path = names.get(id(head)) if isinstance(head, torch.nn.Module) else None
    encoder = _call(model, "get_encoder") if getattr(getattr(model, "config", None),
                                                     "is_encoder_decoder", False) else None
    encoder_path = names.get(id(encoder)) if isinstance(encoder, torch.nn.Module) else None
    if encoder_path is not None and (_inside(decoder_path, encoder_path) or encoder is model):
        encoder_path = None
    if encoder_path is not None and _inside(encoder_path, decoder_path):
        # get_decoder() gave the whole encoder-decoder text model: its decoder is the LLM part
        inner = getattr(decoder, "decoder", None)
        if isinstance(inner, torch.nn.Module) and id(inner) in names:
            decoder, decoder_path = inner, names[id(inner)]
    blocks_path = _block_list_path(decoder_path, decoder)
    # the text model's own blocks and LM head never hold a vision module or a projector
    text_inner = [p for p in (blocks_path, head_path) if p]
    if encoder_path is not None:
        enc_blocks = _block_list_path(encoder_path, encoder)
        if enc_blocks:
            text_inner.append(enc_blocks)
    vision_cfgs = _vision_configs(getattr(model, "config", None))

    def usable(path: str) -> bool:
        return bool(path) and not _excluded(path) and not any(_inside(path, t) for t in text_inner)

    def candidate(path: str, names_: Sequence[str]) -> bool:
        return usable(path) and path.rsplit(".", 1)[-1] in names_

    vision = []
    for path, module in model.named_modules():
        if not usable(path):
            continue
        by_config = any(_owns(module, c) for c in vision_cfgs)
        if by_config and path.rsplit(".", 1)[-1] in PROJECTOR_NAMES:
            continue  # a projector built from the vision config (DeepSeek-VL-hybrid's neck): not vision
        if by_config or candidate(path, VISION_NAMES):
            vision.append(path)
    # a vision module never holds the text decoder (that is the whole model, or its base model)
    vision = [p for p in _outermost(vision) if not _inside(decoder_path, p)]
    if not vision and encoder_path is not None and getattr(encoder, "main_input_name", None) == "pixel_values":
        vision = [encoder_path]  # an image encoder with a text decoder (VisionEncoderDecoderModel)
    if not vision and vision_cfgs:
        # a vision sub-config but no vision tower: the image path is one patch embedder named like a
        # projector (Gemma 4 unified's embed_vision); it is the vision phase, with no projector after it
        embedders = _outermost([n for n, _ in model.named_modules() if candidate(n, PROJECTOR_NAMES)])
        vision = [p for p in embedders if not _inside(decoder_path, p)]
    if not vision:
        return None
    vision_parts = []
    for path in vision:
        module = get_module(model, path)
        no_forward = type(module).forward is torch.nn.Module.forward
        if callable(getattr(module, "encode", None)) and ("vq" in type(module).__name__.lower() or no_forward):
            path = f"{path}.encode"  # an image tokenizer: called through encode(), not forward
        vision_parts.append((path, path))

    projectors = [n for n, _ in model.named_modules()
                  if (candidate(n, PROJECTOR_NAMES) or (usable(n) and _in_projector_list(model, n)))
                  and not any(_inside(n, v) for v in vision)]
    projectors = _outermost(projectors)
    # inside the vision module, a name ending in a projector's counts too (HY-V4-VL's patch_merger)
    inner_names = (*PROJECTOR_NAMES, *(f"{prefix}_{name}" for prefix in ("patch", "vision", "visual")
                                      for name in ("merger", "projector", "adapter")))
    inside_vision = _outermost([n for n, _ in model.named_modules()
                                if candidate(n, inner_names) and n not in vision
                                and any(_inside(n, v) for v in vision)])
    if not projectors and not inside_vision:
        projectors = _sibling_projectors(model, vision, [p for p in (decoder_path, encoder_path, head_path)
                                                         if p is not None])
    # the LLM: the decoder through the LM head, from its first block when it holds image modules
    llm_start = decoder_path
    image_modules = (*vision, *projectors)
    if any(_inside(p, decoder_path) for p in image_modules):
        if blocks_path is None:  # the blocks sit deeper (GIT: git.encoder.layer): the outermost block
            blocks_path = _nested_block_list(model, decoder_path, image_modules)  # list outside image modules
        if blocks_path is None:
            raise AdapterError(
                f"cannot find the phases of {type(model).__name__}: the image module {image_modules[0]!r} runs "
                f"inside the text decoder {decoder_path or '(the model)'!r} and no single block list outside it "
                "marks where the text model starts; pass profile_phases(model, phases={'vision': ..., "
                "'llm': ('path.to.first_block', 'path.to.lm_head')})")
        llm_start = f"{blocks_path}.0"
    llm_end = head_path if head_path is not None else decoder_path
    while head_path is not None and "." in llm_end:
        # the LM head's outermost holder that is not the text model (T5Gemma2's lm_head.out_proj
        # sits in lm_head, which soft-caps the logits after it): the LLM ends when it ends
        parent = llm_end.rsplit(".", 1)[0]
        if _inside(decoder_path, parent) or (encoder_path is not None and _inside(encoder_path, parent)):
            break
        llm_end = parent
    llm_parts = [(llm_start, llm_end)]
    if encoder_path is not None and not any(_inside(v, encoder_path) for v in vision):
        llm_parts.insert(0, (encoder_path, encoder_path))  # the encoder pass is prefill
    elif encoder_path is not None and encoder_path not in vision:
        # the encoder runs the vision module first, then its own blocks: those are prefill
        enc_blocks = _block_list_path(encoder_path, encoder)
        if enc_blocks and not any(_inside(v, enc_blocks) for v in vision):
            llm_parts.insert(0, (f"{enc_blocks}.0", encoder_path))
    spans = {"vision": _group(model, vision_parts)}
    missing = []
    if projectors:
        spans["projector"] = _group(model, [(p, p) for p in projectors])
        inside, projector_path = False, projectors[0]
    elif inside_vision:
        inside, projector_path = True, inside_vision[0]
    else:
        inside, projector_path = None, None
        missing.append("projector")
    spans["llm"] = _group(model, llm_parts)
    return PhaseMap("discovered", spans, image_token_id(model), projector_inside_vision=inside,
                    projector_path=projector_path, missing=tuple(missing),
                    encoder_decoder=len(llm_parts) > 1)


def find_phases(model: torch.nn.Module, mapping: Mapping[str, PathSpec] | None = None) -> PhaseMap:
    """Find the vision, projector and LLM modules of `model`.

    `mapping` (optional) names them explicitly: ``{"vision": path, "projector": path,
    "llm": (start_path, end_path)}``; a value may also be a list of paths / pairs (several parts,
    e.g. two vision towers) and a path may end in a method (``"model.vqmodel.encode"``); only
    `llm` is required. Without a mapping a model with no projector found gets a warning (its time
    falls in ``embed_merge_ms``). Raises :class:`AdapterError` naming what was found, what was
    looked for and the mapping to pass when nothing fits.
    """
    if mapping is not None:
        return _explicit(model, mapping)
    found = _from_layout(model, "molmo") or discover_phases(model) or _from_layout(model, "llava")
    if found is not None:
        if found.projector_inside_vision is None:
            warnings.warn(
                f"{type(model).__name__}: no projector found (looked for modules named "
                f"{', '.join(PROJECTOR_NAMES[:6])}, ...): its time, if it has one, is counted in "
                "embed_merge_ms; name it with profile_phases(model, phases={..., 'projector': "
                "'path.to.projector'})", stacklevel=3)
        return found
    raise AdapterError(_not_found_message(model))


def _not_found_message(model: torch.nn.Module) -> str:
    decoder = _call(model, "get_decoder")
    names = {id(m): n for n, m in model.named_modules()}
    decoder = _text_decoder(model, names)
    llm = (f"found the text decoder at {names[id(decoder)] or '(the model)'!r} but"
           if decoder is not None else "found no text decoder (get_decoder() gave none) and")
    looked = "; ".join(
        f"{layout}: " + ", ".join(f"{ph}={'|'.join(s if s == e else f'{s}..{e}' for s, e in c)}"
                                  for ph, c in spec.items())
        for layout, spec in sorted(LAYOUTS.items())
    )
    return (
        f"cannot find the phases of {type(model).__name__}: {llm} no vision module (looked "
        f"for modules owning a vision sub-config, named {'|'.join(VISION_NAMES)}, and the paths {looked}). "
        "Pass an explicit mapping, e.g. profile_phases(model, phases={'vision': 'path.to.vit', "
        "'projector': 'path.to.projector', 'llm': ('path.to.decoder', 'path.to.lm_head')}); "
        "`python -m molmo_latency inspect` lists what was found"
    )


def _parts(spec: Any) -> list[tuple[str, str]] | None:
    """A mapping value as (start, end) parts: a path, a (start, end) pair, or a list of those."""
    if isinstance(spec, str):
        return [(spec, spec)]
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(s, str) for s in spec):
        return [(spec[0], spec[1])]
    if isinstance(spec, (list, tuple)) and spec:
        parts = []
        for item in spec:
            sub = _parts(item) if not isinstance(item, (list, tuple)) or len(item) == 2 else None
            if sub is None or len(sub) != 1:
                return None
            parts.extend(sub)
        return parts
    return None


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
        parts = _parts(spec)
        if parts is None:
            raise AdapterError(
                f"phase {phase!r}: {spec!r} is not a path, a (start, end) pair or a list of those")
        for start, end in parts:
            missing = [p for p in (start, end) if get_target(model, p) is None]
            if missing:
                raise AdapterError(
                    f"phase {phase!r}: {type(model).__name__} has no submodule {missing[0]!r} (nor a method by that "
                    "path); check the path against model.named_modules()"
                )
        spans[phase] = _group(model, parts)
    inside = False if "projector" in spans else None
    return PhaseMap("explicit", spans, image_token_id(model), projector_inside_vision=inside,
                    projector_path=spans["projector"].start_path if "projector" in spans else None,
                    missing=tuple(p for p in ADAPTER_PHASES if p not in spans))


def phase_rows(model: torch.nn.Module, mapping: Mapping[str, PathSpec] | None = None) -> list[dict[str, Any]]:
    """The phase map found for `model`, one row per phase: ``phase``, ``found`` (bool), ``modules``
    (the parts, ``start..end`` where they differ), ``note`` (what was looked for, or where the
    projector runs). Reads the model only; the no-projector warning is said in the row instead.

    Example:
        >>> from molmo_latency.models import reference_vlm
        >>> [(r["phase"], r["found"], r["modules"].endswith("multi_modal_projector"))
        ...  for r in phase_rows(reference_vlm("tiny").model)]
        [('vision', True, False), ('projector', True, True), ('llm', True, False)]
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = find_phases(model, mapping)
    rows = []
    for phase in ADAPTER_PHASES:
        span = found.spans.get(phase)
        if span is not None:
            modules = ", ".join(s if s == e else f"{s}..{e}" for s, e in span.parts)
            note = {"vision": "several parts: each run is one vision instance" if len(span.parts) > 1 else None,
                    "projector": "each part is timed as one projector instance" if len(span.parts) > 1 else None,
                    "llm": ("the encoder pass and the first decoder step are the prefill"
                            if found.encoder_decoder else None)}[phase]
            rows.append({"phase": phase, "found": True, "modules": modules, "note": note})
        elif phase == "projector" and found.projector_inside_vision:
            rows.append({"phase": phase, "found": True, "modules": found.projector_path,
                         "note": "inside the vision module: its time is part of vision_ms"})
        else:
            rows.append({"phase": phase, "found": False, "modules": None,
                         "note": ("not found: its time, if any, falls in embed_merge_ms; looked for modules "
                                  f"named {', '.join(PROJECTOR_NAMES)}") if phase == "projector" else "not found"})
    return rows
