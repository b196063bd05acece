"""upweight — influence functions (Koh & Liang, ICML 2017) for PyTorch models.

    I_up,params(z) = −H⁻¹∇θL(z, θ̂)                 which way θ̂ moves if z is upweighted
    I_up,loss(z, z_test) = −∇θL(z_test)ᵀH⁻¹∇θL(z)  how the test loss moves; removing z ≈ −I/n
    I_pert,loss(z, z_test) = −∇θL(z_test)ᵀH⁻¹∇x∇θL(z)

H = ∇²R(θ̂), R(θ) = (1/n)ΣL(zᵢ, θ) + (l2/2)‖θ‖², plus optional damping δI.
"""

from . import errors
from ._executor import Executor, LocalExecutor
from ._threads import get_threads, set_threads, threads
from ._version import __version__
from .adapters import from_sklearn
from .core import Curvature, Data, Objective, SmoothHinge
from .core.losses import hinge
from .influence import (
    Explanation,
    FastIFScores,
    GroupInfluence,
    Influence,
    InfluenceScores,
    KNNPrefilter,
    ParamInfluence,
    PertScores,
    Provenance,
    Ranking,
    SelfInfluence,
    explain,
    fastif_up_loss,
)
from .loo import (
    GroupLOOComparison,
    LOOComparison,
    ProximalRefit,
    leave_group_out,
    leave_one_out,
    refit,
)
from .solvers import (
    CG,
    EKFAC,
    KFAC,
    Arnoldi,
    Auto,
    DataInf,
    Direct,
    InverseHVPSolver,
    LiSSA,
    Nystrom,
    Solution,
)
from .store import Store

__all__ = [
    "Arnoldi",
    "Auto",
    "CG",
    "Curvature",
    "Data",
    "DataInf",
    "Direct",
    "EKFAC",
    "Executor",
    "Explanation",
    "FastIFScores",
    "GroupInfluence",
    "GroupLOOComparison",
    "Influence",
    "InfluenceScores",
    "InverseHVPSolver",
    "KFAC",
    "KNNPrefilter",
    "LOOComparison",
    "LiSSA",
    "LocalExecutor",
    "Nystrom",
    "Objective",
    "ParamInfluence",
    "PertScores",
    "Provenance",
    "ProximalRefit",
    "Ranking",
    "SelfInfluence",
    "SmoothHinge",
    "Solution",
    "Store",
    "__version__",
    "errors",
    "explain",
    "fastif_up_loss",
    "from_sklearn",
    "get_threads",
    "hinge",
    "leave_group_out",
    "leave_one_out",
    "refit",
    "set_threads",
    "threads",
]
