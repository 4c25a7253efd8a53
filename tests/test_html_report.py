"""The HTML report page (molmo_latency.show.html) in a real browser: it loads with no console
error and no network fetch, shows the verdict, the table and every plot."""

from __future__ import annotations

import polars as pl

from molmo_latency.show.html import HtmlSection, render_html, table_html
from tests.browser import console_errors, render


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1, 2, 3], [2, 1, 3])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_tables_escape_text_and_format_numbers():
    out = table_html(pl.DataFrame({"name": ["<b>x</b>"], "ms": [12345.678], "n": [1200], "ok": [True]}))
    assert "&lt;b&gt;x&lt;/b&gt;" in out and "12,345.7" in out and "1,200" in out and ">yes<" in out


def test_the_page_renders_in_a_browser_with_its_plot_and_table(tmp_path):
    png = _png(tmp_path / "plot.png")
    page = tmp_path / "index.html"
    page.write_text(render_html(
        "run tiny", verdict={"verdict": "noisy", "reasons": ["noisy: repeats disagree by more than 5%"]},
        conditions={"command": "molmo-latency profile --model tiny", "conditions": {"torch_threads": 1,
                                                                                   "gpu": None}},
        sections=[HtmlSection("Configurations", table=pl.DataFrame({"config": ["c1-k1"], "total ms": [12.5]})),
                  HtmlSection("Decode step time", image=png, note="median and P5-P95 band")]), encoding="utf-8")
    dom, log = render(page, screenshot=tmp_path / "shot.png")
    assert console_errors(log) == []
    assert 'id="verdict"' in dom and ">noisy<" in dom and "c1-k1" in dom and "12.500" in dom
    assert dom.count("data:image/png;base64,") == 1 and "http://" not in dom and "https://" not in dom
    assert (tmp_path / "shot.png").stat().st_size > 5000
    # the conditions: the command as one line, the rest as key / value rows (none shown as "none")
    assert "<code>molmo-latency profile --model tiny</code>" in dom
    assert "<td>torch_threads</td><td>1</td>" in dom and '<td>gpu</td><td><span class="note">none</span>' in dom
