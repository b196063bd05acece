"""Validation against actual retraining (Koh & Liang 2017, §4.1, Fig. 2)."""

from .compare import LOOComparison, leave_one_out
from .group import GroupLOOComparison, leave_group_out
from .proximal import ProximalRefit
from .retrain import RefitResult, refit

__all__ = [
    "GroupLOOComparison",
    "LOOComparison",
    "ProximalRefit",
    "RefitResult",
    "leave_group_out",
    "leave_one_out",
    "refit",
]
