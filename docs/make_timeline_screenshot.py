"""Redo docs/timeline_viewer.png: a `molmo-latency timeline` file as a real trace viewer shows it.

Perfetto's UI (ui.perfetto.dev) needs the network, which this project's machines do not have, so
the picture comes from Chrome's own trace viewer (catapult's ``trace_viewer_full.html``, the one
behind ``chrome://tracing``), which reads the same Chrome JSON trace format as Perfetto. Nothing
here is a dependency of the package or of its tests; the viewer is fetched with the ordinary
package clients into a cache folder the first time:

- ``trace_viewer_full.html`` from the PyPI wheel ``torch-tb-profiler==0.4.3`` (PyTorch's
  TensorBoard plugin ships catapult's vulcanized viewer), by ``pip download --no-deps``;
- the Web Components v0 polyfill that the viewer needs in a current Chromium
  (``webcomponents.min.js`` from the npm package ``webcomponents.js@0.7.24``, the version the
  plugin's own ``trace_embedding.html`` loads), by ``npm pack``.

The script writes a small page that embeds the trace JSON, serves it from 127.0.0.1, has headless
Chromium (Debian's ``chromium``) load it through the viewer's own importer, zooms to one request,
selects it (the panel below lists its args), takes a screenshot and crops it to the tracks.

    python -m molmo_latency profile --model tiny --sweep examples/sweep-tiny.toml --out /tmp/tiny --threads 1
    python -m molmo_latency timeline /tmp/tiny --request 159 --out /tmp/one.json  # the median request of c4-k2-b4-p16-n12-bs1
    python docs/make_timeline_screenshot.py /tmp/one.json --out docs/timeline_viewer.png \
        --select "decode[5]" --size 1400x470 --crop 0,0,1378,410

    # a request of the tiny model measured inside profile_phases(trace_dir=...), merged into its
    # Kineto trace by Report.write_chrome_trace (written to /tmp/merged.json first):
    python docs/make_timeline_screenshot.py --merged-tiny /tmp/merged.json --out docs/timeline_merged.png \
        --select "decode[2]" --size 1400x650 --crop 0,0,1378,590

The page logs ``TRACE-VIEWER: ...`` lines (what it imported, what it selected) to the browser's
console; the script prints them, and fails when the viewer did not import the trace.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

WHEEL = "torch-tb-profiler==0.4.3"
WHEEL_FILE = "torch_tb_profiler/static/trace_viewer_full.html"
POLYFILL = "webcomponents.js@0.7.24"
CACHE = Path(tempfile.gettempdir()) / "molmo-latency-trace-viewer"

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8">
<script>window.__hideTraceViewerPolyfillWarning = true;</script>
<script src="webcomponents.min.js"></script>
<link rel="import" href="trace_viewer_full.html">
<style>html, body {{ margin: 0; padding: 0; width: 100%; height: 100%; overflow: hidden; }}
#trace-viewer {{ width: 100%; height: 100%; }}</style>
<script id="trace" type="application/json">{trace}</script>
<script>
'use strict';
const FOCUS = {focus};
const SELECT = {select};
function say(msg) {{ console.log('TRACE-VIEWER: ' + msg); }}
window.addEventListener('error', e => say('error: ' + e.message));
say('page');
document.addEventListener('WebComponentsReady', () => {{
  say('components ready');
  const container = document.createElement('track-view-container');
  container.id = 'track_view_container';
  const viewer = document.createElement('tr-ui-timeline-view');
  viewer.track_view_container = container;
  Polymer.dom(viewer).appendChild(container);
  viewer.id = 'trace-viewer';
  viewer.globalMode = true;
  Polymer.dom(document.body).appendChild(viewer);
  const model = new tr.Model();
  const text = document.getElementById('trace').textContent;
  try {{
    new tr.importer.Import(model).importTraces([text]);
  }} catch (err) {{
    say('import failed: ' + err);
    return;
  }}
  {{
    viewer.model = model;
    viewer.viewTitle = {title};
    const slices = [];
    model.getAllThreads().forEach(t => t.sliceGroup.slices.forEach(s => slices.push(s)));
    say('imported ' + slices.length + ' slices, ' + Object.keys(model.getAllProcesses()[0].counters).length +
        ' counter tracks');
    // ours first: in a trace merged into a Kineto trace (Report.write_chrome_trace), the same range
    // names are also the profiler's own user_annotation slices; ours carry the request's args
    slices.sort((a, b) => (b.category === 'molmo_latency') - (a.category === 'molmo_latency'));
    const focus = slices.find(s => s.title === FOCUS) || slices.find(s => s.title.startsWith('request['));
    if (!focus) {{ say('no request slice'); return; }}
    setTimeout(() => {{
      const tv = viewer.trackView;
      tv.modelTrackContainer_.updateCanvasSizeIfNeeded_();
      const w = tv.modelTrackContainer_.canvas.width;
      const dt = new tr.ui.TimelineDisplayTransform();
      dt.set(tv.viewport.currentDisplayTransform);
      const pad = focus.duration * 0.04;
      dt.xSetWorldBounds(focus.start - pad, focus.end + pad, w);
      tv.viewport.setDisplayTransformImmediately(dt);
      const inside = s => s.start >= focus.start && s.end <= focus.end;
      const chosen = (SELECT && slices.find(s => s.title === SELECT && inside(s))) || focus;
      viewer.brushingStateController.changeSelectionFromTimeline(new tr.model.EventSet([chosen]));
      // the floating mouse-mode palette would sit over the slices: not part of the picture
      const palettes = document.querySelectorAll('tr-ui-b-mouse-mode-selector');
      for (let i = 0; i < palettes.length; i++) palettes[i].style.display = 'none';
      say('zoomed to ' + focus.title + ' (' + focus.duration.toFixed(3) + ' ms), selected ' + chosen.title);
    }}, 500);
  }}
}});
</script>
</head><body></body></html>
"""


def viewer_files(cache: Path) -> tuple[Path, Path]:
    """(trace_viewer_full.html, webcomponents.min.js), fetched into `cache` when missing."""
    html, polyfill = cache / "trace_viewer_full.html", cache / "webcomponents.min.js"
    cache.mkdir(parents=True, exist_ok=True)
    if not html.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(cache)],
                       check=True)
        wheel = next(cache.glob("torch_tb_profiler-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            html.write_bytes(z.read(WHEEL_FILE))
    if not polyfill.is_file():
        subprocess.run(["npm", "pack", "--silent", POLYFILL, "--pack-destination", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)
        tgz = next(cache.glob("webcomponents.js-*.tgz"))
        subprocess.run(["tar", "xzf", str(tgz), "-C", str(cache), "package/webcomponents.min.js"], check=True)
        (cache / "package" / "webcomponents.min.js").rename(polyfill)
    return html, polyfill


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no line per file served
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/index.html"


def screenshot(url: str, out: Path, width: int, height: int, budget_ms: int) -> list[str]:
    """Chromium's screenshot of `url` into `out`; returns the page's TRACE-VIEWER lines."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium here: `apt-get install chromium` (Debian)")
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
            capture_output=True, text=True, timeout=300)
    if os.environ.get("DEBUG_VIEWER"):
        print(run.stderr[-6000:])
    return [line.split("TRACE-VIEWER: ", 1)[1].split('", source')[0] for line in run.stderr.splitlines()
            if "TRACE-VIEWER: " in line]


def merged_tiny(out: Path) -> Path:
    """One request of the tiny model (crops 4, 6 new tokens, one thread, three warm-up requests
    first) measured inside ``profile_phases(trace_dir=...)``, merged into its Kineto trace."""
    import torch

    from molmo_latency import profile_phases
    from molmo_latency.models import reference_vlm

    torch.set_num_threads(1)
    ref = reference_vlm("tiny")
    for _ in range(3):
        ref.model.generate(**ref.request(crops=4, new_tokens=6))
    with profile_phases(ref.model, trace_dir=out.parent / f"{out.stem}-traces") as prof:
        ref.model.generate(**ref.request(crops=4, new_tokens=6))
    return prof.report().write_chrome_trace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path, nargs="?", help="a `molmo-latency timeline` JSON file")
    ap.add_argument("--merged-tiny", type=Path, default=None,
                    help="first write this JSON: a tiny-model request merged into its Kineto trace, and show it")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--focus", default=None, help="the slice to zoom to and select (default: the first request)")
    ap.add_argument("--select", default=None,
                    help="a slice inside it to select, so the panel below lists its args (default: the request)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the viewer's files are kept")
    ap.add_argument("--size", default="1500x760", help="browser window WIDTHxHEIGHT")
    ap.add_argument("--crop", default=None, help="keep LEFT,TOP,RIGHT,BOTTOM of the screenshot (pixels)")
    ap.add_argument("--budget-ms", type=int, default=20000, help="virtual time the page gets before the shot")
    a = ap.parse_args()
    if a.merged_tiny is not None:
        a.trace = merged_tiny(a.merged_tiny)
    if a.trace is None:
        ap.error("pass a timeline JSON file, or --merged-tiny FILE")
    doc = json.loads(a.trace.read_text())
    html, polyfill = viewer_files(a.cache)
    width, height = (int(v) for v in a.size.split("x"))
    with tempfile.TemporaryDirectory() as d:
        page = Path(d)
        shutil.copy(html, page / html.name)
        shutil.copy(polyfill, page / polyfill.name)
        title = f"molmo-latency timeline: {a.trace.name}"
        (page / "index.html").write_text(PAGE.format(
            trace=json.dumps(doc).replace("</", "<\\/"), focus=json.dumps(a.focus), select=json.dumps(a.select), title=json.dumps(title)))
        server, url = serve(page)
        try:
            shot = page / "shot.png"
            said = screenshot(url, shot, width, height, a.budget_ms)
        finally:
            server.shutdown()
        for line in said:
            print("viewer:", line)
        if not any(line.startswith("zoomed to ") for line in said):
            raise SystemExit(f"the viewer did not show {a.trace}: {said or 'no message from the page'}")
        if a.crop:
            from PIL import Image

            box = tuple(int(v) for v in a.crop.split(","))
            Image.open(shot).crop(box).save(a.out, optimize=True)
        else:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
