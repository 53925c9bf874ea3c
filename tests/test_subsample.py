"""Subsampled curvature in full-batch fits of the linear head (issue 33).

The step's curvature is estimated on rows drawn by their share of it
(``_system.sample_curvature_rows``); the gradient, the objective and the step's
model along its own direction stay the whole batch's, so a fit converges to
the same optimum. Checked against dense float64 references and against
scikit-learn.
"""

import warnings

import numpy as np
import pytest
import torch
from cases import dense_fgn, dense_ggn, flatten
from conftest import SEEDS
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from test_step import _system

import sklearn_fgn._stepper as stepper
from sklearn_fgn import FGNClassifier
from sklearn_fgn._objective import unflatten
from sklearn_fgn._step import compute_step
from sklearn_fgn._system import (
    CurvatureSample,
    StepOptions,
    _poisson_threshold,
    curvature_along,
    sample_curvature_rows,
    subsampled_system,
)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", [1, 7, 40, 150])
def test_poisson_threshold_gives_the_expected_sample_size(seed, size):
    g = torch.Generator().manual_seed(seed)
    trace = torch.rand(300, generator=g, dtype=torch.float64) ** 6  # a few large, many small
    trace[:20] = 0.0  # rows without curvature
    tau = _poisson_threshold(trace, size)
    prob = (trace / tau).clamp(max=1.0)
    assert float(prob.sum()) == pytest.approx(size, rel=1e-12)
    # The rows taken surely are the largest ones.
    sure = prob == 1.0
    if bool(sure.any()):
        assert float(trace[sure].min()) >= float(trace[~sure].max())
    assert _poisson_threshold(trace, 280) is None  # no fewer rows with curvature than asked


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("curvature", ["ggn", "fgn"])
def test_subsampled_operator_is_the_dense_curvature_of_its_rows(seed, curvature):
    system = _system(seed, curvature)
    drawn = sample_curvature_rows(system, CurvatureSample(60, torch.Generator().manual_seed(seed)))
    rows, scale = drawn
    sub = subsampled_system(system, rows, scale)
    # G_S = sum_{i in S} scale_i omega_i J_i' H_i J_i, formed densely from its definition.
    head, params = sub.head, system.params
    weights = system.weights[rows] * scale
    dense = dense_ggn if curvature == "ggn" else dense_fgn
    expected = dense(head, params, system.X[rows], system.y[rows], weights)
    v = torch.randn(expected.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    actual = flatten(sub.operator.curvature_matvec(unflatten(v, system.gradient)))
    torch.testing.assert_close(actual, expected @ v, rtol=1e-10, atol=1e-12)
    # Loss, gradient and damping stay the batch's.
    assert sub.loss is system.loss and sub.gradient is system.gradient and sub.damping is system.damping


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_is_unbiased_and_takes_the_hardest_rows(seed):
    system = _system(seed, "ggn", n=400)
    trace = system.logit_curvature().trace() * (system.X.square().sum(1) + 1.0)
    tau = _poisson_threshold(trace, 80)
    prob = (trace / tau).clamp(max=1.0)
    # E[sum_{i in S} G_i / p_i] = G: weights of the drawn rows average to the batch's over many draws.
    counts = torch.zeros(400, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    draws = 2000
    for _ in range(draws):
        rows, scale = sample_curvature_rows(system, CurvatureSample(80, g))
        counts.index_add_(0, rows, scale)
        assert bool((prob[rows] > 0).all())
    mean = counts / draws  # each row's expected weight is 1 (if it has curvature)
    positive = prob > 0
    assert float((mean * trace).sum() / trace.sum()) == pytest.approx(1.0, abs=0.01)
    sure = prob == 1.0
    torch.testing.assert_close(mean[sure], torch.ones_like(mean[sure]), rtol=0, atol=1e-12)
    assert float(mean[~positive].abs().sum()) == 0.0
    sure = (prob == 1.0).nonzero().squeeze(1)
    rows, _ = sample_curvature_rows(system, CurvatureSample(80, g))
    assert set(sure.tolist()) <= set(rows.tolist())


def test_auto_solver_takes_no_gram_cholesky_step_on_a_sample(monkeypatch):
    # A data-parallel fit has no Gram: one process must not take a Gram-Cholesky step on the same
    # sample, or the two fits part (they did with samples of 29 rows and the 3x growth bound).
    import sklearn_fgn._preconditioners as preconditioners

    monkeypatch.setattr(preconditioners, "_gram_pays_off", lambda *a: True)
    system = _system(0, "fgn")
    rows, scale = sample_curvature_rows(system, CurvatureSample(60, torch.Generator().manual_seed(0)))
    sample = subsampled_system(system, rows, scale)
    auto = preconditioners.PreconditionerRequest(solver="auto")
    assert preconditioners.GramCholesky.affordable(system, auto)
    assert not preconditioners.GramCholesky.affordable(sample, auto)
    assert preconditioners.choose_preconditioner(sample, auto)[0] == "cg"
    asked = preconditioners.PreconditionerRequest(solver="cholesky")
    assert preconditioners.GramCholesky.affordable(sample, asked)  # an explicit request is kept


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("curvature", ["ggn", "fgn"])
def test_curvature_along_the_step_is_the_dense_quadratic_form(seed, curvature):
    system = _system(seed, curvature)
    dense = dense_ggn if curvature == "ggn" else dense_fgn
    G = dense(system.head, system.params, system.X, system.y, system.weights)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)
    u = system.lin.jvp(unflatten(v, system.gradient))
    torch.testing.assert_close(curvature_along(system, u), v @ G @ v, rtol=1e-11, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_subsampled_step_keeps_the_gradient_and_the_model_along_the_step_exact(seed):
    system = _system(seed, "ggn", n=400)
    head, params = system.head, system.params
    X, y = system.X, system.y
    sample = CurvatureSample(60, torch.Generator().manual_seed(seed))
    kwargs = dict(alpha=system.coefficients, damping=1e-3, curvature="ggn", solver="cg", cg_tol=1e-10,
                  cg_max_iter=500)  # fmt: skip
    full = compute_step(head, params, X, y, None, StepOptions(**kwargs))
    sub = compute_step(head, params, X, y, None, StepOptions(curvature_sample=sample, **kwargs))
    torch.testing.assert_close(flatten(sub.gradient), flatten(full.gradient), rtol=0, atol=0)
    # The step's image in the logits is J delta on every row, and its model is the whole batch's.
    logits_step = system.lin.jvp(sub.step)
    torch.testing.assert_close(sub.logits_step, logits_step, rtol=1e-10, atol=1e-12)
    G = dense_ggn(head, params, X, y, torch.full((X.shape[0],), 1.0 / X.shape[0], dtype=X.dtype))
    delta = flatten(sub.step)
    coef_penalty = (sub.step["coef_0"].square() * system.coefficients["coef_0"]).sum()
    torch.testing.assert_close(sub.step_curvature, delta @ G @ delta + coef_penalty, rtol=1e-9, atol=0)
    assert sub.sampled_curvature != 1.0 and sub.sampled_curvature > 0.0
    assert float(sub.slope) < 0.0  # a descent direction


def _fit(X, y, alpha, dtype=np.float64, **params):
    params = {"batch_size": None, "tol": 1e-10, "max_iter": 300, "random_state": 0, **params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FGNClassifier(alpha=alpha, **params).fit(X.astype(dtype), y)


def _objective(est, X, y, alpha):
    Z = X @ est.coef_.T.astype(np.float64) + est.intercept_.astype(np.float64)
    if Z.shape[1] == 1:
        Z = np.c_[np.zeros(len(X)), Z]
    Z = Z - Z.max(1, keepdims=True)
    loss = np.log(np.exp(Z).sum(1)) - Z[np.arange(len(y)), y]
    return loss.mean() + 0.5 * alpha / len(y) * (est.coef_.astype(np.float64) ** 2).sum()


@pytest.mark.parametrize(
    "n_classes, C, standardise", [(2, 1.0, True), (5, 1.0, False), (5, 100.0, True), (30, 10.0, False)]
)
def test_subsampled_fit_reaches_the_optimum_of_the_full_fit_and_of_logistic_regression(
    n_classes, C, standardise, monkeypatch
, tune):
    X, y = make_classification(n_samples=6000, n_features=12, n_informative=8, n_classes=n_classes,
                               n_clusters_per_class=1, random_state=n_classes)  # fmt: skip
    if not standardise:
        X = X * np.logspace(-2, 1, 12) + 3.0
    tune(curvature_sample_min_rows=300)  # sample 600 of 6000 rows
    sampled = _fit(X, y, 1.0 / C)
    tune(curvature_sample_share=1.0)
    full = _fit(X, y, 1.0 / C)
    reference = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=500).fit(X, y)
    f_sampled, f_full = _objective(sampled, X, y, 1.0 / C), _objective(full, X, y, 1.0 / C)
    f_ref = _objective(reference, X, y, 1.0 / C)
    assert abs(f_sampled - f_full) <= 1e-8 * f_full
    assert f_sampled <= f_ref * (1 + 1e-8)
    np.testing.assert_allclose(sampled.predict_proba(X), reference.predict_proba(X), rtol=0, atol=1e-4)


def test_subsampled_fit_is_deterministic_under_random_state(monkeypatch, tune):
    X, y = make_classification(n_samples=5000, n_features=10, n_informative=6, n_classes=4, random_state=1)
    tune(curvature_sample_min_rows=200)
    calls = []
    original = stepper._curvature_sample

    def spy(*args):
        out = original(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(stepper, "_curvature_sample", spy)
    first, second = _fit(X, y, 1.0, max_iter=6), _fit(X, y, 1.0, max_iter=6)
    assert any(calls)  # the curvature was sampled
    np.testing.assert_array_equal(first.coef_, second.coef_)
    np.testing.assert_array_equal(first.intercept_, second.intercept_)
