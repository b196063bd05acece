"""Validation against actual retraining (Koh & Liang 2017, §4.1, Fig. 2)."""

from .compare import LOOComparison, leave_one_out
from .retrain import RefitResult, refit

__all__ = ["LOOComparison", "RefitResult", "leave_one_out", "refit"]
