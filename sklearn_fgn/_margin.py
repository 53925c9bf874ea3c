r"""Scalar true-vs-rest margin of softmax cross-entropy.

For logits ``z`` of one example with label ``y`` (``logits`` is what
scikit-learn calls ``raw_prediction``), the margin is

.. math::

    m = z_y - \\log \\sum_{k \\neq y} e^{z_k},

and cross-entropy is exactly ``softplus(-m)``. The competitor distribution
``q`` is the softmax over ``k != y`` (``q_y = 0``) and ``a = e_y - q`` is the
gradient of ``m`` with respect to the logits. With ``phi(m) = softplus(-m)``:
``phi'(m) = -sigmoid(-m)`` and ``w = phi''(m) = sigmoid(m) sigmoid(-m)``.

Binary problems may use ONE logit per example (``logits`` of shape
``(n, 1)``): then ``m = (2 y - 1) z`` and ``a = 2 y - 1``, the logistic loss.

Every function here works on float32 and float64 tensors on any device and
costs O(n * n_logits). Everything is computed from (masked) ``softmax``,
``log_softmax`` and log-sigmoids; nothing overflows for finite logits.
:class:`MarginStats` computes a batch's margin quantities once and shares
them between the loss, the gradient and the curvature operators.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LogitCurvature",
    "MarginStats",
    "competitor_log_proba",
    "curvature_weight",
    "log_curvature_weight",
    "loss_derivative",
    "margin",
    "margin_direction",
    "per_example_loss",
    "row_blocks",
]


def _check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.ndim != 2 or y.ndim != 1 or logits.shape[0] != y.shape[0]:
        raise ValueError(
            f"logits must be (n, n_logits) and y (n,); got {tuple(logits.shape)} and {tuple(y.shape)}"
        )


def _masked_competitors(logits: Tensor, y: Tensor) -> Tensor:
    """Logits with the true class set to -inf, shape (n, n_classes)."""
    return logits.scatter(1, y[:, None], float("-inf"))


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Return the true-vs-rest margin ``m`` of each example.

    Parameters
    ----------
    logits : Tensor of shape (n, n_classes) or (n, 1)
        Raw predictions. One column means the single-logit binary form.
    y : Tensor of shape (n,), int64
        Class indices (0 or 1 in the single-logit form).

    Returns
    -------
    Tensor of shape (n,)
        ``z_y - logsumexp_{k != y} z_k``; ``(2y - 1) z`` for one logit.
    """
    _check_logits(logits, y)
    if logits.shape[1] == 1:
        return (2 * y - 1).to(logits.dtype) * logits[:, 0]
    return _margin_and_competitors(logits, y)[0]


def row_blocks(rows: Tensor, entries: int | None = None) -> list[slice]:
    """Split the rows of an ``(n, K)`` tensor into blocks of about ``entries`` entries (one, off the CPU).

    Row-wise work on ``(n, K)`` arrays (softmax, sums over ``K``) is bound by
    memory traffic on the CPU: a block's temporaries stay in cache, where
    whole ``(n, K)`` temporaries go to memory and back (several times
    slower at ``n K`` of ``10^8``). Each row's arithmetic is the same
    either way. A GPU takes the whole array at once. ``entries`` defaults
    to ``2**20``.

    Returns
    -------
    list of slice
    """
    n, width = rows.shape[0], max(rows.shape[1], 1)
    entries = _BLOCK_ENTRIES if entries is None else entries
    step = n if rows.device.type != "cpu" else max(1, entries // width)
    return [slice(start, min(start + step, n)) for start in range(0, max(n, 1), step)]


_BLOCK_ENTRIES = 2**20


def _margin_and_competitors(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``m`` and ``q`` from one masked softmax (one fused pass over the logits, by blocks of rows).

    With ``M = max_{k != y} z_k`` the competitor ``logsumexp`` is
    ``M - log max_k q_k``: the largest competitor has ``q_k = 1 / sum_k e^{z_k - M}``
    in ``[1 / (K - 1), 1]``, so its log is exact to rounding; this saves the
    separate ``logsumexp`` pass over the logits.

    Returns
    -------
    margin : Tensor of shape (n,)
    competitors : Tensor of shape (n, n_classes)
        ``q``, zero at the true class.
    """
    competitors = torch.empty_like(logits)
    log_normalizer = logits.new_empty(logits.shape[0])
    for rows in row_blocks(logits):
        masked = _masked_competitors(logits[rows], y[rows])
        block = torch.softmax(masked, dim=1)
        competitors[rows] = block
        log_normalizer[rows] = masked.amax(dim=1) - torch.log(block.amax(dim=1))
    return logits.gather(1, y[:, None])[:, 0] - log_normalizer, competitors


def competitor_log_proba(logits: Tensor, y: Tensor) -> Tensor:
    """Return ``log q``, the log-softmax over the competitors ``k != y``.

    Parameters
    ----------
    logits : Tensor of shape (n, n_classes)
        Raw predictions, ``n_classes >= 2``.
    y : Tensor of shape (n,), int64
        Class indices.

    Returns
    -------
    Tensor of shape (n, n_classes)
        ``log q_k``, with ``-inf`` at the true class.
    """
    _check_logits(logits, y)
    return torch.log_softmax(_masked_competitors(logits, y), dim=1)


def margin_direction(logits: Tensor, y: Tensor) -> Tensor:
    """Return ``a = dm/dz = e_y - q``, shape (n, n_logits).

    For one logit this is the column ``2 y - 1``.

    Returns
    -------
    Tensor of shape (n, n_logits)
        ``e_y - q`` (the column ``2 y - 1`` for one logit).
    """
    _check_logits(logits, y)
    if logits.shape[1] == 1:
        return (2 * y - 1).to(logits.dtype)[:, None]
    return _direction(torch.softmax(_masked_competitors(logits, y), dim=1), y)


def _direction(competitors: Tensor, y: Tensor) -> Tensor:
    return competitors.neg().scatter_(1, y[:, None], 1.0)


class MarginStats:
    """Margin quantities of one batch's logits, each computed at most once.

    Parameters
    ----------
    logits : Tensor of shape (n, n_logits)
        Raw predictions (one column: the single-logit binary form).
    y : Tensor of shape (n,), int64
        Class indices.

    Attributes
    ----------
    margin : Tensor of shape (n,)
        ``m`` (see :func:`margin`).
    direction : Tensor of shape (n, n_logits)
        ``a = e_y - q`` (see :func:`margin_direction`), formed on first use.
    proba : Tensor of shape (n, n_classes)
        ``softmax(z)`` as ``sigmoid(-m) q + sigmoid(m) e_y`` (products of
        positive numbers, no cancellation), formed on first use; multiclass only.
    """

    def __init__(self, logits: Tensor, y: Tensor):
        _check_logits(logits, y)
        self.logits, self.y = logits, y
        if logits.shape[1] == 1:
            self.margin, self._competitors = margin(logits, y), None
        else:
            self.margin, self._competitors = _margin_and_competitors(logits, y)

    @cached_property
    def direction(self) -> Tensor:  # noqa: D102
        if self._competitors is None:
            return margin_direction(self.logits, self.y)
        return _direction(self._competitors, self.y)

    def scaled_direction(self, scale: Tensor) -> Tensor:
        """Return ``scale_i a_i``, shape (n, n_logits), e.g. the gradient's ``omega_i phi'(m_i) a_i``.

        From ``q`` in one pass (``-scale_i q`` with ``scale_i`` written at the
        true class) when :attr:`direction` was not formed: the same numbers
        without its ``(n, K)`` array.

        Returns
        -------
        Tensor of shape (n, n_logits)
        """
        if self._competitors is None or "direction" in self.__dict__:
            return scale[:, None] * self.direction
        return (self._competitors * scale.neg()[:, None]).scatter_(1, self.y[:, None], scale[:, None])

    @cached_property
    def proba(self) -> Tensor:  # noqa: D102
        return self._proba(slice(None))

    def proba_rows(self, rows: slice) -> Tensor:
        """Return ``proba[rows]``: a view once :attr:`proba` is formed, else that block alone.

        Row-blocked reductions (:class:`LogitCurvature`'s ``trace`` and
        ``along``) then never form the whole ``(n, K)`` array. Each entry is
        the same elementwise formula (vectorised kernels may round the last
        bit of a block's tail differently).

        Returns
        -------
        Tensor of shape (rows, n_classes)
        """
        return self.proba[rows] if "proba" in self.__dict__ else self._proba(rows)

    def _proba(self, rows: slice) -> Tensor:
        if self._competitors is None:
            raise ValueError("proba needs the multiclass (n_classes >= 2 logits) form")
        m = self.margin[rows]
        proba = self._competitors[rows] * torch.sigmoid(-m)[:, None]
        return proba.scatter_(1, self.y[rows, None], torch.sigmoid(m)[:, None])


def per_example_loss(m: Tensor) -> Tensor:
    """Cross-entropy from the margin: ``softplus(-m)``."""
    return F.softplus(-m)


def loss_derivative(m: Tensor) -> Tensor:
    """``phi'(m) = -sigmoid(-m)``, in (-1, 0)."""
    return -torch.sigmoid(-m)


def curvature_weight(m: Tensor) -> Tensor:
    """``w = phi''(m) = sigmoid(m) sigmoid(-m) = p_y (1 - p_y)``, in [0, 1/4]."""
    return torch.sigmoid(m) * torch.sigmoid(-m)


def log_curvature_weight(m: Tensor) -> Tensor:
    """``log w = logsigmoid(m) + logsigmoid(-m)``, finite for all finite m."""
    return F.logsigmoid(m) + F.logsigmoid(-m)


class LogitCurvature:
    r"""Each row's weighted curvature in logit space, ``omega_i H_i``, and what steps read of it.

    ``H_i`` is ``w_i a_i a_i^T`` for FGN (and for a single logit, where FGN
    and the full GGN agree: ``p (1 - p)``), ``diag(p_i) - p_i p_i^T`` for
    the full GGN (docs/design.md §2). The one owner of that formula: the
    Kronecker factor, the class-means model's diagonal, the curvature
    sample's traces and the model along a step all read it here.

    Parameters
    ----------
    stats : MarginStats
        The batch's margin quantities (logits of shape (n, K)).
    weights : Tensor of shape (n,)
        Normalised example weights ``omega``.
    curvature : {"fgn", "ggn"}
    """

    def __init__(self, stats: MarginStats, weights: Tensor, curvature: str):
        self.stats, self.weights, self.curvature = stats, weights, curvature
        self.rank_one = curvature == "fgn" or stats.logits.shape[1] == 1

    def matrix(self) -> Tensor:
        """Return ``S = sum_i omega_i H_i``, shape (K, K), symmetric PSD: the Kronecker model's class factor.

        Cost ``O(n K^2)``.

        Returns
        -------
        Tensor of shape (K, K)
        """
        stats, weights = self.stats, self.weights
        if self.rank_one:
            a = stats.direction
            return (a * (weights * curvature_weight(stats.margin))[:, None]).T @ a
        proba = stats.proba
        return torch.diag(weights @ proba) - (proba * weights[:, None]).T @ proba

    def diagonal(self) -> Tensor:
        """Return ``omega_i (H_i)_kk``, shape (n, K). Cost ``O(n K)``.

        Returns
        -------
        Tensor of shape (n, K)
        """
        stats, weights = self.stats, self.weights
        if self.rank_one:
            a = stats.direction
            return (weights * curvature_weight(stats.margin))[:, None] * a * a
        proba = stats.proba
        return weights[:, None] * proba * (1.0 - proba)

    def trace(self) -> Tensor:
        """Return ``omega_i tr H_i``, shape (n,): each row's share of ``tr S``. Cost ``O(n K)``.

        Returns
        -------
        Tensor of shape (n,)
        """
        stats, weights = self.stats, self.weights
        if self.rank_one:
            return weights * curvature_weight(stats.margin) * (stats.direction * stats.direction).sum(1)
        square = weights.new_empty(weights.shape[0])
        for rows in row_blocks(stats.logits):
            block = stats.proba_rows(rows)
            square[rows] = (block * block).sum(1)
        return weights * (1.0 - square)

    def along(self, u: Tensor) -> Tensor:
        """Return ``omega_i u_i' H_i u_i`` for logit changes ``u`` of shape (n, K), shape (n,).

        Summed over the rows it is ``delta' G delta`` for ``u = J delta``,
        with no product with ``X``. Cost ``O(n K)``.

        Returns
        -------
        Tensor of shape (n,)
        """
        stats = self.stats
        if self.rank_one:
            return self.weights * curvature_weight(stats.margin) * (stats.direction * u).sum(1).square()
        per_row = u.new_empty(u.shape[0])
        for rows in row_blocks(u):
            moved = stats.proba_rows(rows) * u[rows]
            per_row[rows] = (moved * u[rows]).sum(1) - moved.sum(1).square()
        return self.weights * per_row
