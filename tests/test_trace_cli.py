"""`molmo-latency trace summary`: its JSON against an independent reading of the raw traces."""

from __future__ import annotations

import collections
import json

import pytest

from molmo_latency.cli.main import main
from tests.test_trace_attribution import naive_attribution, naive_union, raw
from tests.test_trace_reader import DATA, GPU_CATS, TRACES, WITH_GPU, raw_events


def summary_json(capsys, name: str) -> dict:
    code = main(["trace", "summary", str(DATA / name), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", TRACES)
def test_json_kernels_are_exact_per_name(capsys, name):
    expected: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for event in raw_events(DATA / name, GPU_CATS):
        expected[event["name"]][0] += 1
        expected[event["name"]][1] += event["dur_ns"]
    doc = summary_json(capsys, name)
    got = {k["name"]: k for k in doc["kernels"]}
    assert set(got) == set(expected)
    for kernel_name, (count, total_ns) in expected.items():
        assert got[kernel_name]["count"] == count
        assert got[kernel_name]["total_us"] == total_ns / 1000
        assert got[kernel_name]["mean_us"] == pytest.approx(total_ns / count / 1000, rel=1e-12)


@pytest.mark.parametrize("name", TRACES)
def test_json_annotations_match_naive_attribution(capsys, name):
    gpu, runtime, annotations = raw(DATA / name)
    kernels: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for g, _, idx in naive_attribution(gpu, runtime, annotations):
        if idx is not None:
            kernels[annotations[idx]["name"]][0] += 1
            kernels[annotations[idx]["name"]][1] += g["dur_ns"]
    instances = collections.Counter(a["name"] for a in annotations)
    doc = summary_json(capsys, name)
    got = {a["name"]: a for a in doc["annotations"]}
    assert {n: a["instances"] for n, a in got.items()} == dict(instances)
    for annotation_name in instances:
        count, total_ns = kernels.get(annotation_name, (0, 0))
        assert got[annotation_name]["kernels"] == count
        assert got[annotation_name]["gpu_kernel_us"] == total_ns / 1000


@pytest.mark.parametrize("name", WITH_GPU)
def test_json_gpu_per_device(capsys, name):
    gpu = raw_events(DATA / name, GPU_CATS)
    doc = summary_json(capsys, name)
    devices = sorted({g["args"].get("device", g["pid"]) for g in gpu})
    assert [d["device"] for d in doc["gpu"]] == devices
    for entry in doc["gpu"]:
        mine = [(g["start_ns"], g["start_ns"] + g["dur_ns"]) for g in gpu
                if g["args"].get("device", g["pid"]) == entry["device"]]
        busy = naive_union(mine)
        span = max(e for _, e in mine) - min(s for s, _ in mine)
        assert entry["busy_us"] == busy / 1000
        assert entry["span_us"] == span / 1000
        assert entry["idle_us"] == (span - busy) / 1000
        assert entry["activities"] == len(mine)


def test_json_of_a_cpu_only_trace_carries_the_warning(capsys):
    doc = summary_json(capsys, "cpu_only.json.gz")
    assert doc["gpu"] == [] and doc["kernels"] == []
    assert any("no GPU activities" in w for w in doc["warnings"])
    assert {a["name"] for a in doc["annotations"]} == {"gloo:all_reduce", "ProfilerStep#551"}


def test_tables_show_names_literally(capsys, monkeypatch):
    from molmo_latency import show

    monkeypatch.setattr(show.console, "width", 200)  # piped output is 100 columns unless COLUMNS says more
    code = main(["trace", "summary", str(DATA / "alexnet_a100_forward.json.gz"), "--top", "50"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "[param|cuda]" in out  # not swallowed as rich markup
    assert "[param|pytorch.model.alex_net|0|0|0|measure|forward]" in out
    assert "GPU per device" in out and "memory" in out


def test_a_cpu_only_trace_says_so_once_in_the_table_title_not_as_a_warning(capsys, monkeypatch):
    """A CPU trace (the tool's own CPU traces are all like this) is not warned about on stderr:
    the CPU-op table's title says there is no GPU activity; --json keeps the reader's warning."""
    from molmo_latency import show

    monkeypatch.setattr(show.console, "width", 200)  # piped output is 100 columns unless COLUMNS says more
    code = main(["trace", "summary", str(DATA / "cpu_only.json.gz")])
    out, err = capsys.readouterr()
    assert code == 0
    assert "no GPU activities" not in err and "No GPU activity" in out
    assert "gloo:all_reduce" in out
    assert main(["trace", "summary", str(DATA / "cpu_only.json.gz"), "--json"]) == 0
    assert any("no GPU activities" in w for w in json.loads(capsys.readouterr().out)["warnings"])


def test_a_timeline_file_without_gpu_or_cpu_ops_says_so_in_its_first_line_not_as_a_warning(tmp_path, capsys,
                                                                                         monkeypatch):
    """`molmo-latency timeline` output holds only our ranges: `trace summary` reads them, and the
    missing GPU activity is said on the first line, not warned about on stderr."""
    import polars as pl

    from molmo_latency import show
    from molmo_latency.timeline import chrome_trace

    monkeypatch.setattr(show.console, "width", 200)
    req = pl.DataFrame({"request": [0], "start_ns": [1_000_000], "end_ns": [9_000_000], "thread_id": [1],
                        "input_tokens": [20]})
    ph = pl.DataFrame({"request": [0, 0], "phase": ["prefill", "decode"], "step": [0, 0],
                       "start_ns": [2_000_000, 6_000_000], "end_ns": [5_000_000, 8_000_000]})
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(chrome_trace(req, ph)))
    assert main(["trace", "summary", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err
    first = out.splitlines()[0]
    assert "0 GPU activities (a CPU-only trace" in first and "3 annotations" in first
    assert "prefill" in out and "decode[0]" in out
