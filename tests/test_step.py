"""Tests of sklearn_fgn._step.compute_step against dense float64 solves."""

import functools
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from cases import (
    BASE_CASES,
    CASES,
    Case,
    case_id,
    dense_damping,
    dense_fgn,
    dense_ggn,
    dense_objective_fn,
    dense_step,
    flatten,
    make_problem,
    penalty_mask,
    reference_weights,
    rel_err,
)
from conftest import SEEDS

from sklearn_fgn._curvature import damping_diagonal, fgn_gram, linearize, make_fgn_operator
from sklearn_fgn._heads import Head, forward, init_params
from sklearn_fgn._inner import SolveRecord
from sklearn_fgn._margin import LogitCurvature, MarginStats, margin
from sklearn_fgn._objective import normalized_weights, objective
from sklearn_fgn._preconditioners import (
    class_group_moments,
    make_fgn_preconditioner,
    make_kronecker_preconditioner,
)
from sklearn_fgn._step import compute_step
from sklearn_fgn._system import StepOptions
from sklearn_fgn._tuning import get_tuning, tuning_context

cases = pytest.mark.parametrize("case", CASES, ids=case_id)
# The damping varies with the seed, so each base case is checked at three of them.
DAMPINGS = [1e-2, 1.0, 0.1]
EXACT_CG = dict(cg_tol=1e-12, cg_max_iter=200)


@functools.cache
def _dense(case, damping, curvature="fgn"):
    """Dense pieces at the case's params: problem, objective, theta, gradient, G, Lambda, step.

    Cached per (case, damping, curvature); callers must not modify the tensors.
    """
    problem = make_problem(case)
    head, params, X, y, sample_weight = problem
    weights = reference_weights(sample_weight, X.shape[0], X)
    fn = dense_objective_fn(head, params, X, y, weights, case.alpha)
    theta = flatten(params)
    grad = torch.func.grad(fn)(theta)
    G = (dense_fgn if curvature == "fgn" else dense_ggn)(head, params, X, y, weights)
    lam = dense_damping(params, damping, case.alpha)
    return problem, fn, theta, grad, G, lam, dense_step(G, grad, lam)


def _damping(case):
    return DAMPINGS[case.seed % len(DAMPINGS)]


def _step(problem, case, damping, **kwargs):
    head, params, X, y, sample_weight = problem
    return compute_step(
        head, params, X, y, sample_weight, StepOptions(alpha=case.alpha, damping=damping, **kwargs)
    )


def _new_loss(problem, case, step):
    head, params, X, y, sample_weight = problem
    weights = normalized_weights(sample_weight, X.shape[0], X)
    return objective(head, {k: params[k] + step[k] for k in params}, X, y, weights, case.alpha)


@cases
@pytest.mark.parametrize(
    "curvature, solver", [("fgn", "cg"), ("fgn", "cholesky"), ("ggn", "cg"), ("ggn", "cholesky")]
)
def test_step_and_predicted_decrease_match_dense(case, curvature, solver):
    damping = _damping(case)
    problem, _, _, grad, G, _, expected = _dense(case, damping, curvature)
    result = _step(problem, case, damping, curvature=curvature, solver=solver, **EXACT_CG)
    assert result.step.keys() == problem.params.keys()
    delta = flatten(result.step)
    assert rel_err(delta, expected) <= 1e-8
    assert result.solver == solver
    assert isinstance(result.solve, SolveRecord) and result.solve.reason == "converged"
    if (curvature, solver) == ("fgn", "cholesky"):  # exact FGN inverse as preconditioner (+ refinement)
        assert result.solve.n_iter <= 2
    torch.testing.assert_close(
        result.logits, forward(problem.head, problem.params, problem.X), rtol=0, atol=0
    )
    # Predicted decrease of the undamped quadratic model, at the step taken and at the dense step.
    model = G + case.alpha * torch.diag(penalty_mask(problem.params))
    predicted = -(grad @ delta + 0.5 * delta @ model @ delta)
    torch.testing.assert_close(result.predicted_decrease, predicted, rtol=1e-8, atol=1e-15)
    at_dense_step = -(grad @ expected + 0.5 * expected @ model @ expected)
    torch.testing.assert_close(result.predicted_decrease, at_dense_step, rtol=1e-8, atol=1e-15)
    assert result.predicted_decrease > 0
    # The model along the ray: q(t) = t g'delta + t^2 delta'(G + alpha P)delta / 2.
    torch.testing.assert_close(result.slope, grad @ delta, rtol=1e-8, atol=1e-15)
    torch.testing.assert_close(result.step_curvature, delta @ model @ delta, rtol=1e-8, atol=1e-15)


@cases
@pytest.mark.parametrize("curvature, solver", [("fgn", "cg"), ("fgn", "cholesky"), ("ggn", "cg")])
def test_logits_step_is_the_forward_pass_at_the_trial_point(case, curvature, solver):
    # Linear heads: CG accumulates J delta from its curvature products, and the
    # logits are linear in the parameters, so logits + J delta needs no forward pass.
    problem = make_problem(case)
    result = _step(problem, case, _damping(case), curvature=curvature, solver=solver, cg_tol=1e-3)
    head, params = problem.head, problem.params
    trial = forward(head, {k: params[k] + result.step[k] for k in params}, problem.X)
    if not head.is_linear:
        assert result.logits_step is None
        return
    torch.testing.assert_close(result.logits + result.logits_step, trial, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", BASE_CASES, ids=case_id)
@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
def test_auto_solver_uses_gram_for_small_batches(case, curvature):
    problem = make_problem(case)
    auto = _step(problem, case, 0.1, curvature=curvature, solver="auto", **EXACT_CG)
    cholesky = _step(problem, case, 0.1, curvature=curvature, solver="cholesky", **EXACT_CG)
    assert auto.solver == "cholesky"
    assert all(torch.equal(auto.step[k], cholesky.step[k]) for k in auto.step)


@cases
def test_loss_and_gradient_match_dense_objective(case):
    problem, fn, theta, grad, _, _, _ = _dense(case, 1.0)
    result = _step(problem, case, 1.0, solver="cg", **EXACT_CG)
    assert result.loss.ndim == 0
    torch.testing.assert_close(result.loss, fn(theta), rtol=1e-13, atol=0)
    assert result.gradient.keys() == problem.params.keys()
    torch.testing.assert_close(flatten(result.gradient), grad, rtol=1e-11, atol=1e-14)
    head, params, X, y, sample_weight = problem
    weights = normalized_weights(sample_weight, X.shape[0], X)
    torch.testing.assert_close(weights, reference_weights(sample_weight, X.shape[0], X), rtol=1e-15, atol=0)
    torch.testing.assert_close(
        objective(head, params, X, y, weights, case.alpha), fn(theta), rtol=1e-13, atol=0
    )


@cases
@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
def test_loss_goes_down_along_step(case, curvature):
    problem, fn, theta, grad, _, _, _ = _dense(case, 1.0)
    result = _step(problem, case, 1.0, curvature=curvature, solver="cg", **EXACT_CG)
    delta = flatten(result.step)
    assert grad @ delta < 0  # a descent direction
    new_loss = _new_loss(problem, case, result.step)
    assert new_loss < result.loss
    torch.testing.assert_close(new_loss, fn(theta + delta), rtol=1e-13, atol=0)


@pytest.mark.parametrize("case", BASE_CASES, ids=case_id)
@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_repeated_steps_are_bit_identical(case, solver):
    problem = make_problem(case)
    first = _step(problem, case, 0.1, solver=solver, cg_tol=1e-6)
    second = _step(problem, case, 0.1, solver=solver, cg_tol=1e-6)
    assert all(torch.equal(first.step[k], second.step[k]) for k in first.step)
    assert torch.equal(first.predicted_decrease, second.predicted_decrease)
    assert first.solve.n_iter == second.solve.n_iter


@cases
def test_fgn_preconditioner_is_exact_damped_inverse(case):
    damping = _damping(case) / 10
    problem, _, _, _, G_F, lam_flat, _ = _dense(case, damping)
    head, params, X, y, sample_weight = problem
    weights = normalized_weights(sample_weight, X.shape[0], X)
    lam = damping_diagonal(params, damping, case.alpha)
    op = make_fgn_operator(linearize(head, params, X), y, weights)
    apply = make_fgn_preconditioner(op, fgn_gram(head, params, X, y, weights, lam), lam, params)
    r = torch.randn(lam_flat.shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    expected = torch.linalg.solve(G_F + torch.diag(lam_flat), r)
    assert rel_err(apply(r), expected) <= 1e-9


def test_cholesky_with_logits_function_raises():
    head, params, X, y, _ = make_problem(CASES[0])
    with pytest.raises(ValueError, match="cholesky"):
        compute_step(lambda p, X: forward(head, p, X), params, X, y, None, StepOptions(solver="cholesky"))


def test_auto_solver_uses_cg_past_cholesky_max_rows():
    assert get_tuning().cholesky_max_rows < 10_000
    gen = torch.Generator().manual_seed(0)
    n = get_tuning().cholesky_max_rows + 1
    head = Head(2, 3)
    params = {
        "coef_0": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "intercept_0": torch.zeros(3, dtype=torch.float64),
    }
    X = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    result = compute_step(head, params, X, y, None, StepOptions(solver="auto", cg_tol=1e-8))
    assert result.solver == "cg"


# ------------------------------------------------------------ logits functions


def _module_problem(seed, n_logits):
    """A ``torch.func.functional_call`` of an ``nn.Sequential`` as the logits map."""
    torch.manual_seed(seed)  # nn.Module init; the draws below use a generator
    module = torch.nn.Sequential(
        torch.nn.Linear(4, 5, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(5, n_logits, dtype=torch.float64),
    )
    params = {k: t.detach().clone() for k, t in module.named_parameters()}

    def logits_fn(p, X):
        return torch.func.functional_call(module, p, (X,))

    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, max(n_logits, 2), (7,), generator=gen)
    return logits_fn, params, X, y


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_logits", [1, 3])
@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
def test_logits_function_step_matches_dense(seed, n_logits, curvature):
    logits_fn, params, X, y = _module_problem(seed, n_logits)
    alpha, damping = 0.1, 0.5
    weights = reference_weights(None, X.shape[0], X)
    fn = dense_objective_fn(
        logits_fn, params, X, y, weights, alpha
    )  # penalises ndim >= 2 ("0.weight", "2.weight")
    grad = torch.func.grad(fn)(flatten(params))
    G = (dense_fgn if curvature == "fgn" else dense_ggn)(logits_fn, params, X, y, weights)
    expected = dense_step(G, grad, dense_damping(params, damping, alpha))
    result = compute_step(
        logits_fn,
        params,
        X,
        y,
        None,
        StepOptions(alpha=alpha, damping=damping, curvature=curvature, solver="auto", **EXACT_CG),
    )
    assert result.solver == "cg"
    assert rel_err(flatten(result.step), expected) <= 1e-8
    torch.testing.assert_close(result.loss, fn(flatten(params)), rtol=1e-13, atol=0)
    torch.testing.assert_close(flatten(result.gradient), grad, rtol=1e-11, atol=1e-14)


# ------------------------------------------------------------ numerical hazard

HAZARD_CASE = Case(n_classes=4, n_features=5, n_samples=16, fit_intercept=True, alpha=0.01)


def _hazard_problem(seed, dtype, device="cpu", param_scale=0.01):
    """Linear head on features x 1e4 (float32 values) where some margins are below -200."""
    head, params, X, y, _ = make_problem(replace(HAZARD_CASE, seed=seed))
    X = (1e4 * X).float()
    params = {k: (param_scale * t).float() for k, t in params.items()}
    to = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return head, {k: to(t) for k, t in params.items()}, to(X), y.to(device)


def _hazard_step(head, params, X, y, solver, **kwargs):
    return compute_step(
        head, params, X, y, None, StepOptions(alpha=HAZARD_CASE.alpha, damping=1.0, solver=solver, **kwargs)
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_extreme_features_float32_step_is_finite_and_matches_float64(seed, solver):
    head, params32, X32, y = _hazard_problem(seed, torch.float32)
    head, params64, X64, _ = _hazard_problem(seed, torch.float64)
    m = margin(forward(head, params64, X64), y)
    assert m.min() < -200  # e^{-m/2} overflows float32 for these rows
    assert (m.abs() < 50).any()  # and some rows keep a non-negligible curvature weight
    result32 = _hazard_step(head, params32, X32, y, solver)  # default cg_tol / cg_max_iter
    result64 = _hazard_step(head, params64, X64, y, solver, **EXACT_CG)
    assert all(torch.isfinite(t).all() for t in result32.step.values())
    assert torch.isfinite(result32.loss) and torch.isfinite(result32.predicted_decrease)
    assert all(t.dtype == torch.float32 for t in result32.step.values())
    assert rel_err(flatten(result32.step).double(), flatten(result64.step)) <= 1e-3
    torch.testing.assert_close(result32.loss.double(), result64.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_extreme_features_float64_step_matches_dense(seed, solver):
    head, params, X, y = _hazard_problem(seed, torch.float64)
    weights = reference_weights(None, X.shape[0], X)
    fn = dense_objective_fn(head, params, X, y, weights, HAZARD_CASE.alpha)
    grad = torch.func.grad(fn)(flatten(params))
    lam = dense_damping(params, 1.0, HAZARD_CASE.alpha)
    expected = dense_step(dense_fgn(head, params, X, y, weights), grad, lam)
    assert torch.isfinite(expected).all()
    assert rel_err(flatten(_hazard_step(head, params, X, y, solver, **EXACT_CG).step), expected) <= 1e-8


def test_extreme_features_float32_cholesky_stops_in_few_iterations():
    # _step.py documents that the exact FGN preconditioner converges in one
    # iteration plus at most one refinement. In float32 with cond(G_F + Lambda)
    # ~ 1e7 the parameter-space residual cannot be measured below ~1e-1, so CG
    # used to run on to cg_max_iter with the step already at float32 accuracy;
    # it now stops when the iterate stops moving ("stagnated"). How many refinements
    # float32 round-off asks depends on the BLAS's summation order: at most 3 with
    # MKL's default paths, 4 in one case with its reproducible mode (MKL_CBWR=AUTO).
    reasons = set()
    for seed in range(6):
        for param_scale in (0.01, 0.005, 0.002):
            head, params64, X64, y = _hazard_problem(seed, torch.float64, param_scale=param_scale)
            reference = flatten(_hazard_step(head, params64, X64, y, "cholesky", **EXACT_CG).step)
            head, params, X, y = _hazard_problem(seed, torch.float32, param_scale=param_scale)
            result = _hazard_step(head, params, X, y, "cholesky", cg_tol=1e-4, cg_max_iter=100)
            assert result.solve.reason in ("converged", "stagnated") and result.solve.n_iter <= 4
            assert rel_err(flatten(result.step).double(), reference) <= 2e-6
            reasons.add(result.solve.reason)
    assert reasons == {"converged", "stagnated"}  # both stops are exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_features_step_on_device(device, dtype):
    head, params_cpu, X_cpu, y_cpu = _hazard_problem(0, torch.float64)
    reference = _hazard_step(head, params_cpu, X_cpu, y_cpu, "cholesky", **EXACT_CG)
    head, params, X, y = _hazard_problem(0, dtype, device)
    for solver in ("cholesky", "cg"):
        tol = {} if dtype == torch.float32 else EXACT_CG
        result = _hazard_step(head, params, X, y, solver, **tol)
        assert all(t.device.type == device.type and t.dtype == dtype for t in result.step.values())
        step = flatten({k: t.cpu() for k, t in result.step.items()}).double()
        assert torch.isfinite(step).all()
        assert rel_err(step, flatten(reference.step)) <= (1e-3 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("case", CASES[:: len(CASES) // 5], ids=case_id)
@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_step_on_device_matches_cpu_dense(case, solver, device):
    _, _, _, _, _, _, expected = _dense(case, 1.0)
    head, params, X, y, sample_weight = make_problem(case, device=device)
    result = compute_step(
        head,
        params,
        X,
        y,
        sample_weight,
        StepOptions(alpha=case.alpha, damping=1.0, solver=solver, **EXACT_CG),
    )
    assert all(t.device.type == device.type for t in result.step.values())
    assert rel_err(flatten({k: t.cpu() for k, t in result.step.items()}), expected) <= 1e-8


def test_failed_factorisation_warns_only_when_cholesky_was_asked_for(monkeypatch):
    import sklearn_fgn._preconditioners as step_module

    monkeypatch.setattr(step_module, "make_fgn_preconditioner", lambda *args: None)
    monkeypatch.setattr(step_module, "_gram_pays_off", lambda *args: True)
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.arange(20) % 3
    head = Head(3, 3, (), "relu", True)
    params = init_params(head, torch.Generator().manual_seed(0), torch.float64, "cpu")
    with pytest.warns(RuntimeWarning, match="Cholesky factorisation"):
        explicit = compute_step(head, params, X, y, None, StepOptions(solver="cholesky"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = compute_step(head, params, X, y, None, StepOptions(solver="auto"))
    assert explicit.solver == auto.solver == "cg"
    torch.testing.assert_close(explicit.step, auto.step, rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
def test_kronecker_preconditioner_is_the_exact_inverse_of_its_model(seed, curvature):
    # (I kron S + Lambda)^{-1} with per-column Lambda, against a dense float64 solve.
    g = torch.Generator().manual_seed(seed)
    n, K, d = 40, 4, 6
    logits = torch.randn(n, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    S = LogitCurvature(MarginStats(logits, y), weights, curvature).matrix()
    p = torch.softmax(logits, 1)
    dense_ggn = (weights[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])).sum(0)
    if curvature == "ggn":
        torch.testing.assert_close(S, dense_ggn, rtol=1e-12, atol=1e-14)
    lam = {"coef_0": 0.1 + torch.rand(d, generator=g, dtype=torch.float64), "intercept_0": 0.3}
    like = {"coef_0": torch.zeros(K, d), "intercept_0": torch.zeros(K)}
    apply = make_kronecker_preconditioner(S, lam, like)
    r = torch.randn(K * d + K, generator=g, dtype=torch.float64)
    # coef_0 flattens row-major (class k, feature j) -> k * d + j: the model is S kron I_d + diag(lambda_j)
    model_coef = torch.kron(S, torch.eye(d, dtype=torch.float64)) + torch.diag(lam["coef_0"].repeat(K))
    model_bias = S + 0.3 * torch.eye(K, dtype=torch.float64)
    expected = torch.cat(
        [
            torch.linalg.solve(model_coef, r[: K * d]),
            torch.linalg.solve(model_bias, r[K * d :]),
        ]
    )
    torch.testing.assert_close(apply(r), expected, rtol=1e-10, atol=1e-12)


def _system(seed, curvature="ggn", n=300, K=5, d=6):
    from sklearn_fgn._system import build_system

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    head = Head(d, K)
    # Coefficients that fit most rows: the curvature concentrates on the rest.
    centers = torch.randn(K, d, generator=g, dtype=torch.float64) * 3.0
    X = X + centers[y] * (torch.rand(n, 1, generator=g, dtype=torch.float64) < 0.85)
    params = {"coef_0": centers.clone(), "intercept_0": torch.zeros(K, dtype=torch.float64)}
    sample_weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    alpha = {"coef_0": 1e-3 * (1.0 + torch.rand(d, generator=g, dtype=torch.float64))}
    return build_system(
        head, params, X, y, sample_weight, StepOptions(alpha=alpha, damping=1e-4, curvature=curvature)
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("curvature", ["ggn", "fgn"])
def test_hard_row_preconditioner_is_the_exact_fgn_solve_on_the_hardest_rows(seed, curvature, tune):
    # M = sum over the m rows of largest omega_i tr H_i of omega_i w_i g_i g_i' + Lambda, inverted
    # exactly: against a dense float64 solve, rows picked by their curvature trace.
    import sklearn_fgn._preconditioners as step

    tune(hard_rows_min=8)
    tune(hard_rows_share=0.0)
    system = _system(seed, curvature)
    n, K = system.stats.proba.shape
    d = system.X.shape[1]
    m = step._hard_row_budget(n, K, d)
    assert 8 <= m < n
    p, a = system.stats.proba, system.stats.direction
    p_true = p.gather(1, system.y[:, None])[:, 0]
    fgn_weight = p_true * (1 - p_true)  # w_i = sigma(m_i) sigma(-m_i)
    if curvature == "ggn":
        trace = system.weights * (1 - (p * p).sum(1))
    else:
        trace = system.weights * fgn_weight * (a * a).sum(1)
    hard = torch.argsort(trace, descending=True)[:m]
    assert float(trace[hard].sum()) > 2.0 * m / n * float(trace.sum())  # concentrated, as built
    Xt = torch.cat([system.X, torch.ones(n, 1, dtype=torch.float64)], 1)[hard]
    a = a[hard]
    w = system.weights[hard] * fgn_weight[hard]
    # g_i flattens as (coef row-major, then intercept): a_i kron x_i, then a_i
    rows = torch.cat([(a[:, :, None] * Xt[:, None, :d]).reshape(m, -1), a], 1)
    lam = torch.cat(
        [
            system.damping["coef_0"].expand(K, d).reshape(-1),
            torch.full((K,), system.damping["intercept_0"], dtype=torch.float64),
        ]
    )
    dense = (rows * w[:, None]).T @ rows + torch.diag(lam)
    apply = step.make_hard_row_preconditioner(system)
    r = torch.randn(K * d + K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(apply(r), torch.linalg.solve(dense, r), rtol=1e-9, atol=1e-12)


def test_hard_rows_are_left_to_the_kronecker_model_when_the_curvature_is_spread(tune):
    # Uniform probabilities: every row carries the same curvature, m rows carry m / n of it.
    import sklearn_fgn._preconditioners as step
    from sklearn_fgn._system import build_system

    tune(hard_rows_min=8)
    n, K, d = 400, 4, 5
    head = Head(d, K)
    params = {
        "coef_0": torch.zeros(K, d, dtype=torch.float64),
        "intercept_0": torch.zeros(K, dtype=torch.float64),
    }
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(n) % K
    system = build_system(head, params, X, y, None, StepOptions(alpha=1e-3, damping=1e-4, curvature="ggn"))
    assert step._hard_row_budget(n, K, d) / n < get_tuning().hard_rows_share
    assert step.make_hard_row_preconditioner(system) is None
    tune(hard_rows_share=0.0)
    assert step.make_hard_row_preconditioner(system) is not None


def _class_means_model(system, intercept=True, kept=None):
    """The class-means model of the damped curvature, dense in float64, built from its definition.

    ``kept``: each logit keeps its ``kept`` groups of largest share with their means' outer
    products, and the others' only by their diagonal (every group when None).
    """
    X, y, omega = system.X, system.y, system.weights
    n, d = X.shape
    K = system.stats.logits.shape[1]
    if system.curvature == "ggn" and K > 1:
        p = system.stats.proba
        c = omega[:, None] * p * (1 - p)  # omega_i (diag(p_i) - p_i p_i')_kk
    else:  # FGN (and one logit): omega_i w_i a_i a_i', w_i = sigma(m_i) sigma(-m_i)
        m, a = system.stats.margin, system.stats.direction
        c = (omega * torch.sigmoid(m) * torch.sigmoid(-m))[:, None] * a * a
    Xt = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1) if intercept else X
    groups = range(max(K, 2))
    pi = torch.stack([omega[y == g].sum() for g in groups])
    mu = torch.stack([(omega[y == g, None] * Xt[y == g]).sum(0) / pi[g] for g in groups])
    within = (omega[:, None] * Xt * Xt).sum(0) - (pi[:, None] * mu * mu).sum(0)
    shares = torch.stack([c[y == g].sum(0) for g in groups])  # (G, K)
    lam = torch.zeros(K, Xt.shape[1], dtype=X.dtype)
    lam[:, :d] += system.damping["coef_0"]
    if intercept:
        lam[:, d] += system.damping["intercept_0"]
    blocks = []
    for k in range(K):
        top = torch.zeros(len(groups), dtype=torch.bool)
        top[torch.argsort(shares[:, k], descending=True)[: len(groups) if kept is None else kept]] = True
        rest = (shares[~top, k, None] * mu[~top] ** 2).sum(0)
        outer = (mu[top].T * shares[top, k]) @ mu[top]
        blocks.append(torch.diag(shares[:, k].sum() * within + lam[k] + rest) + outer)
    return blocks, lam


def _flat_layout(K, d, intercept):
    """Map per-class (d~,) vectors to the flat (coef row-major, then intercept) layout: an index per entry."""
    index = torch.arange(K * d).reshape(K, d)
    if intercept:
        index = torch.cat([index, K * d + torch.arange(K)[:, None]], 1)
    return index


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("curvature", ["ggn", "fgn"])
@pytest.mark.parametrize("kept, cap", [(None, None), (5, None), (2, None), (2, 2 * 5 * 7 + 9)])
def test_class_means_preconditioner_is_the_exact_inverse_of_its_model(seed, curvature, kept, cap, tune):
    # Per logit k: c_k diag(Sigma_W) + sum_y C_yk mu_y mu_y' + Lambda_k, blocks between logits dropped,
    # and along the classes' shared direction (which the softmax curvature does not see) Lambda alone:
    # M^-1 = P blockdiag^-1 P + (I - P) Lambda^-1, P removing the mean over classes. Dense float64.
    # Beyond class_means_max_logits each logit keeps its heaviest groups (all 5 of them, or 2) and the
    # others' mu_y mu_y' only on the diagonal; 2 also where 5 are asked but the (K, r, d~) = (5, r, 7)
    # means may hold only 79 entries.
    from sklearn_fgn._preconditioners import make_class_means_preconditioner

    if cap is not None:
        tune(class_means_max_logits=4, class_means_top_groups=5, class_means_max_entries=cap)
    elif kept is not None:
        tune(class_means_max_logits=4, class_means_top_groups=kept)
    system = _system(seed, curvature)
    K, d = system.gradient["coef_0"].shape
    blocks, lam = _class_means_model(system, kept=kept)
    index = _flat_layout(K, d, True)
    N = K * d + K
    dense_inv = torch.zeros(N, N, dtype=torch.float64)
    for k in range(K):
        dense_inv[index[k][:, None], index[k][None, :]] = torch.linalg.inv(blocks[k])
    mean = torch.zeros(N, N, dtype=torch.float64)  # the projection on each entry's mean over classes
    for j in range(d + 1):
        mean[index[:, j][:, None], index[:, j][None, :]] = 1.0 / K
    project = torch.eye(N, dtype=torch.float64) - mean
    shared = mean @ torch.diag(1.0 / lam.flatten()[index.flatten().argsort()])
    expected = project @ dense_inv @ project + shared
    apply = make_class_means_preconditioner(system)
    r = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(apply(r), expected @ r, rtol=1e-9, atol=1e-12)
    assert float(r @ apply(r)) > 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_class_means_preconditioner_without_intercept_and_with_one_logit(seed):
    # No intercept column; a single logit (binary): two groups by label, no shared direction.
    from sklearn_fgn._preconditioners import make_class_means_preconditioner
    from sklearn_fgn._system import build_system

    g = torch.Generator().manual_seed(seed)
    n, d = 200, 5
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    for K, intercept in [(4, False), (1, True), (1, False)]:
        y = torch.randint(0, max(K, 2), (n,), generator=g)
        head = Head(d, K, fit_intercept=intercept)
        params = {"coef_0": torch.randn(K, d, generator=g, dtype=torch.float64)}
        if intercept:
            params["intercept_0"] = torch.zeros(K, dtype=torch.float64)
        system = build_system(
            head, params, X, y, None, StepOptions(alpha=1e-2, damping=1e-3, curvature="ggn")
        )
        blocks, lam = _class_means_model(system, intercept)
        index = _flat_layout(K, d, intercept)
        r = torch.randn(index.numel(), generator=g, dtype=torch.float64)
        R = r[index]
        if K > 1:
            shared = R.mean(0, keepdim=True)
            out = torch.stack([torch.linalg.solve(blocks[k], R[k] - shared[0]) for k in range(K)])
            out = out - out.mean(0, keepdim=True) + shared / lam
        else:
            out = torch.linalg.solve(blocks[0], R[0])[None]
        expected = torch.empty_like(r)
        expected[index.flatten()] = out.flatten()
        apply = make_class_means_preconditioner(system)
        torch.testing.assert_close(apply(r), expected, rtol=1e-9, atol=1e-12)


def _raw_embeddings(n, d, K, seed=0):
    # L2-normalised rows, power-law covariance spectrum, class means in the leading directions.
    rng = np.random.default_rng(seed)
    j = np.arange(1, d + 1)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    centers = rng.standard_normal((K, d)) * j**-1.5 * 3.0
    y = rng.integers(0, K, n)
    X = (centers[y] + rng.standard_normal((n, d)) * j**-1.0) @ basis.T
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def test_class_means_model_cuts_cg_iterations_on_raw_embeddings(monkeypatch):
    # The Kronecker model spreads every row's curvature over every class's features; the
    # class-means model keeps that a class's own fitted rows carry little of its curvature.
    # Also with only each logit's 3 heaviest groups of the 10 (the model beyond
    # class_means_max_logits). The same optimum, measured: 141 against 43 and 53 CG iterations.
    import sklearn_fgn._inner as inner
    from sklearn_fgn import FGNClassifier

    X, y = _raw_embeddings(2000, 32, 10)
    counts, losses = [], []
    original = inner.conjugate_gradient
    settings = [
        {"class_means_max_logits": 0, "class_means_top_groups": 0},  # Kronecker
        {},  # every group
        {"class_means_max_logits": 0, "class_means_top_groups": 3},
    ]
    for setting in settings:
        total = [0]

        def counted(*args, total=total, **kwargs):
            result = original(*args, **kwargs)
            total[0] += result.n_iter
            return result

        monkeypatch.setattr(inner, "conjugate_gradient", counted)
        with tuning_context(**setting):
            est = FGNClassifier(alpha=1 / 3, batch_size=None, tol=1e-6, device="cpu").fit(X, y)
        counts.append(total[0])
        losses.append(est.loss_curve_[-1])
    assert counts[1] <= 0.5 * counts[0]
    assert counts[2] <= 0.5 * counts[0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-8)
    assert losses[2] == pytest.approx(losses[0], rel=1e-8)


@pytest.mark.parametrize("intercept", [True, False])
def test_class_group_moments_are_the_weighted_group_means_and_within_variances(intercept, device):
    # Against a loop over the groups in float64; 20000 rows cross the 8192-row chunks; group 4 is empty.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]).double()
    y = torch.randint(0, 4, (20000,), generator=gen)
    weights = torch.rand(20000, generator=gen, dtype=torch.float64)
    moments = class_group_moments(X.to(device), y.to(device), weights.to(device), 5, intercept)
    means, within = (m.cpu() for m in moments)
    Xt = torch.cat([X, torch.ones(20000, 1, dtype=torch.float64)], 1) if intercept else X
    expected_within = torch.zeros(Xt.shape[1], dtype=torch.float64)
    for g in range(5):
        w, rows = weights[y == g], Xt[y == g]
        mean = (w @ rows) / w.sum() if len(w) else torch.zeros(Xt.shape[1], dtype=torch.float64)
        torch.testing.assert_close(means[g], mean, rtol=1e-12, atol=1e-14)
        expected_within += w @ (rows - mean).square()
    torch.testing.assert_close(within, expected_within, rtol=1e-9, atol=1e-9)


def test_full_batch_fit_computes_the_group_moments_once(monkeypatch):
    import sklearn_fgn._preconditioners as step
    from sklearn_fgn import FGNClassifier

    X, y = _raw_embeddings(600, 12, 5)
    calls = []
    original = step.class_group_moments
    monkeypatch.setattr(step, "class_group_moments", lambda *a, **k: calls.append(1) or original(*a, **k))
    est = FGNClassifier(alpha=1 / 3, batch_size=None, tol=1e-6, device="cpu").fit(X, y)
    assert est.n_iter_ >= 3
    assert len(calls) == 1


def test_full_batch_steps_read_the_margins_their_last_trial_computed(monkeypatch):
    # build_system reuses the MarginStats of the logits take_step accepted: one softmax pass per step.
    import sklearn_fgn._system as system
    from sklearn_fgn import FGNClassifier

    X, y = _raw_embeddings(600, 12, 5)
    built = []

    class Counted(MarginStats):
        def __init__(self, *a):
            built.append(1)
            super().__init__(*a)

    monkeypatch.setattr(system, "MarginStats", Counted)
    est = FGNClassifier(alpha=1 / 3, batch_size=None, tol=1e-6, device="cpu").fit(X, y)
    assert est.n_iter_ >= 3
    assert len(built) == 1  # the first step's, at the initial logits


def test_kept_margin_stats_are_only_those_of_the_same_unchanged_logits():
    from sklearn_fgn._system import _margin_stats, keep_margin_stats

    logits, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(20) % 4
    stats, cache = MarginStats(logits, y), {}
    keep_margin_stats(cache, stats)
    assert _margin_stats(logits, y, cache) is stats
    assert cache == {}  # read once
    for other, labels in [(logits.clone(), y), (logits, y.clone())]:
        keep_margin_stats(cache, stats)
        fresh = _margin_stats(other, labels, cache)
        assert fresh is not stats and torch.equal(fresh.margin, stats.margin)
    keep_margin_stats(cache, stats)
    logits[0, 0] += 1.0  # changed in place since
    fresh = _margin_stats(logits, y, cache)
    assert fresh is not stats and torch.equal(fresh.margin, margin(logits, y))


LINEAR_CASES = [case for case in CASES if case.is_linear]


def _true_residual(case, damping, curvature, result):
    """``-grad - (G + Lambda) delta`` from the dense float64 pieces, and ``||grad||``."""
    _, _, _, grad, G, lam, _ = _dense(case, damping, curvature)
    delta = flatten(result.step)
    return -grad - G @ delta - lam * delta, torch.linalg.vector_norm(grad)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
def test_mixed_precision_step_solves_the_float64_system_to_its_tolerance(case, curvature, monkeypatch):
    # CG's products in float32, the residual it returns measured in float64: the step
    # meets cg_tol on the float64 system, and the residual, J delta and the quadratic
    # model are those of the dense float64 reference.
    import sklearn_fgn._inner as step

    calls = []
    low = step.low_precision_operator
    monkeypatch.setattr(step, "low_precision_operator", lambda system: calls.append(1) or low(system))
    damping = _damping(case)
    problem, _, _, grad, G, _, _ = _dense(case, damping, curvature)
    result = _step(
        problem, case, damping, curvature=curvature, solver="cg", cg_tol=1e-3, mixed_precision=True
    )
    assert calls == [1] and result.solve.reason == "converged"
    residual, grad_norm = _true_residual(case, damping, curvature, result)
    assert torch.linalg.vector_norm(residual) <= 1e-3 * grad_norm
    torch.testing.assert_close(result.solve.residual, residual, rtol=1e-8, atol=1e-14 * float(grad_norm))
    relative = float(torch.linalg.vector_norm(residual) / grad_norm)
    assert result.solve.residual_norm == pytest.approx(relative, rel=1e-6)
    head, params, X = problem.head, problem.params, problem.X
    trial = forward(head, {k: params[k] + result.step[k] for k in params}, X)
    torch.testing.assert_close(result.logits + result.logits_step, trial, rtol=1e-10, atol=1e-12)
    delta = flatten(result.step)
    model = G + case.alpha * torch.diag(penalty_mask(params))
    predicted = -(grad @ delta + 0.5 * delta @ model @ delta)
    torch.testing.assert_close(result.predicted_decrease, predicted, rtol=1e-8, atol=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
def test_mixed_precision_keeps_the_intercepts_shift_at_float64_accuracy(seed, curvature):
    # Softmax logits are shift invariant: G v has zero class sums, so the step's intercept
    # shift is -grad's / damping. Float32 products would add their round-off there, amplified
    # by 1 / damping (a drift of every intercept that no loss sees); they are projected back.
    case = replace(BASE_CASES[0], n_classes=6, n_samples=200, n_features=8, fit_intercept=True, seed=seed)
    assert case.n_logits == 6
    problem, damping = make_problem(case), 1e-7
    kwargs = dict(curvature=curvature, solver="cg", cg_tol=1e-3)
    mixed = _step(problem, case, damping, mixed_precision=True, **kwargs)
    plain = _step(problem, case, damping, **kwargs)
    shift, expected = mixed.step["intercept_0"].sum(), plain.step["intercept_0"].sum()
    scale = float(flatten(plain.step).abs().max())
    assert abs(float(shift - expected)) <= 1e-9 * scale


@pytest.mark.parametrize("case", LINEAR_CASES[:4], ids=case_id)
def test_mixed_precision_finishes_in_float64_below_float32_resolution(case, tune):
    # A tolerance that float32 products cannot reach: CG goes on in float64 from the
    # float32 pass's step and meets it on the float64 system.
    tune(mixed_min_tol=0.0)
    damping = _damping(case)
    problem = _dense(case, damping, "ggn")[0]
    result = _step(problem, case, damping, curvature="ggn", solver="cg", cg_tol=1e-11, cg_max_iter=500,
                   mixed_precision=True)  # fmt: skip
    plain = _step(problem, case, damping, curvature="ggn", solver="cg", cg_tol=1e-11, cg_max_iter=500)
    assert result.solve.reason == "converged" and result.solve.n_iter > plain.solve.n_iter
    residual, grad_norm = _true_residual(case, damping, "ggn", result)
    assert torch.linalg.vector_norm(residual) <= 1.01e-11 * grad_norm
    assert rel_err(flatten(result.step), flatten(plain.step)) <= 1e-9


@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_precision_overflowing_float32_solves_in_float64(seed, monkeypatch):
    # Features beyond float32's range: the float32 products overflow, and the step is
    # the plain float64 solve, bit for bit.
    import sklearn_fgn._inner as step

    head, params, X, y = _hazard_problem(seed, torch.float64, param_scale=1e-36)
    X = X * 1e36
    assert not torch.isfinite(X.float()).all()
    calls = []
    low = step.low_precision_operator
    monkeypatch.setattr(step, "low_precision_operator", lambda system: calls.append(1) or low(system))
    mixed = _hazard_step(head, params, X, y, "cg", cg_tol=1e-3, mixed_precision=True)
    plain = _hazard_step(head, params, X, y, "cg", cg_tol=1e-3)
    assert calls == [1]
    assert all(torch.isfinite(t).all() for t in mixed.step.values())
    torch.testing.assert_close(flatten(mixed.step), flatten(plain.step), rtol=0, atol=0)
    torch.testing.assert_close(mixed.logits_step, plain.logits_step, rtol=0, atol=0)


@pytest.mark.parametrize("case", LINEAR_CASES[:2], ids=case_id)
def test_mixed_precision_leaves_float32_features_and_tight_tolerances_alone(case, monkeypatch):
    import sklearn_fgn._inner as step

    monkeypatch.setattr(step, "low_precision_operator", lambda system: pytest.fail("float32 products used"))
    damping = _damping(case)
    problem = make_problem(case)
    tight = 0.5 * get_tuning().mixed_min_tol
    _step(problem, case, damping, curvature="ggn", solver="cg", cg_tol=tight, mixed_precision=True)
    precision = torch.get_float32_matmul_precision()
    try:  # float32 matmuls in TF32 / bfloat16: their products would rarely pass the float64 check
        torch.set_float32_matmul_precision("high")
        _step(problem, case, damping, curvature="ggn", solver="cg", cg_tol=1e-2, mixed_precision=True)
    finally:
        torch.set_float32_matmul_precision(precision)
    head, params, X, y, sample_weight = make_problem(case, torch.float32)
    compute_step(
        head,
        params,
        X,
        y,
        sample_weight,
        StepOptions(
            alpha=case.alpha, damping=damping, curvature="ggn", solver="cg", cg_tol=1e-2, mixed_precision=True
        ),
    )


@pytest.mark.parametrize("n, K, d", [(16000, 100, 256), (400, 4, 5), (3000, 10, 2000), (50000, 200, 768)])
def test_hard_row_budget_is_the_most_rows_whose_gram_and_factor_cost_the_budget(n, K, d):
    # Gram 2 m^2 (d + 1) plus the Cholesky factor's m^3 / 3 counted twice, against
    # HARD_ROWS_BUILD_CG curvature products of 4 n K (d + 1) flops each.
    import sklearn_fgn._preconditioners as step

    m = step._hard_row_budget(n, K, d)
    work = get_tuning().hard_rows_build_cg * 4.0 * n * K * (d + 1)
    cost = lambda rows: 2.0 * rows**2 * (d + 1) + 2.0 * rows**3 / 3.0  # noqa: E731
    assert 0 < m <= min(get_tuning().hard_rows_max, n)
    assert cost(m) <= work
    assert m == min(get_tuning().hard_rows_max, n) or cost(m + 1) > work
