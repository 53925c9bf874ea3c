r"""One damped FGN (or full-GGN) step on one batch.

The objective (DESIGN.md §2) of a batch with normalised weights
``omega = s / sum(s)`` is

.. math::

    L(\theta) = \sum_i \omega_i \, \mathrm{CE}(z_i, y_i) + \frac{\alpha}{2} \|\theta_{pen}\|^2,

and the step solves ``(G + Lambda) delta = -grad L`` with ``G = B^T B`` the
FGN (or full GGN) curvature and ``Lambda`` diagonal: ``damping + alpha`` on
weights, ``damping`` on biases. By Woodbury,

.. math::

    (G + \Lambda)^{-1} = \Lambda^{-1} - \Lambda^{-1} B^T (I + B \Lambda^{-1} B^T)^{-1} B \Lambda^{-1},

so the solver works in the row space of ``B`` (one row per example for FGN):

    (I + B Lambda^-1 B^T) z = B Lambda^-1 grad,   delta = -Lambda^-1 (grad - B^T z).

This is DESIGN.md's system ``(I + B Lambda^-1 B^T) u = r - B Lambda^-1 rho``
rewritten with ``z = r - u``: ``r_i = -sqrt(omega_i) exp(-m_i / 2)``
overflows for badly misclassified rows while ``B^T r`` (the data gradient)
does not, and this form only ever touches ``B^T r``. Every quantity stays
bounded: ``sqrt(omega w)`` is computed in log space, the gradient
coefficient is ``omega * phi'(m)`` with ``phi'`` in (-1, 0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ._cg import CGResult, conjugate_gradient
from ._curvature import (
    RowSpaceOperator,
    damping_diagonal,
    fgn_gram,
    linearize,
    make_fgn_operator,
    make_ggn_operator,
)
from ._heads import Head, forward, is_penalized
from ._margin import loss_derivative, margin, margin_direction, per_example_loss

__all__ = [
    "CHOLESKY_MAX_ROWS",
    "CURVATURES",
    "SOLVERS",
    "StepResult",
    "compute_step",
    "normalized_weights",
    "objective",
]

Params = dict[str, Tensor]
CURVATURES = ("fgn", "ggn")
SOLVERS = ("auto", "cg", "cholesky")
# solver="auto" forms the n x n Gram and factorises it up to this many rows;
# past it the O(n^2) memory and O(n^3) time lose to a few CG iterations.
CHOLESKY_MAX_ROWS = 4096


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
        undamped quadratic model predicts (0-d; ``B delta = -z`` is used, exact
        for the Cholesky solve and to ``cg_tol`` for CG).
    solver : str
        ``"cholesky"`` or ``"cg"``.
    cg : CGResult or None
        The CG record, ``None`` for a Cholesky solve.
    """

    step: Params
    loss: Tensor
    gradient: Params
    predicted_decrease: Tensor
    solver: str
    cg: CGResult | None


def normalized_weights(sample_weight: Tensor | None, n: int, like: Tensor) -> Tensor:
    """``omega = s / sum(s)`` (uniform ``1/n`` when ``sample_weight`` is None)."""
    if sample_weight is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    sample_weight = sample_weight.to(dtype=like.dtype, device=like.device)
    return sample_weight / sample_weight.sum()


def _penalty(params: Params, alpha: float) -> Tensor:
    return 0.5 * alpha * sum((t * t).sum() for k, t in params.items() if is_penalized(k))


def objective(head: Head, params: Params, X: Tensor, y: Tensor, weights: Tensor, alpha: float) -> Tensor:
    """``sum_i omega_i CE_i + alpha/2 ||theta_pen||^2`` (0-d tensor). One forward pass."""
    m = margin(forward(head, params, X), y)
    return (weights * per_example_loss(m)).sum() + _penalty(params, alpha)


def _loss_and_gradient(lin, params: Params, y: Tensor, weights: Tensor, alpha: float):
    m = margin(lin.logits, y)
    loss = (weights * per_example_loss(m)).sum() + _penalty(params, alpha)
    # d(sum omega_i phi(m_i))/dz_i = omega_i phi'(m_i) a_i, pulled back by J^T.
    coeff = (weights * loss_derivative(m))[:, None] * margin_direction(lin.logits, y)
    grad = lin.vjp(coeff)
    for k in grad:
        if is_penalized(k):
            grad[k] = grad[k] + alpha * params[k]
    return loss, grad


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _solve_cholesky(gram: Tensor, rhs: Tensor) -> Tensor | None:
    system = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        return None
    return torch.cholesky_solve(rhs[:, None], factor)[:, 0]


def _solve_rows(
    op: RowSpaceOperator, rhs: Tensor, lam: dict[str, float], gram_fn, solver: str, cg_tol: float, cg_max_iter: int
) -> tuple[Tensor, str, CGResult | None]:
    if solver == "cholesky":
        z = _solve_cholesky(gram_fn(), rhs)
        if z is not None:
            return z, "cholesky", None
        warnings.warn("Cholesky factorisation of the row-space system failed; using CG.", RuntimeWarning, stacklevel=3)

    def system_matvec(u: Tensor) -> Tensor:
        bt_u = op.rmatvec(u)
        return u + op.matvec({k: t / lam[k] for k, t in bt_u.items()})

    result = conjugate_gradient(system_matvec, rhs, tol=cg_tol, max_iter=cg_max_iter)
    return result.solution, "cg", result


def _pick_solver(solver: str, curvature: str, n_rows: int) -> str:
    if solver == "cholesky" and curvature != "fgn":
        raise ValueError(f"solver='cholesky' needs curvature='fgn'; got curvature={curvature!r}")
    if solver == "auto":
        return "cholesky" if curvature == "fgn" and n_rows <= CHOLESKY_MAX_ROWS else "cg"
    return solver


def compute_step(
    head: Head,
    params: Params,
    X: Tensor,
    y: Tensor,
    sample_weight: Tensor | None = None,
    *,
    alpha: float = 0.0,
    damping: float = 1.0,
    curvature: str = "fgn",
    solver: str = "auto",
    cg_tol: float = 1e-5,
    cg_max_iter: int = 100,
) -> StepResult:
    """Return the damped step ``-(G + Lambda)^{-1} grad L`` on one batch.

    Parameters
    ----------
    head : Head
    params : dict of Tensor
        Current parameters (all on ``X``'s device and dtype).
    X : Tensor of shape (n, n_features)
    y : Tensor of shape (n,), int64
        Class indices (0/1 for a single-logit head).
    sample_weight : Tensor of shape (n,), optional
        Non-negative weights, normalised here to sum to one.
    alpha : float, default=0.0
        L2 strength on weights.
    damping : float, default=1.0
        ``lambda > 0``.
    curvature : {"fgn", "ggn"}, default="fgn"
        FGN (n rows) or the full softmax GGN (n * n_classes rows).
    solver : {"auto", "cg", "cholesky"}, default="auto"
        ``"cholesky"`` forms the exact ``n x n`` FGN Gram (FGN only);
        ``"auto"`` uses it up to ``CHOLESKY_MAX_ROWS`` rows, CG otherwise.
    cg_tol, cg_max_iter : float, int
        CG's relative-residual tolerance and iteration cap.

    Returns
    -------
    StepResult
        Cost: one forward pass and one VJP (gradient), then per CG iteration
        one JVP and one VJP of the logits map, or one Gram (O(n^2 (d + h)))
        plus an O(n^3 / 3) Cholesky factorisation.
    """
    weights = normalized_weights(sample_weight, X.shape[0], X)
    lin = linearize(head, params, X)
    loss, grad = _loss_and_gradient(lin, params, y, weights, alpha)
    op = (make_fgn_operator if curvature == "fgn" else make_ggn_operator)(lin, y, weights)
    lam = damping_diagonal(params, damping, alpha)
    solver = _pick_solver(solver, curvature, op.n_rows)
    rhs = op.matvec({k: g / lam[k] for k, g in grad.items()})
    gram_fn = lambda: fgn_gram(head, params, X, y, weights, lam)  # noqa: E731
    z, used, cg_result = _solve_rows(op, rhs, lam, gram_fn, solver, cg_tol, cg_max_iter)
    bt_z = op.rmatvec(z)
    step = {k: (bt_z[k] - grad[k]) / lam[k] for k in grad}
    step_pen = {k: t for k, t in step.items() if is_penalized(k)}
    model_change = _dot(grad, step) + 0.5 * (z * z).sum() + 0.5 * alpha * _dot(step_pen, step_pen)
    return StepResult(step, loss, grad, -model_change, used, cg_result)
