"""`molmo-latency inspect MODEL`: the phase map, what was not found and the knobs, before
anything is measured (a preset, a model directory, a transformers class name)."""

from __future__ import annotations

import json

import pytest

from molmo_latency.cli.main import main

FIVE = pytest.mark.skipif(__import__("transformers").__version__.split(".")[0] != "5",
                          reason="the class names below are transformers 5.x classes")


def _inspect(capsys, *args: str) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@FIVE
def test_inspect_preset(capsys):
    found = _inspect(capsys, "tiny")
    phases = {r["phase"]: r for r in found["phases"]}
    assert phases["vision"]["modules"] == "model.vision_tower"
    assert phases["projector"]["modules"] == "model.multi_modal_projector"
    assert phases["llm"]["modules"] == "model.language_model..lm_head"
    knobs = {r["knob"]: r for r in found["knobs"]}
    # the tiny preset: OLMoE text model with 8 experts, top-2, 4 blocks (models.PRESETS)
    from molmo_latency.models import PRESETS

    p = PRESETS["tiny"]
    assert knobs["top_k"]["range"] == f"1..{p.experts}" and knobs["top_k"]["now"] == str(p.top_k)
    assert knobs["blocks"]["now"] == str(p.text_layers)


@FIVE
def test_inspect_class_name_says_projector_inside_vision_and_knobs_refused(capsys):
    found = _inspect(capsys, "Qwen2VLForConditionalGeneration")
    phases = {r["phase"]: r for r in found["phases"]}
    assert phases["vision"]["modules"] == "model.visual"
    assert phases["projector"]["modules"] == "model.visual.merger"
    assert "inside the vision module" in phases["projector"]["note"]
    knobs = {r["knob"]: r for r in found["knobs"]}
    assert knobs["top_k"]["applies"] is False and "no MoE router" in knobs["top_k"]["why_not"]
    assert knobs["blocks"]["applies"] is True


@FIVE
def test_inspect_two_towers_and_encoder_decoder(capsys):
    hybrid = {r["phase"]: r for r in _inspect(capsys, "DeepseekVLHybridForConditionalGeneration")["phases"]}
    assert hybrid["vision"]["modules"] == "model.high_res_vision_model, model.vision_model"
    assert hybrid["projector"]["modules"] == "model.high_res_vision_neck, model.high_res_vision_proj, model.aligner"
    florence = {r["phase"]: r for r in _inspect(capsys, "Florence2ForConditionalGeneration")["phases"]}
    assert florence["llm"]["modules"] == "model.language_model.encoder, model.language_model.decoder..lm_head"


@FIVE
def test_inspect_model_directory_of_a_saved_tiny_molmo2(tmp_path, capsys):
    from tests.vlm_families import by_name

    model, _ = by_name("molmo2").build()
    model.save_pretrained(tmp_path)
    found = _inspect(capsys, str(tmp_path))
    assert found["class"] == "Molmo2ForConditionalGeneration" and found["image_token_id"] == 100
    assert [r["found"] for r in found["phases"]] == [True, True, True]
    assert main(["inspect", str(tmp_path)]) == 0  # the tables, too
    out = capsys.readouterr().out
    assert "model.multi_modal_projector" in out and "blocks" in out


@FIVE
@pytest.mark.parametrize("name, message", [
    ("no-such-model", "not a reference preset"),
    ("ChameleonForConditionalGeneration", "its default config does not build a model"),
])
def test_inspect_bad_input_exits_2_in_one_line(name, message, capsys):
    assert main(["inspect", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("molmo-latency: error: inspect") and message in err and "\n" not in err


def test_inspect_is_listed_with_its_own_help():
    import typer

    import importlib

    from molmo_latency.cli.app import app
    from molmo_latency.cli.main import COMMANDS

    for module, _ in COMMANDS.values():  # every command registered: the app is a group
        importlib.import_module(module)

    own = typer.main.get_command(app).commands["inspect"].help
    assert COMMANDS["inspect"][1] == " ".join(own.split("\n\n")[0].split())


def test_inspect_a_molmoe_checkpoint_with_its_own_code(tmp_path, capsys):
    """MolmoE's remote code (transformers 4.5x): the molmo layout, its knobs, no weights read."""
    from tests.molmoe_fixtures import TINY_BLOCKS, TINY_EXPERTS, TINY_TOP_K, tiny_molmoe, write_checkpoint

    directory = write_checkpoint(tiny_molmoe(), tmp_path / "molmoe")
    found = _inspect(capsys, str(directory), "--trust-remote-code")
    assert found["layout"] == "molmo"
    phases = {r["phase"]: r["modules"] for r in found["phases"]}
    assert phases["vision"] == "model.vision_backbone.image_vit"
    assert phases["projector"] == "model.vision_backbone.image_pooling_2d..model.vision_backbone.image_projector"
    knobs = {r["knob"]: r for r in found["knobs"]}
    assert knobs["top_k"]["range"] == f"1..{TINY_EXPERTS}" and knobs["top_k"]["now"] == str(TINY_TOP_K)
    assert knobs["blocks"]["now"] == str(TINY_BLOCKS)
