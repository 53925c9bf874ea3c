"""FGNClassifierCV: the regularisation path of a linear probe, cross-validated."""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from joblib import effective_n_jobs
from sklearn import config_context
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import check_scoring, make_scorer
from sklearn.model_selection import check_cv
from sklearn.utils import metadata_routing
from sklearn.utils._metadata_requests import _routing_enabled
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metadata_routing import MetadataRouter, MethodMapping, _raise_for_params, process_routing
from sklearn.utils.parallel import Parallel, delayed
from sklearn.utils.validation import _check_method_params, check_is_fitted
from threadpoolctl import threadpool_limits

from ._arrays import check_training_data, is_tensor, numpy_dtype
from ._device import thread_limit
from ._estimator import DAMPING_METRICS, FGNClassifier
from ._fitted import restored_on_error
from ._plan import SearchFit
from ._predict import LogitsPredictionMixin, fitted_features
from ._tuning import get_tuning

__all__ = ["FGNClassifierCV"]


class FGNClassifierCV(LogitsPredictionMixin, ClassifierMixin, BaseEstimator):
    r"""Multinomial logistic regression with ``C`` chosen by cross-validation, fitted by FGN steps.

    The counterpart of ``LogisticRegressionCV`` for linear probes: for every
    fold, the whole path of ``Cs`` is fitted from strong to weak
    regularisation, each ``C`` starting from the previous ``C``'s solution,
    and the work that does not depend on ``C`` is done once per fold (the
    fold's rows on the device, the feature second moment and its
    eigendecomposition, the validation split of mini-batch fits). The ``C``
    with the best mean validation score is refitted on all the data. On
    folds of at least ``1e8`` rows x features x classes the path, which only
    scores its solutions, is fitted to a gap of ``tol`` and no closer
    (float64 features in float32 from ``tol >= 1e-6``), and the refit in the
    data's dtype to ``min(tol, 1e-8)``.

    Parameters
    ----------
    Cs : int or array-like of float, default=10
        Inverse regularisation strengths (``alpha = 1 / C`` of
        :class:`FGNClassifier`); an int ``k`` gives ``k`` values on a log grid
        from 1e-4 to 1e4, as ``LogisticRegressionCV``.
    cv : int, cross-validation generator or iterable, default=None
        As in ``LogisticRegressionCV``: ``None`` is 5-fold, an int is that
        many folds, stratified for classification.
    scoring : str or callable, default=None
        Validation score (``None``: accuracy).
    refit : bool, default=True
        Refit the best ``C`` on all the data (``best_estimator_``). Otherwise
        ``coef_`` and ``intercept_`` are the mean over the folds of the fits
        at the best ``C``.
    n_jobs : int, default=None
        Folds fitted in parallel (joblib); each worker's BLAS, OpenMP and
        torch threads are capped at ``cpu_count // n_jobs`` so that the
        workers share the cores instead of oversubscribing them.
    damping : float, default=1.0
        As in :class:`FGNClassifier`.
    damping_metric : {"auto", "features", "identity"}, default="auto"
        As in :class:`FGNClassifier`.
    batch_size : int, "auto" or None, default="auto"
        As in :class:`FGNClassifier`. In full batch each ``C`` of the path
        converges in a few Newton steps from the previous solution. With
        mini-batches each ``C`` runs epochs (with the early stopping of
        :class:`FGNClassifier`) warm-started from the previous ``C``.
    max_iter : int, default=100
        Steps (full batch) or epochs per ``C``.
    tol : float, default=1e-4
        As in :class:`FGNClassifier`, for the fits of the path, which only
        score their solutions: a full-batch fit whose end game converges
        linearly (weak ``C`` on raw features) also stops once the gap its
        decreases leave is estimated below ``tol``, as ``LogisticRegressionCV``
        stops short of the optimum. On folds of at least ``1e8`` rows x
        features x classes the path fits ask no more than that gap of every
        step's solve either, the gap relative to the smaller of the
        objective and its decrease from the intercept-only model (so that
        strongly regularised coefficients, which lower the objective little,
        are still fitted to ``tol`` of their own effect). The refit of the
        chosen ``C`` runs to ``min(tol, 1e-8)`` with Newton's stopping rule:
        it is one fit, and its coefficients are then exact where a weak ``C``
        leaves the objective flat.
    fit_intercept : bool, default=True
        Whether to fit intercepts (not penalised).
    class_weight : dict, "balanced" or None, default=None
        As in ``LogisticRegressionCV``.
    device : str or torch.device, default="auto"
        As in :class:`FGNClassifier`.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffles of mini-batch fits (not the folds of an int ``cv``,
        which are not shuffled, as in ``LogisticRegressionCV``).
    verbose : int, default=0
        Passed to the :class:`FGNClassifier` fits.

    Attributes
    ----------
    Cs_ : ndarray of shape (n_cs,)
        The grid, ascending.
    C_ : float
        The ``C`` with the best mean validation score (the smallest among ties).
    scores_ : ndarray of shape (n_folds, n_cs)
        Validation score of every fold and ``C`` (the layout of
        ``LogisticRegressionCV(use_legacy_attributes=False)`` without its
        ``l1_ratio`` axis: one array, as the multinomial fit has one score per fold and ``C``).
    coefs_paths_ : ndarray of shape (n_folds, n_cs, n_rows, n_features + fit_intercept)
        Coefficients (intercept last) along the path; ``n_rows`` is 1 for
        binary problems, ``n_classes`` otherwise.
    n_iter_ : ndarray of shape (n_folds, n_cs)
        Iterations of every fit of the path.
    best_estimator_ : FGNClassifier
        The refitted estimator (``refit=True``).
    coef_ : ndarray of shape (1, n_features) or (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    See Also
    --------
    FGNClassifier : One fit at a given ``alpha = 1 / C``.
    sklearn.linear_model.LogisticRegressionCV : The same search with scikit-learn's solvers.

    Notes
    -----
    ``tol`` here bounds the relative objective gap, which does not depend on
    the features' scale. ``LogisticRegressionCV``'s ``tol`` bounds the
    gradient's largest entry: on raw embeddings (rows of norm 1, so small
    gradients) its default stops the weakly regularised fits short of their
    optima, and it can choose a smaller ``C`` than the optima's validation
    scores do. Compare the two with a tighter ``tol`` for scikit-learn there
    (``benchmarks/linear_probe.py --cv-peer-tols``).

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn_fgn import FGNClassifierCV
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = FGNClassifierCV(Cs=[0.1, 1.0, 10.0], cv=3, device="cpu").fit(X, y)
    >>> float(clf.C_) in (0.1, 1.0, 10.0)
    True
    >>> clf.scores_.shape
    (3, 3)
    """

    # As LogisticRegressionCV: score's sample_weight goes to the scorer, which requests it or not.
    __metadata_request__score = {"sample_weight": metadata_routing.UNUSED}

    _parameter_constraints: dict = {
        "Cs": [Interval(Integral, 1, None, closed="left"), "array-like"],
        "cv": ["cv_object"],
        "scoring": [str, callable, None],
        "refit": ["boolean"],
        "n_jobs": [Integral, None],
        "damping": [Interval(Real, 0, None, closed="neither")],
        "damping_metric": [StrOptions(set(DAMPING_METRICS))],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "fit_intercept": ["boolean"],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        Cs=10,
        cv=None,
        scoring=None,
        refit=True,
        n_jobs=None,
        damping=1.0,
        damping_metric="auto",
        batch_size="auto",
        max_iter=100,
        tol=1e-4,
        fit_intercept=True,
        class_weight=None,
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.Cs = Cs
        self.cv = cv
        self.scoring = scoring
        self.refit = refit
        self.n_jobs = n_jobs
        self.damping = damping
        self.damping_metric = damping_metric
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, **params):
        """Fit the path on every fold, choose ``C``, and refit it.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features.
        y : array-like of shape (n_samples,)
            Class labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Per-sample weights of the fits. Without metadata routing they
            weight the validation scores too; with it
            (``sklearn.set_config(enable_metadata_routing=True)``) the scorer
            gets them only where it requests them (``set_score_request``).
        **params : dict
            Only with metadata routing: metadata for the splitter's ``split``
            (e.g. ``groups``) and the scorer, as ``LogisticRegressionCV``.

        Returns
        -------
        self : FGNClassifierCV
            The fitted estimator.
        """
        _raise_for_params(params, self, "fit")
        with restored_on_error(self):  # an error or an interrupt leaves the estimator as it was
            return self._fit(X, y, sample_weight, params)

    def _fit(self, X, y, sample_weight, params):
        split_params, score_params = self._routed_fit_params(sample_weight, params)
        X, y, sample_weight = check_training_data(self, X, y, sample_weight, reset=True)
        classes = np.unique(y)
        Cs = self._grid()
        splitter = check_cv(self.cv, y, classifier=True)
        folds = list(splitter.split(np.empty((len(y), 0)), y, **split_params))
        scorer = _scorer_given_every_class(self._get_scorer(), classes)
        n_jobs = effective_n_jobs(self.n_jobs)
        path = self._base_estimator(Cs[0], cg_max_iter=get_tuning().path_cg_max_iter)
        results = Parallel(n_jobs=n_jobs)(
            delayed(_fit_fold_path)(
                path, _SearchRows(X, y, sample_weight, classes), (train, test), Cs,
                (scorer, _check_method_params(y, score_params, indices=test)), _worker_threads(n_jobs),
                min(n_jobs, len(folds)),
            )
            for train, test in folds
        )  # fmt: skip
        scores = np.array([r[0] for r in results])
        coefs_paths = np.array([r[1] for r in results])
        best = int(np.argmax(scores.mean(axis=0)))  # the first (smallest C) among ties
        # Every fitted attribute is set at the end: a refit that fails or is
        # stopped leaves the estimator as it was.
        coef, intercept, best_estimator = self._best_fit(X, y, sample_weight, coefs_paths[:, best], Cs[best])
        self.__dict__.pop("best_estimator_", None)
        if best_estimator is not None:
            self.best_estimator_ = best_estimator
        self.classes_, self.Cs_, self.C_ = classes, Cs, float(Cs[best])
        self.scores_, self.coefs_paths_ = scores, coefs_paths
        self.n_iter_ = np.array([r[2] for r in results])
        self.coef_, self.intercept_ = coef, intercept
        return self

    def _routed_fit_params(self, sample_weight, params):
        """Return the splitter's and the scorer's metadata of a fit: ``(split_params, score_params)``.

        With metadata routing, what each requests; without, the scorer gets
        ``sample_weight`` (when given) and nothing goes to the splitter.

        Returns
        -------
        tuple of dict
        """
        if _routing_enabled():
            routed = process_routing(self, "fit", sample_weight=sample_weight, **params)
            return routed.splitter.split, routed.scorer.score
        return {}, ({} if sample_weight is None else {"sample_weight": sample_weight})

    def _get_scorer(self):
        """Return the scorer of ``scoring`` (accuracy when None)."""
        return check_scoring(self._base_estimator(1.0), scoring=self.scoring or "accuracy")

    def get_metadata_routing(self):
        """Return the metadata routing of this object: fit's metadata to the splitter and the scorer.

        As ``LogisticRegressionCV``: ``fit`` routes to the splitter's
        ``split`` and the scorer's ``score``, ``score`` to the scorer's.

        Returns
        -------
        MetadataRouter
            The routing information.
        """
        return (
            MetadataRouter(owner=self)
            .add_self_request(self)
            .add(splitter=self.cv, method_mapping=MethodMapping().add(caller="fit", callee="split"))
            .add(
                scorer=self._get_scorer(),
                method_mapping=MethodMapping()
                .add(caller="score", callee="score")
                .add(caller="fit", callee="score"),
            )
        )

    def _grid(self):
        if isinstance(self.Cs, Integral):
            return np.logspace(-4, 4, self.Cs)
        Cs = np.sort(np.asarray(self.Cs, dtype=np.float64).ravel())
        if Cs.size == 0 or not np.all(np.isfinite(Cs)) or np.any(Cs <= 0):
            raise ValueError(f"Cs must be positive finite values; got {self.Cs!r}.")
        return Cs

    def _base_estimator(self, C, tol=None, cg_max_iter="auto"):
        return FGNClassifier(
            alpha=1.0 / C, damping=self.damping, damping_metric=self.damping_metric,
            batch_size=self.batch_size, max_iter=self.max_iter, tol=self.tol if tol is None else tol,
            cg_max_iter=cg_max_iter, fit_intercept=self.fit_intercept, class_weight=self.class_weight,
            device=self.device, random_state=self.random_state, verbose=self.verbose,
        )  # fmt: skip

    def _best_fit(self, X, y, sample_weight, fold_coefs, C):
        """Return ``(coef, intercept, best_estimator)`` at the chosen ``C``.

        The folds' mean solution; with ``refit``, the fit on all rows started
        from it (to ``min(tol, refit_tol)``, or ``refit_gap_tol`` where the end
        game is linear), else ``best_estimator`` is None.

        Returns
        -------
        tuple
        """
        mean = fold_coefs.mean(axis=0)
        if self.fit_intercept:
            coef, intercept = mean[:, :-1], mean[:, -1]
        else:
            coef, intercept = mean, np.zeros(mean.shape[0], dtype=mean.dtype)
        if not self.refit:
            return coef, intercept, None
        best_estimator = self._base_estimator(C, tol=min(self.tol, get_tuning().refit_tol))
        init = (coef, intercept if self.fit_intercept else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the fold fits already warned
            # X, y and sample_weight: this fit's
            refit = SearchFit(gap_tol=get_tuning().refit_gap_tol, validated=True)
            for _ in best_estimator._fit_path(X, y, sample_weight, [1.0 / C], init=init, search=refit):
                pass
        return best_estimator.coef_, best_estimator.intercept_, best_estimator

    def score(self, X, y, sample_weight=None, **score_params):
        """Return the search's ``scoring`` of the model on ``X``, ``y`` (accuracy when None).

        As ``LogisticRegressionCV.score``: the score the search maximised, so
        that it and a held-out evaluation agree.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Features.
        y : array-like of shape (n_samples,)
            True labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Passed to the scorer when given (with metadata routing, when it
            requests it).
        **score_params : dict
            Only with metadata routing: further metadata for the scorer.

        Returns
        -------
        float
            The scorer's value.
        """
        _raise_for_params(score_params, self, "score")
        if sample_weight is not None:
            score_params["sample_weight"] = sample_weight
        if self.scoring is None and not score_params.keys() - {"sample_weight"}:
            # accuracy: check_scoring would pass it back to this method
            return super().score(X, y, sample_weight=score_params.get("sample_weight"))
        check_is_fitted(self)
        if _routing_enabled():
            score_params = process_routing(self, "score", **score_params).scorer.score
        return self._get_scorer()(self, X, y, **score_params)

    def _logits_map(self, X):
        X = fitted_features(self, X)
        coef, intercept = (
            torch.as_tensor(a, dtype=X.dtype, device=X.device) for a in (self.coef_, self.intercept_)
        )
        return X, lambda rows: rows @ coef.T + intercept


def _scorer_given_every_class(scorer, classes):
    """Return ``scorer`` with ``labels=classes`` where its metric takes them, as LogisticRegressionCV does.

    A fold's validation rows may lack a class; a metric of probabilities
    (log loss, Brier score) then cannot tell which of ``predict_proba``'s
    columns its labels are, and one that averages over classes would leave
    the absent one out. Binary metrics also get ``pos_label`` (the second
    class). The scorer's own arguments take precedence.

    Returns
    -------
    callable
        The scorer, or a copy that passes ``labels`` (and ``pos_label``).
    """
    metric = getattr(scorer, "_score_func", None)
    parameters = inspect.signature(metric).parameters if metric is not None else {}
    if "labels" not in parameters:
        return scorer
    given = {"labels": classes}
    if len(classes) <= 2 and "pos_label" in parameters:
        given["pos_label"] = classes[-1]
    return make_scorer(
        metric, greater_is_better=scorer._sign == 1, response_method=scorer._response_method,
        **(given | getattr(scorer, "_kwargs", {})),
    )  # fmt: skip


def _worker_threads(n_jobs):
    """Threads per joblib worker: the cores shared between ``n_jobs`` workers, within the limits in force.

    An enclosing ``threadpool_limits`` (or torch's own thread count) caps
    them too: a search never runs more threads than its caller allowed.

    Returns
    -------
    int
    """
    return max(1, min((os.cpu_count() or 1) // max(1, n_jobs), thread_limit()))


@dataclasses.dataclass(frozen=True)
class _SearchRows:
    """The rows a search validated once for all its folds, and every class of them.

    Every fold fits all ``classes`` (a fold may lack some).
    """

    X: object
    y: np.ndarray
    sample_weight: np.ndarray
    classes: np.ndarray


def _fit_fold_path(estimator, rows, fold, Cs, scoring, threads, concurrent=1):
    """Fit ``estimator`` along ``Cs`` on the fold's training rows; score each on its test rows.

    ``rows``: the search's :class:`_SearchRows`; ``fold``: ``(train, test)``
    indices into them. ``scoring``: the scorer and its metadata on the test
    rows. ``threads``: the worker's thread limit; ``concurrent``: how many
    folds are fitted at once (they share the device's memory).

    Returns
    -------
    scores : list of float
    coefs : list of ndarray
        ``coef_`` with ``intercept_`` appended as a last column, per ``C``.
    n_iter : list of int
    """
    scores, coefs, n_iter = [], [], []
    scorer, score_params = scoring
    estimator = clone(estimator)
    X, classes, (train, test) = rows.X, rows.classes, fold
    y_train, y_test, w_train = rows.y[train], rows.y[test], rows.sample_weight[train]
    if is_tensor(X):  # index on the tensor's device
        train, test = (torch.from_numpy(i).to(X.device) for i in (train, test))
    # Numpy predictions whatever the dispatch: the scorer compares them with numpy labels.
    with threadpool_limits(threads), warnings.catch_warnings(), config_context(array_api_dispatch=False):
        warnings.simplefilter("ignore", ConvergenceWarning)  # short paths on purpose; the refit warns
        large = _work(X, train, y_train) >= get_tuning().path_large_work
        X_train = _path_features(X[train], estimator.tol) if large else X[train]
        # the rows of what the search validated (X_train perhaps cast to float32)
        search = SearchFit(
            gap_tol=estimator.tol, scored_only=large, classes=classes, validated=True, concurrent=concurrent
        )
        for state in estimator._fit_path(X_train, y_train, w_train, 1.0 / Cs, search=search):
            scores.append(float(scorer(estimator, X[test], y_test, **score_params)))
            coef = estimator.coef_
            if estimator.fit_intercept:
                coef = np.hstack([coef, estimator.intercept_[:, None]])
            coefs.append(coef.astype(numpy_dtype(X.dtype), copy=False))
            n_iter.append(state.n_iter)
    return scores, coefs, n_iter


def _work(X, train, y_train):
    """Return a fold's rows x features x classes: the size of one logits product."""
    return len(train) * X.shape[1] * len(np.unique(y_train))


def _path_features(X, tol):
    """Return a large fold's training rows for its path fits: float64 rows in float32 where that pays.

    From ``tol >= path_float32_min_tol`` on, and when every value is finite
    in float32; otherwise ``X`` itself. Cost: one cast of the fold's rows.

    Returns
    -------
    ndarray or Tensor
        ``X`` or its float32 copy.
    """
    if tol < get_tuning().path_float32_min_tol:
        return X
    if is_tensor(X):
        if X.dtype != torch.float64:
            return X
        low = X.float()
        return low if bool(torch.isfinite(low).all()) else X
    if X.dtype != np.float64:
        return X
    with np.errstate(over="ignore"):  # values beyond float32's range keep float64
        low = X.astype(np.float32)
    return low if np.isfinite(low).all() else X
