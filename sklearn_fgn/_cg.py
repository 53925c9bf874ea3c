"""Conjugate gradient on torch tensors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tuning import get_tuning

__all__ = ["CG_STOP_REASONS", "CGResult", "conjugate_gradient"]

CG_STOP_REASONS = ("converged", "max_iter", "zero_rhs", "nonpositive_curvature", "stagnated", "nonfinite")


@dataclass(frozen=True)
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes
    ----------
    solution : Tensor
        The last iterate (the iterate before a non-positive or non-finite
        curvature direction, if one was met).
    n_iter : int
        Matrix-vector products spent (iterations run).
    residual_norm : float
        ``||rhs - A x|| / ||rhs||`` of the recursively updated residual
        (0.0 for a zero rhs).
    reason : str
        One of ``CG_STOP_REASONS``.
    residual : Tensor or None
        That residual ``rhs - A x`` itself (recursively updated, so it costs
        no extra matvec), e.g. to evaluate ``x' A x = x' rhs - x' residual``.
    image : Tensor or None
        ``B x`` for the second linear map ``B`` of ``image_matvec`` (None without one).
    """

    solution: Tensor
    n_iter: int
    residual_norm: float
    reason: str
    residual: Tensor | None = None
    image: Tensor | None = None


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    *,
    tol: float = 1e-5,
    max_iter: int = 100,
    x0: Tensor | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    image_matvec: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> CGResult:
    """Solve ``A x = rhs`` for symmetric positive definite ``A`` given as ``matvec``.

    Parameters
    ----------
    matvec : callable
        ``v -> A v`` on tensors shaped like ``rhs``. Unused (may be None)
        when ``image_matvec`` is given.
    rhs : Tensor
        Right-hand side, any shape (treated as a flat vector).
    tol : float, default=1e-5
        Stop when ``||rhs - A x|| <= tol * ||rhs||``. CG also stops
        ("stagnated") when an update moves the iterate by less than
        ``stagnation_ulps`` units of round-off of its dtype,
        ``||step * p|| <= stagnation_ulps * eps * ||x||``: further
        iterations then change ``x`` only at round-off level while a residual
        computed in that precision may not reach ``tol``.
    max_iter : int, default=100
        Maximum number of iterations (matvecs).
    x0 : Tensor, optional
        Warm start; zero when omitted.
    preconditioner : callable, optional
        ``r -> M^{-1} r`` for a symmetric positive definite ``M`` close to
        ``A`` (preconditioned CG); identity when omitted.
    image_matvec : callable, optional
        ``v -> (A v, B v)`` for a second linear map ``B`` that ``A v``
        computes on the way (the logits JVP inside a curvature product):
        ``B x`` is then accumulated along the iterates, as ``x`` is, and
        returned as ``image`` at the cost of one axpy per iteration.
        Replaces ``matvec``; needs ``x0`` None.

    Returns
    -------
    CGResult
        ``reason="nonfinite"`` when ``rhs`` or a curvature product overflows
        its dtype (the iterate before it is returned).

    Raises
    ------
    ValueError
        If ``image_matvec`` is given with ``x0``.

    Notes
    -----
    Cost per iteration: one ``matvec`` and one ``preconditioner`` (none after
    the last iteration) plus O(size) vector work. Host-device
    synchronisations: one per iteration (the curvature ``p'Ap`` and the new
    residual norm are read together), plus one at the start.
    """
    if image_matvec is not None and x0 is not None:
        raise ValueError("image_matvec needs x0=None (the image of x0 is unknown)")
    rhs_norm = float(torch.linalg.vector_norm(rhs))
    image = None  # B x, once B's shape is known
    if not math.isfinite(rhs_norm):  # overflow upstream: nothing to solve
        return CGResult(torch.zeros_like(rhs), 0, math.inf, "nonfinite", rhs.clone(), image)
    if rhs_norm == 0.0:
        return CGResult(torch.zeros_like(rhs), 0, 0.0, "zero_rhs", torch.zeros_like(rhs), image)
    apply_m = preconditioner if preconditioner is not None else (lambda r: r)
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    residual = rhs - matvec(x) if x0 is not None else rhs.clone()
    res_norm = float(torch.linalg.vector_norm(residual))
    if res_norm <= tol * rhs_norm:
        return CGResult(x, 0, res_norm / rhs_norm, "converged", residual, image)
    precond_res = apply_m(residual)
    direction = precond_res.clone()
    rz = torch.dot(residual.flatten(), precond_res.flatten())
    ulps = get_tuning().stagnation_ulps * torch.finfo(rhs.dtype).eps
    for n_iter in range(1, max_iter + 1):
        if image_matvec is None:
            a_dir, b_dir = matvec(direction), None
        else:
            a_dir, b_dir = image_matvec(direction)
        curvature = torch.dot(direction.flatten(), a_dir.flatten())
        step = rz / curvature
        x_new = torch.addcmul(x, step, direction)  # one pass each: step stays on the device
        residual_new = torch.addcmul(residual, step, a_dir, value=-1.0)
        rr = torch.dot(residual_new.flatten(), residual_new.flatten())
        moved = step.abs() * torch.linalg.vector_norm(direction) - ulps * torch.linalg.vector_norm(x_new)
        curvature_val, rr_val, moved_val = torch.stack([curvature, rr, moved]).tolist()  # the one sync
        if not math.isfinite(curvature_val):  # the product overflowed its dtype
            return CGResult(x, n_iter, res_norm / rhs_norm, "nonfinite", residual, image)
        if not curvature_val > 0.0:
            return CGResult(x, n_iter, res_norm / rhs_norm, "nonpositive_curvature", residual, image)
        if not math.isfinite(rr_val + moved_val):
            return CGResult(x, n_iter, res_norm / rhs_norm, "nonfinite", residual, image)
        x, residual, res_norm = x_new, residual_new, rr_val**0.5
        if b_dir is not None:
            image = step * b_dir if image is None else image.addcmul_(step, b_dir)
        if res_norm <= tol * rhs_norm:  # before preconditioning: the last M^-1 r is never needed
            return CGResult(x, n_iter, res_norm / rhs_norm, "converged", residual, image)
        if moved_val <= 0.0:
            return CGResult(x, n_iter, res_norm / rhs_norm, "stagnated", residual, image)
        precond_res = apply_m(residual)
        rz_new = torch.dot(residual.flatten(), precond_res.flatten())
        direction = torch.addcmul(precond_res, rz_new / rz, direction)
        rz = rz_new
    return CGResult(x, max_iter, res_norm / rhs_norm, "max_iter", residual, image)
