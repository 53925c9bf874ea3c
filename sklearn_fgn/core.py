"""The step kernel, public: what benchmarks, the paper scripts and other front ends build on.

:func:`compute_step` computes one damped FGN (or full-GGN) step of a logits
map on one batch (docs/design.md §2-§5): a :class:`Head` (linear or MLP,
``Head(n_features, n_logits, hidden=...)``) or any pure function
``logits_fn(params, X) -> logits``. The other names are its pieces: the
objective, the damped system and its curvature sample, the logit-space
curvature, conjugate gradient and the preconditioners (tried in the order of
:data:`PRECONDITIONERS`; a new one is a :class:`Preconditioner` subclass
placed there). The estimators (:class:`sklearn_fgn.FGNClassifier`, the skorch
net) add the damping schedule, the stopping rules and the batches on top.
The constants of their rules are :class:`Tuning`'s; :func:`tuning_context`
changes them for the fits inside a ``with`` block.

Everything here takes and returns torch tensors on the caller's device and
dtype, and imports nothing from scikit-learn.
"""

from ._cg import CGResult, conjugate_gradient
from ._curvature import LogitsFn, damping_diagonal, linearize, make_fgn_operator, make_ggn_operator
from ._heads import Head, Params, forward, init_params, is_penalized
from ._margin import (
    LogitCurvature,
    MarginStats,
    competitor_log_proba,
    curvature_weight,
    margin,
    margin_direction,
)
from ._objective import flatten, normalized_weights, objective, objective_from_logits, unflatten
from ._preconditioners import (
    PRECONDITIONERS,
    ClassMeans,
    GramCholesky,
    HardRows,
    Kronecker,
    Preconditioner,
    PreconditionerRequest,
    choose_preconditioner,
)
from ._step import StepResult, compute_step
from ._system import CurvatureSample, DampedSystem, StepOptions, build_system
from ._tuning import Tuning, get_tuning, tuning_context

__all__ = [
    "PRECONDITIONERS",
    "CGResult",
    "ClassMeans",
    "CurvatureSample",
    "DampedSystem",
    "GramCholesky",
    "HardRows",
    "Head",
    "Kronecker",
    "LogitCurvature",
    "LogitsFn",
    "MarginStats",
    "Params",
    "Preconditioner",
    "PreconditionerRequest",
    "StepOptions",
    "StepResult",
    "Tuning",
    "build_system",
    "choose_preconditioner",
    "competitor_log_proba",
    "compute_step",
    "conjugate_gradient",
    "curvature_weight",
    "damping_diagonal",
    "flatten",
    "forward",
    "get_tuning",
    "init_params",
    "is_penalized",
    "linearize",
    "make_fgn_operator",
    "make_ggn_operator",
    "margin",
    "margin_direction",
    "normalized_weights",
    "objective",
    "objective_from_logits",
    "tuning_context",
    "unflatten",
]
