"""Tests of sklearn_fgn._curvature against dense float64 references (torch.func)."""

import math

import pytest
import torch
from cases import (
    CASES,
    LINEAR_CASES,
    case_id,
    dense_damping,
    dense_data_loss_fn,
    dense_fgn,
    dense_fgn_rows,
    dense_ggn,
    dense_hessian,
    dense_logits_jacobian,
    dense_operator,
    dense_within_competitor,
    flatten,
    make_problem,
    random_params_like,
    reference_weights,
)

from sklearn_fgn._curvature import (
    damping_diagonal,
    fgn_gram,
    fgn_row_scale,
    linear_logits,
    linearize,
    logits_function,
    make_fgn_operator,
    make_ggn_operator,
    penalized_names,
    row_blocked_affine,
)
from sklearn_fgn._heads import Head, forward, init_params
from sklearn_fgn._margin import curvature_weight, margin

TOL = dict(rtol=1e-10, atol=1e-12)
cases = pytest.mark.parametrize("case", CASES, ids=case_id)


def _setup(case):
    head, params, X, y, sample_weight = make_problem(case)
    weights = reference_weights(sample_weight, X.shape[0], X)
    return head, params, X, y, weights


def _operator(kind, head, params, X, y, weights):
    make = make_fgn_operator if kind == "fgn" else make_ggn_operator
    return make(linearize(head, params, X), y, weights)


def _dense_curvature(kind, head, params, X, y, weights):
    return (dense_fgn if kind == "fgn" else dense_ggn)(head, params, X, y, weights)


def _assert_symmetric_psd(G):
    scale = float(torch.linalg.matrix_norm(G, 2))
    torch.testing.assert_close(G, G.T, rtol=0, atol=1e-13 * max(scale, 1.0))
    assert torch.linalg.eigvalsh(0.5 * (G + G.T)).min() >= -1e-10 * max(scale, 1.0)


@cases
def test_linearization_matches_dense_jacobian(case):
    head, params, X, _, _ = _setup(case)
    lin = linearize(head, params, X)
    J = dense_logits_jacobian(head, params, X)  # (n, K, P)
    v = random_params_like(params, seed=11)
    torch.testing.assert_close(lin.logits, forward(head, params, X), rtol=0, atol=1e-15)
    torch.testing.assert_close(lin.jvp(v), J @ flatten(v), **TOL)
    cotangent = torch.randn(J.shape[:2], generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    vjp = lin.vjp(cotangent)
    assert vjp.keys() == params.keys()
    torch.testing.assert_close(flatten(vjp), torch.einsum("nk,nkp->p", cotangent, J), **TOL)


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh", "logistic", "gelu"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_mlp_linearization_matches_torch_func(activation, fit_intercept):
    # The closed-form MLP J v / J^T C against torch.func's forward and reverse
    # mode on the same logits function, with some pre-activations exactly 0
    # (zero rows of X and zero biases: relu's kink).
    head = Head(6, 4, (5, 3), activation, fit_intercept)
    params = init_params(head, torch.Generator().manual_seed(3), torch.float64, "cpu")
    X = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    X[:2] = 0.0
    lin = linearize(head, params, X)
    reference = linearize(logits_function(head), params, X)  # a plain function: torch.func
    v = random_params_like(params, seed=5)
    cotangent = torch.randn(9, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(lin.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(lin.jvp(v), reference.jvp(v), rtol=1e-13, atol=1e-14)
    vjp, expected = lin.vjp(cotangent), reference.vjp(cotangent)
    assert vjp.keys() == expected.keys() == params.keys()
    for k in params:
        torch.testing.assert_close(vjp[k], expected[k], rtol=1e-13, atol=1e-14)
    assert torch.equal(lin.jvp(v), lin.jvp(v))  # no state carried between products


@cases
def test_fgn_row_scale_is_sqrt_omega_w(case):
    head, params, X, y, weights = _setup(case)
    logits = forward(head, params, X)
    expected = (weights * curvature_weight(margin(logits, y))).sqrt()
    scale = fgn_row_scale(logits, y, weights)
    torch.testing.assert_close(scale, expected, rtol=1e-13, atol=0)
    if case.weighted:  # a zero sample weight gives a zero row, not NaN
        assert scale[0] == 0.0


@cases
def test_fgn_matvec_and_rmatvec_match_dense_rows(case):
    head, params, X, y, weights = _setup(case)
    op = _operator("fgn", head, params, X, y, weights)
    B = dense_fgn_rows(head, params, X, y, weights)
    assert op.n_rows == X.shape[0]
    v = random_params_like(params, seed=case.seed + 20)
    u = torch.randn(X.shape[0], generator=torch.Generator().manual_seed(case.seed + 30), dtype=torch.float64)
    Bv = op.matvec(v)
    assert Bv.shape == (X.shape[0],)
    torch.testing.assert_close(Bv, B @ flatten(v), **TOL)
    Btu = op.rmatvec(u)
    assert Btu.keys() == params.keys() and all(Btu[k].shape == params[k].shape for k in params)
    torch.testing.assert_close(flatten(Btu), B.T @ u, **TOL)
    torch.testing.assert_close(
        flatten(op.curvature_matvec(v)), dense_fgn(head, params, X, y, weights) @ flatten(v), **TOL
    )


@cases
def test_ggn_curvature_matvec_matches_dense_ggn(case):
    head, params, X, y, weights = _setup(case)
    op = _operator("ggn", head, params, X, y, weights)
    assert op.n_rows == X.shape[0] * case.n_logits
    G = dense_ggn(head, params, X, y, weights)
    for seed in (40, 41):
        v = random_params_like(params, seed=case.seed + seed)
        torch.testing.assert_close(flatten(op.curvature_matvec(v)), G @ flatten(v), **TOL)


@cases
@pytest.mark.parametrize("kind", ["fgn", "ggn"])
def test_matvec_and_rmatvec_are_adjoint(case, kind):
    head, params, X, y, weights = _setup(case)
    op = _operator(kind, head, params, X, y, weights)
    v = random_params_like(params, seed=case.seed + 50)
    Bv = op.matvec(v)
    u = torch.randn(Bv.shape, generator=torch.Generator().manual_seed(case.seed + 60), dtype=torch.float64)
    lhs = (Bv * u).sum()
    rhs = (flatten(v) * flatten(op.rmatvec(u))).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-14)


@cases
@pytest.mark.parametrize("kind", ["fgn", "ggn"])
def test_repeated_matvecs_are_bit_identical(case, kind):
    head, params, X, y, weights = _setup(case)
    op = _operator(kind, head, params, X, y, weights)
    v = random_params_like(params, seed=case.seed + 70)
    assert torch.equal(op.matvec(v), op.matvec(v))
    u = op.matvec(v)
    first, second = op.rmatvec(u), op.rmatvec(u)
    assert all(torch.equal(first[k], second[k]) for k in first)
    again = _operator(kind, head, params, X, y, weights)  # a fresh operator too
    assert torch.equal(again.matvec(v), op.matvec(v))


@cases
@pytest.mark.parametrize("kind", ["fgn", "ggn"])
def test_operator_curvature_is_symmetric_psd(case, kind):
    head, params, X, y, weights = _setup(case)
    op = _operator(kind, head, params, X, y, weights)
    G = dense_operator(op.curvature_matvec, params)
    torch.testing.assert_close(G, _dense_curvature(kind, head, params, X, y, weights), **TOL)
    _assert_symmetric_psd(G)


@cases
def test_ggn_is_fgn_plus_psd_within_competitor_term(case):
    head, params, X, y, weights = _setup(case)
    G_F = dense_operator(_operator("fgn", head, params, X, y, weights).curvature_matvec, params)
    G = dense_operator(_operator("ggn", head, params, X, y, weights).curvature_matvec, params)
    dropped = G - G_F
    scale = max(float(torch.linalg.matrix_norm(G, 2)), 1.0)
    assert torch.linalg.eigvalsh(0.5 * (dropped + dropped.T)).min() >= -1e-10 * scale
    if case.n_logits == 1 or case.n_classes == 2:
        # K = 2 (two logits) and the single logit: FGN is the full GGN.
        torch.testing.assert_close(G_F, G, rtol=0, atol=1e-13 * scale)
    if case.n_logits > 1:
        within = dense_within_competitor(head, params, X, y, weights)
        torch.testing.assert_close(dropped, within, rtol=0, atol=1e-12 * scale)
    if case.n_classes > 2:  # the dropped term is not trivially zero
        assert float(torch.linalg.matrix_norm(dropped, 2)) > 1e-6 * scale


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_linear_head_ggn_is_hessian_of_data_loss(case):
    head, params, X, y, weights = _setup(case)
    hessian = dense_hessian(dense_data_loss_fn(head, params, X, y, weights), flatten(params))
    G = dense_operator(_operator("ggn", head, params, X, y, weights).curvature_matvec, params)
    torch.testing.assert_close(G, hessian, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dense_ggn(head, params, X, y, weights), hessian, rtol=1e-10, atol=1e-13)


@cases
@pytest.mark.parametrize("damping, alpha", [(1.0, 0.0), (0.3, 0.7), (1e-3, 1e-2)])
def test_fgn_gram_matches_dense(case, damping, alpha):
    head, params, X, y, weights = _setup(case)
    lam = damping_diagonal(params, damping, alpha)
    B = dense_fgn_rows(head, params, X, y, weights)
    expected = B @ torch.diag(1.0 / dense_damping(params, damping, alpha)) @ B.T
    gram = fgn_gram(head, params, X, y, weights, lam)
    assert gram.shape == (X.shape[0], X.shape[0])
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
    assert torch.equal(gram, fgn_gram(head, params, X, y, weights, lam))
    assert all(not t.requires_grad for t in params.values())


def test_damping_diagonal():
    params = {"coef_0": torch.zeros(2, 3), "intercept_0": torch.zeros(2), "coef_1": torch.zeros(1, 2)}
    lam = damping_diagonal(params, 0.5, 2.0)
    assert lam == {"coef_0": 2.5, "intercept_0": 0.5, "coef_1": 2.5}
    flat = flatten({k: torch.full_like(t, lam[k]) for k, t in params.items()})
    torch.testing.assert_close(flat, dense_damping(params, 0.5, 2.0).float())
    # An explicit penalised set overrides the coef_* naming rule.
    assert damping_diagonal(params, 0.5, 2.0, penalized={"coef_1"}) == {
        "coef_0": 0.5,
        "intercept_0": 0.5,
        "coef_1": 2.5,
    }


def test_penalized_names_and_logits_function():
    head, params, X, _, _ = make_problem(CASES[-1])
    assert penalized_names(head, params) == {k for k in params if k.startswith("coef_")}
    torch.testing.assert_close(logits_function(head)(params, X), forward(head, params, X), rtol=0, atol=0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    module_params = dict(module.named_parameters())
    # A logits function: every parameter with ndim >= 2; biases and norm scales are not penalised.
    assert penalized_names(lambda p, X: X, module_params) == {"0.weight", "2.weight"}

    def fn(p, X):
        return X

    assert logits_function(fn) is fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_intercept", [True, False])
def test_row_blocked_affine_is_the_product_by_blocks(dtype, with_intercept, monkeypatch):
    # Small blocks (64 rows of 7 logits), so that 1000 rows take 16 blocks and a remainder.
    monkeypatch.setattr("sklearn_fgn._curvature.GEMM_BLOCK_ENTRIES", 64 * 7)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 13, generator=gen, dtype=torch.float64)
    coef = torch.randn(7, 13, generator=gen, dtype=torch.float64)
    intercept = torch.randn(7, generator=gen, dtype=torch.float64) if with_intercept else None
    expected = X @ coef.T + (0.0 if intercept is None else intercept)  # float64 reference
    got = row_blocked_affine(X.to(dtype), coef.to(dtype), None if intercept is None else intercept.to(dtype))
    assert got.dtype == dtype and got.shape == (1000, 7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_row_blocked_affine_stays_differentiable(monkeypatch):
    # out= writes are not differentiable: with a graph to build, one fused product is taken.
    monkeypatch.setattr("sklearn_fgn._curvature.GEMM_BLOCK_ENTRIES", 64)
    X = torch.randn(500, 4, dtype=torch.float64)
    coef = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    row_blocked_affine(X, coef).sum().backward()
    torch.testing.assert_close(coef.grad, X.sum(0).expand(3, 4))


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_linear_logits_skip_the_product_at_zero_coefficients(fit_intercept, monkeypatch):
    # A fit's start: the logits are the intercept on every row, exactly as X @ 0 + b, with no GEMM.
    head = Head(5, 4, (), "relu", fit_intercept)
    params = init_params(head, torch.Generator().manual_seed(0), torch.float64, "cpu")
    if fit_intercept:
        params["intercept_0"] = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    X = torch.randn(30, 5, dtype=torch.float64)
    monkeypatch.setattr("sklearn_fgn._curvature.row_blocked_affine", None)  # would fail if called
    got = linear_logits(head, params, X)
    assert torch.equal(got, forward(head, params, X))
    got[0, 0] = 7.0  # a tensor of its own, not a view of the intercept
    assert not fit_intercept or params["intercept_0"][0] == 0.5


def test_linear_logits_elsewhere_are_the_forward_pass():
    head = Head(5, 4, (), "relu", True)
    params = {"coef_0": torch.randn(4, 5, dtype=torch.float64), "intercept_0": torch.randn(4).double()}
    X = torch.randn(30, 5, dtype=torch.float64)
    torch.testing.assert_close(linear_logits(head, params, X), forward(head, params, X), **TOL)
    params["coef_0"] = torch.zeros(4, 5, dtype=torch.float64)
    params["coef_0"][1, 2] = math.nan  # must reach the logits, not be skipped as "zero"
    assert torch.isnan(linear_logits(head, params, X)[:, 1]).all()
