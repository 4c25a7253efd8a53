"""The run directory: failed starts, resume identity, consolidation, durable writes, the lock."""

import json
import os
import stat

import polars as pl
import pytest

from molmo_latency.errors import SweepError
from molmo_latency.sweep import RunDir, SweepSpec, run_sweep
from molmo_latency.sweep import runner
from molmo_latency.sweep.runner import run_identity
from molmo_latency import knobs
from tests.layout import text_decoder

ONE = {"crops": [1], "top_k": [2], "blocks": [2], "prompt_tokens": [4], "new_tokens": [3],
       "repeats": 1, "warmup": 0, "seed": 0}
TWO = {**ONE, "crops": [1, 2], "repeats": 2}


def test_a_failed_start_leaves_no_run_dir_and_a_stale_run_json_does_not_lock_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SweepError, match="not a preset"):
        run_sweep(str(tmp_path / "typo"), SweepSpec.from_dict(ONE), out)
    assert not out.exists()
    # run.json of another start that measured nothing: the correct command takes the directory
    RunDir.create_or_resume(out, {"model": "typo", "sweep_digest": "x"}, {})
    res = run_sweep("tiny", SweepSpec.from_dict(ONE), out)
    assert res["measured"] == 1 and not res["resumed"]
    assert json.loads((out / "run.json").read_text())["identity"]["model"] == "tiny"


def test_identity_is_normalised_fp32_and_omitted_dtype_resume(tmp_path, monkeypatch):
    spec = SweepSpec.from_dict(ONE)
    run_sweep("tiny", spec, tmp_path, dtype="fp32")
    again = run_sweep("tiny", spec, tmp_path)  # no --dtype on CPU is fp32
    assert again["resumed"] and again["skipped"] == 1 and again["measured"] == 0
    assert run_identity("tiny", "cuda", "bf16", spec) == run_identity("tiny", "cuda:0", "bfloat16", spec)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    ident = run_identity("m", "cpu", None, spec)
    assert ident["model"] == str((tmp_path / "m").resolve()) and len(ident["model_config_sha256"]) == 16


def test_a_different_checkpoint_at_the_same_path_is_refused(tmp_path):
    from molmo_latency.models import reference_vlm

    model = tmp_path / "model"
    reference_vlm("tiny", seed=3).model.save_pretrained(model)
    spec = SweepSpec.from_dict(ONE)
    run_sweep(str(model), spec, tmp_path / "run")
    cfg = json.loads((model / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-6  # another checkpoint, same path
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SweepError, match=r"holds a different run \(the model's config.json \(sha256\)"):
        run_sweep(str(model), spec, tmp_path / "run")


def test_tables_are_consolidated_during_the_sweep_and_on_read(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "CONSOLIDATE_EVERY_S", 0.0)
    seen = []

    def progress(p):
        if p.stage == "measure" and p.done == 2:  # first round of the interleaved order
            seen.append(pl.read_parquet(tmp_path / "requests.parquet").height)

    run_sweep("tiny", SweepSpec.from_dict(TWO), tmp_path, progress=progress)
    assert seen == [2]
    # a killed sweep: parts but no requests.parquet; RunDir.table rebuilds it
    (tmp_path / "requests.parquet").unlink()
    assert RunDir(tmp_path).table("requests").height == 4
    assert pl.read_parquet(tmp_path / "requests.parquet").height == 4
    # a part newer than the table (one more unit written by a sweep that was then killed)
    part = next((tmp_path / "parts" / "requests").glob("*__r0.parquet"))
    extra = pl.read_parquet(part).with_columns(pl.lit(9, dtype=pl.Int64).alias("repeat"))
    extra.write_parquet(part.with_name(part.name.replace("__r0", "__r9")))
    assert RunDir(tmp_path).table("requests").height == 5
    assert RunDir(tmp_path).refresh() == {}  # up to date now


def test_a_corrupt_part_is_named_and_its_unit_redone_after_deleting_it(tmp_path):
    spec = SweepSpec.from_dict(TWO)
    run_sweep("tiny", spec, tmp_path)
    bad = sorted((tmp_path / "parts" / "requests").glob("*.parquet"))[0]
    bad.write_bytes(b"")  # a crash wrote nothing durable
    with pytest.raises(SweepError, match=f"{bad}.*corrupt or empty.*delete it"):
        run_sweep("tiny", spec, tmp_path)
    (tmp_path / "requests.parquet").unlink()
    with pytest.raises(SweepError, match="delete it"):
        RunDir(tmp_path).table("requests")
    bad.unlink()
    res = run_sweep("tiny", spec, tmp_path)
    assert res["measured"] == 1 and res["skipped"] == 3 and res["rows"] == 4


def test_files_follow_the_umask_and_killed_kineto_folders_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        run_sweep("tiny", SweepSpec.from_dict(ONE), tmp_path)
    finally:
        os.umask(old)
    for f in [tmp_path / "run.json", tmp_path / "requests.parquet",
              *(tmp_path / "parts").glob("*/*.parquet")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    stale = tmp_path / "traces" / ".tmp-abc123"
    stale.mkdir(parents=True)
    (stale / "half.json").write_text("{")
    run_sweep("tiny", SweepSpec.from_dict(ONE), tmp_path)
    assert not stale.exists()


def test_a_second_sweep_into_the_same_dir_is_refused_while_one_writes(tmp_path):
    spec = SweepSpec.from_dict(ONE)
    with RunDir(tmp_path).locked():
        with pytest.raises(SweepError, match=f"another sweep is writing into {tmp_path}"):
            run_sweep("tiny", spec, tmp_path)
    assert run_sweep("tiny", spec, tmp_path)["measured"] == 1  # the lock is released


def test_after_a_failed_measurement_the_next_configuration_is_warmed_up_again(tmp_path):
    from molmo_latency.sweep.source import ReferenceSource

    source = ReferenceSource("tiny")
    layer = text_decoder(source.model).layers[0]

    def fail_decode(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if knobs.get_top_k(source.model) == 1 and hidden.shape[1] == 1:
            raise RuntimeError("injected decode failure")

    layer.register_forward_pre_hook(fail_decode, with_kwargs=True)
    calls = []
    generate = source.model.generate
    source.model.generate = lambda *a, **kw: calls.append(1) or generate(*a, **kw)
    spec = SweepSpec.from_dict({**ONE, "top_k": [1, 2], "repeats": 2})
    res = run_sweep(source, spec, tmp_path)
    # k1 r0 fails; k2 r0 is warmed up once, then measured; k1 r1 is skipped; k2 r1 measured
    assert res["failed_configs"] == 1 and res["measured"] == 2 and len(calls) == 4
    assert res["post_failure_warmups"] == 1
    assert json.loads((tmp_path / "run.json").read_text())["post_failure_warmups"] == 1
