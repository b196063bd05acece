"""Adapters from other libraries' fitted models to an ``upweight.Objective``.

scikit-learn is imported only when ``from_sklearn`` is called.
"""

from .sklearn import LinearScores, OneVsRest, SklearnProblem, from_sklearn, squared_hinge

__all__ = ["LinearScores", "OneVsRest", "SklearnProblem", "from_sklearn", "squared_hinge"]
