"""The public surface and the layering of the package (DESIGN.md §1.3) cannot change by accident."""

from __future__ import annotations

import ast
import pathlib
import types

import upweight

SRC = pathlib.Path(upweight.__file__).parent

# lower number = lower layer; a module may import only its own layer or lower ones
LAYERS = {
    "errors": 0, "_checks": 0, "_progress": 0, "_version": 0, "_executor": 0, "_memory": 0, "store": 0,
    "core": 1, "solvers": 2, "influence": 3, "loo": 4, "datasets": 4, "adapters": 4, "apps": 4, "report": 5, "distributed": 5, "cli": 6,
    "__init__": 5, "__main__": 6,
}


def test_all_is_sorted_and_complete():
    assert upweight.__all__ == sorted(upweight.__all__)
    public = {
        n for n in dir(upweight)
        if (not n.startswith("_") or n == "__version__")
        and (not isinstance(getattr(upweight, n), types.ModuleType) or n == "errors")  # subpackages are not API names
    }
    assert set(upweight.__all__) == public


def _layer(module_path: pathlib.Path) -> int:
    rel = module_path.relative_to(SRC).parts
    return LAYERS[rel[0].removesuffix(".py")]


def test_no_module_imports_a_higher_layer():
    offenders = []
    for path in SRC.rglob("*.py"):
        own = _layer(path)
        pkg_parts = path.relative_to(SRC).parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(pkg_parts[: len(pkg_parts) - (node.level - 1)])
                target = (base + (node.module.split(".") if node.module else []))
                top = target[0] if target else "__init__"
                if top in LAYERS and LAYERS[top] > own:
                    offenders.append(f"{path.relative_to(SRC)} imports {'.'.join(target)}")
    assert not offenders, offenders

