"""A fit's data, prepared once: class weights, the validation split, tensors and the feature metric.

What a fit needs besides ``alpha`` (:func:`prepare_data`): the sample
weights times the class weights, the training and validation rows on the
compute device (:class:`._solver.TrainingData`) and the first layer's
feature metric (``docs/design.md`` §4), in whose whitened coordinates the
fit runs. A regularisation path (FGNClassifierCV) prepares its rows once
for all its ``alpha``; the helpers at the end map parameters into the fit's
coordinates and back.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from ._arrays import nbytes, random_access
from ._batches import RowSubset, Shard, TrainingData
from ._device import fits_on, to_tensor
from ._distributed import SINGLE
from ._heads import COEF, coef_key
from ._metric import (
    FeatureMetric,
    feature_moments,
    feature_standardization,
    is_diagonal_metric,
    make_feature_metric,
    standardized_first_layer,
    unwhitened_params,
    whitened_params,
)
from ._ranks import rows_on_this_rank
from ._tuning import get_tuning

__all__ = [
    "PreparedData",
    "can_stratify",
    "class_weighted",
    "in_row_order",
    "in_feature_coordinates",
    "null_loss",
    "penalty_coefficients",
    "prepare_data",
    "to_fit_coordinates",
]

# scikit-learn 1.9 weighs "balanced" classes by their sample-weighted frequency.
_CLASS_WEIGHT_TAKES_SAMPLE_WEIGHT = "sample_weight" in inspect.signature(compute_class_weight).parameters


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """What a fit needs besides ``alpha``, prepared once per fit (or per regularisation path).

    Attributes
    ----------
    sample_weight : ndarray of shape (n_samples,)
        Sample weights times class weights, of all rows (every rank's, before the validation split).
    data : TrainingData
        The training (and validation) rows this rank holds, on the compute device.
    metric : FeatureMetric or None
        The first layer's feature metric, in the data's dtype on the compute
        device; None in the identity metric.
    """

    sample_weight: np.ndarray
    data: TrainingData
    metric: FeatureMetric | None


def prepare_data(estimator, plan, sample_weight):
    """Class weights, the tensors and the feature metric of ``plan`` (a :class:`._plan.FitPlan`).

    ``sample_weight``: of all rows, before class weights. The validation
    split (``plan.n_validation`` rows) draws from ``estimator._rng``; the
    metric follows ``estimator.damping_metric``.

    Returns
    -------
    PreparedData
    """
    sample_weight = class_weighted(sample_weight, plan.y_enc, estimator.class_weight, estimator.classes_)
    train, val = np.arange(plan.y_enc.shape[0]), None
    if plan.early_stopping:
        n_classes = len(estimator.classes_)
        train, val = validation_split(
            plan.y_enc, sample_weight, plan.n_validation, n_classes, estimator.validation_fraction,
            estimator._rng,
        )  # fmt: skip
    data, metric = _training_data(plan, sample_weight, train, val, estimator.damping_metric)
    return PreparedData(sample_weight, data, metric)


def class_weighted(sample_weight, y_enc, class_weight, classes):
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
    if class_weight is not None:
        present = np.unique(y_enc)
        extra = {"sample_weight": sample_weight} if _CLASS_WEIGHT_TAKES_SAMPLE_WEIGHT else {}
        per_class = compute_class_weight(class_weight, classes=classes[present], y=classes[y_enc], **extra)
        if not np.all(np.isfinite(per_class)):
            raise ValueError(f"class_weight must be finite; got {class_weight!r}.")
        sample_weight = sample_weight * per_class[np.searchsorted(present, y_enc)]
        if np.any(sample_weight < 0):
            raise ValueError(f"class_weight must be non-negative; got {class_weight!r}.")
    if not sample_weight.sum() > 0:
        raise ValueError("sample_weight (times class_weight) sums to zero: there is nothing to fit.")
    return sample_weight


def can_stratify(y_enc, n_validation, n_classes):
    """Return whether a stratified split of ``n_validation`` rows is possible.

    It needs two samples of every class and a validation share (and a
    training share) with room for each class.

    Returns
    -------
    bool
    """
    n_samples = y_enc.shape[0]
    counts = np.bincount(y_enc, minlength=n_classes)
    return bool(counts.min() >= 2 and min(n_validation, n_samples - n_validation) >= n_classes)


def validation_split(y_enc, sample_weight, n_validation, n_classes, validation_fraction, rng):
    """Hold out ``n_validation`` rows: stratified when every class can give the split a sample.

    ``validation_fraction``: the setting that gave ``n_validation``, for the error message.

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
    if n_validation < 2 or n_validation >= n_samples:
        raise ValueError(
            f"early_stopping with validation_fraction={validation_fraction} holds out {n_validation} "
            f"of {n_samples} samples; it needs at least 2 and must leave some for training. "
            "Change validation_fraction or set early_stopping=False."
        )
    train, val = train_test_split(
        np.arange(n_samples), test_size=n_validation,
        stratify=y_enc if can_stratify(y_enc, n_validation, n_classes) else None,
        random_state=rng,
    )  # fmt: skip
    if not sample_weight[val].sum() > 0:
        raise ValueError("The sample weights of the validation split sum to zero; set early_stopping=False.")
    return train, val


def _training_data(plan, sample_weight, train, val, damping_metric):
    """Tensors for the loop, and the feature metric (None in the identity metric).

    ``train`` and ``val``: rows of all ranks (``val`` None without a
    hold-out). With ``plan.layout`` (a data-parallel fit) each rank keeps
    the training and validation rows it holds (:class:`._batches.Shard`).

    Returns
    -------
    data : TrainingData
    metric : FeatureMetric or None
        In the data's dtype, on the compute device.
    """
    X, y_enc, device = plan.X, plan.y_enc, plan.device
    X_t = to_tensor(X, device, host=not fits_on(device, nbytes(X)))
    offset = 0 if plan.layout is None else plan.layout.offset
    X_val = y_val = w_val = None
    if val is not None:  # the training rows stay in X: a RowSubset gathers them batch by batch
        local_val = rows_on_this_rank(val, offset, X_t.shape[0])
        with random_access(X):  # scattered rows: no read-ahead around each on a memmap
            X_val = X_t[torch.from_numpy(local_val - offset).to(X_t.device)].to(device)
        y_val = to_tensor(y_enc[local_val].astype(np.int64), device)
        w_val = None if np.all(sample_weight[val] == 1) else to_tensor(sample_weight[local_val], device)
    positions = np.flatnonzero((train >= offset) & (train < offset + X_t.shape[0]))
    rows = train[positions]  # the training rows held here, in the order of the training set
    if val is not None:
        X_t = RowSubset(X_t, torch.from_numpy(rows - offset))
    shard = None
    if plan.layout is not None:
        shard = Shard(torch.from_numpy(positions), train.shape[0], float(sample_weight[train].sum()))
    weights = None if np.all(sample_weight[train] == 1) else to_tensor(sample_weight[rows], X_t.device)
    y_t = to_tensor(y_enc[rows].astype(np.int64), X_t.device)
    metric = _feature_metric(X_t, weights, plan.head, device, plan.comm, damping_metric)
    transform = None
    if plan.full_batch_rows and isinstance(X_t, RowSubset):
        X_t = X_t.materialize()
    if metric is not None:
        X_val = None if X_val is None else metric.whiten(X_val)
        if plan.full_batch_rows:
            X_t = metric.whiten(X_t)  # once
        else:
            transform = metric.whiten  # per batch: no whitened copy of X
    data = TrainingData(X_t, y_t, weights, device, X_val, y_val, w_val, transform, shard)
    return data, metric


def _feature_metric(X, sample_weight, head, device, comm, damping_metric):
    """Return the first layer's feature metric (:mod:`._metric`) from the training rows, or None.

    None where ``damping_metric`` is ``"identity"`` (``"auto"`` for MLP
    heads). With ``comm`` from all ranks' rows; every rank takes rank 0's
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
    if damping_metric == "identity" or (damping_metric == "auto" and not head.is_linear):
        return None
    diagonal = is_diagonal_metric(X.shape[1])  # it needs the variances only
    moments = feature_moments(*in_row_order(X, sample_weight), comm, diagonal=diagonal)
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


def penalty_coefficients(alpha, head, metric, data):
    """Return ``alpha / sum(s)`` for the loop (the penalty on the mean loss), per column when whitened.

    ``alpha``: the estimator's. ``sum(s)`` is the total weight of the rows
    the fit trains on (their number without sample or class weights), so
    that ``alpha = 1 / C`` is ``LogisticRegression(C)``'s objective divided
    by ``sum(s)`` (``docs/design.md`` §1; the whitened penalty §4).

    Returns
    -------
    float or dict
        See :func:`._curvature.penalty_coefficients`.
    """
    alpha = alpha / data.weight_total
    if metric is None or alpha == 0.0:
        return alpha
    coefficients = dict.fromkeys((coef_key(layer) for layer in range(head.n_layers)), alpha)
    # alpha e in float64 (e alone may lie beyond float32's range, see FeatureMetric.to), then
    # capped at 1 / eps^2: a column with a larger coefficient keeps a whitened weight (about
    # gradient / coefficient) far below the dtype's rounding of the logits either way, and the
    # cap keeps the products of coefficients, weights and steps within the dtype's range.
    dtype = metric.mean.dtype
    cap = torch.finfo(dtype).eps ** -2
    coefficients[COEF] = (alpha * metric.penalty.double()).clamp_max(cap).to(dtype)
    return coefficients


def to_fit_coordinates(head, params, data, metric, drawn, comm=SINGLE, damping=1.0):
    """Parameters on the device, in the coordinates of the fit (whitened features in the feature metric).

    ``drawn``: ``params`` come from :func:`._heads.init_params`; an MLP's
    first layer is then rescaled to the features' spread
    (:func:`._metric.standardized_first_layer`). With ``comm`` every rank
    starts from rank 0's parameters. ``damping``: the estimator's; a drawn
    MLP head in the identity metric raises ``ValueError`` where
    :func:`_check_first_layer_can_learn` does.

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
            mean, scale = feature_standardization(*in_row_order(data.X, data.sample_weight), comm)
            _check_first_layer_can_learn(scale, data.X.dtype, damping)
        params = standardized_first_layer(params, mean, scale)
    return params if metric is None else whitened_params(metric, params)


def in_feature_coordinates(metric, params):
    """Map parameters of a fit in whitened coordinates back to the features' (identity without a metric).

    Returns
    -------
    dict of Tensor
    """
    return params if metric is None else unwhitened_params(metric, params)


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
        When the features' largest variance is below ``eps * min(damping, damping_bounds[0])``.
    """
    variance = float(scale.double().min()) ** -2  # constant features get the others' scale
    floor = min(float(damping), get_tuning().damping_bounds[0])
    if variance < torch.finfo(dtype).eps * floor:
        raise ValueError(
            f"The features' largest variance is {variance:.3g}: an MLP head damped in the identity "
            "metric (damping_metric='identity', which 'auto' means for MLP heads) cannot learn its first "
            f"layer from them, as its curvature is below {dtype}'s rounding of the damping "
            f"({floor:.3g} at least). Scale the features (e.g. StandardScaler) or set "
            "damping_metric='features'."
        )


def in_row_order(X, sample_weight):
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


def null_loss(head, y_enc, sample_weight):
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
