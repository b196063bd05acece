"""MkDocs hook: links from a page to files of the repository outside docs/.

The pages link to repository files such as ``../bench/RESULTS.md`` (the one home of the project's
measured numbers), which work where the Markdown is read in the repository. On the site such a
link points nowhere, so this hook checks that the file exists (a missing one is a warning, which
fails ``mkdocs build --strict``) and rewrites the link: to ``repo_url``/blob/main/PATH when
mkdocs.yml sets ``repo_url``, else to the path in code font. Links that stay inside docs/ are left
to MkDocs' own checks.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")
LINK = re.compile(r"\[([^\]]+)\]\(((?:\.\./)+[^)#\s]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(m: re.Match) -> str:
        text, target, anchor = m.group(1), m.group(2), m.group(3) or ""
        page_dir = posixpath.dirname(page.file.src_uri)
        rel = posixpath.normpath(posixpath.join("docs", page_dir, target))
        path = (root / rel).resolve()
        if path.is_relative_to(docs):
            return m.group(0)
        if not path.is_relative_to(root) or not path.exists():
            log.warning("%s links to %r, which is not a file of the repository", page.file.src_uri, target)
            return m.group(0)
        if repo_url:
            return f"[{text}]({repo_url}/blob/main/{rel}{anchor})"
        shown = f"`{rel}`"
        return shown if text.strip("`") == rel else f"{text} ({shown})"

    return LINK.sub(rewrite, markdown)
