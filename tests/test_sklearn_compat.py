"""Behaviours scikit-learn users rely on, found by running scikit-learn's own tests (issue 34).

Each test names the scikit-learn estimator whose behaviour it checks.
"""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from sklearn_fgn import FGNClassifier, FGNClassifierCV


@pytest.mark.parametrize("binary", [False, True])
def test_balanced_class_weight_counts_sample_weights_as_logistic_regression(binary):
    X, y = load_iris(return_X_y=True)
    if binary:
        y = (y == 1).astype(int)
    sw = np.random.default_rng(0).uniform(-1, 5, len(y)).clip(0)
    kw = dict(class_weight="balanced")
    ref = LogisticRegression(C=1e-2, solver="newton-cholesky", tol=1e-12, max_iter=1000, **kw).fit(X, y, sw)
    fgn = FGNClassifier(alpha=1e2, batch_size=None, tol=1e-10, max_iter=200, **kw).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(fgn.coef_, ref.coef_, rtol=0, atol=2e-5)
    np.testing.assert_allclose(fgn.intercept_, ref.intercept_, rtol=0, atol=2e-5)


def test_cv_score_uses_the_search_scoring():
    # As LogisticRegressionCV.score: the search's scorer, with sample weights when given.
    X, y = load_iris(return_X_y=True)
    search = FGNClassifierCV(Cs=3, cv=3, scoring="neg_log_loss").fit(X, y)
    assert search.score(X, y) == pytest.approx(-log_loss(y, search.predict_proba(X)), rel=1e-10)
    sw = np.linspace(0.5, 2.0, len(y))
    assert search.score(X, y, sample_weight=sw) == pytest.approx(
        -log_loss(y, search.predict_proba(X), sample_weight=sw), rel=1e-10
    )
    plain = FGNClassifierCV(Cs=3, cv=3).fit(X, y)
    assert plain.score(X, y) == pytest.approx(np.mean(plain.predict(X) == y))


def test_n_iter_no_change_may_be_infinite_as_in_mlp_classifier():
    X, y = make_classification(300, 6, n_informative=4, n_classes=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = FGNClassifier(batch_size=32, max_iter=7, n_iter_no_change=np.inf, tol=1e3,
                            early_stopping=False, random_state=0).fit(X, y)  # fmt: skip
    assert est.n_iter_ == 7  # no improvement of 1e3 ever, and no stop for it


def test_warm_start_counts_each_fits_iterations_as_mlp_classifier():
    X, y = make_classification(300, 6, n_informative=4, n_classes=3, random_state=0)
    est = FGNClassifier(batch_size=32, max_iter=3, warm_start=True, early_stopping=False, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
        first_t = est.t_
        est.fit(X, y)
    assert est.n_iter_ == 3
    assert est.t_ == 2 * first_t  # samples seen still add up
    assert len(est.loss_curve_) == 6


@pytest.mark.parametrize("labels", [[0, 1, 3], [0, 1]])
def test_warm_start_with_other_classes_raises_and_keeps_the_model(labels):
    X, y = make_classification(300, 6, n_informative=4, n_classes=3, random_state=0)
    est = FGNClassifier(batch_size=None, max_iter=5, warm_start=True).fit(X, y)
    coef = est.coef_.copy()
    other = np.asarray(labels)[y % len(labels)]
    with pytest.raises(ValueError, match="same classes"):
        est.fit(X, other)
    np.testing.assert_array_equal(est.coef_, coef)
    np.testing.assert_array_equal(est.classes_, [0, 1, 2])
    FGNClassifier(batch_size=None, max_iter=5).set_params(warm_start=False).fit(X, other)  # afresh: fine


def test_early_stopping_attributes_follow_mlp_classifier():
    X, y = make_classification(2000, 6, n_informative=4, n_classes=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        early = FGNClassifier(batch_size=64, max_iter=4, early_stopping=True, random_state=0).fit(X, y)
        plain = FGNClassifier(batch_size=64, max_iter=4, early_stopping=False, random_state=0).fit(X, y)
    assert early.best_loss_ is None and len(early.validation_scores_) == early.n_iter_
    assert plain.validation_scores_ is None and plain.best_loss_ == min(plain.loss_curve_)
    assert plain.best_validation_score_ is None


@pytest.mark.parametrize("batch_size", [None, 32])
def test_max_iter_zero_fits_the_initial_point_as_logistic_regression(batch_size):
    X, y = load_iris(return_X_y=True)
    with pytest.warns(ConvergenceWarning, match="max_iter=0"):
        est = FGNClassifier(max_iter=0, batch_size=batch_size).fit(X, y)
    assert est.n_iter_ == 0 and est.loss_curve_ == []
    np.testing.assert_array_equal(est.coef_, np.zeros((3, 4)))
    np.testing.assert_allclose(est.predict_proba(X), np.full((len(y), 3), 1 / 3))
    init = np.arange(12.0).reshape(3, 4) / 10
    with pytest.warns(ConvergenceWarning):
        started = FGNClassifier(max_iter=0, batch_size=batch_size).fit(X, y, coef_init=init)
    np.testing.assert_allclose(started.coef_, init, rtol=1e-12, atol=1e-12)  # through the whitening and back


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_what_the_softmax_leaves_free_is_centred_as_logistic_regression(alpha):
    # Unpenalised multiclass coefficients, and multiclass intercepts always, have mean 0 over the
    # classes exactly (scikit-learn's test_logistic_regression_solvers_multiclass_unpenalized asks 1e-10).
    rng = np.random.RandomState(0)
    X, y = rng.randn(100, 4), rng.randint(3, size=100)
    fgn = FGNClassifier(alpha=alpha, batch_size=None, tol=1e-12, max_iter=200).fit(X, y)
    assert np.abs(fgn.intercept_.sum()) < 1e-12
    assert np.abs(fgn.coef_.sum(axis=0)).max() < (1e-12 if alpha == 0 else 1e-6)
    C = np.inf if alpha == 0 else 1 / alpha
    ref = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(fgn.coef_, ref.coef_, rtol=0, atol=1e-7)
    np.testing.assert_allclose(fgn.intercept_, ref.intercept_, rtol=0, atol=1e-7)


def test_cv_score_refuses_a_sample_weight_its_scorer_does_not_request():
    # As LogisticRegressionCV: with metadata routing, an unrequested sample_weight is an error.
    from sklearn import config_context
    from sklearn.metrics import get_scorer

    X, y = make_classification(n_samples=200, random_state=0)
    sw = np.where(np.arange(200) < 100, 5.0, 1.0)
    with config_context(enable_metadata_routing=True):
        scorer = get_scorer("accuracy").set_score_request(sample_weight=False)
        search = FGNClassifierCV(Cs=2, cv=2, scoring=scorer).fit(X, y)
        with pytest.raises(TypeError, match="sample_weight"):
            search.score(X, y, sample_weight=sw)
        assert search.score(X, y) == pytest.approx(np.mean(search.predict(X) == y))


def test_cv_search_stays_within_the_callers_thread_limits():
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []

    def scorer(estimator, X, y, sample_weight=None):  # the limits the fold's fits ran under
        infos = threadpool_info()
        seen.extend(info["num_threads"] for info in infos if info["user_api"] in ("blas", "openmp"))
        return 0.0

    X, y = make_classification(n_samples=120, random_state=0)
    with threadpool_limits(limits=1):
        FGNClassifierCV(Cs=2, cv=2, scoring=scorer).fit(X, y)
    assert seen and set(seen) == {1}
