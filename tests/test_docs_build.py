"""The documentation site builds with warnings as errors, and its index links every page (issue 39)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_the_index_and_the_nav_name_every_page():
    index = (ROOT / "docs" / "index.md").read_text()
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        if page != "index.md":
            assert page in linked, f"docs/index.md does not link {page}"
        assert f": {page}" in nav, f"mkdocs.yml's nav does not list {page}"


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed: pip install -e '.[docs]'")
def test_mkdocs_build_strict(tmp_path):
    """docs/ and the API reference from the docstrings (mkdocstrings); any warning fails the build."""
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "hetfl.resolve.load_config" in api and "hetfl.runner.run" in api
