"""The benchmarked methods: upweight's solvers and the peers' influence estimators.

Every method answers one question — the influence of every training point on K test points
for a float32 classifier (W1/W2: multinomial logistic regression ``nn.Linear(d, 10)``; W3: the
MLP and CNN of ``build_model``) trained with cross-entropy and the L2 term (λ/2)‖θ‖² on all
parameters, i.e. with the Hessian H = (1/n) Σ ∇²L(zᵢ, θ̂) + λI of Koh & Liang (2017) §2 (plus a
damping δ where the workload needs one, ``Problem.damping``) — through its library's public
API, with the settings its documentation recommends and the damping/regularisation that makes
its curvature matrix that H + δI. Each
function returns the library's raw scores as a (K, n) array; ``SIGN`` says how they relate to
Koh & Liang's I_up,loss(z, z_test) = −∇L(z_test)ᵀH⁻¹∇L(z) (eq. 2) according to the library's
documentation: +1 = I_up,loss, −1 = −I_up,loss (the peers document ⟨H⁻¹∇L_test, ∇L_train⟩).

Imports of each library happen inside its functions, so a library that is missing only loses
its own rows. The functions run in a fresh worker process (``bench_peers.py --worker``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

#: Batch size of every data loader a library lets us choose (train side), for all libraries —
#: cut per problem (``Problem.grad_batch``) where the loader also yields per-sample gradients.
LOADER_BATCH = 4096
#: Memory for one batch of per-sample gradients (b × p float32 values): at p ≈ 1M, 62 points.
GRAD_BATCH_BYTES = 2**28
#: Methods that form a dense p × p matrix are skipped above this p (float64 p × p at 20,000: 3.2
#: GB).
DENSE_MAX_P = 20_000


class _Flat(torch.nn.Module):
    """(b, 784) → (b, 1, 28, 28): the CNN takes the same flat pixel rows as the other models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 28, 28)


class BasicBlock(torch.nn.Module):
    """ResNet's basic block (He et al. 2016; torchvision's ``BasicBlock``): two 3 × 3
    convolutions with BatchNorm, ReLU, and the identity shortcut — or a 1 × 1 stride-s
    convolution + BatchNorm where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(torch.nn.Module):
    """ResNet-18 as torchvision builds it (``resnet18``: 7 × 7 stride-2 stem + BatchNorm + ReLU
    + 3 × 3 stride-2 max-pool, BasicBlock × [2, 2, 2, 2] of widths w·(1, 2, 4, 8), strides 1, 2,
    2, 2, global average pool, fc), on ``channels`` input channels (flat rows of 28 × 28 pixels
    in, as the other models take them); ``width`` w = 64 is the real ResNet-18 (p = 11,175,370
    for 1 channel, 10 classes). Initialised as torchvision does: convolutions Kaiming-normal
    (fan_out, ReLU), BatchNorm scales 1 and shifts 0, fc PyTorch's default."""

    def __init__(
        self, width: int = 64, classes: int = 10, channels: int = 1, side: int = 28
    ) -> None:
        super().__init__()
        nn = torch.nn
        self.channels, self.side = channels, side
        self.conv1 = nn.Conv2d(channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.channels, self.side, self.side)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(
    arch: str, d: int = 784, classes: int = 10, config: str = "", width: int = 64
) -> torch.nn.Module:
    """The benchmark's models (float32, eval mode; parameters as initialised by torch):

    * ``linear``: ``nn.Linear(d, classes)`` (W1, W2; p = (d + 1)·classes);
    * ``mlp``: 784 → 1024 → 256 → 10 with tanh (W3; p = 1,068,810);
    * ``cnn``: Conv2d(1, 16, 5) → tanh → AvgPool 2 → Conv2d(16, 32, 5) → tanh → AvgPool 2 →
      Linear(512, 64) → tanh → Linear(64, 10) (W3; p = 46,730);
    * ``resnet``: ``ResNet18(width)`` on 1-channel 28 × 28 images (W4; every parameter, BatchNorm in
      eval mode; p = 11,175,370 at width 64; ReLU and max-pooling: W4 uses the Gauss–Newton matrix,
      which needs only the network's Jacobian);
    * ``bert``: ``transformers.BertForSequenceClassification`` from the JSON ``config`` (W5), with
      eager attention (PyTorch's fused attention kernel has no forward-mode derivative, which
      Gauss–Newton products need; the config's JSON does not keep the choice, so it is set here).

    tanh and average pooling keep the loss smooth in θ, so H = ∇²R exists everywhere and a finite
    difference of ∇R checks the HVPs (Koh & Liang §4.2 smooth the ReLU for the same reason); with
    max-pooling, a ±1e-6 step of θ already crossed pooling kinks in a 20-image check.
    """
    nn = torch.nn
    if arch == "linear":
        model: nn.Module = nn.Linear(d, classes)
    elif arch == "mlp":
        model = nn.Sequential(
            nn.Linear(d, 1024), nn.Tanh(), nn.Linear(1024, 256), nn.Tanh(), nn.Linear(256, classes)
        )
    elif arch == "cnn":
        model = nn.Sequential(
            _Flat(),
            nn.Conv2d(1, 16, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(512, 64),
            nn.Tanh(),
            nn.Linear(64, classes),
        )
    elif arch == "resnet":
        model = ResNet18(width, classes)
    elif arch == "bert":
        import json

        import transformers

        cfg = transformers.BertConfig.from_dict(json.loads(config), attn_implementation="eager")
        model = transformers.BertForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown architecture {arch!r}: use linear, mlp, cnn, resnet or bert")
    return model.float().eval()


@dataclass
class Problem:
    """What a worker loads: the float32 model at θ̂ and the data (float32 tensors).

    ``l2`` is the L2 term of training (in H); ``damping`` δ the extra diagonal the workload adds
    for everyone when H + λI is not positive definite at θ̂ (0 otherwise)."""

    model: torch.nn.Module
    X: torch.Tensor | dict[str, torch.Tensor]  # W5: {"input_ids", "attention_mask"}, (n, T) each
    y: torch.Tensor
    Xt: torch.Tensor | dict[str, torch.Tensor]
    yt: torch.Tensor
    l2: float
    workdir: str
    damping: float = 0.0
    curvature: str = "hessian"  # upweight's Influence(curvature=…): "gauss-newton" on W4, W5
    peer_batch: int = 0  # W4: kronfluence's per-device batch (factor, score passes); 0: grad_batch

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def k(self) -> int:
        return len(self.yt)

    @property
    def p(self) -> int:
        return sum(t.numel() for t in self.model.parameters())

    @property
    def reg(self) -> float:
        """λ + δ: the diagonal the peers add to the Hessian of their (unregularised) mean loss."""
        return self.l2 + self.damping

    @property
    def grad_batch(self) -> int:
        """Points per batch wherever a library materialises per-sample gradients (b × p floats)."""
        return max(1, min(LOADER_BATCH, GRAD_BATCH_BYTES // (4 * self.p)))


@dataclass(frozen=True)
class Method:
    key: str
    library: str
    name: str
    settings: str
    sign: int  # documented relation to I_up,loss: +1 or -1
    run: Callable[[Problem], np.ndarray]
    requires: tuple[str, ...] = ()  # modules the method imports: imported (untimed) before it runs
    max_p: int | None = None  # above this p the method is not run …
    skip_reason: str = ""  # … and its row says this
    # only for softmax regression (W1, W2): it needs θ = one output nn.Linear
    linear_only: bool = False
    transformer: bool = False  # also run on W5 (the BERT classifier, dict batches)

    def skipped(self, p: int, arch: str = "linear") -> str | None:
        """Why the method is not run at this p on this architecture, or ``None``."""
        if arch == "bert" and not self.transformer:
            return "skipped: not run on the transformer workload"
        if self.linear_only and arch != "linear":
            return "skipped: needs θ = one output nn.Linear (structured HVP)"
        return f"skipped: {self.skip_reason}" if self.max_p is not None and p > self.max_p else None


def _np(scores: Any) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    return np.asarray(scores, dtype=np.float64)


# ── upweight ─────────────────────────────────────────────────────────────────────────────
def _uw(
    make_solver: Callable[[], Any], linear_only: bool = False
) -> Callable[[Problem], np.ndarray]:
    """An upweight row; ``linear_only``: θ = the weights and biases of the ``nn.Linear`` layers
    only, the parameters kronfluence's K-FAC/EK-FAC score (the others held fixed)."""

    def run(pb: Problem) -> np.ndarray:
        import upweight as uw

        theta = (
            [m for m in pb.model.modules() if isinstance(m, torch.nn.Linear)]
            if linear_only
            else None
        )
        obj = uw.Objective(pb.model, "cross_entropy", l2=pb.l2, params=theta)
        # W5 (θ̂ after a few epochs, no L2): not a minimum, and known not to be — no
        # NotAtMinimumWarning there
        extra = {"curvature": pb.curvature, "grad_tol": 1e9} if pb.curvature != "hessian" else {}
        inf = uw.Influence(
            obj,
            solver=make_solver(),
            damping=pb.damping,
            progress=False,
            on_inaccurate="warn",
            **extra,
        )
        inf.fit(uw.Data.from_any((pb.X, pb.y)))
        scores = inf.up_loss((pb.Xt, pb.yt))
        prov = scores.provenance  # into the worker's log (bench_peers.py --keep DIR keeps it)
        print(
            "upweight solve: "
            + ", ".join(
                f"{k}={prov.get(k)}" for k in ("iterations", "residual_max", "solve_seconds")
            ),
            "hvp batch:",
            "structured" if inf.curvature_.uses_structured else inf.curvature_.hvp_batch_size,
            file=sys.stderr,
            flush=True,
        )
        return _np(scores.values)

    return run


DENSE = "dense p × p"
LINEAR_ONLY = "the nn.Linear layers only (kronfluence's parameters)"


def upweight_methods() -> list[Method]:
    import upweight as uw
    from upweight.solvers.cg import Preconditioner

    req = ("upweight",)
    out = [
        Method(
            "uw-direct",
            "upweight",
            "Direct",
            "float64 H + Cholesky",
            1,
            _uw(uw.Direct),
            req,
            DENSE_MAX_P,
            DENSE,
        ),
        Method(
            "uw-direct-f32",
            "upweight",
            "Direct",
            "dtype=float32: float32 H + Cholesky",
            1,
            _uw(lambda: uw.Direct(dtype=torch.float32)),
            req,
            DENSE_MAX_P,
            DENSE,
        ),
        Method(
            "uw-cg-1e-3",
            "upweight",
            "CG",
            "rtol=1e-3, block=False",
            1,
            _uw(lambda: uw.CG(rtol=1e-3, block=False)),
            req,
        ),
        Method(
            "uw-cg-1e-6",
            "upweight",
            "CG",
            "rtol=1e-6, block=False",
            1,
            _uw(lambda: uw.CG(rtol=1e-6, block=False)),
            req,
        ),
        Method(
            "uw-bcg-1e-3",
            "upweight",
            "block CG",
            "rtol=1e-3, block=True",
            1,
            _uw(lambda: uw.CG(rtol=1e-3, block=True)),
            req,
            transformer=True,
        ),
        Method(
            "uw-bcg-1e-2",
            "upweight",
            "block CG",
            "rtol=1e-2, block=True",
            1,
            _uw(lambda: uw.CG(rtol=1e-2, block=True)),
            req,
        ),
        # mixed precision: bfloat16 operands in the iterations' structured HVP products, the
        # residual exact
        Method(
            "uw-bcg-bf16-1e-2",
            "upweight",
            "block CG, bfloat16 HVPs",
            "rtol=1e-2, block=True, hvp_dtype=bfloat16",
            1,
            _uw(lambda: uw.CG(rtol=1e-2, block=True, hvp_dtype=torch.bfloat16)),
            req,
            linear_only=True,
        ),
        Method(
            "uw-lissa",
            "upweight",
            "LiSSA",
            "defaults: r=4, t=1000, batch 256, scale auto",
            1,
            _uw(lambda: uw.LiSSA(progress=False)),
            req,
        ),
        Method(
            "uw-lissa-cheap",
            "upweight",
            "LiSSA",
            "r=1, t=1000, batch 256",
            1,
            _uw(lambda: uw.LiSSA(repeats=1, progress=False)),
            req,
        ),
        Method(
            "uw-arnoldi",
            "upweight",
            "Arnoldi",
            "defaults: rank 64, oversampling 64",
            1,
            _uw(uw.Arnoldi),
            req,
        ),
    ]
    try:  # K-FAC / EK-FAC solvers and preconditioners, where this checkout has them
        from upweight.solvers.kfac import EKFAC, KFAC
    except ImportError:
        pass
    else:
        req = ("upweight", "upweight.solvers.kfac")
        out += [
            Method("uw-kfac", "upweight", "KFAC", "defaults", 1, _uw(KFAC), req, transformer=True),
            Method(
                "uw-ekfac", "upweight", "EKFAC", "defaults", 1, _uw(EKFAC), req, transformer=True
            ),
            Method(
                "uw-kfac-unchecked",
                "upweight",
                "KFAC",
                "residual_sample=0 (no residual check)",
                1,
                _uw(lambda: KFAC(residual_sample=0)),
                req,
                transformer=True,
            ),
            Method(
                "uw-ekfac-unchecked",
                "upweight",
                "EKFAC",
                "residual_sample=0 (no residual check)",
                1,
                _uw(lambda: EKFAC(residual_sample=0)),
                req,
                transformer=True,
            ),
        ]
        # θ = kronfluence's parameters (the nn.Linear layers): the same scores' definition
        for key, cls in (("kfac", KFAC), ("ekfac", EKFAC)):
            out.append(
                Method(
                    f"uw-{key}-linear-unchecked",
                    "upweight",
                    cls.__name__,
                    f"θ = {LINEAR_ONLY}, residual_sample=0",
                    1,
                    _uw(lambda cls=cls: cls(residual_sample=0), linear_only=True),
                    req,
                    transformer=True,
                )
            )
        import dataclasses

        # Monte-Carlo output-Hessian factors, where this checkout has them
        if "output_factors" in {f.name for f in dataclasses.fields(KFAC)}:
            for key, cls in (("kfac", KFAC), ("ekfac", EKFAC)):
                out += [
                    Method(
                        f"uw-{key}-sampled",
                        "upweight",
                        cls.__name__,
                        "output_factors='sampled'",
                        1,
                        _uw(lambda cls=cls: cls(output_factors="sampled")),
                        req,
                        transformer=True,
                    ),
                    Method(
                        f"uw-{key}-sampled-unchecked",
                        "upweight",
                        cls.__name__,
                        "output_factors='sampled', residual_sample=0",
                        1,
                        _uw(lambda cls=cls: cls(output_factors="sampled", residual_sample=0)),
                        req,
                        transformer=True,
                    ),
                ]
        out += [
            Method(
                "uw-pcg-kfac-1e-3",
                "upweight",
                "CG + KFAC precond.",
                "rtol=1e-3",
                1,
                _uw(lambda: uw.CG(rtol=1e-3, preconditioner=KFAC(), block=False)),
                req,
            ),
            Method(
                "uw-pcg-kfac-1e-6",
                "upweight",
                "CG + KFAC precond.",
                "rtol=1e-6",
                1,
                _uw(lambda: uw.CG(rtol=1e-6, preconditioner=KFAC(), block=False)),
                req,
            ),
            Method(
                "uw-pcg-kfac4096-1e-3",
                "upweight",
                "CG + KFAC precond.",
                "rtol=1e-3, factors from 4,096 points",
                1,
                _uw(lambda: uw.CG(rtol=1e-3, preconditioner=KFAC(max_points=4096), block=False)),
                req,
            ),
            Method(
                "uw-bpcg-kfac4096-1e-3",
                "upweight",
                "block CG + KFAC precond.",
                "rtol=1e-3, factors from 4,096 points, block=True",
                1,
                _uw(lambda: uw.CG(rtol=1e-3, preconditioner=KFAC(max_points=4096), block=True)),
                req,
            ),
            Method(
                "uw-pcg-ekfac-1e-3",
                "upweight",
                "CG + EKFAC precond.",
                "rtol=1e-3",
                1,
                _uw(lambda: uw.CG(rtol=1e-3, preconditioner=EKFAC(), block=False)),
                req,
            ),
        ]
    try:  # Nyström (solver and preconditioner), where this checkout has it
        from upweight.solvers.nystrom import Nystrom
    except ImportError:
        pass
    else:
        req = ("upweight", "upweight.solvers.nystrom")
        out.append(
            Method(
                "uw-nystrom",
                "upweight",
                "Nystrom",
                "rank=100",
                1,
                _uw(lambda: Nystrom(rank=100)),
                req,
            )
        )
        if isinstance(Nystrom(rank=100), Preconditioner):
            out.append(
                Method(
                    "uw-pcg-nystrom-1e-3",
                    "upweight",
                    "CG + Nystrom precond.",
                    "rtol=1e-3, rank=100",
                    1,
                    _uw(lambda: uw.CG(rtol=1e-3, preconditioner=Nystrom(rank=100), block=False)),
                    req,
                )
            )
            out.append(
                Method(
                    "uw-pbcg-nystrom-1e-3",
                    "upweight",
                    "block CG + Nystrom precond.",
                    "rtol=1e-3, rank=100, block=True",
                    1,
                    _uw(lambda: uw.CG(rtol=1e-3, preconditioner=Nystrom(rank=100), block=True)),
                    req,
                )
            )
    try:  # DataInf (Kwon et al. 2024), where this checkout has it
        from upweight.solvers.datainf import DataInf
    except ImportError:
        pass
    else:
        out.append(
            Method(
                "uw-datainf",
                "upweight",
                "DataInf",
                "defaults",
                1,
                _uw(DataInf),
                ("upweight", "upweight.solvers.datainf"),
            )
        )
    return out


# ── pyDVL ────────────────────────────────────────────────────────────────────────────────
def _pydvl(
    make: Callable[[Problem], Any], per_sample_fit: bool = False
) -> Callable[[Problem], np.ndarray]:
    """fit on the training loader, then the documented two-step: test factors H⁻¹∇L_test once,
    then ⟨factors, ∇L(z)⟩ over the training set in chunks (what pyDVL's sequential calculator does).
    The scoring chunks, and the fit loader of EK-FAC (per-sample layer gradients), hold
    ``pb.grad_batch`` points; the fit loader of the HVP-based methods ``LOADER_BATCH``."""

    def run(pb: Problem) -> np.ndarray:
        model = make(pb)
        fit_batch = pb.grad_batch if per_sample_fit else LOADER_BATCH
        model.fit(DataLoader(TensorDataset(pb.X, pb.y), batch_size=fit_batch))
        factors = model.influence_factors(pb.Xt, pb.yt)
        b = pb.grad_batch
        parts = [
            model.influences_from_factors(factors, pb.X[i : i + b], pb.y[i : i + b])
            for i in range(0, pb.n, b)
        ]
        return _np(torch.cat(parts, dim=1))

    return run


def pydvl_methods() -> list[Method]:
    def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, y)

    def direct(pb: Problem) -> Any:
        from pydvl.influence.torch import DirectInfluence

        return DirectInfluence(pb.model, ce, regularization=pb.reg)

    def cg_block(pb: Problem) -> Any:
        from pydvl.influence.torch import CgInfluence, NystroemPreconditioner

        return CgInfluence(
            pb.model,
            ce,
            regularization=pb.reg,
            rtol=1e-7,
            atol=1e-7,
            solve_simultaneously=True,
            preconditioner=NystroemPreconditioner(rank=10),
            warn_on_max_iteration=False,
        )

    def cg_default(pb: Problem) -> Any:
        from pydvl.influence.torch import CgInfluence

        return CgInfluence(pb.model, ce, regularization=pb.reg, warn_on_max_iteration=False)

    def lissa(pb: Problem) -> Any:
        from pydvl.influence.torch import LissaInfluence

        return LissaInfluence(
            pb.model,
            ce,
            regularization=pb.reg,
            maxiter=1000,
            dampen=0.0,
            scale=10.0,
            rtol=1e-4,
            warn_on_max_iteration=False,
        )

    def arnoldi(rank: int) -> Callable[[Problem], Any]:
        def make(pb: Problem) -> Any:
            from pydvl.influence.torch import ArnoldiInfluence

            return ArnoldiInfluence(pb.model, ce, regularization=pb.reg, rank=rank, tol=1e-6)

        return make

    def ekfac(update_diagonal: bool) -> Callable[[Problem], Any]:
        def make(pb: Problem) -> Any:
            from pydvl.influence.torch import EkfacInfluence

            return EkfacInfluence(
                pb.model, update_diagonal=update_diagonal, hessian_regularization=pb.reg
            )

        return make

    def nystroem(pb: Problem) -> Any:
        from pydvl.influence.torch import NystroemSketchInfluence

        return NystroemSketchInfluence(pb.model, ce, regularization=pb.reg, rank=10)

    lib, req = "pyDVL", ("pydvl.influence.torch",)
    return [
        Method(
            "pydvl-direct",
            lib,
            "DirectInfluence",
            "regularization=λ",
            -1,
            _pydvl(direct),
            req,
            DENSE_MAX_P,
            DENSE,
        ),
        Method(
            "pydvl-cg-block",
            lib,
            "CgInfluence (block CG)",
            "docs: rtol=atol=1e-7, solve_simultaneously, NystroemPreconditioner(rank=10)",
            -1,
            _pydvl(cg_block),
            req,
        ),
        Method(
            "pydvl-cg",
            lib,
            "CgInfluence",
            "defaults: rtol=1e-4, atol=1e-6, one rhs at a time",
            -1,
            _pydvl(cg_default),
            req,
        ),
        Method(
            "pydvl-lissa",
            lib,
            "LissaInfluence",
            "docs: maxiter=1000, scale=10, dampen=0, rtol=1e-4",
            -1,
            _pydvl(lissa),
            req,
        ),
        Method(
            "pydvl-arnoldi-10",
            lib,
            "ArnoldiInfluence",
            "docs: rank=10, tol=1e-6",
            -1,
            _pydvl(arnoldi(10)),
            req,
        ),
        Method(
            "pydvl-arnoldi-100",
            lib,
            "ArnoldiInfluence",
            "rank=100, tol=1e-6",
            -1,
            _pydvl(arnoldi(100)),
            req,
        ),
        Method(
            "pydvl-kfac",
            lib,
            "EkfacInfluence (K-FAC)",
            "update_diagonal=False",
            -1,
            _pydvl(ekfac(False), True),
            req,
        ),
        Method(
            "pydvl-ekfac",
            lib,
            "EkfacInfluence (EK-FAC)",
            "docs: update_diagonal=True",
            -1,
            _pydvl(ekfac(True), True),
            req,
        ),
        Method(
            "pydvl-nystroem",
            lib,
            "NystroemSketchInfluence",
            "docs: rank=10",
            -1,
            _pydvl(nystroem),
            req,
        ),
    ]


# ── captum ───────────────────────────────────────────────────────────────────────────────
def _captum(cls_name: str, **kwargs: Any) -> Callable[[Problem], np.ndarray]:
    """captum's Hessian is that of the *summed* loss (``reduction="sum"``), so its damping
    ``hessian_reg`` = n·(λ + δ) makes it n·(H + δI); scores are then I/n in magnitude (correlations
    unaffected). Its loader yields per-sample gradients too: ``pb.grad_batch`` points a batch."""

    def run(pb: Problem) -> np.ndarray:
        import captum.influence._core.arnoldi_influence_function as arn
        import captum.influence._core.influence_function as naive

        cls = {"naive": naive.NaiveInfluenceFunction, "arnoldi": arn.ArnoldiInfluenceFunction}[
            cls_name
        ]
        ckpt = os.path.join(pb.workdir, "captum_ckpt.pt")
        torch.save(pb.model.state_dict(), ckpt)
        kw = dict(kwargs)
        if kw.get("projection_dim") == "p":
            kw["projection_dim"] = sum(p.numel() for p in pb.model.parameters())
        inf = cls(
            pb.model,
            DataLoader(TensorDataset(pb.X, pb.y), batch_size=pb.grad_batch),
            ckpt,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
            sample_wise_grads_per_batch=True,
            hessian_reg=pb.n * pb.reg,
            **kw,
        )
        return _np(inf.influence((pb.Xt, pb.yt)))

    return run


def captum_methods() -> list[Method]:
    lib, req = (
        "captum",
        (
            "captum.influence._core.influence_function",
            "captum.influence._core.arnoldi_influence_function",
        ),
    )
    return [
        Method(
            "captum-naive-50",
            lib,
            "NaiveInfluenceFunction",
            "defaults: projection_dim=50 (dense H, top-50 eigenpairs)",
            -1,
            _captum("naive"),
            req,
            DENSE_MAX_P,
            DENSE + " Hessian and its eigendecomposition",
        ),
        Method(
            "captum-naive-p",
            lib,
            "NaiveInfluenceFunction",
            "projection_dim=p (all eigenpairs: exact)",
            -1,
            _captum("naive", projection_dim="p"),
            req,
            DENSE_MAX_P,
            DENSE + " Hessian and its eigendecomposition",
        ),
        Method(
            "captum-arnoldi",
            lib,
            "ArnoldiInfluenceFunction",
            "defaults: arnoldi_dim=200, projection_dim=50",
            -1,
            _captum("arnoldi"),
            req,
        ),
    ]


# ── kronfluence ──────────────────────────────────────────────────────────────────────────
def _kronfluence(strategy: str) -> Callable[[Problem], np.ndarray]:
    """Kronfluence's Analyzer: the true Fisher (labels sampled from the model, as its examples do),
    covariances averaged over the data, damping λ; measurement = the test loss, so the score is
    ∇L_testᵀ(F + λI)⁻¹∇L_train = −I_up,loss up to the Fisher approximation."""

    def run(pb: Problem) -> np.ndarray:
        import logging

        import torch.nn.functional as F
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        class Classification(Task):
            def compute_train_loss(
                self, batch: Any, model: torch.nn.Module, sample: bool = False
            ) -> torch.Tensor:
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        y = torch.multinomial(torch.softmax(logits, -1), num_samples=1).flatten()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        class HFClassification(Task):
            """W5: dict batches {"input_ids", "attention_mask", "labels"} of a Hugging Face
            classifier."""

            def compute_train_loss(
                self, batch: Any, model: torch.nn.Module, sample: bool = False
            ) -> torch.Tensor:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                y = batch["labels"]
                if sample:
                    with torch.no_grad():
                        y = torch.multinomial(torch.softmax(logits, -1), num_samples=1).flatten()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                return F.cross_entropy(logits, batch["labels"], reduction="sum")

            # padded tokens out of the statistics
            def get_attention_mask(self, batch: Any) -> torch.Tensor:
                return batch["attention_mask"]

        torch.manual_seed(0)
        if isinstance(pb.X, dict):
            task: Task = HFClassification()
            model = prepare_model(pb.model, task)  # its nn.Linear layers sit inside modules already
            train, test = _DictRows(pb.X, pb.y), _DictRows(pb.Xt, pb.yt)
        else:
            task = Classification()
            # prepare_model wraps the supported layers inside their parent: the Linear needs one
            model = prepare_model(torch.nn.Sequential(pb.model), task)
            train, test = TensorDataset(pb.X, pb.y), TensorDataset(pb.Xt, pb.yt)
        an = Analyzer(
            analysis_name="bench",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=os.path.join(pb.workdir, "kronfluence"),
            log_level=logging.WARNING,
        )
        # W4 (p = 11M at full width: grad_batch would be 6 points): the training batch, 64
        batch = pb.peer_batch or pb.grad_batch
        an.fit_all_factors(
            factors_name=strategy,
            dataset=train,
            per_device_batch_size=batch,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        an.compute_pairwise_scores(
            scores_name="s",
            factors_name=strategy,
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=pb.k,
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=pb.reg),
            overwrite_output_dir=True,
        )
        return _np(an.load_pairwise_scores("s")["all_modules"])

    return run


class _DictRows(torch.utils.data.Dataset):
    """Rows of a dict batch as dicts {"input_ids", "attention_mask", "labels"} (collated back by the
    default collate)."""

    def __init__(self, X: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.X.items()}, "labels": self.y[i]}


def kronfluence_methods() -> list[Method]:
    lib, req = "kronfluence", ("kronfluence.analyzer", "kronfluence.arguments", "kronfluence.task")
    return [
        Method(
            "kron-kfac",
            lib,
            "Analyzer, K-FAC",
            "strategy='kfac', damping_factor=λ",
            -1,
            _kronfluence("kfac"),
            req,
            transformer=True,
        ),
        Method(
            "kron-ekfac",
            lib,
            "Analyzer, EK-FAC",
            "strategy='ekfac' (default), damping_factor=λ",
            -1,
            _kronfluence("ekfac"),
            req,
            transformer=True,
        ),
    ]


# ── dattri ───────────────────────────────────────────────────────────────────────────────
def _dattri(cls_name: str, **kwargs: Any) -> Callable[[Problem], np.ndarray]:
    """dattri's AttributionTask with the mean cross-entropy as loss; the full training set as one
    batch for ``cache`` (its docs: "ideally the batch size … the number of training samples"; its
    CG, LiSSA and Explicit transforms sum the per-batch inverse HVPs, which is H⁻¹ only for one
    batch) and for ``attribute`` where the n × p per-sample gradients fit in 2 GiB — then it solves
    the inverse HVP once; otherwise ``attribute`` runs over ``pb.grad_batch``-point batches and
    dattri re-solves the test side for each training batch (its design). Scores (n, K) transposed.
    """

    def run(pb: Problem) -> np.ndarray:
        import dattri.algorithm as alg
        from dattri.task import AttributionTask

        model = torch.nn.Sequential(pb.model)  # EK-FAC selects layers by module name: give it "0"

        def loss(params: Any, data: Any) -> torch.Tensor:
            x, y = data  # dattri's LiSSA collate casts the labels to float: cast back
            return torch.nn.functional.cross_entropy(
                torch.func.functional_call(model, params, x), y.long()
            )

        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        kw = {k: v(pb) if callable(v) else v for k, v in kwargs.items()}
        att = getattr(alg, cls_name)(task=task, device="cpu", **kw)
        full = DataLoader(TensorDataset(pb.X, pb.y), batch_size=pb.n)
        att.cache(full)
        with torch.no_grad():
            train_batch = pb.n if pb.n * pb.p * 4 <= 2**31 else pb.grad_batch
            scores = att.attribute(
                DataLoader(TensorDataset(pb.X, pb.y), batch_size=train_batch),
                DataLoader(TensorDataset(pb.Xt, pb.yt), batch_size=len(pb.Xt)),
            )
        return _np(scores).T

    return run


def dattri_methods() -> list[Method]:
    lib, req = "dattri", ("dattri.algorithm", "dattri.task")

    def lam(pb: Problem) -> float:
        return pb.reg

    return [
        Method(
            "dattri-explicit",
            lib,
            "IFAttributorExplicit",
            "regularization=λ",
            -1,
            _dattri("IFAttributorExplicit", regularization=lam),
            req,
            DENSE_MAX_P,
            DENSE,
        ),
        Method(
            "dattri-cg-10",
            lib,
            "IFAttributorCG",
            "README: max_iter=10, regularization=λ",
            -1,
            _dattri("IFAttributorCG", max_iter=10, regularization=lam),
            req,
        ),
        Method(
            "dattri-cg-100",
            lib,
            "IFAttributorCG",
            "tuned: max_iter=100, regularization=λ",
            -1,
            _dattri("IFAttributorCG", max_iter=100, regularization=lam),
            req,
        ),
        Method(
            "dattri-lissa",
            lib,
            "IFAttributorLiSSA",
            "defaults: batch 1, depth 5000, scaling 50; damping=λ/50 (⇒ H + λI)",
            -1,
            _dattri("IFAttributorLiSSA", damping=lambda pb: pb.reg / 50.0),
            req,
        ),
        Method(
            "dattri-arnoldi",
            lib,
            "IFAttributorArnoldi",
            "defaults: proj_dim=100, max_iter=100; regularization=λ",
            -1,
            _dattri("IFAttributorArnoldi", regularization=lam),
            req,
        ),
        Method(
            "dattri-ekfac",
            lib,
            "IFAttributorEKFAC",
            "damping=λ",
            -1,
            _dattri("IFAttributorEKFAC", damping=lam),
            req,
        ),
    ]


#: Why a peer library has no row on W5 (a Hugging Face BertForSequenceClassification on dict
#: batches) — checked against the installed releases; not forced through wrappers.
NO_TRANSFORMER = {
    "pyDVL": (
        "its influence models call model(x) on one tensor x per batch (functional_call(model,"
        " params, (x,))), so dict batches (input_ids, attention_mask) of an HF model are not"
        " accepted; its EkfacInfluence factors nn.Linear only"
        " (NotImplementedLayerRepresentationException for nn.Embedding/LayerNorm parameters); and"
        " it has no Gauss–Newton curvature (CG/LiSSA/Arnoldi use the Hessian, indefinite here)"
    ),
    "captum": (
        "its influence classes call model(*batch[:-1]) on tuple batches (positional tensors), so a"
        " dict batch's input_ids/attention_mask keywords cannot be passed; its curvature is the"
        " Hessian (no Gauss–Newton option)"
    ),
    "dattri": (
        "its attributors move each batch to the device as `tuple(data.to(device) for data in"
        " batch)`, which fails on a dict batch (no .to on dict); its EK-FAC hooks nn.Linear layers"
        " only"
    ),
}


#: The methods run on W4 (ResNet-18, every parameter, Gauss–Newton curvature): upweight's exact
#: GGN block CG and K-FAC/EK-FAC, kronfluence's K-FAC/EK-FAC; pyDVL's and dattri's EK-FAC run to
#: show what they do with it.
W4_METHODS = (
    "uw-bcg-1e-3",
    "uw-kfac",
    "uw-ekfac",
    "uw-kfac-unchecked",
    "uw-ekfac-unchecked",
    "uw-kfac-sampled",
    "uw-ekfac-sampled",
    "uw-kfac-sampled-unchecked",
    "uw-ekfac-sampled-unchecked",
    "kron-kfac",
    "kron-ekfac",
    "pydvl-ekfac",
    "dattri-ekfac",
)
_NO_GGN = "no Gauss–Newton curvature, which W4's reference and every other row use: "
#: Why a peer library's other methods have no run on W4 (one row per library, naming them) —
#: checked against the installed releases' code.
NO_RESNET = {
    "pyDVL": (
        (
            "pydvl-direct",
            "pydvl-cg-block",
            "pydvl-cg",
            "pydvl-lissa",
            "pydvl-arnoldi-10",
            "pydvl-arnoldi-100",
            "pydvl-nystroem",
            "pydvl-kfac",
        ),
        _NO_GGN + "its SecondOrderMode.HESSIAN is the Hessian of the loss, and its "
        "SecondOrderMode.GAUSS_NEWTON is the empirical Fisher (1/|b|) Σ ∇ℓ∇ℓᵀ of the "
        "observed labels (pydvl.influence.torch.batch_operation."
        "GaussNewtonBatchOperation), not Jᵀ∇²_zL J; its K-FAC is the EkfacInfluence of "
        "the pyDVL EK-FAC row (update_diagonal=False), which refuses Conv2d",
    ),
    "captum": (
        ("captum-naive-50", "captum-naive-p", "captum-arnoldi"),
        _NO_GGN + "its influence classes use the Hessian of the summed loss "
        "(NaiveInfluenceFunction forms it densely, p × p; ArnoldiInfluenceFunction: "
        "Hessian-vector products)",
    ),
    "dattri": (
        ("dattri-explicit", "dattri-cg-10", "dattri-cg-100", "dattri-lissa", "dattri-arnoldi"),
        _NO_GGN
        + "its IF attributors (Explicit, CG, LiSSA, Arnoldi) invert the Hessian of the loss",
    ),
}
#: What each W4 row's curvature covers (a row note): every parameter, or only some layers
W4_COVERS = {
    "upweight": (
        "covers every parameter: Conv2d and Linear Kronecker-factored, each BatchNorm's "
        "scale and shift an exact dense GGN block"
    ),
    "upweight-cg": "covers every parameter: the exact GGN (no blocks)",
    "kronfluence": (
        "covers the Conv2d and Linear layers (its tracked modules); the BatchNorm "
        "scales and shifts are left out of its scores"
    ),
    "pyDVL": "",
    "dattri": (
        "covers nn.Linear layers only (its default module_name): the fc head; every "
        "Conv2d and BatchNorm parameter is left out of its scores"
    ),
}


def all_methods() -> list[Method]:
    out: list[Method] = []
    for family in (
        upweight_methods,
        pydvl_methods,
        captum_methods,
        kronfluence_methods,
        dattri_methods,
    ):
        out += family()
    return out
