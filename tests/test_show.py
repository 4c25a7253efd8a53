"""The show layer's three writers, as a user would check them: a PNG is whole or not there, a JSON
document is valid JSON whatever the numbers, a table cell reads the same in every command."""

from __future__ import annotations

import json
import math
import os
import stat

import polars as pl
import pytest

from molmo_latency.show import format_cell, json_text, write_png
from molmo_latency.show.png import DPI, pyplot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure():
    fig, ax = pyplot().subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    return fig


def test_a_png_is_written_whole_with_normal_permissions_and_nothing_beside_it(tmp_path):
    out = write_png(_figure(), tmp_path / "new" / "fig.png")
    assert out == tmp_path / "new" / "fig.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(out.parent) == ["fig.png"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    from PIL import Image

    with Image.open(out) as im:  # one style: the writer's resolution
        dpi = im.info.get("dpi")
    assert dpi is not None and abs(dpi[0] - DPI) < 0.5


def test_a_failed_png_write_leaves_the_old_file_and_no_stray_file(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"the previous plot")
    fig = _figure()
    real = fig.savefig

    def half_then_fail(f, **kwargs):
        f.write(PNG_MAGIC)  # half a PNG reaches the temporary file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_png(fig, target)
    assert target.read_bytes() == b"the previous plot"
    assert os.listdir(tmp_path) == ["fig.png"]
    assert not pyplot().fignum_exists(fig.number)  # the figure is closed either way
    monkeypatch.setattr(fig, "savefig", real)


def test_json_is_valid_whatever_the_numbers():
    doc = {"a": [1.0, math.nan, -math.inf], "frame": pl.DataFrame({"ms": [2.5, math.inf]}),
           "nested": {"x": (math.nan,)}}
    text = json_text(doc)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": [1.0, None, None], "frame": [{"ms": 2.5}, {"ms": None}],
                                "nested": {"x": [None]}}


def test_explain_json_goes_through_the_one_writer(tmp_path, capsys, monkeypatch):
    """explain --json used its own msgspec writer; now the same document comes from print_json."""
    import molmo_latency.show as show
    from molmo_latency.cli.main import main
    from molmo_latency.explain import PHASE_MS_COLUMNS

    path = tmp_path / "requests.parquet"
    pl.DataFrame({**{c: [1.0, 1.1, 0.9] for c in PHASE_MS_COLUMNS}, "config_id": ["a"] * 3}).write_parquet(path)
    seen = []
    real = show.print_json
    monkeypatch.setattr(show, "print_json", lambda obj: (seen.append(obj), real(obj))[1])
    assert main(["explain", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(seen) == 1 and doc["source"] == str(path) and doc["plot"] is None
    assert doc["has_telemetry"] is False and doc["configs"][0]["config_id"] == "a"


@pytest.mark.parametrize("value, digits, thousands, text", [
    (None, 3, False, "-"), (1234.5678, 3, False, "1234.568"), (1234.5678, 1, True, "1,234.6"),
    (1234567, 3, True, "1,234,567"), (1234567, 3, False, "1234567"), (math.nan, 3, True, "nan"),
    (-math.inf, 2, False, "-inf"), (True, 3, True, "True"), ("[param|x]", 3, True, "[param|x]"),
])
def test_a_cell_reads_the_same_in_every_command(value, digits, thousands, text):
    assert format_cell(value, digits, thousands=thousands) == text


def test_report_plots_name_what_they_leave_out_and_skip_what_shows_nothing(tmp_path, monkeypatch):
    """A decode plot of more configurations than it draws names the ones left out; a prefill plot
    of one input shape is skipped with its reason; a phase-share bar is the median request."""
    import polars as pl

    from molmo_latency.show import report_plots

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(report_plots, "write_png", keep)
    rows = [{"config_id": f"c{c}-b{b}", "blocks": b, "crops": c, "step": s, "median_ms": float(b * 10 + c + s),
             "q25_ms": float(b * 10 + c + s - 1), "q75_ms": float(b * 10 + c + s + 1), "n": 5}
            for b in (1, 2, 3, 4, 5) for c in range(8) for s in range(3)]
    report_plots.plot_decode_steps(pl.DataFrame(rows), tmp_path / "d.png")
    title = figures["d.png"]._suptitle.get_text()
    assert "24 of 40 configurations shown" in title and "and 10 more" in title  # 4 panels x 6 lines
    assert "not shown: " in title and max(len(line) for line in title.splitlines()) <= 150  # wrapped
    one_shape = pl.DataFrame({"config_id": ["a", "b"], "input_tokens": [27, 27], "prefill_ms": [1.0, 2.0],
                              "prefill_total_ms": [2.0, 3.0], "top_k": [1, 2]})
    empty = pl.DataFrame()
    written, skipped = report_plots.write_report_plots(
        {"shares": empty, "prefill_vs_tokens": one_shape, "decode_steps": empty}, tmp_path)
    assert written == [] and "one shape" in dict(skipped)["prefill_vs_input_tokens.png"]
    shares = pl.DataFrame({"config_id": ["a"], "prefill_ms": [6.0], "decode_ms": [2.0], "prefill_share": [0.75],
                           "decode_share": [0.25], "total_median_ms": [10.0], "total_q25_ms": [9.0],
                           "total_q75_ms": [12.0], "n": [7]})
    report_plots.plot_phase_shares(shares, tmp_path / "s.png")
    ax = figures["s.png"].axes[0]
    tops = sorted(p.get_y() + p.get_height() for p in ax.patches)
    assert tops[-1] == 10.0 and "(n=7)" in ax.get_xticklabels()[0].get_text()  # the bar is the median total


def test_position_plot_gives_each_configuration_its_own_panel_and_keeps_legends_off_the_data(tmp_path, monkeypatch):
    """fit's decode_by_position.png: no configuration's predicted line can hide under another's
    (two configurations with the same prediction each get a panel), the configurations not drawn
    are named, and no legend sits on an axes."""
    from molmo_latency.show import estimator_plots

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(estimator_plots, "write_png", keep)
    # six held-out configurations: five with 8 steps (two of them predicted exactly alike), one with 3
    predicted = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.0, "e": 4.0, "short": 1.5}
    rows = [{"request_index": 10 * i + r, "config_key": key, "split": "held_out_configs", "step": s,
             "decode_step_ms": p50 * (1.05 if r else 0.97), "decode_step_p50_ms": p50 + 0.01 * s,
             "decode_step_p95_ms": 1.2 * p50 + 0.01 * s}
            for i, (key, p50) in enumerate(predicted.items()) for r in range(3)
            for s in range(3 if key == "short" else 8)]
    estimator_plots.write_position_plot(pl.DataFrame(rows), {}, tmp_path / "pos.png", max_configs=4)
    fig = figures["pos.png"]
    whole, parts = fig.subfigs
    panels = [ax for ax in parts.axes if ax.get_visible()]
    assert len(panels) == 4
    shown = {ax.get_title().split(" (")[0] for ax in panels}
    assert len(shown) == 4 and shown <= set(predicted)
    for ax in panels:  # its one predicted P50 line is this configuration's own prediction, step by step
        key = ax.get_title().split(" (")[0]
        solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
        assert len(solid) == 1
        want = [predicted[key] + 0.01 * s for s in range(3 if key == "short" else 8)]
        assert list(solid[0].get_ydata()) == pytest.approx(want, abs=1e-9)
        assert "(n=3 requests)" in ax.get_title()
    title = parts._suptitle.get_text()
    assert "4 of 6 held-out configurations" in title
    left_out = set(predicted) - shown
    assert all(k in title.split("not shown: ")[1] for k in left_out)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [lg for sub in fig.subfigs for lg in sub.legends]
    assert len(legends) == 2 and all(ax.get_legend() is None for ax in [*whole.axes, *panels])
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in [*whole.axes, *panels])


def test_diff_waterfall_draws_the_changed_comparisons_first_and_no_empty_kernel_column(tmp_path, monkeypatch):
    """diff --plot of run directories without traces: the comparisons whose total changed
    significantly come first (then the largest changes), the rest are named, and no column of
    "no trace" panels is drawn (the title says why instead)."""
    from types import SimpleNamespace

    from molmo_latency.show import waterfall

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(waterfall, "write_png", keep)

    def comp(name, verdict, delta_pct):
        rows = [{"phase": p, "a_mean_ms": 10.0, "b_mean_ms": 10.0 * (1 + delta_pct / 100), "verdict": verdict,
                 "delta_ms": 10.0 * delta_pct / 100, "delta_pct": delta_pct, "a_n": 8, "b_n": 8}
                for p in ("prefill", "decode", "total")]
        return SimpleNamespace(title=name, phases=pl.DataFrame(rows), categories=None, level=None)

    comps = [comp("small", "no significant change", 2.0), comp("big-untested", "no significant change", 60.0),
             comp("slower", "slower", 20.0), comp("faster", "faster", -30.0), comp("mid", "no significant change", 9.0),
             comp("tiny", "no significant change", 0.5)]
    waterfall.plot_waterfall(SimpleNamespace(comparisons=comps), tmp_path / "w.png")
    fig = figures["w.png"]
    drawn = [ax.get_title().split(":")[0] for ax in fig.axes]
    assert drawn == ["faster", "slower", "big-untested", "mid"]  # significant by |%|, then the largest
    title = fig._suptitle.get_text()
    assert "4 of 6 comparisons drawn" in title and "small" in title and "tiny" in title
    assert "no trace on both sides" in title and len(fig.axes) == 4  # one column: no empty kernel panels
    for ax in fig.axes:  # means (which add up) titled as means; the tested change of the median apart, with n
        assert "means (they add up)" in ax.get_title() and "tested on medians" in ax.get_title()
        assert "n=8/8" in ax.get_title()

    # significance colours only on a phase a test called significant; kernel categories grey (untested)
    from matplotlib.colors import to_hex

    one = comp("one", "slower", 20.0)
    one.phases = one.phases.with_columns(
        pl.when(pl.col("phase") == "decode").then(pl.lit("no significant change")).otherwise(pl.col("verdict"))
        .alias("verdict"))
    one.categories = pl.DataFrame({"category": ["gemm", "attention"], "a_us": [500.0, 300.0],
                                   "b_us": [900.0, 200.0], "delta_us": [400.0, -100.0]})
    one.level = "cpu_op"
    waterfall.plot_waterfall(SimpleNamespace(comparisons=[one]), tmp_path / "one.png")
    phase_ax, kernel_ax = figures["one.png"].axes
    bars = [to_hex(p.get_facecolor()) for p in phase_ax.patches]  # A, prefill, decode, B
    assert bars[1] == waterfall._UP.lower() and bars[2] == waterfall._UP_UNTESTED.lower()
    assert {to_hex(p.get_facecolor()) for p in kernel_ax.patches[1:-1]} <= {
        waterfall._UP_UNTESTED.lower(), waterfall._DOWN_UNTESTED.lower()}


def test_prefill_plot_goes_log_when_one_outlier_would_squash_the_rest(tmp_path, monkeypatch):
    """prefill_vs_input_tokens.png: times spanning more than 30x (a 900 ms outlier among ~3 ms
    prefills) get a log axis; times of one order of magnitude keep a linear axis from zero."""
    from molmo_latency.show import report_plots

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(report_plots, "write_png", keep)
    base = {"config_id": ["a", "a", "b", "b"], "input_tokens": [30, 30, 60, 60], "blocks": [2, 2, 2, 2]}
    report_plots.plot_prefill_vs_tokens(pl.DataFrame({**base, "prefill_ms": [3.0, 900.0, 5.0, 5.5],
                                                      "prefill_total_ms": [4.0, 901.0, 6.0, 6.5]}), tmp_path / "o.png")
    report_plots.plot_prefill_vs_tokens(pl.DataFrame({**base, "prefill_ms": [3.0, 3.2, 5.0, 5.5],
                                                      "prefill_total_ms": [4.0, 4.2, 6.0, 6.5]}), tmp_path / "q.png")
    outlier, quiet = figures["o.png"].axes[0], figures["q.png"].axes[0]
    assert outlier.get_yscale() == "log" and "log" in outlier.get_ylabel()
    assert quiet.get_yscale() == "linear" and quiet.get_ylim()[0] == 0


def test_parity_plot_keeps_its_legend_off_the_data(tmp_path, monkeypatch):
    """fit's parity.png: one legend for all panels, outside every axes."""
    from molmo_latency.estimator import example_requests, fit_estimator
    from molmo_latency.show import estimator_plots

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(estimator_plots, "write_png", keep)
    est = fit_estimator(example_requests(seed=0))
    estimator_plots.write_parity_plot(est.evaluation, est.metrics, tmp_path / "p.png")
    fig = figures["p.png"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    box = fig.legends[0].get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
