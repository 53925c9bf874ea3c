"""Declarative test problems and dense float64 references from ``torch.func``.

A :class:`Case` describes one problem (head shape, classes, intercept,
sample weights, alpha, seed); :func:`make_problem` builds it with
randomised (non-zero) parameters so that margins are non-trivial.
The ``dense_*`` helpers form the reference matrices of docs/design.md §2-3 on a
flat parameter vector (the dict's insertion order). They are written from
the softmax formulas directly, not from ``sklearn_fgn._margin``, so that
they check the kernels rather than repeat them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from conftest import SEEDS
from torch import Tensor

from sklearn_fgn._heads import Head, Params, forward
from sklearn_fgn._objective import flatten, unflatten  # noqa: F401  (re-exported: one flat layout)


@dataclass(frozen=True)
class Case:
    """One test problem; ``n_logits`` is 1 when ``single_logit`` (binary only)."""

    hidden_layer_sizes: tuple[int, ...] = ()
    activation: str = "tanh"
    n_classes: int = 3
    single_logit: bool = False
    n_features: int = 4
    n_samples: int = 8
    fit_intercept: bool = True
    weighted: bool = False
    alpha: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.single_logit and self.n_classes != 2:
            raise ValueError("single_logit needs n_classes=2")

    @property
    def n_logits(self) -> int:
        return 1 if self.single_logit else self.n_classes

    @property
    def is_linear(self) -> bool:
        return not self.hidden_layer_sizes

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.hidden_layer_sizes)) or "linear"
        act = f"-{self.activation}" if self.hidden_layer_sizes else ""
        classes = "K2-1logit" if self.single_logit else f"K{self.n_classes}"
        return (
            f"{shape}{act}-{classes}-{'int' if self.fit_intercept else 'noint'}"
            f"-{'sw' if self.weighted else 'unw'}-a{self.alpha:g}-s{self.seed}"
        )


BASE_CASES = [
    Case(n_classes=3, fit_intercept=True, weighted=False, alpha=0.0),
    Case(n_classes=5, fit_intercept=False, weighted=True, alpha=0.1),
    Case(n_classes=2, fit_intercept=True, weighted=True, alpha=0.05),
    Case(n_classes=2, single_logit=True, fit_intercept=True, weighted=False, alpha=0.1),
    Case(n_classes=2, single_logit=True, fit_intercept=False, weighted=True, alpha=0.0),
    Case((5,), "tanh", n_classes=3, fit_intercept=True, weighted=True, alpha=0.01),
    Case((5,), "relu", n_classes=2, fit_intercept=False, weighted=False, alpha=0.0),
    Case((4, 3), "gelu", n_classes=5, fit_intercept=True, weighted=False, alpha=0.1),
    Case((4, 3), "logistic", n_classes=2, single_logit=True, fit_intercept=True, weighted=True, alpha=0.01),
    Case((5,), "logistic", n_classes=3, fit_intercept=False, weighted=True, alpha=0.1),
]
CASES = [replace(case, seed=seed) for case in BASE_CASES for seed in SEEDS]
LINEAR_CASES = [case for case in CASES if case.is_linear]
MLP_CASES = [case for case in CASES if not case.is_linear]


def case_id(case: Case) -> str:
    """``ids=`` callable for ``pytest.mark.parametrize``."""
    return case.id


class Problem(NamedTuple):
    head: Head
    params: Params
    X: Tensor
    y: Tensor
    sample_weight: Tensor | None


def make_problem(case: Case, dtype: torch.dtype = torch.float64, device="cpu") -> Problem:
    """Build ``case``: draws happen on the CPU in float64, then are cast.

    Weights are ``1.5 N(0, 1/fan_in)`` and biases ``0.5 N(0, 1)`` so margins
    are spread; weighted cases have one zero sample weight (a legal input
    whose log is ``-inf``).
    """
    gen = torch.Generator().manual_seed(1000 + case.seed)
    head = Head(case.n_features, case.n_logits, case.hidden_layer_sizes, case.activation, case.fit_intercept)
    params = {}
    sizes = head.layer_sizes
    for layer in range(head.n_layers):
        fan_in, fan_out = sizes[layer], sizes[layer + 1]
        params[f"coef_{layer}"] = (
            1.5 * torch.randn(fan_out, fan_in, generator=gen, dtype=torch.float64) / fan_in**0.5
        )
        if head.fit_intercept:
            params[f"intercept_{layer}"] = 0.5 * torch.randn(fan_out, generator=gen, dtype=torch.float64)
    X = torch.randn(case.n_samples, case.n_features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, case.n_classes, (case.n_samples,), generator=gen)
    sample_weight = None
    if case.weighted:
        sample_weight = 0.2 + 1.8 * torch.rand(case.n_samples, generator=gen, dtype=torch.float64)
        sample_weight[0] = 0.0
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return Problem(
        head,
        {k: cast(t) for k, t in params.items()},
        cast(X),
        y.to(device),
        None if sample_weight is None else cast(sample_weight),
    )


def random_params_like(params: Params, seed: int) -> Params:
    """A random direction shaped like ``params`` (float64 draws, cast)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype=t.dtype, device=t.device)
        for k, t in params.items()
    }


# ---------------------------------------------------------------- flat vectors


# ---------------------------------------------------------------- references


def logits_of(head, params: Params, X: Tensor) -> Tensor:
    """Logits of a :class:`Head` or of a logits function ``(params, X) -> logits``."""
    return forward(head, params, X) if isinstance(head, Head) else head(params, X)


def reference_weights(sample_weight: Tensor | None, n: int, like: Tensor) -> Tensor:
    """``omega = s / sum(s)``, or ``1/n``."""
    if sample_weight is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    return sample_weight / sample_weight.sum()


def reference_margin_terms(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, w, p)`` from the softmax formulas: ``a = e_y - q``, ``w = p_y (1 - p_y)``.

    ``p`` is the softmax (``sigmoid`` of the logit for one logit, as ``(n, 1)``).
    """
    if logits.shape[1] == 1:
        sign = (2 * y - 1).to(logits.dtype)
        p = torch.sigmoid(logits)
        return sign[:, None], (p * (1 - p))[:, 0], p
    p = torch.softmax(logits, dim=1)
    q = _competitor_softmax(logits, y)
    a = F.one_hot(y, logits.shape[1]).to(logits.dtype) - q
    return a, _p_true_times_rest(p, y), p


def _competitor_softmax(logits: Tensor, y: Tensor) -> Tensor:
    """``q``: softmax over ``k != y`` (zero at ``y``); no ``0/0`` when ``p_y = 1``."""
    true_class = F.one_hot(y, logits.shape[1]).bool()
    return torch.softmax(logits.masked_fill(true_class, float("-inf")), dim=1)


def _p_true_times_rest(p: Tensor, y: Tensor) -> Tensor:
    """``p_y (1 - p_y)`` with ``1 - p_y`` summed over the competitors (no cancellation)."""
    return p.gather(1, y[:, None])[:, 0] * p.scatter(1, y[:, None], 0.0).sum(1)


def dense_logits_jacobian(head: Head, params: Params, X: Tensor) -> Tensor:
    """``J`` of shape ``(n, n_logits, P)`` by ``torch.func.jacrev``."""
    theta = flatten(params)
    return torch.func.jacrev(lambda t: logits_of(head, unflatten(t, params), X))(theta)


def dense_fgn_rows(head: Head, params: Params, X: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """``B`` of shape ``(n, P)``: rows ``sqrt(omega_i w_i) a_i^T J_i``."""
    J = dense_logits_jacobian(head, params, X)
    a, w, _ = reference_margin_terms(logits_of(head, params, X), y)
    g = torch.einsum("nk,nkp->np", a, J)
    return (weights * w).sqrt()[:, None] * g


def dense_fgn(head: Head, params: Params, X: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """``G_F = B^T B``, shape ``(P, P)``."""
    B = dense_fgn_rows(head, params, X, y, weights)
    return B.T @ B


def dense_logit_hessians(logits: Tensor) -> Tensor:
    """``diag(p) - p p^T`` per example, ``(n, K, K)`` (``s (1 - s)`` for one logit)."""
    if logits.shape[1] == 1:
        s = torch.sigmoid(logits)
        return (s * (1 - s))[:, :, None]
    p = torch.softmax(logits, dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def dense_ggn(head: Head, params: Params, X: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """``G = sum_i omega_i J_i^T (diag p_i - p_i p_i^T) J_i``, shape ``(P, P)``."""
    J = dense_logits_jacobian(head, params, X)
    H = dense_logit_hessians(logits_of(head, params, X))
    return torch.einsum("n,nkp,nkl,nlq->pq", weights, J, H, J)


def dense_within_competitor(head: Head, params: Params, X: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """The term FGN drops: ``sum_i omega_i (1 - p_y) J_i^T (diag q - q q^T) J_i`` (K >= 2)."""
    J = dense_logits_jacobian(head, params, X)
    logits = logits_of(head, params, X)
    p = torch.softmax(logits, dim=1)
    q = _competitor_softmax(logits, y)
    cov = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    return torch.einsum("n,nkp,nkl,nlq->pq", weights * p.scatter(1, y[:, None], 0.0).sum(1), J, cov, J)


def dense_data_loss_fn(head: Head, params: Params, X: Tensor, y: Tensor, weights: Tensor):
    """``theta -> sum_i omega_i CE_i`` on the flat vector (torch's own CE / BCE)."""

    def data_loss(theta: Tensor) -> Tensor:
        logits = logits_of(head, unflatten(theta, params), X)
        if logits.shape[1] == 1:
            ce = F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype), reduction="none")
        else:
            ce = F.cross_entropy(logits, y, reduction="none")
        return (weights * ce).sum()

    return data_loss


def penalty_mask(params: Params) -> Tensor:
    """1 on every weight entry (tensors with ndim >= 2), 0 on biases and other 1-D tensors, flat."""
    return flatten({k: torch.full_like(t, float(t.ndim >= 2)) for k, t in params.items()})


def dense_objective_fn(head: Head, params: Params, X: Tensor, y: Tensor, weights: Tensor, alpha: float):
    """``theta -> sum_i omega_i CE_i + alpha/2 ||theta_pen||^2``."""
    data_loss = dense_data_loss_fn(head, params, X, y, weights)
    mask = penalty_mask(params)
    return lambda theta: data_loss(theta) + 0.5 * alpha * (mask * theta * theta).sum()


def dense_hessian(fn, theta: Tensor) -> Tensor:
    """``torch.func.hessian`` of a scalar function of the flat vector."""
    return torch.func.hessian(fn)(theta)


def dense_damping(params: Params, damping: float, alpha: float) -> Tensor:
    """``Lambda`` diagonal, flat: ``damping + alpha`` on weights, ``damping`` on biases."""
    return damping + alpha * penalty_mask(params)


def dense_operator(apply, params: Params) -> Tensor:
    """Materialise a params -> params linear map by applying it to unit vectors."""
    eye = torch.eye(flatten(params).numel(), dtype=flatten(params).dtype, device=flatten(params).device)
    return torch.stack([flatten(apply(unflatten(col, params))) for col in eye], dim=1)


def dense_step(G: Tensor, gradient: Tensor, lam: Tensor) -> Tensor:
    """``-(G + diag(lam))^{-1} gradient``."""
    return -torch.linalg.solve(G + torch.diag(lam), gradient)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / max(||expected||, tiny)``."""
    actual, expected = actual.to(expected.dtype), expected
    return float(
        torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-300)
    )
