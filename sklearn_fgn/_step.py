r"""One damped FGN (or full-GGN) step on one batch: the four phases, in :func:`compute_step`.

The objective (docs/design.md §1) of a batch with normalised weights
``omega = s / sum(s)`` is

.. math::

    L(\theta) = \sum_i \omega_i \, \mathrm{CE}(z_i, y_i) + \frac{\alpha}{2} \|\theta_{pen}\|^2,

and the step solves ``(G + Lambda) delta = -grad L`` with ``G = B^T B`` the
FGN (or full GGN) curvature and ``Lambda`` diagonal: ``damping + alpha`` on
weights, ``damping`` on biases. By Woodbury,

.. math::

    (G + \Lambda)^{-1} = \Lambda^{-1} - \Lambda^{-1} B^T (I + B \Lambda^{-1} B^T)^{-1} B \Lambda^{-1},

so the damped system can be solved in the row space of ``B`` (one row per
example for FGN), where ``I + B Lambda^-1 B^T`` has every eigenvalue >= 1:

    (I + B Lambda^-1 B^T) z = B Lambda^-1 grad,   delta = -Lambda^-1 (grad - B^T z).

This is the system of docs/design.md §3, ``(I + B Lambda^-1 B^T) u = r - B Lambda^-1 rho``
rewritten with ``z = r - u``: ``r_i = -sqrt(omega_i) exp(-m_i / 2)``
overflows for badly misclassified rows while ``B^T r`` (the data gradient)
does not, and this form only ever touches ``B^T r``. Every quantity stays
bounded: ``sqrt(omega w)`` is computed in log space, the gradient
coefficient is ``omega * phi'(m)`` with ``phi'`` in (-1, 0).

How the solvers use it:

* ``solver="cholesky"`` forms ``B_F Lambda^-1 B_F^T`` exactly (n x n, cost
  independent of the number of parameters), factorises ``I +`` it once and
  applies ``(G_F + Lambda)^-1`` by the formula above. That exact inverse
  preconditions CG on the parameter-space system ``(G + Lambda) delta = -grad``:
  for FGN it converges in one iteration and the second, if any, is an
  iterative refinement (``delta`` is a difference of ``O(1 / lambda)`` terms,
  so for small ``lambda`` round-off in the Woodbury formula is amplified;
  measuring the residual in parameter space catches it). For the full GGN it
  is FGN-preconditioned GGN-CG (``G_F <= G``).
* ``solver="cg"`` runs CG on the same parameter-space system preconditioned
  by ``Lambda^-1``: its iterates are exactly row-space CG's, mapped by the
  formula for ``delta``, with the residual measured where it matters.

The logits map is a :class:`._heads.Head` spec or any ``LogitsFn``
``(params, X) -> logits`` (see :mod:`._curvature`); the skorch integration
passes a ``torch.func.functional_call`` of the user's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._curvature import LogitsFn, as_head
from ._distributed import SINGLE, Communicator
from ._heads import Head, Params, intercept_key
from ._inner import SolveRecord, damping_vector, mixed_pays_off, solve, solve_mixed
from ._objective import dot, flatten, unflatten, weighted_sq
from ._preconditioners import PreconditionerRequest, choose_preconditioner
from ._system import (
    DampedSystem,
    StepOptions,
    build_system,
    curvature_along,
    quadratic_model,
    sample_curvature_rows,
    subsampled_system,
)
from ._tuning import get_tuning

__all__ = ["CURVATURES", "SOLVERS", "StepResult", "compute_step"]

CURVATURES = ("fgn", "ggn")
SOLVERS = ("auto", "cg", "cholesky")


@dataclass(frozen=True)
class StepResult:
    """A damped step and what it cost.

    Attributes
    ----------
    step : dict of Tensor
        ``delta``, shaped like ``params``.
    loss : Tensor
        Objective at ``params`` (0-d, on the device).
    gradient : dict of Tensor
        Gradient of the objective at ``params``.
    predicted_decrease : Tensor
        ``-(g^T delta + 1/2 delta^T (G + alpha P) delta)``, the decrease the
        undamped quadratic model predicts for the step taken (0-d; from CG's
        residual, no extra matvec).
    solver : str
        The preconditioner's name: ``"cholesky"`` (Gram-preconditioned CG) or ``"cg"``.
    solve : SolveRecord
        What the inner solve did (products, residual, why it stopped).
    logits : Tensor of shape (n, n_logits) or None
        Logits at ``params`` (computed anyway; skorch reports them as ``y_pred``).
    logits_step : Tensor of shape (n, n_logits) or None
        ``J delta``, the change of the logits along the step, accumulated by
        CG from the JVPs its curvature products compute anyway. For the
        linear head (logits linear in the parameters) ``logits + logits_step``
        are the logits at ``params + delta``: no forward pass is needed to
        evaluate the step. None for other heads.
    slope : Tensor or None
        ``g' delta`` (0-d), the directional derivative along the step.
    step_curvature : Tensor or None
        ``delta' (G + alpha P) delta`` (0-d). With ``slope`` it gives the
        model along the ray, ``q(t) = t slope + t^2 step_curvature / 2``;
        ``predicted_decrease`` is ``-q(1)``.
    damping_term : Tensor or None
        ``damping * delta' M delta`` (0-d), the damping's part of
        ``delta' (G + Lambda) delta`` (``M`` the metric): when it is most of
        ``-slope`` the damping, not the curvature, set the step's length.
    curvature : str
        ``"fgn"`` or ``"ggn"``, the curvature of the system solved.
    cg_tol : float
        The tolerance CG was given.
    sampled_curvature : float
        With a curvature sample: ``delta' G_S delta / delta' G delta``, the
        sampled curvature along the step relative to the whole batch's
        (``step_curvature`` and ``predicted_decrease`` are the whole
        batch's, and where that ratio is small the step is cut to the whole
        batch's model's minimiser along it); 1.0 without a sample.
    direction : {"newton", "quasi-newton"}
        How the step's direction was found: CG on the damped system, or the
        limited-memory quasi-Newton inverse of the fit's secant pairs
        (``cg_tol`` is then 1.0: the step solves nothing of Newton's system).
    preconditioner_products : float
        What building CG's preconditioner cost, in curvature products on
        the rows CG ran on (:meth:`._preconditioners.Preconditioner.build_products`).
    """

    step: Params
    loss: Tensor
    gradient: Params
    predicted_decrease: Tensor
    solver: str
    solve: SolveRecord
    logits: Tensor | None = None
    logits_step: Tensor | None = None
    slope: Tensor | None = None
    step_curvature: Tensor | None = None
    damping_term: Tensor | None = None
    curvature: str = "fgn"
    cg_tol: float = 0.0
    sampled_curvature: float = 1.0
    direction: str = "newton"
    preconditioner_products: float = 0.0


def compute_step(
    head: Head | LogitsFn,
    params: Params,
    X: Tensor,
    y: Tensor,
    sample_weight: Tensor | None = None,
    options: StepOptions | None = None,
    *,
    logits: Tensor | None = None,
    cache: dict | None = None,
) -> StepResult:
    """Return the damped step ``-(G + Lambda)^{-1} grad L`` on one batch.

    Four phases: :func:`._system.build_system` (loss, gradient, operator,
    damping; on a curvature sample, :func:`._system.subsampled_system`),
    :func:`._preconditioners.choose_preconditioner`, the inner solve
    (:func:`._inner.solve` or :func:`._inner.solve_mixed`), and the
    quadratic model along the step (:func:`._system.quadratic_model`).

    Parameters
    ----------
    head : Head or callable
        The logits map: a :class:`Head` spec, or a function
        ``logits_fn(params, X) -> logits`` of shape (n, n_logits) that is pure
        in ``params`` (``torch.func`` transforms it), e.g. a
        ``torch.func.functional_call`` of an ``nn.Module``.
    params : dict of Tensor
        Current parameters (all on ``X``'s device and dtype).
    X : Tensor of shape (n, n_features)
        The batch (for a logits function: whatever it takes as ``X``).
    y : Tensor of shape (n,), int64
        Class indices (0/1 for a single-logit head).
    sample_weight : Tensor of shape (n,), optional
        Non-negative weights, normalised here to sum to one (or divided by
        ``options.weight_total``).
    options : StepOptions, optional
        The damping, the curvature, the solver and its tolerances
        (``StepOptions()`` if None).
    logits : Tensor of shape (n, n_logits), optional
        The logits at ``params`` on ``X`` when the caller has them (from
        evaluating the previous trial step): a linear head then skips its
        forward pass; other heads recompute them with their graph.
    cache : dict, optional
        Kept by the caller across full-batch steps on the same rows: what
        depends on the rows alone (the class-means model's group moments,
        the rows' norms) is computed once and reused while ``X``, ``y`` and
        the weights are those it was computed from.

    Returns
    -------
    StepResult
        Cost: one forward pass and one VJP (gradient), then per CG iteration
        one JVP and one VJP of the logits map; the Gram-Cholesky
        preconditioner adds one Gram (O(n^2 (d + h))), an O(n^3 / 3)
        factorisation and per iteration one more JVP/VJP pair and two
        triangular solves. For the linear head CG also accumulates
        ``logits_step = J delta`` (one ``(n, n_logits)`` axpy per
        iteration), so evaluating the step needs no forward pass; on a
        curvature sample one more JVP on all rows gives it.
    """
    o = StepOptions() if options is None else options
    _check_solver(o.solver, head, o.comm)
    system = build_system(head, params, X, y, sample_weight, o, logits, cache)
    secant = o.secant if system.linear else None
    if secant is not None:
        secant.observe(params, system.gradient)
    model = system
    if o.curvature_sample is not None and system.linear:
        drawn = sample_curvature_rows(system, o.curvature_sample, cache)
        if drawn is not None:
            model = subsampled_system(system, *drawn)
    if secant is not None and o.quasi_newton:
        return _quasi_newton_step(head, system, model, o, cache)
    if secant is not None:
        secant.forget_model()
    request = PreconditionerRequest(o.solver, o.cg_tol, o.structured, cache)
    solver, preconditioner, build_products = choose_preconditioner(model, request)
    if o.mixed_precision and mixed_pays_off(model, o.cg_tol):
        step, record = solve_mixed(model, preconditioner, o.cg_tol, o.cg_max_iter)
    else:
        step, record = solve(
            model.operator, model.gradient, model.damping, preconditioner, o.cg_tol, o.cg_max_iter,
            model.linear, o.comm,
        )  # fmt: skip
    _check_finite_step(record, system.lin.logits.dtype, o.damping)
    logits_step = None
    if system.linear and model is system:
        logits_step = record.image if record.image is not None else torch.zeros_like(system.lin.logits)
    step, logits_step = _without_intercept_shift(head, step, logits_step)
    slope, curvature_term, damping_term = quadratic_model(model, step, unflatten(record.residual, step))
    sampled = 1.0
    if model is not system:
        step, logits_step, slope, curvature_term, damping_term, sampled = _whole_batch_model(
            system, step, slope, curvature_term, damping_term
        )
    return StepResult(
        step, system.loss, system.gradient, -(slope + 0.5 * curvature_term), solver, record,
        system.lin.logits, logits_step, slope, curvature_term, damping_term, o.curvature, o.cg_tol, sampled,
        preconditioner_products=build_products,
    )  # fmt: skip


def _quasi_newton_step(
    head: Head, system: DampedSystem, model: DampedSystem, o: StepOptions, cache: dict | None
) -> StepResult:
    """Return the quasi-Newton step (:mod:`._quasi_newton`), scaled to the whole batch's model minimiser.

    ``H_0`` is ``gamma M^{-1}`` for the cheapest model ``M`` of the damped
    curvature on ``model``'s rows (``Lambda`` without one), rebuilt every
    ``quasi_newton_model_refresh`` steps. One JVP on all
    rows gives ``J delta``, the curvature along the direction
    (:func:`._system.curvature_along`) and so the model ``q(t) = t slope +
    t^2 c / 2``; the step is ``t* = -slope / c`` times the direction, where
    that model is least (its damping term is zero: the damping only enters
    through ``M``). A direction that is not one of descent (round-off in the
    pairs) is replaced by ``-M^{-1} g`` and the pairs are forgotten.

    Returns
    -------
    StepResult
        ``solve.n_iter`` is 0 (no curvature product), ``direction`` ``"quasi-newton"``.
    """
    def build() -> Callable[[Tensor], Tensor]:
        request = PreconditionerRequest(o.solver, o.cg_tol, o.structured, cache, cheap=True)
        apply = choose_preconditioner(model, request).apply
        if apply is None:
            inverse_damping = 1.0 / damping_vector(system.gradient, system.damping)
            return lambda r: r * inverse_damping
        return apply

    preconditioner = o.secant.inverse_model(build, get_tuning().quasi_newton_model_refresh)
    gradient = flatten(system.gradient)
    direction = o.secant.direction(gradient, preconditioner)
    if not float(torch.dot(direction.double(), gradient.double())) < 0.0:
        o.secant.pairs.clear()  # this step's point stays: the next pair starts here
        direction = -preconditioner(gradient)
    step, _ = _without_intercept_shift(head, unflatten(direction, system.gradient), None)
    logits_step = system.lin.jvp(step)
    slope = dot(system.gradient, step)
    curvature_term = curvature_along(system, logits_step) + weighted_sq(step, system.coefficients)
    t = -float(slope) / float(curvature_term) if float(curvature_term) > 0.0 else 1.0
    if t > 0.0 and t != 1.0:
        step, logits_step = {k: v * t for k, v in step.items()}, logits_step.mul_(t)
        slope, curvature_term = slope * t, curvature_term * (t * t)
    record = SolveRecord(0, float("nan"), "quasi-newton")
    return StepResult(
        step, system.loss, system.gradient, -(slope + 0.5 * curvature_term), "quasi-newton", record,
        system.lin.logits, logits_step, slope, curvature_term, torch.zeros_like(slope), o.curvature, 1.0,
        direction="quasi-newton",
    )  # fmt: skip


def _whole_batch_model(
    system: DampedSystem, step: Params, slope: Tensor, curvature_term: Tensor, damping_term: Tensor
) -> tuple[Params, Tensor, Tensor, Tensor, Tensor, float]:
    """Return the model along a step computed on a curvature sample, made the whole batch's.

    CG's ``J delta`` was on the sampled rows: one JVP on all rows gives the
    logits' step, and :func:`._system.curvature_along` the whole batch's
    curvature along it. Where the sample underestimated that curvature, the
    whole batch's model is least short of the unit step: the step is cut to
    that length.

    Returns
    -------
    step, logits_step, slope, curvature_term, damping_term
        As :class:`StepResult` reports them.
    sampled : float
        ``delta' G_S delta / delta' G delta`` along the step.
    """
    logits_step = system.lin.jvp(step)
    penalty_term = weighted_sq(step, system.coefficients)
    along = curvature_along(system, logits_step)
    sampled = float(curvature_term - penalty_term) / max(float(along), 1e-300)
    curvature_term = along + penalty_term
    t = -float(slope) / float(curvature_term) if float(curvature_term) > 0 else 1.0
    if 0.0 < t < 1.0:
        step, logits_step = {k: v * t for k, v in step.items()}, logits_step.mul_(t)  # a fresh JVP
        slope, curvature_term, damping_term = slope * t, curvature_term * t * t, damping_term * t * t
    return step, logits_step, slope, curvature_term, damping_term, sampled


def _without_intercept_shift(
    head: Head | LogitsFn, step: Params, logits_step: Tensor | None
) -> tuple[Params, Tensor | None]:
    """Remove a step's common shift of the output intercepts (softmax heads) and its image in the logits.

    Softmax logits are shift invariant and the output intercepts are not
    penalised: their common shift ``u = (0, ..., 0, 1_K)`` changes neither
    the loss nor any prediction. Where the damping maps ``u`` to a multiple
    of itself (the identity metric; the linear head's centred feature
    metric), ``G u = 0`` and ``grad . u = 0`` give the exact step no
    component along it; round-off gives one, amplified by ``1 / lambda``
    (in float32 fits it moved the intercepts far from
    ``LogisticRegression``'s while the coefficients matched). Removing it
    keeps the intercepts' class mean where the fit started.

    Returns
    -------
    step : dict of Tensor
    logits_step : Tensor or None
    """
    head = as_head(head)
    name = intercept_key(head.n_layers - 1) if head.has_layers else None
    if name not in step or step[name].shape[0] < 2:
        return step, logits_step
    shift = step[name].mean()
    step = step | {name: step[name] - shift}
    return step, (None if logits_step is None else logits_step - shift)


def _check_finite_step(record: SolveRecord, dtype: torch.dtype, damping: float) -> None:
    """Raise where the gradient or the first curvature product overflowed the dtype (a zero step otherwise).

    Raises
    ------
    ValueError
        Naming the cause (too small a damping, or too large features or logits).
    """
    # A gradient or first curvature product beyond the dtype's range leaves
    # a zero step, which the loop would take for convergence.
    if record.reason == "nonfinite" and record.n_iter <= 1:
        wider = " or use float64" if dtype != torch.float64 else ""
        tiny = float(damping) < 1e3 * torch.finfo(dtype).tiny ** 0.5
        cause = f"damping={damping:.3g} too small" if tiny else "features or logits too large for it"
        remedy = "raise damping" if tiny else f"scale the features (e.g. StandardScaler){wider}"
        raise ValueError(
            f"The gradient or curvature overflowed {dtype} ({cause}, largest {torch.finfo(dtype).max:.3g}); "
            f"{remedy}."
        )


def _check_solver(solver: str, head: Head | LogitsFn, comm: Communicator = SINGLE) -> None:
    """Raise where ``solver="cholesky"`` cannot form the Gram.

    Raises
    ------
    ValueError
        In a data-parallel fit, or for a logits function (no layers).
    """
    if solver == "cholesky" and comm.distributed:
        raise ValueError(
            "solver='cholesky' forms the Gram of the batch's rows, which a data-parallel fit spreads "
            "over the ranks; use solver='cg' (or 'auto')"
        )
    if solver == "cholesky" and not as_head(head).has_layers:
        raise ValueError(
            "solver='cholesky' needs the per-layer structure of a Head to form the Gram; "
            "use solver='cg' (or 'auto') with a logits function"
        )
