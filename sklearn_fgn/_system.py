r"""The damped system of one batch, its curvature sample, and the quadratic model along a step.

Phase 1 of a step (:func:`build_system`): linearise the logits map, take
the loss and gradient on every row, form the curvature operator ``B``
(``G = B^T B``, FGN or full GGN) and the damping ``Lambda``
(docs/design.md §2-§4). Subsampled Newton (docs/design.md §6) replaces the
operator's rows by a sample drawn by their curvature traces
(:func:`sample_curvature_rows`, :func:`subsampled_system`); the loss, the
gradient and the model along the step stay the whole batch's
(:func:`curvature_along`, :func:`quadratic_model`).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._curvature import (
    Alpha,
    LogitsFn,
    RowSpaceOperator,
    as_head,
    damping_diagonal,
    linearize,
    make_fgn_operator,
    make_ggn_operator,
    penalty_coefficients,
)
from ._distributed import SINGLE, Communicator
from ._heads import INTERCEPT, Head, Params
from ._margin import LogitCurvature, MarginStats
from ._objective import dot, loss_and_gradient, normalized_weights, weighted_sq
from ._quasi_newton import SecantMemory

__all__ = [
    "CurvatureSample",
    "DampedSystem",
    "StepOptions",
    "build_system",
    "curvature_along",
    "keep_margin_stats",
    "quadratic_model",
    "sample_curvature_rows",
    "subsampled_system",
    "whole_batch",
]


@dataclass(frozen=True)
class DampedSystem:
    """The damped system ``(G + Lambda) delta = -grad`` of one batch, before any solver sees it.

    Attributes
    ----------
    head : Head or callable
        The logits map.
    params : dict of Tensor
        Where it is linearised.
    X, y : Tensor
        The batch.
    lin : LogitsLinearization
        The logits map linearised at ``params``.
    stats : MarginStats
        Margin quantities of ``lin.logits``.
    weights : Tensor of shape (n,)
        Normalised example weights ``omega``.
    coefficients : dict
        Penalty coefficients (:func:`._curvature.penalty_coefficients`).
    loss : Tensor
        Objective at ``params`` (0-d; summed over the ranks).
    gradient : dict of Tensor
        Its gradient (summed over the ranks).
    operator : RowSpaceOperator
        ``B`` with ``G = B^T B`` (FGN or full GGN, per ``curvature``).
    fgn_operator : RowSpaceOperator
        FGN's ``B`` (the Gram-Cholesky preconditioner's, whatever ``curvature``).
    damping : dict
        ``Lambda`` per parameter (:func:`._curvature.damping_diagonal`).
    curvature : str
        ``"fgn"`` or ``"ggn"``.
    comm : Communicator
        Where the rows' sums go.
    sampled : bool
        Whether the rows are a curvature sample (:func:`subsampled_system`).
    """

    head: Head | LogitsFn
    params: Params
    X: Tensor
    y: Tensor
    lin: object
    stats: MarginStats
    weights: Tensor
    coefficients: dict
    loss: Tensor
    gradient: Params
    operator: RowSpaceOperator
    fgn_operator: RowSpaceOperator
    damping: dict
    curvature: str
    comm: Communicator
    sampled: bool = False

    @property
    def linear(self) -> bool:
        """Whether the logits are linear in the parameters (``J delta`` is then exact)."""
        return as_head(self.head).is_linear

    @property
    def n_logits(self) -> int:
        """``K``, the logits per row."""
        return self.stats.logits.shape[1]

    def logit_curvature(self) -> LogitCurvature:
        """Return the rows' logit-space curvature ``omega_i H_i`` (matrix, diagonal, trace, along a step)."""
        return LogitCurvature(self.stats, self.weights, self.curvature)


@dataclass(frozen=True)
class StepOptions:
    """How to compute one step (:func:`._step.compute_step`); every field has the one-step default.

    Attributes
    ----------
    alpha : float or dict, default=0.0
        L2 strength on weights, or the coefficient of each penalised
        parameter (a float or a broadcastable tensor, see
        :func:`._curvature.penalty_coefficients`). A :class:`Head`'s
        ``coef_*`` entries and a function's parameters with ``ndim >= 2``
        are penalised; biases and other 1-D parameters never.
    damping : float, default=1.0
        ``lambda > 0``.
    curvature : {"fgn", "ggn"}, default="fgn"
        FGN (n rows) or the full softmax GGN (n * n_classes rows).
    solver : {"auto", "cg", "cholesky"}, default="auto"
        ``"cholesky"`` preconditions CG with the exact FGN solve from the
        ``n x n`` Gram (a :class:`Head` only; a logits function raises
        ``ValueError``); ``"cg"`` with ``Lambda^-1`` (or a model of the
        linear head's curvature, see ``structured``). ``"auto"`` uses the
        Gram where it pays (:class:`._preconditioners.GramCholesky`).
    cg_tol, cg_max_iter : float, int
        CG's relative-residual tolerance (on the parameter-space system) and
        iteration cap.
    weight_total : float, optional
        Divide ``sample_weight`` by this instead of its sum: a mini-batch
        passes its size times the data set's mean weight
        (:func:`._objective.normalized_weights`).
    structured : bool, default=False
        The step is a full-batch step of a linear :class:`Head` on whitened
        features: CG may be preconditioned by the models of its curvature
        (hard rows, class means, Kronecker; :mod:`._preconditioners`).
    mixed_precision : bool, default=False
        For a linear head on float64 features, when ``cg_tol >=
        mixed_min_tol`` (:class:`._tuning.Tuning`): CG's curvature products in float32, the result
        checked (and if need be finished) in float64
        (:func:`._inner.solve_mixed`). The step then solves the float64
        system to ``cg_tol`` as without it.
    comm : Communicator, optional
        The batch is this rank's shard of a data-parallel batch
        (:mod:`._distributed`; ``weight_total`` is then the whole batch's):
        the loss, the gradient and every curvature product are summed over
        the ranks, and the Gram (which would span the ranks' rows) is not used.
    curvature_sample : CurvatureSample, optional
        Subsampled Newton (a linear :class:`Head` only): the loss, the
        gradient and the step's evaluation stay on every row, while the
        curvature ``G`` (CG's products and every preconditioner's statistics)
        is estimated on about ``curvature_sample.size`` rows drawn by their
        share of it (:func:`sample_curvature_rows`). The fixed
        point is unchanged (the gradient is exact); only the step's model is
        estimated. Ignored for other heads.
    secant : SecantMemory, optional
        The fit's secant pairs (a full-batch fit of a linear :class:`Head`):
        the step adds the pair its gradient completes
        (:meth:`._quasi_newton.SecantMemory.observe`). Ignored for other heads.
    quasi_newton : bool, default=False
        With ``secant``: the step's direction is the quasi-Newton one
        (:mod:`._quasi_newton`) instead of CG's solve of the damped system.
    """

    alpha: Alpha = 0.0
    damping: float = 1.0
    curvature: str = "fgn"
    solver: str = "auto"
    cg_tol: float = 1e-5
    cg_max_iter: int = 100
    weight_total: float | None = None
    structured: bool = False
    mixed_precision: bool = False
    comm: Communicator = SINGLE
    curvature_sample: CurvatureSample | None = None
    secant: SecantMemory | None = None
    quasi_newton: bool = False


def build_system(
    head: Head | LogitsFn, params: Params, X: Tensor, y: Tensor, sample_weight: Tensor | None,
    options: StepOptions, logits: Tensor | None = None, cache: dict | None = None,
) -> DampedSystem:  # fmt: skip
    """Linearise, take the loss and gradient, and form the operator and the damping (phase 1 of a step).

    Arguments as :func:`._step.compute_step` (of ``options``: ``alpha``,
    ``damping``, ``curvature``, ``weight_total`` and ``comm``). Cost: one
    forward pass (none for a linear head given ``logits``) and one VJP.
    ``cache[_MARGIN_STATS]``, kept by the step that evaluated ``logits``
    (:func:`keep_margin_stats`), saves their margins' softmax pass.

    Returns
    -------
    DampedSystem
    """
    alpha, damping, curvature, comm = options.alpha, options.damping, options.curvature, options.comm
    lin = linearize(head, params, X, logits)
    weights = normalized_weights(sample_weight, y.shape[0], lin.logits, options.weight_total)
    coefficients = penalty_coefficients(head, params, alpha)
    stats = _margin_stats(lin.logits, y, cache)
    loss, grad = loss_and_gradient(lin, stats, params, weights, coefficients, comm)
    fgn_op = make_fgn_operator(lin, y, weights, stats)
    op = fgn_op if curvature == "fgn" else make_ggn_operator(lin, y, weights, stats)
    lam = damping_diagonal(params, damping, coefficients)
    return DampedSystem(
        head, params, X, y, lin, stats, weights, coefficients, loss, grad, op, fgn_op, lam, curvature, comm
    )


# The key under which a full-batch step's cache holds the margin statistics of its last logits.
_MARGIN_STATS = "margin_stats"


def keep_margin_stats(cache: dict, stats: MarginStats) -> None:
    """Keep ``stats`` in ``cache`` for the next :func:`build_system` at the same logits (one entry)."""
    cache[_MARGIN_STATS] = (stats, stats.logits._version)


def _margin_stats(logits: Tensor, y: Tensor, cache: dict | None) -> MarginStats:
    """Return the :class:`MarginStats` of ``logits``: the kept ones if of this tensor, unchanged since."""
    kept = None if cache is None else cache.pop(_MARGIN_STATS, None)
    if kept is not None:
        stats, version = kept
        if stats.logits is logits and stats.y is y and logits._version == version:
            return stats
    return MarginStats(logits, y)


@dataclass(frozen=True)
class CurvatureSample:
    """How many rows a step's curvature is estimated on, and the generator that draws them.

    ``size`` is the expected number of rows of the whole batch (over all
    ranks); the draw is :func:`sample_curvature_rows`.
    """

    size: int
    generator: torch.Generator


def sample_curvature_rows(
    system: DampedSystem, sample: CurvatureSample, cache: dict | None = None
) -> tuple[Tensor, Tensor] | None:
    r"""Draw rows by their share of the curvature: Poisson sampling with ``p_i = min(1, t_i / tau)``.

    ``t_i = omega_i tr(H_i) ||x~_i||^2`` is the trace of row ``i``'s term
    ``J_i^T H_i J_i`` of ``G`` (a linear head: ``J_i = I kron x~_i^T``), and
    ``tau`` makes ``sum_i p_i = sample.size``. Rows whose term is large
    (near a weakly regularised optimum: the few rows not yet fitted) are
    always taken; the others with probability ``p_i`` and weight ``1 /
    p_i``, so that ``G_S = sum_{i in S} G_i / p_i`` is unbiased and every
    sampled term has trace at most ``tau`` (Xu, Yang, Roosta-Khorasani, Ré
    and Mahoney, "Sub-sampled Newton methods with non-uniform sampling",
    2016). Rows without curvature are never drawn. Cost: ``O(n K)`` and a
    sort of ``n`` traces; the rows' norms (``O(n d)`` and an ``n x d``
    temporary) once per fit, kept in ``cache`` (see :func:`._step.compute_step`). In a
    data-parallel fit the ranks all-gather their traces (``n`` values), so
    that ``tau`` is the whole batch's, and each keeps its own rows' part of
    one draw of ``n`` uniforms from the generator they share: the sample is
    the one a single process draws on the concatenated rows.

    Returns
    -------
    rows : Tensor of int64
        Sorted row indices (a gather in memory order).
    scale : Tensor
        ``1 / p_i`` of those rows.
    None
        When the sample would hold every row with curvature (in a single
        process; a rank of a data-parallel fit then takes those rows).
    """
    norms = _row_square_norms(system.X, cache)
    trace = system.logit_curvature().trace() * (norms + float(INTERCEPT in system.gradient))
    comm = system.comm
    every, offset = whole_batch(trace, comm)
    tau = _poisson_threshold(every, sample.size)
    if tau is None:
        if not comm.distributed:
            return None
        # Every rank must take the same collectives: each takes all its rows with curvature.
        rows = (trace > 0).nonzero().squeeze(1)
        return rows, torch.ones(rows.shape[0], dtype=trace.dtype, device=trace.device)
    prob = (trace / tau).clamp_(max=1.0)
    draw = torch.rand(every.shape[0], generator=sample.generator, dtype=torch.float64)
    draw = draw[offset : offset + trace.shape[0]]
    rows = (draw.to(prob.device) < prob).nonzero().squeeze(1)
    return rows, 1.0 / prob[rows]


def whole_batch(values: Tensor, comm: Communicator) -> tuple[Tensor, int]:
    """Return every rank's per-row ``values`` in rank order, and where this rank's rows start.

    The whole batch's rows, as one process holds them (one all-gather of
    ``n`` values in a data-parallel fit; ``values`` itself otherwise).

    Returns
    -------
    every : Tensor of shape (n,)
        On ``values``' device.
    offset : int
        The position of this rank's first row in ``every``.
    """
    if not comm.distributed:
        return values, 0
    parts = [t.to(values.device) for t in comm.gather_objects(values.cpu())]
    return torch.cat(parts), sum(t.shape[0] for t in parts[: comm.rank])


def _row_square_norms(X: Tensor, cache: dict | None) -> Tensor:
    """Return ``||x_i||^2``, shape (n,); from ``cache`` while ``X`` is the same, unchanged tensor.

    Returns
    -------
    Tensor
    """
    held: _NormsEntry | None = None if cache is None else cache.get("row_norms")
    if held is not None and held.X() is X and held.version == X._version:
        return held.norms
    norms = X.square().sum(1)
    if cache is not None:
        cache["row_norms"] = _NormsEntry(weakref.ref(X), X._version, norms)
    return norms


class _NormsEntry(NamedTuple):
    """The rows' squared norms and the tensor (a weak reference) and version they came from."""

    X: weakref.ref
    version: int
    norms: Tensor


def _poisson_threshold(trace: Tensor, size: int) -> float | None:
    """Return ``tau`` with ``sum_i min(1, t_i / tau) = size``, or None when fewer rows carry curvature.

    With ``t`` sorted descending, ``tau = sum_{i > j} t_i / (size - j)``
    for the number ``j`` of rows taken surely, the first ``j`` with
    ``t_{j+1} < tau``. Cost: a sort of ``n``.

    Returns
    -------
    float or None
    """
    ordered = torch.sort(trace.double(), descending=True).values
    if int((ordered > 0).sum()) <= size:
        return None
    tail = ordered.flip(0).cumsum(0).flip(0)  # tail[j] = sum_{i >= j} t_i
    j = torch.arange(size, device=trace.device)
    tau = tail[:size] / (size - j)  # tau if the first j rows are sure
    sure = ordered[:size] >= tau
    first = int(sure.logical_not().nonzero()[0]) if not bool(sure.all()) else size - 1
    return float(tau[first])


def subsampled_system(system: DampedSystem, rows: Tensor, scale: Tensor) -> DampedSystem:
    r"""Return the system with its curvature estimated on ``rows``: ``G_S = sum_{i in S} scale_i G_i``.

    Loss, gradient, damping and penalty stay the batch's; the operator and
    the rows that preconditioners read (``X``, ``y``, ``lin``, ``stats``,
    ``weights``) are the sample's, with weights ``scale_i omega_i``. A
    step then costs one gradient (a VJP) and one JVP on all rows, and CG's
    products ``|S| / n`` of theirs.

    Returns
    -------
    DampedSystem
    """
    X_s, y_s = system.X[rows], system.y[rows]
    weights = system.weights[rows] * scale.to(system.weights.dtype)
    lin = linearize(system.head, system.params, X_s, system.lin.logits[rows])
    stats = MarginStats(lin.logits, y_s)
    fgn_op = make_fgn_operator(lin, y_s, weights, stats)
    op = fgn_op if system.curvature == "fgn" else make_ggn_operator(lin, y_s, weights, stats)
    return dataclasses.replace(
        system,
        X=X_s,
        y=y_s,
        lin=lin,
        stats=stats,
        weights=weights,
        operator=op,
        fgn_operator=fgn_op,
        sampled=True,
    )


def curvature_along(system: DampedSystem, logits_step: Tensor) -> Tensor:
    r"""``delta' G delta = sum_i omega_i u_i' H_i u_i`` from ``u = J delta``, summed over the ranks.

    ``H_i`` is the row's logit curvature: ``w_i a_i a_i^T`` for FGN (and a
    single logit), ``diag(p_i) - p_i p_i^T`` for the full GGN. Cost ``O(n K)``,
    no product with ``X``: a subsampled step's model along its own direction
    is then the whole batch's.

    Returns
    -------
    Tensor
        0-d.
    """
    return system.comm.sum_(system.logit_curvature().along(logits_step).sum().reshape(1))[0]


def quadratic_model(system: DampedSystem, step: Params, residual: Params) -> tuple[Tensor, Tensor, Tensor]:
    r"""Return the undamped quadratic model along ``step``, from the step and its residual (phase 4).

    ``residual = -grad - (G + Lambda) step``, which any solver of the system
    can return (CG updates it anyway; a direct solver pays one curvature
    product), gives ``step' G step = -grad' step - residual' step - step'
    Lambda step`` without a product of its own, whatever the solver.

    Returns
    -------
    slope : Tensor
        ``grad' step`` (0-d).
    curvature : Tensor
        ``step' (G + alpha P) step`` (0-d).
    damping_term : Tensor
        ``damping * step' M step``, the damping's part of ``step' (G + Lambda) step`` (0-d).
    """
    step_damping = weighted_sq(step, system.damping)
    penalty_term = weighted_sq(step, system.coefficients)
    slope = dot(system.gradient, step)
    curvature = -slope - dot(residual, step) - step_damping + penalty_term
    return slope, curvature, step_damping - penalty_term
