"""`trace summary` (cli/trace_cmd.py, issue 15): a CPU-op table for traces without GPU activity, the
one table renderer with pre-formatted cells, names cut after their meaningful part (full in
--json), and lazy imports."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from molmo_latency.cli.main import main
from molmo_latency.cli.trace_cmd import short_name
from tests.test_trace_reader import DATA, raw_events

REPO = Path(__file__).resolve().parent.parent
CPU_ONLY = ("cpu_only.json.gz", "non_gpu.json.gz")


def run(capsys, *args: str) -> tuple[str, str]:
    code = main(["trace", "summary", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def raw_cpu_ops(path: Path) -> dict[str, list[int]]:
    ops: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for event in raw_events(path, ("cpu_op", "Operator")):
        ops[event["name"]][0] += 1
        ops[event["name"]][1] += event["dur_ns"]
    return dict(ops)


@pytest.mark.parametrize("name", CPU_ONLY)
def test_cpu_only_trace_shows_its_cpu_ops(capsys, name):
    expected = raw_cpu_ops(DATA / name)
    assert expected  # these traces have CPU ops and no GPU activity
    out, err = run(capsys, str(DATA / name), "--json")
    doc = json.loads(out)
    assert doc["gpu"] == []
    got = {o["name"]: [o["count"], o["total_us"]] for o in doc["cpu_ops"]}
    assert got == {n: [c, ns / 1000] for n, (c, ns) in expected.items()}
    out, err = run(capsys, str(DATA / name), "--top", "100", "--wide")
    assert "No GPU activity: top CPU ops by total time" in out
    top = max(expected, key=lambda n: (expected[n][1], n))
    assert top in out and f"{expected[top][1] / 1000:,.3f}" in out


def test_the_profilers_own_cpu_trace_shows_cpu_ops(tiny, tmp_path, capsys):
    from molmo_latency import profile_phases

    with profile_phases(tiny.model, trace_dir=tmp_path, nvml="off") as prof:
        tiny.model.generate(**tiny.request(crops=1, prompt_tokens=8, new_tokens=3))
    traces = sorted(tmp_path.glob("*.json*"))
    assert traces, list(tmp_path.iterdir())
    expected = raw_cpu_ops(traces[0])
    out, _ = run(capsys, str(traces[0]), "--top", "5")
    assert "No GPU activity: top CPU ops" in out and "Annotations by total host time" in out
    top = max(expected, key=lambda n: (expected[n][1], n))
    assert top in out
    assert prof is not None


def test_tables_go_through_the_one_renderer(capsys, monkeypatch):
    import molmo_latency.show as show
    import molmo_latency.cli.trace_cmd as trace_cmd

    calls = []
    real = show.print_frame

    def spy(df, title, **kwargs):
        calls.append((title, df))
        return real(df, title, **kwargs)

    monkeypatch.setattr(show, "print_frame", spy)
    run(capsys, str(DATA / "alexnet_a100_forward.json.gz"))
    assert [t.split(" (")[0] for t, _ in calls][:3] == ["GPU per device", "GPU time per kernel category",
                                                         "Top kernels by total time"]
    for _, frame in calls:  # cells arrive formatted: thousands separators, strings only
        assert all(dtype == __import__("polars").String for dtype in frame.schema.values())
    source = Path(trace_cmd.__file__).read_text()
    assert "rich.table" not in source and "Table(" not in source  # no twin renderer


def test_long_names_are_cut_in_tables_and_full_in_json(capsys, monkeypatch):
    from molmo_latency import show

    monkeypatch.setattr(show.console, "width", 200)  # a cut name fits one line (100 columns would wrap it)
    path = DATA / "alexnet_a100_forward.json.gz"
    names = {e["name"] for e in raw_events(path, ("kernel",))}
    longest = max(names, key=len)
    assert len(longest) > 100
    doc = json.loads(run(capsys, str(path), "--json")[0])
    assert longest in {k["name"] for k in doc["kernels"]}
    out, _ = run(capsys, str(path), "--top", "100")
    assert longest not in out and short_name(longest) in out
    wide, _ = run(capsys, str(path), "--top", "100", "--wide")
    assert longest in wide.replace("\n", "") or len(longest) > 200  # rich may fold a very long cell


@pytest.mark.parametrize(("name", "width", "expected"), [
    ("flash_fwd_kernel", 60, "flash_fwd_kernel"),
    ("void at::native::vectorized_elementwise_kernel<(int)4, at::native::FillFunctor<float>, "
     "std::array<char *, (unsigned long)1>>(int, T2, T3)", 60, "at::native::vectorized_elementwise_kernel<(int)4, …>"),
    ("void at::native::reduce_kernel<(int)512, (int)1, at::native::ReduceOp<float, at::native::MeanOps<float, "
     "float, float, float>, unsigned int, float, (int)4>>(T3)", 60, "at::native::reduce_kernel<(int)512, (int)1, …>"),
    ("void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_256x64_16x4_nn_align4>(Params)", 60,
     "cutlass::Kernel<cutlass_80_tensorop_s1688gemm_256x64_16x4_n…"),
    ("void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_256x64_16x4_nn_align4>(Params)", 72,
     "cutlass::Kernel<cutlass_80_tensorop_s1688gemm_256x64_16x4_nn_align4>"),
    ("ampere_sgemm_128x64_nn", 10, "ampere_sg…"),
    ("aten::copy_, op_id = 317175", 60, "aten::copy_, op_id = 317175"),
])
def test_short_name(name, width, expected):
    assert short_name(name, width) == expected
    assert len(short_name(name, width)) <= width


def test_trace_cmd_imports_lazily():
    code = ("import sys; import molmo_latency.cli.trace_cmd; "
            "print(sorted(m for m in ('polars', 'msgspec', 'rich.table', 'torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
