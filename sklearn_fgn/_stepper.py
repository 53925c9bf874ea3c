"""The Stepper: one fit's per-step rules and its step call, shared by ``FGNClassifier`` and the skorch net.

Both front ends take their steps here: ``_solver.run_epochs`` builds one
:class:`Stepper` per fit (:meth:`Stepper.for_fit`), the skorch net one per
``train_step`` from its current settings; each keeps a :class:`StepperState`
from step to step. Whether the steps are full-batch is decided once, when
the Stepper is built (:attr:`Stepper.full_batch`), and every rule reads it
there:

* the damping floor and step-length control (:attr:`Stepper.damping_rule`,
  ``docs/design.md`` section 7);
* the curvature, FGN or full GGN (:meth:`Stepper.curvature`, sections 2-3);
* CG's tolerance, the forcing term (:meth:`Stepper.forcing_term`, sections
  7-8) and its iteration cap (:meth:`Stepper.cg_max_iter`);
* the rows the curvature is sampled on (``_curvature_sample``,
  ``_grow_curvature_sample``, section 6);
* in full batch: the logits and the cache carried from step to step, the
  preconditioners and the mixed precision of :func:`._step.compute_step`,
  the lengthening of trusted steps.

:meth:`Stepper.step` computes the step (:func:`._step.compute_step`), takes
it (:func:`._damping.take_step`) and updates the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ._batches import Batch, TrainingData
from ._curvature import LogitsFn, as_head
from ._damping import DAMPING_SCHEDULES, DampingRule, StepRecord, take_step
from ._heads import Head, Params
from ._quasi_newton import SecantMemory
from ._step import StepResult, compute_step
from ._stopping import (
    actual_relative_decrease,
    geometric_tail,
    objective_resolution,
    path_gap_tol,
    relative_decrease,
    remaining_gap,
)
from ._system import CurvatureSample, StepOptions, keep_margin_stats
from ._tuning import get_tuning

if TYPE_CHECKING:  # the loop's settings; the loop imports this module
    from ._solver import LoopConfig

__all__ = [
    "CURVATURE_OPTIONS",
    "StepOutcome",
    "Stepper",
    "StepperState",
    "check_step_options",
]

CURVATURE_OPTIONS = ("fgn", "ggn", "auto")


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


@dataclass
class StepperState:
    """What the next step reads of the steps before it (full batch; mini-batch steps leave it alone).

    ``last_relative_decrease`` and ``previous_relative_decrease``: the
    predicted decreases of the last two steps relative to the objective
    before them (:func:`._stopping.relative_decrease`); ``gap_estimate``:
    the relative gap estimated after the last step
    (:func:`._stopping.remaining_gap`); ``last_loss``: the objective after
    it (None before the first step). The forcing term reads them, the
    stopping rule the previous decrease. ``curvature_sample``: how many rows
    the curvature is sampled on (linear heads; 0 until the first step decides).
    ``secant``: the secant pairs of a linear head's steps, and
    ``quasi_newton`` whether the next step takes the quasi-Newton direction
    (:func:`_choose_direction`), from the gains per pass of the last steps
    of each kind (``newton_gain``, ``quasi_newton_gain``; inf before any
    step of the kind); ``recent_decreases``: the relative decreases of the
    present run of quasi-Newton steps (those taken, not those predicted;
    the last two windows of ``quasi_newton_rate_window``), whose slowest
    rate (:meth:`slowest_rate`) gives the gap left after them
    (``gap_estimate``: the geometric tail of their decreases at that rate),
    which the stopping rule reads; ``recent_predicted``: the decreases
    their models predicted, which stand in for them once the objective no
    longer resolves a step's decrease (:func:`_track_full_batch_step`);
    ``taken``: the relative decreases taken by the last two steps of
    either kind; ``behind``: how many readings in a row the run's gain was
    below the Newton step's.
    """

    last_relative_decrease: float = math.inf
    previous_relative_decrease: float = math.inf
    gap_estimate: float = math.inf
    last_loss: float | None = None
    curvature_sample: int = 0
    model_error: float = 0.0
    secant: SecantMemory | None = None
    quasi_newton: bool = False
    recent_decreases: tuple[float, ...] = ()
    recent_predicted: tuple[float, ...] = ()
    newton_gain: float = math.inf
    quasi_newton_gain: float = math.inf
    taken: tuple[float, float] = (math.inf, math.inf)
    behind: int = 0

    def run_series(self, resolution: float) -> tuple[float, ...]:
        """Return the run's decreases that its rates are read off: those taken, or those predicted.

        Those predicted once the last decrease taken (``taken[1]``) is at or
        below the objective's ``resolution``: its value is round-off, and so
        are the ratios of such decreases.

        Returns
        -------
        tuple of float
        """
        return self.recent_predicted if self.taken[1] <= resolution else self.recent_decreases

    def slowest_rate(self, resolution: float) -> float:
        """Return the largest ratio of consecutive decreases of the last ``quasi_newton_rate_window`` steps.

        Of :meth:`run_series`. inf before there are two decreases, or where
        one is not positive.

        Returns
        -------
        float
        """
        d = self.run_series(resolution)[-(get_tuning().quasi_newton_rate_window + 1):]
        rates = [b / a if a > 0.0 and b > 0.0 else math.inf for a, b in zip(d, d[1:], strict=False)]
        return max(rates, default=math.inf)

    def run_decrease(self) -> float:
        """Return the relative decrease taken over the run's last ``2 quasi_newton_rate_window`` steps.

        inf while the run has fewer steps. It is about the difference of
        two objective values that many steps apart, so round-off does not
        add up over the window: the objective has resolved no progress
        of the run while this is below its resolution. (One step's decrease
        falls below that by round-off on a slow run that still moves.)

        Returns
        -------
        float
        """
        window = 2 * get_tuning().quasi_newton_rate_window
        d = self.recent_decreases[-window:]
        return sum(d) if len(d) == window else math.inf


class StepOutcome(NamedTuple):
    """One step: as computed (``result``, which also holds the loss and logits before it) and as taken."""

    result: StepResult
    params: Params
    logits: Tensor
    record: StepRecord


@dataclass(frozen=True)
class Stepper:
    """One fit's per-step rules and its step call (see the module's docstring).

    Parameters
    ----------
    cfg : LoopConfig
        The fit's settings (damping, schedule, curvature, solver, CG, tolerances).
    full_batch : bool
        Every step sees the whole training data: the steps may carry logits
        and a cache, are lengthened when trusted, have no damping floor and
        take the full-batch "auto" rules.
    n_logits : int
        The head's logits (the skorch net: the classes its labels need), for
        ``curvature="auto"``.
    dtype : torch.dtype
        The dtype the objective is computed in: the forcing term is floored
        where it can still resolve it.
    generator : torch.Generator, optional
        Draws the rows the curvature of a full-batch linear fit is sampled on;
        None: the curvature is never sampled.
    cache : dict, optional
        What full-batch steps on the same rows share (``compute_step``'s ``cache``).
    quasi_newton : bool, default=False
        The steps of this full-batch fit of a linear head may take the
        quasi-Newton direction (:func:`_choose_direction`).
    """

    cfg: LoopConfig
    full_batch: bool
    n_logits: int
    dtype: torch.dtype
    generator: torch.Generator | None = None
    cache: dict | None = None
    quasi_newton: bool = False

    @classmethod
    def for_fit(
        cls, head: Head, data: TrainingData, cfg: LoopConfig, generator: torch.Generator, cache: dict
    ) -> Stepper:
        """Build the Stepper of an ``FGNClassifier`` fit of ``head`` on ``data``.

        The fit is full-batch when ``cfg.batch_size`` is None or covers every
        training row (over all ranks). A full-batch fit of a linear head may
        take quasi-Newton steps where a pass over ``X`` (``n d K``
        multiply-adds, all ranks' rows) is at least ``quasi_newton_min_work``:
        below, a fit takes a fraction of a second whatever its steps, and
        Newton's few steps are the simpler record.

        Returns
        -------
        Stepper
        """
        full_batch = cfg.batch_size is None or cfg.batch_size >= data.n_total
        work = data.n_total * head.n_features * head.n_logits
        quasi_newton = full_batch and head.is_linear and work >= get_tuning().quasi_newton_min_work
        return cls(cfg, full_batch, head.n_logits, data.X.dtype, generator, cache, quasi_newton)

    @property
    def damping_rule(self) -> DampingRule:
        """How a computed step is taken.

        Mini-batches: with fewer rows than parameters an exact step on its
        own batch always lowers that batch's loss, so the reduction ratio
        cannot see a step that memorises the batch; lambda then acts as a
        step size and the user's damping is its floor (Levenberg-Marquardt
        may only raise it after a bad step). Full batch: no floor, and a
        trusted step may be lengthened.

        Returns
        -------
        DampingRule
        """
        floor = get_tuning().damping_bounds[0] if self.full_batch else self.cfg.damping
        return DampingRule(self.cfg.damping_schedule, floor, self.full_batch)

    def curvature(self) -> str:
        """FGN or full GGN for the next step (``curvature="auto"`` decides here).

        Mini-batches take FGN steps (the n-row system solved exactly is FGN's
        edge; the full GGN has n * K rows); binary heads take FGN steps (exact
        Gauss-Newton). Full-batch multiclass fits take full-GGN (exact Newton for
        the linear head) steps: FGN steps there converge linearly once the
        competitor mass is dispersed (``docs/design.md`` sections 2-3).

        Returns
        -------
        str
            ``"fgn"`` or ``"ggn"``.
        """
        if self.cfg.curvature != "auto":
            return self.cfg.curvature
        return "ggn" if self.full_batch and self.n_logits > 2 else "fgn"

    def cg_max_iter(self) -> int:
        """Return ``cfg.cg_max_iter``, or what ``"auto"`` means in full batch or on mini-batches."""
        if self.cfg.cg_max_iter != "auto":
            return int(self.cfg.cg_max_iter)
        return get_tuning().auto_cg_max_iter_full_batch if self.full_batch else get_tuning().auto_cg_max_iter

    def _cg_budget(self, state: StepperState, share: float) -> int:
        """CG's iteration cap for the next step: :meth:`cg_max_iter`, or less for a first costly Newton step.

        Until a full-batch linear fit that may take quasi-Newton steps has
        read the gain of a run of them (``quasi_newton_gain`` still inf), a
        Newton step gets the CG products that fit in
        ``quasi_newton_after_passes`` passes over ``X`` (``1 + 2 k share``,
        ``share`` the curvature sample's share of the rows): a step that
        needs more is the one after which quasi-Newton steps are tried
        anyway (:func:`_choose_direction`), and its CG products beyond that
        budget would only tell how costly it was.

        Returns
        -------
        int
        """
        cap = self.cg_max_iter()
        if self.quasi_newton and state.quasi_newton_gain == math.inf and not state.quasi_newton:
            cap = min(cap, max(1, int((get_tuning().quasi_newton_after_passes - 1.0) / (2.0 * share))))
        return cap

    def forcing_term(self, state: StepperState) -> float:
        """CG's relative tolerance for the next step.

        A number ``cfg.cg_tol`` is used as given. ``"auto"``: mini-batches use
        ``auto_cg_tol``; full batch is inexact Newton with the forcing term
        ``min(0.5, sqrt(last predicted relative decrease))`` (Eisenstat-Walker;
        ``sqrt`` of the decrease is O(||grad||), which keeps the end game
        quadratic), no tighter than ``sqrt(e)`` for the share ``e = |1 -
        ratio|`` of the last decrease that the quadratic model missed (a
        linear head's; a solve missing about ``eta^2`` of the model's decrease
        loses nothing the model had right), floored where the dtype can
        still resolve it. A step that
        can be the last (estimated gap within ``LAST_STEP_GAP * tol``) is
        solved to what the stopping rule asks of it instead (``docs/design.md``
        sections 7-8).

        Returns
        -------
        float
            The relative residual at which CG stops.
        """
        cfg = self.cfg
        if cfg.cg_tol != "auto":
            return float(cfg.cg_tol)
        if not self.full_batch:
            return get_tuning().auto_cg_tol
        floor = max(1e-10, 10 * torch.finfo(self.dtype).eps)
        eta = min(0.5, max(state.last_relative_decrease, 0.0) ** 0.5)
        eta = max(eta, min(0.5, (get_tuning().model_error_share * state.model_error) ** 0.5))
        if cfg.null_loss is not None:
            # A scored path fit needs eta^2 p <= path_miss gap_tol of its steps, p about the present
            # gap: the last step's estimate, or its decrease after an untrusted step (near round-off).
            present = (
                state.gap_estimate if math.isfinite(state.gap_estimate) else state.last_relative_decrease
            )
            if state.last_loss is not None and math.isfinite(present):
                gap_tol = path_gap_tol(cfg, state.last_loss)
                eta = max(eta, min(0.5, (get_tuning().path_miss * gap_tol / max(present, 1e-300)) ** 0.5))
        elif cfg.tol > 0 and _may_be_last(state, cfg.tol):
            # This step can be the last: full_batch_converged then asks
            # eta^2 p <= tol^2 with p about the present gap. Solve to that, no
            # looser (a step solved too loosely to end the fit costs a whole
            # step more) and no tighter (that over-solves the last step). Half
            # of that bound: the gap estimate is not a bound.
            # Path fits (gap_tol) end on the linear rule, which asks nothing of
            # the last solve: there the tighter solves only cost CG iterations.
            last = min(0.5, 0.5 * cfg.tol / max(state.gap_estimate, 1e-300) ** 0.5)
            if cfg.tol >= get_tuning().last_step_min_tol and cfg.gap_tol is None:
                eta = last
            elif state.gap_estimate <= cfg.tol:
                eta = max(eta, last)
        return max(eta, floor)

    def step(
        self,
        head: Head | LogitsFn,
        params: Params,
        batch: Batch,
        damping: float,
        state: StepperState,
        logits: Tensor | None = None,
    ) -> StepOutcome:
        """Compute a damped step on ``batch`` and take it: ``compute_step``, then ``take_step``.

        (:func:`._step.compute_step`, :func:`._damping.take_step`.) ``head``
        is a :class:`Head` or a logits function; ``damping`` the
        damping to compute the step with (the record's ``next_damping`` is
        the next step's). ``logits``, when known, are the logits at ``params``
        on ``batch`` (full batch only: a mini-batch's rows change from step
        to step). In full batch, ``state`` is updated with what the next
        step's forcing term, curvature sample and the stopping rule read.

        Returns
        -------
        StepOutcome
            The step as computed, the parameters after it, the logits at
            them on ``batch`` and the step's record.
        """
        cfg, full_batch = self.cfg, self.full_batch
        curvature = self.curvature()
        cg_tol = self.forcing_term(state)
        sample = None
        if full_batch and self.generator is not None:
            sample = _curvature_sample(state, batch, head, self.generator)
        share = 1.0 if sample is None else min(1.0, sample.size / batch.size)
        linear = as_head(head).is_linear
        if self.quasi_newton and linear and state.secant is None:
            state.secant = SecantMemory(get_tuning().quasi_newton_pairs)
        secant = state.secant if self.quasi_newton and linear else None
        options = StepOptions(
            alpha=cfg.alpha, damping=damping, curvature=curvature, solver=cfg.solver, cg_tol=cg_tol,
            cg_max_iter=self._cg_budget(state, share), weight_total=batch.weight_total,
            structured=cfg.whitened and full_batch, mixed_precision=full_batch, comm=cfg.comm,
            curvature_sample=sample, secant=secant, quasi_newton=secant is not None and state.quasi_newton,
        )
        result: StepResult = compute_step(
            head, params, batch.X, batch.y, batch.sample_weight, options,
            logits=logits if full_batch else None, cache=self.cache if full_batch else None,
        )  # fmt: skip
        with torch.no_grad():  # a logits function's trial forward passes need no graph
            params, logits, record, stats = take_step(
                head, params, batch, result, damping, cfg.alpha, self.damping_rule, cfg.comm
            )
        if full_batch:
            if linear and self.cache is not None and stats is not None:
                keep_margin_stats(self.cache, stats)  # the next step starts at these logits
            _track_full_batch_step(state, record, linear, self.dtype)
            _grow_curvature_sample(state, result)
            if secant is not None:
                tol = cfg.tol if cfg.gap_tol is None else min(cfg.tol, cfg.gap_tol)
                _choose_direction(state, result, record, share, objective_resolution(self.dtype))
                _hand_tight_stops_to_newton(state, tol)
        return StepOutcome(result, params, logits, record)


def _track_full_batch_step(state: StepperState, record: StepRecord, linear: bool, dtype: torch.dtype) -> None:
    """Keep what the next full-batch step's forcing term and the stopping rule read from this one.

    A quasi-Newton step's gap estimate is the geometric tail of the
    decreases taken by its run; once a decrease taken is below the
    objective's resolution in ``dtype`` (its value is round-off, and so are
    the ratios of such decreases), the tail of the decreases the steps'
    models predicted (:meth:`StepperState.run_series`).

    The model's error ``|1 - ratio|`` is kept from a trusted unit step of a
    linear head whose decrease is at least ``model_error_resolution`` times
    the objective's resolution in ``dtype`` (below, the ratio is round-off);
    0 otherwise (an MLP head's ratio says little of its next step's model).
    """
    relative, taken = relative_decrease(record), actual_relative_decrease(record)
    state.taken = (state.taken[1], taken)
    if record.direction == "quasi-newton":  # their decreases shrink linearly: the geometric tail
        h, resolution = get_tuning().quasi_newton_rate_window, objective_resolution(dtype)
        state.recent_decreases = (*state.recent_decreases, taken)[-2 * h:]
        state.recent_predicted = (*state.recent_predicted, relative)[-2 * h:]
        # Below the resolution, the models' decreases (inner products, no cancellation) stand in.
        last = taken if taken > resolution else relative
        state.gap_estimate = geometric_tail(last, state.slowest_rate(resolution))
    else:  # the forcing term and Newton's stopping rule read Newton steps' decreases
        state.previous_relative_decrease = state.last_relative_decrease
        state.last_relative_decrease = relative
        state.gap_estimate = remaining_gap(record, relative)
        state.recent_decreases = state.recent_predicted = ()
    state.last_loss = record.new_loss
    trusted = linear and record.accepted and record.step_size == 1.0 and record.ratio > 0.5
    tuning = get_tuning()
    resolved = relative >= tuning.model_error_resolution * objective_resolution(dtype)
    state.model_error = abs(1.0 - record.ratio) if trusted and resolved else 0.0


def _choose_direction(
    state: StepperState, result: StepResult, record: StepRecord, share: float, resolution: float
) -> None:
    """Decide whether the next step of a full-batch linear fit takes the quasi-Newton direction.

    Each kind of step is judged by its gain per pass over ``X``, read off its own steps, in
    decades of the gap (docs/design.md §11):

    * a Newton step by the gap it leaves, estimated from its record
      (:func:`._stopping.remaining_gap`): ``log10(1 + p / gap)`` for its
      relative decrease ``p``, over its passes (:func:`_newton_passes`: its
      CG products and its preconditioner's build on ``share`` of the rows,
      and its gradient). A step whose CG hit its cap
      (:meth:`Stepper._cg_budget`) is no Newton step: the gain it stands for
      is at most ``-log10(p / p_prev)`` per pass, its decrease taken against
      the step's before it (``state.taken``);
    * quasi-Newton steps (two passes each) by the rate ``r`` of their
      decreases taken: ``r^h`` the ratio of the sums of the last two windows
      of ``h = quasi_newton_rate_window`` decreases (sums, since a run's
      decreases alternate), ``-log10(r) / 2``.

    Quasi-Newton steps are tried after a Newton step that cost more than
    ``quasi_newton_after_passes`` passes (a cheaper step gains more per pass
    than any alternative) or was truncated, unless the last run of them
    gained less per pass than that step; a run of them goes on while it
    gains at least ``quasi_newton_keep_share`` of the last Newton step's
    gain at every reading and above it at one of the last
    ``quasi_newton_behind`` (each gain was read at its own phase of the
    fit, a window's within a factor of about 2), and stops at a rejected
    step or at a decrease below the objective's ``resolution`` (a Newton
    step's decrease, about the gap, then says whether the fit is done).
    """
    tuning = get_tuning()
    if result.direction == "quasi-newton":
        gain = _run_gain(state.run_series(resolution), tuning.quasi_newton_rate_window)
        state.quasi_newton_gain = state.quasi_newton_gain if gain is None else gain
        resolved = state.run_decrease() > resolution
        state.behind = state.behind + 1 if gain is not None and gain < state.newton_gain else 0
        far_behind = state.quasi_newton_gain < tuning.quasi_newton_keep_share * state.newton_gain
        keep = state.behind < tuning.quasi_newton_behind and not far_behind
        state.quasi_newton = record.accepted and resolved and keep
        if record.accepted and not resolved:  # the gap is about round-off: the Newton step solves to it
            state.last_relative_decrease = min(state.last_relative_decrease, resolution)
        return
    passes = _newton_passes(result, share)
    truncated = result.solve.reason == "max_iter"
    gap = state.gap_estimate
    decades = math.log10(1.0 + state.last_relative_decrease / gap) if 0.0 < gap < math.inf else 0.0
    state.newton_gain, state.behind = decades / passes, 0
    if truncated:  # no Newton step: at most what its decrease taken shows, where a decrease before it does
        earlier, latest = state.taken
        if 0.0 < latest < earlier < math.inf:
            state.newton_gain = min(state.newton_gain, -math.log10(latest / earlier) / passes)
    expensive = passes > tuning.quasi_newton_after_passes or truncated
    state.quasi_newton = expensive and state.quasi_newton_gain > state.newton_gain


def _newton_passes(result: StepResult, share: float) -> float:
    """Return a Newton step's passes over ``X``: its gradient, curvature products and preconditioner's build.

    ``1 + 2 (k + b) share`` for ``k`` CG products and a build costing ``b``
    of them on ``share`` of the rows, plus one pass on a curvature sample
    (``share < 1``: the JVP that gives the whole batch's model along the
    step, :func:`._step.compute_step`).

    Returns
    -------
    float
    """
    products = result.solve.n_iter + result.preconditioner_products
    return 1.0 + 2.0 * products * share + (1.0 if share < 1.0 else 0.0)


def _run_gain(decreases: tuple[float, ...], window: int) -> float | None:
    """Decades of the gap per pass of a run of quasi-Newton steps (two passes each); None before two windows.

    Returns
    -------
    float or None
    """
    if len(decreases) < 2 * window:
        return None
    older, newer = sum(decreases[-2 * window : -window]), sum(decreases[-window:])
    if not (older > 0.0 and newer > 0.0):
        return None
    return max(0.0, -math.log10(newer / older) / window) / 2.0


def _hand_tight_stops_to_newton(state: StepperState, tol: float) -> None:
    """End a run of quasi-Newton steps whose gap is below a ``tol`` under ``last_step_min_tol``.

    So tight a stop is Newton's (:func:`._stopping.full_batch_converged`).
    The next Newton step's decrease is about the gap left, and its forcing
    term reads that, not the decrease of the Newton step before the run.
    """
    if state.quasi_newton and tol < get_tuning().last_step_min_tol and state.gap_estimate <= tol:
        state.quasi_newton = False
        state.last_relative_decrease = state.gap_estimate


def _curvature_sample(
    state: StepperState, batch: Batch, head: Head, generator: torch.Generator
) -> CurvatureSample | None:
    """How many of a full batch's rows the next step's curvature is estimated on; None for all of them.

    Only for a linear head (:func:`._system.sample_curvature_rows`). The
    sample starts at ``curvature_sample_share`` of the rows, at least
    ``curvature_sample_min_rows`` and ``curvature_rows_per_logit`` per
    logit, and grows by :func:`_grow_curvature_sample`; beyond
    ``curvature_sample_max_share`` of the rows every row is used (a larger
    sample saves too little per CG product to pay for the slower, linear
    convergence of sampled Newton steps). A data-parallel fit draws the sample one
    process would draw on the concatenated rows (each rank keeps its own).

    Returns
    -------
    CurvatureSample or None
    """
    if not head.is_linear:
        return None
    n, tuning = batch.size, get_tuning()
    if state.curvature_sample == 0:
        floor = max(tuning.curvature_sample_min_rows, tuning.curvature_rows_per_logit * head.n_logits)
        state.curvature_sample = max(floor, math.ceil(tuning.curvature_sample_share * n))
    if state.curvature_sample > tuning.curvature_sample_max_share * n:
        return None
    return CurvatureSample(state.curvature_sample, generator)


def _grow_curvature_sample(state: StepperState, result: StepResult) -> None:
    """Double the curvature sample after a step along which it was far from the whole batch's curvature.

    ``result.sampled_curvature`` is ``delta' G_S delta / delta' G delta``
    along the step just computed: outside ``[1 / curvature_sample_error,
    curvature_sample_error]`` the sample misjudged the very direction it
    chose, and more rows are taken. (The reduction ratio cannot tell: the
    step's model along its direction is the whole batch's.)
    """
    error = result.sampled_curvature
    bound = get_tuning().curvature_sample_error
    if state.curvature_sample and not (1.0 / bound <= error <= bound):
        state.curvature_sample *= 2


def _may_be_last(state: StepperState, tol: float) -> bool:
    """Whether the next full-batch step may end the fit, as the estimated gap after the last one stands.

    Its decrease is about that gap, which must be within ``last_step_gap *
    tol``; and ``full_batch_converged`` ends a convex fit only on a step whose
    decrease is superlinear (at most ``superlinear`` of the previous step's)
    or below ``tol**2``. While the decreases shrink only linearly (the
    quadratic model misjudges the objective along the steps) no step can end
    the fit, and solving one to the stop's accuracy only costs CG iterations.

    Returns
    -------
    bool
    """
    gap, tuning = state.gap_estimate, get_tuning()
    if gap > tuning.last_step_gap * tol:
        return False
    return gap <= tuning.superlinear * state.last_relative_decrease or gap <= tol**2
