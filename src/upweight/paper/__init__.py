"""The paper's experiments (Koh & Liang 2017, §2.3, §4, §5), kept apart from the library.

``import upweight`` never imports this package, and no module of the library imports it: it is
built *on* the library (``upweight.Influence``, the solvers, ``upweight.loo``) the way a user's
own code would be. The only way in from the library is ``upweight reproduce …``, whose parser the
CLI's ``main`` registers lazily from ``upweight.paper.cli``.

- one module per experiment, each a plain function returning numbers (no printing, no plotting,
  no data reading: each takes a loaded split and its settings, one frozen dataclass of
  ``config`` per experiment, e.g. ``Fig1Config``): ``run_fig1`` (§2.3, Fig. 1), ``run_fig2``
  (§4.1–4.2, Fig. 2), ``run_fig3`` (§4.3, Fig. 3), ``run_compare_models`` (§5.1, Fig. 4),
  ``run_attack`` (§5.2), ``run_mismatch`` (§5.3), ``run_mislabel`` (§5.4, Fig. 6); ``features``
  and ``toplayer`` are the feature CNN and the closed-form top layer that §5.1–5.2 share;
- ``upweight.paper.cli``: ``upweight reproduce <experiment>``, one module per experiment, which
  loads the data, prints, plots and writes ``results.json`` and ``report.md``.

The names below are loaded on first use, so that ``upweight reproduce --help`` does not import
every experiment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attack import AttackResult, run_attack
    from .compare_models import CompareResult, run_compare_models
    from .config import (
        AttackConfig,
        CompareModelsConfig,
        FeatureConfig,
        Fig1Config,
        Fig2Config,
        Fig3Config,
        MislabelConfig,
        MismatchConfig,
    )
    from .fig1 import Fig1Result, run_fig1
    from .fig2 import Fig2Result, run_fig2
    from .fig3 import Fig3Result, run_fig3
    from .mislabel import MislabelResult, run_mislabel
    from .mismatch import MismatchResult, run_mismatch

_WHERE = {
    "AttackResult": "attack",
    "run_attack": "attack",
    "CompareResult": "compare_models",
    "run_compare_models": "compare_models",
    "Fig1Result": "fig1",
    "run_fig1": "fig1",
    "Fig2Result": "fig2",
    "run_fig2": "fig2",
    "Fig3Result": "fig3",
    "run_fig3": "fig3",
    "MislabelResult": "mislabel",
    "run_mislabel": "mislabel",
    "MismatchResult": "mismatch",
    "run_mismatch": "mismatch",
    **{
        name: "config"
        for name in (
            "AttackConfig",
            "CompareModelsConfig",
            "FeatureConfig",
            "Fig1Config",
            "Fig2Config",
            "Fig3Config",
            "MislabelConfig",
            "MismatchConfig",
        )
    },
}

__all__ = [
    "AttackConfig",
    "AttackResult",
    "CompareModelsConfig",
    "CompareResult",
    "FeatureConfig",
    "Fig1Config",
    "Fig1Result",
    "Fig2Config",
    "Fig2Result",
    "Fig3Config",
    "Fig3Result",
    "MislabelConfig",
    "MislabelResult",
    "MismatchConfig",
    "MismatchResult",
    "run_attack",
    "run_compare_models",
    "run_fig1",
    "run_fig2",
    "run_fig3",
    "run_mislabel",
    "run_mismatch",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
