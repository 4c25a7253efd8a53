"""`molmo-latency inspect MODEL`: the phase map, what was not found and the knobs that apply,
before anything is measured.

MODEL is a reference preset, a local Hugging Face model directory (its config.json) or a
transformers model class name (its default config). The model is built on the meta device: no
weights are read or allocated, nothing runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from molmo_latency.cli.app import app, examples
from molmo_latency.errors import MolmoLatencyError

_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")


def open_for_inspection(name: str, *, trust_remote_code: bool = False):
    """(model on the meta device, what MODEL was read as) for a preset, a model directory or a
    transformers class name; a one-line error for anything else.

    >>> open_for_inspection("no-such-thing")
    Traceback (most recent call last):
    ...
    molmo_latency.errors.MolmoLatencyError: inspect no-such-thing: not a reference preset (tiny, molmoe-1b-shape), not a model directory (no config.json there) and not a transformers model class; pass one of those
    """
    import torch

    from molmo_latency.models import PRESETS, reference_vlm
    from molmo_latency.transformers_lines import check_version

    check_version()
    import transformers

    if name in PRESETS:
        with torch.device("meta"):
            return reference_vlm(name).model, f"reference preset {name}"
    path = Path(name)
    if (path / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                         local_files_only=True)
        errors = []
        for auto in _AUTO_CLASSES:
            cls = getattr(transformers, auto, None)
            if cls is None:
                continue
            try:
                with torch.device("meta"):
                    return cls.from_config(config, trust_remote_code=trust_remote_code), f"model directory {path}"
            except (ValueError, KeyError) as exc:
                errors.append(f"{auto}: {str(exc).splitlines()[0][:120]}")
        raise MolmoLatencyError(f"inspect {name}: cannot build a model from its config.json "
                                f"({'; '.join(errors)}); Molmo checkpoints need --trust-remote-code")
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and getattr(cls, "config_class", None):
        try:
            with torch.device("meta"):
                return cls(cls.config_class()), f"transformers class {name} (default config)"
        except ImportError as exc:
            raise MolmoLatencyError(f"inspect {name}: needs a package this environment lacks "
                                    f"({str(exc).strip().splitlines()[0][:160]})") from None
        except Exception as exc:  # a class whose default config does not build (needs real values)
            raise MolmoLatencyError(
                f"inspect {name}: its default config does not build a model ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:160]}); pass a model directory with its config.json") from None
    presets = ", ".join(PRESETS)
    raise MolmoLatencyError(f"inspect {name}: not a reference preset ({presets}), not a model directory "
                            "(no config.json there) and not a transformers model class; pass one of those")


def inspection(model: Any, source: str) -> dict[str, Any]:
    """What `inspect` shows, as data: the phase rows, the knob rows, the image token id."""
    from molmo_latency.adapters import find_phases, image_token_id, phase_rows
    from molmo_latency.knobs import knob_ranges
    from molmo_latency.profiler import generate_refusal

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = find_phases(model).layout
    return {"model": source, "class": type(model).__name__, "layout": layout,
            "image_token_id": image_token_id(model), "phases": phase_rows(model), "knobs": knob_ranges(model),
            "refused": generate_refusal(model, ("generate",))}


@app.command("inspect", epilog=examples("molmo-latency inspect tiny",
                                        "molmo-latency inspect Qwen2VLForConditionalGeneration --json"))
def inspect_command(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="reference preset, local HF model directory, or transformers class name"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow a local checkpoint's own code"),
    json_out: bool = typer.Option(False, "--json", help="print as JSON"),
    wide: bool = typer.Option(False, "--wide", help="show every column at its natural width"),
) -> None:
    """Show the phase map found in MODEL, what was not found, and the knobs that apply, before anything is measured."""
    import polars as pl

    from molmo_latency.show import console, print_frame, print_json, set_wide

    set_wide(wide)
    found = inspection(*open_for_inspection(model, trust_remote_code=trust_remote_code))
    if json_out:
        print_json(found)
        return
    tokens = ("image tokens counted from image_input_idx" if found["layout"] == "molmo"
              else f"image token id {found['image_token_id']}" if found["image_token_id"] is not None
              else "no image token id in the config (image tokens counted from a position mask, if given)")
    console.print(f"{found['class']} ({found['model']}): layout {found['layout']}, {tokens}")
    if found["refused"]:
        console.print(f"profile_phases refuses this model: {found['refused']}")
    print_frame(pl.DataFrame(found["phases"]), "phases")
    missing = [r for r in found["phases"] if not r["found"]]
    if missing:
        console.print("not found: " + "; ".join(f"{r['phase']}: {r['note']}" for r in missing))
    print_frame(pl.DataFrame(found["knobs"]), "knobs")
