r"""One damped FGN (or full-GGN) step on one batch.

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

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._cg import CGResult, conjugate_gradient
from ._curvature import (
    Alpha,
    LogitsFn,
    RowSpaceOperator,
    as_head,
    class_curvature,
    damping_diagonal,
    fgn_gram,
    linearize,
    logits_function,
    make_fgn_operator,
    make_ggn_operator,
    penalty_coefficients,
)
from ._distributed import SINGLE, Communicator
from ._heads import Head, Params
from ._margin import MarginStats, curvature_weight, loss_derivative, margin, per_example_loss
from ._metric import float32_matmuls_exact

__all__ = [
    "CHOLESKY_MAX_ROWS",
    "GRAM_WORTH_CG_ITERS",
    "CURVATURES",
    "SOLVERS",
    "CurvatureSample",
    "StepResult",
    "compute_step",
    "flatten",
    "normalized_weights",
    "objective",
    "objective_from_logits",
    "unflatten",
]

CURVATURES = ("fgn", "ggn")
SOLVERS = ("auto", "cg", "cholesky")
# solver="auto" forms the n x n Gram and factorises it up to this many rows
# (O(n^2) memory), and only while that costs less than GRAM_WORTH_CG_ITERS
# CG iterations: the Gram solves the FGN system exactly and preconditions
# the GGN's, where Lambda-preconditioned CG may need tens of iterations.
CHOLESKY_MAX_ROWS = 4096
GRAM_WORTH_CG_ITERS = 20
# Full-batch steps on whitened features precondition CG with the exact FGN
# solve on the hardest rows (make_hard_row_preconditioner) when they carry
# at least HARD_ROWS_SHARE of the curvature; their Gram costs at most
# HARD_ROWS_BUILD_CG CG iterations, holds at most HARD_ROWS_MAX rows, and is
# not worth building for fewer than HARD_ROWS_MIN.
HARD_ROWS_SHARE = 0.25
# ... on a curvature sample (rows drawn by their traces, see sample_curvature_rows),
# at least this many times the hard rows' share of the sample's rows.
HARD_ROWS_CONCENTRATION = 2.0
HARD_ROWS_BUILD_CG = 4
HARD_ROWS_MAX = 4096
HARD_ROWS_MIN = 256
# Otherwise the class-means model (make_class_means_preconditioner), up to
# this many logits (its build is O(K^2 (d + K)) work and K^3 memory); the
# Kronecker model beyond.
CLASS_MEANS_MAX_LOGITS = 256
GRAMS_CHUNK_ENTRIES = 2**24
# Mixed precision (full-batch steps of a linear head on float64 features):
# CG's curvature products run in float32 (half the memory traffic and a
# faster GEMM on CPUs, far faster on consumer GPUs) while its
# vectors, the gradient, the damping and the preconditioner stay in float64,
# whenever the step's tolerance is at least MIXED_MIN_TOL; one float64
# product then measures the true residual, and CG goes on in float64 if it
# is above the tolerance. Newton's end game (tighter tolerances) is float64.
MIXED_MIN_TOL = 1e-4


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
        ``"cholesky"`` (Gram-preconditioned CG) or ``"cg"``.
    cg : CGResult
        The CG record.
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
    """

    step: Params
    loss: Tensor
    gradient: Params
    predicted_decrease: Tensor
    solver: str
    cg: CGResult
    logits: Tensor | None = None
    logits_step: Tensor | None = None
    slope: Tensor | None = None
    step_curvature: Tensor | None = None
    damping_term: Tensor | None = None
    curvature: str = "fgn"
    cg_tol: float = 0.0
    sampled_curvature: float = 1.0


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
    return 0.5 * _weighted_sq(params, coefficients)


def _weighted_sq(params: Params, coefficients: dict[str, float | Tensor]) -> Tensor | float:
    """``sum_k c_k * ||theta_k||^2`` (elementwise ``c_k`` when it is a tensor)."""
    return sum(_sq(params[k]) * c if isinstance(c, float) else (params[k] * params[k] * c).sum()
               for k, c in coefficients.items())  # fmt: skip


def objective(
    head: Head | LogitsFn, params: Params, X: Tensor, y: Tensor, weights: Tensor, alpha: Alpha
) -> Tensor:
    """``sum_i omega_i CE_i + alpha/2 ||theta_pen||^2`` (0-d tensor). One forward pass.

    ``head`` is a :class:`Head` or a ``LogitsFn``; see :func:`compute_step` for
    which parameters ``alpha`` penalises.

    Returns
    -------
    Tensor
        The 0-d objective.
    """
    return objective_from_logits(head, params, logits_function(head)(params, X), y, weights, alpha)


def objective_from_logits(
    head: Head | LogitsFn, params: Params, logits: Tensor, y: Tensor, weights: Tensor, alpha: Alpha,
    comm: Communicator = SINGLE,
) -> Tensor:  # fmt: skip
    """:func:`objective` given the logits at ``params`` (no forward pass).

    ``comm``: the rows are a rank's shard; the data term is summed over the ranks (one scalar).

    Returns
    -------
    Tensor
        The 0-d objective.
    """
    m = margin(logits, y)
    penalty = _penalty(params, penalty_coefficients(head, params, alpha))
    return comm.sum_((weights * per_example_loss(m)).sum()) + penalty


def _loss_and_gradient(
    lin, stats: MarginStats, params: Params, weights: Tensor, coefficients: dict[str, float | Tensor],
    comm: Communicator = SINGLE,
):  # fmt: skip
    m = stats.margin
    data_loss = (weights * per_example_loss(m)).sum()
    # d(sum omega_i phi(m_i))/dz_i = omega_i phi'(m_i) a_i, pulled back by J^T.
    coeff = (weights * loss_derivative(m))[:, None] * stats.direction
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


def _dot(a: Params, b: Params) -> Tensor:
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


def make_fgn_preconditioner(
    fgn_op: RowSpaceOperator, gram: Tensor, lam: dict[str, float], like: Params
) -> Callable[[Tensor], Tensor] | None:
    """Exact ``(G_F + Lambda)^{-1}`` on flat vectors, by Woodbury and a Cholesky factor.

    ``(G_F + Lambda)^{-1} r = Lambda^{-1} r - Lambda^{-1} B^T (I + B Lambda^{-1} B^T)^{-1} B Lambda^{-1} r``
    with ``gram = B Lambda^{-1} B^T`` (n x n). Returns None when ``I + gram``
    is not numerically positive definite. Cost per call: one JVP, one VJP and
    two triangular solves (O(n^2)); the factorisation is O(n^3 / 3), once.

    Returns
    -------
    callable or None
        ``r -> (G_F + Lambda)^{-1} r`` on flat vectors, or None.
    """
    system = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        return None

    def apply(residual: Tensor) -> Tensor:
        scaled = {k: t / lam[k] for k, t in unflatten(residual, like).items()}
        z = torch.cholesky_solve(fgn_op.matvec(scaled)[:, None], factor)[:, 0]
        back = fgn_op.rmatvec(z)
        return flatten({k: scaled[k] - back[k] / lam[k] for k in like})

    return apply


def make_kronecker_preconditioner(
    S: Tensor, lam: dict[str, float | Tensor], like: Params
) -> Callable[[Tensor], Tensor]:
    r"""``(I kron S + Lambda)^{-1}`` on a linear head's flat ``(coef_0, intercept_0)``.

    The exact inverse of the Kronecker model ``A kron S + Lambda`` of the
    damped curvature when the features are whitened (``A = I``): with
    ``S = Q diag(s) Q^T`` (one ``eigh``, O(K^3)) a ``(K, d)`` block ``V`` maps
    to ``Q [(Q^T V) / (s 1^T + Lambda)]``, elementwise, in O(K^2 d) per call.
    ``Lambda`` may be per-column (the penalty weights of whitened features).

    Returns
    -------
    callable
        ``r -> M^{-1} r`` on flat vectors.
    """
    s, Q = torch.linalg.eigh(S)
    s = s.clamp_min(0.0)[:, None]

    def apply(residual: Tensor) -> Tensor:
        out = {}
        for k, block in unflatten(residual, like).items():
            matrix = block.reshape(block.shape[0], -1)  # (K, d) or (K, 1) for the intercept
            rotated = (Q.T @ matrix) / (s + lam[k])
            out[k] = (Q @ rotated).reshape(block.shape)
        return flatten(out)

    return apply


def class_group_moments(
    X: Tensor, y: Tensor, weights: Tensor, n_groups: int, intercept: bool, comm: Communicator = SINGLE
) -> tuple[Tensor, Tensor]:
    """Each label group's mean of ``x~`` and the within-group variances, summed over the ranks.

    ``x~ = (x, 1)`` with an intercept. They depend on the rows only, not on
    the parameters, so a fit computes them once (see ``compute_step``'s
    ``cache``). Cost: one ``(G, n) @ (n, d)`` product and ``O(n d)``.

    Returns
    -------
    means : Tensor of shape (G, d~)
        ``mu_y``, zero for a group without rows.
    within : Tensor of shape (d~,)
        The diagonal of the weighted within-group covariance ``Sigma_W``.
    """
    onehot = X.new_zeros(X.shape[0], n_groups).scatter_(1, y[:, None], weights[:, None])  # omega_i at y_i
    square = sum(w @ x.square() for w, x in zip(weights.split(8192), X.split(8192), strict=True))
    d = X.shape[1]
    flat = comm.sum_(torch.cat([(onehot.T @ X).flatten(), onehot.sum(0), square, weights.sum()[None]]))
    sums, counts = flat[: n_groups * d].view(n_groups, d), flat[n_groups * d : n_groups * (d + 1)]
    square, total = flat[n_groups * (d + 1) : -1], flat[-1:]
    if intercept:  # the constant 1: mean 1 in every group, no within-group variance
        sums, square = torch.cat([sums, counts[:, None]], 1), torch.cat([square, total])
    means = sums / counts.clamp_min(torch.finfo(X.dtype).tiny)[:, None]
    return means, (square - counts @ means.square()).clamp_min(0.0)


def _logit_curvature_diagonal(system: DampedSystem) -> Tensor:
    """Return ``omega_i (H_i)_kk``, shape (n, K): the diagonal of each row's curvature in logit space."""
    stats, weights = system.stats, system.weights
    if system.curvature == "fgn" or stats.logits.shape[1] == 1:
        a = stats.direction
        return (weights * curvature_weight(stats.margin))[:, None] * a * a
    proba = stats.proba
    return weights[:, None] * proba * (1.0 - proba)


def make_class_means_preconditioner(
    system: DampedSystem, moments: tuple[Tensor, Tensor] | None = None
) -> Callable[[Tensor], Tensor] | None:
    r"""``(M + Lambda)^{-1}`` for the class-means model ``M`` of a linear head's curvature.

    The curvature's diagonal class blocks are ``G_kk = sum_i omega_i
    (H_i)_kk x~_i x~_i^T``. Near a weakly regularised optimum a class's own
    rows are fitted and carry little of ``(H_i)_kk``: moving ``w_k`` along
    the class's mean then costs far less curvature than the Kronecker model
    ``S kron A`` (which spreads every row's curvature over every class's
    features) says, and the Newton step's length sits in such directions. The
    model keeps, per logit ``k``, which groups of rows (by label) carry its
    curvature: rows of group ``y`` are taken to have second moment
    ``diag(Sigma_W) + mu_y mu_y^T`` (``mu_y`` the group's mean of ``x~``,
    ``Sigma_W`` the within-group covariance), so

    .. math::

        M_{kk} = c_k \operatorname{diag}(\Sigma_W) + U \operatorname{diag}(C_{:k}) U^T,
        \qquad C_{yk} = \sum_{i: y_i = y} \omega_i (H_i)_{kk},\quad c_k = \sum_y C_{yk},

    with ``U = [mu_1 ... mu_G]``, and drops the blocks between logits. Each
    block plus ``Lambda`` (diagonal) is inverted exactly by Woodbury with a
    ``G x G`` capacitance ``I + C_k^{1/2} U^T B_k^{-1} U C_k^{1/2}`` (``B_k =
    c_k diag(Sigma_W) + Lambda_k``), positive definite by construction. Cost:
    ``O(n K (d + K))`` for the sums, ``O(K G^2 d + K G^3 / 3)`` for the
    factors, ``O(K d G + K G^2)`` per application; ``K G^2`` memory.

    ``moments``: :func:`class_group_moments` of the system's rows, when known.

    Returns
    -------
    callable or None
        ``r -> M^{-1} r`` on flat vectors; None if a capacitance's Cholesky
        factorisation fails (non-finite curvature).
    """
    grad, lam, y = system.gradient, system.damping, system.y
    n_logits = system.stats.logits.shape[1]
    means, within = _group_moments(system, None) if moments is None else moments
    diagonal = _logit_curvature_diagonal(system)
    shares = system.comm.sum_(diagonal.new_zeros(means.shape[0], n_logits).index_add_(0, y, diagonal))
    intercept, d = "intercept_0" in grad, grad["coef_0"].shape[1]
    damping = within.new_zeros(n_logits, within.shape[0])
    damping[:, :d] += lam["coef_0"]
    if intercept:
        damping[:, d] += lam["intercept_0"]
    inv_base = 1.0 / (shares.sum(0)[:, None] * within[None, :] + damping)  # B_k^{-1}, (K, d~)
    root, U = shares.T.sqrt(), means.T  # C_k^{1/2} as (K, G); U (d~, G)
    capacitance = _weighted_grams(U, inv_base)
    capacitance = root[:, :, None] * capacitance * root[:, None, :]
    capacitance.diagonal(dim1=1, dim2=2).add_(1.0)
    factor, info = torch.linalg.cholesky_ex(capacitance)
    if bool((info != 0).any()):
        return None

    shift_invariant = n_logits > 1

    def apply(residual: Tensor) -> Tensor:
        blocks = unflatten(residual, grad)
        R = blocks["coef_0"]
        if intercept:
            R = torch.cat([R, blocks["intercept_0"][:, None]], 1)
        if shift_invariant:  # the shared part: the curvature is Lambda alone there
            shared = R.mean(0, keepdim=True)
            R = R - shared
        scaled = R * inv_base
        inner = torch.cholesky_solve(((scaled @ U) * root)[:, :, None], factor)[:, :, 0] * root
        out = scaled - (inner @ U.T) * inv_base
        if shift_invariant:
            out = out - out.mean(0, keepdim=True) + shared / damping
        return flatten({"coef_0": out[:, :d], "intercept_0": out[:, d]} if intercept else {"coef_0": out})

    return apply


def _weighted_grams(U: Tensor, weights: Tensor) -> Tensor:
    """Return ``U^T diag(weights[k]) U`` for every row ``k`` of ``weights``, shape (K, G, G).

    One batched product (a loop of small products costs more than their
    arithmetic), ``GRAMS_CHUNK_ENTRIES`` entries of ``(k, d, G)`` at a time.

    Returns
    -------
    Tensor of shape (K, G, G)
    """
    d, G = U.shape
    chunk = max(1, GRAMS_CHUNK_ENTRIES // (d * G))
    return torch.cat([
        torch.bmm(U.T[None] * rows[:, None, :], U[None].expand(rows.shape[0], d, G))
        for rows in weights.split(chunk)
    ])  # fmt: skip


def _group_moments(system: DampedSystem, cache: dict | None) -> tuple[Tensor, Tensor]:
    """:func:`class_group_moments` of the system's rows, from ``cache`` if an earlier step had the same rows.

    A single process only: ranks must take the same all-reduces, and their
    caches could disagree.

    Returns
    -------
    tuple of Tensor
        ``(means, within)``.
    """
    X, y, weights = system.X, system.y, system.weights
    key = (X._version, max(system.stats.logits.shape[1], 2), "intercept_0" in system.gradient)
    if cache is None or system.comm.distributed:
        return class_group_moments(X, y, weights, key[1], key[2], system.comm)
    hit = cache.get("class_means")
    if hit is not None and hit[0]() is X and hit[1]() is y and hit[2] == key and torch.equal(hit[3], weights):
        return hit[4]
    moments = class_group_moments(X, y, weights, key[1], key[2], system.comm)
    cache["class_means"] = (weakref.ref(X), weakref.ref(y), key, weights.clone(), moments)
    return moments


def _solve(
    op: RowSpaceOperator,
    grad: Params,
    lam: dict[str, float],
    preconditioner: Callable[[Tensor], Tensor] | None,
    cg_tol: float,
    cg_max_iter: int,
    track_logits: bool = False,
    comm: Communicator = SINGLE,
) -> tuple[Params, CGResult]:
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
    result : CGResult
        The CG record.
    """
    lam_vec = _damping_vector(grad, lam)
    image_matvec = _damped_product(op, grad, lam_vec, comm)

    def system_matvec(v: Tensor) -> Tensor:
        return image_matvec(v)[0]

    apply_m = preconditioner if preconditioner is not None else (lambda r: r / lam_vec)
    result = conjugate_gradient(
        system_matvec, -flatten(grad), tol=cg_tol, max_iter=cg_max_iter, preconditioner=apply_m,
        image_matvec=image_matvec if track_logits else None,
    )  # fmt: skip
    return unflatten(result.solution, grad), result


def _damped_product(
    op: RowSpaceOperator, like: Params, lam_vec: Tensor, comm: Communicator
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Return ``v -> ((G + Lambda) v, J v)`` on flat vectors (``G v`` summed over the ranks)."""

    def product(v: Tensor) -> tuple[Tensor, Tensor]:
        jv = op.jvp(unflatten(v, like))
        return torch.addcmul(comm.sum_(flatten(op.curvature_from_jvp(jv))), lam_vec, v), jv

    return product


def _damping_vector(grad: Params, lam: dict[str, float | Tensor]) -> Tensor:
    """``Lambda``'s diagonal as one flat vector, in the gradient's layout."""
    return flatten({k: torch.zeros_like(g).add_(lam[k]) for k, g in grad.items()})


def _mixed_pays_off(system: DampedSystem, cg_tol: float) -> bool:
    """Return whether a step may run CG's curvature products in float32 (see ``MIXED_MIN_TOL``).

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
        and cg_tol >= MIXED_MIN_TOL
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


def _solve_mixed(
    system: DampedSystem,
    preconditioner: Callable[[Tensor], Tensor] | None,
    cg_tol: float,
    cg_max_iter: int,
) -> tuple[Params, CGResult]:
    """:func:`_solve` for a linear head, its curvature products in float32 and its result checked in float64.

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
    result : CGResult
        ``n_iter`` counts every product, the check included.
    """
    grad, comm, op = system.gradient, system.comm, system.operator
    lam_vec = _damping_vector(grad, system.damping)
    image_matvec = _damped_product(op, grad, lam_vec, comm)
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

    apply_m = preconditioner if preconditioner is not None else (lambda r: r / lam_vec)
    rhs = -flatten(grad)
    result = conjugate_gradient(low_matvec, rhs, tol=cg_tol, max_iter=cg_max_iter, preconditioner=apply_m)
    if result.reason not in ("converged", "stagnated", "max_iter"):
        return _solve(op, grad, system.damping, preconditioner, cg_tol, cg_max_iter, True, comm)
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
    checked = CGResult(result.solution, n_iter, residual_norm, reason, residual, jv)
    return unflatten(result.solution, grad), checked


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
    name = f"intercept_{head.n_layers - 1}" if head.has_layers else None
    if name not in step or step[name].shape[0] < 2:
        return step, logits_step
    shift = step[name].mean()
    step = step | {name: step[name] - shift}
    return step, (None if logits_step is None else logits_step - shift)


def _check_finite_step(cg_result: CGResult, dtype: torch.dtype, damping: float) -> None:
    # A gradient or first curvature product beyond the dtype's range leaves
    # a zero step, which the loop would take for convergence.
    if cg_result.reason == "nonfinite" and cg_result.n_iter <= 1:
        wider = " or use float64" if dtype != torch.float64 else ""
        tiny = float(damping) < 1e3 * torch.finfo(dtype).tiny ** 0.5
        cause = f"damping={damping:.3g} too small" if tiny else "features or logits too large for it"
        remedy = "raise damping" if tiny else f"scale the features (e.g. StandardScaler){wider}"
        raise ValueError(
            f"The gradient or curvature overflowed {dtype} ({cause}, largest {torch.finfo(dtype).max:.3g}); "
            f"{remedy}."
        )


def _check_solver(solver: str, head: Head | LogitsFn, comm: Communicator = SINGLE) -> None:
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


def _gram_pays_off(
    head: Head, params: Params, X: Tensor, stats: MarginStats, weights: Tensor,
    lam: dict[str, float], cg_tol: float, curvature: str,
) -> bool:  # fmt: skip
    """Whether forming and factorising the Gram costs less than the CG it saves.

    Flops: Gram ``sum_l n^2 (fan_in_l + fan_out_l)`` plus Cholesky ``n^3 / 3``,
    against ``k`` CG iterations of about ``4 n P`` each (JVP + VJP). For FGN
    steps of the linear head ``k`` comes from ``_cg_iterations_estimate``;
    with large damping it is a handful. Other heads, and full-GGN steps (where the Gram only
    preconditions, and its Woodbury form loses accuracy at tiny damping),
    assume ``GRAM_WORTH_CG_ITERS``.

    Returns
    -------
    bool
        True when ``solver="auto"`` should take the Gram-Cholesky path.
    """
    n = X.shape[0]
    cg_iteration_cost = 4 * n * sum(t.numel() for t in params.values())
    # Forming the Gram runs at about a third of the matmul rate (its Hadamard
    # products and (n, n) temporaries), and the Gram-preconditioned solve
    # still spends ~2 CG iterations' worth of JVP/VJP (the initial
    # preconditioner, one preconditioned iteration).
    gram_flops = n**2 * (sum(head.layer_sizes[:-1]) + sum(head.layer_sizes[1:])) + n**3 / 3
    cholesky_cost = 3 * gram_flops + 2 * cg_iteration_cost
    iterations = GRAM_WORTH_CG_ITERS
    if head.is_linear and curvature == "fgn":
        iterations = _cg_iterations_estimate(X, stats, weights, lam, cg_tol, head.fit_intercept)
    return cholesky_cost <= iterations * cg_iteration_cost


def _cg_iterations_estimate(
    X: Tensor, stats: MarginStats, weights: Tensor, lam: dict[str, float], cg_tol: float,
    fit_intercept: bool,
) -> float:  # fmt: skip
    """CG iterations for FGN's linear-head system, from its condition number.

    The scaled system ``I + Lambda^{-1/2} G_F Lambda^{-1/2}`` has ``lambda_min = 1``
    and ``lambda_max`` at least the largest scaled row norm ``max_i ||b_i||^2 /
    Lambda`` and at least the mean nonzero eigenvalue ``trace / min(n, P)``;
    the estimate takes the larger of these lower bounds. The trace itself (all
    rows parallel) is an upper bound that CG, which gains from clustered
    spectra, rarely meets.

    Returns
    -------
    float
        ``ln(2 / tol) / ln((sqrt(kappa) + 1) / (sqrt(kappa) - 1))``.
    """
    row = weights * curvature_weight(stats.margin) * (stats.direction**2).sum(1)
    coef_lam = lam["coef_0"]  # a float, or per-column weights of whitened features
    scaled = row * ((X * X).sum(1) / coef_lam if isinstance(coef_lam, float) else (X * X / coef_lam).sum(1))
    if fit_intercept:
        scaled = scaled + row / lam["intercept_0"]
    rank = min(X.shape[0], (X.shape[1] + fit_intercept) * stats.logits.shape[1])
    kappa = 1.0 + max(float(scaled.max()), float(scaled.sum()) / rank)
    if not math.isfinite(kappa):
        return math.inf
    # ln((s + 1) / (s - 1)) = log1p(2 / (s - 1)): positive where the ratio rounds to 1.
    log_rate = math.log1p(2.0 / max(math.sqrt(kappa) - 1.0, 1e-12))
    return math.log(2.0 / max(cg_tol, 1e-16)) / log_rate


def compute_step(
    head: Head | LogitsFn,
    params: Params,
    X: Tensor,
    y: Tensor,
    sample_weight: Tensor | None = None,
    *,
    alpha: Alpha = 0.0,
    damping: float = 1.0,
    curvature: str = "fgn",
    solver: str = "auto",
    cg_tol: float = 1e-5,
    cg_max_iter: int = 100,
    logits: Tensor | None = None,
    weight_total: float | None = None,
    kronecker: bool = False,
    mixed_precision: bool = False,
    comm: Communicator = SINGLE,
    cache: dict | None = None,
    curvature_sample: CurvatureSample | None = None,
) -> StepResult:
    """Return the damped step ``-(G + Lambda)^{-1} grad L`` on one batch.

    Parameters
    ----------
    head : Head or callable
        The logits map: a :class:`Head` spec, or a function
        ``logits_fn(params, X) -> logits`` of shape (n, n_logits) that is pure
        in ``params`` (``torch.func`` transforms it), e.g. a
        ``torch.func.functional_call`` of an ``nn.Module``. ``alpha``
        penalises a head's ``coef_*`` entries and a function's parameters
        with ``ndim >= 2``; biases and other 1-D parameters are never penalised.
    params : dict of Tensor
        Current parameters (all on ``X``'s device and dtype).
    X : Tensor of shape (n, n_features)
        The batch (for a logits function: whatever it takes as ``X``).
    y : Tensor of shape (n,), int64
        Class indices (0/1 for a single-logit head).
    sample_weight : Tensor of shape (n,), optional
        Non-negative weights, normalised here to sum to one (or divided by
        ``weight_total``, see :func:`normalized_weights`).
    alpha : float or dict, default=0.0
        L2 strength on weights, or the coefficient of each penalised
        parameter (a float or a broadcastable tensor, see
        :func:`._curvature.penalty_coefficients`).
    damping : float, default=1.0
        ``lambda > 0``.
    curvature : {"fgn", "ggn"}, default="fgn"
        FGN (n rows) or the full softmax GGN (n * n_classes rows).
    solver : {"auto", "cg", "cholesky"}, default="auto"
        ``"cholesky"`` preconditions CG with the exact FGN solve from the
        ``n x n`` Gram (a :class:`Head` only; a logits function raises
        ``ValueError``); ``"cg"`` with ``Lambda^-1``. ``"auto"`` uses the
        Gram up to ``CHOLESKY_MAX_ROWS`` rows when forming and factorising it
        costs less than the CG iterations it saves (estimated from the
        curvature's trace for the linear head, ``GRAM_WORTH_CG_ITERS``
        otherwise), CG otherwise or when the factorisation fails (an
        explicit ``"cholesky"`` warns then).
    cg_tol, cg_max_iter : float, int
        CG's relative-residual tolerance (on the parameter-space system) and
        iteration cap.
    logits : Tensor of shape (n, n_logits), optional
        The logits at ``params`` on ``X`` when the caller has them (from
        evaluating the previous trial step): a linear head then skips its
        forward pass; other heads recompute them with their graph.
    weight_total : float, optional
        Divide ``sample_weight`` by this instead of its sum: a mini-batch
        passes its size times the data set's mean weight.
    kronecker : bool, default=False
        For a linear :class:`Head` on whitened features (full-batch steps),
        precondition CG instead of by ``Lambda^-1`` (when the solver is CG):
        by :func:`make_hard_row_preconditioner`, the exact FGN solve on the
        rows of largest curvature, when they carry at least
        ``HARD_ROWS_SHARE`` of it (weak regularisation); otherwise by
        :func:`make_class_means_preconditioner`, which keeps which classes'
        rows carry each logit's curvature (up to ``CLASS_MEANS_MAX_LOGITS``
        logits), or beyond that by :func:`make_kronecker_preconditioner`,
        which captures the spread of the curvature across classes
        (O(n K^2 + K^3) once, O(K^2 d) per iteration).
    mixed_precision : bool, default=False
        For a linear head on float64 features, when ``cg_tol >=
        MIXED_MIN_TOL``: CG's curvature products in float32, the result
        checked (and if need be finished) in float64 (:func:`_solve_mixed`).
        The step then solves the float64 system to ``cg_tol`` as without it;
        a full-batch fit uses it (its early, loose steps dominate its time).
    comm : Communicator, optional
        The batch is this rank's shard of a data-parallel batch
        (:mod:`._distributed`; ``weight_total`` is then the whole batch's):
        the loss, the gradient and every curvature product are summed over
        the ranks, and ``solver="auto"`` is CG (the Gram would span the
        ranks' rows). The default is the single process.
    cache : dict, optional
        Kept by the caller across full-batch steps on the same rows: what
        depends on the rows alone (the class-means model's group moments) is
        computed once and reused while ``X``, ``y`` and the weights are those
        it was computed from.
    curvature_sample : CurvatureSample, optional
        Subsampled Newton (a linear :class:`Head` only): the loss, the
        gradient and the step's evaluation stay on every row, while the
        curvature ``G`` (CG's products and every preconditioner's statistics)
        is estimated on about ``curvature_sample.size`` rows drawn by their
        share of it (:func:`sample_curvature_rows`, :func:`subsampled_system`).
        The fixed point is unchanged (the gradient is exact); only the
        step's model is estimated. One more JVP on all rows gives
        ``logits_step``. Ignored for other heads.

    Returns
    -------
    StepResult
        Cost: one forward pass and one VJP (gradient), then per CG iteration
        one JVP and one VJP of the logits map; ``"cholesky"`` adds one Gram
        (O(n^2 (d + h))), an O(n^3 / 3) factorisation and per iteration one
        more JVP/VJP pair and two triangular solves. For the linear head CG
        also accumulates ``logits_step = J delta`` (one ``(n, n_logits)``
        axpy per iteration), so evaluating the step needs no forward pass.
    """
    _check_solver(solver, head, comm)
    system = build_system(
        head, params, X, y, sample_weight, alpha, damping, curvature, logits, weight_total, comm
    )
    model = system
    if curvature_sample is not None and system.linear:
        drawn = sample_curvature_rows(system, curvature_sample, cache)
        if drawn is not None:
            model = subsampled_system(system, *drawn)
    solver, preconditioner = _preconditioner(model, solver, cg_tol, kronecker, cache)
    if mixed_precision and _mixed_pays_off(model, cg_tol):
        step, cg_result = _solve_mixed(model, preconditioner, cg_tol, cg_max_iter)
    else:
        step, cg_result = _solve(
            model.operator, model.gradient, model.damping, preconditioner, cg_tol, cg_max_iter,
            model.linear, comm,
        )  # fmt: skip
    _check_finite_step(cg_result, system.lin.logits.dtype, damping)
    logits_step = None
    if system.linear and model is system:
        logits_step = cg_result.image if cg_result.image is not None else torch.zeros_like(system.lin.logits)
    step, logits_step = _without_intercept_shift(head, step, logits_step)
    slope, curvature_term, damping_term = quadratic_model(model, step, unflatten(cg_result.residual, step))
    sampled = 1.0
    if model is not system:  # CG's J delta was on the sampled rows; the model along the step is exact
        logits_step = system.lin.jvp(step)
        penalty_term = _weighted_sq(step, system.coefficients)
        along = curvature_along(system, logits_step)
        sampled = float(curvature_term - penalty_term) / max(float(along), 1e-300)
        curvature_term = along + penalty_term
        # Where the sample underestimated the curvature along the step, the
        # whole batch's model is least short of the unit step: take that length.
        t = -float(slope) / float(curvature_term) if float(curvature_term) > 0 else 1.0
        if 0.0 < t < 1.0:
            step, logits_step = {k: v * t for k, v in step.items()}, logits_step * t
            slope, curvature_term, damping_term = slope * t, curvature_term * t * t, damping_term * t * t
    return StepResult(
        step, system.loss, system.gradient, -(slope + 0.5 * curvature_term), solver, cg_result,
        system.lin.logits, logits_step, slope, curvature_term, damping_term, curvature, cg_tol, sampled,
    )  # fmt: skip


def curvature_along(system: DampedSystem, logits_step: Tensor) -> Tensor:
    r"""``delta' G delta = sum_i omega_i u_i' H_i u_i`` from ``u = J delta``, summed over the ranks.

    ``H_i`` is the row's logit curvature: ``w_i a_i a_i^T`` for FGN (and a
    single logit), ``diag(p_i) - p_i p_i^T`` for the full GGN. Cost ``O(n K)``,
    no product with ``X``: a subsampled step's model along its own direction
    is then the whole batch's.

    Returns
    -------
    Tensor
        0-d.
    """
    stats, u, weights = system.stats, logits_step, system.weights
    if system.curvature == "fgn" or u.shape[1] == 1:
        per_row = curvature_weight(stats.margin) * (stats.direction * u).sum(1).square()
    else:
        proba = stats.proba
        per_row = (proba * u * u).sum(1) - (proba * u).sum(1).square()
    return system.comm.sum_((weights * per_row).sum().reshape(1))[0]


@dataclass(frozen=True)
class DampedSystem:
    """The damped system ``(G + Lambda) delta = -grad`` of one batch, before any solver sees it.

    Attributes
    ----------
    head : Head or callable
        The logits map.
    params : dict of Tensor
        Where it is linearised.
    X, y : Tensor
        The batch.
    lin : LogitsLinearization
        The logits map linearised at ``params``.
    stats : MarginStats
        Margin quantities of ``lin.logits``.
    weights : Tensor of shape (n,)
        Normalised example weights ``omega``.
    coefficients : dict
        Penalty coefficients (:func:`._curvature.penalty_coefficients`).
    loss : Tensor
        Objective at ``params`` (0-d; summed over the ranks).
    gradient : dict of Tensor
        Its gradient (summed over the ranks).
    operator : RowSpaceOperator
        ``B`` with ``G = B^T B`` (FGN or full GGN, per ``curvature``).
    fgn_operator : RowSpaceOperator
        FGN's ``B`` (the Gram-Cholesky preconditioner's, whatever ``curvature``).
    damping : dict
        ``Lambda`` per parameter (:func:`._curvature.damping_diagonal`).
    curvature : str
        ``"fgn"`` or ``"ggn"``.
    comm : Communicator
        Where the rows' sums go.
    sampled : bool
        Whether the rows are a curvature sample (:func:`subsampled_system`).
    """

    head: Head | LogitsFn
    params: Params
    X: Tensor
    y: Tensor
    lin: object
    stats: MarginStats
    weights: Tensor
    coefficients: dict
    loss: Tensor
    gradient: Params
    operator: RowSpaceOperator
    fgn_operator: RowSpaceOperator
    damping: dict
    curvature: str
    comm: Communicator
    sampled: bool = False

    @property
    def linear(self) -> bool:
        """Whether the logits are linear in the parameters (``J delta`` is then exact)."""
        return as_head(self.head).is_linear


def build_system(
    head: Head | LogitsFn, params: Params, X: Tensor, y: Tensor, sample_weight: Tensor | None, alpha: Alpha,
    damping: float, curvature: str, logits: Tensor | None = None, weight_total: float | None = None,
    comm: Communicator = SINGLE,
) -> DampedSystem:  # fmt: skip
    """Linearise, take the loss and gradient, and form the operator and the damping (phase 1 of a step).

    Arguments as :func:`compute_step`. Cost: one forward pass (none for a
    linear head given ``logits``) and one VJP.

    Returns
    -------
    DampedSystem
    """
    lin = linearize(head, params, X, logits)
    weights = normalized_weights(sample_weight, y.shape[0], lin.logits, weight_total)
    coefficients = penalty_coefficients(head, params, alpha)
    stats = MarginStats(lin.logits, y)
    loss, grad = _loss_and_gradient(lin, stats, params, weights, coefficients, comm)
    fgn_op = make_fgn_operator(lin, y, weights, stats)
    op = fgn_op if curvature == "fgn" else make_ggn_operator(lin, y, weights, stats)
    lam = damping_diagonal(params, damping, coefficients)
    return DampedSystem(
        head, params, X, y, lin, stats, weights, coefficients, loss, grad, op, fgn_op, lam, curvature, comm
    )


@dataclass(frozen=True)
class CurvatureSample:
    """How many rows a step's curvature is estimated on, and the generator that draws them.

    ``size`` is the expected number of rows of the whole batch (over all
    ranks); the draw is :func:`sample_curvature_rows`.
    """

    size: int
    generator: torch.Generator


def sample_curvature_rows(
    system: DampedSystem, sample: CurvatureSample, cache: dict | None = None
) -> tuple[Tensor, Tensor] | None:
    r"""Draw rows by their share of the curvature: Poisson sampling with ``p_i = min(1, t_i / tau)``.

    ``t_i = omega_i tr(H_i) ||x~_i||^2`` is the trace of row ``i``'s term
    ``J_i^T H_i J_i`` of ``G`` (a linear head: ``J_i = I kron x~_i^T``), and
    ``tau`` makes ``sum_i p_i = sample.size``. Rows whose term is large
    (near a weakly regularised optimum: the few rows not yet fitted) are
    always taken; the others with probability ``p_i`` and weight ``1 /
    p_i``, so that ``G_S = sum_{i in S} G_i / p_i`` is unbiased and every
    sampled term has trace at most ``tau`` (Xu, Yang, Roosta-Khorasani, Ré
    and Mahoney, "Sub-sampled Newton methods with non-uniform sampling",
    2016). Rows without curvature are never drawn. Cost: ``O(n K)`` and a
    sort of ``n`` traces; the rows' norms (``O(n d)`` and an ``n x d``
    temporary) once per fit, kept in ``cache`` (see ``compute_step``). In a
    data-parallel fit the ranks all-gather their traces (``n`` values), so
    that ``tau`` is the whole batch's, and each keeps its own rows' part of
    one draw of ``n`` uniforms from the generator they share: the sample is
    the one a single process draws on the concatenated rows.

    Returns
    -------
    rows : Tensor of int64
        Sorted row indices (a gather in memory order).
    scale : Tensor
        ``1 / p_i`` of those rows.
    None
        When the sample would hold every row with curvature (in a single
        process; a rank of a data-parallel fit then takes those rows).
    """
    norms = _row_square_norms(system.X, cache)
    trace = _curvature_trace(system) * (norms + float("intercept_0" in system.gradient))
    comm = system.comm
    every, offset = _whole_batch(trace, comm)
    tau = _poisson_threshold(every, sample.size)
    if tau is None:
        if not comm.distributed:
            return None
        # Every rank must take the same collectives: each takes all its rows with curvature.
        rows = (trace > 0).nonzero().squeeze(1)
        return rows, torch.ones(rows.shape[0], dtype=trace.dtype, device=trace.device)
    prob = (trace / tau).clamp_(max=1.0)
    draw = torch.rand(every.shape[0], generator=sample.generator, dtype=torch.float64)
    draw = draw[offset : offset + trace.shape[0]]
    rows = (draw.to(prob.device) < prob).nonzero().squeeze(1)
    return rows, 1.0 / prob[rows]


def _whole_batch(values: Tensor, comm: Communicator) -> tuple[Tensor, int]:
    """Return every rank's per-row ``values`` in rank order, and where this rank's rows start.

    The whole batch's rows, as one process holds them (one all-gather of
    ``n`` values in a data-parallel fit; ``values`` itself otherwise).

    Returns
    -------
    every : Tensor of shape (n,)
        On ``values``' device.
    offset : int
        The position of this rank's first row in ``every``.
    """
    if not comm.distributed:
        return values, 0
    parts = [t.to(values.device) for t in comm.gather_objects(values.cpu())]
    return torch.cat(parts), sum(t.shape[0] for t in parts[: comm.rank])


def _row_square_norms(X: Tensor, cache: dict | None) -> Tensor:
    """Return ``||x_i||^2``, shape (n,); from ``cache`` while ``X`` is the same, unchanged tensor.

    Returns
    -------
    Tensor
    """
    hit = None if cache is None else cache.get("row_norms")
    if hit is not None and hit[0]() is X and hit[1] == X._version:
        return hit[2]
    norms = X.square().sum(1)
    if cache is not None:
        cache["row_norms"] = (weakref.ref(X), X._version, norms)
    return norms


def _poisson_threshold(trace: Tensor, size: int) -> float | None:
    """Return ``tau`` with ``sum_i min(1, t_i / tau) = size``, or None when fewer rows carry curvature.

    With ``t`` sorted descending, ``tau = sum_{i > j} t_i / (size - j)``
    for the number ``j`` of rows taken surely, the first ``j`` with
    ``t_{j+1} < tau``. Cost: a sort of ``n``.

    Returns
    -------
    float or None
    """
    ordered = torch.sort(trace.double(), descending=True).values
    if int((ordered > 0).sum()) <= size:
        return None
    tail = ordered.flip(0).cumsum(0).flip(0)  # tail[j] = sum_{i >= j} t_i
    j = torch.arange(size, device=trace.device)
    tau = tail[:size] / (size - j)  # tau if the first j rows are sure
    sure = ordered[:size] >= tau
    first = int(sure.logical_not().nonzero()[0]) if not bool(sure.all()) else size - 1
    return float(tau[first])


def subsampled_system(system: DampedSystem, rows: Tensor, scale: Tensor) -> DampedSystem:
    r"""Return the system with its curvature estimated on ``rows``: ``G_S = sum_{i in S} scale_i G_i``.

    Loss, gradient, damping and penalty stay the batch's; the operator and
    the rows that preconditioners read (``X``, ``y``, ``lin``, ``stats``,
    ``weights``) are the sample's, with weights ``scale_i omega_i``. A
    step then costs one gradient (a VJP) and one JVP on all rows, and CG's
    products ``|S| / n`` of theirs.

    Returns
    -------
    DampedSystem
    """
    X_s, y_s = system.X[rows], system.y[rows]
    weights = system.weights[rows] * scale.to(system.weights.dtype)
    lin = linearize(system.head, system.params, X_s, system.lin.logits[rows])
    stats = MarginStats(lin.logits, y_s)
    fgn_op = make_fgn_operator(lin, y_s, weights, stats)
    op = fgn_op if system.curvature == "fgn" else make_ggn_operator(lin, y_s, weights, stats)
    return dataclasses.replace(
        system, X=X_s, y=y_s, lin=lin, stats=stats, weights=weights, operator=op, fgn_operator=fgn_op,
        sampled=True,
    )


def _preconditioner(
    system: DampedSystem, solver: str, cg_tol: float, kronecker: bool, cache: dict | None = None
) -> tuple[str, Callable[[Tensor], Tensor] | None]:
    """Choose the solver and build CG's preconditioner (phase 2 of a step; see :func:`compute_step`).

    Returns
    -------
    solver : str
        ``"cholesky"`` (Gram-preconditioned CG) or ``"cg"``.
    preconditioner : callable or None
        ``r -> M^{-1} r``; None for ``Lambda^{-1}``.
    """
    head, lam, grad = system.head, system.damping, system.gradient
    auto = solver == "auto"
    if auto:  # the Gram needs a Head's layers and O(n^2) memory
        pays_off = (
            not system.comm.distributed
            and as_head(head).has_layers
            and system.y.shape[0] <= CHOLESKY_MAX_ROWS
            and _gram_pays_off(
                head, system.params, system.X, system.stats, system.weights, lam, cg_tol, system.curvature
            )
        )
        solver = "cholesky" if pays_off else "cg"
    if solver == "cholesky":
        gram = fgn_gram(
            head, system.params, system.X, system.y, system.weights, lam, system.lin, system.stats
        )
        preconditioner = make_fgn_preconditioner(system.fgn_operator, gram, lam, grad)
        if preconditioner is None and not auto:  # "auto" falls back to CG as documented
            warnings.warn("Cholesky factorisation of the FGN row-space system failed; using plain CG.",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
        if preconditioner is not None:
            return "cholesky", preconditioner
    if kronecker and system.linear:
        preconditioner = make_hard_row_preconditioner(system)
        if preconditioner is not None:
            return "cg", preconditioner
        if system.stats.logits.shape[1] <= CLASS_MEANS_MAX_LOGITS:
            preconditioner = make_class_means_preconditioner(system, _group_moments(system, cache))
            if preconditioner is not None:
                return "cg", preconditioner
        factor = system.comm.sum_(class_curvature(system.stats, system.weights, system.curvature))
        return "cg", make_kronecker_preconditioner(factor, lam, grad)
    return "cg", None


def _curvature_trace(system: DampedSystem) -> Tensor:
    """Return each row's share of ``tr S``: ``omega_i tr H_i`` in logit space, shape (n,)."""
    stats, weights = system.stats, system.weights
    if system.curvature == "fgn" or stats.logits.shape[1] == 1:
        return weights * curvature_weight(stats.margin) * (stats.direction * stats.direction).sum(1)
    return weights * (1.0 - (stats.proba * stats.proba).sum(1))


def _hard_row_budget(n: int, n_logits: int, n_features: int) -> int:
    """Return how many hard rows to take: their Gram and factor together cost ``HARD_ROWS_BUILD_CG`` products.

    A curvature product is a JVP and a VJP, ``4 n K (d + 1)`` flops; the
    Gram of ``m`` rows ``2 m^2 (d + 1)``, and its Cholesky factor ``m^3 / 3``
    flops counted twice (a factorisation runs at about half a GEMM's rate).

    Returns
    -------
    int
        ``m``, at most ``HARD_ROWS_MAX`` and ``n``.
    """
    work = HARD_ROWS_BUILD_CG * 4.0 * n * n_logits * (n_features + 1)
    limit = int(min(HARD_ROWS_MAX, n))
    if _hard_row_build_cost(limit, n_features) <= work:
        return limit
    low, high = 0, limit  # cost(low) <= work < cost(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _hard_row_build_cost(middle, n_features) <= work else (low, middle)
    return low


def _hard_row_build_cost(m: int, n_features: int) -> float:
    """Flops of the Gram of ``m`` hard rows and its Cholesky factor (the latter counted twice)."""
    return 2.0 * m * m * (n_features + 1) + 2.0 * m**3 / 3.0


def _hard_rows(system: DampedSystem) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Return the rows that carry most of the curvature (from every rank), or None if they carry too little.

    Picks the ``m`` (:func:`_hard_row_budget`) rows of largest
    ``omega_i tr H_i`` over the whole batch (ties by position), in their
    order in the batch, when they carry at least ``HARD_ROWS_SHARE`` of
    the total. In a data-parallel fit every rank gets the same rows (one
    all-gather of the ``n`` traces, one of the chosen rows).

    Returns
    -------
    X, y, weights, logits : Tensor
        The hard rows' features, labels, normalised weights and logits.
    """
    comm, X = system.comm, system.X
    every, offset = _whole_batch(_curvature_trace(system), comm)
    m = _hard_row_budget(every.shape[0], system.stats.logits.shape[1], X.shape[1])
    if m < HARD_ROWS_MIN:
        return None
    order = torch.argsort(every, descending=True, stable=True)[:m]
    share = HARD_ROWS_SHARE
    if system.sampled:  # drawn by their traces, which then are alike: ask a share well above m / n
        share = max(share, HARD_ROWS_CONCENTRATION * m / every.shape[0])
    if float(every[order].sum()) < share * float(every.sum()):
        return None
    rows = order.sort().values
    mine = rows[(rows >= offset) & (rows < offset + X.shape[0])] - offset
    picked = (X[mine], system.y[mine], system.weights[mine], system.lin.logits[mine])
    if not comm.distributed:
        return picked
    shards = comm.gather_objects(tuple(t.cpu() for t in picked))
    return tuple(torch.cat([shard[i] for shard in shards]).to(X.device) for i in range(4))


def make_hard_row_preconditioner(system: DampedSystem) -> Callable[[Tensor], Tensor] | None:
    r"""``(G_F,hard + Lambda)^{-1}``: the exact FGN solve on the batch's hardest rows, or None.

    Near a weakly regularised optimum most rows are fitted (``p_i`` near
    one-hot, ``H_i`` near 0) and the curvature sits on a few hundred or
    thousand hard rows, along their own feature directions: a Kronecker
    model ``S kron A`` spreads it over every row's features and CG needs
    hundreds of iterations per step. This preconditioner keeps those rows'
    FGN curvature exactly and nothing of the others:
    :func:`make_fgn_preconditioner` (Woodbury with their ``m x m`` Gram) on
    the rows :func:`_hard_rows` picks. Cost: the Gram and its Cholesky
    factor, ``O(m^2 d + m^3 / 3)`` (at most ``HARD_ROWS_BUILD_CG`` CG
    iterations), then per iteration a JVP and a VJP on ``m`` rows and two
    triangular solves. None when the hard rows carry less than
    ``HARD_ROWS_SHARE`` of the curvature (strong regularisation, where the
    Kronecker model is the better one) or the factorisation fails.

    Returns
    -------
    callable or None
        ``r -> M^{-1} r`` on flat vectors.
    """
    hard = _hard_rows(system)
    if hard is None:
        return None
    X, y, weights, logits = hard
    lin = linearize(system.head, system.params, X, logits)
    stats = MarginStats(lin.logits, y)
    gram = fgn_gram(system.head, system.params, X, y, weights, system.damping, lin, stats)
    return make_fgn_preconditioner(
        make_fgn_operator(lin, y, weights, stats), gram, system.damping, system.gradient
    )


def quadratic_model(system: DampedSystem, step: Params, residual: Params) -> tuple[Tensor, Tensor, Tensor]:
    r"""Return the undamped quadratic model along ``step``, from the step and its residual (phase 4).

    ``residual = -grad - (G + Lambda) step``, which any solver of the system
    can return (CG updates it anyway; a direct solver pays one curvature
    product), gives ``step' G step = -grad' step - residual' step - step'
    Lambda step`` without a product of its own, whatever the solver.

    Returns
    -------
    slope : Tensor
        ``grad' step`` (0-d).
    curvature : Tensor
        ``step' (G + alpha P) step`` (0-d).
    damping_term : Tensor
        ``damping * step' M step``, the damping's part of ``step' (G + Lambda) step`` (0-d).
    """
    step_damping = _weighted_sq(step, system.damping)
    penalty_term = _weighted_sq(step, system.coefficients)
    slope = _dot(system.gradient, step)
    curvature = -slope - _dot(residual, step) - step_damping + penalty_term
    return slope, curvature, step_damping - penalty_term
