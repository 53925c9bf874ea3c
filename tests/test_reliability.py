"""What a fit guarantees when it fails or is interrupted, and errors that name their cause (issue 35)."""

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.exceptions import NotFittedError

import sklearn_fgn._solver as solver_module
from sklearn_fgn import FGNClassifier, FGNClassifierCV


def _data(n=400, d=6, seed=0):
    return make_classification(n, d, n_informative=4, n_redundant=0, n_classes=3, random_state=seed)


def _interrupt_after(monkeypatch, calls_before):
    calls, update = [], solver_module.step_on_batch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_before:
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(solver_module, "step_on_batch", interrupted)
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
