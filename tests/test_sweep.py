"""The sweep runner: run directories, resume after SIGKILL, failures, bad sweep files, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.errors import SweepError
from molmo_latency.sweep import RunDir, SweepSpec, load_sweep, run_sweep
from molmo_latency import knobs
from tests.layout import text_decoder

SMALL = {"crops": [1, 2], "top_k": [1, 2], "blocks": [2], "prompt_tokens": [8], "new_tokens": [4],
         "repeats": 3, "warmup": 1, "seed": 0}


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def _write_sweep(path: Path, sweep: dict) -> Path:
    lines = []
    for k, v in sweep.items():
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, str) else repr(v).replace(chr(39), chr(34))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_writes_every_file_with_one_row_per_config_and_repeat(tmp_path):
    spec = SweepSpec.from_dict(SMALL)
    result = run_sweep("tiny", spec, tmp_path / "run", kineto=True)
    run = tmp_path / "run"
    assert result["measured"] == 12 and result["failed_configs"] == 0
    for name in ("requests.parquet", "phases.parquet", "run.json"):
        assert (run / name).is_file()
    assert not (run / "telemetry.parquet").exists()  # CPU: NVML off
    req = pl.read_parquet(run / "requests.parquet")
    assert req.height == 12 and req.select("config_id", "repeat").n_unique() == 12
    assert req["valid"].all() and (req["decode_steps"] == 3).all()
    assert set(req["top_k"]) == {1, 2} and set(req["blocks"]) == {2}
    # interleaved: A B C D A B C D ...
    ordered = req.sort("order")
    assert ordered["config_id"].to_list()[:4] == sorted(set(req["config_id"]), key=ordered["config_id"].to_list().index)
    assert ordered["repeat"].to_list() == [0] * 4 + [1] * 4 + [2] * 4
    assert req["host"].n_unique() == 1 and req["device"].to_list()[0] == "cpu"
    phases = pl.read_parquet(run / "phases.parquet")
    assert phases.height == 12 * (3 + 3) and phases.select("config_id", "repeat").n_unique() == 12
    meta = json.loads((run / "run.json").read_text())
    assert meta["sweep"]["protocol"]["repeats"] == 3 and meta["versions"]["torch"]
    assert meta["protocol"]["cache_policy"] == "keep" and meta["model"]["blocks_total"] == 4
    traces = sorted(p.name for p in (run / "traces").iterdir())
    assert traces == sorted(f"{c}.pt.trace.json.gz" for c in set(req["config_id"]))
    # the same command again: nothing to do
    again = run_sweep("tiny", spec, run)
    assert again["measured"] == 0 and again["skipped"] == 12 and again["resumed"]
    assert pl.read_parquet(run / "requests.parquet").height == 12


def test_a_different_sweep_into_the_same_run_dir_is_refused(tmp_path):
    run_sweep("tiny", SweepSpec.from_dict({**SMALL, "repeats": 1, "crops": [1], "top_k": [1]}), tmp_path)
    with pytest.raises(SweepError, match="holds a different run.*sweep_digest"):
        run_sweep("tiny", SweepSpec.from_dict({**SMALL, "repeats": 2, "crops": [1], "top_k": [1]}), tmp_path)


def test_failing_configuration_is_recorded_and_the_others_complete(tmp_path):
    # 300 crops x 16 tokens exceed the tiny model's 4096 positions: that configuration fails
    spec = SweepSpec.from_dict({**SMALL, "crops": [1, 300, 2], "top_k": [2]})
    seen = []
    result = run_sweep("tiny", spec, tmp_path, progress=seen.append)
    assert result["failed_configs"] == 1
    # it failed in its warm-up: its 3 units count as done, so progress ends at 3 x 3 = 9 of 9
    assert (seen[-1].done, seen[-1].total, seen[-1].configs_done, seen[-1].configs_total) == (9, 9, 3, 3)
    assert [p.stage for p in seen].count("measure") == 6
    failures = pl.read_parquet(tmp_path / "failures.parquet")
    assert failures["config_id"].to_list() == ["c300-k2-b2-p8-n4-bs1"]
    assert failures["crops"].to_list() == [300]
    assert "exceed" in failures["message"][0] and failures["error_type"][0] == "MolmoLatencyError"
    req = pl.read_parquet(tmp_path / "requests.parquet")
    assert sorted(set(req["crops"])) == [1, 2] and req.height == 6


def test_sigkill_mid_sweep_then_resume_loses_and_duplicates_nothing(tmp_path):
    sweep = _write_sweep(tmp_path / "s.toml", {**SMALL, "repeats": 4, "cooldown_ms": 150})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "molmo_latency", "profile", "--model", "tiny", "--sweep", str(sweep),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / "parts" / "requests"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not parts.is_dir() or len(list(parts.glob("*.parquet"))) < 5):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.parquet")))
    assert 5 <= done_before < 16, "the sweep must be killed mid-way"
    second = _cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out), "--json")
    assert second.returncode == 0, second.stderr
    sweep_result = json.loads(second.stdout)["sweep"]
    assert sweep_result["skipped"] == done_before and sweep_result["measured"] == 16 - done_before
    req = pl.read_parquet(out / "requests.parquet")
    keys = req.select("config_id", "repeat")
    assert req.height == 16 and keys.n_unique() == 16
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("body, key", [
    ("crops = [1]\ncolour = 'red'\n", "colour"),
    ("crops = []\n", "crops"),
    ("crops = [1]\ntop_k = [-2]\n", "top_k"),
    ("crops = [1]\nrepeats = -1\n", "repeats"),
    ("crops = [1]\norder = 'random'\n", "order"),
    ("crops = [1.5]\n", "crops"),
])
def test_bad_sweep_files_are_rejected_naming_the_key(tmp_path, body, key):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(SweepError, match=repr(key)):
        load_sweep(path)
    res = _cli("profile", "--model", "tiny", "--sweep", str(path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and repr(key) in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_bad_inputs_exit_2_without_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text("crops = [1\n")
    for args in (["profile", "--model", "tiny", "--sweep", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")],
                 ["profile", "--model", "tiny", "--sweep", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")],
                 ["profile", "--model", str(tmp_path), "--sweep", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")],
                 ["report", str(tmp_path / "nothing")]):
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.strip().startswith("molmo-latency: error:")


def test_report_tables_json_and_plots(tmp_path):
    run_sweep("tiny", SweepSpec.from_dict({**SMALL, "repeats": 2}), tmp_path)
    res = _cli("report", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert len(data["configs"]) == 4
    summary = pl.DataFrame(data["summary"])
    row = summary.filter((pl.col("metric") == "total_ms")).row(0, named=True)
    req = pl.read_parquet(tmp_path / "requests.parquet").filter(pl.col("config_id") == row["config_id"])
    assert row["median"] == pytest.approx(req["total_ms"].median())
    for png in data["plots"]:
        assert Path(png).stat().st_size > 5000 and Path(png).read_bytes()[:4] == b"\x89PNG"
    text = _cli("report", str(tmp_path))
    assert text.returncode == 0 and "decode ms/step" in text.stdout
    wide = _cli("report", str(tmp_path), "--wide")
    assert wide.returncode == 0 and "decode CV %" in wide.stdout


def test_local_hf_model_directory(tmp_path):
    from molmo_latency.models import reference_vlm

    ref = reference_vlm("tiny", seed=3)
    ref.model.save_pretrained(tmp_path / "model")
    res = run_sweep(str(tmp_path / "model"), SweepSpec.from_dict({**SMALL, "repeats": 1, "top_k": [2]}),
                    tmp_path / "run")
    assert res["measured"] == 2 and res["failed_configs"] == 0
    req = RunDir(tmp_path / "run").table("requests")
    assert req["image_tokens"].to_list() == [16, 32] and req["valid"].all()


def test_sweep_pointing_at_a_directory_exits_2_without_traceback(tmp_path):
    res = _cli("profile", "--model", "tiny", "--sweep", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "is a directory" in res.stderr and not (tmp_path / "o").exists()


def test_generate_failing_mid_decode_for_one_configuration_only(tmp_path):
    from molmo_latency.sweep.source import ReferenceSource

    source = ReferenceSource("tiny")
    layer = text_decoder(source.model).layers[0]

    def fail_in_decode(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if knobs.get_top_k(source.model) == 1 and hidden.shape[1] == 1:  # a decode step of the top_k=1 config
            raise RuntimeError("injected failure in a decode step")

    layer.register_forward_pre_hook(fail_in_decode, with_kwargs=True)
    spec = SweepSpec.from_dict({**SMALL, "crops": [1], "warmup": 0})
    result = run_sweep(source, spec, tmp_path)
    assert result["failed_configs"] == 1 and result["measured"] == 3
    failures = pl.read_parquet(tmp_path / "failures.parquet")
    assert failures["config_id"].to_list() == ["c1-k1-b2-p8-n4-bs1"]
    assert failures["stage"].to_list() == ["measure"] and failures["error_type"][0] == "RuntimeError"
    assert "injected failure in a decode step" in failures["message"][0]
    req = pl.read_parquet(tmp_path / "requests.parquet")
    assert req["config_id"].to_list() == ["c1-k2-b2-p8-n4-bs1"] * 3 and req["repeat"].to_list() == [0, 1, 2]


def test_report_keeps_all_invalid_configurations_and_lists_failures(tmp_path):
    spec = SweepSpec.from_dict({**SMALL, "crops": [1, 300, 2], "top_k": [2], "repeats": 2})
    run_sweep("tiny", spec, tmp_path)
    path = tmp_path / "requests.parquet"
    req = pl.read_parquet(path)
    bad = pl.col("config_id") == "c2-k2-b2-p8-n4-bs1"
    req.with_columns(pl.when(bad).then(False).otherwise(pl.col("valid")).alias("valid"),
                     pl.when(bad).then(pl.lit("clock throttled")).otherwise(pl.col("invalid_reason"))
                     .alias("invalid_reason")).write_parquet(path)
    from molmo_latency.report import run_report

    rep = run_report(tmp_path)
    config = {r["config_id"]: r for r in rep["config"].iter_rows(named=True)}
    assert set(config) == {"c1-k2-b2-p8-n4-bs1", "c2-k2-b2-p8-n4-bs1"}
    row = config["c2-k2-b2-p8-n4-bs1"]
    assert row["n_valid"] == 0 and row["invalid"] == 2 and row["invalid_reason_top"] == "clock throttled"
    assert row["total_median_ms"] is None and config["c1-k2-b2-p8-n4-bs1"]["n_valid"] == 2
    assert set(rep["decode_steps"]["config_id"]) == {"c1-k2-b2-p8-n4-bs1"}
    res = _cli("report", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    [failure] = json.loads(res.stdout)["failures"]
    assert failure["config_id"] == "c300-k2-b2-p8-n4-bs1" and failure["stage"] == "warmup"
    assert failure["error_type"] == "MolmoLatencyError" and "exceed" in failure["message"]
    text = _cli("report", str(tmp_path))
    assert text.returncode == 0 and "Failed configurations" in text.stdout and "c300-k2-b2-p8-n4-bs1" in text.stdout
