"""What a new user sees in the first hour: quiet Kineto, tables that fit, errors that name the
problem, sweeps whose failures are told first, help texts with examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, **kw)


# ------------------------------------------------------------------ Kineto's C++ lines


def test_quiet_kineto_drops_the_profiler_lines_of_a_real_profiler_and_keeps_ours(capfd):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from molmo_latency._quiet import quiet_kineto

    with quiet_kineto():
        prof = profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
        os.write(2, b"our own error line\n")
        print("our own stdout line", flush=True)
    torch.ones(2) + 1
    with quiet_kineto():
        prof.__exit__(None, None, None)
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "profiler_start" not in err and "profiler_stop" not in err
    assert "our own error line" in err and "our own stdout line" in out


def test_without_quieting_the_profiler_does_write_those_lines(capfd):
    """The test above can fail: unquieted, this torch writes the lines onto fd 2."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]):
        torch.ones(2) + 1
    _, err = capfd.readouterr()
    if "profiler_start" not in err:
        pytest.skip("this torch build prints no Kineto marker lines")
    assert "USDT" in err


def test_demo_output_has_no_kineto_lines_and_keeps_its_own(tmp_path):
    res = _cli("demo", "--out", str(tmp_path / "demo"), env={"COLUMNS": "100"})
    assert res.returncode == 0, res.stderr
    assert "USDT" not in res.stdout + res.stderr
    assert "profiler_start" not in res.stdout + res.stderr
    assert "demo: tiny reference VLM" in res.stderr and "requests measured" in res.stderr
    assert "Per configuration" in res.stdout


# ------------------------------------------------------------------ tables that fit


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from molmo_latency.sweep import SweepSpec, run_sweep

    out = tmp_path_factory.mktemp("run") / "run"
    run_sweep("tiny", SweepSpec.from_dict({"crops": [1, 4], "top_k": [1, 2], "repeats": 2, "warmup": 0,
                                           "prompt_tokens": [8], "new_tokens": [3]}), out)
    return out


def test_print_frame_fits_the_width_and_names_what_it_left_out(capsys):
    import polars as pl

    from molmo_latency.show import print_frame, set_wide, set_width

    frame = pl.DataFrame({f"column number {i}": [1234.5678 * i] for i in range(12)})
    set_width(100)
    try:
        print_frame(frame, "twelve columns")
        out = capsys.readouterr().out
        set_wide(True)
        print_frame(frame, "twelve columns")
        wide = capsys.readouterr().out
    finally:
        set_wide(False)
        set_width(None)
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "column number 0" in out and "--wide" in out and "\u2026" not in out
    shown = [c for c in frame.columns if c in out]
    assert 0 < len(shown) < 12
    assert all(c in wide for c in frame.columns) and "\u2026" not in wide
    assert max(len(line) for line in wide.splitlines()) > 100


def test_report_fits_100_columns_when_piped_and_wide_shows_every_column(small_run):
    res = _cli("report", str(small_run), env={"COLUMNS": "100"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    for header in ("config", "vision ms", "prefill ms", "decode ms/step", "total ms", "CV %", "n"):
        assert header in res.stdout
    assert "\u2026" not in res.stdout and "c1-k1-" in res.stdout
    unset = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-m", "molmo_latency", "report", str(small_run)],
                           capture_output=True, text=True, env=unset, timeout=600)
    assert max(len(line) for line in piped.stdout.splitlines()) <= 100  # not 540
    wide = _cli("report", str(small_run), "--wide", env={"COLUMNS": "100"})
    assert "crops" in wide.stdout and "top_k" in wide.stdout and "\u2026" not in wide.stdout


# ------------------------------------------------------------------ errors in the user's terms


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_report_names_a_file_a_missing_path_and_a_directory_that_is_no_run(tmp_path):
    trace = tmp_path / "some_trace.json.gz"
    trace.write_bytes(b"\x1f\x8b")
    assert "is a file (a trace?), not a directory" in _one_line_error(_cli("report", str(trace)))
    assert "does not exist" in _one_line_error(_cli("report", str(tmp_path / "nodir")))
    assert "not a run directory (no run.json" in _one_line_error(_cli("report", str(tmp_path)))


def test_a_sweep_where_every_configuration_failed_says_why_first_and_exits_non_zero(tmp_path):
    sweep = tmp_path / "s.toml"
    # 300 and 400 crops x 16 tokens exceed the tiny model's 4096 positions: both fail when run
    sweep.write_text("crops = [300, 400]\nrepeats = 1\nwarmup = 1\nprompt_tokens = [8]\nnew_tokens = [2]\n")
    res = _cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert lines[0].startswith("failed (2 configurations, at warmup)") and "exceed" in lines[0], res.stderr
    assert len([line for line in lines if line.startswith("failed")]) == 1  # one cause, told once
    assert "nothing was measured" in res.stderr and "no requests.parquet" not in res.stderr
    assert "Traceback" not in res.stderr


def test_nvml_required_without_nvml_is_refused_before_anything_is_written(tmp_path):
    from molmo_latency.errors import NvmlUnavailable
    from molmo_latency.telemetry.device import open_gpu

    try:
        open_gpu(0).close()
        pytest.skip("NVML works on this machine")
    except NvmlUnavailable:
        pass
    sweep = tmp_path / "s.toml"
    sweep.write_text("crops = [1]\nrepeats = 1\n")
    line = _one_line_error(_cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out",
                                str(tmp_path / "run"), "--nvml", "required"))
    assert "--nvml off" in line and "nvml='off'" not in line
    assert not (tmp_path / "run").exists()


def test_ray_alone_means_a_local_ray_as_the_readme_says(tmp_path):
    from molmo_latency.cli.main import _fill_optional_values

    assert _fill_optional_values(["profile", "--ray"]) == ["profile", "--ray", "local"]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "--ray [ADDRESS]" in readme
    sweep = tmp_path / "s.toml"
    sweep.write_text("crops = [1]\nrepeats = 1\n")
    res = _cli("profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(tmp_path / "r"), "--ray",
               "--kineto")  # refused after parsing: --ray took no argument
    assert "requires an argument" not in res.stderr
    assert "--kineto is not available with --ray" in _one_line_error(res)


# ------------------------------------------------------------------ help


HELP_COMMANDS = (["profile"], ["report"], ["demo"], ["explain"], ["diff"], ["fit"], ["predict"], ["trace", "summary"])


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c))
def test_help_shows_flags_as_flags_and_ends_with_examples(command):
    res = _cli(*command, "--help", env={"COLUMNS": "100"})
    assert res.returncode == 0
    assert "<bool>" not in res.stdout and "--json" in res.stdout
    tail = res.stdout[res.stdout.index("Examples:"):]
    assert "molmo-latency " + command[0] in tail


def test_top_level_help_lists_every_command_without_importing_any():
    code = ("import sys\nfrom molmo_latency.cli.main import main\nrc = main(['--help'])\n"
            "heavy = [m for m in ('polars', 'torch', 'molmo_latency.cli.profile_cmd', 'molmo_latency.cli.trace_cmd')"
            " if m in sys.modules]\nprint('HEAVY', heavy, rc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY [] 0" in res.stdout, res.stdout + res.stderr
    for name in ("profile", "report", "demo", "explain", "diff", "fit", "predict", "trace"):
        assert f" {name} " in res.stdout


def test_the_program_freezes_what_is_left_before_exiting_and_keeps_the_exit_code():
    """The installed program and `python -m molmo_latency` run `console`: the command's exit code,
    and every object left frozen so the interpreter's last collection skips them; `main` (what
    tests and other programs call) freezes nothing."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["molmo-latency"] == "molmo_latency.cli.main:console"
    # counted before and after (an interpreter may start with objects frozen: Python 3.12 here does)
    code = ("import gc, sys\nfrom molmo_latency.cli.main import console, main\nstart = gc.get_freeze_count()\n"
            "rc = main(['trace', 'summary', '/nonexistent.json'])\nbefore = gc.get_freeze_count()\n"
            "sys.argv = ['molmo-latency', 'trace', 'summary', '/nonexistent.json']\n"
            "print('RC', rc, console(), before == start, gc.get_freeze_count() > before)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 2 2 True True" in res.stdout, res.stdout + res.stderr
    res = _cli("trace", "summary", "/nonexistent.json")
    assert res.returncode == 2 and "nonexistent" in res.stderr


def test_the_listing_of_commands_is_each_command_s_own_help():
    import importlib

    import typer

    from molmo_latency.cli.app import app
    from molmo_latency.cli.main import COMMANDS

    for module, _ in COMMANDS.values():
        importlib.import_module(module)
    group = typer.main.get_command(app)
    for name, (_, listed) in COMMANDS.items():
        own = " ".join((group.commands[name].help or "").split("\n\n")[0].split())
        assert listed == own, name


# ------------------------------------------------------------------ explain and report agree


def test_explain_and_report_agree_on_the_configurations_of_a_write_parquet_directory(tmp_path, tiny, capsys):
    import json

    from molmo_latency import profile_phases
    from molmo_latency.cli.main import main

    with profile_phases(tiny.model) as prof:
        for crops in (1, 4, 1, 4):
            tiny.model.generate(**tiny.request(crops=crops, prompt_tokens=8, new_tokens=3))
    prof.report().write_parquet(tmp_path / "mine")
    assert main(["report", str(tmp_path / "mine"), "--json"]) == 0
    report_configs = {c["config_id"] for c in json.loads(capsys.readouterr().out)["configs"]}
    assert main(["explain", str(tmp_path / "mine"), "--json"]) == 0
    explain_doc = json.loads(capsys.readouterr().out)
    explain_configs = {s["config_id"] for s in explain_doc["phase_stats"]}
    assert len(report_configs) == 2 and report_configs == explain_configs  # crops 1 and 4, not lumped
    assert all(s["n"] == 2 for s in explain_doc["phase_stats"] if s["phase"] == "total_ms")


# ------------------------------------------------------------------ diff


def test_diff_headers_say_self_or_inclusive_and_abbreviations_have_a_legend(tiny, tmp_path):
    from molmo_latency import profile_phases

    traces = []
    for crops in (1, 4):
        with profile_phases(tiny.model, trace_dir=tmp_path / f"c{crops}", nvml="off") as prof:
            tiny.model.generate(**tiny.request(crops=crops, prompt_tokens=8, new_tokens=3))
        traces.append(prof.traces[0]["path"])
    res = _cli("diff", *traces, "--wide", env={"COLUMNS": "100"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "A self us" in out and "Δ self us" in out and "A incl us" in out
    assert " A us " not in out and "d own us" not in out
    assert "legend:" in out and "dec decode" in out and "oth outside every phase" in out
    assert "too few samples" in out and "no significant change │" not in out  # n = 1 a side
    assert not any(p.suffix == ".png" for p in (tmp_path / "c4").iterdir())  # nothing beside B


def test_kernel_names_are_cut_at_the_end_and_never_read_the_same():
    from molmo_latency.cli.diff_cmd import short_names

    a = "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<AddFunctor<float> > >(int, F)"
    b = "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<MulFunctor<float> > >(int, F)"
    short = short_names([a, b], width=30)
    assert short[0].startswith("elementwise_kernel<128, 4, ") and short[0].endswith("\u2026")
    assert short[0] != short[1]


def test_waterfall_starts_at_zero(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from molmo_latency.show.waterfall import _bars

    fig, ax = plt.subplots()
    _bars(ax, ["decode"], 1.6895, [0.004], 1.6935, [False], "ms", "t")
    low, high = ax.get_ylim()
    plt.close(fig)
    assert low == 0.0 and 1.6935 < high < 2.5


# ------------------------------------------------------------------ seams


def test_explain_imports_neither_the_device_layer_nor_nvml_nor_torch():
    code = ("import sys, molmo_latency.explain, molmo_latency.cli.explain_cmd\n"
            "print('LOADED', sorted(m for m in sys.modules if m in ('torch', 'pynvml', "
            "'molmo_latency.telemetry.device', 'molmo_latency.telemetry.sampler')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in res.stdout, res.stdout + res.stderr


def test_throttle_bits_are_nvml_s():
    pynvml = pytest.importorskip("pynvml")
    from molmo_latency.telemetry.throttle import THROTTLE_REASONS

    for name, bit in THROTTLE_REASONS:
        theirs = getattr(pynvml, f"nvmlClocksEventReason{name}", getattr(pynvml, f"nvmlClocksThrottleReason{name}", None))
        assert theirs == bit, name


# ------------------------------------------------------------------ plots


def test_a_plot_with_nothing_to_show_is_skipped_with_its_reason(tmp_path):
    from molmo_latency.sweep import SweepSpec, run_sweep

    out = tmp_path / "run"
    run_sweep("tiny", SweepSpec.from_dict({"crops": [1], "repeats": 2, "warmup": 0, "new_tokens": [1]}), out)
    res = _cli("report", str(out), env={"COLUMNS": "100"})
    assert res.returncode == 0, res.stderr
    assert not (out / "report" / "decode_step_vs_index.png").exists()
    assert "no decode_step_vs_index.png: no decode steps" in res.stdout
    assert (out / "report" / "phase_shares.png").is_file()


def test_decode_plot_is_a_median_with_a_band_and_the_legend_outside(small_run):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from molmo_latency.report import run_report
    from molmo_latency.show import report_plots as plots

    rep = run_report(small_run)
    steps = rep["decode_steps"]
    assert {"median_ms", "q25_ms", "q75_ms", "crops", "top_k"} <= set(steps.columns)
    assert (steps["q25_ms"] <= steps["median_ms"]).all() and (steps["median_ms"] <= steps["q75_ms"]).all()
    saved = {}
    real_save = plots.write_png

    def keep(fig, path):
        saved["fig"] = fig
        fig.canvas.draw()
        saved["axes"] = [(ax.get_window_extent(), ax.get_legend().get_window_extent()) for ax in fig.axes]
        saved["bands"] = sum(len(ax.collections) for ax in fig.axes)
        return real_save(fig, path)

    plots.write_png = keep
    try:
        plots.plot_decode_steps(steps, small_run / "d.png")
    finally:
        plots.write_png = real_save
        plt.close("all")
    assert saved["bands"] == steps["config_id"].n_unique()  # one band per configuration
    for ax_box, legend_box in saved["axes"]:
        assert legend_box.x0 >= ax_box.x1  # the legend sits right of the data, not on it


def test_report_of_a_run_it_cannot_write_into_still_prints_and_explain_writes_nothing_beside_a_file(
        small_run, tmp_path, monkeypatch, capsys):
    """A read-only run directory (simulated: this may run as root, whom chmod does not stop)."""
    import shutil

    import tempfile

    from molmo_latency.cli.main import main
    from molmo_latency.hold import rundir

    run = tmp_path / "ro"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("report", ".lock"))

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    real_mkstemp = tempfile.mkstemp

    def no_temp_file_in_run(*args, dir=None, **kwargs):  # how the PNG writer starts every file
        if dir is not None and os.path.realpath(dir).startswith(os.path.realpath(run)):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(rundir, "atomic_write_bytes", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", no_temp_file_in_run)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Per configuration" in out and "cannot write" in out and "Permission denied" in out
    monkeypatch.undo()
    before = sorted(p.name for p in run.iterdir())
    assert main(["explain", str(run / "requests.parquet")]) == 0
    assert "Phases per configuration" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == before  # nothing beside the Parquet file
    trace = tmp_path / "t.pt.trace.json.gz"
    trace.write_bytes(b"")
    assert "is a trace" in _one_line_error(_cli("explain", str(trace)))


def test_run_sweep_with_nvml_required_and_no_nvml_writes_nothing(tmp_path):
    from molmo_latency.errors import NvmlUnavailable
    from molmo_latency.sweep import SweepSpec, run_sweep
    from molmo_latency.telemetry.device import open_gpu

    try:
        open_gpu(0).close()
        pytest.skip("NVML works on this machine")
    except NvmlUnavailable:
        pass
    with pytest.raises(NvmlUnavailable):
        run_sweep("tiny", SweepSpec.from_dict({"crops": [1], "repeats": 1}), tmp_path / "run", nvml="required")
    assert not (tmp_path / "run").exists()


def test_every_terminal_table_goes_through_the_one_renderer():
    cli = Path(__file__).parents[1] / "molmo_latency" / "cli"
    for module in cli.glob("*.py"):
        if module.name != "show.py":
            source = module.read_text()
            assert "Table(" not in source and "from rich.table" not in source, module.name


def test_ray_asked_for_but_missing_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    import sys as _sys

    from molmo_latency.cli.main import main

    sweep = tmp_path / "s.toml"
    sweep.write_text("crops = [1]\nrepeats = 1\nnew_tokens = [2]\n")
    monkeypatch.setitem(_sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    out = tmp_path / "run"
    assert main(["profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out), "--ray"]) == 2
    assert "--ray needs Ray" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # no run.json, no .lock


def test_ctrl_c_during_a_sweep_says_how_to_resume_and_exits_130(tmp_path):
    import signal
    import time as _time

    sweep = tmp_path / "s.toml"
    sweep.write_text("crops = [1, 2, 4]\nrepeats = 40\nwarmup = 0\nnew_tokens = [4]\n")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "molmo_latency", "profile", "--model", "tiny", "--sweep", str(sweep),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = _time.monotonic() + 240
    while _time.monotonic() < deadline and not list((out / "parts" / "requests").glob("*.parquet")):
        _time.sleep(0.2)  # interrupt once something was measured
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err


def test_the_demo_measures_enough_for_diff_and_fit():
    from molmo_latency.cli.profile_cmd import DEMO_SWEEP

    assert DEMO_SWEEP["repeats"] >= 6  # Mann-Whitney with Holm over the phases can be significant
    assert len(DEMO_SWEEP["new_tokens"]) >= 2  # fit can hold an output length out


def test_workers_without_ray_is_refused_before_anything_is_written(tmp_path, capsys):
    from molmo_latency.cli.main import main

    sweep = tmp_path / "s.toml"
    sweep.write_text("crops = [1]\nrepeats = 1\nnew_tokens = [2]\n")
    out = tmp_path / "run"
    assert main(["profile", "--model", "tiny", "--sweep", str(sweep), "--out", str(out), "--workers", "2"]) == 2
    assert "--workers takes effect only with --ray" in capsys.readouterr().err
    assert not out.exists()


def test_the_progress_line_counts_warm_up_requests_while_nothing_is_measured_yet(capsys):
    """Without a terminal the progress is a line; during the warm-up it says which warm-up request
    ran (the measured count stands at 0 until then), instead of sitting at 0/N in silence."""
    from molmo_latency.cli.profile_cmd import _RichProgress
    from molmo_latency.sweep.schedule import Progress

    bar = _RichProgress(enabled=False)
    bar(Progress(done=0, total=12, configs_done=0, configs_total=2, last_ms=None, last_config="c1", stage="warmup"))
    err = capsys.readouterr().err
    assert err.startswith("[warmup] 0/12 requests") and "warm-up request 1 (c1)" in err


def test_a_wrapped_text_column_never_cuts_a_short_word_in_the_middle(capsys):
    """`ProfilerStep#1000000` (20 characters) in a name column that must shrink to fit 60 columns:
    the table gives up other columns rather than print it cut over two lines."""
    import polars as pl

    from molmo_latency.show import print_frame, set_width

    names = ["ProfilerStep#1000000", "aten::addmm with a long tail of words to wrap", "x"]
    frame = pl.DataFrame({"name": names, **{f"value {i}": [1.5, 2.5, 3.5] for i in range(5)}})
    set_width(60)
    try:
        print_frame(frame, "ops")
    finally:
        set_width(None)
    out = capsys.readouterr().out
    assert "ProfilerStep#1000000" in out
