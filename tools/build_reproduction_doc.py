"""Assemble docs/reproduction.md from the per-experiment pages docs/reproduction/<name>.md.

Each page is written by hand after a full-size run (command, wall time, machine, our numbers
beside the paper's, figure). This script puts them in the paper's order behind one summary
table, fixing the figure links. Usage: python tools/build_reproduction_doc.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "reproduction"
ORDER = ("fig1", "fig2", "fig3", "compare_models", "attack", "mismatch", "mislabel")
INTRO = PAGES / "_intro.md"  # the summary table


def main() -> None:
    parts = [INTRO.read_text().rstrip() + "\n"]
    for name in ORDER:
        text = (PAGES / f"{name}.md").read_text().rstrip() + "\n"
        text = re.sub(r"^# ", "## ", text, count=1)
        text = re.sub(
            r"^(#{2,5}) ",
            lambda m: m.group(1) + "# " if m.start() > 0 else m.group(0),
            text,
            flags=re.M,
        )
        text = re.sub(r"\]\(((?!http)[^)/]+\.(?:png|md))\)", r"](reproduction/\1)", text)
        parts.append(f'<a id="{name}"></a>\n\n' + text)
    (ROOT / "docs" / "reproduction.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'docs' / 'reproduction.md'}")


if __name__ == "__main__":
    main()
