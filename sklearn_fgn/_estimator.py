"""FGNClassifier: the scikit-learn estimator around the FGN kernels."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import warnings
from dataclasses import replace
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController

try:  # scikit-learn >= 1.9: the callback protocol (set_callbacks, ProgressBar, ScoringMonitor)
    from sklearn.callback import CallbackSupportMixin
except ImportError:  # older releases have no callbacks to support

    class CallbackSupportMixin:  # noqa: D101
        pass


from ._arrays import (
    as_output,
    check_features,
    check_training_data,
    is_memory_mapped,
    is_tensor,
    nbytes,
    numpy_dtype,
    random_access,
)
from ._batches import RowSubset, Shard, TrainingData
from ._damping import DAMPING_BOUNDS, DAMPING_SCHEDULES
from ._distributed import SINGLE, Communicator, communicator
from ._heads import ACTIVATIONS, Head, forward, init_params
from ._metric import (
    feature_moments,
    feature_standardization,
    is_diagonal_metric,
    make_feature_metric,
    standardized_first_layer,
    unwhitened_params,
    whitened_params,
)
from ._solver import LoopConfig, LoopState, run_epochs
from ._step import SOLVERS
from ._stepper import CURVATURE_OPTIONS

__all__ = ["FGNClassifier"]

# scikit-learn 1.9 weighs "balanced" classes by their sample-weighted frequency.
_CLASS_WEIGHT_TAKES_SAMPLE_WEIGHT = "sample_weight" in inspect.signature(compute_class_weight).parameters

DAMPING_METRICS = ("auto", "features", "identity")

# batch_size="auto": full batch while n_samples * n_logits stays below this
# (the full-GGN step keeps a few (n, K) arrays), else AUTO_BATCH_SIZE rows:
# with the damping as step size, progress per epoch grows with the steps per
# epoch until the per-step overheads dominate. MLP heads also need n_samples
# <= AUTO_MLP_FULL_BATCH_MAX_SAMPLES: full-batch MLP fits run many near-Newton
# steps on a nonconvex objective for no better accuracy. The measurements
# behind these values are in benchmarks/RESULTS.md ("Design measurements").
AUTO_FULL_BATCH_MAX_ENTRIES = 2**24
AUTO_BATCH_SIZE = 512
# early_stopping="auto" holds out at most this many rows (or two per class).
AUTO_VALIDATION_ROWS = 2048
AUTO_MLP_FULL_BATCH_MAX_SAMPLES = 8192
# Rows whose logits the predict methods compute at once.
PREDICT_CHUNK_ROWS = 2**15
# ... and at most about this many logits (16 MiB in float32): many classes, fewer rows.
PREDICT_CHUNK_LOGITS = 2**22
# On a GPU a linear head fits full batch wherever its arrays take at most
# this share of the device's memory (see ``_full_batch_fits``).
AUTO_GPU_FULL_BATCH_ARRAYS = 12
AUTO_GPU_MEMORY_SHARE = 0.5


class _LogitsPredictionMixin:
    """``decision_function``, ``predict_log_proba``, ``predict_proba`` and ``predict`` from ``_logits_map``.

    ``_logits_map(X)`` checks that the estimator is fitted, validates ``X``
    and returns it as a tensor (on its device when it was one) with the map
    from rows of it to their logits, shape (rows, n_logits) (one column for
    a binary problem). The methods apply it ``PREDICT_CHUNK_ROWS`` rows (fewer
    with many classes: ``PREDICT_CHUNK_LOGITS`` logits) at a
    time, so that their temporaries (and ``predict``'s logits) take memory
    in proportion to a chunk, not to ``X``.
    """

    def decision_function(self, X):
        """Logits (``raw_prediction``) of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_classes)
            The single logit of the positive class for binary problems.
        """
        logits = torch.cat(list(self._logit_chunks(X)))
        return as_output(logits[:, 0] if logits.shape[1] == 1 else logits, X)

    def predict_log_proba(self, X):
        """Log class probabilities, from ``log_softmax`` (``logsigmoid`` for binary).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Log-probabilities in the order of ``classes_``.
        """
        return as_output(self._log_proba(X), X)

    def predict_proba(self, X):
        """Class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Probabilities in the order of ``classes_``.
        """
        return as_output(self._log_proba(X).exp(), X)

    def predict(self, X):
        """Predicted class labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        index = torch.cat(
            [(z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1) for z in self._logit_chunks(X)]
        )
        return as_output(self.classes_[index.cpu().numpy()], X)

    def _log_proba(self, X):
        return torch.cat([_log_softmax(z) for z in self._logit_chunks(X)])

    def _logit_chunks(self, X):
        """Validate ``X`` once; yield the logits of a chunk of rows at a time (see the class docstring)."""
        X, logits_of = self._logits_map(X)
        rows = max(1, min(PREDICT_CHUNK_ROWS, PREDICT_CHUNK_LOGITS // max(len(self.classes_), 1)))
        with torch.no_grad(), _device_memory_hint("predict", None):
            for start in range(0, X.shape[0], rows):
                yield logits_of(X[start : start + rows])


def _log_softmax(logits):
    """Log class probabilities from logits; a single logit is the positive class's against 0."""
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    return torch.log_softmax(logits, dim=1)


class FGNClassifier(_LogitsPredictionMixin, CallbackSupportMixin, ClassifierMixin, BaseEstimator):
    r"""Multinomial logistic or MLP classifier head fitted by Fast Gauss-Newton steps.

    Each step solves a damped Gauss-Newton system with one row per example of
    the (mini-)batch, matrix-free by conjugate gradient or exactly by a
    Cholesky factorisation of the row-space Gram, in PyTorch on CPU or GPU.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int or int, default=()
        ``()`` fits multinomial logistic regression (a linear probe);
        ``(64,)`` (or ``64``) an MLP head with one hidden layer of 64 units.
    activation : {"relu", "tanh", "logistic", "gelu", "identity"}, default="relu"
        Hidden-layer activation (MLP head only).
    alpha : float, default=1.0
        Strength of the L2 penalty on the weights (not on intercepts):
        ``alpha / 2 * ||W||^2`` added to the summed, sample-weighted loss,
        so ``alpha = 1 / C`` gives the objective of ``LogisticRegression(C=C)``
        (same sample weights) for every number of samples, and an MLP head's
        ``alpha`` means what ``MLPClassifier``'s does. The default is
        ``LogisticRegression()``'s ``C = 1``; ``MLPClassifier``'s default
        (1e-4) is ten thousand times weaker.
    damping : float, default=1.0
        The damping ``lambda`` of the step ``(G + Lambda) delta = -grad``;
        the initial value when ``damping_schedule="adaptive"``.
    damping_schedule : {"adaptive", "constant"}, default="adaptive"
        ``"constant"`` applies every step as computed with fixed ``damping``
        (unit step, no line search). ``"adaptive"`` adapts ``damping`` by the
        Levenberg-Marquardt reduction ratio: ``/10`` above 0.75 (``/100``
        within 2 % of 1), ``*2`` below 0.25, within [1e-8, 1e8]; a step that
        raises the (batch) loss is cut back by Armijo backtracking, and
        discarded only if that fails. In full batch a trusted step is also
        lengthened to the quadratic model's minimiser along it when the
        objective confirms it there (and ``damping`` shrinks by the same
        factor): the first step from a large ``damping`` is not wasted. For
        the linear head these trial points cost no extra pass over the data.
        With mini-batches ``damping`` is also its floor: an exact step on a
        batch with fewer rows than parameters always lowers that batch's loss,
        so the ratio cannot see a step that memorises the batch, and
        ``damping`` acts as a step size there.
    damping_metric : {"auto", "features", "identity"}, default="auto"
        The metric in which ``damping`` is measured. ``"features"``:
        ``lambda (I_K kron A)`` on a linear layer, with ``A`` the (weighted)
        second moment of its inputs; the fit then runs on whitened features
        (``(x - mean) @ T`` with ``T^T A T = I``, computed once per fit, exact
        up to 2048 features and per-feature standardisation beyond), so that a
        step does not change when the features are rescaled or rotated, and
        one ``damping`` serves raw, L2-normalised and standardised features
        alike. ``"identity"``: ``lambda I`` on the raw parameters. ``"auto"``:
        ``"features"`` for the linear head, ``"identity"`` for MLP heads
        (whose first layer is initialised for standardised inputs either way).
    curvature : {"auto", "fgn", "ggn"}, default="auto"
        ``"fgn"`` keeps each example's true-vs-rest curvature (one row per
        example); ``"ggn"`` the full softmax Gauss-Newton matrix (exact Newton
        for the linear head). ``"auto"`` uses FGN on mini-batches and for
        binary heads (where FGN is exact Gauss-Newton), and the full GGN for
        multiclass full-batch fits, where FGN steps converge only linearly
        once the competitor mass is dispersed.
    solver : {"auto", "cg", "cholesky"}, default="auto"
        Inner solver. ``"cg"``: conjugate gradient preconditioned by the
        damping; full-batch steps of the linear head in the feature metric
        by the exact FGN solve on the rows of largest curvature when those
        carry a quarter of it (weak regularisation), otherwise by a model
        of the curvature: up to 256 logits the class-means model, which
        keeps that a class's own fitted rows carry little of its logit's
        curvature (the Kronecker model, used beyond, spreads it over every
        row); on float64 features those full-batch
        steps run CG's curvature products in float32 while their tolerance
        is loose (1e-4 or more), measure the residual in float64 and finish
        in float64 if float32 fell short, so the fit reaches the float64
        optimum at a fraction of the cost per product. ``"cholesky"``: the
        exact FGN step from a Cholesky factorisation of the ``n x n`` row-space Gram (cost independent of the
        number of parameters), used as the preconditioner of CG, so FGN steps
        take one CG iteration and full-GGN steps are FGN-preconditioned.
        ``"auto"``: ``"cholesky"`` up to 4096 rows when forming the Gram costs
        less than about 20 CG iterations, ``"cg"`` otherwise (and when the
        factorisation fails, as it can for badly scaled float32 features;
        an explicit ``"cholesky"`` warns then).
    batch_size : int, "auto" or None, default="auto"
        ``None`` is full batch. ``"auto"``: full batch while
        ``n_samples * n_classes <= 2**24`` (about 16.7 million logits; for
        MLP heads also ``n_samples <= 8192``), else 512. On a CUDA device a
        linear head fits full batch wherever about 12 ``(n_samples,
        n_classes)`` arrays and ``X`` take at most half the device's memory:
        small steps there are bound by kernel launches, not arithmetic. Full
        batch converges to the optimum in a few Newton steps; mini-batches
        make progress from the first epoch on data too large for that. A
        memory-mapped ``X`` (``np.memmap`` or a view of one) is read in
        batches of 512 rows and never copied whole: pass ``np.asarray(X)``
        to fit it full batch in memory.
    max_iter : int, default=100
        Steps in full batch, epochs otherwise. 0 takes none: the model is its
        initial point (zero coefficients for the linear head, unless
        ``coef_init`` or a warm start gives others), as ``LogisticRegression``.
    tol : float, default=1e-4
        Full batch: stop when a trusted step predicts a decrease below
        ``tol`` times the loss. Otherwise stop when the training loss (or the
        validation score with ``early_stopping``) has not improved by ``tol``
        for ``n_iter_no_change`` consecutive epochs.
    n_iter_no_change : int or np.inf, default=5
        See ``tol``. Fewer epochs of patience end most fits sooner with the
        same best epoch, but cut short the fits whose held-out accuracy
        dips after the first epochs and then climbs slowly for dozens of
        epochs (many classes, few samples each); benchmarks/RESULTS.md
        compares patiences on several probe shapes.
    early_stopping : bool or "auto", default="auto"
        Hold out ``validation_fraction`` of the training data (stratified
        when every class can give it a sample, at random otherwise) and stop
        on its accuracy, weighted by the sample (and class) weights; the best
        parameters are kept. ``"auto"`` does so for mini-batch fits (when
        every class can give the validation split a sample), holding out at
        most 2048 rows (or two per class): that many rank epochs as well as a
        tenth of a large data set, and the rest are worth more as training
        data. It never holds out in full batch, which converges to the exact
        optimum of the regularised objective: mini-batch epochs keep lowering
        the training loss long after the held-out accuracy has peaked.
    validation_fraction : float, default=0.1
        Share held out with ``early_stopping``.
    cg_max_iter : int or "auto", default="auto"
        Conjugate-gradient iterations per step at most. ``"auto"``: 100 on
        mini-batches, 1000 in full batch, where ``cg_tol="auto"`` ends the
        solve: a capped solve makes a truncated Newton step, and a weakly
        regularised end game then converges only linearly.
    cg_tol : float in [0, 1) or "auto", default="auto"
        Relative residual at which CG stops (0: run ``cg_max_iter``). ``"auto"``: 1e-2 on
        mini-batches (a batch's step is noisy anyway); in full batch the
        inexact-Newton forcing term ``min(0.5, sqrt(predicted relative
        decrease of the last step))``, loose far from the optimum and tight
        near it.
    fit_intercept : bool, default=True
        Whether the layers have (unpenalised) biases.
    class_weight : dict, "balanced" or None, default=None
        Multiplies ``sample_weight`` per class, as in ``LogisticRegression``.
    warm_start : bool, default=False
        Reuse the previous solution (and damping) as the initialisation.
    device : str or torch.device, default="auto"
        ``"auto"`` picks CUDA when available, else CPU.
    distributed : bool, default=False
        Fit data-parallel over the default ``torch.distributed`` process
        group (``init_process_group``; ``torchrun`` sets it up): every rank
        calls ``fit`` (or ``partial_fit``) with its own shard of the rows,
        in rank order, and all end with the model one process fits on the
        concatenated rows (up to the order of float sums; the curvature
        sample of a large full-batch fit is the one a single process draws).
        Sums over rows
        (loss, gradient, feature moments, each CG curvature product) are
        all-reduced, one ``n_params``-sized all-reduce per CG iteration;
        labels and weights are gathered once, so the classes, validation
        split and batches are the single process's; ``batch_size="auto"``
        weighs the rows of the largest shard (what one device computes on).
        The Gram-Cholesky solver is not used. Use a backend for the device (NCCL on CUDA,
        gloo on CPU); a rank whose data fail validation makes every rank
        raise, and a rank that fails or is interrupted later re-raises and
        makes the others raise ``DistributedFitError`` (a ``RuntimeError``
        that names it): on gloo within about half a second, through the
        group's store, even when the failed rank stays alive; on NCCL when
        their next collective fails or times out. See
        ``examples/distributed_probe.py``.
    random_state : int, RandomState instance or None, default=None
        Seeds the MLP initialisation, shuffling and the validation split.
    verbose : int, default=0
        ``>0`` prints one line per iteration (loss, damping, CG iterations, seconds).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    coef_ : ndarray of shape (1, n_features) or (n_classes, n_features)
        Weights of the linear head (one row for a binary problem).
    intercept_ : ndarray of shape (1,) or (n_classes,)
        Intercepts of the linear head.
    coefs_ : list of ndarray
        MLP head: weight matrices, ``coefs_[i]`` of shape (fan_in, fan_out).
    intercepts_ : list of ndarray
        MLP head: bias vectors.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Feature names, when ``X`` has string column names.
    n_iter_ : int
        Iterations (steps in full batch, epochs otherwise) run by the last
        ``fit`` (a warm start counts its own, as ``MLPClassifier``), or by
        every ``partial_fit`` call so far. An int for both heads, as
        ``MLPClassifier``'s (``LogisticRegression``'s is an array of shape
        ``(1,)``, one entry per one-vs-rest problem, which a multinomial
        fit does not have).
    loss_curve_ : list of float
        Training objective after each iteration (mean batch loss per epoch
        with mini-batches).
    best_loss_ : float or None
        Lowest value of ``loss_curve_``; None under early stopping, where the
        validation score decides (as ``MLPClassifier``).
    validation_scores_ : list of float or None
        Held-out accuracy per iteration under early stopping, else None.
    best_validation_score_ : float or None
        Best of ``validation_scores_`` (the parameters kept are from that
        iteration), None without early stopping.
    t_ : int
        Training samples seen.
    damping_ : float
        The damping at the end of the fit.

    See Also
    --------
    sklearn.linear_model.LogisticRegression : Exact multinomial logistic regression on CPU.
    sklearn.neural_network.MLPClassifier : MLP classifier trained by first-order methods or L-BFGS.

    Notes
    -----
    With sample weights ``s_i`` (times class weights; all ones without
    them) the objective is

    .. math::

        L(\theta) = \frac{1}{\sum_i s_i} \Big(\sum_i s_i \,
                    \mathrm{CE}(f(x_i; \theta), y_i)
                    + \frac{\alpha}{2} \sum_l \|W_l\|_F^2\Big),

    intercepts not penalised: for the linear head this is
    ``LogisticRegression(C=1 / alpha)`` with the same sample weights, whose
    optimum a full-batch fit reaches. A mini-batch ``B`` estimates it
    without bias: its rows weigh ``s_i / (|B| mean(s))`` and the penalty is
    ``alpha / (2 sum(s))`` (``sum(s)`` over the rows the fit trains on; for
    ``partial_fit``, over the rows of the call).

    FGN replaces the softmax Hessian ``diag(p) - p p^T`` of each example by
    its true-vs-rest part ``w a a^T`` (``a = e_y - q``, ``q`` the softmax over
    the competitors, ``w = p_y (1 - p_y)``), which is exact for binary problems
    and makes the damped system ``n x n`` for ``n`` examples per batch.

    References
    ----------
    .. [1] M. Zanon and M. Korbit, "Fast Gauss-Newton for Multiclass
       Cross-Entropy", arXiv:2605.06081, 2026.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn_fgn import FGNClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = FGNClassifier(device="cpu").fit(X, y)
    >>> clf.predict(X[:3])
    array([0, 0, 0])
    >>> round(clf.score(X, y), 2)  # LogisticRegression() finds the same optimum
    0.97
    """

    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "damping": [Interval(Real, 0, None, closed="neither")],
        "damping_schedule": [StrOptions(set(DAMPING_SCHEDULES))],
        "damping_metric": [StrOptions(set(DAMPING_METRICS))],
        "curvature": [StrOptions(set(CURVATURE_OPTIONS))],
        "solver": [StrOptions(set(SOLVERS))],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"), Options(Real, {np.inf})],
        "early_stopping": ["boolean", StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "cg_max_iter": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "cg_tol": [Interval(Real, 0, 1, closed="left"), StrOptions({"auto"})],
        "fit_intercept": ["boolean"],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "warm_start": ["boolean"],
        "device": [str, torch.device],
        "distributed": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        hidden_layer_sizes=(),
        activation="relu",
        alpha=1.0,
        damping=1.0,
        damping_schedule="adaptive",
        damping_metric="auto",
        curvature="auto",
        solver="auto",
        batch_size="auto",
        max_iter=100,
        tol=1e-4,
        n_iter_no_change=5,
        early_stopping="auto",
        validation_fraction=0.1,
        cg_max_iter="auto",
        cg_tol="auto",
        fit_intercept=True,
        class_weight=None,
        warm_start=False,
        device="auto",
        distributed=False,
        random_state=None,
        verbose=0,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.alpha = alpha
        self.damping = damping
        self.damping_schedule = damping_schedule
        self.damping_metric = damping_metric
        self.curvature = curvature
        self.solver = solver
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.cg_max_iter = cg_max_iter
        self.cg_tol = cg_tol
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.warm_start = warm_start
        self.device = device
        self.distributed = distributed
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, coef_init=None, intercept_init=None):
        """Fit the head on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features (float32 input is computed in float32).
        y : array-like of shape (n_samples,)
            Class labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative per-sample weights. A mini-batch divides its weights
            by its size times the mean weight of the training data, so its
            objective is an unbiased estimate of the whole objective.
        coef_init : array-like of shape (n_classes, n_features) or (1, n_features), default=None
            Initial weights of the linear head (one row for binary problems).
        intercept_init : array-like of shape (n_classes,) or (1,), default=None
            Initial intercepts of the linear head.

        Returns
        -------
        self : FGNClassifier
            The fitted estimator.
        """
        with _restored_on_error(self), communicator(self.distributed).fit_scope():
            previous = getattr(self, "classes_", None) if hasattr(self, "damping_") else None
            X, y_enc, sample_weight, head, layout = self._setup_fit(X, y, sample_weight)
            resumed = None
            if self.warm_start and coef_init is None and intercept_init is None:
                _check_same_classes(previous, self.classes_)
                resumed = self._resume_state(head, numpy_dtype(X.dtype))
            start = 0 if resumed is None else resumed.n_iter
            drawn = resumed is None and coef_init is None and intercept_init is None
            state = resumed or LoopState(
                self._initial_params(head, numpy_dtype(X.dtype), coef_init, intercept_init),
                float(self.damping),
            )
            early_stopping = self._resolve_early_stopping(y_enc, head, X, layout)
            state, (class_weighted, data, _) = self._train(
                head, state, X, y_enc, sample_weight, early_stopping, None, drawn, layout=layout
            )
            self.n_iter_ = state.n_iter - start  # this fit's own, as MLPClassifier
        _warn_if_nothing_learned(head, state, y_enc, class_weighted, float(self.alpha) / data.weight_total)
        if not (state.converged or state.stopped):
            warnings.warn(
                f"FGNClassifier stopped at max_iter={self.max_iter} before converging; "
                "increase max_iter or tol.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Run one iteration (one epoch, or one step in full batch) on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features.
        y : array-like of shape (n_samples,)
            Class labels.
        classes : array-like of shape (n_classes,), default=None
            All classes; required on the first call.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative per-sample weights. Each call is one epoch on the
            objective of its own rows (see Notes): the penalty is divided by
            their total weight, as ``fit`` divides it by that of all rows.

        Returns
        -------
        self : FGNClassifier
            The updated estimator.

        Raises
        ------
        ValueError
            If ``classes`` is missing on the first call or changes later, or
            ``y`` has labels outside it.
        """
        comm = communicator(self.distributed)
        with _restored_on_error(self), comm.fit_scope():
            first = not hasattr(self, "classes_")
            with _agreed(comm):  # every rank raises if one's data fail validation
                X, y, sample_weight = self._validate_training_data(X, y, sample_weight, reset=first)
                hidden = self._check_params()
                self._check_partial_fit_params(classes)
            settings = (_shared_settings(self), None if classes is None else np.unique(np.asarray(classes)))
            y, sample_weight, layout = _gathered_rows(comm, X, y, sample_weight, settings)
            if first:
                if classes is None:
                    raise ValueError("classes must be passed on the first call to partial_fit.")
                self.classes_ = np.unique(np.asarray(classes))
                self._check_classes()
                self._rng = np.random.RandomState(_agreed_seed(comm, self.random_state))
            elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
                raise ValueError(
                    f"classes={classes!r} differs from classes_={self.classes_!r} of the first call."
                )
            unseen = np.setdiff1d(np.unique(y), self.classes_)
            if unseen.size:
                raise ValueError(f"y contains labels not in classes: {unseen!r}")
            head = self._make_head(hidden, X.shape[1])
            dtype = numpy_dtype(X.dtype)
            state = self._resume_state(head, dtype) if not first else None
            drawn = state is None
            state = state or LoopState(self._initial_params(head, dtype, None, None), float(self.damping))
            y_enc = np.searchsorted(self.classes_, y)
            self._train(head, state, X, y_enc, sample_weight, False, 1, drawn, layout=layout)

        return self

    def _fit_path(self, X, y, sample_weight, alphas, gap_tol=None, init=None, scored=False, classes=None):
        """Fit at each of ``alphas`` in turn, each fit starting from the previous solution.

        What does not depend on ``alpha`` is done once: validation, the
        tensors on the device, the validation split, the feature metric and
        its eigendecomposition; in full batch each fit starts from the last
        one's parameters in the fit's coordinates and their logits (no
        forward pass, no change of coordinates). Yields after each fit, with
        the fitted attributes of that ``alpha`` set (a generator: the caller
        scores them). Used by :class:`FGNClassifierCV`. ``gap_tol``: full-batch
        fits whose end game converges only linearly stop at that estimated
        relative gap (see ``LoopConfig``) instead of running to Newton's rate.
        ``init``: ``(coef_init, intercept_init)`` of the first fit (else drawn).
        ``scored``: the fits are only scored (a fold of FGNClassifierCV) and
        need a gap of ``gap_tol`` and no more (``LoopConfig.null_loss``).
        ``classes``: every class of the search, a superset of ``y``'s (a
        fold may lack a rare class: its logits are fitted with no rows, as
        ``LogisticRegressionCV`` does, so every fold has the same classes).

        Yields
        ------
        LoopState
            The state of the fit at that ``alpha``.
        """
        X, y_enc, sample_weight, head, layout = self._setup_fit(X, y, sample_weight, classes)
        init = (None, None) if init is None else init
        state = LoopState(self._initial_params(head, numpy_dtype(X.dtype), *init), float(self.damping))
        early_stopping, prepared = self._resolve_early_stopping(y_enc, head, X, layout), None
        for i, alpha in enumerate(alphas):
            self.alpha = float(alpha)
            # the same rows: the last fit's parameters in its coordinates and their logits
            state = LoopState(state.params, state.damping, logits=state.logits, fit_params=state.fit_params,
                              step_cache=state.step_cache)  # fmt: skip
            state, prepared = self._train(
                head, state, X, y_enc, sample_weight, early_stopping, None, i == 0, prepared, gap_tol, layout,
                scored,
            )  # fmt: skip
            yield state

    # -------------------------------------------------------------- helpers
    def _setup_fit(self, X, y, sample_weight, classes=None):
        """Validate the data and settings; set ``classes_``; return what a fit needs.

        With ``distributed``, ``X`` is this rank's shard and ``y_enc`` and
        ``sample_weight`` are every rank's, concatenated in rank order.

        Returns
        -------
        tuple
            ``(X, y_enc, sample_weight, head, layout)``; ``layout`` is None
            in a single process, else a :class:`_RowLayout`.
        """
        comm = communicator(self.distributed)
        with _agreed(comm):  # every rank raises if one's data fail validation
            X, y, sample_weight = self._validate_training_data(X, y, sample_weight, reset=True)
            hidden = self._check_params()
        y, sample_weight, layout = _gathered_rows(comm, X, y, sample_weight, _shared_settings(self))
        if classes is None:
            self.classes_, y_enc = np.unique(y, return_inverse=True)
        else:  # a superset of y's labels, sorted (FGNClassifierCV's folds)
            self.classes_, y_enc = classes, np.searchsorted(classes, y)
        self._check_classes()
        self._rng = np.random.RandomState(_agreed_seed(comm, self.random_state))
        return X, y_enc, sample_weight, self._make_head(hidden, X.shape[1]), layout

    def _check_partial_fit_params(self, classes):
        if self.early_stopping is True:
            raise ValueError("partial_fit does not support early_stopping=True (it runs one epoch).")
        if isinstance(self.class_weight, str):  # "balanced" of one chunk is not of the data
            raise ValueError(
                "class_weight='balanced' is not supported by partial_fit: compute the weights on the "
                "whole data (sklearn.utils.class_weight.compute_class_weight) and pass them as a dict."
            )
        if classes is None:
            return
        classes = np.asarray(classes)
        if classes.ndim != 1 or classes.size == 0:
            raise ValueError(f"classes must be a non-empty 1-D array of labels; got shape {classes.shape}.")
        if classes.dtype.kind == "f" and np.isnan(classes).any():
            raise ValueError("classes contains NaN.")

    def _validate_training_data(self, X, y, sample_weight, reset):
        return check_training_data(self, X, y, sample_weight, reset=reset)

    def _check_params(self):
        """Check the cross-parameter rules.

        Returns
        -------
        tuple of int
            The hidden layer sizes.

        Raises
        ------
        ValueError
            For hidden layer sizes that are not positive ints, or a device torch
            cannot use.
        """
        sizes = np.atleast_1d(np.asarray(self.hidden_layer_sizes, dtype=object))
        if sizes.ndim != 1 or not all(
            isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in sizes
        ):
            raise ValueError(
                f"hidden_layer_sizes must be a tuple of positive ints; got {self.hidden_layer_sizes!r}."
            )
        _resolve_device(self.device)
        return tuple(int(s) for s in sizes)

    def _check_classes(self):
        if len(self.classes_) < 2:
            raise ValueError(
                f"This solver needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {self.classes_[0]!r}."
            )

    def _make_head(self, hidden, n_features):
        n_logits = 1 if len(self.classes_) == 2 else len(self.classes_)
        return Head(n_features, n_logits, hidden, self.activation, bool(self.fit_intercept))

    def _initial_params(self, head, dtype, coef_init, intercept_init):
        generator = torch.Generator().manual_seed(int(self._rng.randint(np.iinfo(np.int32).max)))
        params = init_params(head, generator, _torch_dtype(dtype), "cpu")
        return _apply_linear_init(head, params, coef_init, intercept_init)

    def _resume_state(self, head, dtype):
        params = self._params_from_attributes(head, dtype)
        if params is None:
            return None
        best_loss = math.inf if self.best_loss_ is None else self.best_loss_
        return LoopState(
            params, self.damping_, self.n_iter_, self.t_, list(self.loss_curve_),
            list(self.validation_scores_ or []), best_loss, no_improvement_count=self._no_improvement_count,
        )  # fmt: skip

    def _params_from_attributes(self, head, dtype):
        """Parameters of a previous fit as CPU tensors, or None if they do not fit ``head``."""
        if not hasattr(self, "damping_") or self._head != head:
            return None
        if head.is_linear:
            weights, biases = [self.coef_], [self.intercept_]
        else:
            weights, biases = [w.T for w in self.coefs_], list(self.intercepts_)
        params = {}
        for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
            params[f"coef_{layer}"] = torch.tensor(np.asarray(weight, dtype=dtype))
            if head.fit_intercept:
                params[f"intercept_{layer}"] = torch.tensor(np.asarray(bias, dtype=dtype))
        return params

    def _train(
        self, head, state, X, y_enc, sample_weight, early_stopping, n_epochs, drawn=False, prepared=None,
        gap_tol=None, layout=None, scored=False,
    ):  # fmt: skip
        """Run the loop on ``state`` and store the fitted attributes.

        ``drawn``: ``state.params`` come from :func:`init_params`; an MLP's
        first layer is then rescaled to the features' spread
        (:func:`standardized_first_layer`). The parameters are mapped to the
        coordinates of the fit (whitened features in the feature metric) and
        back. ``prepared``: the :meth:`_prepare` of an earlier call on the same
        data (a regularisation path), or None to prepare here. ``layout``:
        ``X`` is one rank's shard of a data-parallel fit (``y_enc`` and
        ``sample_weight`` are all ranks'), see :meth:`_setup_fit`. ``scored``
        (with ``gap_tol``): see :meth:`_fit_path`.

        Returns
        -------
        state : LoopState
            The state after the loop, parameters in the features' coordinates.
        prepared : tuple
            What :meth:`_prepare` returned, for the next call on the same data.

        Raises
        ------
        KeyboardInterrupt
            In a search's fit (``gap_tol`` or ``scored``): the search stops at
            once. In a data-parallel fit: every rank's fit ends (the others
            raise :class:`._distributed.DistributedFitError`), where keeping
            the last parameters would leave ranks with different models. A
            single fit keeps its last accepted parameters and warns.
        """
        batch_size = self._resolve_batch_size(y_enc.shape[0], head, X, layout)  # as decided before any split
        comm = _comm_of(layout)
        with _device_memory_hint("fit", batch_size):
            prepared = prepared or self._prepare(X, y_enc, sample_weight, early_stopping, head, layout)
            sample_weight, data, metric = prepared
            null_loss = _null_loss(head, y_enc, sample_weight) if scored and gap_tol is not None else None
            cfg = LoopConfig(
                alpha=self._penalty_coefficients(head, metric, data), damping=float(self.damping),
                curvature=self.curvature, solver=self.solver, damping_schedule=self.damping_schedule,
                batch_size=batch_size, max_iter=self.max_iter, tol=float(self.tol),
                n_iter_no_change=self.n_iter_no_change, cg_tol=self.cg_tol, cg_max_iter=self.cg_max_iter,
                verbose=self.verbose, kronecker=metric is not None, gap_tol=gap_tol,
                null_loss=null_loss, comm=comm,
            )  # fmt: skip
            if state.fit_params is None:
                state.params = _to_fit_coordinates(
                    head, state.params, data, metric, drawn, comm, float(self.damping)
                )
            else:  # a path's previous fit on these rows, in these coordinates
                state.params, state.fit_params = state.fit_params, None
            generator = torch.Generator().manual_seed(int(self._rng.randint(np.iinfo(np.int32).max)))
            mine = slice(None) if layout is None else slice(layout.offset, layout.offset + X.shape[0])
            y_labels, max_subtasks = self.classes_[y_enc[mine]], n_epochs or self.max_iter
            to_features = functools.partial(_in_feature_coordinates, metric)
            events = _EpochCallbacks(self, head, X, y_labels, sample_weight[mine], max_subtasks, to_features)
            mini_batch = batch_size is not None and batch_size < data.n_total
            with _torch_threads_like_threadpools(), random_access(X if mini_batch else None):
                try:
                    state = run_epochs(head, state, data, cfg, generator, n_epochs, events.begin, events.end)
                except KeyboardInterrupt:  # keep the last accepted parameters, as MLPClassifier does
                    if gap_tol is not None or scored or comm.distributed:  # a search's or the ranks' fit
                        raise
                    warnings.warn("Training interrupted by user.", stacklevel=4)
                    state.stopped = True
        if early_stopping and state.best_params is not None:
            state.params, state.logits = state.best_params, None
        state.fit_params = state.params if state.logits is not None else None
        state.params = to_features(state.params)
        self._store(head, state)
        events.close()
        return state, prepared

    def _prepare(self, X, y_enc, sample_weight, early_stopping, head, layout=None):
        """Class weights, the tensors and the feature metric: what a fit needs besides ``alpha``.

        Returns
        -------
        tuple
            ``(sample_weight, data, metric)``, see :meth:`_training_data`.
        """
        sample_weight = self._class_weighted(sample_weight, y_enc)
        return (sample_weight, *self._training_data(X, y_enc, sample_weight, early_stopping, head, layout))

    def _class_weighted(self, sample_weight, y_enc):
        """Return ``sample_weight`` times each row's class weight, as ``LogisticRegression`` computes it.

        ``"balanced"`` weighs class ``c`` by ``sum(s) / (n_classes sum_{y_i = c} s_i)``:
        its sample-weighted frequency where scikit-learn's ``compute_class_weight``
        takes ``sample_weight`` (1.9 and later), its count before. Classes
        absent from ``y`` (a fold of ``FGNClassifierCV``) get no weight to compute.

        Returns
        -------
        ndarray of shape (n_samples,)

        Raises
        ------
        ValueError
            When a class weight is negative or not finite, or the weights sum to zero.
        """
        if self.class_weight is not None:
            present = np.unique(y_enc)
            extra = {"sample_weight": sample_weight} if _CLASS_WEIGHT_TAKES_SAMPLE_WEIGHT else {}
            per_class = compute_class_weight(
                self.class_weight, classes=self.classes_[present], y=self.classes_[y_enc], **extra
            )
            if not np.all(np.isfinite(per_class)):
                raise ValueError(f"class_weight must be finite; got {self.class_weight!r}.")
            sample_weight = sample_weight * per_class[np.searchsorted(present, y_enc)]
            if np.any(sample_weight < 0):
                raise ValueError(f"class_weight must be non-negative; got {self.class_weight!r}.")
        if not sample_weight.sum() > 0:
            raise ValueError("sample_weight (times class_weight) sums to zero: there is nothing to fit.")
        return sample_weight

    def _penalty_coefficients(self, head, metric, data):
        """Return ``alpha / sum(s)`` for the loop (the penalty on the mean loss), per column when whitened.

        ``sum(s)`` is the total weight of the rows the fit trains on (their
        number without sample or class weights), so that ``alpha = 1 / C`` is
        ``LogisticRegression(C)``'s objective divided by ``sum(s)``.

        Returns
        -------
        float or dict
            See :func:`._curvature.penalty_coefficients`.
        """
        alpha = float(self.alpha) / data.weight_total
        if metric is None or alpha == 0.0:
            return alpha
        coefficients = dict.fromkeys((f"coef_{layer}" for layer in range(head.n_layers)), alpha)
        # alpha e in float64 (e alone may lie beyond float32's range, see FeatureMetric.to), then
        # capped at 1 / eps^2: a column with a larger coefficient keeps a whitened weight (about
        # gradient / coefficient) far below the dtype's rounding of the logits either way, and the
        # cap keeps the products of coefficients, weights and steps within the dtype's range.
        dtype = metric.mean.dtype
        cap = torch.finfo(dtype).eps ** -2
        coefficients["coef_0"] = (alpha * metric.penalty.double()).clamp_max(cap).to(dtype)
        return coefficients

    def _training_data(self, X, y_enc, sample_weight, early_stopping, head, layout=None):
        """Tensors for the loop, and the feature metric (None in the identity metric).

        With ``layout`` (a data-parallel fit) the split is drawn on all
        ranks' labels, as one process would, and each rank keeps the
        training and validation rows it holds (:class:`._solver.Shard`).

        Returns
        -------
        data : TrainingData
        metric : FeatureMetric or None
            In the data's dtype, on the compute device.
        """
        device = _resolve_device(self.device, X)
        X_t = _to_tensor(X, device, host=not _fits_on(device, nbytes(X)))
        offset = 0 if layout is None else layout.offset
        X_val = y_val = w_val = None
        train = np.arange(y_enc.shape[0])
        if early_stopping:  # the training rows stay in X: a RowSubset gathers them batch by batch
            train, val = self._validation_split(y_enc, sample_weight)
            local_val = _held_here(val, offset, X_t.shape[0])
            with random_access(X):  # scattered rows: no read-ahead around each on a memmap
                X_val = X_t[torch.from_numpy(local_val - offset).to(X_t.device)].to(device)
            y_val = _to_tensor(y_enc[local_val].astype(np.int64), device)
            w_val = None if np.all(sample_weight[val] == 1) else _to_tensor(sample_weight[local_val], device)
        positions = np.flatnonzero((train >= offset) & (train < offset + X_t.shape[0]))
        rows = train[positions]  # the training rows held here, in the order of the training set
        if early_stopping:
            X_t = RowSubset(X_t, torch.from_numpy(rows - offset))
        shard = None
        if layout is not None:
            shard = Shard(torch.from_numpy(positions), train.shape[0], float(sample_weight[train].sum()))
        weights = None if np.all(sample_weight[train] == 1) else _to_tensor(sample_weight[rows], X_t.device)
        y_t = _to_tensor(y_enc[rows].astype(np.int64), X_t.device)
        comm = _comm_of(layout)
        metric, transform = self._feature_metric(X_t, weights, head, device, comm), None
        batch_size = self._resolve_batch_size(train.shape[0], head, X, layout)
        full_batch = batch_size is None or batch_size >= train.shape[0]  # every step sees all rows
        if full_batch and isinstance(X_t, RowSubset):
            X_t = X_t.materialize()
        if metric is not None:
            X_val = None if X_val is None else metric.whiten(X_val)
            if full_batch:
                X_t = metric.whiten(X_t)  # once
            else:
                transform = metric.whiten  # per batch: no whitened copy of X
        data = TrainingData(X_t, y_t, weights, device, X_val, y_val, w_val, transform, shard)
        return data, metric

    def _feature_metric(self, X, sample_weight, head, device, comm=SINGLE):
        """Return the first layer's feature metric (:mod:`._metric`) from the training rows, or None.

        With ``comm`` from all ranks' rows; every rank takes rank 0's
        eigendecompositions (identical inputs, but LAPACK's bits may depend
        on the thread count), so the parameters stay identical.

        Returns
        -------
        FeatureMetric or None
            In ``X``'s dtype on ``device``.

        Raises
        ------
        ValueError
            When the features' second moment overflows float64.
        """
        if self.damping_metric == "identity" or (self.damping_metric == "auto" and not head.is_linear):
            return None
        diagonal = is_diagonal_metric(X.shape[1])  # it needs the variances only
        moments = feature_moments(*_in_row_order(X, sample_weight), comm, diagonal=diagonal)
        if not bool(torch.isfinite(moments.outer).all()):
            largest = float((X.X if isinstance(X, RowSubset) else X).abs().max())
            raise ValueError(
                f"The second moment of the features overflowed float64 (largest feature {largest:.3g}); "
                "scale the features (e.g. StandardScaler)."
            )
        metric = make_feature_metric(moments, centered=head.fit_intercept)
        for tensor in metric.tensors():
            comm.broadcast_(tensor)
        return metric.to(X.dtype, device)

    def _validation_split(self, y_enc, sample_weight):
        """Hold out ``validation_fraction``: stratified when every class can give it a sample.

        Returns
        -------
        train, val : ndarray of int
            The rows of each part.

        Raises
        ------
        ValueError
            When the split leaves fewer than two validation samples, no
            training sample, or validation weights that sum to zero.
        """
        n_samples = y_enc.shape[0]
        n_val = self._validation_rows(n_samples)
        if n_val < 2 or n_val >= n_samples:
            raise ValueError(
                f"early_stopping with validation_fraction={self.validation_fraction} holds out {n_val} "
                f"of {n_samples} samples; it needs at least 2 and must leave some for training. "
                "Change validation_fraction or set early_stopping=False."
            )
        train, val = train_test_split(
            np.arange(n_samples), test_size=n_val,
            stratify=y_enc if self._can_stratify(y_enc, n_val) else None,
            random_state=self._rng,
        )  # fmt: skip
        if not sample_weight[val].sum() > 0:
            raise ValueError(
                "The sample weights of the validation split sum to zero; set early_stopping=False."
            )
        return train, val

    def _validation_rows(self, n_samples):
        """Rows held out: ``validation_fraction``, capped for ``early_stopping="auto"``.

        A few thousand rows rank epochs as well as a tenth of a large data
        set does; the rest is worth more as training data.

        Returns
        -------
        int
            The number of validation rows.
        """
        n_val = int(np.ceil(self.validation_fraction * n_samples))
        if self.early_stopping == "auto":
            n_val = min(n_val, max(AUTO_VALIDATION_ROWS, 2 * len(self.classes_)))
        return n_val

    def _resolve_early_stopping(self, y_enc, head, X, layout=None):
        if self.early_stopping != "auto":
            return bool(self.early_stopping)
        n_samples = y_enc.shape[0]
        batch_size = self._resolve_batch_size(n_samples, head, X, layout)
        if batch_size is None or batch_size >= n_samples:
            return False
        return self._can_stratify(y_enc, self._validation_rows(n_samples))

    def _can_stratify(self, y_enc, n_validation):
        # A stratified split needs two samples of every class and a validation
        # share with room for each class.
        n_samples, n_classes = y_enc.shape[0], len(self.classes_)
        counts = np.bincount(y_enc, minlength=n_classes)
        return bool(counts.min() >= 2 and min(n_validation, n_samples - n_validation) >= n_classes)

    def _resolve_batch_size(self, n_samples, head, X, layout=None):
        """Return ``batch_size``, or what ``"auto"`` means for this data, head and device (None: full).

        In a data-parallel fit (``layout``) the rules weigh the rows of the
        largest shard, what one device holds and computes on per step
        (the same on every rank).

        Returns
        -------
        int or None
            The batch size; None for full batch.
        """
        if self.batch_size != "auto":
            return self.batch_size
        if is_memory_mapped(X):  # full batch would hold a whitened copy of it; batches read it in place
            return AUTO_BATCH_SIZE
        if layout is not None:
            n_samples = math.ceil(n_samples * layout.largest_share)
        device = _resolve_device(self.device, X)
        if head.is_linear and device.type == "cuda":
            memory = torch.cuda.get_device_properties(device).total_memory
            full = _full_batch_fits(n_samples, head, np.dtype(numpy_dtype(X.dtype)).itemsize, memory)
        else:
            full = n_samples * head.n_logits <= AUTO_FULL_BATCH_MAX_ENTRIES
        if not head.is_linear:
            full = full and n_samples <= AUTO_MLP_FULL_BATCH_MAX_SAMPLES
        return None if full else AUTO_BATCH_SIZE

    def _store(self, head, state):
        attributes = self._fitted_attributes(head, state)
        for stale in {"coef_", "intercept_", "coefs_", "intercepts_"} - attributes.keys():
            self.__dict__.pop(stale, None)  # left by a fit with the other kind of head
        for name, value in attributes.items():
            setattr(self, name, value)
        self._no_improvement_count = state.no_improvement_count

    def _fitted_attributes(self, head, state):
        """Return the fitted attributes for ``state``, as CPU numpy arrays."""
        params = {k: t.detach().cpu().numpy().copy() for k, t in state.params.items()}
        early_stopping = bool(state.validation_scores)
        if not all(np.all(np.isfinite(p)) for p in params.values()):
            raise ValueError(
                "The fit produced non-finite parameters; scale the features or raise alpha or damping."
            )
        weights = [params[f"coef_{layer}"] for layer in range(head.n_layers)]
        biases = [
            params[f"intercept_{layer}"] if head.fit_intercept else np.zeros(w.shape[0], dtype=w.dtype)
            for layer, w in enumerate(weights)
        ]
        if head.is_linear:
            attributes = _centred_over_classes(weights[0], biases[0], head, float(self.alpha) == 0.0)
        else:
            attributes = {"coefs_": [w.T.copy() for w in weights], "intercepts_": biases}
        return attributes | {
            "_head": head, "n_iter_": state.n_iter, "t_": state.t, "damping_": state.damping,
            "loss_curve_": list(state.loss_curve),
            "validation_scores_": list(state.validation_scores) if early_stopping else None,
            "best_loss_": None if early_stopping else state.best_loss,
            "best_validation_score_": max(state.validation_scores) if state.validation_scores else None,
        }  # fmt: skip

    # ------------------------------------------------------------- predict
    def _logits_map(self, X):
        check_is_fitted(self)
        X = check_features(self, X, reset=False)
        params = self._params_from_attributes(self._head, numpy_dtype(X.dtype))
        X = X if is_tensor(X) else _to_tensor(X, "cpu", host=True)  # a tensor stays on its device
        return X, functools.partial(forward, self._head, {k: p.to(X.device) for k, p in params.items()})


def _centred_over_classes(coef, intercept, head, unpenalised):
    """Return ``{"coef_": ..., "intercept_": ...}``, what the softmax leaves free centred over the classes.

    Adding one vector to every class's coefficients (one number to every
    intercept) leaves a multinomial model's probabilities unchanged. The
    penalty fixes the coefficients' shift (their mean over the classes is 0
    at the optimum); the intercepts' shift, and the coefficients' without a
    penalty, are set to mean 0 exactly, as ``LogisticRegression`` does, so
    that the fitted attributes do not carry the solver's rounding there.
    Binary heads (one logit) are returned as they are.

    Returns
    -------
    dict
    """
    if head.n_logits > 1:
        intercept = intercept - intercept.mean() if head.fit_intercept else intercept
        coef = coef - coef.mean(axis=0, keepdims=True) if unpenalised else coef
    return {"coef_": coef, "intercept_": intercept}


def _check_same_classes(previous, classes):
    """Raise unless a warm start sees the classes of the fit it resumes (as ``MLPClassifier``).

    Raises
    ------
    ValueError
        When ``previous`` (None: no previous fit) differs from ``classes``.
    """
    if previous is not None and not np.array_equal(previous, classes):
        raise ValueError(
            "warm_start can only be used where y has the same classes as in the previous call to fit: "
            f"previously {previous.tolist()}, now {np.asarray(classes).tolist()}. "
            "Set warm_start=False to fit afresh."
        )


def _full_batch_fits(n_samples, head, itemsize, device_memory):
    """Return whether a linear head's full-batch fit fits in half of a GPU's ``device_memory`` bytes.

    A full-batch step holds about ten (n_samples, n_logits) arrays at once
    (logits, probabilities, CG vectors, products), counted with a margin as
    ``AUTO_GPU_FULL_BATCH_ARRAYS``, beside the features themselves. On a GPU
    a full-batch step costs little more than a mini-batch step's overheads
    (kernel launches, host reads), so full batch wins wherever it fits
    (``benchmarks/RESULTS.md``). The device's total memory, not its free
    memory, keeps the choice reproducible.

    Returns
    -------
    bool
    """
    arrays = AUTO_GPU_FULL_BATCH_ARRAYS * n_samples * head.n_logits + n_samples * head.n_features
    return arrays * itemsize <= AUTO_GPU_MEMORY_SHARE * device_memory


class DeviceMemoryError(torch.OutOfMemoryError, ValueError):
    """The GPU ran out of memory; the message names the setting to lower.

    A ``torch.OutOfMemoryError`` (so handlers of torch's error still catch
    it) and a ``ValueError`` (a setting of the estimator or the size of the
    input is the cure).
    """


@contextlib.contextmanager
def _device_memory_hint(task, batch_size):
    """Re-raise torch's CUDA out-of-memory error as a :class:`DeviceMemoryError` that says what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if isinstance(exc, DeviceMemoryError):
            raise
        if task == "predict":
            advice = "predict on fewer rows at a time (the logits of all rows are held at once)"
        elif batch_size is None:
            advice = (
                "set batch_size (full batch now: each step holds a few (n_samples, n_classes) arrays), "
                "or device='cpu'"
            )
        else:
            advice = f"lower batch_size (now {batch_size}), or device='cpu'"
        raise DeviceMemoryError(f"The GPU ran out of memory during {task}: {advice}. torch: {exc}") from exc


def _warn_if_nothing_learned(head, state, y_enc, sample_weight, alpha):
    """Warn when an MLP fit ends with a training log-loss no better than predicting the class frequencies.

    That is where a ReLU head whose hidden units all died ends (uniform
    outputs, loss of the constant model), whatever the stopping rule says.
    Like is compared with like: the data term, the last objective of
    ``loss_curve_`` less the L2 penalty ``alpha / 2 * sum ||W||^2`` at the
    fitted parameters (``alpha`` on the mean loss, ``alpha / sum(s)``), against
    the entropy of the (class-)weighted class frequencies of ``y_enc``, the
    loss of predicting them. In full batch the last objective is the one at
    the fitted parameters, so the data term is exact; on mini-batches it is
    the last epoch's mean batch objective, an estimate.

    Parameters
    ----------
    head : Head
    state : LoopState
        The fit's end state, parameters in the features' coordinates.
    y_enc : ndarray of shape (n_samples,)
        Encoded labels.
    sample_weight : ndarray of shape (n_samples,)
        Sample weights times class weights.
    alpha : float
        The penalty on the mean loss.
    """
    if head.is_linear or not state.loss_curve:
        return
    frequencies = np.bincount(y_enc, weights=sample_weight) / sample_weight.sum()
    frequencies = frequencies[frequencies > 0]
    constant_loss = float(-(frequencies * np.log(frequencies)).sum())
    penalized = head.penalized(state.params)
    penalty = alpha / 2 * sum(float(torch.sum(state.params[name].double() ** 2)) for name in penalized)
    data_loss = state.loss_curve[-1] - penalty
    if data_loss >= constant_loss * (1 - 1e-3):
        warnings.warn(
            f"The fit ended with a training log-loss of {data_loss:.4g} (objective "
            f"{state.loss_curve[-1]:.4g} less the L2 penalty {penalty:.4g}), no better than predicting "
            f"the class frequencies ({constant_loss:.4g}): the hidden units may all be inactive. Scale "
            "the features (e.g. StandardScaler), lower damping or alpha, or try another random_state.",
            ConvergenceWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _restored_on_error(estimator):
    """On an exception, put the fitted state back as it was (fitted or not), then re-raise.

    Fitted attributes (``name_``) and private state (``_name``) are saved
    before a fit; a fit that raises midway leaves no mix of old and new.
    """
    saved = {k: v for k, v in vars(estimator).items() if k.endswith("_") or k.startswith("_")}
    try:
        yield
    except BaseException:
        for k in [k for k in vars(estimator) if k.endswith("_") or k.startswith("_")]:
            delattr(estimator, k)
        vars(estimator).update(saved)
        raise


def _to_fit_coordinates(head, params, data, metric, drawn, comm=SINGLE, damping=1.0):
    """Parameters on the device, in the coordinates of the fit (see ``FGNClassifier._train``).

    With ``comm`` every rank starts from rank 0's parameters. ``damping``:
    the estimator's; a drawn MLP head in the identity metric raises
    ``ValueError`` where :func:`_check_first_layer_can_learn` does.

    Returns
    -------
    dict of Tensor
        The parameters the loop starts from.
    """
    params = {k: comm.broadcast_(t.to(data.device)) for k, t in params.items()}
    if drawn and not head.is_linear:
        if metric is not None:
            mean, scale = metric.mean, metric.scale
        else:
            mean, scale = feature_standardization(*_in_row_order(data.X, data.sample_weight), comm)
            _check_first_layer_can_learn(scale, data.X.dtype, damping)
        params = standardized_first_layer(params, mean, scale)
    return params if metric is None else whitened_params(metric, params)


def _check_first_layer_can_learn(scale, dtype, damping):
    """Raise when an MLP's first layer, damped in the identity metric, cannot learn from the features.

    Its weights start at about ``1 / std`` of the features
    (:func:`standardized_first_layer`) and its curvature is about their
    variance: where the largest variance is below the dtype's rounding of
    the smallest damping a fit reaches, no step changes those weights (in
    float32 their squares overflow as well), and the fit would end with
    the first layer it drew.

    Raises
    ------
    ValueError
        When the features' largest variance is below ``eps * min(damping, DAMPING_BOUNDS[0])``.
    """
    variance = float(scale.double().min()) ** -2  # constant features get the others' scale
    floor = min(float(damping), DAMPING_BOUNDS[0])
    if variance < torch.finfo(dtype).eps * floor:
        raise ValueError(
            f"The features' largest variance is {variance:.3g}: an MLP head damped in the identity "
            "metric (damping_metric='identity', which 'auto' means for MLP heads) cannot learn its first "
            f"layer from them, as its curvature is below {dtype}'s rounding of the damping "
            f"({floor:.3g} at least). Scale the features (e.g. StandardScaler) or set "
            "damping_metric='features'."
        )


def _in_row_order(X, sample_weight):
    """``(X, sample_weight)`` with a :class:`RowSubset`'s rows sorted: an order-free pass reads X in order.

    Returns
    -------
    tuple
        ``(X, sample_weight)``, permuted alike (unchanged when ``X`` is a tensor).
    """
    if not isinstance(X, RowSubset):
        return X, sample_weight
    X, order = X.in_row_order()
    return X, None if sample_weight is None else sample_weight[order.to(sample_weight.device)]


def _null_loss(head, y_enc, sample_weight):
    """Return the objective of the intercept-only model: the weighted class entropy, or ``log K``.

    Returns
    -------
    float
        ``-sum_k pi_k log pi_k`` with ``pi_k`` the classes' shares of the
        weight; without intercept the loss of zero logits, ``log K``.
    """
    if not head.fit_intercept:
        return math.log(max(head.n_logits, 2))
    shares = np.bincount(y_enc, weights=sample_weight) / sample_weight.sum()
    shares = shares[shares > 0]
    return float(-(shares * np.log(shares)).sum())


def _in_feature_coordinates(metric, params):
    """Map parameters of a fit in whitened coordinates back to the features' (identity without a metric)."""
    return params if metric is None else unwhitened_params(metric, params)


@dataclasses.dataclass(frozen=True)
class _RowLayout:
    """A rank's rows in a data-parallel fit: ``X`` holds rows ``offset:offset + len(X)`` of all ranks'.

    ``largest_share``: the largest shard's share of all rows.
    """

    comm: Communicator
    offset: int
    largest_share: float = 1.0


def _comm_of(layout):
    """Return the communicator of a data-parallel fit's ``layout`` (the single process without one)."""
    return SINGLE if layout is None else layout.comm


@contextlib.contextmanager
def _agreed(comm):
    """Run the body on every rank; if it raised on any, raise on all (no rank waits for a failed one).

    A single process runs the body as it is. Otherwise the ranks exchange
    their errors (one ``all_gather_object``): a rank re-raises its own, the
    others a ``ValueError`` naming the first rank that failed.

    Yields
    ------
    None

    Raises
    ------
    ValueError
        On the ranks whose body ran, when another rank's raised.
    """
    if not comm.distributed:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001  (shared with the other ranks, then re-raised)
        error = exc
    messages = comm.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise ValueError(f"distributed fit: rank {rank} of {comm.world_size} rejected its data: {message}")


def _gathered_rows(comm, X, y, sample_weight, settings=None):
    """Every rank's labels and weights, concatenated in rank order, and this rank's layout.

    Single process: ``(y, sample_weight, None)``. Otherwise one
    ``all_gather_object`` of ``(n_features, dtype, settings, y, sample_weight)``;
    the ranks must agree on the number of features, the dtype and the
    ``settings`` (the estimator's parameters, ``partial_fit``'s classes):
    ranks that fit differently would wait on each other's collectives.

    Returns
    -------
    tuple
        ``(y, sample_weight, layout)``.

    Raises
    ------
    ValueError
        On every rank, when the ranks' features differ in width or dtype, or their settings differ.
    """
    if not comm.distributed:
        return y, sample_weight, None
    shape = (X.shape[1], str(numpy_dtype(X.dtype)))
    parts = comm.gather_objects((shape, repr(settings), np.asarray(y), sample_weight))
    if len({part[0] for part in parts}) > 1:
        described = ", ".join(f"rank {r}: {w} features, {t}" for r, ((w, t), *_) in enumerate(parts))
        raise ValueError(f"distributed fit: the ranks' X differ in width or dtype ({described}).")
    differing = [rank for rank, part in enumerate(parts) if part[1] != parts[0][1]]
    if differing:
        raise ValueError(
            f"distributed fit: rank {differing[0]}'s settings differ from rank 0's; every rank must fit "
            f"with the same parameters (and classes): {parts[differing[0]][1]} against {parts[0][1]}."
        )
    sizes = [part[2].shape[0] for part in parts]
    y = np.concatenate([part[2] for part in parts])
    sample_weight = np.concatenate([part[3] for part in parts])
    return y, sample_weight, _RowLayout(comm, sum(sizes[: comm.rank]), max(sizes) / sum(sizes))


def _shared_settings(estimator):
    """Return the parameters all ranks of a data-parallel fit share (not the device, verbosity or seed)."""
    params = estimator.get_params()
    return {k: params[k] for k in sorted(params) if k not in ("device", "verbose", "random_state")}


def _agreed_seed(comm, random_state):
    """:func:`_seed_from` on rank 0, shared: ``random_state=None`` draws the same seed on every rank."""
    return comm.gather_objects(_seed_from(random_state))[0]


def _held_here(rows, offset, n_local):
    """Return the entries of ``rows`` (global indices) in ``offset:offset + n_local``, in their order."""
    return rows[(rows >= offset) & (rows < offset + n_local)]


def _seed_from(random_state):
    """Return an int seed from ``random_state`` (None draws one from numpy's global RNG)."""
    from sklearn.utils import check_random_state

    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _torch_dtype(dtype):
    return torch.float32 if numpy_dtype(dtype) == np.float32 else torch.float64


def _resolve_device(device, X=None):
    """Return the torch device of ``device``; ``"auto"`` is a CUDA ``X``'s device, else CUDA when present."""
    if isinstance(device, str) and device == "auto":
        if is_tensor(X) and X.is_cuda:
            return X.device
        return _resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1', ...)."
        ) from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device={device!r} is not supported: FGNClassifier runs on 'cpu' or CUDA "
            "('cuda', 'cuda:1', ...)."
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: there are only {torch.cuda.device_count()} CUDA devices.")
    if resolved.type == "cuda" and resolved.index is None:  # "cuda" is the current device, by index
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _fits_on(device, nbytes):
    """Whether ``nbytes`` of data may live on ``device`` (half its free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


def _to_tensor(array, device, host=False):
    """Return ``array`` as a tensor on ``device``, or in host memory when ``host``.

    A tensor already on a CUDA device stays there when ``device`` is CUDA
    (it is on the device already, whatever ``host`` says).

    Returns
    -------
    Tensor
    """
    if is_tensor(array):
        if array.is_cuda and torch.device(device).type == "cuda":
            return array.to(device)
        return array.cpu() if host else array.to(device)
    array = np.ascontiguousarray(array)
    # torch.from_numpy shares memory, and warns on read-only arrays (memmaps):
    # they are shared too, never copied whole; the fit only reads its features.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor if host else tensor.to(device)


def _apply_linear_init(head, params, coef_init, intercept_init):
    if coef_init is None and intercept_init is None:
        return params
    if not head.is_linear:
        raise ValueError(
            "coef_init and intercept_init apply to the linear head (hidden_layer_sizes=()) only."
        )
    dtype = params["coef_0"].dtype
    if coef_init is not None:
        coef = torch.as_tensor(np.asarray(coef_init, dtype=np.float64), dtype=dtype)
        if coef.shape != params["coef_0"].shape:
            raise ValueError(
                f"coef_init has shape {tuple(coef.shape)}; expected {tuple(params['coef_0'].shape)}."
            )
        _check_finite_init("coef_init", coef)
        params["coef_0"] = coef
    if intercept_init is not None:
        if not head.fit_intercept:
            raise ValueError("intercept_init was given but fit_intercept=False.")
        bias = torch.as_tensor(np.asarray(intercept_init, dtype=np.float64), dtype=dtype).reshape(-1)
        if bias.shape != params["intercept_0"].shape:
            raise ValueError(
                f"intercept_init has shape {tuple(bias.shape)}; "
                f"expected {tuple(params['intercept_0'].shape)}."
            )
        _check_finite_init("intercept_init", bias)
        params["intercept_0"] = bias
    return params


def _check_finite_init(name, value):
    """Raise a ``ValueError`` naming ``name`` unless every entry of ``value`` is finite in the fit's dtype.

    Raises
    ------
    ValueError
        Naming the argument and whether it holds NaN or an infinity (after the cast).
    """
    if not bool(torch.isfinite(value).all()):
        kind = "NaN" if bool(torch.isnan(value).any()) else "an infinite value"
        raise ValueError(f"{name} contains {kind} (in the features' dtype {value.dtype}); it must be finite.")


@functools.cache
def _threadpool_controller():
    # Finding the loaded libraries reads /proc (a noticeable share of a small
    # fit): once per process; their thread counts are read afresh by every ``info()``.
    return ThreadpoolController()


def _thread_limit():
    """Return the threads allowed here: torch's count, capped by the OpenMP/BLAS limits in force.

    Returns
    -------
    int
    """
    infos = _threadpool_controller().info()
    limits = [info["num_threads"] for info in infos if info.get("user_api") in ("openmp", "blas")]
    return min([torch.get_num_threads(), *limits])


@contextlib.contextmanager
def _torch_threads_like_threadpools():
    """Cap torch's intra-op threads at the OpenMP/BLAS limits in force.

    scikit-learn and joblib limit native thread pools in parallel workers
    (``threadpoolctl``); torch keeps its own count, so it follows them here.
    """
    previous = torch.get_num_threads()
    target = _thread_limit()
    if target != previous:
        torch.set_num_threads(target)
    try:
        yield
    finally:
        if target != previous:
            torch.set_num_threads(previous)


class _EpochCallbacks:
    """Forward each iteration to scikit-learn's callback protocol (``sklearn.callback``).

    The fit is the root task and every iteration (epoch, or step in full
    batch) a subtask, whose end hook may ask to stop. Without callback
    support (scikit-learn < 1.9) every method is a no-op.
    """

    def __init__(self, estimator, head, X, y, sample_weight, max_subtasks, to_features):
        self.estimator, self.head, self.X, self.y = estimator, head, X, y
        self.to_features = to_features
        self.metadata = None if np.all(sample_weight == 1) else {"sample_weight": sample_weight}
        self.context = self.iteration = None
        if hasattr(estimator, "_init_callback_context"):
            self.context = estimator._init_callback_context(max_subtasks=max_subtasks)
            self.context.call_on_fit_task_begin(**self._hook_args())

    def _hook_args(self):
        return {"estimator": self.estimator, "X": self.X, "y": self.y, "metadata": self.metadata}

    def begin(self, state):
        if self.context is not None:
            self.iteration = self.context.subcontext(task_name=f"iteration {state.n_iter}")
            self.iteration.call_on_fit_task_begin(**self._hook_args())

    def end(self, state):
        if self.context is None:
            return False

        def attributes():
            params = self.to_features(state.params)
            return self.estimator._fitted_attributes(self.head, replace(state, params=params))

        stop = self.iteration.call_on_fit_task_end(**self._hook_args(), reconstruction_attributes=attributes)
        return bool(stop)

    def close(self):
        if self.context is not None:
            self.context.call_on_fit_task_end(**self._hook_args(), reconstruction_attributes={})
