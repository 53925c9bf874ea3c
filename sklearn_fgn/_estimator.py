"""FGNClassifier: the scikit-learn estimator around the FGN kernels.

A fit validates its data (every rank's, in a data-parallel fit:
:mod:`._ranks`), draws or resumes its parameters (:mod:`._fitted`), resolves
its plan once (:class:`._plan.FitPlan`: device, batch size, early stopping,
the prepared data of :mod:`._prepare`) and runs the loop of :mod:`._solver`
on it; the predictions come from :mod:`._predict`.
"""

from __future__ import annotations

import functools
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, Options, StrOptions

try:  # scikit-learn >= 1.9: the callback protocol (set_callbacks, ProgressBar, ScoringMonitor)
    from sklearn.callback import CallbackSupportMixin
except ImportError:  # older releases have no callbacks to support

    class CallbackSupportMixin:  # noqa: D101
        pass


from ._arrays import check_training_data, numpy_dtype, random_access
from ._callbacks import EpochCallbacks
from ._damping import DAMPING_SCHEDULES
from ._device import DeviceMemoryError, out_of_memory_advice, torch_threads_like_threadpools
from ._distributed import communicator
from ._fitted import (
    check_same_classes,
    initial_params,
    params_from_attributes,
    restored_on_error,
    resumed_state,
    store_fitted,
    warn_if_nothing_learned,
)
from ._heads import ACTIVATIONS, Head, forward
from ._plan import PLAIN_FIT, make_fit_plan
from ._predict import LogitsPredictionMixin, fitted_features
from ._prepare import in_feature_coordinates, null_loss, penalty_coefficients, to_fit_coordinates
from ._ranks import (
    every_rank_raises_if_one_does,
    gather_labels_and_weights,
    seed_of_rank_zero,
    settings_ranks_share,
)
from ._solver import LoopConfig, LoopState, run_epochs
from ._step import SOLVERS
from ._stepper import CURVATURE_OPTIONS
from ._validation import check_classes, check_params, check_partial_fit_params, setup_fit

__all__ = ["DeviceMemoryError", "FGNClassifier"]

DAMPING_METRICS = ("auto", "features", "identity")


class FGNClassifier(LogitsPredictionMixin, CallbackSupportMixin, ClassifierMixin, BaseEstimator):
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
        ``None`` is full batch. ``"auto"``: a linear head fits full batch
        wherever about 12 ``(n_samples, n_classes)`` arrays and ``X`` take at
        most half the memory of the device (a GPU's, or the host's RAM), so
        that the fit reaches the optimum of its objective, the same model on
        any device; 512 beyond. An MLP head fits full batch while
        ``n_samples <= 8192`` and ``n_samples * n_classes <= 2**24``. Full
        batch converges to the optimum in a few Newton steps (on large data
        with the curvature on a sample of the rows); mini-batches make
        progress from the first epoch on data too large for that. A
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
        epochs (many classes, few samples each).
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
        with restored_on_error(self), communicator(self.distributed).fit_scope():
            previous = getattr(self, "classes_", None) if hasattr(self, "damping_") else None
            X, y_enc, sample_weight, head, layout = setup_fit(self, X, y, sample_weight)
            resumed = None
            if self.warm_start and coef_init is None and intercept_init is None:
                check_same_classes(previous, self.classes_)
                resumed = resumed_state(self, head, numpy_dtype(X.dtype))
            start = 0 if resumed is None else resumed.n_iter
            drawn = resumed is None and coef_init is None and intercept_init is None
            state = resumed or LoopState(
                initial_params(head, numpy_dtype(X.dtype), self._rng, coef_init, intercept_init),
                float(self.damping),
            )
            plan = make_fit_plan(self, X, y_enc, sample_weight, head, layout)
            state = self._train(plan, state, drawn_params=drawn)
            self.n_iter_ = state.n_iter - start  # this fit's own, as MLPClassifier
        prepared = plan.prepared
        alpha = float(self.alpha) / prepared.data.weight_total
        warn_if_nothing_learned(head, state, y_enc, prepared.sample_weight, alpha)
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
        with restored_on_error(self), comm.fit_scope():
            first = not hasattr(self, "classes_")
            with every_rank_raises_if_one_does(comm):
                X, y, sample_weight = check_training_data(self, X, y, sample_weight, reset=first)
                hidden = check_params(self)
                check_partial_fit_params(self, classes)
            settings = (
                settings_ranks_share(self),
                None if classes is None else np.unique(np.asarray(classes)),
            )
            y, sample_weight, layout = gather_labels_and_weights(comm, X, y, sample_weight, settings)
            if first:
                if classes is None:
                    raise ValueError("classes must be passed on the first call to partial_fit.")
                self.classes_ = np.unique(np.asarray(classes))
                check_classes(self.classes_)
                self._rng = np.random.RandomState(seed_of_rank_zero(comm, self.random_state))
            elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
                raise ValueError(
                    f"classes={classes!r} differs from classes_={self.classes_!r} of the first call."
                )
            unseen = np.setdiff1d(np.unique(y), self.classes_)
            if unseen.size:
                raise ValueError(f"y contains labels not in classes: {unseen!r}")
            head = self._make_head(hidden, X.shape[1])
            dtype = numpy_dtype(X.dtype)
            state = resumed_state(self, head, dtype) if not first else None
            drawn = state is None
            state = state or LoopState(
                initial_params(head, dtype, self._rng, None, None), float(self.damping)
            )
            y_enc = np.searchsorted(self.classes_, y)
            plan = make_fit_plan(self, X, y_enc, sample_weight, head, layout, early_stopping=False)
            self._train(plan, state, n_epochs=1, drawn_params=drawn)

        return self

    def _fit_path(self, X, y, sample_weight, alphas, init=None, search=PLAIN_FIT):
        """Fit at each of ``alphas`` in turn, each fit starting from the previous solution.

        What does not depend on ``alpha`` is done once (one :class:`._plan.FitPlan`):
        validation, the tensors on the device, the validation split, the
        feature metric and its eigendecomposition; in full batch each fit
        starts from the last one's parameters in the fit's coordinates and
        their logits (no forward pass, no change of coordinates). Yields
        after each fit, with the fitted attributes of that ``alpha`` set (a
        generator: the caller scores them). Used by :class:`FGNClassifierCV`,
        whose ``search`` (:class:`._plan.SearchFit`) says how its fits stop
        and which classes they fit. ``init``: ``(coef_init, intercept_init)``
        of the first fit (else drawn).

        Yields
        ------
        LoopState
            The state of the fit at that ``alpha``.
        """
        X, y_enc, sample_weight, head, layout = setup_fit(self, X, y, sample_weight, search)
        init = (None, None) if init is None else init
        state = LoopState(initial_params(head, numpy_dtype(X.dtype), self._rng, *init), float(self.damping))
        plan = make_fit_plan(self, X, y_enc, sample_weight, head, layout, search=search)
        for i, alpha in enumerate(alphas):
            self.alpha = float(alpha)
            # the same rows: the last fit's parameters in its coordinates and their logits
            state = LoopState(state.params, state.damping, logits=state.logits, fit_params=state.fit_params,
                              step_cache=state.step_cache)  # fmt: skip
            yield self._train(plan, state, drawn_params=i == 0)

    # -------------------------------------------------------------- helpers
    def _make_head(self, hidden, n_features):
        n_logits = 1 if len(self.classes_) == 2 else len(self.classes_)
        return Head(n_features, n_logits, hidden, self.activation, bool(self.fit_intercept))

    def _train(self, plan, state, n_epochs=None, drawn_params=False):
        """Run the loop on ``state`` as ``plan`` says and store the fitted attributes.

        ``n_epochs``: iterations to run (None: up to ``max_iter``).
        ``drawn_params``: ``state.params`` come from :func:`._heads.init_params`
        (see :func:`._prepare.to_fit_coordinates`). The parameters are mapped
        to the coordinates of the fit (whitened features in the feature
        metric) and back; a path's later fits start from the last one's in
        those coordinates (``state.fit_params``).

        Returns
        -------
        LoopState
            The state after the loop, parameters in the features' coordinates.

        Raises
        ------
        KeyboardInterrupt
            In a search's fit (``plan.search``): the search stops at once. In
            a data-parallel fit: every rank's fit ends (the others raise
            :class:`._distributed.DistributedFitError`), where keeping the
            last parameters would leave ranks with different models. A
            single fit keeps its last accepted parameters and warns.
        """
        head, comm, search = plan.head, plan.comm, plan.search
        sample_weight, data, metric = plan.prepared.sample_weight, plan.prepared.data, plan.prepared.metric
        with out_of_memory_advice("fit", plan.batch_size):
            scored_gap = search.scored_only and search.gap_tol is not None
            cfg = LoopConfig(
                alpha=penalty_coefficients(float(self.alpha), head, metric, data),
                damping=float(self.damping),
                curvature=self.curvature, solver=self.solver, damping_schedule=self.damping_schedule,
                batch_size=plan.batch_size, max_iter=self.max_iter, tol=float(self.tol),
                n_iter_no_change=self.n_iter_no_change, cg_tol=self.cg_tol, cg_max_iter=self.cg_max_iter,
                verbose=self.verbose, whitened=metric is not None, gap_tol=search.gap_tol,
                null_loss=null_loss(head, plan.y_enc, sample_weight) if scored_gap else None, comm=comm,
            )  # fmt: skip
            if state.fit_params is None:
                state.params = to_fit_coordinates(
                    head, state.params, data, metric, drawn_params, comm, float(self.damping)
                )
            else:  # a path's previous fit on these rows, in these coordinates
                state.params, state.fit_params = state.fit_params, None
            generator = torch.Generator().manual_seed(int(self._rng.randint(np.iinfo(np.int32).max)))
            local = plan.local_rows
            to_features = functools.partial(in_feature_coordinates, metric)
            events = EpochCallbacks(
                self, head, plan.X, self.classes_[plan.y_enc[local]], sample_weight[local],
                n_epochs or self.max_iter, to_features,
            )  # fmt: skip
            with torch_threads_like_threadpools(), random_access(plan.X if plan.mini_batch else None):
                try:
                    state = run_epochs(head, state, data, cfg, generator, n_epochs, events.begin, events.end)
                except KeyboardInterrupt:  # keep the last accepted parameters, as MLPClassifier does
                    if search.in_search or comm.distributed:  # a search's or the ranks' fit
                        raise
                    warnings.warn("Training interrupted by user.", stacklevel=4)
                    state.stopped = True
        if plan.early_stopping and state.best_params is not None:
            state.params, state.logits = state.best_params, None
        state.fit_params = state.params if state.logits is not None else None
        state.params = to_features(state.params)
        store_fitted(self, head, state)
        events.close()
        return state

    # ------------------------------------------------------------- predict
    def _logits_map(self, X):
        X = fitted_features(self, X)
        params = params_from_attributes(self, self._head, numpy_dtype(X.dtype))
        return X, functools.partial(forward, self._head, {k: p.to(X.device) for k, p in params.items()})
