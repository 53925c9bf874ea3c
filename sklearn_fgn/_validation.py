"""What a fit accepts: its data, its settings across parameters, its classes.

:func:`setup_fit` validates a fit's data (on every rank of a data-parallel
fit, which all raise if one does) and sets ``classes_`` and the fit's random
state; ``partial_fit`` checks its own call with :func:`check_partial_fit_params`.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

from ._arrays import check_training_data, numpy_dtype
from ._device import resolve_device
from ._distributed import communicator
from ._plan import PLAIN_FIT
from ._ranks import (
    every_rank_raises_if_one_does,
    gather_labels_and_weights,
    seed_of_rank_zero,
    settings_ranks_share,
)

__all__ = ["check_classes", "check_params", "check_partial_fit_params", "setup_fit"]


def setup_fit(estimator, X, y, sample_weight, search=PLAIN_FIT):
    """Validate the data and settings; set ``estimator.classes_`` and ``_rng``; return what a fit needs.

    With ``estimator.distributed``, ``X`` is this rank's shard and ``y_enc``
    and ``sample_weight`` are every rank's, concatenated in rank order. A
    search's fit (``search.validated``) takes its rows as validated and
    ``search.classes`` as its classes.

    Returns
    -------
    tuple
        ``(X, y_enc, sample_weight, head, layout)``; ``layout`` is None
        in a single process, else a :class:`._ranks.RowLayout`.
    """
    comm = communicator(estimator.distributed)
    with every_rank_raises_if_one_does(comm):  # every rank raises if one's data fail validation
        if search.validated:
            X, sample_weight = _adopt_validated(estimator, X, sample_weight)
        else:
            X, y, sample_weight = check_training_data(estimator, X, y, sample_weight, reset=True)
        hidden = check_params(estimator)
    settings = settings_ranks_share(estimator)
    y, sample_weight, layout = gather_labels_and_weights(comm, X, y, sample_weight, settings)
    if search.classes is None:
        estimator.classes_, y_enc = np.unique(y, return_inverse=True)
    else:  # a superset of y's labels, sorted (FGNClassifierCV's folds)
        estimator.classes_, y_enc = search.classes, np.searchsorted(search.classes, y)
    check_classes(estimator.classes_)
    estimator._rng = np.random.RandomState(seed_of_rank_zero(comm, estimator.random_state))
    return X, y_enc, sample_weight, estimator._make_head(hidden, X.shape[1]), layout


def _adopt_validated(estimator, X, sample_weight):
    """Take rows a search validated as this fit's: set ``n_features_in_`` as validation would.

    The weights are cast to the features' numpy dtype, as validation casts
    them (a search may fit float64 rows in float32).

    Returns
    -------
    tuple
        ``(X, sample_weight)``.
    """
    estimator.n_features_in_ = X.shape[1]
    estimator.__dict__.pop("feature_names_in_", None)
    return X, np.asarray(sample_weight, dtype=numpy_dtype(X.dtype))


def check_params(estimator):
    """Check the cross-parameter rules of ``estimator``.

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
    sizes = np.atleast_1d(np.asarray(estimator.hidden_layer_sizes, dtype=object))
    if sizes.ndim != 1 or not all(
        isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(
            f"hidden_layer_sizes must be a tuple of positive ints; got {estimator.hidden_layer_sizes!r}."
        )
    resolve_device(estimator.device)
    return tuple(int(s) for s in sizes)


def check_partial_fit_params(estimator, classes):
    """Check the settings and ``classes`` of a ``partial_fit`` call.

    Raises
    ------
    ValueError
        For ``early_stopping=True``, ``class_weight="balanced"``, or
        ``classes`` that are not a non-empty 1-D array without NaN.
    """
    if estimator.early_stopping is True:
        raise ValueError("partial_fit does not support early_stopping=True (it runs one epoch).")
    if isinstance(estimator.class_weight, str):  # "balanced" of one chunk is not of the data
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


def check_classes(classes):
    """Raise unless there are at least two classes to tell apart.

    Raises
    ------
    ValueError
        For a single class.
    """
    if len(classes) < 2:
        raise ValueError(
            f"This solver needs samples of at least 2 classes in the data, but the data "
            f"contains only one class: {classes[0]!r}."
        )
