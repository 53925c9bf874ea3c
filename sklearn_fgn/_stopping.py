"""Stopping rules: when a fit has converged, and the gap it estimates is left (``docs/design.md`` section 8).

Full batch: a trusted step with a small enough decrease, solved accurately
enough, ends the fit (:func:`full_batch_converged`); the forcing term of
:mod:`._stepper` reads the same estimates (:func:`relative_decrease`,
:func:`remaining_gap`, :func:`path_gap_tol`) to solve the last step to what
this rule asks. Mini-batches: ``MLPClassifier``'s no-improvement rule
(:func:`update_no_improvement`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ._damping import StepRecord
from ._tuning import get_tuning

if TYPE_CHECKING:  # the loop's types; the loop imports this module
    from ._solver import LoopConfig, LoopState

__all__ = [
    "actual_relative_decrease",
    "full_batch_converged",
    "geometric_tail",
    "objective_resolution",
    "path_gap_tol",
    "relative_decrease",
    "remaining_gap",
    "update_no_improvement",
]

_EPS = float(torch.finfo(torch.float64).eps)


def update_no_improvement(state: LoopState, cfg: LoopConfig, score: float | None) -> bool:
    """Apply ``MLPClassifier``'s rule: no improvement by ``tol`` for ``n_iter_no_change`` epochs.

    The improvement is the validation ``score``'s when there is one (the
    best parameters are kept in ``state.best_params``), the training loss's
    otherwise; ``state``'s best values and count are updated.

    Returns
    -------
    bool
        True when the fit should stop.
    """
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


def full_batch_converged(
    record: StepRecord, cfg: LoopConfig, dtype: torch.dtype, previous: float = math.inf, convex: bool = True,
    gap_estimate: float = math.inf, run_decrease: float = math.inf,
) -> bool:  # fmt: skip
    """Whether the full-batch step ``record`` ends the fit.

    A trusted step (the quadratic model agrees with the objective) whose
    predicted decrease p is below tol relative to the loss ends the fit
    once it is taken, if it was solved accurately enough: with CG stopped
    at relative residual eta the step misses about eta^2 p of the decrease,
    so we ask eta^2 p <= tol^2 (a loosely solved last step would stop short
    of the optimum by about eta^2 p). At round-off level the ratio is
    noise: stop as well. That level is the objective's own resolution in
    ``dtype``; below it rejected steps would repeat without changing the loss.

    On the convex linear head (``convex``) the rule assumes the fast final
    convergence of Newton's method (r = p / ``previous`` <= superlinear),
    which leaves a gap far below p (about p^2: tol^2 for the stopping step).
    While the decreases shrink only linearly (inexact steps on a badly
    conditioned end game, weak regularisation: r about 0.5-0.9) the gap left
    is a multiple of the last decrease, and the fit goes on; or, with
    ``cfg.gap_tol`` (the path fits of FGNClassifierCV, which only score
    their solutions), it stops once the geometric tail of the decreases
    taken, p r / (1 - r), is below gap_tol: read off the steps taken, it
    counts what the inexact solves missed, so eta is not asked there. MLP
    heads converge linearly anyway: tol alone.

    A quasi-Newton step (``record.direction``; :mod:`._quasi_newton`)
    solves nothing of Newton's system and its decreases shrink linearly: it
    ends the fit once ``gap_estimate``, the Stepper's estimate of the gap
    left, is below tol: the geometric tail (:func:`geometric_tail`) of the
    decrease it took at the slowest ratio of consecutive decreases over the
    last few steps of its run (one ratio of such a sequence can be far below
    its trend). Once a decrease taken is below the objective's resolution
    its ratio is round-off, and the estimate is the tail of the decreases
    the steps' models predicted (:func:`._stepper._track_full_batch_step`):
    on a slow run each decrease can fall below the resolution while the
    gap is still many times it. A run whose ``run_decrease`` (the relative
    decrease taken over its last few steps together,
    :meth:`._stepper.StepperState.run_decrease`) is below the resolution, on
    a step whose model promised at most tol, ends it too: the objective has
    resolved no progress over those steps.
    Below ``last_step_min_tol`` no quasi-Newton step ends a fit: a tolerance
    that tight asks coefficients exact where the objective is flat, and a
    Newton step follows the run to end it by Newton's rule (:mod:`._stepper`).

    Returns
    -------
    bool
        True when the fit has converged.
    """
    relative = relative_decrease(record)
    trusted = record.accepted and record.ratio > 0.5
    tol, missed, gap_tol = cfg.tol, cfg.tol**2, cfg.gap_tol
    if cfg.null_loss is not None:  # a scored path fit: eta^2 p <= path_miss gap_tol is enough
        gap_tol = path_gap_tol(cfg, record.loss)
        tol, missed = min(tol, gap_tol), get_tuning().path_miss * gap_tol
    accurate = record.cg_tol**2 * relative <= missed
    superlinear = get_tuning().superlinear * previous
    newton = accurate and (not convex or relative <= superlinear or relative <= tol**2)
    linear = convex and gap_tol is not None and _geometric_tail(relative, previous) <= gap_tol
    roundoff = objective_resolution(dtype)
    # A tiny step held back by a huge damping is no optimum: the undamped
    # model along it must promise no more than the stop allows either.
    reachable = record.reachable_decrease / max(abs(record.loss), 1e-300)
    small = relative <= tol and reachable <= tol
    if record.direction == "quasi-newton":
        if not convex or tol < get_tuning().last_step_min_tol:
            return False
        unresolved = record.accepted and actual_relative_decrease(record) <= roundoff  # its ratio is noise
        settled = record.accepted and run_decrease <= roundoff
        return small and (((trusted or unresolved) and gap_estimate <= tol) or settled)
    return (trusted and small and (newton or linear)) or (
        relative <= roundoff and reachable <= max(tol, roundoff)
    )


def objective_resolution(dtype: torch.dtype) -> float:
    """Return the smallest relative decrease of the objective that a fit in ``dtype`` resolves.

    Below it a reduction ratio is round-off noise.

    Returns
    -------
    float
    """
    return max(1e3 * _EPS, float(torch.finfo(dtype).eps))


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
    if not get_tuning().superlinear < rate:
        return math.inf
    return geometric_tail(decrease, rate)


def geometric_tail(decrease: float, rate: float) -> float:
    """Return ``p r / (1 - r)``: the decreases after ``p`` at ``rate`` per step summed (inf if ``r >= 1``)."""
    return decrease * rate / (1.0 - rate) if rate < 1.0 else math.inf


def path_gap_tol(cfg: LoopConfig, loss: float) -> float:
    """Return a path fit's gap tolerance relative to the objective ``loss``.

    ``cfg.gap_tol`` relative to the smaller of the objective and its
    decrease from the intercept-only model (``cfg.null_loss``), that
    decrease floored at ``path_scale_floor`` of the objective.

    Returns
    -------
    float
        The tolerance on gaps relative to ``|loss|``.
    """
    size = max(abs(loss), 1e-300)
    decrease = max(cfg.null_loss - loss, get_tuning().path_scale_floor * size)
    return cfg.gap_tol * min(1.0, decrease / size)


def relative_decrease(record: StepRecord) -> float:
    """Return the step's predicted decrease relative to the objective before it."""
    return record.predicted_decrease / max(abs(record.loss), 1e-300)


def actual_relative_decrease(record: StepRecord) -> float:
    """Return the decrease the step took, relative to the objective before it (0 for a discarded step)."""
    if not record.accepted:
        return 0.0
    return (record.loss - record.new_loss) / max(abs(record.loss), 1e-300)


def remaining_gap(record: StepRecord, relative: float) -> float:
    """Relative objective gap left after a full-batch step, estimated from its record.

    ``relative`` is the step's :func:`relative_decrease` ``p``. The decrease CG
    left out (``eta^2 p``, as in ``full_batch_converged``)
    plus the quadratic model's error (``|1 - ratio| p``); inf unless the step
    was a trusted unit step.

    Returns
    -------
    float
        The estimated gap, relative to the objective.
    """
    if not (record.accepted and record.step_size == 1.0 and record.ratio > 0.5):
        return math.inf
    return relative * (record.cg_tol**2 + abs(1.0 - record.ratio))
