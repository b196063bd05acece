"""The configured style holds everywhere: ``ruff check`` (line length 100 included) and
``ruff format --check`` over the package, tests, benchmarks, examples and tools."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "bench", "examples", "tools"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command: list[str]) -> None:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip('ruff is a dev dependency (pip install -e ".[dev]")')
    run = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (
        f"ruff {' '.join(command)}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    )
