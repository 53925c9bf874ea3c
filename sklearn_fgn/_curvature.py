r"""Row-space curvature operators for FGN and the full softmax GGN.

Notation for one batch of ``n`` examples: logits ``z_i = f(x_i; theta)``
(scikit-learn's ``raw_prediction``), ``J_i = dz_i/dtheta``, normalised
weights ``omega_i`` (summing to one), margin ``m_i`` with direction
``a_i = dm_i/dz_i`` and curvature weight ``w_i`` (see :mod:`._margin`).

FGN keeps ``G_F = sum_i omega_i w_i g_i g_i^T`` with ``g_i = J_i^T a_i``.
Its row operator ``B`` has one row per example,
``b_i = sqrt(omega_i w_i) g_i^T``, so that ``G_F = B^T B``.

The full GGN is ``G = sum_i omega_i J_i^T H_i J_i`` with
``H_i = diag(p_i) - p_i p_i^T``. Since ``H_i = S_i^T S_i`` for
``S_i = (I - s s^T) diag(s)``, ``s = sqrt(p_i)`` (``I - s s^T`` is a
projection because ``||s|| = 1``), its row operator has ``n * n_classes``
rows ``sqrt(omega_i) S_i J_i``. ``S_i`` is applied in O(n_classes); no
``n_classes x n_classes`` matrix is formed.

Both operators only need the logits map's Jacobian-vector product
(``v -> J v``, shape ``(n, n_logits)``) and vector-Jacobian product
(``C -> J^T C``). :class:`LogitsLinearization` carries them; the linear
and MLP heads have closed forms (two matmuls per layer), other logits
maps use ``torch.func``. The
logits map is a :class:`Head` spec or any ``LogitsFn`` ``(params, X) ->
logits`` that is pure in ``params`` (a ``torch.func.functional_call`` of an
``nn.Module``, say), so the same operators serve arbitrary networks.
Nothing of size ``n x P``, ``n x K x P`` or ``P x P`` is formed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from ._heads import (
    COEF,
    INTERCEPT,
    Head,
    Params,
    activation_slope,
    coef_key,
    forward_with_cache,
    intercept_key,
    is_penalized,
)
from ._margin import MarginStats, log_curvature_weight, margin, row_blocks

__all__ = [
    "FunctionHead",
    "LogitsFn",
    "LogitsLinearization",
    "RowSpaceOperator",
    "as_head",
    "damping_diagonal",
    "fgn_gram",
    "fgn_row_scale",
    "linear_logits",
    "linearize",
    "logits_function",
    "make_fgn_operator",
    "make_ggn_operator",
    "penalized_names",
    "penalty_coefficients",
    "row_blocked_affine",
]

# ``logits_fn(params, X) -> logits`` of shape (n, n_logits), pure in ``params``.
LogitsFn = Callable[[Params, Tensor], Tensor]
# The L2 strength: one float for every penalised parameter, or a coefficient
# per penalised parameter (a float, or a tensor that broadcasts against it:
# per-column weights of a layer fitted in whitened coordinates).
Alpha = float | dict[str, float | Tensor]


@dataclass(frozen=True)
class LogitsLinearization:
    """The logits map linearised at ``params``.

    Attributes
    ----------
    logits : Tensor of shape (n, n_logits)
    jvp : callable
        ``v (params-shaped dict) -> J v``, Tensor of shape (n, n_logits).
    vjp : callable
        ``C (n, n_logits) -> J^T C``, a params-shaped dict.
    layer_inputs : list of Tensor or None
        For a :class:`Head`, every layer's input (``X`` first); None otherwise.
    backprop : callable or None
        For a :class:`Head`, ``C -> [dC/d(pre-activation_l)]`` for every
        layer, first layer first (what ``vjp`` pulls back to the weights;
        ``[C]`` for the linear head); None otherwise.
    """

    logits: Tensor
    jvp: Callable[[Params], Tensor]
    vjp: Callable[[Tensor], Params]
    layer_inputs: list[Tensor] | None = None
    backprop: Callable[[Tensor], list[Tensor]] | None = None


def _linearize_linear(head: Head, params: Params, X: Tensor, logits: Tensor | None) -> LogitsLinearization:
    # logits = X W^T + b, so J v = X V^T + v_b and J^T C = (C^T X, sum_i C_i).
    def jvp(v: Params) -> Tensor:
        return row_blocked_affine(X, v[COEF], v[INTERCEPT] if head.fit_intercept else None)

    def vjp(cotangent: Tensor) -> Params:
        grads = {COEF: cotangent.T @ X}
        if head.fit_intercept:
            grads[INTERCEPT] = cotangent.sum(0)
        return grads

    logits = linear_logits(head, params, X) if logits is None else logits
    return LogitsLinearization(logits, jvp, vjp, [X], lambda cotangent: [cotangent])


def linear_logits(head: Head, params: Params, X: Tensor) -> Tensor:
    """Return the linear head's logits ``X W^T + b``, shape ``(n, K)``, with no product at ``W = 0``.

    A fit starts from zero coefficients, where the logits are the intercept
    on every row: that first forward pass (a whole GEMM through ``X``) is
    skipped. Otherwise :func:`row_blocked_affine`.

    Returns
    -------
    Tensor of shape (n, K)
    """
    coef = params[COEF]
    intercept = params[INTERCEPT] if head.fit_intercept else None
    tracked = torch.is_grad_enabled() and (coef.requires_grad or X.requires_grad)
    if tracked or bool(coef.any()):  # NaN counts as nonzero: it must reach the logits
        return row_blocked_affine(X, coef, intercept)
    dtype = torch.result_type(X, coef)
    base = intercept if intercept is not None else coef.new_zeros(coef.shape[0])
    return base.to(dtype).expand(X.shape[0], -1).clone()


def row_blocked_affine(X: Tensor, coef: Tensor, intercept: Tensor | None = None) -> Tensor:
    """Return ``X coef^T + intercept`` (``(n, d)`` by ``(K, d)``: ``(n, K)``), on the CPU by blocks of rows.

    On the CPU a product whose ``(n, K)`` result is far larger than the
    cache runs faster a block of rows at a time, each block's result about
    ``GEMM_BLOCK_ENTRIES`` entries (its rows of ``X`` and of the result stay
    in cache while the kernel sweeps ``coef``). Every entry is the same
    inner product, equal to the unblocked one up to the order in which the
    BLAS kernel sums it. One fused ``addmm`` elsewhere (a GPU), and where
    autograd must see the product (``out=`` writes are not differentiable).

    Returns
    -------
    Tensor of shape (n, K)
    """
    tracked = torch.is_grad_enabled() and (X.requires_grad or coef.requires_grad)
    if X.device.type != "cpu" or tracked or (intercept is not None and intercept.requires_grad):
        return X @ coef.T if intercept is None else torch.addmm(intercept, X, coef.T)
    width = coef.shape[0]
    out = torch.empty(X.shape[0], width, dtype=torch.result_type(X, coef), device=X.device)
    for rows in row_blocks(out, max(GEMM_BLOCK_ENTRIES, 64 * width)):  # at least 64 rows a block
        if intercept is None:
            torch.mm(X[rows], coef.T, out=out[rows])
        else:
            torch.addmm(intercept, X[rows], coef.T, out=out[rows])
    return out


# Entries of a block's (rows, K) result in row_blocked_affine: 2 MiB of float32.
GEMM_BLOCK_ENTRIES = 2**19


@dataclass(frozen=True)
class FunctionHead:
    """A logits function ``(params, X) -> logits`` seen through the head protocol of :class:`Head`.

    It has no per-layer structure: linearised by ``torch.func``, no Gram,
    and ``alpha`` penalises its parameters with ``ndim >= 2``.
    """

    fn: LogitsFn
    is_linear = False
    has_layers = False

    def logits_fn(self) -> LogitsFn:
        """Return the function itself."""
        return self.fn

    def penalized(self, params: Params) -> frozenset[str]:
        """Return the names of the parameters with ``ndim >= 2`` (weights, kernels; not biases or norms)."""
        return frozenset(k for k, t in params.items() if t.ndim >= 2)


def as_head(model: Head | FunctionHead | LogitsFn) -> Head | FunctionHead:
    """Return ``model`` as a head: a :class:`Head` or :class:`FunctionHead` as it is, a function wrapped.

    Returns
    -------
    Head or FunctionHead
    """
    return model if isinstance(model, (Head, FunctionHead)) else FunctionHead(model)


def logits_function(model: Head | LogitsFn) -> LogitsFn:
    """Return the logits map of a :class:`Head` spec or of a logits function.

    Parameters
    ----------
    model : Head or callable
        A head spec, or already a function ``(params, X) -> logits``.

    Returns
    -------
    callable
        ``(params, X) -> logits`` (``model`` itself when it is a function).
    """
    return as_head(model).logits_fn()


def penalized_names(model: Head | LogitsFn, params: Params) -> frozenset[str]:
    """Names of the parameters ``alpha`` penalises.

    Parameters
    ----------
    model : Head or callable
        A head spec or a logits function ``(params, X) -> logits``.
    params : dict of Tensor
        The parameters.

    Returns
    -------
    frozenset of str
        For a :class:`Head` the ``coef_*`` entries (:func:`._heads.is_penalized`);
        for a logits function every parameter with ``ndim >= 2`` (weight
        matrices and kernels), never biases or other 1-D parameters (norm scales).
    """
    return as_head(model).penalized(params)


def penalty_coefficients(model: Head | LogitsFn, params: Params, alpha: Alpha) -> dict[str, float | Tensor]:
    """Return the coefficients ``c_k`` of the penalty ``sum_k c_k * theta_k**2 / 2``.

    Parameters
    ----------
    model : Head or callable
        A head spec or a logits function ``(params, X) -> logits``.
    params : dict of Tensor
        The parameters.
    alpha : float or dict
        A float applies to every parameter of :func:`penalized_names`; a dict
        is returned as it is (its keys are then the penalised parameters).

    Returns
    -------
    dict of str to float or Tensor
        ``c_k`` for every penalised parameter.
    """
    if isinstance(alpha, dict):
        return alpha
    return dict.fromkeys(penalized_names(model, params), alpha)


def _preact_cotangents(
    head: Head, params: Params, slopes: list[Tensor | None], cotangent: Tensor
) -> list[Tensor]:
    """Backpropagate ``cotangent`` (on the logits) to every layer's pre-activation, first layer first."""
    deltas = [cotangent]
    for layer in range(head.n_layers - 1, 0, -1):
        delta = deltas[-1] @ params[coef_key(layer)]
        slope = slopes[layer - 1]
        deltas.append(delta if slope is None else delta.mul_(slope))
    return deltas[::-1]


def _linearize_mlp(head: Head, params: Params, X: Tensor) -> LogitsLinearization:
    # Closed forms through the cached forward pass: J v carries the tangent
    # layer by layer, J^T C backpropagates; two matmuls per layer each way
    # (one for the first layer's J v), about a third of torch.func's forward mode.
    with torch.no_grad():
        logits, inputs, preacts = forward_with_cache(head, params, X)
    slopes = [
        activation_slope(head.activation, pre, out) for pre, out in zip(preacts[:-1], inputs[1:], strict=True)
    ]

    def jvp(v: Params) -> Tensor:
        tangent = None  # J v of the current layer's input
        for layer, hidden in enumerate(inputs):
            out = hidden @ v[coef_key(layer)].T
            if tangent is not None:
                out.addmm_(tangent, params[coef_key(layer)].T)
            if head.fit_intercept:
                out += v[intercept_key(layer)]
            if layer < head.n_layers - 1:
                tangent = out if slopes[layer] is None else out.mul_(slopes[layer])
        return out

    def backprop(cotangent: Tensor) -> list[Tensor]:
        return _preact_cotangents(head, params, slopes, cotangent)

    def vjp(cotangent: Tensor) -> Params:
        grads = {}
        for layer, delta in enumerate(backprop(cotangent)):
            grads[coef_key(layer)] = delta.T @ inputs[layer]
            if head.fit_intercept:
                grads[intercept_key(layer)] = delta.sum(0)
        return grads

    return LogitsLinearization(logits, jvp, vjp, inputs, backprop)


def _linearize_autograd(model: Head | LogitsFn, params: Params, X: Tensor) -> LogitsLinearization:
    model_fn = logits_function(model)

    def logits_fn(p: Params) -> Tensor:
        return model_fn(p, X)

    logits, vjp_fn = torch.func.vjp(logits_fn, params)

    def jvp(v: Params) -> Tensor:
        # Forward mode: one forward pass with tangents, no graph kept.
        return torch.func.jvp(logits_fn, (params,), (v,))[1]

    def vjp(cotangent: Tensor) -> Params:
        return vjp_fn(cotangent)[0]

    return LogitsLinearization(logits, jvp, vjp)


def linearize(
    head: Head | LogitsFn, params: Params, X: Tensor, logits: Tensor | None = None
) -> LogitsLinearization:
    """Linearise the logits map at ``params`` on the batch ``X``.

    ``head`` is a :class:`Head` spec or a ``LogitsFn`` (then ``X`` is
    whatever that function takes as its batch). Cost: one forward pass,
    keeping every layer's input and activation slopes for an MLP head and the
    autograd graph for a logits function; a linear head skips it when given
    ``logits``, the logits at ``params`` on ``X`` (other maps need the
    forward pass for their intermediates and ignore them). Each later
    ``jvp``/``vjp`` costs about one forward pass: for the linear head exactly
    one ``(n, d) @ (d, n_logits)`` matmul.

    Returns
    -------
    LogitsLinearization
        The logits and the closures for ``J v`` and ``J^T C``.
    """
    head = as_head(head)
    if not head.has_layers:
        return _linearize_autograd(head.fn, params, X)
    return _linearize_linear(head, params, X, logits) if head.is_linear else _linearize_mlp(head, params, X)


@dataclass(frozen=True)
class RowSpaceOperator:
    r"""A row operator ``B`` with ``G = B^T B``.

    Attributes
    ----------
    n_rows : int
        Rows of ``B``: ``n`` for FGN, ``n * n_classes`` for the full GGN.
    matvec : callable
        ``v (params dict) -> B v``, a Tensor (``(n,)`` or ``(n, n_classes)``).
    rmatvec : callable
        ``u -> B^T u``, a params-shaped dict.
    jvp : callable
        ``v -> J v``, the logits map's JVP (shape ``(n, n_logits)``).
    curvature_from_jvp : callable
        ``J v -> G v`` without the row-space intermediate (the softmax GGN:
        ``J^T (omega (p*Jv - p (p . Jv)))``, half the elementwise passes of
        ``B^T (B v)``). Split from the JVP so that a caller can keep ``J v``.
    """

    n_rows: int
    matvec: Callable[[Params], Tensor]
    rmatvec: Callable[[Tensor], Params]
    jvp: Callable[[Params], Tensor]
    curvature_from_jvp: Callable[[Tensor], Params]

    def curvature_matvec(self, v: Params) -> Params:
        """``G v = B^T (B v)``: the curvature applied in parameter space."""
        return self.curvature_from_jvp(self.jvp(v))


def fgn_row_scale(logits: Tensor, y: Tensor, weights: Tensor, m: Tensor | None = None) -> Tensor:
    """``sqrt(omega_i w_i)`` computed in log space, shape (n,); ``m``: the margins, if known."""
    m = margin(logits, y) if m is None else m
    return torch.exp(0.5 * (torch.log(weights) + log_curvature_weight(m)))


def make_fgn_operator(
    lin: LogitsLinearization, y: Tensor, weights: Tensor, stats: MarginStats | None = None
) -> RowSpaceOperator:
    r"""FGN rows ``b_i = sqrt(omega_i w_i) a_i^T J_i``.

    ``B v = sqrt(omega w) * (a * J v).sum(1)`` and
    ``B^T u = J^T ((sqrt(omega w) u)[:, None] * a)``: one JVP or VJP of the
    logits map plus O(n * n_logits). ``weights`` are the normalised ``omega``;
    ``stats`` the :class:`._margin.MarginStats` of ``lin.logits``, if known.
    The row quantities are formed on first use (a full-GGN step that only
    builds this operator for reference never pays for them).

    Returns
    -------
    RowSpaceOperator
        ``B`` with ``n`` rows.
    """

    @cache
    def rows() -> tuple[Tensor, Tensor]:
        st = MarginStats(lin.logits, y) if stats is None else stats
        return st.direction, fgn_row_scale(lin.logits, y, weights, st.margin)

    def matvec(v: Params) -> Tensor:
        direction, scale = rows()
        return scale * (direction * lin.jvp(v)).sum(1)

    def rmatvec(u: Tensor) -> Params:
        direction, scale = rows()
        return lin.vjp((scale * u)[:, None] * direction)

    def curvature_from_jvp(jv: Tensor) -> Params:
        direction, scale = rows()
        return lin.vjp((scale * scale * (direction * jv).sum(1))[:, None] * direction)

    return RowSpaceOperator(y.shape[0], matvec, rmatvec, lin.jvp, curvature_from_jvp)


def make_ggn_operator(
    lin: LogitsLinearization, y: Tensor, weights: Tensor, stats: MarginStats | None = None
) -> RowSpaceOperator:
    r"""Full softmax GGN rows ``sqrt(omega_i) S_i J_i``, ``S_i = (I - s s^T) diag(s)``.

    With ``s = sqrt(p)``: ``S x = s*x - s (p . x)`` and
    ``S^T y = s * (y - s (s . y))``, so ``S^T S x = p*x - p (p . x)``, the
    softmax Hessian product. For a single-logit binary head the GGN is the
    FGN (exact Gauss-Newton) and that operator is returned.

    Returns
    -------
    RowSpaceOperator
        ``B`` with ``n * n_classes`` rows (``n`` for a single logit).
    """
    if lin.logits.shape[1] == 1:
        return make_fgn_operator(lin, y, weights, stats)
    stats = MarginStats(lin.logits, y) if stats is None else stats
    row_weight = weights.sqrt()[:, None]

    @cache
    def root() -> Tensor:  # sqrt(p), formed on first use (CG uses the fused product)
        return stats.proba.sqrt()

    def matvec(v: Params) -> Tensor:
        jv, sqrt_proba = lin.jvp(v), root()
        return row_weight * (sqrt_proba * jv - sqrt_proba * (stats.proba * jv).sum(1, keepdim=True))

    def rmatvec(u: Tensor) -> Params:
        sqrt_proba = root()
        projected = u - sqrt_proba * (sqrt_proba * u).sum(1, keepdim=True)
        return lin.vjp(row_weight * sqrt_proba * projected)

    @cache
    def weighted_proba() -> Tensor:  # formed on first use (a sampled step's whole-batch operator never is)
        return weights[:, None] * stats.proba

    @cache
    def work() -> Tensor:  # one (n, K) buffer for every product of this step
        return torch.empty_like(lin.logits)

    def curvature_from_jvp(jv: Tensor) -> Params:
        # S^T S = diag(p) - p p^T applied in O(K) per example (kfac-jax style),
        # into one buffer: fresh (n, K) temporaries per product cost more than
        # the arithmetic.
        buf = work()
        coupling = torch.mul(stats.proba, jv, out=buf).sum(1, keepdim=True)
        return lin.vjp(torch.sub(jv, coupling, out=buf).mul_(weighted_proba()))

    return RowSpaceOperator(lin.logits.numel(), matvec, rmatvec, lin.jvp, curvature_from_jvp)


def _margin_gradients_by_layer(
    head: Head,
    params: Params,
    X: Tensor,
    y: Tensor,
    lin: LogitsLinearization | None,
    stats: MarginStats | None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Logits, layer inputs and per-example ``dm_i/d(pre-activation_l)``."""
    lin = linearize(head, params, X) if lin is None else lin
    direction = (MarginStats(lin.logits, y) if stats is None else stats).direction  # d m / d logits
    return lin.logits, lin.layer_inputs, lin.backprop(direction)


def fgn_gram(
    head: Head,
    params: Params,
    X: Tensor,
    y: Tensor,
    weights: Tensor,
    damping: dict[str, float],
    lin: LogitsLinearization | None = None,
    stats: MarginStats | None = None,
) -> Tensor:
    r"""Exact ``B Lambda^{-1} B^T`` for FGN, shape (n, n), without forming ``B``.

    ``lin`` (the head linearised at ``params`` on ``X``, if already
    computed) saves the forward pass, and ``stats`` (the
    :class:`._margin.MarginStats` of its logits) the margin quantities.

    ``m_i`` depends on example ``i`` only, so one backward pass of
    ``sum_i m_i`` gives every layer's per-example margin gradients ``Delta_l``
    with respect to its pre-activations. For a stack of affine layers with
    inputs ``H_l`` the margin-gradient Gram is

    .. math::

        \sum_l (\Delta_l \Delta_l^T) \circ (H_l H_l^T / \Lambda_{W,l} + 1 / \Lambda_{b,l}),

    scaled by ``sqrt(omega w) sqrt(omega w)^T``. Cost O(n^2 (d + sum h_l)),
    independent of the number of parameters.

    Returns
    -------
    Tensor of shape (n, n)
        ``B Lambda^{-1} B^T``, symmetric positive semidefinite.
    """
    logits, inputs, deltas = _margin_gradients_by_layer(head, params, X, y, lin, stats)
    gram = torch.zeros(X.shape[0], X.shape[0], dtype=X.dtype, device=X.device)
    for layer, (hidden, delta) in enumerate(zip(inputs, deltas, strict=True)):
        lam = damping[coef_key(layer)]  # a float, or per-column weights of a whitened layer
        kernel = (hidden @ hidden.T) / lam if isinstance(lam, float) else (hidden / lam) @ hidden.T
        if head.fit_intercept:
            kernel = kernel + 1.0 / damping[intercept_key(layer)]
        gram += (delta @ delta.T) * kernel
    scale = fgn_row_scale(logits, y, weights, None if stats is None else stats.margin)
    return scale[:, None] * gram * scale[None, :]


def damping_diagonal(
    params: Params, damping: float, alpha: Alpha, penalized: Collection[str] | None = None
) -> dict[str, float | Tensor]:
    """``Lambda`` per parameter block: ``damping + alpha`` on weights, ``damping`` on biases.

    ``penalized`` names the weights; by default the head's ``coef_*`` entries.
    A dict ``alpha`` gives the coefficient of each penalised parameter itself
    (see :func:`penalty_coefficients`); ``penalized`` is then ignored.

    Returns
    -------
    dict of str to float or Tensor
        ``Lambda`` per parameter name (a tensor where ``alpha`` has one).
    """
    if isinstance(alpha, dict):
        return {k: damping + alpha[k] if k in alpha else damping for k in params}
    if penalized is None:
        penalized = {k for k in params if is_penalized(k)}
    return {k: damping + alpha if k in penalized else damping for k in params}
