"""The peer benchmark's W3 reference (bench_peers.py beside it) against an explicit float64 Hessian.

The reference is the ground truth every library's W3 scores are correlated with, so its HVPs and its
(preconditioned) CG are checked here against ``torch.autograd.functional.hessian`` and a dense
solve.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent / "bench_peers.py"


@pytest.fixture(scope="module")
def bench_peers():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_peers_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def problem(bench_peers):  # noqa: ANN001, ANN201
    """A trained tanh MLP (8 → 6 → 3, p = 75) on 40 points, float64, with its explicit H + λI."""
    torch.manual_seed(0)
    X = torch.randn(40, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )
    l2 = bench_peers.L2

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y) + l2 / 2 * sum(
            (w**2).sum() for w in model.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    prob = bench_peers.NetProblem(model, X.numpy(), y.numpy(), l2, chunk=16)  # 3 chunks: 16, 16, 8
    names, shapes = prob.names, prob.shapes

    def risk(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            m = int(np.prod(shape))
            params[name] = flat[i : i + m].reshape(shape)
            i += m
        out = torch.func.functional_call(model, params, (X,))
        return torch.nn.functional.cross_entropy(out, y) + l2 / 2 * (flat**2).sum()

    H = torch.autograd.functional.hessian(risk, prob.flat_params())
    return prob, H


def test_reference_hvp_equals_the_explicit_hessian(problem) -> None:  # noqa: ANN001
    prob, H = problem
    V = torch.randn(5, prob.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    delta = 0.3
    want = V @ H + delta * V
    got = prob.hvp(V, delta)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [0, 10])
def test_reference_cg_solves_the_explicit_system(bench_peers, problem, rank: int) -> None:  # noqa: ANN001
    prob, H = problem
    delta = 0.05
    A = H + delta * torch.eye(prob.p, dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(A)[0]) > 0
    B = torch.randn(3, prob.p, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    matvec = lambda V: prob.hvp(V, delta)  # noqa: E731
    precond = (
        bench_peers.nystrom_preconditioner(matvec, prob.p, rank, torch.float64)[0] if rank else None
    )
    X, stats = bench_peers.cg_reference(matvec, B, 1e-11, 1000, 60.0, precond=precond)
    want = torch.linalg.solve(A, B.T).T
    assert stats["stopped"] == "rtol" and stats["residual_max"] < 1e-10
    assert torch.allclose(X, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()))


def test_nystrom_preconditioner_needs_fewer_iterations_on_a_spread_spectrum(
    bench_peers,
) -> None:  # noqa: ANN001
    """On A with a few large eigenvalues and a flat tail, a sketch of that rank makes CG converge in
    a handful of steps; the answer is the same as plain CG's (the preconditioner only changes
    speed).
    """
    g = torch.Generator().manual_seed(3)
    p = 300
    Q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64, generator=g))
    eig = torch.cat(
        [
            torch.logspace(4, 1, 20, dtype=torch.float64),
            torch.linspace(1.0, 2.0, p - 20, dtype=torch.float64),
        ]
    )
    A = (Q * eig) @ Q.T
    B = torch.randn(2, p, dtype=torch.float64, generator=g)
    matvec = lambda V: V @ A  # noqa: E731
    x_plain, plain = bench_peers.cg_reference(matvec, B, 1e-10, 2000, 60.0)
    pre = bench_peers.nystrom_preconditioner(matvec, p, 40, torch.float64)[0]
    x_pre, pcg = bench_peers.cg_reference(matvec, B, 1e-10, 2000, 60.0, precond=pre)
    want = torch.linalg.solve(A, B.T).T
    assert torch.allclose(x_pre, want, rtol=1e-7) and torch.allclose(x_plain, want, rtol=1e-7)
    assert pcg["iterations"] < plain["iterations"] / 2


def test_block_reference_shares_one_krylov_space(bench_peers) -> None:  # noqa: ANN001
    """Twelve right-hand sides in one block converge in far fewer iterations than any of them alone
    (each row alone is plain CG), to the same dense solution; repeated and scaled rows (a rank-
    deficient block) are handled by dropping dependent search directions, not by a breakdown."""
    g = torch.Generator().manual_seed(4)
    p = 400
    Q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64, generator=g))
    eig = torch.logspace(3, 0, p, dtype=torch.float64)  # κ = 1,000, no cluster to exploit
    A = (Q * eig) @ Q.T
    matvec = lambda V: V @ A  # noqa: E731
    B = torch.randn(12, p, dtype=torch.float64, generator=g)
    B = torch.cat([B, B[:3], 2.5 * B[3:4]])  # 16 rows of rank 12
    want = torch.linalg.solve(A, B.T).T
    X, block = bench_peers.cg_reference(matvec, B, 1e-10, 2000, 60.0)
    assert block["stopped"] == "rtol" and block["residual_max"] < 1e-9
    assert torch.allclose(X, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))
    alone = [
        bench_peers.cg_reference(matvec, B[i : i + 1], 1e-10, 2000, 60.0)[1]["iterations"]
        for i in range(3)
    ]
    assert block["iterations"] < min(alone) / 2, (block["iterations"], alone)


def test_w4_resnet18_is_torchvision_resnet18(bench_peers) -> None:  # noqa: ANN001
    """W4's model has ResNet-18's layer shapes: torchvision's resnet18 with 1 input channel and 10
    classes — its 11,689,512 parameters less the 3-channel stem's 9,408 and the 1000-class fc's
    513,000, plus 3,136 and 5,130."""
    model = bench_peers.build_model("resnet")
    p = sum(t.numel() for t in model.parameters())
    assert p == 11_689_512 - 9_408 - 513_000 + 3_136 + 5_130
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    assert shapes["conv1.weight"] == (64, 1, 7, 7) and shapes["fc.weight"] == (10, 512)
    assert shapes["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20
    small = bench_peers.build_model("resnet", width=8)
    assert tuple(small(torch.zeros(3, 784)).shape) == (3, 10) and not small.training
