"""Reproductions of the paper's experiments (Koh & Liang 2017, §5) as plain functions returning numbers.

No printing and no plotting here (the CLI, ``upweight reproduce``, does that); no data is read
here either: each function takes a loaded split.
"""

from .mismatch import MismatchResult, run_mismatch

__all__ = ["MismatchResult", "run_mismatch"]
