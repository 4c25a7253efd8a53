"""Where the reference model keeps its parts on the installed transformers line (4.5x and 5.x lay
LLaVA-style models out differently; see molmo_latency.transformers_lines)."""

from molmo_latency.adapters import find_phases
from molmo_latency.knobs import _block_list


def text_decoder(model):
    """The HF text decoder (the module with `.layers`)."""
    return _block_list(model)[0]


def phase_module(model, phase: str):
    """The module a phase starts at: 'vision', 'projector' or 'llm'."""
    return find_phases(model).spans[phase].start


def phase_paths(model) -> dict:
    """phase -> (start path, end path) as the adapter found them."""
    return find_phases(model).describe()
