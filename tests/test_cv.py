"""FGNClassifierCV against LogisticRegressionCV, and as a scikit-learn estimator."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, make_classification
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_fgn import FGNClassifier, FGNClassifierCV

DATASETS = {"iris": load_iris, "breast_cancer": load_breast_cancer, "digits": load_digits}


@parametrize_with_checks([FGNClassifierCV(Cs=3, cv=3, device="cpu")])
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def _standardized(name):
    X, y = DATASETS[name](return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_same_choice_of_C_as_logistic_regression_cv(name):
    X, y = _standardized(name)
    folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(X, y))
    Cs = np.logspace(-3, 3, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lr = LogisticRegressionCV(Cs=Cs, cv=folds, scoring="accuracy", max_iter=10_000, tol=1e-8,
                                  l1_ratios=(0,), use_legacy_attributes=False).fit(X, y)  # fmt: skip
    fgn = FGNClassifierCV(Cs=Cs, cv=folds, device="cpu").fit(X, y)
    np.testing.assert_allclose(fgn.Cs_, lr.Cs_)
    # each fold's path is the optimum at each C: the same validation scores up to ties at the boundary
    np.testing.assert_allclose(fgn.scores_.mean(0), lr.scores_.reshape(len(folds), -1).mean(0), atol=0.01)
    lr_mean = lr.scores_.reshape(len(folds), -1).mean(0)
    assert fgn.C_ == lr.C_ or lr_mean[list(Cs).index(fgn.C_)] >= lr_mean.max() - 0.001
    assert fgn.score(X, y) >= lr.score(X, y) - 0.002


def test_path_fits_are_the_fits_at_each_C():
    X, y = _standardized("breast_cancer")
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    cv = FGNClassifierCV(Cs=[0.1, 10.0], cv=folds, tol=1e-8, device="cpu").fit(X, y)
    train = folds[1][0]
    single = FGNClassifier(alpha=1 / 10.0, batch_size=None, tol=1e-8, device="cpu").fit(X[train], y[train])
    path = cv.coefs_paths_[1, 1]
    np.testing.assert_allclose(path[:, :-1], single.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(path[:, -1], single.intercept_, rtol=1e-4, atol=1e-5)
    assert cv.coefs_paths_.shape == (3, 2, 1, X.shape[1] + 1) and cv.n_iter_.shape == (3, 2)
    # the refit is the fit at the chosen C on all rows
    np.testing.assert_allclose(cv.coef_, cv.best_estimator_.coef_)
    assert cv.best_estimator_.alpha == pytest.approx(1 / cv.C_)


def test_refit_false_averages_the_folds_at_the_best_C():
    X, y = _standardized("iris")
    cv = FGNClassifierCV(Cs=[0.1, 1.0, 10.0], cv=3, refit=False, device="cpu").fit(X, y)
    best = list(cv.Cs_).index(cv.C_)
    np.testing.assert_allclose(cv.coef_, cv.coefs_paths_[:, best, :, :-1].mean(0))
    assert not hasattr(cv, "best_estimator_")
    assert cv.predict_proba(X).shape == (len(y), 3)


def test_parallel_folds_give_the_same_result():
    X, y = _standardized("iris")
    one = FGNClassifierCV(Cs=4, cv=3, device="cpu").fit(X, y)
    two = FGNClassifierCV(Cs=4, cv=3, n_jobs=2, device="cpu").fit(X, y)
    three = FGNClassifierCV(Cs=4, cv=3, n_jobs=3, device="cpu").fit(X, y)
    for other in (two, three):
        np.testing.assert_allclose(one.coefs_paths_, other.coefs_paths_, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(one.scores_, other.scores_)
        assert one.C_ == other.C_
        np.testing.assert_allclose(one.coef_, other.coef_, rtol=1e-10, atol=1e-12)


def test_pipeline_pickle_and_weights():
    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), FGNClassifierCV(Cs=3, cv=3, device="cpu")).fit(X, y)
    clone = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(clone.predict(X), pipe.predict(X))
    sw = np.random.RandomState(0).uniform(0.5, 2.0, len(y))
    weighted = FGNClassifierCV(Cs=3, cv=3, device="cpu").fit(X, y, sample_weight=sw)
    assert weighted.scores_.shape == (3, 3)


def test_a_fold_without_a_class_fits_and_scores_it_as_logistic_regression_cv():
    # KFold leaves the rare class 3 out of fold 0's training rows: that fold
    # still fits (and returns coefficients for) every class, as LogisticRegressionCV does.
    X, y = make_classification(300, 8, n_informative=5, n_classes=3, random_state=0)
    y[:3] = 3
    folds, Cs = KFold(5), np.logspace(-2, 3, 4)
    fgn = FGNClassifierCV(Cs=Cs, cv=folds, device="cpu").fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lr = LogisticRegressionCV(Cs=Cs, cv=folds, max_iter=10_000, tol=1e-8, l1_ratios=(0,),
                                  use_legacy_attributes=False).fit(X, y)  # fmt: skip
    assert fgn.coefs_paths_.shape == (5, 4, 4, 9) and np.isfinite(fgn.coefs_paths_).all()
    np.testing.assert_allclose(fgn.scores_, lr.scores_.reshape(5, -1), atol=1e-12)
    # the absent class is never predicted on fold 0: its intercept sinks below the others
    intercepts = fgn.coefs_paths_[0, :, :, -1]
    assert np.all(intercepts[:, 3] < intercepts[:, :3].min(1) - 5)
    assert fgn.C_ == lr.C_


@pytest.mark.parametrize("scoring", ["neg_log_loss", "neg_brier_score", "f1_macro"])
def test_scorers_of_a_fold_without_a_class_are_told_every_class(scoring):
    # Two rows of class 3: one fold's validation rows lack it, and the metrics of probabilities
    # are told the classes (labels=...) to match predict_proba's columns, as in LogisticRegressionCV.
    X, y = make_classification(300, 8, n_informative=5, n_classes=3, random_state=0)
    y[:2] = 3
    Cs = [0.1, 10.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rare class's warning from StratifiedKFold
        fgn = FGNClassifierCV(Cs=Cs, cv=3, scoring=scoring, tol=1e-8, device="cpu").fit(X, y)
        lr = LogisticRegressionCV(Cs=Cs, cv=3, scoring=scoring, max_iter=10_000, tol=1e-8, l1_ratios=(0,),
                                  use_legacy_attributes=False).fit(X, y)  # fmt: skip
    assert np.isfinite(fgn.scores_).all()
    np.testing.assert_allclose(fgn.scores_, lr.scores_.reshape(3, -1), atol=2e-4)


def test_a_failed_refit_leaves_the_fitted_estimator_as_it_was(monkeypatch):
    X, y = _standardized("iris")
    cv = FGNClassifierCV(Cs=3, cv=3, device="cpu").fit(X, y)
    before = {k: v for k, v in vars(cv).items() if k.endswith("_")}

    def fail(*args, **kwargs):
        raise ValueError("refit failed")

    monkeypatch.setattr(FGNClassifierCV, "_best_fit", fail)
    with pytest.raises(ValueError, match="refit failed"):
        cv.set_params(Cs=[0.5, 5.0]).fit(X[::2], y[::2])
    after = {k: v for k, v in vars(cv).items() if k.endswith("_")}
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name] is value, name


def test_bad_Cs_raise():
    X, y = load_iris(return_X_y=True)
    with pytest.raises(ValueError, match="Cs must be positive"):
        FGNClassifierCV(Cs=[1.0, -1.0], device="cpu").fit(X, y)


def test_large_folds_fit_their_paths_in_float32_to_the_gap_and_refit_in_float64(monkeypatch, tune):
    # Path fits only score their solutions: on large folds float64 features are fitted in
    # float32 there, to a gap of tol and no closer (scored); the scores, the chosen C and
    # the refit (in float64, not scored) stay those of float64 paths run to Newton's rule.
    # path_large_work is lowered so that digits counts as large.

    X, y = _standardized("digits")
    Cs, folds = [1e-2, 1e-1, 1.0], list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    reference = FGNClassifierCV(Cs=Cs, cv=folds, device="cpu").fit(X, y)
    seen = []
    original = FGNClassifier._fit_path

    def spy(self, X, *args, **kwargs):
        seen.append((X.dtype, kwargs["search"].scored_only))
        return original(self, X, *args, **kwargs)

    monkeypatch.setattr(FGNClassifier, "_fit_path", spy)
    FGNClassifierCV(Cs=Cs, cv=folds, device="cpu").fit(X, y)
    assert seen == [(np.float64, False)] * (len(folds) + 1)  # small folds: Newton's rule in float64
    seen.clear()
    tune(path_large_work=0)
    fgn = FGNClassifierCV(Cs=Cs, cv=folds, device="cpu").fit(X, y)
    assert seen == [(np.float32, True)] * len(folds) + [(np.float64, False)]  # the paths, then the refit
    assert fgn.coefs_paths_.dtype == np.float64 and fgn.coef_.dtype == np.float64
    np.testing.assert_allclose(fgn.scores_, reference.scores_, atol=0.01)
    assert fgn.C_ == reference.C_
    # The scored paths stop at a gap of about tol = 1e-4: their coefficients are a few
    # percent of the largest from those of Newton's rule.
    scale = np.abs(reference.coefs_paths_).max()
    np.testing.assert_allclose(fgn.coefs_paths_, reference.coefs_paths_, rtol=0, atol=3e-2 * scale)
    scale = np.abs(reference.coef_).max()
    np.testing.assert_allclose(fgn.coef_, reference.coef_, rtol=0, atol=1e-6 * scale)
    seen.clear()
    FGNClassifierCV(Cs=Cs, cv=folds, tol=1e-7, device="cpu").fit(X, y)  # tighter than float32 resolves
    assert seen == [(np.float64, True)] * len(folds) + [(np.float64, False)]


def test_path_features_keep_float64_beyond_float32_range():
    import torch

    from sklearn_fgn._cv import _path_features

    X = np.random.RandomState(0).standard_normal((50, 4))
    assert _path_features(X, 1e-7).dtype == np.float64  # tighter than float32 resolves: float64 kept
    low = _path_features(X, 1e-4)
    assert low.dtype == np.float32 and np.array_equal(low, X.astype(np.float32))
    assert _path_features(X * 1e39, 1e-4).dtype == np.float64  # would overflow float32
    assert _path_features(X.astype(np.float32), 1e-4).dtype == np.float32
    tensor = torch.as_tensor(X)
    assert _path_features(tensor, 1e-4).dtype == torch.float32
    assert _path_features(tensor * 1e39, 1e-4).dtype == torch.float64


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_null_loss_is_the_objective_of_the_intercept_only_model(fit_intercept):
    # What scored path fits measure their gap against: the weighted log-loss of the class
    # shares (zero logits, log K, without intercept); here against scikit-learn's log_loss.
    from sklearn.metrics import log_loss

    from sklearn_fgn._heads import Head
    from sklearn_fgn._prepare import null_loss

    rng = np.random.RandomState(0)
    y = rng.randint(0, 4, 200)
    w = rng.uniform(0.1, 2.0, 200)
    shares = np.bincount(y, weights=w) / w.sum()
    proba = np.tile(shares if fit_intercept else np.full(4, 0.25), (200, 1))
    head = Head(n_features=3, n_logits=4, fit_intercept=fit_intercept)
    assert null_loss(head, y, w) == pytest.approx(log_loss(y, proba, sample_weight=w))


def test_a_path_starts_each_C_from_the_last_fits_logits_and_coordinates(monkeypatch):
    # What does not depend on C is done once per fold: after the first C no
    # forward pass and no change of coordinates; the fits are the same.
    import sklearn_fgn._curvature as curvature
    import sklearn_fgn._estimator as estimator

    X, y = _standardized("breast_cancer")
    calls = {"forward": 0, "to_fit": 0}
    forward, to_fit = curvature.linear_logits, estimator.to_fit_coordinates

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_to_fit(*args, **kwargs):
        calls["to_fit"] += 1
        return to_fit(*args, **kwargs)

    monkeypatch.setattr(curvature, "linear_logits", counted_forward)
    monkeypatch.setattr(estimator, "to_fit_coordinates", counted_to_fit)  # where _train looks it up
    path = FGNClassifier(batch_size=None, tol=1e-10, device="cpu")
    coefs = [path.coef_.copy() for _ in path._fit_path(X, y, np.ones(len(y)), [10.0, 1.0, 0.1])]
    assert calls == {"forward": 1, "to_fit": 1}
    for coef, alpha in zip(coefs, [10.0, 1.0, 0.1], strict=True):
        single = FGNClassifier(alpha=alpha, batch_size=None, tol=1e-10, device="cpu").fit(X, y)
        np.testing.assert_allclose(coef, single.coef_, rtol=1e-6, atol=1e-8)


def _path_accuracies(search, X, y, folds, weight=None):
    """Accuracy of every fold's path coefficients on its test rows, recomputed from coefs_paths_."""
    out = np.empty(search.scores_.shape)
    for f, (_, test) in enumerate(folds):
        for c, coef in enumerate(search.coefs_paths_[f]):
            predicted = search.classes_[np.argmax(X[test] @ coef[:, :-1].T + coef[:, -1], axis=1)]
            hits = (predicted == y[test]).astype(float)
            out[f, c] = np.average(hits, weights=None if weight is None else weight[test])
    return out


@pytest.mark.parametrize("requested", [True, False])
def test_metadata_routing_gives_the_scorer_sample_weight_only_where_it_asks(requested):
    # issue 34, item 3: with routing on, set_score_request(sample_weight=False)
    # scores the folds unweighted although the fits are weighted.
    from sklearn import config_context
    from sklearn.metrics import accuracy_score, make_scorer

    X, y = _standardized("iris")
    sw = np.random.RandomState(0).uniform(0.1, 3.0, len(y))
    folds = list(StratifiedKFold(3).split(X, y))
    with config_context(enable_metadata_routing=True):
        scorer = make_scorer(accuracy_score).set_score_request(sample_weight=requested)
        search = FGNClassifierCV(Cs=[0.01, 1.0], cv=folds, scoring=scorer, device="cpu")
        search.fit(X, y, sample_weight=sw)
        held_out = search.score(X, y, sample_weight=sw) if requested else search.score(X, y)
    expected = _path_accuracies(search, X, y, folds, sw if requested else None)
    np.testing.assert_allclose(search.scores_, expected, rtol=1e-12)
    assert not np.allclose(expected, _path_accuracies(search, X, y, folds, None if requested else sw))
    weight = sw if requested else None
    assert held_out == pytest.approx(accuracy_score(y, search.predict(X), sample_weight=weight))


def test_without_routing_the_scores_are_weighted_and_metadata_is_refused():
    X, y = _standardized("iris")
    sw = np.random.RandomState(0).uniform(0.1, 3.0, len(y))
    folds = list(StratifiedKFold(3).split(X, y))
    search = FGNClassifierCV(Cs=[0.01, 1.0], cv=folds, scoring="accuracy", device="cpu")
    search.fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(search.scores_, _path_accuracies(search, X, y, folds, sw), rtol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        FGNClassifierCV(Cs=2, cv=3, device="cpu").fit(X, y, groups=np.arange(len(y)) % 5)


def test_metadata_routing_passes_groups_to_the_splitter():
    from sklearn import config_context
    from sklearn.model_selection import GroupKFold

    X, y = _standardized("iris")
    groups = np.arange(len(y)) % 7
    with config_context(enable_metadata_routing=True):
        routed = FGNClassifierCV(Cs=[0.1, 1.0], cv=GroupKFold(3), device="cpu").fit(X, y, groups=groups)
    folds = list(GroupKFold(3).split(X, y, groups))
    explicit = FGNClassifierCV(Cs=[0.1, 1.0], cv=folds, device="cpu").fit(X, y)
    np.testing.assert_array_equal(routed.scores_, explicit.scores_)
    np.testing.assert_allclose(routed.coefs_paths_, explicit.coefs_paths_, rtol=1e-12, atol=1e-12)
