"""Keyed sections of one Markdown file (bench/RESULTS.md), so that each benchmark rewrites only its
own part.

A section is the text between ``<!-- section:KEY -->`` and ``<!-- /section:KEY -->``; everything
outside the markers (the file's hand-written introduction, other sections) is kept as it is. A
section may carry machine-readable data in an HTML comment ``<!-- data:{json} -->`` (``embed_json``
/ ``section_json``), from which a summary can be rebuilt without rerunning anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_BEGIN = "<!-- section:{key} -->"
_END = "<!-- /section:{key} -->"
_ANY = re.compile(
    r"<!-- section:(?P<key>[^ >]+) -->\n(?P<body>.*?)\n?<!-- /section:(?P=key) -->", re.S
)
_DATA = re.compile(r"<!-- data:(?P<json>.*?) -->", re.S)


def _check_key(key: str) -> None:
    if not key or any(c.isspace() for c in key) or ">" in key or "--" in key:
        raise ValueError(f"section key {key!r}: use a non-empty key without spaces, '>' or '--'")


def replace_section(path: str | Path, key: str, markdown: str) -> None:
    """Replace the text of section ``key`` in ``path`` by ``markdown``, or append the section.

    The file is created if it does not exist; text outside the section is kept byte for byte.
    """
    _check_key(key)
    path = Path(path)
    begin, end = _BEGIN.format(key=key), _END.format(key=key)
    block = f"{begin}\n{markdown.strip(chr(10))}\n{end}"
    text = path.read_text() if path.exists() else ""
    i = text.find(begin)
    if i >= 0:
        j = text.find(end, i)
        if j < 0:
            raise ValueError(
                f"{path}: section {key!r} has no closing marker {end!r}; fix the file by hand"
            )
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def read_sections(path: str | Path) -> dict[str, str]:
    """The sections of ``path`` in file order, key → text (an absent file has none)."""
    path = Path(path)
    if not path.exists():
        return {}
    return {m["key"]: m["body"] for m in _ANY.finditer(path.read_text())}


def embed_json(data: Any) -> str:
    """``data`` as an HTML comment that Markdown renderers hide (``>`` escaped so it cannot close
    it)."""
    return (
        "<!-- data:"
        + json.dumps(data, ensure_ascii=False, allow_nan=True).replace(">", "\\u003e")
        + " -->"
    )


def section_json(text: str) -> Any | None:
    """The data embedded in a section's text by ``embed_json``, or ``None``."""
    m = _DATA.search(text)
    return json.loads(m["json"]) if m else None
