"""Exceptions and warnings raised by upweight.

Every message says what is wrong, the value observed, and how to fix it.

::

    UpweightError
    ├── InputError(ValueError)
    │   ├── ShapeError          mismatched lengths / feature shapes
    │   ├── NonFiniteError      NaN or inf in data, parameters, gradients or solutions
    │   ├── EmptyDataError      no training / test points
    │   └── DtypeError          wrong dtype (e.g. float labels for cross-entropy)
    ├── NotFittedError(ValueError, AttributeError)
    ├── UnsupportedModelError   model / loss cannot be used as given (train-mode BatchNorm,
    non-per-sample loss) ├── CurvatureError │   ├── NotPositiveDefiniteError   H + δI has a
    non-positive eigenvalue → add damping │   └── CurvatureTooLargeError     dense Hessian requested
    for too many parameters ├── InsufficientMemoryError(MemoryError)   a result or working set that
    would not fit in memory └── SolverError
        ├── DivergenceError            LiSSA's series blew up → larger scale
        └── InaccurateSolveError       residual above the accepted bound

    Warnings: UpweightWarning
    ├── NotAtMinimumWarning    ‖∇R(θ̂)‖ is not ≈ 0: influence assumes θ̂ minimises R
    ├── NotConvergedWarning    an iterative solver stopped before its tolerance
    ├── IndefiniteCurvatureWarning  H + δI has a negative eigenvalue, accepted on request
    └── InaccurateSolveWarning a solve above max_residual, accepted because on_inaccurate="warn"
"""

from __future__ import annotations


class UpweightError(Exception):
    """Base class of every error raised by upweight."""


class InputError(UpweightError, ValueError):
    """Invalid input data or arguments."""


class ShapeError(InputError):
    """Arrays whose shapes or lengths do not fit together."""


class NonFiniteError(InputError):
    """NaN or infinity where finite numbers are required."""


class EmptyDataError(InputError):
    """A data set with no points."""


class DtypeError(InputError, TypeError):
    """An array of the wrong dtype."""


class NotFittedError(UpweightError, ValueError, AttributeError):
    """A method needing ``fit`` was called before it."""


class UnsupportedModelError(UpweightError):
    """The model or loss cannot be used as given."""


class CurvatureError(UpweightError):
    """Problems with the Hessian H = ∇²R(θ̂)."""


class NotPositiveDefiniteError(CurvatureError):
    """H + δI is not positive definite.

    Attributes:
        min_eigenvalue: the smallest eigenvalue of H + δI.
        suggested_damping: a damping δ' that makes H + δ'I positive definite.
    """

    def __init__(self, message: str, min_eigenvalue: float, suggested_damping: float):
        super().__init__(message)
        self.min_eigenvalue = min_eigenvalue
        self.suggested_damping = suggested_damping


class CurvatureTooLargeError(CurvatureError):
    """A dense Hessian was requested for more parameters than allowed."""


class InsufficientMemoryError(UpweightError, MemoryError):
    """A result or working set would not fit in the available memory; raised before allocating it.

    Attributes:
        required_bytes: the estimated size.
        available_bytes: the memory found available (``upweight._memory.available_memory``).
    """

    def __init__(self, message: str, required_bytes: int = 0, available_bytes: int = 0):
        super().__init__(message)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes


class SolverError(UpweightError):
    """An inverse-HVP solver failed."""


class DivergenceError(SolverError):
    """An iterative solver diverged (growing norm, NaN or inf)."""


class InaccurateSolveError(SolverError):
    """A solve's relative residual ‖(H+δI)x − v‖/‖v‖ is above the accepted bound."""


class StoreError(UpweightError):
    """A store folder that cannot be used as it is (unreadable manifest, inconsistent
    array spec)."""


class StoreMismatchError(StoreError):
    """The store was written for a different computation (model, data, objective or solver)."""


class ExecutorConnectionError(UpweightError, ConnectionError):
    """The executor could not reach or start its cluster."""


class UpweightWarning(UserWarning):
    """Base class of every warning emitted by upweight."""


class NotAtMinimumWarning(UpweightWarning):
    """θ̂ is not a stationary point of R, which influence functions assume."""


class NotConvergedWarning(UpweightWarning):
    """An iterative solver stopped at its iteration cap before its tolerance."""


class IndefiniteCurvatureWarning(UpweightWarning):
    """H + δI was seen to have a negative eigenvalue, and the solver was asked to go on
    (``on_indefinite="warn"``)."""


class InaccurateSolveWarning(UpweightWarning):
    """A solve's residual exceeded ``max_residual`` and was accepted (``on_inaccurate="warn"``)."""
