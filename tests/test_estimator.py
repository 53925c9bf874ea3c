"""Contracts of FGNClassifier: objective, one exact step, dtypes, errors, state."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_fgn import FGNClassifier
from sklearn_fgn._tuning import get_tuning

DATASETS = {"iris": load_iris, "wine": load_wine, "digits": load_digits, "breast_cancer": load_breast_cancer}


def _standardized(name):
    X, y = DATASETS[name](return_X_y=True)
    return StandardScaler().fit_transform(X), y


def _quiet_fit(est, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(*args, **kwargs)


def _objective(coef, intercept, X, y, classes, alpha, sample_weight=None):
    """(Weighted sum of cross-entropies + alpha/2 ||coef||^2) / sum(weights) in numpy float64."""
    logits = X @ coef.T + intercept
    idx = np.searchsorted(classes, y)
    if coef.shape[0] == 1:
        sign = 2.0 * idx - 1.0
        loss = np.logaddexp(0.0, -sign * logits[:, 0])
    else:
        loss = logsumexp(logits, axis=1) - logits[np.arange(len(y)), idx]
    w = np.ones(len(y)) if sample_weight is None else sample_weight
    return (np.sum(w * loss) + 0.5 * alpha * np.sum(coef**2)) / np.sum(w)


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("C", [0.1, 1.0, 100.0])
def test_full_batch_reaches_logistic_regression_objective(name, C):
    X, y = _standardized(name)
    alpha = 1.0 / C
    lr = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(X, y)
    fgn = FGNClassifier(alpha=alpha, batch_size=None, device="cpu").fit(X, y)
    f_lr = _objective(lr.coef_, lr.intercept_, X, y, lr.classes_, alpha)
    f_fgn = _objective(fgn.coef_, fgn.intercept_, X, y, fgn.classes_, alpha)
    assert f_fgn <= f_lr * (1 + 1e-6)
    assert fgn.loss_curve_[-1] == pytest.approx(f_fgn, rel=1e-9)


@pytest.mark.parametrize("name", ["wine", "digits"])
@pytest.mark.parametrize("C", [0.5, 100.0])
def test_float32_intercepts_match_logistic_regression(name, C):
    # The softmax's common intercept shift is free, and float32 round-off amplified by
    # 1 / damping moved it by up to 0.66 (wine, C = 100) while the coefficients matched:
    # steps have no component along it.
    X, y = _standardized(name)
    lr = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(X, y)
    fgn = FGNClassifier(alpha=1 / C, batch_size=None, tol=1e-6, device="cpu").fit(X.astype(np.float32), y)
    assert fgn.intercept_.dtype == np.float32
    assert abs(float(fgn.intercept_.astype(np.float64).sum())) <= 1e-5
    scale = np.abs(lr.coef_).max()
    np.testing.assert_allclose(fgn.coef_, lr.coef_, rtol=0, atol=1e-3 * scale)
    np.testing.assert_allclose(fgn.intercept_, lr.intercept_, rtol=0, atol=1e-3 * scale)


@pytest.mark.parametrize("batch_size", [None, 32])
def test_wide_features_take_the_diagonal_metric_from_the_variances_alone(monkeypatch, batch_size, tune):
    # Beyond full_metric_max_features (lowered here to 8) the metric is diagonal: the
    # fit accumulates only the per-feature variances (O(n d), no d x d moment) and
    # whitens by a per-feature scaling; the objective and its optimum are unchanged.
    import sklearn_fgn._metric as metric_module
    import sklearn_fgn._prepare as prepare_module

    X, y = load_wine(return_X_y=True)  # raw: feature scales over three decades, d = 13 > 8
    kw = dict(batch_size=batch_size, max_iter=300, tol=1e-8, random_state=0, device="cpu")
    full = _quiet_fit(FGNClassifier(**kw), X, y)
    tune(full_metric_max_features=8)
    seen = []
    moments = metric_module.feature_moments

    def spy(*args, **kwargs):
        seen.append(moments(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(prepare_module, "feature_moments", spy)
    fgn = _quiet_fit(FGNClassifier(**kw), X, y)
    assert len(seen) == 1 and seen[0].diagonal and seen[0].outer.shape == (13,)
    if batch_size is None:  # the optimum of LogisticRegression(C=1), as the full metric finds it
        lr = LogisticRegression(tol=1e-12, max_iter=100_000).fit(X, y)
        f = {m: _objective(m.coef_, m.intercept_, X, y, m.classes_, 1.0) for m in (lr, full, fgn)}
        assert f[fgn] <= f[lr] * (1 + 1e-9) and f[fgn] == pytest.approx(f[full], rel=1e-12)
        scale = np.abs(full.coef_).max()
        np.testing.assert_allclose(fgn.coef_, full.coef_, rtol=0, atol=1e-6 * scale)
    else:
        assert fgn.score(X, y) > 0.9


@pytest.mark.parametrize("name", ["iris", "wine", "digits"])
def test_float32_full_batch_stops_at_float32_roundoff(name):
    # tol=0 runs to round-off. Raw features at C=1: float32 fits took 28-55
    # steps where float64 took 11-20, the extra ones rejected at predicted
    # decreases that float32 cannot measure.
    X, y = DATASETS[name](return_X_y=True)
    alpha = 1.0
    fits = {
        dtype: FGNClassifier(alpha=alpha, tol=0.0, batch_size=None, device="cpu").fit(X.astype(dtype), y)
        for dtype in (np.float32, np.float64)
    }
    objective = {
        d: _objective(
            fit.coef_.astype(np.float64), fit.intercept_.astype(np.float64), X, y, fit.classes_, alpha
        )
        for d, fit in fits.items()
    }
    assert objective[np.float32] <= objective[np.float64] * (1 + 1e-6)
    assert fits[np.float32].n_iter_ <= fits[np.float64].n_iter_ + 2


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("n_share", [0.5, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_alpha_is_one_over_C_for_every_n(name, n_share, weighted):
    # alpha = 1 / C matches LogisticRegression(C) whatever the number of
    # samples (the grid of GridSearchCV folds), with the same sample weights.
    X, y = _standardized(name)
    n = int(n_share * len(y))
    X, y = X[:n], y[:n]
    sw = np.random.RandomState(0).uniform(0.2, 3.0, n) if weighted else None
    C = 0.5
    lr = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(X, y, sample_weight=sw)
    fgn = FGNClassifier(alpha=1 / C, batch_size=None, tol=1e-10, device="cpu").fit(X, y, sample_weight=sw)
    scale = np.abs(lr.coef_).max()
    np.testing.assert_allclose(fgn.coef_, lr.coef_, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(fgn.intercept_, lr.intercept_, rtol=1e-4, atol=1e-4 * scale)


def test_sample_weight_objective_matches_logistic_regression():
    X, y = _standardized("wine")
    sw = np.random.RandomState(0).uniform(0.2, 3.0, len(y))
    C = 1.0
    alpha = 1.0 / C
    lr = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(X, y, sample_weight=sw)
    fgn = FGNClassifier(alpha=alpha, batch_size=None, device="cpu").fit(X, y, sample_weight=sw)
    f_lr = _objective(lr.coef_, lr.intercept_, X, y, lr.classes_, alpha, sw)
    f_fgn = _objective(fgn.coef_, fgn.intercept_, X, y, fgn.classes_, alpha, sw)
    assert f_fgn <= f_lr * (1 + 1e-6)


def test_convergence_warning_at_max_iter():
    X, y = _standardized("digits")
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        FGNClassifier(batch_size=None, max_iter=1, device="cpu").fit(X, y)


def _dense_feature_metric(X, omega, ridge):
    """The ``I_K kron A_eps`` block (docs/design.md §4) of one class over ``(w_k, b_k)``, dense float64.

    ``A = sum_i omega_i x~ x~^T`` with the ridge on the covariance, relative
    to each feature's variance: ``Sigma + ridge diag(Sigma)``.
    """
    mean = omega @ X
    centred = X - mean
    cov = (centred * omega[:, None]).T @ centred
    cov = cov + ridge * torch.diag(torch.diag(cov))
    top = torch.cat([cov + torch.outer(mean, mean), mean[:, None]], 1)
    return torch.cat([top, torch.cat([mean, torch.ones(1, dtype=X.dtype)])[None, :]], 0)


def _dense_step(X, y_idx, sw, coef, intercept, alpha, damping, curvature, metric_ridge=None):
    """-(G + Lambda)^{-1} grad L for the linear head, from dense float64 torch.func.

    ``metric_ridge``: damp in the feature metric, ``Lambda = damping (I_K kron A_eps) + alpha P``
    (identity metric when None).
    """
    X_t, y_t = torch.tensor(X), torch.tensor(y_idx)
    omega = torch.tensor(sw / sw.sum())
    theta0 = torch.cat([torch.tensor(coef).reshape(-1), torch.tensor(intercept)])
    K, d = coef.shape

    def logits_fn(theta):
        return X_t @ theta[: K * d].reshape(K, d).T + theta[K * d :]

    def data_loss(theta):
        z = logits_fn(theta)
        if K == 1:
            return (omega * torch.nn.functional.softplus(-(2.0 * y_t - 1) * z[:, 0])).sum()
        return (omega * torch.nn.functional.cross_entropy(z, y_t, reduction="none")).sum()

    penalized = torch.cat([torch.ones(K * d), torch.zeros(K)]).double()
    grad = torch.func.grad(data_loss)(theta0) + alpha * penalized * theta0
    J = torch.func.jacrev(logits_fn)(theta0)  # (n, K, P)
    z = logits_fn(theta0)
    if K == 1:
        p = torch.sigmoid(z[:, 0])
        H = (p * (1 - p))[:, None, None]
    elif curvature == "ggn":
        p = torch.softmax(z, 1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        p = torch.softmax(z, 1)
        p_true = p[torch.arange(len(y_t)), y_t]
        q = p.scatter(1, y_t[:, None], 0.0) / (1 - p_true)[:, None]
        a = -q.scatter(1, y_t[:, None], -1.0)
        w = p_true * (1 - p_true)
        H = w[:, None, None] * a[:, :, None] * a[:, None, :]
    G = torch.einsum("n,nkp,nkl,nlq->pq", omega, J, H, J)
    Lam = torch.diag(damping + alpha * penalized)
    if metric_ridge is not None:
        block = _dense_feature_metric(X_t, omega, metric_ridge)  # over (w_k, b_k)
        metric = torch.kron(torch.eye(K, dtype=torch.float64), block)
        # (w_1, b_1, ..., w_K, b_K) -> the layout of theta: (w_1, ..., w_K, b_1, ..., b_K)
        weights = (torch.arange(K)[:, None] * (d + 1) + torch.arange(d)).reshape(-1)
        order = torch.cat([weights, torch.arange(K) * (d + 1) + d])
        Lam = damping * metric[order][:, order] + torch.diag(alpha * penalized)
    return (-torch.linalg.solve(G + Lam, grad)).numpy()


@pytest.mark.parametrize("curvature", ["fgn", "ggn"])
@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("solver", ["cg", "cholesky"])
@pytest.mark.parametrize("metric", ["identity", "features"])
def test_one_constant_step_is_the_exact_damped_step(curvature, n_classes, solver, metric):
    X, y = make_classification(60, 5, n_informative=4, n_redundant=0, n_classes=n_classes, random_state=0)
    scales = np.logspace(-2, 2, 5)  # scales and offsets that the feature metric absorbs
    X = X * scales + 3.0
    sw = np.random.RandomState(1).uniform(0.5, 2.0, len(y))
    K = 1 if n_classes == 2 else n_classes
    rng = np.random.RandomState(2)
    coef0 = rng.normal(size=(K, 5)) / scales
    intercept0 = rng.normal(size=K) - 3.0 * coef0.sum(1)
    alpha, damping = 0.05, 0.3
    est = FGNClassifier(
        damping_metric=metric,
        alpha=alpha,
        damping=damping,
        damping_schedule="constant",
        curvature=curvature,
        solver=solver,
        batch_size=None,
        max_iter=1,
        cg_tol=1e-12,
        cg_max_iter=500,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y, sample_weight=sw, coef_init=coef0, intercept_init=intercept0)
    ridge = get_tuning().metric_ridge if metric == "features" else None
    mean_alpha = alpha / sw.sum()  # alpha on the summed loss is alpha / sum(s) on the mean loss
    expected = _dense_step(X, y, sw, coef0, intercept0, mean_alpha, damping, curvature, ridge)
    if K > 1:  # fitted multiclass intercepts are centred over the classes (the softmax leaves them free)
        expected[-K:] -= (intercept0 + expected[-K:]).mean()
    got = np.concatenate([(est.coef_ - coef0).ravel(), est.intercept_ - intercept0])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11 * np.abs(expected).max())


@pytest.mark.parametrize("n_classes", [2, 4])
def test_fgn_and_ggn_steps_are_their_dense_steps_and_differ_for_multiclass(n_classes):
    # FGN keeps one rank-one term of each example's softmax curvature: the GGN itself
    # for one logit (binary), a step 14 % away from the GGN step here for K = 4.
    X, y = make_classification(60, 5, n_informative=4, n_redundant=0, n_classes=n_classes, random_state=0)
    K = 1 if n_classes == 2 else n_classes
    rng = np.random.RandomState(2)
    coef0, intercept0 = rng.normal(size=(K, 5)), rng.normal(size=K)
    kw = dict(alpha=0.05, damping=0.3, damping_metric="identity", damping_schedule="constant")
    kw |= dict(batch_size=None, max_iter=1, cg_tol=1e-12, cg_max_iter=500, device="cpu")
    steps = {}
    for curvature in ("fgn", "ggn"):
        est = FGNClassifier(curvature=curvature, **kw)
        _quiet_fit(est, X, y, coef_init=coef0, intercept_init=intercept0)
        steps[curvature] = np.concatenate([(est.coef_ - coef0).ravel(), est.intercept_ - intercept0])
        expected = _dense_step(X, y, np.ones(len(y)), coef0, intercept0, 0.05 / len(y), 0.3, curvature)
        if K > 1:  # fitted multiclass intercepts are centred over the classes
            expected[-K:] -= (intercept0 + expected[-K:]).mean()
        np.testing.assert_allclose(steps[curvature], expected, rtol=1e-9, atol=1e-11 * np.abs(expected).max())
    gap = np.linalg.norm(steps["fgn"] - steps["ggn"]) / np.linalg.norm(steps["ggn"])
    assert gap <= 1e-12 if n_classes == 2 else gap >= 0.1


@pytest.mark.parametrize("hidden", [(), (6,)])
def test_float32_in_float32_out_on_cpu_numpy(hidden):
    X, y = _standardized("iris")
    est = FGNClassifier(hidden_layer_sizes=hidden, max_iter=5, device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X.astype(np.float32), y)
    arrays = [est.coef_, est.intercept_] if not hidden else est.coefs_ + est.intercepts_
    for array in arrays:
        assert type(array) is np.ndarray and array.dtype == np.float32
    assert est.predict_proba(X.astype(np.float32)).dtype == np.float32


def test_same_random_state_is_bit_identical():
    X, y = make_classification(3000, 20, n_informative=10, n_classes=5, random_state=0)
    kw = dict(hidden_layer_sizes=(16,), batch_size=256, max_iter=3, random_state=7, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a, b = FGNClassifier(**kw).fit(X, y), FGNClassifier(**kw).fit(X, y)
    for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_, strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert a.loss_curve_ == b.loss_curve_


def test_full_batch_linear_fit_does_one_forward_pass(monkeypatch):
    # The linear head's trial logits are logits + J delta, accumulated by CG;
    # the next linearisation reuses them. Only the first linearisation runs
    # the forward pass.
    import sklearn_fgn._curvature as curvature_module
    import sklearn_fgn._solver as solver_module

    calls = []
    for module, name in ((curvature_module, "linear_logits"), (solver_module, "forward")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    X, y = _standardized("iris")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = FGNClassifier(batch_size=None, tol=0.0, max_iter=6, device="cpu").fit(X, y)
    assert est.n_iter_ == 6
    assert len(calls) == 1


def test_grid_search_parallel_equals_serial():
    X, y = _standardized("iris")
    grid = {"damping": [0.1, 1.0, 10.0]}
    est = FGNClassifier(batch_size=32, max_iter=2, damping_schedule="constant", random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        serial = GridSearchCV(est, grid, cv=3, n_jobs=1).fit(X, y)
        parallel = GridSearchCV(est, grid, cv=3, n_jobs=2).fit(X, y)
    np.testing.assert_allclose(serial.cv_results_["mean_test_score"], parallel.cv_results_["mean_test_score"])
    assert serial.best_params_ == parallel.best_params_


def test_pipeline_grid_search_over_damping():
    X, y = load_digits(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), FGNClassifier(device="cpu", random_state=0))
    search = GridSearchCV(pipe, {"fgnclassifier__damping": [0.1, 1.0]}, cv=2).fit(X, y)
    assert search.best_score_ > 0.9


@pytest.mark.parametrize(
    "params, match",
    [
        ({"damping": 0.0}, "damping"),
        ({"alpha": -1.0}, "alpha"),
        ({"solver": "lbfgs"}, "solver"),
        ({"curvature": "hessian"}, "curvature"),
        ({"hidden_layer_sizes": (0,)}, "hidden_layer_sizes"),
        ({"hidden_layer_sizes": (4, -2)}, "hidden_layer_sizes"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "tpu9"}, "device"),
        ({"device": "meta"}, "device"),
        ({"device": "mps"}, "device"),
        ({"cg_tol": 1.0}, "cg_tol"),
        ({"hidden_layer_sizes": 0}, "hidden_layer_sizes"),
        ({"hidden_layer_sizes": (True,)}, "hidden_layer_sizes"),
    ],
)
def test_bad_parameters_raise_value_error(params, match):
    X, y = _standardized("iris")
    with pytest.raises(ValueError, match=match):
        FGNClassifier(**params).fit(X, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    X, y = _standardized("iris")
    with pytest.raises(ValueError, match="CUDA is not available"):
        FGNClassifier(device="cuda").fit(X, y)


def test_bad_input_raises_value_error():
    X, y = _standardized("iris")
    est = FGNClassifier(device="cpu")
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(X_nan, y)
    X_inf = X.copy()
    X_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        est.fit(X_inf, y)
    sw = np.ones(len(y))
    sw[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(X, y, sample_weight=sw)
    with pytest.raises(ValueError, match="(?i)negative"):
        est.fit(X, y, sample_weight=-np.ones(len(y)))
    with pytest.raises(ValueError, match="non-zero"):
        est.fit(X, y, sample_weight=np.zeros(len(y)))
    with pytest.raises(ValueError, match="2 classes"):
        est.fit(X, np.zeros(len(y)))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        est.fit(X, y[:-1])
    est.fit(X, y)
    with pytest.raises(ValueError, match="features"):
        est.predict(X[:, :2])
    with pytest.raises(ValueError, match="coef_init has shape"):
        FGNClassifier(device="cpu").fit(X, y, coef_init=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="linear head"):
        FGNClassifier(hidden_layer_sizes=(3,), device="cpu").fit(X, y, coef_init=np.zeros((3, 4)))


@pytest.mark.parametrize("scale", [1e4, 1e-6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_feature_scales_give_finite_parameters(scale, dtype):
    X, y = make_classification(400, 10, n_informative=6, n_classes=3, random_state=0)
    est = FGNClassifier(device="cpu", max_iter=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit((X * scale).astype(dtype), y)
    assert np.all(np.isfinite(est.coef_)) and np.all(np.isfinite(est.intercept_))
    assert np.all(np.isfinite(est.predict_proba((X * scale).astype(dtype))))
    if scale > 1:  # nearly unpenalised at this scale: as accurate as the unscaled fit
        unscaled = FGNClassifier(device="cpu").fit(X, y).score(X, y)
        assert est.score((X * scale).astype(dtype), y) >= unscaled - 0.02


def test_binary_layout_matches_logistic_regression():
    X, y = _standardized("breast_cancer")
    C = 1.0
    est = FGNClassifier(alpha=1 / C, batch_size=None, device="cpu").fit(X, y)
    lr = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(X, y)
    assert est.coef_.shape == (1, X.shape[1]) and est.intercept_.shape == (1,)
    assert est.decision_function(X).shape == (len(y),)
    np.testing.assert_allclose(est.predict_proba(X), lr.predict_proba(X), atol=1e-4)
    np.testing.assert_allclose(est.predict_log_proba(X), np.log(est.predict_proba(X)), rtol=1e-6, atol=1e-12)


def test_pickle_round_trip_predicts_identically():
    X, y = _standardized("wine")
    est = FGNClassifier(hidden_layer_sizes=(8,), random_state=0, device="cpu", max_iter=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))


def test_partial_fit_needs_classes_and_lowers_the_loss():
    X, y = _standardized("digits")
    est = FGNClassifier(batch_size=128, device="cpu", random_state=0)
    with pytest.raises(ValueError, match="classes"):
        clone(est).partial_fit(X, y)
    for _ in range(3):
        est.partial_fit(X, y, classes=np.unique(y))
    assert est.n_iter_ == 3 and est.t_ == 3 * len(y)
    assert est.loss_curve_[-1] < est.loss_curve_[0]
    with pytest.raises(ValueError, match="not in classes"):
        est.partial_fit(X, y + 100)


def test_warm_start_resumes_from_previous_solution():
    # As MLPClassifier: a warm refit adds to t_ and loss_curve_; n_iter_ counts its own iterations.
    X, y = _standardized("digits")
    est = FGNClassifier(batch_size=None, warm_start=True, device="cpu").fit(X, y)
    first, curve = est.n_iter_, list(est.loss_curve_)
    est.fit(X, y)
    assert 0 < est.n_iter_ < first
    assert est.loss_curve_[:first] == curve and len(est.loss_curve_) == first + est.n_iter_
    assert est.t_ == (first + est.n_iter_) * len(y)


def test_failed_refit_leaves_the_previous_fit():
    X, y = load_iris(return_X_y=True)
    est = FGNClassifier(device="cpu").fit(X, y)
    before = est.predict_proba(X)
    with pytest.raises(ValueError, match="validation_fraction"):
        est.set_params(early_stopping=True).fit(X[:6], ["a", "b", "c"] * 2)
    np.testing.assert_array_equal(est.classes_, [0, 1, 2])
    np.testing.assert_array_equal(est.predict_proba(X), before)
    with pytest.raises(ValueError):
        est.set_params(early_stopping=False).fit(X[:, :2], np.full(len(y), 1))  # one class
    assert est.n_features_in_ == 4
    np.testing.assert_array_equal(est.predict_proba(X), before)


@pytest.mark.parametrize("refit", [False, True])
def test_interrupted_fit_keeps_a_consistent_model(monkeypatch, refit):
    # As MLPClassifier: Ctrl-C ends the fit with a warning and the last accepted parameters.
    from sklearn_fgn._stepper import Stepper

    X, y = make_classification(600, 8, n_informative=6, n_classes=5, random_state=0)
    est = FGNClassifier(batch_size=32, max_iter=20, random_state=0, device="cpu")
    if refit:
        est.fit(*load_iris(return_X_y=True)[:1], [0, 1, 2] * 50)  # 3 classes, 4 features
    calls, update = [], Stepper.step

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(Stepper, "step", interrupted)
    with pytest.warns(UserWarning, match="Training interrupted by user"):
        est.fit(X, y)
    assert est.coef_.shape == (5, 8) and len(est.classes_) == 5
    assert est.predict_proba(X).shape == (len(y), 5)
    assert est.score(X, y) > 0.4  # 24 accepted steps: far from chance (0.2)


def test_early_stopping_records_validation_scores_and_keeps_best():
    X, y = _standardized("digits")
    est = FGNClassifier(
        hidden_layer_sizes=(32,),
        batch_size=64,
        early_stopping=True,
        max_iter=50,
        random_state=0,
        device="cpu",
    ).fit(X, y)
    assert len(est.validation_scores_) == est.n_iter_ < 50
    assert max(est.validation_scores_) > 0.9


@pytest.mark.parametrize("patience", [None, 1, 2])
def test_early_stopping_stops_n_iter_no_change_epochs_after_the_last_improvement(patience):
    # MLPClassifier's rule, with our default patience of 5 epochs (None).
    X, y = _standardized("digits")
    kw = {} if patience is None else {"n_iter_no_change": patience}
    est = FGNClassifier(batch_size=64, early_stopping=True, max_iter=60, random_state=0, device="cpu", **kw)
    est.fit(X, y)
    scores, best, last_improvement = est.validation_scores_, -np.inf, 0
    for epoch, score in enumerate(scores, start=1):
        if score > best + est.tol:
            last_improvement = epoch
        best = max(best, score)
    assert est.n_iter_no_change == (5 if patience is None else patience)
    assert est.n_iter_ == len(scores) == last_improvement + est.n_iter_no_change < 60
    assert est.best_validation_score_ == max(scores)


def test_early_stopping_auto_is_on_for_mini_batches_only():
    X, y = _standardized("digits")
    kw = dict(max_iter=30, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mini = FGNClassifier(batch_size=128, **kw).fit(X, y)
        full = FGNClassifier(batch_size=None, **kw).fit(X, y)
        off = FGNClassifier(batch_size=128, early_stopping=False, **kw).fit(X, y)
    assert len(mini.validation_scores_) == mini.n_iter_ < 30  # stopped on the held-out score
    assert mini.best_validation_score_ == max(mini.validation_scores_) > 0.9
    assert off.validation_scores_ is None and off.best_validation_score_ is None
    assert full.validation_scores_ is None
    assert full.n_iter_ < 30  # full batch still stops on its own convergence test


def test_early_stopping_auto_is_off_when_a_class_cannot_be_split():
    X, y = _standardized("iris")
    y = y.copy()
    y[0] = 3  # a class with a single sample: no stratified validation split
    est = FGNClassifier(batch_size=16, max_iter=5, device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    assert est.validation_scores_ is None
    # Asked for, early stopping splits at random (as MLPClassifier does for multiclass).
    forced = _quiet_fit(clone(est).set_params(early_stopping=True), X, y)
    assert len(forced.validation_scores_) == forced.n_iter_ >= 1


@pytest.mark.parametrize("n_samples, fraction", [(10, 0.1), (20, 0.99)])
def test_early_stopping_split_too_small_names_validation_fraction(n_samples, fraction):
    X, y = _standardized("iris")
    est = FGNClassifier(early_stopping=True, validation_fraction=fraction, device="cpu")
    with pytest.raises(ValueError, match="validation_fraction"):
        est.fit(X[::15][:n_samples], y[::15][:n_samples])


def test_mlp_head_matches_mlp_classifier_on_digits():
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fgn = FGNClassifier(hidden_layer_sizes=(64,), random_state=0, device="cpu").fit(X_train, y_train)
        mlp = MLPClassifier((64,), random_state=0, max_iter=300).fit(X_train, y_train)
    assert fgn.score(X_test, y_test) >= mlp.score(X_test, y_test) - 0.01


def test_verbose_prints_one_line_per_iteration(capsys):
    X, y = _standardized("iris")
    est = FGNClassifier(batch_size=None, verbose=1, device="cpu").fit(X, y)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Iteration")]
    assert len(lines) == est.n_iter_
    assert "damping" in lines[0] and "CG iterations" in lines[0]


def test_scoring_monitor_sees_every_iteration():
    callback = pytest.importorskip("sklearn.callback")
    X, y = _standardized("digits")
    monitor = callback.ScoringMonitor(scoring="accuracy")
    kw = dict(batch_size=256, max_iter=3, early_stopping=False, device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = FGNClassifier(**kw).set_callbacks(monitor).fit(X, y)
        rows = [row for row in monitor.get_logs().data if row["task_name"].startswith("iteration")]
        assert len(rows) == est.n_iter_ == 3
        for i, row in enumerate(rows):  # the score of the fit as if it had stopped there
            assert row["accuracy"] == pytest.approx(
                FGNClassifier(**{**kw, "max_iter": i + 1}).fit(X, y).score(X, y)
            )


def test_progress_bar_renders_a_fit(capsys):
    # The per-iteration hooks are checked by the ScoringMonitor test above; this
    # checks that sklearn's ProgressBar (it needs rich) accepts FGNClassifier's task tree.
    callback = pytest.importorskip("sklearn.callback")
    pytest.importorskip("rich")
    X, y = _standardized("digits")
    est = FGNClassifier(batch_size=None, device="cpu").set_callbacks(callback.ProgressBar())
    est.fit(X, y)
    out = capsys.readouterr()
    assert "FGNClassifier - fit" in out.out + out.err


def test_batch_size_auto_takes_mini_batches_for_mlp_heads_past_the_sample_limit():

    n = get_tuning().auto_mlp_full_batch_max_samples
    X, y = make_classification(n + 1, n_features=6, n_informative=4, n_classes=3, random_state=0)
    kw = dict(max_iter=1, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = FGNClassifier(hidden_layer_sizes=(4,), **kw).fit(X, y)
        mlp_small = FGNClassifier(hidden_layer_sizes=(4,), **kw).fit(X[:n], y[:n])
        linear = FGNClassifier(**kw).fit(X, y)
    # Mini-batches: early_stopping="auto" holds out a validation split and
    # each epoch visits every training sample once.
    assert len(mlp.validation_scores_) == 1
    assert mlp.t_ == n + 1 - int(np.ceil(0.1 * (n + 1)))
    assert mlp_small.validation_scores_ is None and mlp_small.t_ == n  # full batch
    assert linear.validation_scores_ is None and linear.t_ == n + 1  # full batch


@pytest.mark.parametrize("batch_size", [1, 16])
def test_mini_batch_fits_follow_the_sample_weights(batch_size):
    # Weights were normalised per batch: with one row per batch they dropped
    # out altogether (the same coef_ as the unweighted fit).
    X, y = _standardized("wine")
    sw = np.random.RandomState(0).exponential(size=len(y)) ** 2
    alpha = 1e-3 * len(y)
    fits = {
        name: _quiet_fit(
            FGNClassifier(
                alpha=alpha,
                batch_size=batch_size,
                # In the feature metric the constant-step noise of one-row
                # batches swamps the effect of the weights after 3 epochs.
                damping_metric="identity",
                max_iter=3,
                early_stopping=False,
                random_state=0,
                device="cpu",
            ),
            X,
            y,
            sample_weight=weights,
        )  # fmt: skip
        for name, weights in (("weighted", sw), ("unweighted", None))
    }
    # Each fit does better on its own objective than the other fit does.
    weighted, unweighted = (
        {name: _objective(f.coef_, f.intercept_, X, y, f.classes_, alpha, w) for name, f in fits.items()}
        for w in (sw, None)
    )
    assert weighted["weighted"] < weighted["unweighted"]
    assert unweighted["unweighted"] < unweighted["weighted"]


def test_mini_batch_weights_are_measured_against_the_data_mean():
    # Each batch divides its weights by (batch size x mean weight of the
    # data), so over an epoch the weights of all batches sum to one.
    from sklearn_fgn._batches import iter_batches

    sw = torch.tensor(np.random.RandomState(0).uniform(0, 5, 100))
    X, y = torch.zeros(100, 2), torch.zeros(100, dtype=torch.long)
    batches = list(iter_batches(X, y, sw, 16, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert [b.weight_total for b in batches] == pytest.approx(
        [b.y.shape[0] * float(sw.mean()) for b in batches]
    )
    total = sum(b.y.shape[0] / 100 * float((b.sample_weight / b.weight_total).sum()) for b in batches)
    assert total == pytest.approx(1.0, rel=1e-12)


def test_batches_with_zero_weight_give_finite_losses():
    X, y = _standardized("iris")
    sw = np.zeros(len(y))
    sw[::50] = 1.0
    est = _quiet_fit(FGNClassifier(batch_size=16, early_stopping=False, max_iter=3, device="cpu"),
                     X, y, sample_weight=sw)  # fmt: skip
    assert np.all(np.isfinite(est.loss_curve_)) and np.isfinite(est.best_loss_)
    with pytest.raises(ValueError, match="sums to zero"):
        FGNClassifier(class_weight={0: 0.0, 1: 0.0, 2: 0.0}, device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="class_weight must be non-negative"):
        FGNClassifier(class_weight={0: -1.0}, device="cpu").fit(X, y)


def test_early_stopping_scores_the_validation_split_with_the_weights():
    # Unweighted validation accuracy kept an early iterate and undid
    # class_weight: 54 % of the test set went to the heavy class, where
    # LogisticRegression sends all of it.
    from sklearn.datasets import make_blobs

    X, y = make_blobs(centers=2, random_state=0, cluster_std=20)
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.5, random_state=0)
    class_weight = {0: 1000, 1: 1e-4}
    lr = LogisticRegression(class_weight=class_weight).fit(X_train, y_train)
    fgn = _quiet_fit(FGNClassifier(class_weight=class_weight, early_stopping=True, random_state=0,
                                   device="cpu"), X_train, y_train)  # fmt: skip
    assert np.mean(fgn.predict(X_test) == 0) >= np.mean(lr.predict(X_test) == 0) - 0.02


@pytest.mark.parametrize("scale, dtype", [(1e10, np.float32), (1e150, np.float64)])
def test_features_beyond_the_dtype_range_raise(scale, dtype):
    # The overflowing curvature product once gave a zero step, taken for
    # convergence: an all-zero model after one "step", no warning.
    X, y = load_iris(return_X_y=True)
    with pytest.raises(ValueError, match="overflowed.*scale the features"):
        FGNClassifier(device="cpu", damping_metric="identity").fit((X * scale).astype(dtype), y)


@pytest.mark.parametrize("scale, dtype", [(1e10, np.float32), (1e150, np.float64)])
def test_feature_metric_fits_features_beyond_the_identity_metrics_range(scale, dtype):
    # The whitened features are the same whatever the units: the fit is that of
    # X, with the penalty (the one term that sees the units) scaled to match.
    X, y = load_iris(return_X_y=True)
    ref = FGNClassifier(device="cpu").fit(X.astype(dtype), y)
    big = FGNClassifier(alpha=scale**2, device="cpu").fit((X * scale).astype(dtype), y)
    np.testing.assert_array_equal(big.predict((X * scale).astype(dtype)), ref.predict(X.astype(dtype)))
    np.testing.assert_allclose(big.coef_ * scale, ref.coef_, rtol=1e-3, atol=1e-3 * np.abs(ref.coef_).max())


def test_features_whose_second_moment_overflows_raise():
    X, y = load_iris(return_X_y=True)
    with pytest.raises(ValueError, match="second moment of the features overflowed.*scale the features"):
        FGNClassifier(device="cpu").fit(X * 1e200, y)


def test_huge_binary_features_fit():
    # The CG-iteration estimate divided by log((s + 1) / (s - 1)), which
    # rounds to log(1) = 0 for a condition number past 1e32.
    X, y = load_breast_cancer(return_X_y=True)
    X = X * 1e15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (ConvergenceWarning, RuntimeWarning))
        fgn = FGNClassifier(device="cpu").fit(X, y)
    assert fgn.score(X, y) >= 0.94  # LogisticRegression(): 0.943


def test_int_hidden_layer_sizes_is_one_layer():
    X, y = _standardized("iris")
    as_int = FGNClassifier(hidden_layer_sizes=8, random_state=0, device="cpu").fit(X, y)
    as_tuple = FGNClassifier(hidden_layer_sizes=(8,), random_state=0, device="cpu").fit(X, y)
    assert [w.shape for w in as_int.coefs_] == [(4, 8), (8, 3)]
    np.testing.assert_array_equal(as_int.coefs_[0], as_tuple.coefs_[0])


def test_refit_with_another_head_drops_the_old_attributes():
    X, y = _standardized("iris")
    est = FGNClassifier(random_state=0, device="cpu", warm_start=True).fit(X, y)
    assert est.damping_ < 1.0
    est.set_params(hidden_layer_sizes=(8,)).fit(X, y)
    assert not hasattr(est, "coef_") and not hasattr(est, "intercept_") and len(est.coefs_) == 2
    # Nothing to resume: the damping starts again from ``damping``, as a fresh fit does.
    assert est.loss_curve_[0] == pytest.approx(
        clone(est).set_params(warm_start=False).fit(X, y).loss_curve_[0]
    )
    est.set_params(hidden_layer_sizes=()).fit(X, y)
    assert not hasattr(est, "coefs_") and est.coef_.shape == (3, 4)


@pytest.mark.parametrize(
    "params, classes, match",
    [
        ({"early_stopping": True}, [0, 1, 2], "early_stopping"),
        ({"class_weight": "balanced"}, [0, 1, 2], "balanced"),
        ({}, [[0, 1, 2]], "1-D"),
        ({}, [0.0, 1.0, np.nan], "NaN"),
    ],
)
def test_partial_fit_rejects_what_it_cannot_honour(params, classes, match):
    X, y = _standardized("iris")
    with pytest.raises(ValueError, match=match):
        FGNClassifier(device="cpu", **params).partial_fit(X, y, classes=classes)


def test_torch_threads_follow_threadpool_limits(monkeypatch):
    # scikit-learn's parallel workers limit OpenMP/BLAS threads; the fit's
    # torch threads follow (the library list is cached, the counts are not).
    from threadpoolctl import threadpool_limits

    import sklearn_fgn._estimator as estimator_module

    seen = []
    run_epochs = estimator_module.run_epochs

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return run_epochs(*args, **kwargs)

    monkeypatch.setattr(estimator_module, "run_epochs", spy)
    X, y = _standardized("iris")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2):  # whatever limit the session (conftest) or OMP_NUM_THREADS set
            FGNClassifier(device="cpu").fit(X, y)
            with threadpool_limits(limits=1):
                FGNClassifier(device="cpu").fit(X, y)
            FGNClassifier(device="cpu").fit(X, y)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    assert seen == [2, 1, 2] and after == 2


def test_a_huge_damping_does_not_pass_for_convergence():
    # damping=1e16 stopped after one step at the initial model and reported convergence.
    X, y = _standardized("digits")
    ref = FGNClassifier(device="cpu").fit(X, y)
    huge = FGNClassifier(damping=1e16, device="cpu").fit(X, y)
    assert huge.n_iter_ > 2
    # Both stop at Newton's rule for tol=1e-4, a few 1e-8 (relative) from the optimum; the
    # initial model is 36x above it.
    assert huge.loss_curve_[-1] == pytest.approx(ref.loss_curve_[-1], rel=1e-6)


def test_overflow_from_a_tiny_damping_names_the_damping():
    X, y = _standardized("digits")
    with pytest.raises(ValueError, match="damping=1e-200 too small.*raise damping"):
        FGNClassifier(damping=1e-200, device="cpu").fit(X, y)


def test_an_mlp_fit_that_learns_nothing_warns():
    # All hidden units dead: uniform outputs at the loss of the class frequencies.
    X, y = load_iris(return_X_y=True)
    est = FGNClassifier(hidden_layer_sizes=(4,), alpha=1e6, max_iter=5, device="cpu", random_state=0)
    with pytest.warns(ConvergenceWarning, match="no better than predicting the class frequencies"):
        est.fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        FGNClassifier(hidden_layer_sizes=(8,), device="cpu", random_state=0, max_iter=500).fit(
            StandardScaler().fit_transform(X), y
        )


def test_auto_early_stopping_holds_out_a_few_thousand_rows_at_most():
    # A tenth of a large data set costs accuracy; a few thousand rows rank epochs as well.
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30000, 4)), rng.integers(0, 3, 30000)
    auto = _quiet_fit(FGNClassifier(batch_size=512, max_iter=1, random_state=0, device="cpu"), X, y)
    explicit = _quiet_fit(
        FGNClassifier(batch_size=512, max_iter=1, early_stopping=True, random_state=0, device="cpu"), X, y
    )
    assert auto.t_ == 30000 - 2048
    assert explicit.t_ == 30000 - 3000  # validation_fraction as MLPClassifier's


@pytest.mark.parametrize("name", ["iris", "wine"])
def test_relu_heads_on_raw_features_do_not_start_dead(name):
    # Glorot weights on raw features (wine's proline is ~1000) killed every ReLU
    # unit on some seeds: uniform outputs at chance. The first layer is now drawn
    # for standardised inputs.
    X, y = DATASETS[name](return_X_y=True)
    scores = [
        _quiet_fit(FGNClassifier(hidden_layer_sizes=(8,), random_state=seed, device="cpu"), X, y).score(X, y)
        for seed in range(6)
    ]
    assert min(scores) > 0.9, scores
