"""Knobs (MoE top-k, active blocks) on transformers VLM families, checked by what the model
itself does (the test's own hooks), and refused in one line where a model cannot take them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from molmo_latency import knobs, profile_phases
from molmo_latency.errors import MolmoLatencyError
from tests.test_vlm_families import model_state
from tests.vlm_families import EOS, PAD, Family, _molmo2_config, _molmo2_inputs, by_name

pytestmark = pytest.mark.skipif(
    __import__("transformers").__version__.split(".")[0] != "5",
    reason="these families are built on transformers 5.x")

GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)


def _layer_rope(model: torch.nn.Module, inputs: dict) -> dict[int, torch.Tensor]:
    """The cos table each decoder layer receives in one forward, keyed by the layer object."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in model.model.language_model.layers:
        def grab(module: Any, args: tuple, kwargs: dict) -> None:
            seen[id(module)] = kwargs["position_embeddings"][0].detach().clone()
        handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_molmo2_block_subset_keeps_each_layers_rope():
    """Molmo2 picks a layer's RoPE (scaled or not) by its place in the layer list; after
    blocks=[0, 3], block 3 must still get the scaled RoPE it gets in the full model."""
    fam = Family("molmo2", "Molmo2ForConditionalGeneration", _molmo2_config(layers=4, rope_scaling_layers=[3]),
                 _molmo2_inputs, {}, 4)
    model, inputs = fam.build()
    layers = list(model.model.language_model.layers)
    full = _layer_rope(model, inputs)
    assert not torch.equal(full[id(layers[0])], full[id(layers[3])])  # scaled and unscaled differ
    before = model_state(model)
    with knobs.configured(model, blocks=[0, 3]):
        assert knobs.get_block_indices(model) == (0, 3)
        cut = _layer_rope(model, inputs)
        assert set(cut) == {id(layers[0]), id(layers[3])}
        for block in (0, 3):
            torch.testing.assert_close(cut[id(layers[block])], full[id(layers[block])], rtol=0, atol=0)
        with profile_phases(model) as prof:
            model.generate(**inputs, **GEN)
        assert prof.report().requests["blocks_run"].to_list() == [2]
    assert model_state(model) == before
    assert list(model.model.language_model.layers) == layers
    again = _layer_rope(model, inputs)
    for block in range(4):
        torch.testing.assert_close(again[id(layers[block])], full[id(layers[block])], rtol=0, atol=0)


def test_qwen3_vl_moe_top_k_and_blocks_as_the_routers_and_layers_see_them():
    model, inputs = by_name("qwen3_vl_moe").build()
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    layers = list(model.model.language_model.layers)
    assert len(routers) == len(layers) == 2
    picked: list[int] = []
    ran: list[int] = []
    handles = [r.register_forward_hook(lambda m, a, out: picked.append(out[-1].shape[-1])) for r in routers]
    handles += [layer.register_forward_hook(lambda m, a, out, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        with knobs.configured(model, top_k=1, blocks=[1]):
            with profile_phases(model) as prof:
                model.generate(**inputs, **GEN)
        req = prof.report().requests.row(0, named=True)
    finally:
        for h in handles:
            h.remove()
    assert req["valid"], req["invalid_reason"]
    calls = 1 + req["decode_steps"]
    assert set(picked) == {1} and len(picked) == calls  # one router ran per LLM call, with top-1
    assert ran == [1] * calls  # only block 1 ran
    assert req["blocks_run"] == 1
    assert knobs.get_top_k(model) == 2 and knobs.get_block_indices(model) == (0, 1)


@pytest.mark.parametrize("name, knob, value, message", [
    ("llava", "top_k", 1, r"^top_k: LlavaForConditionalGeneration has no MoE router"),
    ("qwen3_vl_moe", "top_k", 5, r"^top_k=5 is out of range \(this model has 4 experts"),
    ("florence2", "blocks", 1, r"^blocks: Florence2ForConditionalGeneration has an encoder-decoder text model"),
    ("molmo2", "blocks", [1, 0], r"^blocks=\[1, 0\]: block indices must be sorted"),
    ("qwen3_5_moe", "blocks", [0], r"^blocks=\[0\]: Qwen3_5MoeForConditionalGeneration mixes linear-attention"),
])
def test_knob_refused_in_one_line_and_model_untouched(name, knob, value, message):
    model, _ = by_name(name).build()
    before = model_state(model)
    with pytest.raises(MolmoLatencyError, match=message) as info:
        with knobs.configured(model, **{knob: value}):
            pass
    assert "\n" not in str(info.value)
    assert model_state(model) == before


def test_blocks_run_found_through_get_decoder():
    """BLIP-2's language model is a whole OPTForCausalLM: its blocks are found through
    get_decoder() and the request row says how many ran."""
    model, inputs = by_name("blip-2").build()
    assert knobs.total_blocks(model) == len(model.language_model.model.decoder.layers) == 2
    with knobs.configured(model, blocks=1), profile_phases(model) as prof:
        model.generate(**inputs, **GEN)
    assert prof.report().requests["blocks_run"].to_list() == [1]


def test_molmo2_inputs_from_its_config_alone():
    """models.molmo2_inputs: image tokens where the model's own pooling puts image features, for
    several crops and rows (generate() itself checks features against placeholders)."""
    from molmo_latency.models import molmo2_inputs

    model, _ = by_name("molmo2").build()
    kw = molmo2_inputs(model, crops=2, prompt_tokens=4, batch_size=2)
    # 4x4 patches per crop pooled 2x2: 4 tokens per crop, 2 crops per row
    assert (kw["input_ids"] == model.config.image_token_id).sum(1).tolist() == [8, 8]
    assert tuple(kw["pixel_values"].shape) == (4, 16, 8 * 8 * 3)
    with profile_phases(model) as prof:
        model.generate(**kw, **GEN)
    req = prof.report().requests.row(0, named=True)
    assert req["valid"], req["invalid_reason"]
    assert req["image_tokens_per_row"] == [8, 8] and req["output_tokens"] == 3


def test_molmo2_inputs_pool_each_images_own_crops():
    """Each row's image tokens pool that row's own crops, on either convention of the installed
    Molmo2 (indices over all images, or per image with the model adding the offsets): the test
    changes the pixels of row 0's crops only and reads the model's own pooled features per image."""
    import inspect

    from molmo_latency.models import molmo2_inputs

    model, _ = by_name("molmo2").build()
    kw = molmo2_inputs(model, crops=2, prompt_tokens=4, batch_size=2)
    names = ["pixel_values", "image_token_pooling", "image_grids", "image_num_crops"]
    takes = inspect.signature(model.get_image_features).parameters

    def features(pixels: torch.Tensor) -> tuple:
        args = {k: kw[k] for k in names if k in takes}
        with torch.no_grad():
            return model.get_image_features(**{**args, "pixel_values": pixels}).pooler_output

    before = features(kw["pixel_values"])
    changed = kw["pixel_values"].clone()
    changed[:2] += 1.0  # row 0's two crops
    after = features(changed)
    assert len(before) == 2 and all(f.shape[0] == 8 for f in before)

    def moved(i: int) -> float:  # relative: a tiny random model's features are ~1e-9
        return float((before[i] - after[i]).abs().max() / before[i].abs().max())

    assert moved(0) > 0.1 and moved(1) < 1e-5


def test_profile_cli_on_a_saved_tiny_molmo2(tmp_path, capsys):
    from molmo_latency.cli.main import main

    model, _ = by_name("molmo2").build()
    model.save_pretrained(tmp_path / "molmo2")
    (tmp_path / "sweep.toml").write_text("crops = [1]\nprompt_tokens = [8]\nnew_tokens = [4]\n"
                                         "repeats = 2\nwarmup = 1\nseed = 0\n")
    rc = main(["profile", "--model", str(tmp_path / "molmo2"), "--sweep", str(tmp_path / "sweep.toml"),
               "--out", str(tmp_path / "run")])
    assert rc == 0
    import polars as pl

    req = pl.read_parquet(tmp_path / "run" / "requests.parquet")
    assert req.height == 2 and req["valid"].all() and (req["image_tokens"] == 4).all()
    assert req["projector_ms"].is_not_null().all()


def test_qwen3_5_moe_hybrid_blocks_keep_an_attention_block_and_top_k():
    """Qwen3.5-MoE mixes linear-attention and attention blocks: keeping the attention block
    works (the routers pick top-1), keeping only linear attention is refused (above)."""
    model, inputs = by_name("qwen3_5_moe").build()
    picked: list[int] = []
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    handles = [r.register_forward_hook(lambda m, a, out: picked.append(out[-1].shape[-1])) for r in routers]
    try:
        with knobs.configured(model, top_k=1, blocks=[1]), profile_phases(model) as prof:
            model.generate(**inputs, **GEN)
    finally:
        for h in handles:
            h.remove()
    req = prof.report().requests.row(0, named=True)
    assert req["valid"], req["invalid_reason"]
    assert req["blocks_run"] == 1 and set(picked) == {1} and len(picked) == 1 + req["decode_steps"]
    assert knobs.get_block_indices(model) == (0, 1) and knobs.get_top_k(model) == 2


def _knob_families() -> list:
    from tests.vlm_families import FAMILIES

    return [pytest.param(f, id=f.name) for f in FAMILIES if f.knobs and not f.skip]


@pytest.mark.parametrize("fam", _knob_families())
def test_family_knobs_run_and_restore(fam: Family):
    """Each family's knobs (tests/vlm_families.py: MoE top-k, block subsets) give a valid request
    whose blocks_run is what the test's own hooks on the blocks saw, and leave the model as it was."""
    model, inputs = fam.build()
    layers = list(knobs._block_list(model)[0].layers)
    with torch.no_grad():
        model.generate(**inputs, **GEN)  # transformers adds its own output-capture hooks on a first run
    before = model_state(model)
    ran: set[int] = set()
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.add(i)) for i, layer in enumerate(layers)]
    try:
        with knobs.configured(model, **fam.knobs), profile_phases(model) as prof:
            model.generate(**inputs, **GEN)
    finally:
        for h in handles:
            h.remove()
    req = prof.report().requests.row(0, named=True)
    assert req["valid"], req["invalid_reason"]
    expected = set(fam.knobs.get("blocks", range(len(layers))))
    assert ran == expected and req["blocks_run"] == len(expected)
    assert model_state(model) == before and list(knobs._block_list(model)[0].layers) == layers


def test_a_looped_text_model_refuses_a_block_subset():
    """Inkling 2 Loop runs a range of its blocks again (its config names the range by position): the
    test's own hooks see block 1 run twice per forward; a subset of blocks would not keep that, so
    it is refused in one line and the model is left as it was; all blocks are accepted."""
    from molmo_latency.knobs import knob_ranges

    fam = by_name("inkling2_loop")
    model, inputs = fam.build()
    layers = list(model.model.language_model.layers)
    calls: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    assert calls == [0, 1, 1]
    before = model_state(model)
    for blocks in ([1], 1):
        with pytest.raises(MolmoLatencyError) as info:
            knobs.set_active_blocks(model, blocks)
        assert str(info.value).startswith(f"blocks={blocks!r}: Inkling2LoopForConditionalGeneration runs some")
        assert "\n" not in str(info.value)
        assert model_state(model) == before and list(model.model.language_model.layers) == layers
    with knobs.configured(model, blocks=2):
        assert knobs.get_block_indices(model) == (0, 1)
    row = next(r for r in knob_ranges(model) if r["knob"] == "blocks")
    assert not row["applies"] and "in a loop" in row["why_not"]
