r"""Quasi-Newton steps of a full-batch linear fit: a limited-memory inverse from the steps' secant pairs.

A Newton step on a weakly regularised, well-conditioned problem (standardised
features, a small ``alpha``) can cost tens of CG products on every row while
leaving a fixed share of the gap: the objective's curvature changes along
the step faster than any quadratic model follows (docs/design.md §11). A
quasi-Newton step costs one gradient and one JVP instead. Its direction is
``-H g`` with ``H`` the L-BFGS inverse (Nocedal and Wright, algorithm 7.4)
of the last ``m`` pairs ``s_j = theta_{j+1} - theta_j``, ``y_j = g_{j+1} -
g_j`` of the fit's own steps, Newton's and quasi-Newton's alike, on top of
``gamma M^{-1}``: a cheap model ``M`` of the damped curvature (a
preconditioner of :mod:`._preconditioners`), scaled by ``gamma = s'y / y'
M^{-1} y`` of the latest pair. The step's length is then set as a Newton
step's is, by the whole batch's exact model along the direction
(:func:`._step.compute_step`), and the step is taken by the same damping
rule: the gradient is exact, so the fixed point is the optimum.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from ._heads import Params
from ._objective import flatten

__all__ = ["SecantMemory"]

Model = Callable[[Tensor], Tensor]  # r -> M^{-1} r on flat vectors


class SecantMemory:
    """The last ``size`` secant pairs of a fit, and the L-BFGS inverse they define.

    :meth:`observe` is called with every step's parameters and gradient (at
    the start of the step); two consecutive observations make a pair, kept
    when its curvature ``s'y`` is positive (to ``curvature_floor`` of
    ``|s| |y|``, so that round-off cannot make ``H`` indefinite). Memory:
    ``2 size`` vectors of the parameters' size.

    Parameters
    ----------
    size : int
        ``m``, the pairs kept.
    curvature_floor : float
        Smallest ``s'y / (|s| |y|)`` of a pair kept.
    """

    def __init__(self, size: int, curvature_floor: float = 1e-8):
        self.size = size
        self.curvature_floor = curvature_floor
        self.pairs: deque[tuple[Tensor, Tensor, float]] = deque(maxlen=size)  # (s, y, 1 / s'y)
        self._last: tuple[Tensor, Tensor] | None = None
        self._model: tuple[Model, int] | None = None  # (M^-1, directions it served)

    def inverse_model(self, build: Callable[[], Model], refresh: int) -> Model:
        """Return ``M^{-1}`` for ``H_0``: the one held, or ``build()``'s after ``refresh`` directions.

        The model of the curvature moves slowly along a run of quasi-Newton
        steps, and ``gamma`` rescales it at every step, while its build can
        cost as much as a pass over ``X`` (the class-means model's sums over
        rows): a run rebuilds it every ``refresh`` steps.

        Returns
        -------
        callable
        """
        if self._model is None or self._model[1] >= refresh:
            self._model = (build(), 0)
        apply, served = self._model
        self._model = (apply, served + 1)
        return apply

    def observe(self, params: Params, gradient: Params) -> None:
        """Record the step's starting point; with the previous one it makes a pair ``(s, y)``."""
        point, grad = flatten(params), flatten(gradient)
        if self._last is not None:
            s, y = point - self._last[0], grad - self._last[1]
            sy = float(torch.dot(s.double(), y.double()))
            scale = float(s.double().norm() * y.double().norm())
            if scale > 0.0 and sy > self.curvature_floor * scale:
                self.pairs.append((s, y, 1.0 / sy))
        self._last = (point.clone(), grad.clone())

    def forget_model(self) -> None:
        """Drop the model held for ``H_0`` (a Newton step moved the fit: the next run builds its own)."""
        self._model = None

    def direction(self, gradient: Tensor, inverse_model: Callable[[Tensor], Tensor]) -> Tensor:
        """Return ``-H g`` on flat vectors: the two-loop recursion with ``H_0 = gamma M^{-1}``.

        ``inverse_model`` applies ``M^{-1}``. Cost: ``4 m`` dot products and
        axpys of the parameters' size, and two applications of ``M^{-1}``
        (one for ``gamma``). Without pairs ``-M^{-1} g``.

        Returns
        -------
        Tensor
            The direction, flat, in ``gradient``'s dtype.
        """
        q = gradient.neg()
        coefficients = []
        for s, y, rho in reversed(self.pairs):
            a = rho * float(torch.dot(s, q))
            coefficients.append(a)
            q.add_(y, alpha=-a)
        r = inverse_model(q)
        if self.pairs:
            s, y, rho = self.pairs[-1]
            r.mul_(1.0 / (rho * float(torch.dot(y, inverse_model(y)))))  # gamma = s'y / y' M^-1 y
        for (s, y, rho), a in zip(self.pairs, reversed(coefficients), strict=True):
            b = rho * float(torch.dot(y, r))
            r.add_(s, alpha=a - b)
        return r
