r"""Rank-1 curvature optimizer (survey section 4.5) as a ``torch.optim.Optimizer``.

The survey defines the curvature as a moving average of gradient outer products,

.. math::

    \hat G_t = \beta \hat G_{t-1} + (1 - \beta) v_t v_t^\top,

with :math:`v_t` the mini-batch gradient, applied as the damped preconditioner
:math:`(\lambda I + G_t)^{-1} g_t` in O(P) memory and time. A moving average of
rank-one terms is not rank one, so an O(P) method has to realise it somehow.
This module takes the rank-one term of the moving-average gradient:

.. math::

    m_t &= \beta m_{t-1} + (1 - \beta) g_t, \qquad m_0 = 0,

    u_t &= m_t / (1 - \beta^t),

    G_t &= u_t u_t^\top,

    d_t &= (\lambda I + G_t)^{-1} g_t
         = \frac{1}{\lambda}\Big(g_t - u_t \frac{u_t^\top g_t}{\lambda + u_t^\top u_t}\Big),

    \theta_{t+1} &= \theta_t - \eta\, d_t,

where the closed form of :math:`d_t` is the Sherman-Morrison formula, exact
for this :math:`G_t`. Why this realisation rather than a low-rank running
estimate of :math:`\hat G_t`: with the bias-corrected weights
:math:`w_k = (1-\beta)\beta^{t-k}/(1-\beta^t)`, which sum to one,
:math:`\sum_k w_k v_k v_k^\top = u_t u_t^\top + \sum_k w_k (v_k - u_t)(v_k - u_t)^\top`,
so :math:`G_t` is the survey's moving average less its centred covariance,
kept in one P-vector (Adam's first moment) and inverted exactly with two dot
products. A rank-r estimate (power or Oja iteration on the unformed
:math:`\hat G_t`) costs O(P r) memory, adds a rank and an iteration count to
tune, and inverts only an approximation of its own target.

All parameters of the single parameter group form one vector
:math:`\theta \in \mathbb{R}^P` (the inner products run over every tensor), so
:math:`G_t` couples all layers. Cost per step: O(P) time (one moving-average
update, two dot products, one scaled subtraction) and one P-vector of state
per parameter tensor (``exp_avg``, same shape and dtype as the parameter).
:math:`\lambda I + G_t` is symmetric positive definite for :math:`\lambda > 0`,
so :math:`g_t^\top d_t > 0`: every step is a descent direction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def damped_rank1_solve(rhs: list[Tensor], u: list[Tensor], damping: float) -> list[Tensor]:
    r"""Apply :math:`(\lambda I + u u^\top)^{-1}` to ``rhs`` by Sherman-Morrison.

    Parameters
    ----------
    rhs : list of Tensor
        The vector to precondition, split into tensors of any shapes.
    u : list of Tensor
        The rank-one factor, split into tensors of the same shapes as ``rhs``.
    damping : float
        :math:`\lambda > 0`.

    Returns
    -------
    direction : list of Tensor
        :math:`(\text{rhs} - u\,(u^\top \text{rhs})/(\lambda + u^\top u))/\lambda`,
        shaped like ``rhs``, in its dtype and on its device. O(P) time and memory.
    """
    u_dot_rhs = sum(torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(u, rhs, strict=True))
    u_dot_u = sum(a.square().sum() for a in u)
    coef = u_dot_rhs / (damping + u_dot_u)
    return [(b - coef * a) / damping for a, b in zip(u, rhs, strict=True)]


class Rank1Curvature(torch.optim.Optimizer):
    r"""Damped rank-1 curvature preconditioning of the gradient (see the module docstring).

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters to optimise, as one parameter group (the curvature couples
        all of them).
    damping : float, default=1.0
        :math:`\lambda`: the step is :math:`g/\lambda` orthogonal to :math:`u_t`
        and is shortened by :math:`\lambda / (\lambda + \|u_t\|^2)` along it.
    beta : float, default=0.9
        Moving-average factor of the gradient, in [0, 1).
    lr : float, default=1.0
        Step size :math:`\eta` on the preconditioned gradient (unit step, as
        damped Gauss-Newton and K-FAC steps).
    """

    def __init__(self, params: Iterable, damping: float = 1.0, beta: float = 0.9, lr: float = 1.0) -> None:
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"damping": damping, "beta": beta, "lr": lr})
        if len(self.param_groups) != 1:
            raise ValueError(f"Rank1Curvature takes one parameter group, got {len(self.param_groups)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one step from the gradients in ``p.grad``.

        Parameters
        ----------
        closure : callable, default=None
            Re-evaluates the model and returns the loss (run with gradients enabled).

        Returns
        -------
        loss : Tensor or None
            What ``closure`` returned, else None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        beta = group["beta"]
        grads, u = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"], state["exp_avg"] = 0, torch.zeros_like(p)
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - beta)  # m = beta m + (1 - beta) g
            grads.append(p.grad)
            u.append(state["exp_avg"] / (1 - beta ** state["step"]))
        for p, d in zip(params, damped_rank1_solve(grads, u, group["damping"]), strict=True):
            p.sub_(group["lr"] * d)
        return loss
