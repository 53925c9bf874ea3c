"""The damping rule: take, cut back, lengthen or discard a computed step, and adapt the damping.

``docs/design.md`` section 7. A step comes from :func:`._step.compute_step`
with damping ``lambda``; :func:`take_step` evaluates the objective at the
step's end and, by the Levenberg-Marquardt reduction ratio
(:func:`levenberg_marquardt`), accepts it, cuts it back by Armijo
backtracking, lengthens it (full batch, :attr:`DampingRule.full_batch`) or
discards it, and picks the next step's damping. :class:`StepRecord` is what
it did, read by the stopping rules (:mod:`._stopping`) and the logs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._batches import Batch
from ._curvature import LogitsFn, as_head, logits_function
from ._distributed import SINGLE, Communicator
from ._heads import Head, Params
from ._margin import MarginStats
from ._objective import normalized_weights, objective_from_logits
from ._step import StepResult
from ._tuning import get_tuning

__all__ = [
    "DAMPING_SCHEDULES",
    "DampingRule",
    "StepRecord",
    "levenberg_marquardt",
    "take_step",
]

DAMPING_SCHEDULES = ("constant", "adaptive")


def levenberg_marquardt(
    loss: float, new_loss: float, predicted_decrease: float, damping: float, min_damping: float
) -> tuple[bool, float, float]:
    """Accept or reject a step and adapt the damping by its reduction ratio.

    ``ratio = (loss - new_loss) / predicted_decrease``; below 0.25 the damping
    doubles, above 0.75 it is divided by 10 (Nocedal & Wright 4.1, Martens
    2010), by 100 when the ratio is within 2 % of 1 (the quadratic model is
    exact there, so damping only shortens the step),
    within ``[min_damping, damping_bounds[1]]``. The step is accepted
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
    low, high = get_tuning().damping_bounds
    damping = min(max(damping, min_damping, low), high)
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
    the one the next step takes; ``direction`` is the step's
    (:attr:`._step.StepResult.direction`).
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
    direction: str = "newton"


@dataclass(frozen=True)
class DampingRule:
    """How :func:`take_step` treats a computed step: the fit's schedule and what this batch allows.

    ``schedule``: ``"constant"`` takes every step as computed, ``"adaptive"``
    applies Levenberg-Marquardt (:func:`levenberg_marquardt`) and the step
    length control of :func:`take_step`. ``min_damping``: the adapted damping
    stays at or above it (the user's damping on mini-batches, where it acts as
    a step size; ``docs/design.md`` section 7). ``full_batch``: the step's
    model is the objective's, so a trusted step may be lengthened to the
    undamped model's minimiser along it and a cut step of a linear head sets
    the next damping from its length (on a mini-batch the model is the batch's).
    """

    schedule: str = "adaptive"
    min_damping: float = 0.0
    full_batch: bool = False


@dataclass(frozen=True)
class _Ray:
    """The objective along a computed step: ``t -> f(params + t * step)`` on ``batch``.

    For the linear head the logits move by ``t * J delta`` exactly, so no
    forward pass is needed; other heads and logits functions run one per
    evaluation. With ``comm`` (a data-parallel fit) each evaluation costs one
    scalar all-reduce, so every rank takes the same decisions.
    """

    head: Head | LogitsFn
    params: Params
    batch: Batch
    result: StepResult
    weights: Tensor
    alpha: float
    comm: Communicator = SINGLE

    def at(self, t: float) -> tuple[Params, Tensor, float, MarginStats]:
        """Evaluate the objective at ``params + t * step``.

        Returns
        -------
        params : dict of Tensor
        logits : Tensor
        objective : float
        stats : MarginStats
            Of those logits (the next step at them reads its margins there).
        """
        params, result = self.params, self.result
        trial = {k: torch.add(params[k], result.step[k], alpha=t) for k in params}
        if result.logits_step is not None:
            logits = torch.add(result.logits, result.logits_step, alpha=t)
        else:
            logits = logits_function(self.head)(trial, self.batch.X)
        stats = MarginStats(logits, self.batch.y)
        objective = objective_from_logits(
            self.head, trial, logits, self.batch.y, self.weights, self.alpha, self.comm, stats
        )
        return trial, logits, float(objective), stats


def _backtrack(ray: _Ray, loss: float) -> tuple[float, Params, Tensor, float, MarginStats] | None:
    """Armijo backtracking along a rejected step: ``t = 1/2, 1/4, ...``.

    Returns
    -------
    tuple or None
        ``(t, params, logits, objective, stats)`` for the first ``t`` with
        ``f(theta + t delta) <= f(theta) + armijo t g' delta``; None after
        ``max_backtracks`` halvings or when ``delta`` is not a descent direction.
    """
    slope = float(ray.result.slope)
    if not slope < 0.0:
        return None
    t = 1.0
    for _ in range(get_tuning().max_backtracks):
        t *= 0.5
        trial, logits, new_loss, stats = ray.at(t)
        if new_loss <= loss + get_tuning().armijo * t * slope:  # False for NaN
            return t, trial, logits, new_loss, stats
    return None


def _lengthen(
    ray: _Ray, loss: float, unit_loss: float
) -> tuple[float, Params, Tensor, float, MarginStats, float, float] | None:
    """Lengthen a trusted step to the undamped model's minimiser along it.

    Damping shortens a step; along its direction the model ``q(t) = t g'delta
    + t^2 delta'(G + alpha P)delta / 2`` is least at ``t* = -g'delta /
    delta'(G + alpha P)delta``, which is far beyond 1 while the damping
    dominates the curvature: the first step from a large damping is not wasted.

    ``t*`` is taken where the objective there agrees with the model
    (reduction ratio above 0.75), and also where it does not but the
    objective there is below ``unit_loss`` (the unit step's; ``-inf`` turns
    this off) with Armijo's sufficient decrease ``f(t*) <= f(0) + armijo t*
    g'delta``: a line search that keeps the lower of the two values it has
    evaluated. From zero
    coefficients, where the damping is far above the curvature (about
    ``1 / K`` of the feature metric for ``K`` classes), the unit step is a
    short gradient step, and ``t*`` can take the loss most of the way down
    where the model, quadratic, has overestimated the decrease by half.
    The ratio, whatever it is, then sets the next damping.

    Returns
    -------
    tuple or None
        ``(t*, params, logits, objective, stats, predicted decrease, ratio)``
        when ``t* >= lengthen_min`` and either test passes; None otherwise.
    """
    slope, curvature = float(ray.result.slope), float(ray.result.step_curvature)
    if not (slope < 0.0 and curvature > 0.0) or -slope < get_tuning().lengthen_min * curvature:
        return None
    t = -slope / curvature
    trial, logits, new_loss, stats = ray.at(t)
    predicted = -0.5 * t * slope
    ratio = (loss - new_loss) / predicted
    lower = new_loss < unit_loss and new_loss <= loss + get_tuning().armijo * t * slope
    if not (ratio > 0.75 or lower):  # also catches NaN
        return None
    return t, trial, logits, new_loss, stats, predicted, ratio


def take_step(
    head: Head | LogitsFn,
    params: Params,
    batch: Batch,
    result: StepResult,
    damping: float,
    alpha: float,
    rule: DampingRule = DampingRule(),
    comm: Communicator = SINGLE,
) -> tuple[Params, Tensor, StepRecord, MarginStats | None]:
    """Accept, cut back, lengthen or discard the step ``result`` and adapt ``damping``.

    ``rule.schedule == "constant"`` takes the step as computed. ``"adaptive"``
    adapts the damping by the Levenberg-Marquardt reduction ratio (within
    ``[rule.min_damping, damping_bounds[1]]``) and the step length along the
    step's direction (for the linear head each trial costs no matmul, for
    other heads one forward pass):

    * a step that raises the objective is cut back by Armijo backtracking
      (``_backtrack``) before it is discarded; the damping still grows as
      Levenberg-Marquardt says, and for a linear head with ``rule.full_batch``
      to at least the damping that would have shortened the step to the
      length taken (:func:`_damping_to_shorten`; the GGN is then the
      objective's Hessian, and the model along the step is the objective's
      to second order);
    * with ``rule.full_batch``, a trusted step is lengthened to the
      undamped model's minimiser along it (``_lengthen``) when that is
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
    stats : MarginStats or None
        The margin statistics of ``logits`` (None when the step was discarded):
        a full-batch linear fit's next step reads them instead of recomputing them.
    """
    # From the logits, not X: a logits function may take integer ids or a dict of inputs.
    weights = normalized_weights(batch.sample_weight, batch.y.shape[0], result.logits, batch.weight_total)
    ray = _Ray(head, params, batch, result, weights, alpha, comm)
    trial, trial_logits, new_loss, stats = ray.at(1.0)
    loss, predicted = float(result.loss), float(result.predicted_decrease)
    record = functools.partial(
        StepRecord, loss, damping=damping, curvature=result.curvature, cg_iter=result.solve.n_iter,
        cg_tol=result.cg_tol, reachable_decrease=_reachable_decrease(result), direction=result.direction,
    )  # fmt: skip
    if rule.schedule == "constant":
        return trial, trial_logits, record(new_loss, True, predicted_decrease=predicted, ratio=1.0,
                                           next_damping=damping), stats  # fmt: skip
    accepted, ratio, next_damping = levenberg_marquardt(loss, new_loss, predicted, damping, rule.min_damping)
    step_size = 1.0
    linear = as_head(head).is_linear
    if not accepted:
        cut = _backtrack(ray, loss)
        accepted = cut is not None
        step_size, trial, trial_logits, new_loss, stats = cut if accepted else (
            0.0, params, result.logits, loss, None
        )
        if accepted and rule.full_batch and linear:
            next_damping = max(next_damping, _damping_to_shorten(result, damping, step_size))
    elif rule.full_batch and ratio > 0.75:
        # The lower objective decides for a linear head only: an MLP's quadratic model is its own
        # linearisation's, and a long step it mistrusts can leave the region where that holds.
        longer = _lengthen(ray, loss, new_loss if linear else -math.inf)
        if longer is not None:
            step_size, trial, trial_logits, new_loss, stats, predicted, ratio = longer
            _, _, next_damping = levenberg_marquardt(
                loss, new_loss, predicted, damping / step_size, rule.min_damping
            )
    taken = record(new_loss, accepted, predicted_decrease=predicted, ratio=ratio, step_size=step_size,
                   next_damping=next_damping)  # fmt: skip
    return trial, trial_logits, taken, stats


def _damping_to_shorten(result: StepResult, damping: float, step_size: float) -> float:
    """Return the damping whose step, along this step's direction, is ``step_size`` of this one.

    Along ``delta`` the damped model ``s slope + s^2 (c + lambda) delta'delta / 2``,
    with ``c = delta'(G + alpha P)delta / delta'delta`` the curvature along it
    (``damping_term`` is ``lambda delta'delta``), is least at ``s = 1`` for
    the solved system; with damping ``lambda'`` at ``(c + lambda) / (c +
    lambda')``, which is ``t`` for ``lambda' = c (1 / t - 1) + lambda / t``.
    Doubling the damping cannot do that where it is far below ``c`` (a
    weakly regularised fit at the damping's floor): the next Newton step
    would overshoot as this one did, and be cut back again.

    Returns
    -------
    float
        ``lambda'`` (0 where the step has no model along it), at most ``damping_bounds[1]``.
    """
    if result.step_curvature is None or result.damping_term is None or not float(result.damping_term) > 0:
        return 0.0
    along = max(float(result.step_curvature), 0.0) * damping / float(result.damping_term)
    return min(along * (1.0 / step_size - 1.0) + damping / step_size, get_tuning().damping_bounds[1])


def _reachable_decrease(result: StepResult) -> float:
    """Return ``slope^2 / (2 curvature)``: the undamped model's decrease at its minimiser along the step.

    Along ``delta`` the model ``t slope + t^2 curvature / 2`` (``curvature =
    delta'(G + alpha P)delta``) is least at ``t* = -slope / curvature``; for a
    damped step ``t* = 1 + damping_term / curvature``, so this exceeds the
    step's own predicted decrease by about ``t* / 2`` when the damping
    dominates, whatever its size. When the damping term is all but
    ``damping_dominated`` of ``-slope`` the curvature is a difference of
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
    dominated = get_tuning().damping_dominated
    if result.damping_term is not None and float(result.damping_term) >= -dominated * slope:
        return math.inf
    return 0.5 * slope * slope / curvature if curvature > 0.0 else math.inf
