"""The feature metric: whitening identities, exact penalty, moments, and invariance of fits."""

import warnings

import numpy as np
import pytest
import torch
from conftest import SEEDS
from sklearn.exceptions import ConvergenceWarning

from sklearn_fgn import FGNClassifier
from sklearn_fgn._metric import (
    FeatureMetric,
    feature_moments,
    feature_standardization,
    make_feature_metric,
    standardized_first_layer,
    unwhitened_params,
    whitened_params,
)


def _features(seed, n=300, d=8, spread=3.0):
    """Correlated features with per-feature scales over ``2 * spread`` decades and offsets."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    return X * torch.logspace(-spread, spread, d, dtype=torch.float64) + 5.0


def _weights(seed, n=300):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64) + 0.1


def _dense_moments(X, w, centered):
    omega = w / w.sum()
    mean = omega @ X if centered else torch.zeros(X.shape[1], dtype=X.dtype)
    centred = X - mean
    return mean, (centred * omega[:, None]).T @ centred


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("centered", [True, False])
def test_metric_whitens_and_diagonalises_the_penalty(seed, centered):
    X, w = _features(seed), _weights(seed)
    ridge = 1e-4
    metric = make_feature_metric(feature_moments(X, w), centered=centered, ridge=ridge)
    mean, cov = _dense_moments(X, w, centered)
    torch.testing.assert_close(metric.mean, mean, rtol=1e-10, atol=1e-10)
    # T^T Sigma_eps T = I with Sigma_eps = Sigma + ridge diag(Sigma), and T^T T = diag(e).
    sigma_eps = cov + ridge * torch.diag(torch.diag(cov))
    T = metric.transform
    torch.testing.assert_close(T.T @ sigma_eps @ T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-8)
    gram = T.T @ T
    torch.testing.assert_close(gram / metric.penalty.max(), torch.diag(metric.penalty) / metric.penalty.max(),
                               rtol=0, atol=1e-12)  # fmt: skip
    torch.testing.assert_close(metric.inverse @ T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(metric.scale, torch.diag(cov).rsqrt(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_diagonal_metric_is_per_feature_standardisation(seed):
    X, w = _features(seed), _weights(seed)
    _, cov = _dense_moments(X, w, True)
    # From the full moments, or from their diagonal alone (O(n d), what wide features get).
    for moments in (feature_moments(X, w), feature_moments(X, w, diagonal=True)):
        metric = make_feature_metric(moments, full=False)
        assert metric.diagonal and metric.transform.shape == metric.inverse.shape == (8,)
        torch.testing.assert_close(metric.transform, torch.diag(cov).rsqrt(), rtol=1e-10, atol=0)
        torch.testing.assert_close(metric.inverse * metric.transform, torch.ones(8, dtype=torch.float64))
        torch.testing.assert_close(metric.penalty, 1.0 / torch.diag(cov), rtol=1e-10, atol=0)
        torch.testing.assert_close(metric.whiten(X), (X - metric.mean) @ torch.diag(metric.transform))
    with pytest.raises(ValueError, match="full second moment"):
        make_feature_metric(feature_moments(X, w, diagonal=True), full=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("spread, rtol", [(1.0, 1e-11), (3.0, 1e-6)])
def test_whitened_parameters_give_the_same_logits_and_penalty(seed, full, spread, rtol):
    # The penalty's relative error grows with the conditioning of T (eps times
    # cond(T)^2 at worst): feature scales over 6 decades cost about 1e-7.
    X, w = _features(seed, spread=spread), _weights(seed)
    metric = make_feature_metric(feature_moments(X, w), full=full)
    g = torch.Generator().manual_seed(seed)
    params = {
        "coef_0": torch.randn(3, 8, generator=g, dtype=torch.float64),
        "intercept_0": torch.randn(3, generator=g, dtype=torch.float64),
        "coef_1": torch.randn(2, 3, generator=g, dtype=torch.float64),
    }
    hat = whitened_params(metric, params)
    logits = X @ params["coef_0"].T + params["intercept_0"]
    torch.testing.assert_close(metric.whiten(X) @ hat["coef_0"].T + hat["intercept_0"], logits,
                               rtol=1e-9, atol=1e-9 * logits.abs().max())  # fmt: skip
    penalty = (params["coef_0"] ** 2).sum()
    torch.testing.assert_close((metric.penalty * hat["coef_0"] ** 2).sum(), penalty, rtol=rtol, atol=0)
    back = unwhitened_params(metric, hat)
    for k in params:
        tol = 1e3 * rtol
        torch.testing.assert_close(back[k], params[k], rtol=tol, atol=tol * params[k].abs().max())
    assert back["coef_1"] is params["coef_1"]


def test_moments_are_independent_of_chunking_and_merge_exactly():
    X, w = _features(0, n=9000), _weights(0, n=9000)  # three chunks of 4096 rows
    whole = feature_moments(X, w)
    parts = feature_moments(X[:2500], w[:2500]).merged(feature_moments(X[2500:], w[2500:]))
    mean, cov = _dense_moments(X, w, True)
    for m in (whole, parts):
        got_mean, got_cov = m.covariance(centered=True)
        torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_cov, cov, rtol=1e-9, atol=1e-9 * cov.abs().max())
    assert parts.weight == pytest.approx(float(w.sum()), rel=1e-12)
    # The diagonal moments (wide features): the same variances, merged as exactly.
    diag = feature_moments(X, w, diagonal=True)
    diag_parts = feature_moments(X[:2500], w[:2500], diagonal=True).merged(
        feature_moments(X[2500:], w[2500:], diagonal=True)
    )
    for m in (diag, diag_parts):
        got_mean, got_var = m.covariance(centered=True)
        assert m.diagonal and got_var.shape == (X.shape[1],)
        torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_var, torch.diag(cov), rtol=1e-9, atol=0)
        second = torch.diag(cov) + mean * mean  # about 0, for a layer without intercept
        torch.testing.assert_close(m.covariance(centered=False)[1], second, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="full and diagonal"):
        whole.merged(diag)


@pytest.mark.parametrize("seed", SEEDS)
def test_float32_moments_are_float32_products_summed_in_float64(seed):
    # Float32 features: each chunk's outer product in float32, summed in float64. Against the
    # float64 moments of the same (float32) values: within float32's rounding of the chunk sums.
    X = _features(seed, n=9000, spread=0.0).to(torch.float32)  # three chunks
    w = _weights(seed, n=9000)
    exact = feature_moments(X.double(), w)
    low = feature_moments(X, w)
    assert low.outer.dtype == torch.float64 and not torch.equal(low.outer, exact.outer)
    cov, cov_exact = low.covariance(True)[1], exact.covariance(True)[1]
    scale = float(torch.diagonal(cov_exact).max())
    torch.testing.assert_close(cov, cov_exact, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(low.total, exact.total, rtol=1e-12, atol=0)  # first moments stay float64
    previous = torch.get_float32_matmul_precision()
    try:  # TF32 or bfloat16 matmuls allowed: float64 products
        torch.set_float32_matmul_precision("high")
        torch.testing.assert_close(feature_moments(X, w).outer, exact.outer, rtol=0, atol=0)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_standardisation_matches_the_moments():
    X, w = _features(1, n=5000), _weights(1, n=5000)
    mean, scale = feature_standardization(X, w)
    ref_mean, cov = _dense_moments(X, w, True)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scale, torch.diag(cov).rsqrt(), rtol=1e-9, atol=0)


def test_constant_features_keep_the_metric_well_conditioned():
    X = _features(2, spread=0.5)
    X[:, 3] = 7.0  # constant: no scale to learn from it
    metric = make_feature_metric(feature_moments(X))
    assert torch.isfinite(metric.transform).all()
    assert float(metric.penalty.max() / metric.penalty.min()) < 1e8
    torch.testing.assert_close(metric.whiten(X)[:, :].std(0).max(), torch.tensor(1.0, dtype=torch.float64),
                               rtol=1e-2, atol=0)  # fmt: skip


@pytest.mark.parametrize("tiny", [1e-4, 1e-8, 1e-10, 1e-11])
def test_penalty_stays_diagonal_when_feature_scales_span_many_decades(tiny):
    # A near-constant column makes T's penalties span ~1/tiny^2. T^T T must stay
    # diagonal to rounding, else the solver's per-column penalty is not the
    # model's and the fit converges to another point (issue 35).
    X = _features(4, n=500, spread=0.5)
    X[:, 2] = tiny * torch.randn(500, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    metric = make_feature_metric(feature_moments(X))
    T = metric.transform
    gram = T.T @ T
    norms = metric.penalty.sqrt()
    off = (gram - torch.diag(gram.diagonal())).abs() / (norms[:, None] * norms[None, :])
    assert float(off.max()) < 1e-12
    torch.testing.assert_close(gram.diagonal(), metric.penalty, rtol=1e-12, atol=0)
    assert float(metric.penalty.max() / metric.penalty.min()) > 0.1 / tiny**2
    # T^{-1} T = I up to rounding relative to the columns' scales: (T^{-1} T)_ij sigma_i / sigma_j.
    round_trip = (metric.inverse @ T - torch.eye(8, dtype=torch.float64)) * norms[:, None] / norms[None, :]
    assert float(round_trip.abs().max()) < 1e-12
    _, cov = _dense_moments(X, torch.ones(500, dtype=torch.float64), True)
    sigma_eps = cov + 1e-4 * torch.diag(torch.diag(cov))
    torch.testing.assert_close(T.T @ sigma_eps @ T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-5)


def _digits_with(extra):
    """Standardised digits (600 rows) with columns appended by ``extra(X, rng)``."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:600], y[:600]
    X = X[:, X.std(0) > 0]
    X = (X - X.mean(0)) / X.std(0)
    return np.c_[X, extra(X, np.random.default_rng(0))], y


def _with_near_double(x, rng):
    return np.c_[x, 2 * x + 1e-9 * rng.standard_normal(len(x))]


_ILL_POSED_COLUMNS = {
    "near-constant 1e-10": lambda X, rng: 1e-10 * rng.standard_normal((len(X), 1)),
    "near-constant 1e-8": lambda X, rng: 1e-8 * rng.standard_normal((len(X), 1)),
    "near-duplicate": lambda X, rng: 2 * X[:, [5]] + 1e-9 * rng.standard_normal((len(X), 1)),
    "new x and 2x + 1e-9 noise": lambda X, rng: _with_near_double(rng.standard_normal(len(X)), rng),
    "exact duplicate": lambda X, rng: X[:, [5, 9]],
    "rank-deficient": lambda X, rng: X[:, :20] @ rng.standard_normal((20, 30)),
}


def _softmax_objective(coef, intercept, X, y, C):
    logits = X @ coef.T + intercept
    logits = logits - logits.max(1, keepdims=True)
    log_norm = np.log(np.exp(logits).sum(1))
    return C * (log_norm - logits[np.arange(len(y)), y]).sum() + 0.5 * (coef**2).sum()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("columns", list(_ILL_POSED_COLUMNS))
def test_fit_with_near_collinear_columns_reaches_logistic_regressions_optimum(columns, dtype):
    from sklearn.linear_model import LogisticRegression

    X, y = _digits_with(_ILL_POSED_COLUMNS[columns])
    reference = LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-12, max_iter=500).fit(X, y)
    fgn = FGNClassifier(alpha=1.0, batch_size=None, tol=1e-9, max_iter=200).fit(X.astype(dtype), y)
    expected = _softmax_objective(reference.coef_, reference.intercept_, X, y, 1.0)
    actual = _softmax_objective(fgn.coef_.astype(np.float64), fgn.intercept_.astype(np.float64), X, y, 1.0)
    assert abs(actual - expected) <= 1e-6 * expected
    # The optimum is unique (strictly convex objective): its probabilities agree too.
    proba = fgn.predict_proba(X.astype(dtype)).astype(np.float64)
    np.testing.assert_allclose(proba, reference.predict_proba(X), rtol=0, atol=2e-4)


def test_standardized_first_layer_gives_unit_scale_preactivations():
    X = _features(3, n=4000)
    mean, scale = feature_standardization(X)
    g = torch.Generator().manual_seed(0)
    params = {"coef_0": torch.randn(5, 8, generator=g, dtype=torch.float64), "intercept_0": torch.zeros(5)}
    params["intercept_0"] = params["intercept_0"].double()
    out = standardized_first_layer(params, mean, scale)
    pre = X @ out["coef_0"].T + out["intercept_0"]
    standardized = (X - mean) * scale
    torch.testing.assert_close(pre, standardized @ params["coef_0"].T, rtol=1e-9, atol=1e-9)


def test_metric_moves_to_dtype_and_device():
    metric = make_feature_metric(feature_moments(_features(0)))
    moved = metric.to(torch.float32, "cpu")
    assert isinstance(moved, FeatureMetric)
    assert all(t.dtype == torch.float32 for t in moved.tensors() if t is not moved.penalty)
    assert moved.penalty.dtype == torch.float64  # alpha multiplies it first (FeatureMetric.to)


def _embedding_like(n, d, n_classes, seed):
    rng = np.random.default_rng(seed)
    root = np.arange(1, d + 1) ** -1.0
    means = rng.standard_normal((n_classes, d)) * root * 2.0
    y = rng.integers(0, n_classes, size=n)
    X = means[y] + rng.standard_normal((n, d)) * root
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


@pytest.mark.parametrize("seed", SEEDS)
def test_one_epoch_is_invariant_to_rotating_and_rescaling_the_features(seed):
    # docs/design.md §4: a step in the feature metric is unchanged when the features are
    # rotated or rescaled, up to the penalty (negligible here: it is the one
    # term that sees the units) and the ridge (exact for per-feature scales,
    # about the ridge for rotations).
    X, y = _embedding_like(1200, 12, 4, seed)
    X_test, y_test = _embedding_like(600, 12, 4, seed + 10)
    rng = np.random.default_rng(seed)
    R, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    transform = R @ np.diag(10.0 ** rng.uniform(-3, 3, 12))
    kw = dict(alpha=1e-18, batch_size=64, max_iter=1, early_stopping=False, random_state=seed, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = FGNClassifier(**kw).fit(X, y)
        moved = FGNClassifier(**kw).fit(X @ transform, y)
        identity = FGNClassifier(damping_metric="identity", **kw).fit(X @ transform, y)
    same = np.mean(raw.predict(X_test) == moved.predict(X_test @ transform))
    assert same >= 0.995
    np.testing.assert_allclose(moved.predict_proba(X_test @ transform), raw.predict_proba(X_test), atol=5e-3)
    # the identity metric is not invariant: the same epoch ends elsewhere
    assert np.abs(identity.predict_proba(X_test @ transform) - raw.predict_proba(X_test)).max() > 0.05
