"""What differs between the two transformers lines we support, in one place.

- **4.5x** (4.51.3 is the anchor): the line MolmoE's own model code needs (it relies on
  ``PreTrainedModel`` inheriting ``GenerationMixin`` and on a legacy tuple KV cache).
- **5.x** (the newest release is tested): the line LLaVA-style HF models move with.

Differences handled here, and nowhere else:

- ``from_pretrained`` takes ``torch_dtype=`` on 4.5x and ``dtype=`` on 5.x (4.5x hands an
  unknown ``dtype=`` to the model's ``__init__``): :func:`dtype_kwargs`.
- Module layout of LLaVA-style models (AyaVision, the reference model): on 5.x the text decoder
  is ``model.language_model`` and ``lm_head`` sits on the outer model; on 4.5x
  ``language_model`` is a whole ``...ForCausalLM`` with the decoder at
  ``language_model.model`` and its own ``lm_head``: :data:`TEXT_DECODER_PATHS`,
  :data:`LLM_SPANS`, :data:`VISION_PATHS`, :data:`PROJECTOR_PATHS`.

Example:
    >>> sorted(dtype_kwargs(None))
    []
    >>> supported_range()
    '>=4.51,<6'
"""

from __future__ import annotations

import re
from typing import Any

from molmo_latency.errors import MolmoLatencyError

#: The supported range, as in pyproject.toml (both ends are tested in CI).
MIN_VERSION = (4, 51)
MAX_MAJOR_EXCLUSIVE = 6

# Candidate module paths, tried in order; each names the line that lays a model out that way.
VISION_PATHS = (
    "model.vision_tower",   # 5.x LLaVA-style (AyaVision, LLaVA, Molmo2)
    "vision_tower",         # 4.5x LLaVA-style
    "model.visual",
)
PROJECTOR_PATHS = (
    "model.multi_modal_projector",  # 5.x
    "multi_modal_projector",        # 4.5x
)
# (start, end) of one LLM forward: decoder blocks through the LM head.
LLM_SPANS = (
    ("model.language_model", "lm_head"),    # 5.x: decoder inside .model, lm_head outside
    ("language_model", "lm_head"),          # 4.5x with lm_head on the outer model
    ("language_model", "language_model"),   # 4.5x: language_model is a ForCausalLM (own lm_head)
)
# Where the HF text decoder (a module with .layers and .config.num_hidden_layers) lives.
TEXT_DECODER_PATHS = (
    "model.language_model",   # 5.x LLaVA-style
    "language_model.model",   # 4.5x LLaVA-style (language_model is a ForCausalLM)
    "language_model",
    "model.text_model",
    "model",                  # a plain decoder-only model
    "",
)


def _parse(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise MolmoLatencyError(f"cannot read the transformers version {version!r}")
    return int(m.group(1)), int(m.group(2))


def supported_range() -> str:
    return f">={MIN_VERSION[0]}.{MIN_VERSION[1]},<{MAX_MAJOR_EXCLUSIVE}"


def installed_version() -> str:
    """The installed transformers version (from its package metadata: no import needed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        raise MolmoLatencyError(
            f"transformers is not installed; molmo-latency needs transformers {supported_range()}"
        ) from None


def check_version(version: str | None = None) -> str:
    """The installed transformers version, or a one-line error naming it and the supported range."""
    if version is None:
        version = installed_version()
    major_minor = _parse(version)
    if major_minor < MIN_VERSION or major_minor[0] >= MAX_MAJOR_EXCLUSIVE:
        raise MolmoLatencyError(
            f"transformers {version} is not supported; molmo-latency needs transformers "
            f"{supported_range()} (4.51.3 for MolmoE's own model code, or the newest 5.x)"
        )
    return version


def is_4x(version: str | None = None) -> bool:
    """True on the 4.5x line."""
    return _parse(check_version(version))[0] == 4


def dtype_kwargs(dtype: Any, version: str | None = None) -> dict[str, Any]:
    """The ``from_pretrained`` keyword for a weight dtype on the installed line."""
    if dtype is None:
        return {}
    return {"torch_dtype" if is_4x(version) else "dtype": dtype}
