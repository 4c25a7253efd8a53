"""Every Python example in README.md runs as written.

A block preceded by ``<!-- readme-test: molmoe -->`` needs MolmoE's model code (transformers
4.5x and ../shared/molmo_remote) and skips elsewhere; ``<!-- readme-test: skip REASON -->``
marks a block that cannot run here (a GPU, a real checkpoint), with its reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.molmoe_fixtures import MOLMO_REMOTE, require_molmoe

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    text = README.read_text(encoding="utf-8")
    for m in BLOCK.finditer(text):
        line = text[: m.start("code")].count("\n") + 1
        yield pytest.param(m.group("code"), m.group("mark") or "", id=f"README.md:{line}")


def test_readme_has_python_examples():
    assert len(list(_blocks())) >= 2


@pytest.mark.parametrize("code, mark", list(_blocks()))
def test_readme_example_runs(code, mark, tmp_path, monkeypatch):
    if mark.startswith("skip"):
        pytest.skip(mark)
    if mark == "molmoe":
        require_molmoe()
    # run where the README's relative paths hold: ../shared beside the working directory
    (tmp_path / "work").mkdir()
    if MOLMO_REMOTE.is_dir():
        os.symlink(MOLMO_REMOTE.parent, tmp_path / "shared")
    monkeypatch.chdir(tmp_path / "work")
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_every_picture_the_readme_shows_is_in_the_repository_and_a_png():
    """A picture in the README (the timeline in a trace viewer, ...) is a committed PNG file."""
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text(encoding="utf-8"))
    assert "docs/timeline_viewer.png" in pictures
    for rel in pictures:
        path = README.parent / rel
        assert path.is_file(), rel
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
