"""The math core: data, parameters, losses, objective, gradients and curvature (torch.func)."""

from .curvature import Curvature
from .data import Data
from .losses import SmoothHinge, cross_entropy, hinge, logistic, squared
from .objective import Objective
from .params import Params, ParamSpace

__all__ = [
    "Curvature",
    "Data",
    "Objective",
    "ParamSpace",
    "Params",
    "SmoothHinge",
    "cross_entropy",
    "hinge",
    "logistic",
    "squared",
]
