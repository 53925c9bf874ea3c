"""The outer loop: batches, damping, step acceptance, curvature regime, stopping.

Shape (as scikit-learn's ``NewtonSolver``): setup -> repeat (curvature ->
inner solve -> accept step -> converged?) -> finalize. Each phase returns
values; :class:`LoopState` is the only state carried between calls (it is
what ``warm_start`` and ``partial_fit`` resume from).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch
from torch import Tensor

from ._curvature import Alpha, LogitsFn, logits_function
from ._distributed import SINGLE, Communicator
from ._heads import Head, Params, forward
from ._objective import normalized_weights, objective_from_logits
from ._step import StepOptions, StepResult, compute_step
from ._system import CurvatureSample

__all__ = [
    "CURVATURE_OPTIONS",
    "DAMPING_BOUNDS",
    "DAMPING_SCHEDULES",
    "Batch",
    "LoopConfig",
    "LoopState",
    "StepRecord",
    "TrainingData",
    "check_step_options",
    "step_on_batch",
    "track_full_batch_step",
    "iter_batches",
    "levenberg_marquardt",
    "prime_host_allocator",
    "run_epochs",
    "take_step",
    "validation_accuracy",
]

DAMPING_SCHEDULES = ("constant", "adaptive")
CURVATURE_OPTIONS = ("fgn", "ggn", "auto")
# Levenberg-Marquardt: lambda stays inside these bounds.
DAMPING_BOUNDS = (1e-8, 1e8)
_EPS = float(torch.finfo(torch.float64).eps)
# cg_tol="auto" on mini-batches: a batch's step is noisy anyway, and a
# tighter solve buys no accuracy per epoch (benchmarks/RESULTS.md).
AUTO_CG_TOL = 1e-2
# cg_max_iter="auto": on mini-batches, and in full batch (where the forcing term ends the solve).
AUTO_CG_MAX_ITER = 100
AUTO_CG_MAX_ITER_FULL_BATCH = 1000
# Backtracking along a rejected step: sufficient-decrease constant and the
# most halvings tried (t >= 2**-MAX_BACKTRACKS).
ARMIJO = 1e-4
MAX_BACKTRACKS = 10
# Full batch: a trusted step is lengthened to the model's minimiser along it
# when that lies at least this far out (``_extend``).
EXTEND_MIN = 1.25
# Full batch: a step converges the fit only if its decrease is at most this
# share of the previous step's (``_full_batch_converged``).
SUPERLINEAR = 0.1
# Full batch: a step whose estimated gap is below this many times tol may
# be the last one, and is solved accurately enough to end the fit
# (``_forcing_term``).
LAST_STEP_GAP = 10.0
# ... from this tol up: below it tol^2 is near float64's round-off, and the
# step after the one that meets the stop's bounds is what makes the
# coefficients exact where the objective is flat (the refits of FGNClassifierCV).
LAST_STEP_MIN_TOL = 1e-6
# ... and a step whose damping term is this share of its slope (the damping a
# thousand times the curvature along it) cannot end the fit.
DAMPING_DOMINATED = 0.999
# Full-batch fits of a linear head take their curvature on a sample of the
# rows (_curvature_sample): this share of them to start with, at least this
# many rows and this many per logit; the sample doubles after a step along
# which its curvature was off the whole batch's by more than this factor, and
# beyond this share of the rows every row is used.
CURVATURE_SAMPLE_SHARE = 0.1
CURVATURE_SAMPLE_MIN_ROWS = 4096
CURVATURE_ROWS_PER_LOGIT = 10
CURVATURE_SAMPLE_ERROR = 1.5
CURVATURE_SAMPLE_MAX_SHARE = 0.125
# Scored path fits (``LoopConfig.null_loss``): a step may leave this share of
# the gap tolerance undone by its inexact solve (``eta^2 p``), and steps are
# solved no tighter than that asks (``_forcing_term``).
PATH_MISS = 0.25
# ... their gap is relative to the decrease from the intercept-only model
# where that is smaller than the objective, down to this share of it.
PATH_SCALE_FLOOR = 1e-3


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the outer loop (already validated by the estimator).

    ``alpha`` is the penalty on the mean loss (``alpha / sum(s)`` of the
    estimator's), a float or per-parameter coefficients (see
    :func:`._curvature.penalty_coefficients`). ``kronecker``: the features
    are whitened, and full-batch CG steps of a linear head are preconditioned
    by the exact FGN solve on the hardest rows or the Kronecker model (see
    :func:`._step.compute_step`).
    ``gap_tol``: a full-batch linear fit whose decreases shrink only
    linearly also stops once their geometric tail is below it (see
    ``_full_batch_converged``); None asks Newton's rate. ``null_loss``, with
    ``gap_tol``: the fit is only scored (the path fits of FGNClassifierCV)
    and needs no more than a gap of ``gap_tol``, relative to the smaller
    of the objective and its decrease from the intercept-only model,
    whose objective ``null_loss`` is (strong regularisation: there
    the coefficients' whole effect on the objective is small, and a gap
    relative to the objective would leave them far from their optimum); its
    steps are solved only as accurately as that gap asks. ``comm``: the rows
    are this rank's shard of a data-parallel fit (:mod:`._distributed`).
    """

    alpha: Alpha
    damping: float = 1.0
    curvature: str = "auto"
    solver: str = "auto"
    damping_schedule: str = "adaptive"
    batch_size: int | None = None
    max_iter: int = 100
    tol: float = 1e-4
    n_iter_no_change: float = 5  # np.inf: no early stop on stalled epochs
    cg_tol: float | str = "auto"
    cg_max_iter: int | str = 100
    verbose: int = 0
    kronecker: bool = False
    gap_tol: float | None = None
    null_loss: float | None = None
    comm: Communicator = SINGLE


@dataclass
class LoopState:
    """What one fit carries into the next (warm_start, partial_fit)."""

    params: Params
    damping: float
    n_iter: int = 0
    t: int = 0
    loss_curve: list[float] = field(default_factory=list)
    validation_scores: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_validation_score: float = -math.inf
    best_params: Params | None = None
    no_improvement_count: int = 0
    converged: bool = False
    stopped: bool = False
    last_relative_decrease: float = math.inf
    previous_relative_decrease: float = math.inf
    gap_estimate: float = math.inf
    # Full batch without hold-out: the logits at ``params`` on the training
    # rows, set by run_epochs (None otherwise), and, after a fit, the
    # parameters in the fit's coordinates (``fit_params``): a path's next
    # alpha on the same rows starts from both, without a forward pass.
    logits: Tensor | None = None
    fit_params: Params | None = None
    # What full-batch steps on the same rows share (``compute_step``'s ``cache``).
    step_cache: dict = field(default_factory=dict, repr=False, compare=False)
    # Full-batch linear fits: how many rows the curvature is sampled on (0: not decided yet).
    curvature_sample: int = 0


@dataclass(frozen=True)
class Batch:
    """One batch of tensors on the compute device.

    ``weight_total`` divides ``sample_weight`` instead of its sum (see
    :func:`._objective.normalized_weights`). ``n_rows``: the rows of the whole
    batch when these are one rank's share of it (``X``'s rows otherwise).
    """

    X: Tensor
    y: Tensor
    sample_weight: Tensor | None
    weight_total: float | None = None
    n_rows: int | None = None

    @property
    def size(self) -> int:
        """Rows in the whole batch (over all ranks)."""
        return self.X.shape[0] if self.n_rows is None else self.n_rows


def check_step_options(
    *, damping: object, damping_schedule: object, curvature: object, cg_tol: object, cg_max_iter: object,
    alpha: object,
) -> None:  # fmt: skip
    """Check the step settings shared by ``FGNClassifier`` and the skorch net (plain values).

    Raises
    ------
    ValueError
        Naming the first setting out of range.
    """
    if damping_schedule not in DAMPING_SCHEDULES:
        raise ValueError(f"damping_schedule must be one of {DAMPING_SCHEDULES}; got {damping_schedule!r}.")
    if curvature not in CURVATURE_OPTIONS:
        raise ValueError(f"curvature must be one of {CURVATURE_OPTIONS}; got {curvature!r}.")
    if not (_is_number(damping) and 0.0 < damping < math.inf):
        raise ValueError(f"damping must be a finite float > 0; got {damping!r}.")
    if cg_tol != "auto" and not (_is_number(cg_tol) and 0.0 <= cg_tol < 1.0):
        raise ValueError(
            f"cg_tol must be a float in [0, 1) or 'auto' (CG's relative-residual tolerance: 1 or more "
            f"stops CG before its first iteration, so no step is taken); got {cg_tol!r}."
        )
    if cg_max_iter != "auto" and not (_is_number(cg_max_iter, Integral) and cg_max_iter >= 1):
        raise ValueError(f"cg_max_iter must be an int >= 1 or 'auto'; got {cg_max_iter!r}.")
    if not (_is_number(alpha) and 0.0 <= alpha < math.inf):
        raise ValueError(f"alpha must be a finite float >= 0; got {alpha!r}.")


def _is_number(value: object, kind: type = Real) -> bool:
    # ``bool`` is an ``Integral`` (hence a ``Real``) in Python; a setting of True is a mistake.
    return isinstance(value, kind) and not isinstance(value, bool)


def _resolve_curvature(cfg: LoopConfig, n_logits: int, full_batch: bool) -> str:
    """FGN or full GGN for the next step (``curvature="auto"`` decides here).

    Mini-batches take FGN steps (the n-row system solved exactly is FGN's
    edge; the full GGN has n * K rows); binary heads take FGN steps (exact
    Gauss-Newton). Full-batch multiclass fits take full-GGN (exact Newton for
    the linear head) steps: FGN steps there converge linearly once the
    competitor mass is dispersed.

    Returns
    -------
    str
        ``"fgn"`` or ``"ggn"``.
    """
    if cfg.curvature != "auto":
        return cfg.curvature
    return "ggn" if full_batch and n_logits > 2 else "fgn"


def levenberg_marquardt(
    loss: float, new_loss: float, predicted_decrease: float, damping: float, min_damping: float
) -> tuple[bool, float, float]:
    """Accept or reject a step and adapt the damping by its reduction ratio.

    ``ratio = (loss - new_loss) / predicted_decrease``; below 0.25 the damping
    doubles, above 0.75 it is divided by 10 (Nocedal & Wright 4.1, Martens
    2010), by 100 when the ratio is within 2 % of 1 (the quadratic model is
    exact there, so damping only shortens the step),
    within ``[min_damping, DAMPING_BOUNDS[1]]``. The step is accepted
    when the objective did not go up.

    Returns
    -------
    accepted : bool
    ratio : float
    damping : float
        The damping for the next step.
    """
    ratio = (loss - new_loss) / predicted_decrease if predicted_decrease > 0 else -math.inf
    if ratio < 0.25:
        damping *= 2.0
    elif abs(ratio - 1.0) < 0.02:  # the model is exact to 2 %: damping only slows the step
        damping /= 100.0
    elif ratio > 0.75:
        damping /= 10.0
    damping = min(max(damping, min_damping, DAMPING_BOUNDS[0]), DAMPING_BOUNDS[1])
    return math.isfinite(new_loss) and new_loss <= loss, ratio, damping


@dataclass(frozen=True)
class StepRecord:
    """What one damped update did.

    ``step_size`` is the multiple of the computed step that was taken: 1.0,
    below 1 when backtracking cut a rejected step (0.0 when it was
    discarded), above 1 when a trusted full-batch step was lengthened.
    ``ratio`` and ``predicted_decrease`` refer to the lengthened step in
    that last case, to the computed step otherwise. ``reachable_decrease``:
    the decrease the undamped model predicts at its minimiser along the step
    (far more than ``predicted_decrease`` when the damping held the step
    back, so that a small decrease says nothing about convergence).
    ``damping`` is the damping the step was computed with, ``next_damping``
    the one the next step takes.
    """

    loss: float
    new_loss: float
    accepted: bool
    damping: float
    curvature: str
    cg_iter: int
    predicted_decrease: float
    ratio: float
    cg_tol: float = 0.0
    step_size: float = 1.0
    reachable_decrease: float = 0.0
    next_damping: float | None = None


def _evaluate_step(
    head: Head | LogitsFn,
    params: Params,
    batch: Batch,
    result: StepResult,
    t: float,
    weights: Tensor,
    alpha: float,
    comm: Communicator = SINGLE,
) -> tuple[Params, Tensor, float]:
    """Evaluate the objective at ``params + t * step``.

    For the linear head the logits move by ``t * J delta`` exactly, so no
    forward pass is needed; other heads and logits functions run one.

    Returns
    -------
    params : dict of Tensor
    logits : Tensor
    objective : float
    """
    trial = {k: torch.add(params[k], result.step[k], alpha=t) for k in params}
    if result.logits_step is not None:
        logits = torch.add(result.logits, result.logits_step, alpha=t)
    else:
        logits = logits_function(head)(trial, batch.X)
    return trial, logits, float(objective_from_logits(head, trial, logits, batch.y, weights, alpha, comm))


def _backtrack(
    head: Head | LogitsFn, params: Params, batch: Batch, result: StepResult, loss: float, weights: Tensor,
    alpha: float, comm: Communicator = SINGLE,
) -> tuple[float, Params, Tensor, float] | None:  # fmt: skip
    """Armijo backtracking along a rejected step: ``t = 1/2, 1/4, ...``.

    Returns
    -------
    tuple or None
        ``(t, params, logits, objective)`` for the first ``t`` with
        ``f(theta + t delta) <= f(theta) + ARMIJO t g' delta``; None after
        ``MAX_BACKTRACKS`` halvings or when ``delta`` is not a descent direction.
    """
    slope = float(result.slope)
    if not slope < 0.0:
        return None
    t = 1.0
    for _ in range(MAX_BACKTRACKS):
        t *= 0.5
        trial, logits, new_loss = _evaluate_step(head, params, batch, result, t, weights, alpha, comm)
        if new_loss <= loss + ARMIJO * t * slope:  # False for NaN
            return t, trial, logits, new_loss
    return None


def _extend(
    head: Head | LogitsFn, params: Params, batch: Batch, result: StepResult, loss: float, weights: Tensor,
    alpha: float, comm: Communicator = SINGLE,
) -> tuple[float, Params, Tensor, float, float, float] | None:  # fmt: skip
    """Lengthen a trusted step to the undamped model's minimiser along it.

    Damping shortens a step; along its direction the model ``q(t) = t g'delta
    + t^2 delta'(G + alpha P)delta / 2`` is least at ``t* = -g'delta /
    delta'(G + alpha P)delta``, which is far beyond 1 while the damping
    dominates the curvature: the first step from a large damping is not wasted.

    Returns
    -------
    tuple or None
        ``(t*, params, logits, objective, predicted decrease, ratio)`` when
        ``t* >= EXTEND_MIN`` and the objective there agrees with the model
        (reduction ratio above 0.75); None otherwise.
    """
    slope, curvature = float(result.slope), float(result.step_curvature)
    if not (slope < 0.0 and curvature > 0.0) or -slope < EXTEND_MIN * curvature:
        return None
    t = -slope / curvature
    trial, logits, new_loss = _evaluate_step(head, params, batch, result, t, weights, alpha, comm)
    predicted = -0.5 * t * slope
    ratio = (loss - new_loss) / predicted
    if not ratio > 0.75:  # also catches NaN
        return None
    return t, trial, logits, new_loss, predicted, ratio


def take_step(
    head: Head | LogitsFn,
    params: Params,
    batch: Batch,
    result: StepResult,
    damping: float,
    alpha: float,
    schedule: str = "adaptive",
    min_damping: float = DAMPING_BOUNDS[0],
    extend: bool = False,
    comm: Communicator = SINGLE,
) -> tuple[Params, Tensor, StepRecord]:
    """Accept, cut back, lengthen or discard the step ``result`` and adapt ``damping``.

    ``"constant"`` takes the step as computed. ``"adaptive"`` adapts the
    damping by the Levenberg-Marquardt reduction ratio (within
    ``[min_damping, DAMPING_BOUNDS[1]]``) and the step length along the
    step's direction (for the linear head each trial costs no matmul, for
    other heads one forward pass):

    * a step that raises the objective is cut back by Armijo backtracking
      (``_backtrack``) before it is discarded; the damping still grows as
      Levenberg-Marquardt says;
    * with ``extend`` (full batch), a trusted step is lengthened to the
      undamped model's minimiser along it (``_extend``) when that is
      confirmed by the objective, and the damping is divided by the factor
      taken before the Levenberg-Marquardt update (in the damping-dominated
      regime ``t * delta(lambda)`` is about ``delta(lambda / t)``).

    With ``comm`` (a data-parallel fit) each objective evaluated costs one
    scalar all-reduce; every rank then takes the same decisions.

    Returns
    -------
    params : dict of Tensor
        After the update (unchanged when the step was discarded).
    logits : Tensor
        The logits at those parameters on ``batch``.
    record : StepRecord
        What was done (``next_damping`` the damping for the next step).
    """
    # From the logits, not X: a logits function may take integer ids or a dict of inputs.
    weights = normalized_weights(batch.sample_weight, batch.y.shape[0], result.logits, batch.weight_total)
    trial, trial_logits, new_loss = _evaluate_step(head, params, batch, result, 1.0, weights, alpha, comm)
    loss, predicted = float(result.loss), float(result.predicted_decrease)
    record = functools.partial(
        StepRecord, loss, damping=damping, curvature=result.curvature, cg_iter=result.solve.n_iter,
        cg_tol=result.cg_tol, reachable_decrease=_reachable_decrease(result),
    )  # fmt: skip
    if schedule == "constant":
        return trial, trial_logits, record(new_loss, True, predicted_decrease=predicted, ratio=1.0,
                                           next_damping=damping)  # fmt: skip
    accepted, ratio, next_damping = levenberg_marquardt(loss, new_loss, predicted, damping, min_damping)
    step_size = 1.0
    if not accepted:
        cut = _backtrack(head, params, batch, result, loss, weights, alpha, comm)
        accepted = cut is not None
        step_size, trial, trial_logits, new_loss = cut if accepted else (0.0, params, result.logits, loss)
    elif extend and ratio > 0.75:
        longer = _extend(head, params, batch, result, loss, weights, alpha, comm)
        if longer is not None:
            step_size, trial, trial_logits, new_loss, predicted, ratio = longer
            _, _, next_damping = levenberg_marquardt(
                loss, new_loss, predicted, damping / step_size, min_damping
            )
    taken = record(new_loss, accepted, predicted_decrease=predicted, ratio=ratio, step_size=step_size,
                   next_damping=next_damping)  # fmt: skip
    return trial, trial_logits, taken


def step_on_batch(
    head: Head | LogitsFn,
    params: Params,
    batch: Batch,
    damping: float,
    cfg: LoopConfig,
    curvature: str,
    cg_tol: float,
    min_damping: float = DAMPING_BOUNDS[0],
    logits: Tensor | None = None,
    extend: bool = False,
    cache: dict | None = None,
    curvature_sample: CurvatureSample | None = None,
) -> tuple[StepResult, Params, Tensor, StepRecord]:
    """Compute a damped ``curvature`` step (:func:`._step.compute_step`) and take it (:func:`take_step`).

    The one step path of both front ends: ``FGNClassifier``'s epochs (``_run_epoch``)
    and the skorch net's ``train_step``, which also reads the step itself
    and the logits before it. ``head`` is a :class:`Head` or a logits
    function. ``cg_tol`` is CG's tolerance for this step (see
    ``_forcing_term``); the adapted damping stays at or above
    ``min_damping``. ``logits``, when known, are the logits at ``params``
    on ``batch`` (see ``compute_step``); ``curvature_sample``: the step's
    curvature is estimated on that many rows (``compute_step``); ``extend`` lets a trusted step be
    lengthened (full batch).

    Returns
    -------
    result : StepResult
        The computed step.
    params : dict of Tensor
        The parameters after the update.
    logits : Tensor
        The logits at them on ``batch``.
    record : StepRecord
        The per-step record.
    """
    options = StepOptions(
        alpha=cfg.alpha, damping=damping, curvature=curvature, solver=cfg.solver, cg_tol=cg_tol,
        cg_max_iter=_cg_max_iter(cfg, extend), weight_total=batch.weight_total,
        structured=cfg.kronecker and extend, mixed_precision=extend, comm=cfg.comm,
        curvature_sample=curvature_sample,
    )
    result: StepResult = compute_step(
        head, params, batch.X, batch.y, batch.sample_weight, options, logits=logits, cache=cache
    )
    with torch.no_grad():  # a logits function's trial forward passes need no graph
        params, logits, record = take_step(
            head, params, batch, result, damping, cfg.alpha, cfg.damping_schedule, min_damping, extend,
            cfg.comm,
        )  # fmt: skip
    return result, params, logits, record


def _cg_max_iter(cfg: LoopConfig, full_batch: bool) -> int:
    """Return ``cfg.cg_max_iter``, or what ``"auto"`` means in full batch or on mini-batches."""
    if cfg.cg_max_iter != "auto":
        return int(cfg.cg_max_iter)
    return AUTO_CG_MAX_ITER_FULL_BATCH if full_batch else AUTO_CG_MAX_ITER


def _reachable_decrease(result: StepResult) -> float:
    """Return ``slope^2 / (2 curvature)``: the undamped model's decrease at its minimiser along the step.

    Along ``delta`` the model ``t slope + t^2 curvature / 2`` (``curvature =
    delta'(G + alpha P)delta``) is least at ``t* = -slope / curvature``; for a
    damped step ``t* = 1 + damping_term / curvature``, so this exceeds the
    step's own predicted decrease by about ``t* / 2`` when the damping
    dominates, whatever its size. When the damping term is all but
    ``DAMPING_DOMINATED`` of ``-slope`` the curvature is a difference of
    nearly equal numbers: inf (a step that cannot tell how far the optimum is).

    Returns
    -------
    float
        The decrease (0 when the step is not a descent direction).
    """
    if result.slope is None or result.step_curvature is None:
        return 0.0
    slope, curvature = float(result.slope), float(result.step_curvature)
    if not slope < 0.0:
        return 0.0
    if result.damping_term is not None and float(result.damping_term) >= -DAMPING_DOMINATED * slope:
        return math.inf
    return 0.5 * slope * slope / curvature if curvature > 0.0 else math.inf


def iter_batches(
    X: Tensor, y: Tensor, sample_weight: Tensor | None, batch_size: int | None,
    generator: torch.Generator, device: torch.device,
    transform: Callable[[Tensor], Tensor] | None = None, shard: Shard | None = None,
) -> Iterator[Batch]:  # fmt: skip
    """Shuffled batches moved to ``device`` one at a time (``X`` may stay on the host).

    A batch's weights are divided by its size times the mean of
    ``sample_weight`` (see :func:`._objective.normalized_weights`); ``transform``
    (the feature whitening) is applied to each batch's ``X`` on ``device``.
    With ``shard`` the rows are one rank's share of a data-parallel fit
    (see :func:`_shard_batches`).

    Yields
    ------
    Batch
        The next batch (the whole data when ``batch_size`` is None or >= n).
    """
    if shard is not None:
        yield from _shard_batches(X, y, sample_weight, batch_size, generator, device, transform, shard)
        return
    n = X.shape[0]
    weight_mean = None if sample_weight is None else float(sample_weight.double().mean())
    if batch_size is None or batch_size >= n:
        yield _to_device(X, y, sample_weight, device, _total(y.shape[0], weight_mean), transform)
        return
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        sw = None if sample_weight is None else sample_weight[idx]
        yield _to_device(X[idx], y[idx], sw, device, _total(idx.shape[0], weight_mean), transform)


def _total(n_rows: int, weight_mean: float | None) -> float | None:
    return None if weight_mean is None else n_rows * weight_mean


def _shard_batches(
    X: Tensor, y: Tensor, sample_weight: Tensor | None, batch_size: int | None,
    generator: torch.Generator, device: torch.device, transform: Callable[[Tensor], Tensor] | None,
    shard: Shard,
) -> Iterator[Batch]:  # fmt: skip
    """Yield a rank's share of the batches one process would draw from all ranks' rows.

    The epoch's order is ``randperm(shard.n_total)`` from the same generator
    on every rank, so batch ``b`` holds the same rows as in a single process
    on the concatenated data; this rank yields the rows of it that it holds
    (in that order; possibly none: it still takes part in the step's
    reductions), weighted by the whole batch's size and the data's mean
    weight. Cost per epoch: O(n_total) to invert the order, O(n_local log n_local) to sort.

    Yields
    ------
    Batch
        This rank's rows of the next batch, with ``n_rows`` the batch's size.
    """
    n = shard.n_total
    weight_mean = shard.weight_total / n
    if batch_size is None or batch_size >= n:
        yield _to_device(X, y, sample_weight, device, shard.weight_total, transform, n)
        return
    order = torch.randperm(n, generator=generator)
    place = torch.empty_like(order)
    place[order] = torch.arange(n)  # each training position's place in the epoch
    key = place[shard.positions]
    key, local = torch.sort(key)
    counts = torch.bincount(key // batch_size, minlength=-(-n // batch_size)).tolist()
    for start, rows in zip(range(0, n, batch_size), torch.split(local, counts), strict=True):
        size = min(batch_size, n - start)
        sw = None if sample_weight is None else sample_weight[rows]
        yield _to_device(X[rows], y[rows], sw, device, size * weight_mean, transform, size)


def _to_device(
    X: Tensor, y: Tensor, sample_weight: Tensor | None, device: torch.device, total: float | None,
    transform: Callable[[Tensor], Tensor] | None = None, n_rows: int | None = None,
) -> Batch:  # fmt: skip
    if X.device != device:
        pin = device.type == "cuda" and X.device.type == "cpu"  # host -> GPU: page-locked, asynchronous
        move = lambda t: t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)  # noqa: E731
        X, y, sample_weight = move(X), move(y), None if sample_weight is None else move(sample_weight)
    return Batch(X if transform is None else transform(X), y, sample_weight, total, n_rows)


# glibc's malloc serves blocks above its mmap threshold by mmap and returns
# heap memory to the OS once more than its trim threshold lies free at the
# top; both start low (128 KiB) and rise, to at most 32 MiB and 64 MiB, only
# when a block that large is freed (``man mallopt``). A mini-batch step
# allocates and frees MB-sized temporaries, which are otherwise handed back
# and faulted in again on every step. Freeing one 31 MiB block raises both
# thresholds to glibc's own ceiling.
_ALLOCATOR_PRIMER_BYTES = 31 * 2**20


@functools.cache
def prime_host_allocator() -> None:
    """Free one 31 MiB block so that glibc keeps a step's freed memory for the next step.

    Opt-in: it changes the allocator's thresholds for the whole process, so
    the library never calls it; a process that runs many mini-batch CPU fits
    may (``sklearn_fgn.prime_host_allocator()``, once). Elsewhere (other
    allocators) it costs an unused allocation. Measured speed-ups are in
    ``benchmarks/RESULTS.md``.
    """
    torch.empty(_ALLOCATOR_PRIMER_BYTES, dtype=torch.uint8, device="cpu")


class RowSubset:
    """Rows ``rows`` of ``X`` without copying them: what a validation split leaves for training.

    It offers what a fit reads from its features, ``shape``, ``dtype``,
    ``device`` and row indexing (a slice or an index tensor, which gathers
    those rows alone), so that a large ``X`` (a memory-mapped array, a GPU
    tensor) is never copied whole; :meth:`materialize` copies the rows out.
    """

    def __init__(self, X: Tensor, rows: Tensor):
        self.X, self.rows = X, rows.to(X.device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows.shape[0], *self.X.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    @property
    def device(self) -> torch.device:
        return self.X.device

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, Tensor):
            index = index.to(self.rows.device)
        return self.X[self.rows[index]]

    def materialize(self) -> Tensor:
        return self.X[self.rows]

    def in_row_order(self) -> tuple[RowSubset, Tensor]:
        """Return the same rows sorted by their place in ``X``, and the permutation that sorts them.

        A pass whose result does not depend on the order (the feature
        moments) then reads a memory-mapped ``X`` front to back, which the
        kernel's read-ahead serves, instead of at random.

        Returns
        -------
        rows : RowSubset
        order : Tensor of int64
            ``rows.rows == self.rows[order]``.
        """
        rows, order = torch.sort(self.rows)
        return RowSubset(self.X, rows), order


@dataclass(frozen=True)
class Shard:
    """Where a rank's training rows lie among all ranks' (a data-parallel fit).

    Attributes
    ----------
    positions : Tensor of shape (n_local,), int64 on the host
        Each local training row's position in the training rows of the
        single process on the concatenated data (what its batches index).
    n_total : int
        Training rows over all ranks.
    weight_total : float
        Their total weight (``n_total`` without sample weights).
    """

    positions: Tensor
    n_total: int
    weight_total: float


@dataclass(frozen=True)
class TrainingData:
    """Training (and optional validation) tensors; ``X`` may live on the host.

    ``sample_weight_val`` weights the validation accuracy. ``transform``, when
    given, maps each batch's ``X`` (on the device) to the features the head
    sees (the feature whitening of mini-batch fits); ``X_val`` is already mapped.
    ``X`` may be a :class:`RowSubset` (mini-batches gather their rows from it).
    ``shard``: the tensors are this rank's share of a data-parallel fit
    (validation rows too).
    """

    X: Tensor | RowSubset
    y: Tensor
    sample_weight: Tensor | None
    device: torch.device
    X_val: Tensor | None = None
    y_val: Tensor | None = None
    sample_weight_val: Tensor | None = None
    transform: Callable[[Tensor], Tensor] | None = None
    shard: Shard | None = None

    @property
    def n_total(self) -> int:
        """Training rows over all ranks."""
        return self.X.shape[0] if self.shard is None else self.shard.n_total

    @property
    def weight_total(self) -> float:
        """Total weight of the training rows over all ranks (their number without sample weights)."""
        if self.shard is not None:
            return self.shard.weight_total
        return self.X.shape[0] if self.sample_weight is None else float(self.sample_weight.double().sum())


def _forcing_term(cfg: LoopConfig, state: LoopState, full_batch: bool, dtype: torch.dtype) -> float:
    """CG's relative tolerance for the next step.

    A number ``cfg.cg_tol`` is used as given. ``"auto"``: mini-batches use
    ``AUTO_CG_TOL``; full batch is inexact Newton with the forcing term
    ``min(0.5, sqrt(last predicted relative decrease))`` (Eisenstat-Walker;
    ``sqrt`` of the decrease is O(||grad||), which keeps the end game
    quadratic), floored where the dtype can still resolve it. A step that
    can be the last (estimated gap within ``LAST_STEP_GAP * tol``) is
    solved to what the stopping rule asks of it instead.

    Returns
    -------
    float
        The relative residual at which CG stops.
    """
    if cfg.cg_tol != "auto":
        return float(cfg.cg_tol)
    if not full_batch:
        return AUTO_CG_TOL
    floor = max(1e-10, 10 * torch.finfo(dtype).eps)
    eta = min(0.5, max(state.last_relative_decrease, 0.0) ** 0.5)
    if cfg.null_loss is not None:
        # A scored path fit needs eta^2 p <= PATH_MISS gap_tol of its steps, p about the present
        # gap: the last step's estimate, or its decrease after an untrusted step (near round-off).
        present = state.gap_estimate if math.isfinite(state.gap_estimate) else state.last_relative_decrease
        if state.loss_curve and math.isfinite(present):
            gap_tol = _path_gap_tol(cfg, state.loss_curve[-1])
            eta = max(eta, min(0.5, (PATH_MISS * gap_tol / max(present, 1e-300)) ** 0.5))
    elif cfg.tol > 0 and state.gap_estimate <= LAST_STEP_GAP * cfg.tol:
        # This step can be the last: _full_batch_converged then asks
        # eta^2 p <= tol^2 with p about the present gap. Solve to that, no
        # looser (a step solved too loosely to end the fit costs a whole
        # step more) and no tighter (that over-solves the last step). Half
        # of that bound: the gap estimate is not a bound.
        # Path fits (gap_tol) end on the linear rule, which asks nothing of
        # the last solve: there the tighter solves only cost CG iterations.
        last = min(0.5, 0.5 * cfg.tol / max(state.gap_estimate, 1e-300) ** 0.5)
        if cfg.tol >= LAST_STEP_MIN_TOL and cfg.gap_tol is None:
            eta = last
        elif state.gap_estimate <= cfg.tol:
            eta = max(eta, last)
    return max(eta, floor)


def _path_gap_tol(cfg: LoopConfig, loss: float) -> float:
    """Return a path fit's gap tolerance relative to the objective ``loss``.

    ``cfg.gap_tol`` relative to the smaller of the objective and its
    decrease from the intercept-only model (``cfg.null_loss``), that
    decrease floored at ``PATH_SCALE_FLOOR`` of the objective.

    Returns
    -------
    float
        The tolerance on gaps relative to ``|loss|``.
    """
    size = max(abs(loss), 1e-300)
    decrease = max(cfg.null_loss - loss, PATH_SCALE_FLOOR * size)
    return cfg.gap_tol * min(1.0, decrease / size)


def track_full_batch_step(state: LoopState, record: StepRecord) -> None:
    """Keep what the next full-batch step's forcing term and stopping rule read from this one."""
    state.previous_relative_decrease = state.last_relative_decrease
    state.last_relative_decrease = _relative_decrease(record)
    state.gap_estimate = _remaining_gap(record, state.last_relative_decrease)


def _relative_decrease(record: StepRecord) -> float:
    """Return the step's predicted decrease relative to the objective before it."""
    return record.predicted_decrease / max(abs(record.loss), 1e-300)


def _remaining_gap(record: StepRecord, relative_decrease: float) -> float:
    """Relative objective gap left after a full-batch step, estimated from its record.

    The decrease CG left out (``eta^2 p``, as in ``_full_batch_converged``)
    plus the quadratic model's error (``|1 - ratio| p``); inf unless the step
    was a trusted unit step.

    Returns
    -------
    float
        The estimated gap, relative to the objective.
    """
    if not (record.accepted and record.step_size == 1.0 and record.ratio > 0.5):
        return math.inf
    return relative_decrease * (record.cg_tol**2 + abs(1.0 - record.ratio))


def _run_epoch(
    head: Head, state: LoopState, data: TrainingData, cfg: LoopConfig, generator: torch.Generator,
    logits: Tensor | None = None,
) -> tuple[list[tuple[int, StepRecord]], Tensor | None]:  # fmt: skip
    """One epoch of damped updates; ``logits`` carry a full batch's logits from step to step.

    Returns
    -------
    records : list of (int, StepRecord)
        Batch size and record of each update.
    logits : Tensor or None
        In full batch, the logits at ``state.params`` (None otherwise).
    """
    n = data.n_total
    full_batch = cfg.batch_size is None or cfg.batch_size >= n
    # Mini-batches: with fewer rows than parameters an exact step on its own
    # batch always lowers that batch's loss, so the reduction ratio cannot see
    # a step that memorises the batch; lambda then acts as a step size and the
    # user's damping is its floor (LM may only raise it after a bad step).
    min_damping = DAMPING_BOUNDS[0] if full_batch else cfg.damping
    records = []
    batches = iter_batches(
        data.X, data.y, data.sample_weight, cfg.batch_size, generator, data.device, data.transform, data.shard
    )
    for batch in batches:
        curvature = _resolve_curvature(cfg, head.n_logits, full_batch)
        cg_tol = _forcing_term(cfg, state, full_batch, batch.X.dtype)
        sample = _curvature_sample(state, batch, head, generator) if full_batch else None
        result, state.params, logits, record = step_on_batch(
            head, state.params, batch, state.damping, cfg, curvature, cg_tol, min_damping,
            logits if full_batch else None, extend=full_batch, cache=state.step_cache if full_batch else None,
            curvature_sample=sample,
        )  # fmt: skip
        state.damping = record.next_damping
        if full_batch:
            track_full_batch_step(state, record)
            _grow_curvature_sample(state, result)
        records.append((batch.size, record))
    return records, (logits if full_batch else None)


def _curvature_sample(
    state: LoopState, batch: Batch, head: Head, generator: torch.Generator
) -> CurvatureSample | None:
    """How many of a full batch's rows the next step's curvature is estimated on; None for all of them.

    Only for a linear head (:func:`._system.sample_curvature_rows`). The
    sample starts at ``CURVATURE_SAMPLE_SHARE`` of the rows, at least
    ``CURVATURE_SAMPLE_MIN_ROWS`` and ``CURVATURE_ROWS_PER_LOGIT`` per
    logit, and grows by :func:`_grow_curvature_sample`; beyond
    ``CURVATURE_SAMPLE_MAX_SHARE`` of the rows every row is used (a larger
    sample saves too little per CG product to pay for the slower, linear
    convergence of sampled Newton steps). A data-parallel fit draws the sample one
    process would draw on the concatenated rows (each rank keeps its own).

    Returns
    -------
    CurvatureSample or None
    """
    if not head.is_linear:
        return None
    n = batch.size
    if state.curvature_sample == 0:
        floor = max(CURVATURE_SAMPLE_MIN_ROWS, CURVATURE_ROWS_PER_LOGIT * head.n_logits)
        state.curvature_sample = max(floor, math.ceil(CURVATURE_SAMPLE_SHARE * n))
    if state.curvature_sample > CURVATURE_SAMPLE_MAX_SHARE * n:
        return None
    return CurvatureSample(state.curvature_sample, generator)


def _grow_curvature_sample(state: LoopState, result: StepResult) -> None:
    """Double the curvature sample after a step along which it was far from the whole batch's curvature.

    ``result.sampled_curvature`` is ``delta' G_S delta / delta' G delta``
    along the step just computed: outside ``[1 / CURVATURE_SAMPLE_ERROR,
    CURVATURE_SAMPLE_ERROR]`` the sample misjudged the very direction it
    chose, and more rows are taken. (The reduction ratio cannot tell: the
    step's model along its direction is the whole batch's.)
    """
    error = result.sampled_curvature
    if state.curvature_sample and not (1.0 / CURVATURE_SAMPLE_ERROR <= error <= CURVATURE_SAMPLE_ERROR):
        state.curvature_sample *= 2


def validation_accuracy(
    head: Head, params: Params, X: Tensor, y: Tensor, sample_weight: Tensor | None = None,
    comm: Communicator = SINGLE,
) -> float:  # fmt: skip
    """(Weighted) accuracy of the head on held-out tensors (on ``X``'s device); all ranks' with ``comm``."""
    logits = forward(head, params, X)
    pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    correct = (pred == y).double()
    if comm.distributed:  # one all-reduce of (hits, weight)
        w = torch.ones_like(correct) if sample_weight is None else sample_weight.to(correct)
        hits, total = comm.sum_(torch.stack([(w * correct).sum(), w.sum()])).tolist()
        return hits / total
    if sample_weight is None:
        return float(correct.mean())
    sample_weight = sample_weight.to(correct)
    return float((sample_weight * correct).sum() / sample_weight.sum())


def _epoch_loss(records: list[tuple[int, StepRecord]], full_batch: bool) -> float:
    if full_batch:  # the objective after the update
        return records[-1][1].new_loss
    total = sum(size for size, _ in records)
    return sum(size * rec.loss for size, rec in records) / total


def _update_stopping(state: LoopState, cfg: LoopConfig, score: float | None) -> bool:
    """MLPClassifier's rule: no improvement by ``tol`` for ``n_iter_no_change`` epochs."""
    if score is not None:
        improved = score > state.best_validation_score + cfg.tol
        if score > state.best_validation_score:
            state.best_validation_score = score
            state.best_params = {k: t.clone() for k, t in state.params.items()}
    else:
        improved = state.loss_curve[-1] < state.best_loss - cfg.tol
    state.best_loss = min(state.best_loss, state.loss_curve[-1])
    state.no_improvement_count = 0 if improved else state.no_improvement_count + 1
    return state.no_improvement_count >= cfg.n_iter_no_change


def _full_batch_converged(
    record: StepRecord, cfg: LoopConfig, dtype: torch.dtype, previous: float = math.inf, convex: bool = True
) -> bool:
    # A trusted step (the quadratic model agrees with the objective) whose
    # predicted decrease p is below tol relative to the loss ends the fit
    # once it is taken, if it was solved accurately enough: with CG stopped
    # at relative residual eta the step misses about eta^2 p of the decrease,
    # so we ask eta^2 p <= tol^2 (a loosely solved last step would stop short
    # of the optimum by about eta^2 p). At round-off level the ratio is
    # noise: stop as well. That level is the objective's own resolution in
    # ``dtype``; below it rejected steps would repeat without changing the loss.
    # On the convex linear head the rule assumes the fast final convergence
    # of Newton's method (r = p / p_previous <= SUPERLINEAR), which leaves a
    # gap far below p (about p^2: tol^2 for the stopping step). While the
    # decreases shrink only linearly (inexact steps on a badly conditioned
    # end game, weak regularisation: r about 0.5-0.9) the gap left is a
    # multiple of the last decrease, and the fit goes on; or, with
    # ``cfg.gap_tol`` (the path fits of FGNClassifierCV, which only score
    # their solutions), it stops once the geometric tail of the decreases
    # taken, p r / (1 - r), is below gap_tol: read off the steps taken, it
    # counts what the inexact solves missed, so eta is not asked there. MLP
    # heads converge linearly anyway: tol alone.
    relative = _relative_decrease(record)
    trusted = record.accepted and record.ratio > 0.5
    tol, missed, gap_tol = cfg.tol, cfg.tol**2, cfg.gap_tol
    if cfg.null_loss is not None:  # a scored path fit: eta^2 p <= PATH_MISS gap_tol is enough
        gap_tol = _path_gap_tol(cfg, record.loss)
        tol, missed = min(tol, gap_tol), PATH_MISS * gap_tol
    accurate = record.cg_tol**2 * relative <= missed
    newton = accurate and (not convex or relative <= SUPERLINEAR * previous or relative <= tol**2)
    linear = convex and gap_tol is not None and _geometric_tail(relative, previous) <= gap_tol
    roundoff = max(1e3 * _EPS, float(torch.finfo(dtype).eps))
    # A tiny step held back by a huge damping is no optimum: the undamped
    # model along it must promise no more than the stop allows either.
    reachable = record.reachable_decrease / max(abs(record.loss), 1e-300)
    small = relative <= tol and reachable <= tol
    return (trusted and small and (newton or linear)) or (
        relative <= roundoff and reachable <= max(tol, roundoff)
    )


def _geometric_tail(decrease: float, previous: float) -> float:
    """Return ``p r / (1 - r)`` with ``r = p / previous``: what a geometric sequence of decreases has left.

    inf unless ``SUPERLINEAR < r < 1`` (faster decreases are Newton's, whose
    rule asks the solve's accuracy instead).

    Returns
    -------
    float
        The estimated relative gap left.
    """
    rate = decrease / previous if previous > 0.0 else math.inf
    if not SUPERLINEAR < rate < 1.0:
        return math.inf
    return decrease * rate / (1.0 - rate)


def _log_epoch(state: LoopState, records: list[tuple[int, StepRecord]], seconds: float, score) -> None:
    cg = sum(rec.cg_iter for _, rec in records)
    kinds = "/".join(sorted({rec.curvature for _, rec in records}))
    extra = "" if score is None else f", validation score = {score:.6f}"
    print(
        f"Iteration {state.n_iter}, loss = {state.loss_curve[-1]:.8f}, damping = {state.damping:.3g}, "
        f"curvature = {kinds}, CG iterations = {cg}{extra}, {seconds:.3f} s"
    )


def run_epochs(
    head: Head,
    state: LoopState,
    data: TrainingData,
    cfg: LoopConfig,
    generator: torch.Generator,
    n_epochs: int | None = None,
    on_epoch_begin: Callable[[LoopState], None] | None = None,
    on_epoch_end: Callable[[LoopState], bool] | None = None,
) -> LoopState:
    """Run up to ``n_epochs`` (default ``cfg.max_iter``) epochs, updating ``state``.

    An epoch is one step in full batch, one pass over shuffled mini-batches
    otherwise. Stops early on convergence (``state.converged`` is set) or
    when ``on_epoch_end`` returns True (``state.stopped`` is set).

    Returns
    -------
    LoopState
        ``state``, updated in place.
    """
    full_batch = cfg.batch_size is None or cfg.batch_size >= data.n_total
    # full batch: the logits at state.params, reused by the next step
    logits, state.logits = (state.logits if full_batch else None), None
    for _ in range(cfg.max_iter if n_epochs is None else n_epochs):
        if on_epoch_begin is not None:
            on_epoch_begin(state)
        start = time.perf_counter()
        records, logits = _run_epoch(head, state, data, cfg, generator, logits)
        state.n_iter += 1
        state.t += data.n_total
        state.loss_curve.append(_epoch_loss(records, full_batch))
        score = None
        if data.X_val is not None:
            score = validation_accuracy(
                head, state.params, data.X_val, data.y_val, data.sample_weight_val, cfg.comm
            )
            state.validation_scores.append(score)
        if cfg.verbose:
            _log_epoch(state, records, time.perf_counter() - start, score)
        stop = _update_stopping(state, cfg, score)
        if full_batch and score is None:  # MLP's no-improvement rule is for noisy epochs
            stop = _full_batch_converged(
                records[-1][1], cfg, data.X.dtype, state.previous_relative_decrease, head.is_linear
            )
        state.converged = stop
        if on_epoch_end is not None and on_epoch_end(state):
            state.stopped = True
        if state.converged or state.stopped:
            break
    state.logits = logits if data.X_val is None else None
    return state
