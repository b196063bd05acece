"""``upweight reproduce <experiment> --data PATH --out DIR``: re-run an experiment of Koh & Liang
(2017).

Each experiment is one module of this package defining

- ``NAME`` (the sub-command, e.g. ``"compare-models"``), ``HELP`` (one line) and ``DATA_HELP``
  (what ``--data`` takes),
- ``add_arguments(parser)``: its own options (``--data``, ``--out`` and ``--no-progress`` are added
  here for every experiment),
- ``OUTPUTS``: the names of the files it writes into ``out`` (its PNG(s) and ``report.md``), and
  ``FOLDERS`` those of the folders it keeps there, if any,
- ``run(args, out) -> dict``: computes, prints progress, writes its PNG(s) (``save_figure``) and
  ``report.md`` (``write_text_atomic``) into ``out`` and returns the JSON-able results, which are
  written to ``out/results.json`` here together with the seconds the run took.

Before ``run`` starts, ``--out`` is checked (a writable folder, or one that can be created, in
which none of ``OUTPUTS`` nor ``results.json`` is a folder and none of ``FOLDERS`` a file) and so
is ``--scheduler`` where the experiment has it: a bad value is reported at once, not after the
experiment has run. Every file is written atomically (a temporary file in the same folder, fsync,
``os.replace``), so an interrupted or failed run never leaves a partial figure, report or
``results.json``.

Modules are discovered, so adding an experiment touches no other file. Heavy imports (torch work,
matplotlib) stay inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ... import errors
from ._common import say

#: the paper's order; experiments not listed come after, alphabetically
_ORDER = ("fig1", "fig2", "fig3", "compare_models", "attack", "mismatch", "mislabel")


def experiments() -> list[ModuleType]:
    """The experiment modules of this package, in the paper's order."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``reproduce`` and one sub-command per experiment on ``upweight``'s subparsers."""
    mods = experiments()
    rp = sub.add_parser(
        "reproduce",
        help="re-run an experiment of the paper on real data: " + ", ".join(m.NAME for m in mods),
        description=(
            "Re-run an experiment of Koh & Liang (2017) on data you pass, and write its figure(s), "
            "results.json and a Markdown report with our numbers next to the paper's."
        ),
    )
    exps = rp.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for mod in mods:
        p = exps.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=mod.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument("--data", required=True, metavar="PATH", help=mod.DATA_HELP)
        p.add_argument(
            "--out",
            default=f"out/{mod.NAME}",
            metavar="DIR",
            help="folder for the PNG(s), results.json and report.md",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        mod.add_arguments(p)
        p.set_defaults(func=_runner(mod))
    return rp


def _runner(mod: ModuleType) -> Any:
    def run(args: argparse.Namespace) -> int:
        from ...cli._device import check_device
        from ...cli._scheduler import check_scheduler
        from ...report._files import check_output_folder, write_text_atomic

        t0 = time.perf_counter()
        out = check_output_folder(
            args.out,
            what="--out",
            inside=(*getattr(mod, "OUTPUTS", ()), "results.json"),
            folders=getattr(mod, "FOLDERS", ()),
        )
        check_scheduler(getattr(args, "scheduler", None))
        check_device(getattr(args, "device", None))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.InputError(
                f"--out {out}: cannot create the folder ({exc.strerror or exc}); "
                "choose another place."
            ) from exc
        results = mod.run(args, out)
        seconds = time.perf_counter() - t0
        results = {"experiment": mod.NAME, **results, "seconds": seconds}
        write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=_jsonable))
        say(
            f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} to {out}"
            f" ({seconds:.1f}s)"
        )
        return 0

    return run


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
