"""The fitted model: its parameters as tensors, as fitted attributes, and back.

A fit starts from parameters drawn by :func:`initial_params` (or given by
``coef_init``/``intercept_init``, or resumed from the attributes of the
previous fit, :func:`resumed_state`), and ends by storing them as numpy
attributes (:func:`store_fitted`). Fitted attributes never hold tensors,
so that a model fitted on a GPU unpickles and predicts where there is none.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ._device import torch_dtype
from ._heads import COEF, INTERCEPT, coef_key, init_params, intercept_key
from ._solver import LoopState

__all__ = [
    "check_same_classes",
    "fitted_attributes",
    "initial_params",
    "params_from_attributes",
    "restored_on_error",
    "resumed_state",
    "store_fitted",
    "warn_if_nothing_learned",
]


@contextlib.contextmanager
def restored_on_error(estimator):
    """On an exception, put the fitted state back as it was (fitted or not), then re-raise.

    Fitted attributes (``name_``) and private state (``_name``) are saved
    before a fit; a fit that raises midway leaves no mix of old and new.

    Yields
    ------
    None
    """
    saved = {k: v for k, v in vars(estimator).items() if k.endswith("_") or k.startswith("_")}
    try:
        yield
    except BaseException:
        for k in [k for k in vars(estimator) if k.endswith("_") or k.startswith("_")]:
            delattr(estimator, k)
        vars(estimator).update(saved)
        raise


def initial_params(head, dtype, rng, coef_init, intercept_init):
    """Draw ``head``'s parameters (seeded by one draw of ``rng``), then apply a linear head's init.

    Returns
    -------
    dict of Tensor
        CPU tensors in the torch dtype of ``dtype``.
    """
    generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
    params = init_params(head, generator, torch_dtype(dtype), "cpu")
    return _apply_linear_init(head, params, coef_init, intercept_init)


def _apply_linear_init(head, params, coef_init, intercept_init):
    """Replace the linear head's drawn parameters by ``coef_init`` and ``intercept_init`` where given.

    Returns
    -------
    dict of Tensor
        ``params``, updated in place.

    Raises
    ------
    ValueError
        For an init of an MLP head, an intercept without ``fit_intercept``,
        a wrong shape or a value that is not finite.
    """
    if coef_init is None and intercept_init is None:
        return params
    if not head.is_linear:
        raise ValueError(
            "coef_init and intercept_init apply to the linear head (hidden_layer_sizes=()) only."
        )
    dtype = params[COEF].dtype
    if coef_init is not None:
        coef = torch.as_tensor(np.asarray(coef_init, dtype=np.float64), dtype=dtype)
        if coef.shape != params[COEF].shape:
            raise ValueError(
                f"coef_init has shape {tuple(coef.shape)}; expected {tuple(params[COEF].shape)}."
            )
        _check_finite_init("coef_init", coef)
        params[COEF] = coef
    if intercept_init is not None:
        if not head.fit_intercept:
            raise ValueError("intercept_init was given but fit_intercept=False.")
        bias = torch.as_tensor(np.asarray(intercept_init, dtype=np.float64), dtype=dtype).reshape(-1)
        if bias.shape != params[INTERCEPT].shape:
            raise ValueError(
                f"intercept_init has shape {tuple(bias.shape)}; "
                f"expected {tuple(params['intercept_0'].shape)}."
            )
        _check_finite_init("intercept_init", bias)
        params[INTERCEPT] = bias
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


def params_from_attributes(estimator, head, dtype):
    """Parameters of ``estimator``'s previous fit as CPU tensors, or None if they do not fit ``head``.

    Returns
    -------
    dict of Tensor or None
    """
    if not hasattr(estimator, "damping_") or estimator._head != head:
        return None
    if head.is_linear:
        weights, biases = [estimator.coef_], [estimator.intercept_]
    else:
        weights, biases = [w.T for w in estimator.coefs_], list(estimator.intercepts_)
    params = {}
    for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        params[coef_key(layer)] = torch.tensor(np.asarray(weight, dtype=dtype))
        if head.fit_intercept:
            params[intercept_key(layer)] = torch.tensor(np.asarray(bias, dtype=dtype))
    return params


def resumed_state(estimator, head, dtype):
    """Return the loop state a warm start or a later ``partial_fit`` resumes (None: no previous fit).

    Returns
    -------
    LoopState or None
    """
    params = params_from_attributes(estimator, head, dtype)
    if params is None:
        return None
    best_loss = math.inf if estimator.best_loss_ is None else estimator.best_loss_
    return LoopState(
        params, estimator.damping_, estimator.n_iter_, estimator.t_, list(estimator.loss_curve_),
        list(estimator.validation_scores_ or []), best_loss,
        no_improvement_count=estimator._no_improvement_count,
    )  # fmt: skip


def store_fitted(estimator, head, state):
    """Set ``estimator``'s fitted attributes from ``state`` (parameters in the features' coordinates)."""
    attributes = fitted_attributes(head, state, float(estimator.alpha))
    for stale in {"coef_", "intercept_", "coefs_", "intercepts_"} - attributes.keys():
        estimator.__dict__.pop(stale, None)  # left by a fit with the other kind of head
    for name, value in attributes.items():
        setattr(estimator, name, value)
    estimator._no_improvement_count = state.no_improvement_count


def fitted_attributes(head, state, alpha):
    """Return the fitted attributes for ``state``, as CPU numpy arrays.

    ``alpha``: the estimator's; without a penalty the linear head's
    coefficients are centred over the classes as well (see :func:`_centred_over_classes`).

    Returns
    -------
    dict
        Attribute names to values.

    Raises
    ------
    ValueError
        When a parameter is not finite.
    """
    params = {k: t.detach().cpu().numpy().copy() for k, t in state.params.items()}
    early_stopping = bool(state.validation_scores)
    if not all(np.all(np.isfinite(p)) for p in params.values()):
        raise ValueError(
            "The fit produced non-finite parameters; scale the features or raise alpha or damping."
        )
    weights = [params[coef_key(layer)] for layer in range(head.n_layers)]
    biases = [
        params[intercept_key(layer)] if head.fit_intercept else np.zeros(w.shape[0], dtype=w.dtype)
        for layer, w in enumerate(weights)
    ]
    if head.is_linear:
        attributes = _centred_over_classes(weights[0], biases[0], head, alpha == 0.0)
    else:
        attributes = {"coefs_": [w.T.copy() for w in weights], "intercepts_": biases}
    return attributes | {
        "_head": head, "n_iter_": state.n_iter, "t_": state.t, "damping_": state.damping,
        "loss_curve_": list(state.loss_curve),
        "validation_scores_": list(state.validation_scores) if early_stopping else None,
        "best_loss_": None if early_stopping else state.best_loss,
        "best_validation_score_": max(state.validation_scores) if state.validation_scores else None,
    }  # fmt: skip


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


def check_same_classes(previous, classes):
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


def warn_if_nothing_learned(head, state, y_enc, sample_weight, alpha):
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
