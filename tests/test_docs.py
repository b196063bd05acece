"""The documentation: the site builds with ``mkdocs build --strict``, and the Python code shown in
README.md and the guide pages runs.

Executed pages (every ```python block, in order, in one fresh namespace per page, in a temporary
working folder, without progress bars): README.md, docs/index.md, docs/groups.md,
docs/sklearn.md, docs/big-data.md and docs/transformers.md. A block preceded by an HTML comment
``<!-- docs-test: skip (reason) -->`` is shown but not run (big-data.md's Dask cluster). The other
pages' blocks are not executed: docs/cli.md's report example is a fragment of a larger program,
and the remaining pages hold no Python blocks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: page → the optional packages its code needs (skipped with the reason when one is missing)
EXECUTED = {
    "README.md": (),
    "docs/index.md": (),
    "docs/groups.md": (),
    "docs/sklearn.md": ("sklearn",),
    "docs/big-data.md": (),
    "docs/transformers.md": ("transformers",),
}

FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
SKIP = "<!-- docs-test: skip"


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, less those marked ``<!-- docs-test: skip``."""
    return [m["code"] for m in FENCE.finditer("\n" + text) if not m["before"].startswith(SKIP)]


def test_python_blocks_parser() -> None:
    text = "intro\n```python\na = 1\n```\n<!-- docs-test: skip (no) -->\n```python\nb = 2\n```\n"
    assert python_blocks(text) == ["a = 1"]


@pytest.mark.parametrize("page", sorted(EXECUTED))
def test_code_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in EXECUTED[page]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{page} needs {module}, which is not installed")
    blocks = python_blocks((ROOT / page).read_text(encoding="utf-8"))
    assert blocks, f"{page} has no ```python block to run"
    monkeypatch.chdir(tmp_path)  # the examples write out/, runs/ …
    monkeypatch.setenv("UPWEIGHT_PROGRESS", "0")
    namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page} (python block {i + 1})", "exec"), namespace)
        except Exception as e:  # name the page and block in the failure
            raise AssertionError(
                f"{page}, python block {i + 1} failed: {type(e).__name__}: {e}"
            ) from e


def _own_pages() -> list[Path]:
    """README.md and the docs pages of this site, less the reproduction records (kept elsewhere)."""
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [
        p
        for p in pages
        if "reproduction" not in p.relative_to(ROOT).parts[:2]
        and not p.name.startswith("reproduction")
    ]


def test_readme_shape() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, (
        f"README.md has {len(lines)} lines; keep it under 200 (details go to docs/)"
    )
    first_code = next(i for i, line in enumerate(lines, 1) if line.startswith("```"))
    assert first_code <= 25, (
        f"README.md's first code block starts on line {first_code}; keep it within 25"
    )
    wide = [i for i, line in enumerate(lines, 1) if len(line) > 100]
    assert not wide, f"README.md lines over 100 columns: {wide}"


def test_no_paths_outside_the_repository() -> None:
    """Every page (the reproduction records too) and every source file name data by
    ``$UPWEIGHT_DATA``, never by a folder outside the repository."""
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "src").rglob("*.py"))]
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "../shared" in line or "/work/" in line
    ]
    assert not bad, f"files refer to folders outside the repository (use $UPWEIGHT_DATA): {bad}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if (
        importlib.util.find_spec("mkdocs") is None
        or importlib.util.find_spec("mkdocstrings") is None
    ):
        pytest.skip('mkdocs and mkdocstrings are not installed (pip install -e ".[docs]")')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-q",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    for page in (
        "index.html",
        "solvers/index.html",
        "api/index.html",
        "api/solvers/index.html",
        "reproduction/index.html",
    ):
        assert (tmp_path / "site" / page).is_file(), f"the site lacks {page}"
