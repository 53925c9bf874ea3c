r"""Inner solvers of the damped system ``(G + Lambda) delta = -grad`` (docs/design.md §3, §5).

Preconditioned CG on the parameter-space system, its curvature products
in the system's dtype (:func:`solve`) or, for a linear head on float64
features, in float32 with a float64 check (:func:`solve_mixed`). Either
returns the step and a :class:`SolveRecord`: the residual ``-grad - (G +
Lambda) delta`` (from which the quadratic model along the step follows
without another product) and ``J delta`` where it was tracked. A direct
solver returns the same record (its residual costs one product), so
nothing downstream assumes CG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._cg import CGResult, conjugate_gradient
from ._curvature import RowSpaceOperator, linearize, make_fgn_operator, make_ggn_operator
from ._distributed import SINGLE, Communicator
from ._heads import Params
from ._margin import MarginStats
from ._metric import float32_matmuls_exact
from ._objective import flatten, unflatten
from ._tuning import get_tuning

if TYPE_CHECKING:
    from ._system import DampedSystem

__all__ = [
    "SolveRecord",
    "damping_vector",
    "low_precision_operator",
    "mixed_pays_off",
    "solve",
    "solve_mixed",
]


@dataclass(frozen=True)
class SolveRecord:
    """What an inner solve did, whatever the solver.

    Attributes
    ----------
    n_iter : int
        Curvature products spent (CG's iterations; a direct solve's check).
    residual_norm : float
        ``||-grad - (G + Lambda) delta|| / ||grad||``.
    reason : str
        Why it stopped (one of :data:`._cg.CG_STOP_REASONS`).
    residual : Tensor or None
        That residual itself, flat: with the step it gives the quadratic
        model along the step (:func:`._system.quadratic_model`).
    image : Tensor or None
        ``J delta``, shape (n, K), where the solve tracked it.
    """

    n_iter: int
    residual_norm: float
    reason: str
    residual: Tensor | None = None
    image: Tensor | None = None

    @classmethod
    def from_cg(cls, result: CGResult) -> SolveRecord:
        """Return the record of a :func:`._cg.conjugate_gradient` run (its solution is the step)."""
        return cls(result.n_iter, result.residual_norm, result.reason, result.residual, result.image)


def solve(
    op: RowSpaceOperator,
    grad: Params,
    lam: dict[str, float],
    preconditioner: Callable[[Tensor], Tensor] | None,
    cg_tol: float,
    cg_max_iter: int,
    track_logits: bool = False,
    comm: Communicator = SINGLE,
) -> tuple[Params, SolveRecord]:
    """Preconditioned CG on ``(B^T B + Lambda) delta = -grad`` in parameter space.

    With the diagonal preconditioner ``Lambda^{-1}`` its iterates are those of
    CG on the row-space system ``(I + B Lambda^{-1} B^T) z = B Lambda^{-1} grad``
    mapped by ``delta = -Lambda^{-1}(grad - B^T z)`` (same Krylov space, same
    spectrum), but the residual is measured on the parameter-space system: the
    row-space form scales its right-hand side by ``1 / lambda`` and, for small
    ``lambda``, a row-space relative tolerance is far looser than it looks and
    ``delta`` is a difference of ``O(1 / lambda)`` terms.

    With ``track_logits`` CG also accumulates ``J delta`` (``result.image``)
    from the JVP inside each curvature product. With ``comm`` the rows are a
    rank's shard: each curvature product is summed over the ranks (one
    all-reduce of ``P`` values); CG's vectors are replicated, so its inner
    products need none.

    Returns
    -------
    step : dict of Tensor
        ``delta``, shaped like ``grad``.
    record : SolveRecord
        What CG did.
    """
    lam_vec, image_matvec, apply_m = _cg_setup(op, grad, lam, preconditioner, comm)

    def system_matvec(v: Tensor) -> Tensor:
        return image_matvec(v)[0]

    result = conjugate_gradient(
        system_matvec, -flatten(grad), tol=cg_tol, max_iter=cg_max_iter, preconditioner=apply_m,
        image_matvec=image_matvec if track_logits else None,
    )  # fmt: skip
    return unflatten(result.solution, grad), SolveRecord.from_cg(result)


def _cg_setup(
    op: RowSpaceOperator, grad: Params, lam: dict, preconditioner: Callable[[Tensor], Tensor] | None,
    comm: Communicator,
) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, Tensor]], Callable[[Tensor], Tensor]]:  # fmt: skip
    """Return what both solvers run CG with: ``Lambda``'s diagonal, the damped product, the preconditioner.

    Returns
    -------
    lam_vec : Tensor
        ``Lambda``'s diagonal, flat.
    image_matvec : callable
        ``v -> ((G + Lambda) v, J v)`` (:func:`_damped_product`).
    apply_m : callable
        ``preconditioner``, or ``r -> Lambda^{-1} r`` without one.
    """
    lam_vec = damping_vector(grad, lam)
    apply_m = preconditioner if preconditioner is not None else (lambda r: r / lam_vec)
    return lam_vec, _damped_product(op, grad, lam_vec, comm), apply_m


def _damped_product(
    op: RowSpaceOperator, like: Params, lam_vec: Tensor, comm: Communicator
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Return ``v -> ((G + Lambda) v, J v)`` on flat vectors (``G v`` summed over the ranks)."""

    def product(v: Tensor) -> tuple[Tensor, Tensor]:
        jv = op.jvp(unflatten(v, like))
        return torch.addcmul(comm.sum_(flatten(op.curvature_from_jvp(jv))), lam_vec, v), jv

    return product


def damping_vector(grad: Params, lam: dict[str, float | Tensor]) -> Tensor:
    """``Lambda``'s diagonal as one flat vector, in the gradient's layout."""
    return flatten({k: torch.zeros_like(g).add_(lam[k]) for k, g in grad.items()})


def mixed_pays_off(system: DampedSystem, cg_tol: float) -> bool:
    """Return whether a step may run CG's curvature products in float32 (see ``mixed_min_tol``).

    Not where the user let float32 matmuls use TF32 or bfloat16
    (``torch.set_float32_matmul_precision`` below ``"highest"``): their
    products would rarely pass the float64 check.

    Returns
    -------
    bool
    """
    return (
        system.linear
        and system.X.dtype == torch.float64
        and cg_tol >= get_tuning().mixed_min_tol
        and float32_matmuls_exact()
    )


def low_precision_operator(system: DampedSystem, dtype: torch.dtype = torch.float32) -> RowSpaceOperator:
    """Return the system's curvature operator ``B`` on ``dtype`` copies of its batch, parameters and logits.

    Cost: one cast of the batch (``O(n d)``, an ``n x d`` copy for the
    step's lifetime) and of the margin quantities (``O(n K)``).

    Returns
    -------
    RowSpaceOperator
        FGN's or the full GGN's ``B`` (per ``system.curvature``), in ``dtype``.
    """
    params = {k: t.to(dtype) for k, t in system.params.items()}
    logits = system.lin.logits.to(dtype)
    lin = linearize(system.head, params, system.X.to(dtype), logits)
    stats = MarginStats(logits, system.y)
    make = make_fgn_operator if system.curvature == "fgn" else make_ggn_operator
    return make(lin, system.y, system.weights.to(dtype), stats)


def solve_mixed(
    system: DampedSystem,
    preconditioner: Callable[[Tensor], Tensor] | None,
    cg_tol: float,
    cg_max_iter: int,
) -> tuple[Params, SolveRecord]:
    """:func:`solve` for a linear head, its curvature products in float32 and its result checked in float64.

    CG runs in float64 (iterates, residual recursion, preconditioner, the
    damping term) with ``G v`` from :func:`low_precision_operator`. Its
    recursive residual then describes the float32 system, so one float64
    product measures the true residual ``-grad - (G + Lambda) delta``
    (returned, so the quadratic model is exact) and ``J delta`` (the
    logits' step). If that residual is above ``cg_tol``, CG goes on in
    float64 from ``delta``; if the float32 products overflow or lose
    positive curvature, the step is solved in float64 from scratch. With
    several logits the float32 products are projected on zero class sums,
    as the exact ones are.

    Returns
    -------
    step : dict of Tensor
    record : SolveRecord
        ``n_iter`` counts every product, the check included.
    """
    grad, comm, op = system.gradient, system.comm, system.operator
    lam_vec, image_matvec, apply_m = _cg_setup(op, grad, system.damping, preconditioner, comm)
    low, low_dtype = low_precision_operator(system), torch.float32
    # Softmax logits are shift invariant, so G's range has zero sums over the
    # classes; float32 round-off breaks that, and along the unpenalised
    # intercepts' shift CG would amplify it by 1 / lambda (a drift of every
    # intercept that no loss sees). The products are projected back.
    shift_invariant = system.stats.logits.shape[1] > 1

    def low_matvec(v: Tensor) -> Tensor:
        low_product = low.curvature_from_jvp(low.jvp(unflatten(v.to(low_dtype), grad)))
        product = {k: t.to(v.dtype) for k, t in low_product.items()}
        if shift_invariant:
            product = {k: t - t.mean(0, keepdim=True) for k, t in product.items()}
        return torch.addcmul(comm.sum_(flatten(product)), lam_vec, v)

    rhs = -flatten(grad)
    result = conjugate_gradient(low_matvec, rhs, tol=cg_tol, max_iter=cg_max_iter, preconditioner=apply_m)
    if result.reason not in ("converged", "stagnated", "max_iter"):
        return solve(op, grad, system.damping, preconditioner, cg_tol, cg_max_iter, True, comm)
    n_iter = result.n_iter + 1
    product, jv = image_matvec(result.solution)
    residual = rhs - product
    rhs_norm = float(torch.linalg.vector_norm(rhs))
    residual_norm = float(torch.linalg.vector_norm(residual)) / rhs_norm
    reason = result.reason if residual_norm <= cg_tol else "max_iter"
    if reason == "max_iter" and result.reason != "max_iter" and n_iter < cg_max_iter:
        result = conjugate_gradient(
            lambda v: image_matvec(v)[0], rhs, tol=cg_tol, max_iter=cg_max_iter - n_iter, x0=result.solution,
            preconditioner=apply_m,
        )  # fmt: skip
        n_iter += result.n_iter + 1  # and the product of x0 inside
        jv = op.jvp(unflatten(result.solution, grad))
        residual, residual_norm, reason = result.residual, result.residual_norm, result.reason
    return unflatten(result.solution, grad), SolveRecord(n_iter, residual_norm, reason, residual, jv)
