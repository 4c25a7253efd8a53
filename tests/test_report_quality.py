"""`report` judges its labels: the data-quality verdict with its reasons (tables and --json), an
incomplete run says how many of how many requests it holds and how to resume, cold requests stay
out of the medians, and --html writes one page a browser shows with every plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import polars as pl
import pytest

from molmo_latency.quality import VERDICTS
from tests.browser import console_errors, render

SWEEP = {"crops": [1, 2], "repeats": 3, "warmup": 0, "prompt_tokens": [8], "new_tokens": [3]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from molmo_latency.sweep import SweepSpec, run_sweep

    out = tmp_path_factory.mktemp("quality") / "run"
    run_sweep("tiny", SweepSpec.from_dict(SWEEP), out, command="molmo-latency profile --model tiny --out RUN")
    return out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True, timeout=300)


def test_report_json_carries_the_verdict_and_its_reasons(run_dir):
    res = _cli("report", str(run_dir), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["quality"]["verdict"] in VERDICTS and isinstance(doc["quality"]["reasons"], list)
    assert {r["config_id"] for r in doc["quality_configs"]} == {r["config_id"] for r in doc["configs"]}


def test_the_table_output_starts_with_the_verdict(run_dir):
    res = _cli("report", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("data quality: ")


def test_an_incomplete_run_says_how_many_of_how_many_and_the_command_that_resumes_it(run_dir, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    parts = sorted((cut / "parts" / "requests").glob("*.parquet"))
    for part in parts[:2]:  # as if the sweep was killed before its last two requests
        part.unlink()
        (cut / "parts" / "phases" / part.name).unlink(missing_ok=True)
    for table in ("requests", "phases"):
        (cut / f"{table}.parquet").unlink()
    doc = json.loads(_cli("report", str(cut), "--json").stdout)
    assert doc["quality"]["verdict"] in ("incomplete", "contended", "noisy")
    assert any("holds 4 of 6 requests" in r and "molmo-latency profile --model tiny --out RUN" in r
               for r in doc["quality"]["reasons"]), doc["quality"]


def test_cold_requests_stay_out_of_the_medians_and_are_counted(run_dir, tmp_path):
    from molmo_latency.report import run_report

    cold = tmp_path / "cold"
    shutil.copytree(run_dir, cold)
    rows = pl.read_parquet(cold / "requests.parquet")
    first = rows["order"].min()
    slow = rows.with_columns(pl.when(pl.col("order") == first).then(pl.col("total_ms") * 50).otherwise(pl.col("total_ms")),
                             (pl.col("order") != first).alias("warm"))
    slow.write_parquet(cold / "requests.parquet")
    shutil.rmtree(cold / "parts")  # the edited table is the data now
    rep = run_report(cold)
    config = slow.filter(pl.col("order") == first)["config_id"][0]
    n = rep["config"].filter(pl.col("config_id") == config)["n_valid"][0]
    assert n == 2  # 3 repeats, the cold one left out
    assert any("1 requests were measured cold" in r for r in rep["quality"].reasons)


def test_html_report_shows_the_verdict_the_table_and_every_plot_in_a_browser(run_dir):
    res = _cli("report", str(run_dir), "--html")
    assert res.returncode == 0, res.stderr
    page = run_dir / "report" / "index.html"
    pngs = sorted((run_dir / "report").glob("*.png"))
    dom, log = render(page, screenshot=run_dir / "report" / "index.png")
    assert console_errors(log) == []
    assert 'id="verdict"' in dom and "Per configuration" in dom
    assert dom.count("data:image/png;base64,") == len(pngs) >= 1
    assert "c1-" in dom and "c2-" in dom  # the configuration table


def test_html_report_says_why_a_plot_was_not_drawn(run_dir, tmp_path):
    """A run of one input shape has no prefill-vs-tokens trend: the page says so where the plot
    would be, instead of leaving it out without a word."""
    one = tmp_path / "one_shape"
    shutil.copytree(run_dir, one)
    shutil.rmtree(one / "parts")  # the filtered tables below are the run's data
    shutil.rmtree(one / "report", ignore_errors=True)
    for table in ("requests", "phases"):
        frame = pl.read_parquet(one / f"{table}.parquet")
        frame.filter(pl.col("config_id").str.starts_with("c1-")).write_parquet(one / f"{table}.parquet")
    res = _cli("report", str(one), "--html")
    assert res.returncode == 0, res.stderr
    dom, log = render(one / "report" / "index.html")
    assert console_errors(log) == []
    assert "prefill vs input tokens" in dom and "not drawn: every request has" in dom
    assert not (one / "report" / "prefill_vs_input_tokens.png").exists()
