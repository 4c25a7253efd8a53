"""Every third-party import of the package is a declared requirement (core or an extra), and an
import that only an extra provides is lazy (inside a function), so a fresh install never meets
an import it did not install.

A module is mapped to its distribution by the installed metadata
(`importlib.metadata.packages_distributions`), else by a short table of well-known names, else
by its own name; requirement names are compared in PEP 503 normal form.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "molmo_latency"
WELL_KNOWN = {"pynvml": "nvidia-ml-py", "PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s;\[<>=!~]", req.strip(), maxsplit=1)[0])


def declared(project: dict) -> tuple[set[str], dict[str, set[str]]]:
    """(core requirement names, extra -> names) of a [project] table."""
    core = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {extra: {_requirement_name(r) for r in reqs}
              for extra, reqs in project.get("optional-dependencies", {}).items()}
    return core, extras


def imports(package: Path) -> list[tuple[str, str, bool]]:
    """(top-level module, file, at module level?) of every absolute import in the package."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == package.name:
                    continue
                found.append((top, str(path.relative_to(package.parent)), id(node) not in functions))
    return found


@functools.lru_cache(maxsize=None)
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution(module: str) -> str:
    dists = _installed().get(module)
    if dists:
        return _norm(dists[0])
    return _norm(WELL_KNOWN.get(module, module))


def problems(project: dict, package: Path = PACKAGE) -> list[str]:
    core, extras = declared(project)
    in_extras = set().union(*extras.values()) if extras else set()
    out = []
    for module, where, top_level in imports(package):
        dist = distribution(module)
        if dist in core:
            continue
        if dist not in in_extras:
            out.append(f"{module} ({where}): no requirement declares {dist}")
        elif top_level:
            out.append(f"{module} ({where}): only an extra declares {dist}, so the import must be lazy")
    return sorted(set(out))


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_every_import_of_the_package_is_declared(project):
    assert problems(project) == []


def test_the_check_fails_when_a_requirement_is_removed(project):
    """Remove scipy (or numpy, pillow, polars, transformers) from pyproject, core and extras
    (the molmoe extra pins transformers too), and the check names it."""
    for name in ("scipy", "numpy", "pillow", "polars", "transformers"):
        reduced = dict(project, dependencies=[r for r in project["dependencies"] if _requirement_name(r) != name],
                       **{"optional-dependencies": {
                           extra: [r for r in reqs if _requirement_name(r) != name]
                           for extra, reqs in project.get("optional-dependencies", {}).items()}})
        assert any(name in p for p in problems(reduced)), name


def test_transformers_is_a_core_requirement_and_the_molmoe_extra_pins_its_line(project):
    core, extras = declared(project)
    assert "transformers" in core
    molmoe = project["optional-dependencies"]["molmoe"]
    assert "transformers==4.51.3" in molmoe and "einops" in extras["molmoe"]


def test_the_check_fails_when_an_extra_is_imported_eagerly(project, tmp_path):
    pkg = tmp_path / "molmo_latency"
    pkg.mkdir()
    (pkg / "eager.py").write_text("import ray\n")
    (pkg / "lazy.py").write_text("def f():\n    import ray\n")
    assert problems(project, pkg) == ["ray (molmo_latency/eager.py): only an extra declares ray, "
                                      "so the import must be lazy"]


def test_test_tooling_is_bounded_above(project):
    for req in project["optional-dependencies"]["test"]:
        if _requirement_name(req) in ("pytest", "hypothesis"):
            assert "<" in req, f"{req}: give an upper bound, so a new major release cannot break the suite"


# ------------------------------------------------------------------ layering: hold never imports torch

HOLD = PACKAGE / "hold"


def _absolute_imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_hold_layer_imports_only_polars_and_itself():
    allowed_own = ("molmo_latency.errors", "molmo_latency.hold", "molmo_latency.safe_fs")  # safe_fs: stdlib only
    for path in sorted(HOLD.glob("*.py")):
        for name in _absolute_imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "polars":
                continue
            assert name.startswith(allowed_own), f"{path.name} imports {name}: hold/ may import only " \
                                                 "the standard library, polars, errors, safe_fs and hold/"


def test_packages_that_hold_or_measure_need_no_lazy_import_trick():
    """No module-level __getattr__ in sweep/ or hold/: reading a run directory lives in hold/, so
    sweep/ may import torch eagerly."""
    for init in (PACKAGE / "sweep" / "__init__.py", HOLD / "__init__.py"):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"], init


def test_reading_a_run_directory_and_analysing_it_never_imports_torch(tmp_path):
    import subprocess

    import polars as pl

    from molmo_latency.hold import RunDir

    run = RunDir(tmp_path / "run")
    run.create_or_resume(run.path, {"model": "fake"}, {})
    for repeat in range(2):
        run.write_unit("c1", repeat, {"requests": pl.DataFrame({"config_id": ["c1"], "repeat": [repeat],
                                                                "order": [repeat], "total_ms": [1.5]})})
    code = ("import sys\nfrom molmo_latency.hold import RunDir\n"
            "import molmo_latency.report, molmo_latency.diff, molmo_latency.explain, molmo_latency.estimator\n"
            "import molmo_latency.cli.explain_cmd, molmo_latency.cli.diff_cmd, molmo_latency.cli.fit_cmd\n"
            f"print('ROWS', RunDir({str(run.path)!r}).table('requests').height)\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m.startswith(('molmo_latency.sweep', 'molmo_latency.profiler'))))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "ROWS 2" in res.stdout and "LOADED []" in res.stdout, res.stdout + res.stderr
