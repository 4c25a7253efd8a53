"""molmo-latency on the MolmoE model code users run (../shared/molmo_remote), tiny random config.

Runs on transformers 4.5x (CI's 4.51.3 environment); skips elsewhere with the reason.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from molmo_latency import knobs, profile_phases
from molmo_latency.errors import MolmoLatencyError

from tests.molmoe_fixtures import (TINY_BLOCKS, TINY_EXPERTS, TINY_TOP_K, TOKENS_PER_CROP, molmoe_request,
                                   require_molmoe, tiny_molmoe, write_checkpoint)

LINE_5 = not __import__("transformers").__version__.startswith("4.")


@pytest.fixture(scope="module")
def molmoe():
    require_molmoe()
    model = tiny_molmoe(seed=0)
    with torch.inference_mode():
        model.generate(**molmoe_request(model, crops=1, new_tokens=2))  # lazy init out of the way
    return model


def _state(model):
    """Everything the knobs touch, by identity and value."""
    blocks = model.model.transformer.blocks
    return {"blocks": [id(b) for b in blocks], "n_layers": model.config.n_layers,
            "top_k": [b.mlp.top_k for b in blocks], "moe_top_k": model.config.moe_top_k,
            "extra": sorted(k for k in vars(model.model.transformer) if k.startswith("_molmo_latency"))}


def _generate(model, **kw):
    with torch.inference_mode():
        return model.generate(**molmoe_request(model, **kw))


def _requests(prof) -> pl.DataFrame:
    return prof.report().requests


def test_profile_generate_all_phases_valid(molmoe):
    with profile_phases(molmoe) as prof:
        for crops in (1, 2):
            _generate(molmoe, crops=crops, new_tokens=4)
    rep = prof.report()
    r = rep.requests
    assert r["valid"].to_list() == [True, True], r["invalid_reason"].to_list()
    assert r["decode_steps"].to_list() == [3, 3]
    for col in ("vision_ms", "projector_ms", "prefill_ms", "decode_ms"):
        assert (r[col] > 0).all(), col
    assert r["image_tokens"].to_list() == [TOKENS_PER_CROP * 1, TOKENS_PER_CROP * 2]
    phases = rep.phases.filter(pl.col("request") == 0)["phase"].to_list()
    assert phases == ["vision", "projector", "prefill", "decode", "decode", "decode"]


def test_profile_generate_from_batch_and_batch_of_two(molmoe):
    from molmo_latency.sweep.source import molmo_inputs

    req = molmoe_request(molmoe, crops=1, new_tokens=3)
    gen = req.pop("generation_config")
    with profile_phases(molmoe) as prof:
        with torch.inference_mode():
            molmoe.generate_from_batch(req, gen)  # the model card's entry point
            batch2 = molmo_inputs(molmoe, crops=2, prompt_tokens=8, batch_size=2)
            molmoe.generate(**batch2, generation_config=gen)
    r = _requests(prof)
    assert "generate_from_batch" not in vars(molmoe) and "generate" not in vars(molmoe)  # unwrapped
    assert r.height == 2  # generate_from_batch calls super().generate: one request, not two
    assert r["valid"].all(), r["invalid_reason"].to_list()
    assert r["batch_size"].to_list() == [1, 2]
    assert r["decode_steps"].to_list() == [2, 2]
    assert r["image_tokens"][0] == TOKENS_PER_CROP


def test_profile_under_autocast_and_inference_mode(molmoe):
    """The path MolmoE users run: torch.inference_mode() + torch.autocast(device, bf16)."""
    with profile_phases(molmoe) as prof:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = molmoe.generate(**molmoe_request(molmoe, crops=1, new_tokens=3))
    r = _requests(prof)
    assert out.shape[1] == 1 + TOKENS_PER_CROP + 8 + 3
    assert r["valid"].to_list() == [True] and r["decode_steps"].to_list() == [2]


def _experts_run_per_block(model, top_k: int) -> list[int]:
    """How many experts each block runs for one decode token (MolmoE skips unrouted experts)."""
    calls, tokens, handles = {}, {}, []
    for i, block in enumerate(model.model.transformer.blocks):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, _i=i: tokens.__setitem__(_i, args[0].shape[1])))
        for expert in block.mlp.experts:
            handles.append(expert.register_forward_hook(  # counted in single-token (decode) calls
                lambda *_a, _i=i: calls.__setitem__(_i, calls.get(_i, 0) + (tokens[_i] == 1))))
    try:
        with knobs.configured(model, top_k=top_k):
            _generate(model, crops=0, new_tokens=2)  # prefill, then one decode step of one token
    finally:
        for h in handles:
            h.remove()
    return [calls.get(i, 0) for i in range(len(model.model.transformer.blocks))]


def test_top_k_reaches_every_block(molmoe):
    before = _state(molmoe)
    for k in (1, 3, TINY_EXPERTS):
        assert _experts_run_per_block(molmoe, k) == [k] * TINY_BLOCKS
    assert _state(molmoe) == before


def test_first_n_blocks_run_and_are_restored(molmoe):
    before = _state(molmoe)
    ran = []
    hooks = [b.register_forward_pre_hook(lambda *_a, _i=i: ran.append(_i))
             for i, b in enumerate(molmoe.model.transformer.blocks)]
    try:
        with knobs.configured(molmoe, blocks=2):
            assert knobs.get_block_indices(molmoe) == (0, 1)
            _generate(molmoe, crops=1, new_tokens=3)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(set(ran)) == [0, 1] and len(ran) == 2 * 3  # 2 blocks x (prefill + 2 decode steps)
    assert _state(molmoe) == before


def test_block_subset_runs_exactly_those_blocks(molmoe):
    baseline = _generate(molmoe, crops=1, new_tokens=3)
    before = _state(molmoe)
    ran = []
    hooks = [b.register_forward_pre_hook(lambda *_a, _i=i: ran.append(_i))
             for i, b in enumerate(molmoe.model.transformer.blocks)]
    try:
        with profile_phases(molmoe) as prof, knobs.configured(molmoe, blocks=[0, 3], top_k=1):
            assert knobs.get_block_indices(molmoe) == (0, 3)
            assert knobs.get_active_blocks(molmoe) == 2 and molmoe.config.n_layers == 2
            _generate(molmoe, crops=1, new_tokens=3)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 3] * 3
    assert _requests(prof)["valid"].to_list() == [True]
    assert _state(molmoe) == before
    assert torch.equal(_generate(molmoe, crops=1, new_tokens=3), baseline)


@pytest.mark.parametrize("call, message", [
    (lambda m: knobs.set_active_blocks(m, TINY_BLOCKS + 3), r"blocks=7 .*1\.\.4"),
    (lambda m: knobs.set_active_blocks(m, [0, 9]), r"blocks=\[0, 9\].*0\.\.3"),
    (lambda m: knobs.set_active_blocks(m, [3, 0]), r"sorted and unique"),
    (lambda m: knobs.set_top_k(m, 64), r"top_k=64 .*8 experts.*1\.\.8"),
    (lambda m: knobs.set_top_k(m, 0), r"top_k=0 .*1\.\.8"),
])
def test_refused_knob_leaves_the_model_generating_as_before(molmoe, call, message):
    baseline = _generate(molmoe, crops=1, new_tokens=3)
    before = _state(molmoe)
    with pytest.raises(MolmoLatencyError, match=message):
        call(molmoe)
    assert _state(molmoe) == before
    assert torch.equal(_generate(molmoe, crops=1, new_tokens=3), baseline)


def test_a_knob_failing_half_way_is_undone(molmoe, monkeypatch):
    """A change that raises in the middle (here the 3rd assignment) leaves nothing changed."""
    baseline = _generate(molmoe, crops=1, new_tokens=3)
    before = _state(molmoe)
    real, count = knobs._assign, {"n": 0}

    def flaky(obj, name, value):
        count["n"] += 1
        if count["n"] == 3:
            raise RuntimeError("injected failure")
        real(obj, name, value)

    monkeypatch.setattr(knobs, "_assign", flaky)
    for call in (lambda: knobs.set_active_blocks(molmoe, [0, 2]), lambda: knobs.set_top_k(molmoe, 1)):
        count["n"] = 0
        with pytest.raises(RuntimeError, match="injected"):
            call()
    monkeypatch.undo()
    assert _state(molmoe) == before
    assert torch.equal(_generate(molmoe, crops=1, new_tokens=3), baseline)


def test_configured_checks_both_knobs_before_changing_either(molmoe):
    before = _state(molmoe)
    with pytest.raises(MolmoLatencyError, match="blocks"):
        with knobs.configured(molmoe, top_k=1, blocks=99):
            pass
    assert _state(molmoe) == before and molmoe.model.transformer.blocks[0].mlp.top_k == TINY_TOP_K


# ------------------------------------------------------------------ checkpoint directory, CLI
@pytest.fixture(scope="module")
def checkpoint(molmoe, tmp_path_factory):
    return write_checkpoint(molmoe, tmp_path_factory.mktemp("molmoe") / "ckpt")


def test_checkpoint_directory_loads_with_trust_remote_code(checkpoint, molmoe):
    from molmo_latency.sweep.source import open_source
    from molmo_latency.sweep.spec import Config

    source = open_source(str(checkpoint), trust_remote_code=True)
    assert type(source.model).__name__ == "MolmoForCausalLM" and source.molmo
    assert source.autocast_dtype is None
    config = Config(crops=2, top_k=1, blocks=(0, 3), prompt_tokens=8, new_tokens=3)
    with profile_phases(source.model) as prof:
        with source.configured(config), source.generation_context():
            source.model.generate(**source.inputs(config), **source.generation_kwargs(config))
    r = _requests(prof)
    assert r["valid"].to_list() == [True] and r["image_tokens"].to_list() == [2 * TOKENS_PER_CROP]
    # the same weights as the model it was written from
    for (name, a), b in zip(molmoe.state_dict().items(), source.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_on_an_amp_checkpoint_means_autocast(checkpoint):
    from molmo_latency.sweep.source import open_source

    source = open_source(str(checkpoint), trust_remote_code=True, dtype="bf16")
    assert source.autocast_dtype == torch.bfloat16  # config.json: precision = "amp_bf16"
    assert next(source.model.parameters()).dtype == torch.float32


def test_cli_sweep_on_a_checkpoint_directory(checkpoint, tmp_path):
    from molmo_latency.cli.main import main

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps([1.0, 0.2, 0.9, 1.0]))  # by importance, 3 blocks = [0, 2, 3]
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('crops = [1, 2]\ntop_k = [1, 2]\nblocks = [[0, 1, 3], 3]\n'
                     'block_importance = "scores.json"\nprompt_tokens = [8]\nnew_tokens = [3]\n'
                     'repeats = 2\nwarmup = 1\n')
    out = tmp_path / "run"
    code = main(["profile", "--model", str(checkpoint), "--trust-remote-code", "--sweep", str(sweep),
                 "--out", str(out), "--dtype", "bf16", "--kineto"])
    assert code == 0
    req = pl.read_parquet(out / "requests.parquet")
    assert not (out / "failures.parquet").exists() or pl.read_parquet(out / "failures.parquet").height == 0
    assert req.height == 2 * 2 * 2 * 2  # crops x top_k x blocks x repeats
    assert req["valid"].all(), req["invalid_reason"].unique().to_list()
    got = {tuple(r["block_indices"]) for r in req.select("block_indices").to_dicts()}
    assert got == {(0, 1, 3), (0, 2, 3)}
    assert set(req["blocks"].to_list()) == {3}
    assert sorted(set(req["image_tokens"].to_list())) == [TOKENS_PER_CROP, 2 * TOKENS_PER_CROP]
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["autocast"] == "torch.bfloat16"
    assert len(list((out / "traces").glob("*.pt.trace.json.gz"))) == 8  # one per configuration


@pytest.mark.ray
def test_ray_local_sweep_on_a_checkpoint_directory(checkpoint, tmp_path):
    ray = pytest.importorskip("ray")
    from molmo_latency.scale import run_sweep_ray
    from molmo_latency.sweep import SweepSpec

    spec = SweepSpec.from_dict({"crops": [1], "top_k": [1, 2], "blocks": [[0, 3]], "prompt_tokens": [8],
                                "new_tokens": [3], "repeats": 2, "warmup": 1})
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        result = run_sweep_ray(str(checkpoint), spec, tmp_path / "ray", workers=1, trust_remote_code=True)
    finally:
        ray.shutdown()
    assert result["measured"] == 4 and result["failed_configs"] == 0
    req = pl.read_parquet(tmp_path / "ray" / "requests.parquet")
    assert req["valid"].all() and req["block_indices"].to_list() == [[0, 3]] * 4


@pytest.mark.skipif(not LINE_5, reason="on transformers 4.5x MolmoE's code runs (the tests above)")
def test_on_transformers_5_a_molmoe_checkpoint_is_one_clear_line(tmp_path, capsys):
    """MolmoE's code builds on 5.x but cannot load or generate there: one line, exit 2, no run dir."""
    from molmo_latency.cli.main import main

    ckpt = write_checkpoint(tiny_molmoe(any_line=True), tmp_path / "ckpt")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("crops = [1]\nnew_tokens = [3]\nrepeats = 1\n")
    code = main(["profile", "--model", str(ckpt), "--trust-remote-code", "--sweep", str(sweep),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("molmo-latency: error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "transformers" in lines[0] and "4.51.3" in lines[0]
    assert not (tmp_path / "run").exists()
