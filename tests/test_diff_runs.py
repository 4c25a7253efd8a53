"""`diff` on run directories of the sweep runner: a configuration made slower by a known amount is
classed slower by that amount, and two configurations that are the same model setting, measured
interleaved in one run, are classed no significant change."""

import contextlib
import json

import polars as pl
import pytest
import torch

from molmo_latency.cli.main import main
from molmo_latency.diff import diff
from molmo_latency.sweep import SweepSpec, run_sweep
from molmo_latency.sweep.source import ReferenceSource

SLEEP_S = 0.025  # at least this is added to every LLM forward of B (see shift_ms)

NEW_TOKENS = 6
SWEEP = {"crops": [1], "prompt_tokens": [8], "new_tokens": [NEW_TOKENS], "repeats": 12, "warmup": 1}


@contextlib.contextmanager
def one_thread():
    """One torch thread while measuring: on a 2-core box shared with other jobs, two spinning
    OpenMP threads per process turn a 3 ms prefill into seconds now and then."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shift_ms(a) -> float:
    """What B adds to every LLM forward of A: SLEEP_S plus A's longest request. Every part of a
    request is at most its total, so the shift is larger than the spread and the median of every
    column compared: each B value lies above every A value and the effect is far above the 1%
    floor, however busy the machine was while A ran (measured: under three test suites and two
    busy loops on 2 cores, a fixed 25 ms was lost in the spread)."""
    return SLEEP_S * 1e3 + float(pl.read_parquet(a / "requests.parquet")["total_ms"].max())


def _slower_copy(a, b):
    """Run B: run A's measurements, every LLM forward (prefill and each decode step) shift_ms(A)
    slower. The shift is known exactly, so the verdict cannot depend on how busy the machine was
    while A and B ran (two real runs minutes apart on a shared machine differ by more than any
    sleep a unit test can afford)."""
    import shutil

    shutil.copytree(a, b)
    shutil.rmtree(b / "parts")  # the shifted tables are B's data
    ms = shift_ms(a)
    req = pl.read_parquet(b / "requests.parquet")
    steps = pl.col("decode_steps")
    req.with_columns(
        pl.col("prefill_ms") + ms, pl.col("prefill_total_ms") + ms, pl.col("decode_ms") + ms * steps,
        pl.col("decode_per_token_ms") + ms, pl.col("total_ms") + ms * (1 + steps),
    ).write_parquet(b / "requests.parquet")
    phases = pl.read_parquet(b / "phases.parquet")
    phases.with_columns(pl.when(pl.col("phase").is_in(["prefill", "decode"])).then(pl.col("ms") + ms)
                        .otherwise(pl.col("ms")).alias("ms")).write_parquet(b / "phases.parquet")


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    """Run A: the tiny model, measured. Run B: A's measurements with SLEEP_S added to every LLM
    forward (see _slower_copy); B keeps A's traces, so the kernel level sees the same ops."""
    root = tmp_path_factory.mktemp("slow_pair")
    with one_thread():
        run_sweep(ReferenceSource("tiny"), SweepSpec.from_dict(SWEEP), root / "a", kineto=True, nvml="off")
    _slower_copy(root / "a", root / "b")
    return root / "a", root / "b"


def test_really_slower_run_is_classed_slower(slow_pair):
    a, b = slow_pair
    result = diff(a, b)  # the same configuration id in both runs is paired up
    [comp] = result.comparisons
    assert comp.a_config == comp.b_config == "c1-kdef-ball-p8-n6-bs1"
    rows = {r["phase"]: r for r in comp.phases.iter_rows(named=True)}
    for phase in ("prefill", "decode", "decode_per_token", "total"):
        assert rows[phase]["verdict"] == "slower", (phase, rows[phase])
        assert rows[phase]["ci_low_ms"] > 0
    injected_ms = shift_ms(a) * NEW_TOKENS  # one shift per LLM forward
    assert rows["total"]["delta_ms"] == pytest.approx(injected_ms, rel=1e-6)  # medians shift exactly
    assert rows["decode_per_token"]["delta_ms"] == pytest.approx(shift_ms(a), rel=1e-6)
    steps = comp.phases.filter(pl.col("family") == "step")
    assert steps["phase"].to_list() == [f"decode[{k}]" for k in range(NEW_TOKENS - 1)]
    assert steps["a_n"].to_list() == [12] * (NEW_TOKENS - 1)
    # the kernel level compares the runs' traces: same model, same CPU ops
    assert comp.level == "cpu_op"
    assert (comp.kernels["presence"] == "both").all()
    assert (comp.kernels["a_count"] == comp.kernels["b_count"]).all()


def test_cli_json_between_two_runs(slow_pair, tmp_path, capsys):
    a, b = slow_pair
    assert main(["diff", str(a), str(b), "--json", "--plot", str(tmp_path / "w.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    total = next(r for r in out["phases"] if r["phase"] == "total")
    assert {"phase", "a_median_ms", "b_median_ms", "delta_ms", "ci_low_ms", "ci_high_ms", "verdict"} <= set(total)
    assert total["verdict"] == "slower" and total["a_config"] == "c1-kdef-ball-p8-n6-bs1"
    assert out["kernels"] and (tmp_path / "w.png").is_file()


@pytest.fixture(scope="module")
def same_setting_run(tmp_path_factory):
    """One run, two configuration ids for one setting: top-k 'def' is the model's own top-k, 2.
    Interleaved (A B A B ...), so drift of the machine hits both alike."""
    out = tmp_path_factory.mktemp("same") / "run"
    with one_thread():
        run_sweep("tiny", SweepSpec.from_dict({**SWEEP, "top_k": [None, 2], "repeats": 12}), out, nvml="off")
    return out


def test_repeats_of_the_same_setting_are_no_significant_change(same_setting_run):
    result = diff(same_setting_run, same_setting_run, config="c1-kdef-ball-p8-n6-bs1",
                  config_b="c1-k2-ball-p8-n6-bs1")
    phases = result.phases
    assert phases["a_n"].min() == 12 and phases["b_n"].min() == 12
    headline = phases.filter(pl.col("family") == "phase")
    assert headline["phase"].to_list() == ["vision", "projector", "prefill", "decode", "decode_per_token",
                                           "other", "total"]
    assert set(headline["verdict"]) == {"no significant change"}, headline.select("phase", "p_adjusted", "delta_pct")
    assert result.comparisons[0].kernels is None  # no traces recorded in this run
    assert any("no trace" in n for n in result.comparisons[0].notes)


@pytest.mark.parametrize("args, words", [
    ([], "same run directory"),
    (["--config", "c9-nope"], "is not in"),
    (["--config", "c1-kdef-ball-p8-n6-bs1", "--config-b", "c1-k7"], "is not in"),
])
def test_cli_config_errors_exit_2(same_setting_run, args, words, capsys):
    assert main(["diff", str(same_setting_run), str(same_setting_run), *args, "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_run_directory_against_a_trace(slow_pair):
    a, b = slow_pair
    trace = b / "traces" / "c1-kdef-ball-p8-n6-bs1.pt.trace.json.gz"
    [comp] = diff(a, trace).comparisons
    assert (comp.a_config, comp.b_config, comp.level) == ("c1-kdef-ball-p8-n6-bs1", None, "cpu_op")
    total = comp.phases.filter(pl.col("phase") == "total").row(0, named=True)
    assert (total["a_n"], total["b_n"]) == (12, 1)  # one traced request: never a verdict
    assert total["verdict"] == "too few samples" and "fewer than 2" in total["reason"]
    assert comp.kernels.height > 0


def test_pairs_of_configurations_between_runs(tmp_path):
    from molmo_latency.diff import DiffError
    from molmo_latency.diff.sources import Side, plan

    a = Side(tmp_path / "a", "run", ["c1", "c2", "c3"])
    b = Side(tmp_path / "b", "run", ["c3", "c2", "c9"])
    assert plan(a, b) == [("c2", "c2"), ("c3", "c3")]
    assert plan(a, b, config="c1", config_b="c9") == [("c1", "c9")]
    assert plan(a, a, config="c1", config_b="c2") == [("c1", "c2")]
    with pytest.raises(DiffError, match="share no configuration"):
        plan(Side(tmp_path / "x", "run", ["c1", "c2"]), Side(tmp_path / "y", "run", ["c7", "c8"]))
    trace = Side(tmp_path / "t.json.gz", "trace")
    with pytest.raises(DiffError, match="choose one with --config"):
        plan(a, trace)
    assert plan(trace, b, config_b="c9") == [(None, "c9")]


def test_conditions_that_differ_are_named_first(slow_pair, tmp_path, capsys):
    """diff does not refuse different conditions (comparing them is its job), but says which
    differ, so that a machine change is not read as a code change."""
    import shutil

    a, b = slow_pair
    other = tmp_path / "b2"
    shutil.copytree(b, other)
    meta = json.loads((other / "run.json").read_text())
    meta["conditions"] = {**(meta.get("conditions") or {}), "torch_threads": 8}
    meta["versions"]["transformers"] = "9.9.9"
    (other / "run.json").write_text(json.dumps(meta))
    assert main(["diff", str(a), str(other), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any(line.startswith("torch_threads:") and "8 (B)" in line for line in doc["conditions_differ"])
    assert any(line.startswith("transformers:") and "9.9.9 (B)" in line for line in doc["conditions_differ"])
    assert main(["diff", str(a), str(other)]) == 0
    out = capsys.readouterr().out
    assert out.index("conditions that differ") < out.index("Phases")
    assert main(["diff", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["conditions_differ"] == []


def test_a_diff_of_several_configurations_starts_with_the_overall_summary(same_setting_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(same_setting_run, copy)
    assert main(["diff", str(same_setting_run), str(copy), "--wide"]) == 0
    out = capsys.readouterr().out
    assert "overall: 0 of 2 configurations changed" in out
    assert out.index("overall:") < out.index("Summary:") < out.index("Phases")
    assert out.count("legend:") <= 1 and out.count("verdict rule:") == 1
    # each run's data-quality verdict, as `report` gives it, before any change is claimed
    assert main(["report", str(same_setting_run), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)["quality"]["verdict"]
    assert f"data quality: A {verdict}, B {verdict}" in out and out.index("data quality:") < out.index("overall:")
    # no trace was recorded: said once for every configuration, not once per configuration and side
    assert out.count("no trace of") == 2 and "note (every configuration): A: no trace of any configuration" in out
