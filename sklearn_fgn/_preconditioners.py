r"""Preconditioners of CG on the damped system, as small objects tried in a declared order.

A step's system ``(G + Lambda) delta = -grad`` (:class:`._system.DampedSystem`)
is solved by CG preconditioned by ``M^{-1}`` for a model ``M`` of ``G +
Lambda`` (docs/design.md §5). Each model is a :class:`Preconditioner`:
``affordable(system, request)`` says whether it may be tried on this step
(its structure and cost model), ``build(system, request)`` returns ``r ->
M^{-1} r`` on flat vectors, or None when it does not hold there (a failed
factorisation, hard rows that carry too little curvature).
:func:`choose_preconditioner` tries :data:`PRECONDITIONERS` in order and
takes the first that builds; with none, CG is preconditioned by
``Lambda^{-1}``. A new preconditioner is one class, placed in that tuple.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._curvature import RowSpaceOperator, as_head, fgn_gram, linearize, make_fgn_operator
from ._distributed import SINGLE, Communicator
from ._heads import COEF, INTERCEPT, Head, Params
from ._margin import LogitCurvature, MarginStats
from ._objective import flatten, unflatten
from ._system import DampedSystem, whole_batch
from ._tuning import get_tuning

__all__ = [
    "PRECONDITIONERS",
    "ClassMeans",
    "GramCholesky",
    "HardRows",
    "Kronecker",
    "Preconditioner",
    "PreconditionerRequest",
    "choose_preconditioner",
    "class_group_moments",
    "make_class_means_preconditioner",
    "make_fgn_preconditioner",
    "make_hard_row_preconditioner",
    "make_kronecker_preconditioner",
]


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
    ``cache``). Cost: ``O(n d)`` on the CPU (:func:`_group_sums`), one
    ``(G, n) @ (n, d)`` product elsewhere.

    Returns
    -------
    means : Tensor of shape (G, d~)
        ``mu_y``, zero for a group without rows.
    within : Tensor of shape (d~,)
        The diagonal of the weighted within-group covariance ``Sigma_W``.
    """
    d = X.shape[1]
    sums, counts = _group_sums(X, y, weights, n_groups)
    square = sum(w @ x.square() for w, x in zip(weights.split(8192), X.split(8192), strict=True))
    flat = comm.sum_(torch.cat([sums.flatten(), counts, square, weights.sum()[None]]))
    sums, counts = flat[: n_groups * d].view(n_groups, d), flat[n_groups * d : n_groups * (d + 1)]
    square, total = flat[n_groups * (d + 1) : -1], flat[-1:]
    if intercept:  # the constant 1: mean 1 in every group, no within-group variance
        sums, square = torch.cat([sums, counts[:, None]], 1), torch.cat([square, total])
    means = sums / counts.clamp_min(torch.finfo(X.dtype).tiny)[:, None]
    return means, (square - counts @ means.square()).clamp_min(0.0)


def _group_sums(X: Tensor, y: Tensor, weights: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Return each group's ``sum_i omega_i x_i``, shape (G, d), and ``sum_i omega_i``, shape (G,).

    On the CPU each row is added into its group (``index_add_``: ``n d``
    work, in row order). Elsewhere one product with the ``(n, G)`` one-hot
    weights: a GPU's ``index_add_`` adds by atomics, in an order that
    changes from run to run, and a GEMM there is cheap.

    Returns
    -------
    sums : Tensor of shape (G, d)
    counts : Tensor of shape (G,)
    """
    if X.device.type != "cpu":
        onehot = X.new_zeros(X.shape[0], n_groups).scatter_(1, y[:, None], weights[:, None])  # omega_i at y_i
        return onehot.T @ X, onehot.sum(0)
    sums = X.new_zeros(n_groups, X.shape[1])
    for w, x, labels in zip(weights.split(8192), X.split(8192), y.split(8192), strict=True):
        sums.index_add_(0, labels, x * w[:, None])
    return sums, X.new_zeros(n_groups).index_add_(0, y, weights)


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

    Beyond ``class_means_max_logits`` logits that is too much (``K^3``), and
    each logit keeps its ``class_means_top_groups`` groups of largest
    ``C_yk`` as above, the others by their diagonal: ``B_k`` gains
    ``sum_{y not kept} C_yk mu_y^2`` (a Jacobi model of their means). A
    logit's curvature sits on its own group and the few it is confused with,
    so the kept groups carry most of it. Cost then ``O(K r^2 d + K r^3 / 3)``
    for ``r`` kept groups, ``O(K r d)`` per application; ``K r d`` memory,
    with ``r`` lowered to keep that within ``class_means_max_entries``.

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
    diagonal = system.logit_curvature().diagonal()
    shares = system.comm.sum_(diagonal.new_zeros(means.shape[0], n_logits).index_add_(0, y, diagonal))
    intercept, d = INTERCEPT in grad, grad[COEF].shape[1]
    damping = within.new_zeros(n_logits, within.shape[0])
    damping[:, :d] += lam[COEF]
    if intercept:
        damping[:, d] += lam[INTERCEPT]
    base = shares.sum(0)[:, None] * within[None, :] + damping  # B_k, (K, d~)
    if n_logits <= get_tuning().class_means_max_logits:  # the test ClassMeans.affordable makes
        solve = _all_groups_solve(means, shares, base)
    else:
        solve = _top_groups_solve(means, shares, base, _kept_groups(n_logits, means.shape[1]))
    if solve is None:
        return None

    shift_invariant = n_logits > 1

    def apply(residual: Tensor) -> Tensor:
        blocks = unflatten(residual, grad)
        R = blocks[COEF]
        if intercept:
            R = torch.cat([R, blocks[INTERCEPT][:, None]], 1)
        if shift_invariant:  # the shared part: the curvature is Lambda alone there
            shared = R.mean(0, keepdim=True)
            R = R - shared
        out = solve(R)
        if shift_invariant:
            out = out - out.mean(0, keepdim=True) + shared / damping
        return flatten({COEF: out[:, :d], INTERCEPT: out[:, d]} if intercept else {COEF: out})

    return apply


def _all_groups_solve(means: Tensor, shares: Tensor, base: Tensor) -> Callable[[Tensor], Tensor] | None:
    """``R -> (B_k + U diag(C_:k) U^T)^{-1} R_k`` per row ``k`` of ``R`` (K, d~), every group kept.

    Returns
    -------
    callable or None
        None if a capacitance is not numerically positive definite.
    """
    inv_base = 1.0 / base
    root, U = shares.T.sqrt(), means.T  # C_k^{1/2} as (K, G); U (d~, G)
    factor = _capacitance_factor(_weighted_grams(U, inv_base), root)
    if factor is None:
        return None

    def solve(R: Tensor) -> Tensor:
        scaled = R * inv_base
        inner = torch.cholesky_solve(((scaled @ U) * root)[:, :, None], factor)[:, :, 0] * root
        return scaled - (inner @ U.T) * inv_base

    return solve


def _kept_groups(n_logits: int, width: int) -> int:
    """Return how many groups each logit keeps beyond ``class_means_max_logits``.

    ``class_means_top_groups``, fewer where their ``(K, r, d~)`` means would
    pass ``class_means_max_entries`` entries (a memory bound at 10^4 classes).

    Returns
    -------
    int
        ``r``, at least 1.
    """
    tuning = get_tuning()
    return max(1, min(tuning.class_means_top_groups, tuning.class_means_max_entries // (n_logits * width)))


def _top_groups_solve(
    means: Tensor, shares: Tensor, base: Tensor, n_kept: int
) -> Callable[[Tensor], Tensor] | None:
    """As :func:`_all_groups_solve` with each logit's ``n_kept`` heaviest groups; the others on the diagonal.

    Returns
    -------
    callable or None
        None if a capacitance is not numerically positive definite.
    """
    top = shares.topk(min(n_kept, shares.shape[0]), dim=0)
    weight, U = top.values.T, means[top.indices.T]  # (K, r) and (K, r, d~)
    dropped = shares.T @ means.square() - torch.bmm(weight[:, None, :], U.square())[:, 0]
    inv_base = 1.0 / (base + dropped.clamp_min_(0.0))
    root = weight.sqrt()
    factor = _capacitance_factor(torch.bmm(U * inv_base[:, None, :], U.transpose(1, 2)), root)
    if factor is None:
        return None

    def solve(R: Tensor) -> Tensor:
        scaled = R * inv_base
        inner = torch.bmm(U, scaled[:, :, None]) * root[:, :, None]
        inner = torch.cholesky_solve(inner, factor) * root[:, :, None]
        return scaled - torch.bmm(U.transpose(1, 2), inner)[:, :, 0] * inv_base

    return solve


def _capacitance_factor(grams: Tensor, root: Tensor) -> Tensor | None:
    """Cholesky factors of the capacitances ``I + C_k^{1/2} (U_k^T B_k^{-1} U_k) C_k^{1/2}``, shape (K, r, r).

    ``grams``: the ``U_k^T B_k^{-1} U_k``, (K, r, r); ``root``: the ``C_k^{1/2}``, (K, r).

    Returns
    -------
    Tensor or None
        None if a capacitance is not numerically positive definite (non-finite curvature).
    """
    capacitance = root[:, :, None] * grams * root[:, None, :]
    capacitance.diagonal(dim1=1, dim2=2).add_(1.0)
    factor, info = torch.linalg.cholesky_ex(capacitance)
    return None if bool((info != 0).any()) else factor


def _weighted_grams(U: Tensor, weights: Tensor) -> Tensor:
    """Return ``U^T diag(weights[k]) U`` for every row ``k`` of ``weights``, shape (K, G, G).

    One batched product (a loop of small products costs more than their
    arithmetic), ``grams_chunk_entries`` entries of ``(k, d, G)`` at a time.

    Returns
    -------
    Tensor of shape (K, G, G)
    """
    d, G = U.shape
    chunk = max(1, get_tuning().grams_chunk_entries // (d * G))
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
    n_groups, intercept = max(system.n_logits, 2), INTERCEPT in system.gradient
    if cache is None or system.comm.distributed:
        return class_group_moments(X, y, weights, n_groups, intercept, system.comm)
    key = (X._version, n_groups, intercept)
    held: _MomentsEntry | None = cache.get("class_means")
    same_rows = held is not None and held.X() is X and held.y() is y and held.key == key
    if same_rows and torch.equal(held.weights, weights):
        return held.moments
    moments = class_group_moments(X, y, weights, n_groups, intercept, system.comm)
    cache["class_means"] = _MomentsEntry(weakref.ref(X), weakref.ref(y), key, weights.clone(), moments)
    return moments


class _MomentsEntry(NamedTuple):
    """The class groups' moments and the rows they came from (held weakly: the cache keeps no X alive)."""

    X: weakref.ref
    y: weakref.ref
    key: tuple
    weights: Tensor
    moments: tuple[Tensor, Tensor]


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
    assume ``gram_worth_cg_iters``.

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
    iterations = get_tuning().gram_worth_cg_iters
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
    row = LogitCurvature(stats, weights, "fgn").trace()
    coef_lam = lam[COEF]  # a float, or per-column weights of whitened features
    scaled = row * ((X * X).sum(1) / coef_lam if isinstance(coef_lam, float) else (X * X / coef_lam).sum(1))
    if fit_intercept:
        scaled = scaled + row / lam[INTERCEPT]
    rank = min(X.shape[0], (X.shape[1] + fit_intercept) * stats.logits.shape[1])
    kappa = 1.0 + max(float(scaled.max()), float(scaled.sum()) / rank)
    if not math.isfinite(kappa):
        return math.inf
    # ln((s + 1) / (s - 1)) = log1p(2 / (s - 1)): positive where the ratio rounds to 1.
    log_rate = math.log1p(2.0 / max(math.sqrt(kappa) - 1.0, 1e-12))
    return math.log(2.0 / max(cg_tol, 1e-16)) / log_rate


def _hard_row_budget(n: int, n_logits: int, n_features: int) -> int:
    """Return how many hard rows to take: their Gram and factor together cost ``hard_rows_build_cg`` products.

    A curvature product is a JVP and a VJP, ``4 n K (d + 1)`` flops; the
    Gram of ``m`` rows ``2 m^2 (d + 1)``, and its Cholesky factor ``m^3 / 3``
    flops counted twice (a factorisation runs at about half a GEMM's rate).

    Returns
    -------
    int
        ``m``, at most ``hard_rows_max`` and ``n``.
    """
    work = get_tuning().hard_rows_build_cg * 4.0 * n * n_logits * (n_features + 1)
    limit = int(min(get_tuning().hard_rows_max, n))
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
    order in the batch, when they carry at least ``hard_rows_share`` of
    the total. In a data-parallel fit every rank gets the same rows (one
    all-gather of the ``n`` traces, one of the chosen rows).

    Returns
    -------
    X, y, weights, logits : Tensor
        The hard rows' features, labels, normalised weights and logits.
    """
    comm, X = system.comm, system.X
    every, offset = whole_batch(system.logit_curvature().trace(), comm)
    m = _hard_row_budget(every.shape[0], system.stats.logits.shape[1], X.shape[1])
    if m < get_tuning().hard_rows_min:
        return None
    order = torch.argsort(every, descending=True, stable=True)[:m]
    share = get_tuning().hard_rows_share
    if system.sampled:  # drawn by their traces, which then are alike: ask a share well above m / n
        share = max(share, get_tuning().hard_rows_concentration * m / every.shape[0])
    if float(every[order].sum()) < share * float(every.sum()):
        return None
    rows = order.sort().values
    local = rows[(rows >= offset) & (rows < offset + X.shape[0])] - offset  # this rank's hard rows
    picked = (X[local], system.y[local], system.weights[local], system.lin.logits[local])
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
    factor, ``O(m^2 d + m^3 / 3)`` (at most ``hard_rows_build_cg`` CG
    iterations), then per iteration a JVP and a VJP on ``m`` rows and two
    triangular solves. None when the hard rows carry less than
    ``hard_rows_share`` of the curvature (strong regularisation, where the
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


@dataclass(frozen=True)
class PreconditionerRequest:
    """What a step asks of its preconditioner, besides the system.

    Attributes
    ----------
    solver : {"auto", "cg", "cholesky"}
        The user's choice: ``"cholesky"`` asks the Gram-Cholesky solve,
        ``"auto"`` lets its cost model decide.
    cg_tol : float
        CG's tolerance for the step (the cost models count iterations to it).
    structured : bool
        The step is a full-batch step of a linear head on whitened features:
        the models of the linear head's curvature (hard rows, class means,
        Kronecker) may be tried.
    cache : dict or None
        What full-batch steps on the same rows share (the class groups' moments).
    cheap : bool
        The model serves a step without CG (a quasi-Newton step's ``H_0``,
        :mod:`._quasi_newton`): only models whose build costs less than a
        curvature product may be tried (class means, Kronecker).
    """

    solver: str = "auto"
    cg_tol: float = 1e-5
    structured: bool = False
    cache: dict | None = None
    cheap: bool = False


class Preconditioner:
    """A model ``M`` of the damped curvature, applied inside CG as ``r -> M^{-1} r``.

    ``name`` is what :class:`._step.StepResult` reports as the step's
    solver. Subclasses define both class methods; neither changes the system.
    """

    name = "cg"

    @classmethod
    def affordable(cls, system: DampedSystem, request: PreconditionerRequest) -> bool:
        """Return whether this model may be tried on the step (its structure is there, its cost pays)."""
        raise NotImplementedError

    @classmethod
    def build_products(cls, system: DampedSystem) -> float:
        """Return what building the model costs, in curvature products (a JVP and a VJP) on the system's rows.

        What a step's cost counts (:func:`._stepper._choose_direction`) beside
        its CG products; 0 for a model whose build is below a product.

        Returns
        -------
        float
        """
        return 0.0

    @classmethod
    def build(cls, system: DampedSystem, request: PreconditionerRequest) -> Callable[[Tensor], Tensor] | None:
        """Return ``r -> M^{-1} r`` on flat vectors, or None where the model does not hold."""
        raise NotImplementedError


class GramCholesky(Preconditioner):
    """The exact FGN solve from the batch's ``n x n`` Gram (:func:`make_fgn_preconditioner`).

    Tried when the user asks ``solver="cholesky"``, or under ``"auto"`` in
    one process for a :class:`Head` of at most ``cholesky_max_rows`` rows when
    forming and factorising the Gram costs less than the CG iterations it
    saves (:func:`_gram_pays_off`). Not under ``"auto"`` on a curvature
    sample: a data-parallel fit, which has no Gram, must take the steps one
    process takes on the same sample. An explicit request whose
    factorisation fails warns; the next preconditioners are tried then.
    """

    name = "cholesky"

    @classmethod
    def affordable(cls, system: DampedSystem, request: PreconditionerRequest) -> bool:  # noqa: D102
        if request.cheap:
            return False
        if request.solver == "cholesky":
            return True
        return (
            request.solver == "auto"
            and not system.comm.distributed
            and not system.sampled
            and as_head(system.head).has_layers
            and system.y.shape[0] <= get_tuning().cholesky_max_rows
            and _gram_pays_off(
                system.head, system.params, system.X, system.stats, system.weights, system.damping,
                request.cg_tol, system.curvature,
            )
        )  # fmt: skip

    @classmethod
    def build(cls, system: DampedSystem, request: PreconditionerRequest):  # noqa: D102
        lam = system.damping
        gram = fgn_gram(
            system.head, system.params, system.X, system.y, system.weights, lam, system.lin, system.stats
        )
        preconditioner = make_fgn_preconditioner(system.fgn_operator, gram, lam, system.gradient)
        if preconditioner is None and request.solver == "cholesky":  # "auto" falls back quietly
            warnings.warn("Cholesky factorisation of the FGN row-space system failed; using plain CG.",
                          RuntimeWarning, stacklevel=4)  # fmt: skip
        return preconditioner


class _LinearHeadModel(Preconditioner):
    """A model of a linear head's curvature on whitened features, for full-batch steps."""

    @classmethod
    def affordable(cls, system: DampedSystem, request: PreconditionerRequest) -> bool:  # noqa: D102
        return request.structured and system.linear


class HardRows(_LinearHeadModel):
    """The exact FGN solve on the hardest rows (:func:`make_hard_row_preconditioner`).

    Not for a step without CG (``request.cheap``): its build costs up to
    ``hard_rows_build_cg`` curvature products.
    """

    @classmethod
    def affordable(cls, system: DampedSystem, request: PreconditionerRequest) -> bool:  # noqa: D102
        return super().affordable(system, request) and not request.cheap

    @classmethod
    def build_products(cls, system: DampedSystem) -> float:  # noqa: D102
        return float(get_tuning().hard_rows_build_cg)  # its Gram and factor's budget (_hard_row_budget)

    @classmethod
    def build(cls, system: DampedSystem, request: PreconditionerRequest):  # noqa: D102
        return make_hard_row_preconditioner(system)


class ClassMeans(_LinearHeadModel):
    """The class-means model (:func:`make_class_means_preconditioner`).

    Every label group per logit up to ``class_means_max_logits`` logits, each
    logit's ``class_means_top_groups`` heaviest beyond (0: Kronecker there).
    """

    @classmethod
    def affordable(cls, system: DampedSystem, request: PreconditionerRequest) -> bool:  # noqa: D102
        tuning = get_tuning()
        within = system.n_logits <= tuning.class_means_max_logits or tuning.class_means_top_groups > 0
        return super().affordable(system, request) and within

    @classmethod
    def build(cls, system: DampedSystem, request: PreconditionerRequest):  # noqa: D102
        return make_class_means_preconditioner(system, _group_moments(system, request.cache))


class Kronecker(_LinearHeadModel):
    """The Kronecker model ``I kron S + Lambda`` (:func:`make_kronecker_preconditioner`); always builds."""

    @classmethod
    def build_products(cls, system: DampedSystem) -> float:  # noqa: D102
        # Its class factor: n K^2 multiply-adds against a product's 2 n K (d + 1).
        return system.n_logits / (2.0 * (system.X.shape[1] + 1))

    @classmethod
    def build(cls, system: DampedSystem, request: PreconditionerRequest):  # noqa: D102
        factor = system.comm.sum_(system.logit_curvature().matrix())
        return make_kronecker_preconditioner(factor, system.damping, system.gradient)


# Tried in this order; the first that builds preconditions the step.
PRECONDITIONERS: tuple[type[Preconditioner], ...] = (GramCholesky, HardRows, ClassMeans, Kronecker)


class Chosen(NamedTuple):
    """The preconditioner a step runs CG with (:func:`choose_preconditioner`).

    ``solver``: the model's ``name`` (``"cholesky"`` or ``"cg"``);
    ``apply``: ``r -> M^{-1} r``, None for ``Lambda^{-1}``;
    ``build_products``: what its build cost, in curvature products on the
    system's rows (:meth:`Preconditioner.build_products`).
    """

    solver: str
    apply: Callable[[Tensor], Tensor] | None
    build_products: float = 0.0


def choose_preconditioner(system: DampedSystem, request: PreconditionerRequest) -> Chosen:
    """Return the first of :data:`PRECONDITIONERS` that is affordable and builds (phase 2 of a step).

    Returns
    -------
    Chosen
    """
    for model in PRECONDITIONERS:
        if model.affordable(system, request):
            apply = model.build(system, request)
            if apply is not None:
                return Chosen(model.name, apply, model.build_products(system))
    return Chosen("cg", None)
