r"""The objective of a batch, its gradient, and flat views of parameter dicts (docs/design.md §1).

With normalised weights ``omega = s / sum(s)`` the objective is
``sum_i omega_i CE(z_i, y_i) + alpha/2 ||theta_pen||^2``; cross-entropy is
``softplus(-m)`` of the true-vs-rest margin (:mod:`._margin`), so the loss,
its derivative and the gradient's logit coefficients never overflow for
finite logits. Every sum over rows goes through a :class:`Communicator`
(identity in one process).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._curvature import Alpha, LogitsFn, logits_function, penalty_coefficients
from ._distributed import SINGLE, Communicator
from ._heads import Head, Params
from ._margin import MarginStats, loss_derivative, margin, per_example_loss

__all__ = [
    "dot",
    "flatten",
    "loss_and_gradient",
    "normalized_weights",
    "objective",
    "objective_from_logits",
    "unflatten",
    "weighted_sq",
]


def normalized_weights(
    sample_weight: Tensor | None, n: int, like: Tensor, weight_total: float | None = None
) -> Tensor:
    """``omega = s / sum(s)``, or ``s / weight_total`` if given (``1/n`` or ``1/weight_total`` without ``s``).

    A mini-batch of a weighted data set passes ``weight_total = n *
    mean(s over the data set)``: its objective is then an unbiased estimate
    of the data set's, and batches keep their weights relative to each
    other, which ``s / sum(s)`` per batch loses (with one row per batch it
    ignores the weights altogether).

    Returns
    -------
    Tensor of shape (n,)
        The weights ``omega``, in ``like``'s dtype and on its device.
    """
    if sample_weight is None:
        total = n if weight_total is None else weight_total  # a rank's share of a data-parallel batch
        return torch.full((n,), 1.0 / total, dtype=like.dtype, device=like.device)
    sample_weight = sample_weight.to(dtype=like.dtype, device=like.device)
    return sample_weight / (sample_weight.sum() if weight_total is None else weight_total)


def _penalty(params: Params, coefficients: dict[str, float | Tensor]) -> Tensor:
    return 0.5 * weighted_sq(params, coefficients)


def weighted_sq(params: Params, coefficients: dict[str, float | Tensor]) -> Tensor | float:
    """``sum_k c_k * ||theta_k||^2`` (elementwise ``c_k`` when it is a tensor)."""
    return sum(_sq(params[k]) * c if isinstance(c, float) else (params[k] * params[k] * c).sum()
               for k, c in coefficients.items())  # fmt: skip


def objective(
    head: Head | LogitsFn, params: Params, X: Tensor, y: Tensor, weights: Tensor, alpha: Alpha
) -> Tensor:
    """``sum_i omega_i CE_i + alpha/2 ||theta_pen||^2`` (0-d tensor). One forward pass.

    ``head`` is a :class:`Head` or a ``LogitsFn``; see :func:`._step.compute_step` for
    which parameters ``alpha`` penalises.

    Returns
    -------
    Tensor
        The 0-d objective.
    """
    return objective_from_logits(head, params, logits_function(head)(params, X), y, weights, alpha)


def objective_from_logits(
    head: Head | LogitsFn, params: Params, logits: Tensor, y: Tensor, weights: Tensor, alpha: Alpha,
    comm: Communicator = SINGLE, stats: MarginStats | None = None,
) -> Tensor:  # fmt: skip
    """:func:`objective` given the logits at ``params`` (no forward pass).

    ``comm``: the rows are a rank's shard; the data term is summed over the ranks (one scalar).
    ``stats``: the :class:`MarginStats` of ``logits`` when the caller keeps them (their margin is read).

    Returns
    -------
    Tensor
        The 0-d objective.
    """
    m = margin(logits, y) if stats is None else stats.margin
    penalty = _penalty(params, penalty_coefficients(head, params, alpha))
    return comm.sum_((weights * per_example_loss(m)).sum()) + penalty


def loss_and_gradient(
    lin, stats: MarginStats, params: Params, weights: Tensor, coefficients: dict[str, float | Tensor],
    comm: Communicator = SINGLE,
) -> tuple[Tensor, Params]:  # fmt: skip
    """Return the objective and its gradient at the linearisation point, both summed over the ranks.

    The data term's gradient is ``J^T (omega_i phi'(m_i) a_i)``: one VJP of
    the logits map; the penalty's is added per parameter.

    Returns
    -------
    loss : Tensor
        0-d.
    gradient : dict of Tensor
        Shaped like ``params``.
    """
    m = stats.margin
    data_loss = (weights * per_example_loss(m)).sum()
    # d(sum omega_i phi(m_i))/dz_i = omega_i phi'(m_i) a_i, pulled back by J^T.
    coeff = stats.scaled_direction(weights * loss_derivative(m))
    grad = lin.vjp(coeff)
    if comm.distributed:  # the shards' data terms, in one all-reduce
        grad, (data_loss,) = comm.sum_params(grad, data_loss)
    loss = data_loss + _penalty(params, coefficients)
    for k, c in coefficients.items():
        if isinstance(c, float):
            grad[k] = torch.add(grad[k], params[k], alpha=c)
        else:
            grad[k] = torch.addcmul(grad[k], params[k], c)
    return loss, grad


def dot(a: Params, b: Params) -> Tensor:
    """Return ``sum_k <a_k, b_k>`` over two parameter dicts (0-d)."""
    return sum(torch.dot(a[k].reshape(-1), b[k].reshape(-1)) for k in a)


def _sq(t: Tensor) -> Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def flatten(params: Params) -> Tensor:
    """Concatenate a parameter dict (in its order) into one vector."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    """Return views of ``vector`` shaped and named as ``like``: the inverse of :func:`flatten`.

    Returns
    -------
    dict of Tensor
        Views into ``vector``.

    Raises
    ------
    ValueError
        If ``vector`` does not have as many entries as ``like``.
    """
    out, start = {}, 0
    for k, t in like.items():
        out[k] = vector[start : start + t.numel()].view_as(t)
        start += t.numel()
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, params {start}")
    return out
