"""What a fit guarantees when it fails or is interrupted, and errors that name their cause (issue 35)."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from sklearn_fgn import FGNClassifier, FGNClassifierCV
from sklearn_fgn._metric import feature_moments
from sklearn_fgn._stepper import Stepper


def _data(n=400, d=6, seed=0):
    return make_classification(n, d, n_informative=4, n_redundant=0, n_classes=3, random_state=seed)


def _interrupt_after(monkeypatch, calls_before):
    calls, update = [], Stepper.step

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_before:
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(Stepper, "step", interrupted)
    return calls


@pytest.mark.parametrize("fitted_before", [False, True])
def test_interrupted_search_stops_at_once_and_leaves_the_estimator_as_it_was(monkeypatch, fitted_before):
    X, y = _data()
    search = FGNClassifierCV(Cs=4, cv=3)
    if fitted_before:
        X_old, y_old = _data(d=4, seed=1)
        search.fit(X_old, y_old)
        before = search.predict_proba(X_old)
    calls = _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        search.fit(X, y)
    assert len(calls) == 4  # no step after the interrupt: the search did not go on to other Cs or folds
    if fitted_before:
        assert search.n_features_in_ == 4
        np.testing.assert_array_equal(search.predict_proba(X_old), before)
    else:
        assert not hasattr(search, "n_features_in_")
        with pytest.raises(NotFittedError):
            search.predict(X)


def test_failed_refit_of_a_search_leaves_it_as_it_was(monkeypatch):
    X, y = _data(d=4)
    search = FGNClassifierCV(Cs=3, cv=3).fit(X, y)
    before = search.predict_proba(X)

    def failing(*args, **kwargs):
        raise ValueError("refit failed")

    monkeypatch.setattr(FGNClassifierCV, "_best_fit", failing)
    X_wide, _ = _data(d=7)
    with pytest.raises(ValueError, match="refit failed"):
        search.fit(X_wide, y)
    assert search.n_features_in_ == 4
    np.testing.assert_array_equal(search.predict_proba(X), before)


@pytest.mark.parametrize("name", ["coef_init", "intercept_init"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_initial_parameters_are_named(name, bad):
    X, y = _data()
    init = {"coef_init": np.zeros((3, 6)), "intercept_init": np.zeros(3)}
    init[name][0] = bad
    with pytest.raises(ValueError, match=f"{name} contains"):
        FGNClassifier(batch_size=None, max_iter=3).fit(X, y, **{name: init[name]})


@pytest.mark.parametrize("weight", [np.inf, np.nan])
def test_non_finite_class_weight_is_named(weight):
    X, y = _data()
    with pytest.raises(ValueError, match="class_weight must be finite"):
        FGNClassifier(batch_size=None, max_iter=3, class_weight={0: weight}).fit(X, y)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_float32_moments_of_huge_and_tiny_features_are_the_float64_ones(scale):
    # The chunk's float32 product squared the features: 1e40 overflowed, 1e-60 underflowed to zero.
    X = torch.from_numpy(_data()[0] * scale)
    low, exact = feature_moments(X.float()), feature_moments(X.float().double())
    cov, cov_exact = low.covariance(True)[1], exact.covariance(True)[1]
    torch.testing.assert_close(cov, cov_exact, rtol=0, atol=1e-5 * float(cov_exact.diagonal().max()))


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_float32_features_of_any_magnitude_fit_the_float64_model(scale):
    # The model of X * scale with alpha * scale^2 is the model of X with alpha: the same predictions.
    X, y = _data()
    reference = FGNClassifier(batch_size=None).fit(X, y).predict_proba(X)
    Xs = (X * scale).astype(np.float32)
    fitted = FGNClassifier(batch_size=None, alpha=scale**2).fit(Xs, y)
    np.testing.assert_allclose(fitted.predict_proba(Xs), reference, rtol=0, atol=1e-4)


def test_mlp_that_cannot_learn_from_tiny_features_in_the_identity_metric_says_so():
    X, y = _data()
    Xs = (X * 1e-30).astype(np.float32)
    mlp = FGNClassifier(hidden_layer_sizes=(8,), alpha=0.0, max_iter=10, random_state=0)
    with pytest.raises(ValueError, match="largest variance is 2.*cannot learn its first layer.*'features'"):
        mlp.fit(Xs, y)
    # In the feature metric it learns from them as from the unscaled features.
    mlp.set_params(damping_metric="features")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert mlp.fit(Xs, y).score(Xs, y) > 0.8


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skorch_net_names_non_finite_values_of_x(bad):
    pytest.importorskip("skorch")
    from sklearn_fgn.skorch import FGNNeuralNetClassifier

    X, y = _data(n=64)
    X = X.astype(np.float32)
    X[5, 1] = bad
    torch.manual_seed(0)
    net = FGNNeuralNetClassifier(torch.nn.Linear(6, 3), max_epochs=1, batch_size=-1, verbose=0)
    found = "NaN" if np.isnan(bad) else "infinite"
    with pytest.raises(ValueError, match=f"X of the training batch contains 1 {found} value"):
        net.fit(X, y)


def _nothing_learned_warnings(estimator, X, y):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator.fit(X, y)
    return [str(w.message) for w in caught if "class frequencies" in str(w.message)]


def test_mlp_fit_whose_objective_is_mostly_penalty_but_learned_does_not_warn():
    # Raw features of scale 0.1: after 5 steps the objective is above the class-frequency loss
    # only through the penalty; the data term is below it and the model predicts.
    X, y = make_classification(300, 5, n_informative=3, n_redundant=0, random_state=0)
    mlp = FGNClassifier(hidden_layer_sizes=(16,), random_state=0, max_iter=5)
    assert _nothing_learned_warnings(mlp, X * 0.1, y) == []
    frequencies = np.bincount(y) / len(y)
    assert mlp.loss_curve_[-1] > -(frequencies * np.log(frequencies)).sum()
    assert mlp.score(X * 0.1, y) > 0.7


@pytest.mark.parametrize("case", ["labels independent of X", "penalty keeps the prior"])
def test_mlp_fit_that_learned_nothing_warns_with_both_losses(case):
    if case == "labels independent of X":  # each distinct row has both labels equally often
        X, y = np.repeat([[0.0, 1.0], [1.0, 0.0]], 50, axis=0), np.tile([0, 1], 50)
        mlp = FGNClassifier(hidden_layer_sizes=(8,), random_state=0)
    else:  # features of scale 0.01 make the first layer's penalty win: the fit ends at the prior
        X, y = make_classification(300, 5, n_informative=3, n_redundant=0, random_state=0)
        X, mlp = X * 0.01, FGNClassifier(hidden_layer_sizes=(16,), random_state=0, max_iter=10)
    frequencies = np.bincount(y) / len(y)
    prior = f"{-(frequencies * np.log(frequencies)).sum():.4g}"
    (message,) = _nothing_learned_warnings(mlp, X, y)
    assert f"training log-loss of {prior} (objective" in message
    assert f"no better than predicting the class frequencies ({prior})" in message
