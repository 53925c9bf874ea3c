"""The outer loop: epochs of steps over batches, logging, stopping (``docs/design.md`` sections 7-8).

Shape (as scikit-learn's ``NewtonSolver``): setup -> repeat (step -> converged?)
-> finalize. Where each phase lives:

* the batches an epoch runs over: :mod:`._batches`;
* one step on a batch, with its per-step rules (curvature, CG tolerance,
  damping floor, full-batch bookkeeping): :class:`._stepper.Stepper`, built
  once per fit by :func:`run_epochs`;
* taking or rejecting a step and adapting the damping: :mod:`._damping`;
* when to stop: :mod:`._stopping`.

:class:`LoopState` is the only state carried between calls (it is what
``warm_start`` and ``partial_fit`` resume from).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._batches import TrainingData, iter_batches
from ._curvature import Alpha
from ._damping import StepRecord
from ._distributed import SINGLE, Communicator
from ._heads import Head, Params, forward
from ._stepper import Stepper, StepperState
from ._stopping import full_batch_converged, update_no_improvement

__all__ = ["LoopConfig", "LoopState", "run_epochs", "validation_accuracy"]


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the outer loop and its steps (already validated by the estimator).

    The loop reads the batching, the epochs and the stopping settings; the
    fit's :class:`._stepper.Stepper` the step settings.

    ``alpha`` is the penalty on the mean loss (``alpha / sum(s)`` of the
    estimator's), a float or per-parameter coefficients (see
    :func:`._curvature.penalty_coefficients`). ``whitened``: the features
    are whitened, so full-batch CG steps of a linear head may be
    preconditioned by the models of its curvature (hard rows, class means,
    Kronecker; :mod:`._preconditioners`).
    ``gap_tol``: a full-batch linear fit whose decreases shrink only
    linearly also stops once their geometric tail is below it (see
    :func:`._stopping.full_batch_converged`); None asks Newton's rate. ``null_loss``, with
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
    whitened: bool = False
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
    # Full batch without hold-out: the logits at ``params`` on the training
    # rows, set by run_epochs (None otherwise), and, after a fit, the
    # parameters in the fit's coordinates (``fit_params``): a path's next
    # alpha on the same rows starts from both, without a forward pass.
    logits: Tensor | None = None
    fit_params: Params | None = None
    # What full-batch steps on the same rows share (``compute_step``'s ``cache``).
    step_cache: dict = field(default_factory=dict, repr=False, compare=False)
    # What the next step reads of the steps before it (the forcing term, the curvature sample).
    stepper_state: StepperState = field(default_factory=StepperState)


def _run_epoch(
    head: Head, state: LoopState, data: TrainingData, stepper: Stepper, generator: torch.Generator,
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
    cfg, records = stepper.cfg, []
    batches = iter_batches(
        data.X, data.y, data.sample_weight, cfg.batch_size, generator, data.device, data.transform, data.shard
    )
    for batch in batches:
        _, state.params, logits, record = stepper.step(
            head, state.params, batch, state.damping, state.stepper_state, logits
        )
        state.damping = record.next_damping
        records.append((batch.size, record))
    return records, (logits if stepper.full_batch else None)


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
    stepper = Stepper.for_fit(head, data, cfg, generator, state.step_cache)
    full_batch = stepper.full_batch
    # full batch: the logits at state.params, reused by the next step
    logits, state.logits = (state.logits if full_batch else None), None
    for _ in range(cfg.max_iter if n_epochs is None else n_epochs):
        if on_epoch_begin is not None:
            on_epoch_begin(state)
        start = time.perf_counter()
        records, logits = _run_epoch(head, state, data, stepper, generator, logits)
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
        stop = update_no_improvement(state, cfg, score)
        if full_batch and score is None:  # MLP's no-improvement rule is for noisy epochs
            steps = state.stepper_state
            stop = full_batch_converged(
                records[-1][1], cfg, data.X.dtype, steps.previous_relative_decrease, head.is_linear,
                steps.gap_estimate, steps.run_decrease(),
            )
        state.converged = stop
        if on_epoch_end is not None and on_epoch_end(state):
            state.stopped = True
        if state.converged or state.stopped:
            break
    state.logits = logits if data.X_val is None else None
    return state
