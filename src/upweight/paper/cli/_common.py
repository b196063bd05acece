"""Small helpers shared by the ``upweight reproduce`` experiments: printing and Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def say(*parts: Any) -> None:
    """Print a line now (progress output of a long experiment)."""
    print(*parts, flush=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
