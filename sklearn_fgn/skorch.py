r"""skorch integration: train any torch module with Fast Gauss-Newton steps.

:class:`FGNNeuralNetClassifier` is a ``skorch.NeuralNetClassifier`` whose
``train_step`` takes one damped FGN (or full-GGN) step per batch. The step
comes from the same kernel as :class:`sklearn_fgn.FGNClassifier`,
:func:`sklearn_fgn._step.compute_step`, applied to the logits map
``params -> torch.func.functional_call(module, params, X)``.

This module needs skorch (``pip install "sklearn-fgn[skorch]"``); the rest of
``sklearn_fgn`` does not import it.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

try:
    from skorch import NeuralNetClassifier
    from skorch.dataset import unpack_data
    from skorch.utils import to_tensor
except ImportError as exc:  # pragma: no cover - exercised only without skorch
    raise ImportError(
        "sklearn_fgn.skorch needs skorch; install it with `pip install skorch` "
        "or `pip install 'sklearn-fgn[skorch]'`."
    ) from exc

from ._batches import Batch
from ._curvature import LogitsFn
from ._damping import DAMPING_SCHEDULES, StepRecord
from ._heads import Params
from ._solver import LoopConfig
from ._step import StepResult
from ._stepper import Stepper, StepperState, check_step_options

__all__ = ["DAMPING_SCHEDULES", "SOLVERS", "FGNNeuralNetClassifier"]

# An arbitrary module has no per-layer structure for the exact Gram: CG only.
SOLVERS = ("cg",)


class FGNNeuralNetClassifier(NeuralNetClassifier):
    r"""A skorch classifier trained by damped Fast Gauss-Newton steps.

    Each training batch takes one step ``delta = -(G + Lambda)^{-1} grad L``
    of :func:`sklearn_fgn._step.compute_step` (matrix-free conjugate
    gradient, damping-preconditioned) on the module's trainable parameters; no torch
    optimizer step is taken. Everything else (data handling, callbacks,
    ``predict``, checkpointing, ``GridSearchCV``) is skorch's.

    Parameters
    ----------
    module : torch.nn.Module class or instance
        Returns logits of shape (n_samples, n_classes), ``n_classes >= 2``.
        Its forward pass must be a pure function of the parameters apart
        from dropout and batch-norm running statistics (see Notes).
    criterion : class or instance, default=torch.nn.CrossEntropyLoss
        Must be ``torch.nn.CrossEntropyLoss`` with ``reduction="mean"`` and
        no label smoothing; its class ``weight`` becomes sample weights, and
        rows with ``y == ignore_index`` get weight 0, so the objective is
        torch's (weighted) mean over the other rows. Anything else raises
        ``ValueError`` at ``initialize``.
    train_split : callable or None, default=None
        No hidden validation split unless one is asked for (skorch's
        classifier default holds out 20%).
    optimizer : class, default=torch.optim.SGD
        Built because skorch and its callbacks expect one; never stepped.
    lr : float, default=0.0
        Unused by the FGN step; kept at zero so the inert optimizer is visibly so.
    damping : float, default=1.0
        Initial Levenberg-Marquardt damping ``lambda > 0``.
    damping_schedule : {"constant", "adaptive"}, default="adaptive"
        ``"constant"`` takes every step with ``lambda = damping``.
        ``"adaptive"`` compares the batch objective's actual decrease with
        the decrease the quadratic model predicts (Levenberg-Marquardt, as
        ``FGNClassifier``): ratio below 0.25 doubles ``lambda``, above 0.75
        divides it by 10, never below ``damping`` on mini-batches (an exact
        step on a batch with fewer rows than parameters always lowers that
        batch's loss, so the ratio cannot see a step that memorises it; with
        ``batch_size=-1`` there is no floor). A step that raises the batch
        objective is cut back by Armijo backtracking (one forward pass per
        halving) and rejected only if that fails; with ``batch_size=-1`` a
        trusted step is also lengthened to the quadratic model's minimiser
        along it when the objective confirms it there.
    curvature : {"auto", "fgn", "ggn"}, default="auto"
        FGN (one row per example) or the full softmax GGN (``n_classes``
        rows per example). ``"auto"``, as ``FGNClassifier``: FGN on
        mini-batches, the full GGN with ``batch_size=-1`` when the labels
        span more than two classes (exact Newton for a linear module).
    solver : {"cg"}, default="cg"
        Only CG: the exact Gram needs per-layer structure a module lacks,
        so ``"cholesky"`` raises ``ValueError``.
    cg_max_iter : int or "auto", default="auto"
        CG iterations per step at most; each costs one JVP and one VJP of
        the module. ``"auto"``: 100 on mini-batches, 1000 with ``batch_size=-1``.
    cg_tol : float in [0, 1) or "auto", default="auto"
        CG's relative-residual tolerance (0: run ``cg_max_iter``
        iterations). ``"auto"``, as ``FGNClassifier``: 1e-2 on
        mini-batches; with ``batch_size=-1`` the inexact-Newton forcing term
        ``min(0.5, sqrt(predicted relative decrease of the last step))``.
    alpha : float, default=0.0
        L2 strength on every parameter with ``ndim >= 2`` (weights,
        convolution kernels), as ``MLPClassifier``'s: ``alpha / 2 * ||W||^2``
        on the summed loss, i.e. ``alpha / (2 n_train)`` on each batch's mean
        loss, ``n_train`` the rows of the epoch's training split; biases and
        other 1-D parameters are not penalised.
    **kwargs
        Any other ``skorch.NeuralNetClassifier`` argument (``max_epochs``,
        ``batch_size``, ``callbacks``, ``device``, ``module__*``, ...).

    Attributes
    ----------
    damping_ : float
        Current damping; reset to ``damping`` by ``initialize`` and by
        ``set_params(damping=...)``.
    history_ : skorch.history.History
        Besides skorch's entries, every training batch records ``loss`` (the
        objective before the step), ``damping`` (``lambda`` used),
        ``cg_iter``, ``step_norm`` (of the step taken), ``accepted`` and
        ``step_size`` (the multiple of the computed step taken: below 1 when
        backtracking cut it, 0 when it was discarded, above 1 when a
        ``batch_size=-1`` step was lengthened).

    See Also
    --------
    sklearn_fgn.FGNClassifier : FGN for linear and MLP heads on features.
    skorch.NeuralNetClassifier : The parent class.

    Notes
    -----
    The objective of a batch, with ``omega_i`` the normalised (class-)weights,
    is

    .. math::

        L(\theta) = \sum_i \omega_i \mathrm{CE}(z_i, y_i)
                    + \frac{\alpha}{2 n_{train}} \|\theta_{pen}\|^2,

    ``theta_pen`` being the parameters with ``ndim >= 2`` and ``n_train`` the
    size of the training split (the batch's, when ``train_step`` is called
    outside ``fit``); the reported
    ``train_loss`` is this ``L`` before the step. The module's parameters go
    through ``torch.func.functional_call``; frozen ones
    (``requires_grad=False``) are left alone.

    Dropout (any randomness from the global generators) works: one seed is
    drawn per step and replayed on every forward pass of that step, so the
    JVPs, VJPs and the acceptance test all see the same mask. Batch norm in
    training mode works: the step uses batch statistics, and the running
    statistics are updated once per batch by one extra forward pass at the
    parameters before the step, as in ordinary training. Other layers that
    change buffers during ``forward`` raise ``ValueError``.

    No torch optimizer step is taken and ``.grad`` is never filled, so
    callbacks that act on the optimizer or on gradients (``LRScheduler``,
    ``GradientNormClipping``, anything on ``on_grad_computed``) have no
    effect. The step uses cross-entropy directly: overriding ``get_loss``
    changes ``valid_loss`` (and whatever else calls it), not the training
    objective. ``save_params`` and ``Checkpoint`` do not save the adapted
    ``damping_`` (pickling does), so a fit resumed from saved parameters
    restarts from ``damping``.

    References
    ----------
    .. [1] Fast Gauss-Newton, arXiv:2605.06081.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn.datasets import load_iris
    >>> from sklearn_fgn.skorch import FGNNeuralNetClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> net = FGNNeuralNetClassifier(module, max_epochs=5, batch_size=-1, verbose=0)
    >>> net.fit(X, y).score(X, y) > 0.9
    True
    """

    def __init__(
        self,
        module,
        *,
        criterion=torch.nn.CrossEntropyLoss,
        train_split=None,
        optimizer=torch.optim.SGD,
        lr=0.0,
        damping=1.0,
        damping_schedule="adaptive",
        curvature="auto",
        solver="cg",
        cg_max_iter="auto",
        cg_tol="auto",
        alpha=0.0,
        **kwargs,
    ):
        super().__init__(
            module, criterion=criterion, train_split=train_split, optimizer=optimizer, lr=lr, **kwargs
        )
        self.damping = damping
        self.damping_schedule = damping_schedule
        self.curvature = curvature
        self.solver = solver
        self.cg_max_iter = cg_max_iter
        self.cg_tol = cg_tol
        self.alpha = alpha

    def initialize(self):
        """Check the FGN settings, initialise skorch's components, reset ``damping_``.

        Returns
        -------
        self : FGNNeuralNetClassifier
            The initialised net.
        """
        super().initialize()  # checks the settings through check_training_readiness
        self.damping_ = float(self.damping)
        self._step_state = StepperState()  # what the next step reads of the last ones (full batch)
        return self

    def check_training_readiness(self):
        """Check the FGN settings; skorch calls this in ``initialize`` and before every fit loop.

        So settings changed by ``set_params`` are checked before ``partial_fit``
        or a ``warm_start`` fit trains.
        """
        super().check_training_readiness()
        self._check_fgn_params()

    def set_params(self, **kwargs):
        """Set parameters as skorch does; a new ``damping`` also resets ``damping_``.

        Parameters
        ----------
        **kwargs : dict
            Parameter names and values.

        Returns
        -------
        self : FGNNeuralNetClassifier
            The net.
        """
        super().set_params(**kwargs)
        if "damping" in kwargs and hasattr(self, "damping_"):
            self.damping_ = self.damping  # checked before the next training step
        return self

    def initialize_criterion(self):
        """Initialise the criterion and check that it is cross-entropy.

        Returns
        -------
        self : FGNNeuralNetClassifier
            The net, with ``criterion_`` set.
        """
        super().initialize_criterion()
        _check_criterion(self.criterion_)
        return self

    def train_step(self, batch, **fit_params):
        """Take one damped FGN step on ``batch`` (skorch's training hook).

        Parameters
        ----------
        batch : tuple
            ``(X, y)`` from the training iterator.
        **fit_params : dict
            Extra keyword arguments of the module's ``forward``.

        Returns
        -------
        dict
            ``{"loss": objective before the step, "y_pred": logits before the step}``.
        """
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        X = to_tensor(Xi, device=self.device)
        y, sample_weight, n_labels = _labels_and_weights(self.criterion_, to_tensor(yi, device=self.device))
        params = _trainable_params(self.module_)
        first = next(iter(params.values()))
        logits_fn = _make_logits_fn(self.module_, fit_params, _draw_seed(), first.device)
        logits_fn = _checked_logits_fn(logits_fn, n_labels, self.criterion_.weight)
        _update_running_stats(self.module_, logits_fn, params, X)
        damping = self.damping_ if self.damping_schedule == "adaptive" else float(self.damping)
        # FGNClassifier's step path and "auto" rules (sklearn_fgn._stepper), built from this step's
        # settings (set_params may change them between steps; alpha scales with the epoch's split);
        # the state the next step reads is kept from step to step.
        stepper = Stepper(self._loop_config(y), self.batch_size == -1, n_labels, first.dtype)
        state = getattr(self, "_step_state", None) or StepperState()
        with _no_running_stats(self.module_), _clear_buffer_errors(), _nonfinite_input_named(X):
            result, new_params, _, record = stepper.step(
                logits_fn, params, Batch(X, y, sample_weight), damping, state
            )
        if self.damping_schedule == "adaptive":
            self.damping_ = record.next_damping
        if record.accepted:
            _write_params(self.module_, new_params)
        self._step_state = state
        self._record_step(result, record)
        return {"loss": result.loss, "y_pred": result.logits}

    def _loop_config(self, y: Tensor) -> LoopConfig:
        """Return the step settings as :class:`._solver.LoopConfig` (CG only: a module has no Gram)."""
        return LoopConfig(
            alpha=self._mean_alpha(y), damping=float(self.damping), curvature=self.curvature, solver="cg",
            damping_schedule=self.damping_schedule, cg_tol=self.cg_tol, cg_max_iter=self.cg_max_iter,
        )  # fmt: skip

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        """Record the training split's size, which scales ``alpha`` (skorch's epoch hook)."""
        super().on_epoch_begin(net, dataset_train=dataset_train, dataset_valid=dataset_valid, **kwargs)
        self._n_train = None if dataset_train is None else len(dataset_train)

    def _mean_alpha(self, y: Tensor) -> float:
        """``alpha / n_train``: the penalty on the batch's mean loss."""
        n_train = getattr(self, "_n_train", None) or y.shape[0]
        return float(self.alpha) / n_train

    def _record_step(self, result: StepResult, record: StepRecord) -> None:
        """Record the step in ``history``'s current batch row; outside ``fit`` without one, nowhere.

        ``fit`` opens a row per batch; a caller of ``train_step`` outside
        ``fit`` opens one with ``history.new_epoch()`` and ``history.new_batch()``.
        """
        if not (len(self.history) and self.history[-1]["batches"]):
            return
        step_norm = record.step_size * math.sqrt(sum(float((t * t).sum()) for t in result.step.values()))
        self.history.record_batch("loss", record.loss)
        self.history.record_batch("damping", record.damping)
        self.history.record_batch("cg_iter", record.cg_iter)
        self.history.record_batch("step_norm", step_norm)
        self.history.record_batch("accepted", record.accepted)
        self.history.record_batch("step_size", record.step_size)

    def _check_fgn_params(self) -> None:
        if self.solver == "cholesky":
            raise ValueError(
                "solver='cholesky' is not available for arbitrary modules: the exact Gram needs the "
                "per-layer structure of an FGNClassifier head. Use solver='cg'."
            )
        _check_option("solver", self.solver, SOLVERS)
        check_step_options(
            damping=self.damping, damping_schedule=self.damping_schedule, curvature=self.curvature,
            cg_tol=self.cg_tol, cg_max_iter=self.cg_max_iter, alpha=self.alpha,
        )  # fmt: skip


def _check_option(name: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}; got {value!r}.")


def _check_criterion(criterion: object) -> None:
    # Raise ``ValueError`` unless ``criterion`` is mean-reduced, unsmoothed cross-entropy.
    if not isinstance(criterion, torch.nn.CrossEntropyLoss):
        raise ValueError(
            "FGNNeuralNetClassifier needs criterion=torch.nn.CrossEntropyLoss (the module returns "
            f"logits); got {type(criterion).__name__}."
        )
    if criterion.reduction != "mean" or criterion.label_smoothing != 0.0:
        raise ValueError(
            "FGNNeuralNetClassifier needs CrossEntropyLoss(reduction='mean', label_smoothing=0.0); "
            f"got reduction={criterion.reduction!r}, label_smoothing={criterion.label_smoothing!r}."
        )
    if criterion.weight is not None and not bool(
        (criterion.weight >= 0).all() and criterion.weight.sum() > 0
    ):
        raise ValueError("criterion__weight must be non-negative with a positive sum.")


def _labels_and_weights(criterion: torch.nn.CrossEntropyLoss, y: Tensor) -> tuple[Tensor, Tensor | None, int]:
    # Labels with ignored rows set to class 0, per-example weights as in torch's mean CE
    # (``weight[y]``, 1 without class weights, 0 where ``y == ignore_index``; None means
    # uniform) and the number of classes the labels need.
    y, kept, n_labels, all_kept = _labels(y, criterion.ignore_index)
    y = torch.where(kept, y, 0)
    weight = criterion.weight
    if weight is None:
        return y, None if all_kept else kept.float(), n_labels
    if n_labels > weight.shape[0]:  # before indexing; _check_logits compares with n_classes
        raise ValueError(
            f"criterion__weight has {weight.shape[0]} entries but y has the label {n_labels - 1}: "
            "labels must be in [0, n_classes) and criterion__weight needs one entry per class."
        )
    return y, weight.to(y.device)[y] * kept, n_labels


def _labels(y: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, int, bool]:
    # int64 labels, the mask of rows that count, largest label + 1 and whether every row
    # counts; raise on fractional or negative labels. One host sync for all the checks.
    fractional = (y != y.round()).sum() if y.is_floating_point() else torch.zeros((), device=y.device)
    y_int = y.long()
    kept = y_int != ignore_index
    low = torch.where(kept, y_int, torch.iinfo(torch.int64).max).min()
    high = torch.where(kept, y_int, -1).max()
    n_fractional, n_kept, low, high = torch.stack([fractional.long(), kept.sum(), low, high]).tolist()
    if n_fractional:
        bad = float(y[y != y.round()][0])
        raise ValueError(f"y must hold class indices; got the non-integer value {bad!r}.")
    if n_kept == 0:
        raise ValueError(
            f"Every row of the batch has y == ignore_index ({ignore_index}): its "
            "cross-entropy is undefined (torch gives NaN). Give each batch at least one labelled row."
        )
    if low < 0:
        raise ValueError(f"y must be class indices >= 0 (or ignore_index={ignore_index}); got {low}.")
    return y_int, kept, high + 1, n_kept == y.shape[0]


def _checked_logits_fn(logits_fn: LogitsFn, n_labels: int, class_weight: Tensor | None) -> LogitsFn:
    # ``logits_fn`` that checks each output against the labels (``n_labels`` = largest label + 1)
    # and the class weights; shape checks only, so the cost is nil.
    n_weights = None if class_weight is None else class_weight.shape[0]

    def checked(params: Params, X) -> Tensor:
        logits = logits_fn(params, X)
        _check_logits(logits, n_labels, n_weights)
        return logits

    return checked


def _check_logits(logits: object, n_labels: int, n_weights: int | None) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"The module's forward must return a Tensor of logits; got {type(logits).__name__}. "
            "Wrap a module that returns several outputs so that it returns the logits only."
        )
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"The module must return logits of shape (n_samples, n_classes >= 2) for "
            f"CrossEntropyLoss; got shape {tuple(logits.shape)}."
        )
    n_classes = logits.shape[1]
    if n_labels > n_classes:
        raise ValueError(
            f"y must be in [0, n_classes) = [0, {n_classes}) (n_classes: the module's logits "
            f"columns) or equal ignore_index; got {n_labels - 1}."
        )
    if n_weights is not None and n_weights != n_classes:
        raise ValueError(
            f"criterion__weight has {n_weights} entries; the module returns {n_classes} classes."
        )


def _trainable_params(module: torch.nn.Module) -> Params:
    params = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "The module has no trainable parameters (every parameter has requires_grad=False), "
            "so FGN has nothing to fit."
        )
    return params


def _draw_seed() -> int:
    # A seed from torch's global generator (so ``torch.manual_seed`` makes fits repeatable).
    return int(torch.randint(0, 2**62, (1,)))


@contextmanager
def _replayed_rng(seed: int, device: torch.device) -> Generator[None, None, None]:
    # Run the block with the global generators of CPU and ``device`` seeded by ``seed``, then restore.
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _make_logits_fn(module: torch.nn.Module, fit_params: dict, seed: int, device: torch.device) -> LogitsFn:
    # ``(params, X) -> module(X)`` through ``functional_call``, with the same random draws every call.

    def logits_fn(params: Params, X) -> Tensor:
        args, kwargs = ((), {**X, **fit_params}) if isinstance(X, Mapping) else ((X,), fit_params)
        with _replayed_rng(seed, device):
            return torch.func.functional_call(module, params, args, kwargs)

    return logits_fn


def _batch_norms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


def _update_running_stats(module: torch.nn.Module, logits_fn: LogitsFn, params: Params, X) -> None:
    # One plain forward pass at ``params`` if the module has batch norms that track statistics.
    if _batch_norms(module):
        with torch.no_grad():
            logits_fn(params, X)


@contextmanager
def _no_running_stats(module: torch.nn.Module) -> Generator[None, None, None]:
    # Batch norms use batch statistics without touching their buffers (``torch.func`` forbids it).
    norms = _batch_norms(module)
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


@contextmanager
def _clear_buffer_errors() -> Generator[None, None, None]:
    # Turn ``torch.func``'s error on in-place buffer updates into a clear ``ValueError``.
    try:
        yield
    except RuntimeError as exc:
        if "mutate a captured Tensor" not in str(exc):
            raise
        raise ValueError(
            "The module changes a buffer in place during forward (e.g. running statistics of a "
            "normalisation layer other than batch norm), which FGN's JVP/VJP of the module cannot "
            "follow. Put that layer in eval mode or disable its running statistics."
        ) from exc


@contextmanager
def _nonfinite_input_named(X) -> Generator[None, None, None]:
    """Re-raise a failed step's ``ValueError`` as one that names non-finite values of the batch's ``X``.

    skorch hands ``X`` to the module unchecked: a NaN or infinity there
    makes the logits and the gradient non-finite, which the step would
    otherwise report as an overflow. ``X`` is read only when the step
    fails.

    Raises
    ------
    ValueError
        ``X`` (a tensor, or a mapping of them) holds NaN or infinity; the
        step's own error, unchanged, otherwise.
    """
    try:
        yield
    except ValueError as exc:
        for key, tensor in X.items() if isinstance(X, Mapping) else [(None, X)]:
            if not (isinstance(tensor, Tensor) and tensor.is_floating_point()):
                continue
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if nan or inf:
                found = " and ".join(
                    f"{count} {what}" for count, what in ((nan, "NaN"), (inf, "infinite")) if count
                )
                where = "X" if key is None else f"X[{key!r}]"
                raise ValueError(
                    f"{where} of the training batch contains {found} "
                    "value(s); FGNNeuralNetClassifier, as skorch, passes X to the module unchecked. "
                    "Remove or impute them (e.g. sklearn.impute.SimpleImputer)."
                ) from exc
        raise


def _write_params(module: torch.nn.Module, new: Params) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in new:
                param.copy_(new[name])
