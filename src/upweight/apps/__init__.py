"""Reproductions of the paper's experiments (Koh & Liang 2017, §2.3, §4, §5) as plain functions returning numbers.

No printing and no plotting here (the CLI, ``upweight reproduce``, does that); no data is read
here either: each function takes a loaded split.

- ``run_fig1`` (§2.3, Fig. 1), ``run_fig2`` (§4.1–4.2, Fig. 2), ``run_fig3`` (§4.3, Fig. 3)
- ``run_compare_models`` (§5.1, Fig. 4), ``run_attack`` (§5.2), ``run_mismatch`` (§5.3),
  ``run_mislabel`` (§5.4, Fig. 6)
"""

from .attack import AttackResult, run_attack
from .compare_models import CompareResult, run_compare_models
from .fig1 import Fig1Result, run_fig1
from .fig2 import Fig2Result, run_fig2
from .fig3 import Fig3Result, run_fig3
from .mislabel import MislabelResult, run_mislabel
from .mismatch import MismatchResult, run_mismatch

__all__ = [
    "AttackResult",
    "CompareResult",
    "Fig1Result",
    "Fig2Result",
    "Fig3Result",
    "MislabelResult",
    "MismatchResult",
    "run_attack",
    "run_compare_models",
    "run_fig1",
    "run_fig2",
    "run_fig3",
    "run_mislabel",
    "run_mismatch",
]
