"""The public surface and the layering of the package (core → solvers → influence → applications
→ CLI/report) cannot change by accident."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import upweight

SRC = pathlib.Path(upweight.__file__).parent

# lower number = lower layer; a module may import only its own layer or lower ones
LAYERS = {
    "errors": 0,
    "_checks": 0,
    "_threads": 0,
    "_progress": 0,
    "_version": 0,
    "_executor": 0,
    "_memory": 0,
    "store": 0,
    "core": 1,
    "solvers": 2,
    "influence": 3,
    "loo": 4,
    "datasets": 4,
    "adapters": 4,
    "report": 5,
    "distributed": 5,
    "cli": 6,
    "__init__": 5,
    "__main__": 6,
    "paper": 7,  # the paper's experiments: built on the library, never imported by it
}

# The one way into upweight.paper from outside it: the CLI registers ``upweight reproduce`` from
# upweight.paper.cli, inside a function (so that importing upweight.cli.main imports no experiment).
LAZY_PAPER_ENTRY = ("cli/main.py", ("paper", "cli"))

# what ``import upweight`` must leave unimported (heavy, optional, or not the library)
NOT_ON_IMPORT = (
    "scipy.stats",
    "matplotlib",
    "sklearn",
    "dask",
    "distributed",
    "transformers",
    "upweight.paper",
)


def test_all_is_sorted_and_complete():
    assert upweight.__all__ == sorted(upweight.__all__)
    public = {
        n
        for n in dir(upweight)
        if (not n.startswith("_") or n == "__version__")
        # subpackages are not API names
        and (not isinstance(getattr(upweight, n), types.ModuleType) or n == "errors")
    }
    assert set(upweight.__all__) == public


# ── the import scanner ────────────────────────────────────────────────────────────────


def _imports(rel: str, source: str) -> list[tuple[tuple[str, ...], bool]]:
    """The modules of ``upweight`` that the module at ``rel`` (a path inside ``src/upweight``)
    imports.

    Each as (its parts below ``upweight``, ``()`` for the package itself; whether the import sits
    inside a function). Relative and absolute (``import upweight.x``, ``from upweight.x import y``)
    imports alike; ``from pkg import name`` counts as importing ``pkg.name``, which also covers
    ``from . import errors``. Imports of other packages are left out.
    """
    parts = pathlib.PurePosixPath(rel).parts
    pkg = parts[:-1]  # the package the module is in, below upweight
    tree = ast.parse(source)
    in_function = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if n is not f
    }
    found: list[tuple[tuple[str, ...], bool]] = []
    for node in ast.walk(tree):
        lazy = id(node) in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name.split(".")
                if name[0] == "upweight":
                    found.append((tuple(name[1:]), lazy))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(pkg):
                    continue  # beyond the top of upweight: not ours
                base = list(pkg[: len(pkg) - (node.level - 1)])
            elif node.module and node.module.split(".")[0] == "upweight":
                base = []
            else:
                continue
            mod = node.module.split(".") if node.module else []
            if not node.level:
                mod = mod[1:]  # drop "upweight"
            target = tuple(base + mod)
            for alias in node.names:  # `from pkg import name`: name may be a submodule
                # `from upweight import Influence` imports upweight itself
                sub = target or alias.name in LAYERS
                found.append(((*target, alias.name) if sub and alias.name != "*" else target, lazy))
    return found


def _top(rel: str) -> str:
    return pathlib.PurePosixPath(rel).parts[0].removesuffix(".py")


def layer_violations(sources: dict[str, str]) -> list[str]:
    """Imports of a higher layer, and imports of upweight.paper from outside it, in ``{rel:
    source}``."""
    offenders = []
    for rel, source in sorted(sources.items()):
        own_top = _top(rel)
        own = LAYERS[own_top]
        for target, lazy in _imports(rel, source):
            top = target[0] if target else "__init__"
            if top == "paper" and own_top != "paper":
                entry_rel, entry_target = LAZY_PAPER_ENTRY
                if rel == entry_rel and target[: len(entry_target)] == entry_target and lazy:
                    continue
                offenders.append(
                    f"{rel} imports upweight.{'.'.join(target)} (only upweight.paper may, "
                    f"and {entry_rel} lazily from upweight.{'.'.join(entry_target)})"
                )
            elif top in LAYERS and LAYERS[top] > own:
                offenders.append(f"{rel} imports upweight.{'.'.join(target)} (a higher layer)")
    return offenders


def _package_sources() -> dict[str, str]:
    return {path.relative_to(SRC).as_posix(): path.read_text() for path in SRC.rglob("*.py")}


def test_no_module_imports_a_higher_layer_or_the_paper():
    sources = _package_sources()
    assert (
        "paper/fig2.py" in sources
        and "paper/cli/fig2.py" in sources
        and "core/objective.py" in sources
    )
    assert layer_violations(sources) == []


def test_the_scanner_catches_planted_violations():
    """Each planted import must be reported (relative, absolute, `from . import`, module-level
    entry)."""
    bad = {
        "core/a.py": "from upweight.cli import main\n",
        "core/b.py": "import upweight.influence.engine as e\n",
        "core/c.py": "def f():\n    from upweight import Influence\n",
        "solvers/d.py": "from ..influence import Influence\n",
        "influence/e.py": "from .. import cli\n",
        "loo/f.py": "from ..paper.fig2 import run_fig2\n",
        "report/g.py": "def f():\n    import upweight.paper\n",
        "cli/_problem.py": "def f():\n    from ..paper.cli import add_parser\n",  # not the entry
        "cli/main.py": "from ..paper.cli import add_parser\n",  # the entry, but at module level
        "distributed/h.py": "def f():\n    from upweight.paper import run_fig1\n",
    }
    found = layer_violations(bad)
    for rel in bad:
        assert sum(line.startswith(rel + " ") for line in found) == 1, (rel, found)

    good = {
        "core/a.py": (
            "from ..errors import InputError\nfrom upweight.core.data import Data\nimport numpy\n"
        ),
        "influence/b.py": "from ..solvers import Direct\nfrom . import results\n",
        "cli/main.py": (
            "def build_parser():\n    from ..paper.cli import add_parser\n    import upweight as"
            " uw\n"
        ),
        "paper/fig2.py": "from ..core import Data\nfrom ..loo import refit\n",
        "paper/cli/fig2.py": (
            "from ... import errors\nfrom ...cli._scheduler import open_executor\n"
            "def run():\n    from ..fig2 import run_fig2\n"
        ),
        "__init__.py": "from . import errors\nfrom .influence import Influence\n",
    }
    assert layer_violations(good) == []


# ── import time ───────────────────────────────────────────────────────────────────────


def test_import_upweight_stays_light():
    """``import upweight`` imports the library alone: no scipy.stats, plotting, sklearn, Dask,
    transformers, nor the paper's experiments (each is imported by the function that needs it)."""
    code = textwrap.dedent(f"""
        import sys
        import upweight
        print(",".join(m for m in {NOT_ON_IMPORT!r} if m in sys.modules))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(SRC.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        },
    )
    assert out.stdout.strip() == "", f"import upweight imported {out.stdout.strip()}"


def test_paper_names_load_on_first_use():
    import upweight.paper as paper

    for name in paper.__all__:
        assert getattr(paper, name).__module__.startswith("upweight.paper.")
    assert set(paper.__all__) == set(paper._WHERE) and set(paper.__all__) <= set(dir(paper))


def test_tests_do_not_import_the_benchmarks():
    """The tests check the library; the benchmarks check themselves (``make bench-peers-check``)."""
    tests = pathlib.Path(__file__).resolve().parent
    bad = [
        f"{p.name}:{i}"
        for p in sorted(tests.rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"^\s*(from|import)\s+bench\b|[\"'/]bench/[\w/]*\.py", line)
    ]
    assert not bad, f"tests import code from bench/: {bad}"
