"""Property-based tests of the input checks: random shapes, dtypes, NaN/inf placements, label
values and batch sizes against ``Data.from_any``, ``Data.batches``, ``Objective`` and
``Objective.check_data``. Every draw either succeeds with the expected shapes and dtypes or
raises the upweight error an explicit oracle predicts (never a raw torch / NumPy exception)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import upweight as uw
from upweight.errors import DtypeError, InputError, NonFiniteError, ShapeError, UpweightError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOATS = [torch.float16, torch.float32, torch.float64]
INTS = [torch.int8, torch.int32, torch.int64, torch.uint8]
NOT_REAL = [torch.bool, torch.complex64]
ALL = FLOATS + INTS + NOT_REAL


def _tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random values of ``dtype``: normal floats, small integers (non-negative for uint8), bools."""
    if dtype == torch.bool:
        return torch.from_numpy(rng.random(shape) < 0.5)
    if dtype.is_complex:
        return torch.from_numpy(rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).to(
            dtype
        )
    if dtype.is_floating_point:
        return torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    low = 0 if dtype == torch.uint8 else -5
    return torch.from_numpy(rng.integers(low, 6, shape)).to(dtype)


def _expect(exc_type, fn):
    """Run ``fn``: with ``exc_type`` None it must succeed; else it must raise exactly that upweight
    error type (any other exception fails the test). Returns the result or the error."""
    try:
        out = fn()
    except UpweightError as err:
        assert exc_type is not None, f"unexpected {type(err).__name__}: {err}"
        assert isinstance(err, exc_type), (
            f"expected {exc_type.__name__}, got {type(err).__name__}: {err}"
        )
        return err
    assert exc_type is None, f"expected {exc_type.__name__}, nothing raised"
    return out


# ── Data.from_any ────────────────────────────────────────────────────────────────────────
@SETTINGS
@given(
    n=st.integers(1, 20),
    feat=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    x_dtype=st.sampled_from(ALL),
    y_dtype=st.sampled_from(ALL),
    y_cols=st.sampled_from([None, 1, 3]),
    dn=st.sampled_from([0, 0, 0, -1, 1]),
    form=st.sampled_from(["torch", "numpy", "dataset"]),
    bad_x=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
    bad_y=st.sampled_from([None, None, float("nan")]),
    seed=st.integers(0, 2**32 - 1),
)
def test_from_any_gives_valid_data_or_the_predicted_upweight_error(
    n, feat, x_dtype, y_dtype, y_cols, dn, form, bad_x, bad_y, seed
):
    rng = np.random.default_rng(seed)
    dn = 0 if form == "dataset" else dn  # a Dataset yields pairs: lengths cannot differ
    X = _tensor(rng, (n, *feat), x_dtype)
    y_shape = (n + dn,) if y_cols is None else (n + dn, y_cols)
    y = _tensor(rng, y_shape, y_dtype)
    x_pos = tuple(int(rng.integers(s)) for s in X.shape)
    if bad_x is not None and x_dtype.is_floating_point:
        X[x_pos] = bad_x
    if bad_y is not None and y_dtype.is_floating_point and y.shape[0] > 0:
        y[(int(rng.integers(y.shape[0])),) + ((0,) if y_cols else ())] = bad_y
    if form == "torch":
        data = (X, y)
    elif form == "numpy":
        data = (X.numpy() if x_dtype != torch.float16 else X.numpy().astype(np.float16), y.numpy())
    else:
        data = torch.utils.data.TensorDataset(X, y)

    if x_dtype in NOT_REAL or y_dtype in NOT_REAL:
        expected = DtypeError
    elif dn != 0:
        expected = ShapeError
    elif not bool(torch.isfinite(X.double()).all()) or not bool(torch.isfinite(y.double()).all()):
        expected = NonFiniteError
    else:
        expected = None
    got = _expect(expected, lambda: uw.Data.from_any(data, what="training data"))
    if expected is NonFiniteError:
        side = "X" if not bool(torch.isfinite(X.double()).all()) else "y"
        assert f"training data {side}" in str(got)
        if side == "X":
            assert f"index {x_pos}" in str(got)
    if expected is None:
        assert tuple(got.X.shape) == (n, *feat) and tuple(got.y.shape) == y_shape
        assert got.X.dtype == x_dtype and got.y.dtype == y_dtype
        assert torch.equal(got.X, X) and torch.equal(got.y, y)
        assert got.ids.tolist() == list(range(n))


@SETTINGS
@given(n=st.integers(1, 20), batch_size=st.integers(-2, 25), seed=st.integers(0, 2**32 - 1))
def test_batches_partition_the_points_in_order(n, batch_size, seed):
    rng = np.random.default_rng(seed)
    data = uw.Data.from_any((_tensor(rng, (n, 2), torch.float64), _tensor(rng, (n,), torch.int64)))
    got = _expect(InputError if batch_size < 1 else None, lambda: list(data.batches(batch_size)))
    if batch_size >= 1:
        assert len(got) == -(-n // batch_size) and all(1 <= len(b) <= batch_size for b in got)
        assert torch.equal(torch.cat([b.X for b in got]), data.X) and torch.equal(
            torch.cat([b.ids for b in got]), data.ids
        )


# ── Objective construction ──────────────────────────────────────────────────────────────
@SETTINGS
@given(
    d=st.integers(1, 5),
    out=st.integers(1, 4),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    which=st.sampled_from([None, "weight", "bias", ["weight", "bias"], "nothing"]),
    l2=st.sampled_from([0.0, 0.1, -1.0, float("nan")]),
)
def test_objective_is_built_in_the_right_dtype_or_refused(d, out, dtype, which, l2):
    model = torch.nn.Linear(d, out).to(dtype).eval()
    expected = InputError if (which == "nothing" or not l2 >= 0) else None
    obj = _expect(expected, lambda: uw.Objective(model, "cross_entropy", l2=l2, params=which))
    assert model.weight.dtype == dtype  # the model keeps its dtype either way
    if expected is None:
        names = (which,) if isinstance(which, str) else ("weight", "bias")
        assert obj.space.names == names
        assert obj.p == sum(dict(model.named_parameters())[k].numel() for k in names)
        assert obj.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)


# ── Objective.check_data: the loss's target rule on all points ───────────────────────────
def _oracle(loss: str, y: np.ndarray, out: int) -> tuple[type | None, int | None]:
    """The expected outcome of the target check, from the rules stated in core.losses: (error
    type or None, index of the first offending point for value errors)."""
    n = y.shape[0]
    floating = y.dtype.kind == "f"
    if loss == "cross_entropy":
        if floating and y.shape == (n, out) and y.shape != (n,):
            bad = ((y < 0) | (y > 1)).reshape(n, -1).any(1)
            return (InputError, int(bad.argmax())) if bad.any() else (None, None)
        if y.shape != (n,):
            return ShapeError, None
        if floating:
            return DtypeError, None
        bad = (y.astype(np.int64) < 0) | (y.astype(np.int64) >= out)
        return (InputError, int(bad.argmax())) if bad.any() else (None, None)
    if loss == "squared":
        return (
            (None, None) if int(np.prod(y.shape[1:], dtype=np.int64)) == out else (ShapeError, None)
        )
    # binary losses
    if out != 1 or not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        return ShapeError, None
    t = y.reshape(-1).astype(np.float64)
    allowed = (0.0, 1.0) if t.min() >= 0 else (-1.0, 1.0)
    bad = (t != allowed[0]) & (t != allowed[1])
    return (InputError, int(bad.argmax())) if bad.any() else (None, None)


LABEL_KINDS = [
    "classes",
    "binary01",
    "binarypm1",
    "fraction",
    "whole_float",
    "probabilities",
    "wide",
]


@SETTINGS
@given(
    n=st.integers(1, 20),
    d=st.integers(1, 4),
    out=st.integers(1, 4),
    loss=st.sampled_from(["cross_entropy", "logistic", "hinge", "smooth_hinge", "squared"]),
    kind=st.sampled_from(LABEL_KINDS),
    int_dtype=st.sampled_from(INTS),
    float_dtype=st.sampled_from(FLOATS),
    corrupt=st.sampled_from([None, None, "high", "negative", "two", "half"]),
    model_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    x_dtype=st.sampled_from(FLOATS + INTS),
    test_side=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_check_data_accepts_exactly_the_targets_the_loss_rule_accepts(
    n, d, out, loss, kind, int_dtype, float_dtype, corrupt, model_dtype, x_dtype, test_side, seed
):
    rng = np.random.default_rng(seed)
    torch.manual_seed(0)
    model = torch.nn.Linear(d, out).to(model_dtype).eval()
    fn = uw.SmoothHinge(0.1) if loss == "smooth_hinge" else loss
    obj = uw.Objective(model, fn)

    if kind == "classes":
        y = rng.integers(0, out, n)
    elif kind == "binary01":
        y = rng.integers(0, 2, n)
    elif kind == "binarypm1":
        y = 2 * rng.integers(0, 2, n) - 1
    elif kind == "fraction":
        y = rng.standard_normal(n)
    elif kind == "whole_float":
        y = rng.integers(0, out, n).astype(np.float64)
    elif kind == "probabilities":
        y = rng.random((n, out))
    else:
        y = rng.standard_normal((n, int(rng.integers(1, 5))))
    if corrupt is not None:
        i = int(rng.integers(n))
        y = y.copy()
        y.reshape(n, -1)[i, 0] = {
            "high": out + 3,
            "negative": -1 - int(rng.integers(3)),
            "two": 2,
            "half": 0.5,
        }[corrupt]
    y_t = torch.from_numpy(np.asarray(y))
    # uint8 wraps negatives: the oracle sees that
    y_t = y_t.to(float_dtype) if y_t.is_floating_point() else y_t.to(int_dtype)
    X = _tensor(rng, (n, d), x_dtype)
    data = uw.Data.from_any((X, y_t))
    what = "test" if test_side else "training"

    if not x_dtype.is_floating_point:
        # integer X for a float model: refused before the targets
        expected, index = DtypeError, None
    else:
        oracle_loss = "binary" if loss in ("logistic", "hinge", "smooth_hinge") else loss
        expected, index = _oracle(
            oracle_loss,
            y_t.to(torch.float64).numpy() if y_t.is_floating_point() else y_t.numpy(),
            out,
        )
    got = _expect(expected, lambda: obj.check_data(data, what=what, measure=test_side))
    if expected is DtypeError and not x_dtype.is_floating_point:
        assert "X.float()" in str(got)
    if index is not None and expected is not None:
        assert f"{what} y[{index}] = " in str(got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_reach_a_float32_objective(dtype):
    """Half-precision X (a halved copy of float32 data) is cast to the objective's dtype, not
    refused."""
    torch.manual_seed(0)
    obj = uw.Objective(torch.nn.Linear(3, 2).to(dtype).eval(), "cross_entropy")
    X = torch.randn(5, 3).to(dtype)
    obj.check_data(uw.Data.from_any((X, torch.tensor([0, 1, 1, 0, 1]))), what="training")
    out = obj.outputs(obj.params, X)
    assert out.dtype == torch.float32
    ref = X.float() @ obj.params["weight"].T + obj.params["bias"]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
