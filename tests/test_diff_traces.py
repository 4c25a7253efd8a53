"""`diff` on traces: real Kineto traces checked against an independent reading of their raw
JSON (json, gzip and plain loops, nothing from molmo_latency), a trace of the tiny model diffed
with itself, and the `molmo-latency diff` command."""

import gzip
import json
import shutil
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.cli.main import main
from molmo_latency.diff import diff

DATA = Path(__file__).parent / "data" / "kineto"
BASE, TEST = DATA / "compare_base.json.gz", DATA / "compare_test.json.gz"
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def raw_events(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f, parse_float=Decimal)["traceEvents"]


def raw_totals(path, cats):
    """{name: (count, total_us as an exact Decimal)} over complete events of the categories."""
    out = defaultdict(lambda: [0, Decimal(0)])
    for e in raw_events(path):
        if e.get("ph") == "X" and e.get("cat") in cats and "dur" in e:
            out[e["name"]][0] += 1
            out[e["name"]][1] += Decimal(e["dur"])
    return {k: (n, t) for k, (n, t) in out.items()}


def check_exact(kernels, a_raw, b_raw):
    rows = {r["name"]: r for r in kernels.iter_rows(named=True)}
    assert set(rows) == set(a_raw) | set(b_raw)
    for name, row in rows.items():
        a_n, a_t = a_raw.get(name, (0, Decimal(0)))
        b_n, b_t = b_raw.get(name, (0, Decimal(0)))
        assert (row["a_count"], row["b_count"]) == (a_n, b_n), name
        assert row["a_total_us"] == float(a_t) and row["b_total_us"] == float(b_t), name
        assert row["delta_us"] == float(b_t - a_t), name
        assert row["presence"] == ("both" if a_n and b_n else "only_a" if a_n else "only_b")


def test_real_pair_counts_and_totals_are_exact():
    result = diff(BASE, TEST)
    comp = result.comparisons[0]
    assert comp.level == "gpu" and comp.phases is None  # no profile_phases ranges in these traces
    a_raw, b_raw = raw_totals(BASE, GPU_CATS), raw_totals(TEST, GPU_CATS)
    check_exact(result.kernels, a_raw, b_raw)
    # ranked by contribution: the first row is the largest |change| of the raw totals
    biggest = max(set(a_raw) | set(b_raw), key=lambda n: abs(b_raw.get(n, (0, 0))[1] - a_raw.get(n, (0, 0))[1]))
    assert result.kernels["name"][0] == biggest
    total_change = sum(t for _, t in b_raw.values()) - sum(t for _, t in a_raw.values())
    assert result.kernels["delta_us"].sum() == pytest.approx(float(total_change))
    assert result.categories["delta_us"].sum() == pytest.approx(float(total_change))
    # no phase ranges: every kernel's time is "other"
    assert set(result.kernels["a_share_other"].drop_nulls().to_list()) == {1.0}


def test_real_pair_at_cpu_op_level_lists_ops_only_in_b():
    result = diff(BASE, TEST, level="cpu_op")
    a_raw, b_raw = raw_totals(BASE, ("cpu_op",)), raw_totals(TEST, ("cpu_op",))
    check_exact(result.kernels, a_raw, b_raw)
    only_b = result.to_dict()["only_in_b"]
    assert sorted(only_b) == sorted(set(b_raw) - set(a_raw))
    assert "AddmmBackward0" in only_b and result.to_dict()["only_in_a"] == []


def test_normalized_names_merge_template_variants_of_the_real_traces():
    exact, merged = diff(BASE, TEST).kernels, diff(BASE, TEST, normalize=True).kernels
    assert merged.height < exact.height
    row = merged.filter(pl.col("name") == "at::native::vectorized_elementwise_kernel<>").row(0, named=True)
    a_raw = raw_totals(BASE, GPU_CATS)
    variants = {n: v for n, v in a_raw.items() if "vectorized_elementwise_kernel<" in n}
    assert row["variants"] == len(variants) == 3
    assert row["a_count"] == sum(n for n, _ in variants.values())
    assert row["a_total_us"] == float(sum(t for _, t in variants.values()))


def test_trace_diffed_with_itself_shows_no_change():
    result = diff(BASE, BASE)
    assert result.kernels["delta_us"].abs().max() == 0.0
    assert (result.kernels["presence"] == "both").all()
    assert result.categories["delta_us"].abs().max() == 0.0


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory, tiny):
    from molmo_latency import profile_phases

    folder = tmp_path_factory.mktemp("tiny_trace")
    with profile_phases(tiny.model, trace_dir=folder, nvml="off") as prof:
        tiny.model.generate(**tiny.request(crops=1, prompt_tokens=8, new_tokens=4))
    [trace] = prof.traces
    return Path(trace["path"])


def test_tiny_trace_with_itself_no_change_at_both_levels(tiny_trace):
    result = diff(tiny_trace, tiny_trace)
    comp = result.comparisons[0]
    assert comp.level == "cpu_op" and any("CPU ops" in n for n in comp.notes)
    assert comp.kernels["delta_us"].abs().max() == 0.0 and comp.kernels["delta_self_us"].abs().max() == 0.0
    phases = comp.phases
    assert set(phases["verdict"]) == {"too few samples"}  # one request a side: no test can tell
    assert phases["delta_ms"].abs().max() == 0.0
    assert phases.filter(pl.col("family") == "step")["phase"].to_list() == ["decode[0]", "decode[1]", "decode[2]"]


def test_tiny_trace_phases_and_ops_match_the_raw_annotations(tiny_trace):
    events = [e for e in raw_events(tiny_trace) if e.get("ph") == "X"]
    ann = {e["name"]: e for e in events if e.get("cat") == "user_annotation"}
    result = diff(tiny_trace, tiny_trace)
    phases = {r["phase"]: r for r in result.phases.iter_rows(named=True)}
    assert phases["total"]["a_median_ms"] == pytest.approx(float(ann["request[0]"]["dur"]) / 1000, rel=1e-12)
    steps = [float(ann[f"decode[{k}]"]["dur"]) for k in range(3)]
    assert phases["decode_per_token"]["a_median_ms"] == pytest.approx(sum(steps) / 3 / 1000, rel=1e-12)
    inside = sum(float(ann[p]["dur"]) for p in ("vision", "projector", "prefill")) + sum(steps)
    assert phases["other"]["a_median_ms"] == pytest.approx((float(ann["request[0]"]["dur"]) - inside) / 1000,
                                                           rel=1e-9)
    # ops inside the vision range on its thread (a plain loop over the raw events)
    v = ann["vision"]
    in_vision = [e for e in events if e.get("cat") == "cpu_op" and e["tid"] == v["tid"]
                 and v["ts"] <= e["ts"] and e["ts"] + e["dur"] <= v["ts"] + v["dur"]]
    ops = {r["phase"]: r for r in result.comparisons[0].phase_ops.iter_rows(named=True)}
    assert ops["vision"]["a_count"] == len(in_vision) > 0
    assert ops["decode"]["a_instances"] == 3
    check_exact(result.kernels, raw_totals(tiny_trace, ("cpu_op",)), raw_totals(tiny_trace, ("cpu_op",)))


# ------------------------------------------------------------------------------------ CLI

def test_cli_json_and_waterfall(tmp_path, capsys):
    png = tmp_path / "w.png"
    assert main(["diff", str(BASE), str(TEST), "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["phases"] == [] and out["levels"] == ["gpu"] and out["plot"] == str(png)
    b_raw = raw_totals(TEST, GPU_CATS)
    for row in out["kernels"]:
        assert {"name", "a_count", "b_count", "a_total_us", "b_total_us", "delta_us"} <= set(row)
        assert row["b_count"] == b_raw[row["name"]][0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_normalize_merges_names(tmp_path, capsys):
    assert main(["diff", str(BASE), str(TEST), "--json", "--normalize", "--no-plot"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["kernels"]]
    assert "at::native::vectorized_elementwise_kernel<>" in names and out["plot"] is None
    assert out["options"]["normalize"] is True


def test_cli_tables(tmp_path, capsys):
    assert main(["diff", str(BASE), str(TEST), "--level", "cpu_op", "--plot", str(tmp_path / "p.png")]) == 0
    text = capsys.readouterr().out
    assert "Kernel level (cpu_op)" in text and "only in B (3)" in text and "Per category" in text


def test_diff_writes_nothing_beside_its_inputs_and_reads_a_read_only_folder(tmp_path, capsys):
    import os
    import stat

    folder = tmp_path / "traces"
    folder.mkdir()
    a, b = shutil.copy(BASE, folder / "base.json.gz"), shutil.copy(TEST, folder / "test.json.gz")
    before = sorted(p.name for p in folder.iterdir())
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert main(["diff", str(a), str(b)]) == 0
        assert "pass --plot PATH" in capsys.readouterr().out
        assert main(["diff", str(a), str(b), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["plot"] is None
    finally:
        os.chmod(folder, stat.S_IRWXU)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("args, words", [
    (["/nonexistent/a.json", str(TEST)], "no such file"),
    ([str(DATA), str(TEST)], "not a run directory"),
    ([str(BASE), str(TEST), "--config", "c1"], "run directories"),
    ([str(BASE), str(TEST), "--level", "gpu_or_cpu"], "--level"),
    ([str(BASE), str(TEST), "--top", "0"], "--top"),
])
def test_cli_bad_input_exits_2_with_one_line(args, words, capsys):
    assert main(["diff", *args, "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("molmo-latency: error:") and words in err and "\n" not in err


def test_cli_truncated_trace_exits_2(tmp_path, capsys):
    bad = tmp_path / "cut.json.gz"
    bad.write_bytes(BASE.read_bytes()[:300])
    assert main(["diff", str(bad), str(TEST), "--no-plot"]) == 2
    assert "cut.json.gz" in capsys.readouterr().err


def test_cli_gpu_level_on_a_cpu_only_trace_exits_2(tiny_trace, capsys):
    assert main(["diff", str(tiny_trace), str(tiny_trace), "--level", "gpu", "--no-plot"]) == 2
    assert "no GPU activities" in capsys.readouterr().err
