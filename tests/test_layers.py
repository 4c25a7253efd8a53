"""The layers of docs/architecture.md, checked on the source: analysis (transform) never imports
matplotlib, the show layer or the CLI; every PNG is written by the one writer
(``molmo_latency/show/png.py``) and every JSON document printed by the one JSON writer; the show
layer never imports torch or the device layer.

The checks read the files' import statements (at module level and inside functions, plus
``importlib.import_module("...")`` with a literal name), so a lazy import counts as much as an
eager one. Each check is also run on a small fake package with the forbidden line added, so a
check that could never fail would be caught here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "molmo_latency"

# transform: functions from frames to frames (paths relative to the package)
ANALYSIS = ("diff", "estimator", "explain.py", "trace", "telemetry/aggregate.py", "report.py", "stats.py",
            "quality.py", "timeline.py", "flops.py")
# what analysis may never import (a module or any module under it)
NOT_IN_ANALYSIS = ("matplotlib", "molmo_latency.show", "molmo_latency.cli", "rich")
NOT_IN_SHOW = ("torch", "pynvml", "molmo_latency.telemetry.device", "molmo_latency.telemetry.sampler",
               "molmo_latency.profiler", "molmo_latency.models")


def _files(package: Path, parts: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        p = package / part
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else [])
    return out


def _package_root(path: Path) -> Path:
    """The top folder of the package `path` is in (the highest one with an ``__init__.py``)."""
    p = path.parent
    while (p.parent / "__init__.py").is_file():
        p = p.parent
    return p


def imported(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved)."""
    here = list(path.relative_to(_package_root(path).parent).parts[:-1])  # e.g. ["molmo_latency", "diff"]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    return out


def _hits(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


def layer_problems(package: Path = PACKAGE) -> list[str]:
    """One line per import that crosses a layer the wrong way, and per PNG or JSON document
    written outside its one writer."""
    out = []
    for path in _files(package, ANALYSIS):
        for name in _hits(imported(path), NOT_IN_ANALYSIS):
            out.append(f"{path.relative_to(package.parent)} (analysis) imports {name}")
    for path in _files(package, ("show",)):
        for name in _hits(imported(path), NOT_IN_SHOW):
            out.append(f"{path.relative_to(package.parent)} (show) imports {name}")
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        text = path.read_text(encoding="utf-8")
        if ".savefig(" in text and rel != Path("show/png.py"):
            out.append(f"{path.relative_to(package.parent)} saves a figure itself (use show.write_png)")
        if _hits(imported(path), ("matplotlib",)) and rel.parts[0] != "show":
            out.append(f"{path.relative_to(package.parent)} imports matplotlib outside the show layer")
        if rel.parts[0] == "cli" and ("json.dumps(" in text or "msgspec.json.encode(" in text):
            out.append(f"{path.relative_to(package.parent)} writes JSON itself (use show.print_json)")
    return sorted(set(out))


def test_the_layers_hold():
    assert layer_problems() == []


def _fake_package(tmp_path: Path) -> Path:
    pkg = tmp_path / "molmo_latency"
    for sub in ("diff", "estimator", "show", "cli"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "show" / "png.py").write_text("def write_png(fig, path):\n    fig.savefig(path)\n")
    return pkg


def test_the_check_fails_when_analysis_imports_matplotlib(tmp_path):
    pkg = _fake_package(tmp_path)
    assert layer_problems(pkg) == []
    (pkg / "diff" / "waterfall.py").write_text("import matplotlib\n")
    (pkg / "estimator" / "parity.py").write_text("def plot():\n    import matplotlib.pyplot as plt\n")
    problems = layer_problems(pkg)
    assert "molmo_latency/diff/waterfall.py (analysis) imports matplotlib" in problems
    assert "molmo_latency/estimator/parity.py (analysis) imports matplotlib.pyplot" in problems


def test_the_check_fails_when_analysis_imports_the_show_layer_or_saves_a_figure(tmp_path):
    pkg = _fake_package(tmp_path)
    (pkg / "estimator" / "model.py").write_text(
        "def save():\n    from molmo_latency.show.png import write_png\n")
    (pkg / "diff" / "core.py").write_text("from ..show import png\n")
    (pkg / "cli" / "cmd.py").write_text("def f(fig):\n    fig.savefig('x.png')\n")
    (pkg / "cli" / "out.py").write_text("import json\nprint(json.dumps({}))\n")
    problems = layer_problems(pkg)
    assert "molmo_latency/estimator/model.py (analysis) imports molmo_latency.show.png" in problems
    assert "molmo_latency/diff/core.py (analysis) imports molmo_latency.show" in problems
    assert "molmo_latency/cli/cmd.py saves a figure itself (use show.write_png)" in problems
    assert "molmo_latency/cli/out.py writes JSON itself (use show.print_json)" in problems


def test_the_check_fails_when_the_show_layer_imports_torch(tmp_path):
    pkg = _fake_package(tmp_path)
    (pkg / "show" / "table.py").write_text("import torch\n")
    assert layer_problems(pkg) == ["molmo_latency/show/table.py (show) imports torch"]


def test_running_the_analysis_loads_neither_matplotlib_nor_the_show_layer(tmp_path):
    """What the files say is what happens: fitting an estimator, diffing two traces and explaining
    a requests table (each saving or returning its result) load no plotting code."""
    code = (
        "import sys, tempfile, pathlib, polars as pl\n"
        "from molmo_latency.diff import diff\n"
        "from molmo_latency.estimator import example_requests, fit_estimator\n"
        "from molmo_latency.explain import PHASE_MS_COLUMNS, explain\n"
        "import molmo_latency.telemetry.aggregate, molmo_latency.trace, molmo_latency.report\n"
        "from molmo_latency.trace._demo import write_demo_trace\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "t = write_demo_trace(d)\n"
        "diff(t, t).to_dict()\n"
        "fit_estimator(example_requests(seed=0)).save(d / 'm')\n"
        "explain(pl.DataFrame({c: [1.0, 1.2, 0.9] for c in PHASE_MS_COLUMNS})).to_dict()\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'"
        " or m.startswith('molmo_latency.show') or m.startswith('molmo_latency.cli')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "LOADED []" in res.stdout, res.stdout + res.stderr
