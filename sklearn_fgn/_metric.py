r"""The feature metric: damping measured in the geometry of a layer's inputs.

A linear layer ``z = W x + b`` fitted with damping ``lambda I`` takes steps
that depend on how the features are scaled and rotated: with L2-normalised
embeddings the curvature is orders of magnitude below that of standardised
features and a fixed ``lambda`` is either a crawl or unstable. docs/design.md §4
damps in the metric of the inputs instead,

.. math::

    \Lambda = \lambda (I_K \otimes A_\varepsilon) + \bar\alpha P,
    \qquad A = \sum_i \omega_i \tilde x_i \tilde x_i^T,

with ``x~ = (x, 1)``. In the coordinates ``(W, b + W mu)`` (``mu`` the
weighted feature mean) ``A`` is block-diagonal, ``diag(Sigma, 1)`` with
``Sigma`` the weighted covariance, so the intercept keeps the damping
``lambda`` and the weights get ``lambda Sigma_eps``. This module finds an
affine map ``x -> x^ = T^T (x - mu)`` with

.. math::

    T^T \Sigma_\varepsilon T = I, \qquad T^T T = \mathrm{diag}(e),

so that, with ``W = W^ T^T``, the logits are ``W^ x^ + b^``, the feature
metric is the identity and the penalty ``alpha/2 ||W||^2`` is
``alpha/2 sum_j e_j ||W^_{:, j}||^2``: every step of the solver in the
whitened coordinates uses a *diagonal* damping ``lambda + alpha e_j``,
exactly. ``T`` comes from two symmetric eigendecompositions: the ridge is put
on the correlation form ``C = S Sigma S`` (``S = diag(Sigma)^{-1/2}``),
``C + eps I = Q D Q^T``, which makes the metric exactly invariant to
per-feature rescaling; ``T0 = S Q D^{-1/2}`` whitens, and its singular value
decomposition ``T0 = V diag(sigma) U^T`` diagonalises the penalty:
``T = T0 U = V diag(sigma)``, ``e = sigma^2``. ``T`` is formed as
``V diag(sigma)``, not as ``T0 U``: with ``V`` orthonormal to rounding,
``T^T T`` is diagonal to rounding however widely the penalties spread (a
near-constant feature puts ``1 / var`` among them, 1e20 for a column of
standard deviation 1e-10), so the solver's per-column penalty is the model's
penalty. Rounding in ``V`` then only perturbs the whitening
(``T^T Sigma_eps T = I``), which affects how fast the solver converges, not
where. (``eigh(T0^T T0)`` squares that spread: its eigenvectors of the small
penalties are lost, ``T^T T`` is not diagonal, and the fit converges to
another point.)

Beyond ``full_metric_max_features`` features the two ``O(d^3)``
eigendecompositions are replaced by the diagonal metric ``T = S`` (per-feature
scaling, ``e = diag(S)^2``): exact for its own model, invariant to
per-feature scales but not to rotations. It needs only the per-feature
variances, so its moments, its whitening and its maps of the weights cost
``O(n d)`` and ``O(d)`` memory instead of ``O(n d^2)`` and ``d x d``.

Nothing here depends on the classes: one metric serves a whole
regularisation path, and the first layer of an MLP head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._distributed import SINGLE, Communicator
from ._heads import COEF, INTERCEPT
from ._tuning import get_tuning

__all__ = [
    "FeatureMetric",
    "FeatureMoments",
    "feature_moments",
    "feature_standardization",
    "is_diagonal_metric",
    "make_feature_metric",
    "standardized_first_layer",
    "unwhitened_params",
    "whitened_params",
]

# Rows per chunk when accumulating moments: X is never converted whole.
_CHUNK_ROWS = 4096
# A feature whose variance is below this share of the largest is treated as constant.
_CONSTANT_VARIANCE = 1e-24


@dataclass(frozen=True)
class FeatureMoments:
    """Weighted first and second moments of the features, accumulated in float64.

    Attributes
    ----------
    weight : float
        Total weight ``sum_i s_i`` seen.
    total : Tensor of shape (d,)
        ``sum_i s_i x_i``.
    outer : Tensor of shape (d, d) or (d,)
        ``sum_i s_i (x_i - c)(x_i - c)^T`` about the shift ``c``; its
        diagonal alone for the diagonal metric (:attr:`diagonal`).
    shift : Tensor of shape (d,)
        The point ``c`` the outer products are taken about (the first
        chunk's mean: it keeps the sums free of cancellation).
    """

    weight: float
    total: Tensor
    outer: Tensor
    shift: Tensor

    @property
    def diagonal(self) -> bool:
        """Whether only the diagonal of the second moment was accumulated."""
        return self.outer.ndim == 1

    def _outer(self, u: Tensor, v: Tensor) -> Tensor:
        return u * v if self.diagonal else torch.outer(u, v)

    def merged(self, other: FeatureMoments) -> FeatureMoments:
        """Moments of the union of both samples (``other`` re-centred on this shift)."""
        if other.diagonal != self.diagonal:
            raise ValueError("Cannot merge full and diagonal feature moments.")
        offset = other.shift - self.shift
        # sum s (x - c1)(x - c1)^T = sum s (x - c2)(x - c2)^T + u d^T + d u^T + W d d^T,
        # with d = c2 - c1 and u = sum s (x - c2).
        u = other.total - other.weight * other.shift
        outer = other.outer + self._outer(u, offset) + self._outer(offset, u)
        outer += other.weight * self._outer(offset, offset)
        return FeatureMoments(
            self.weight + other.weight, self.total + other.total, self.outer + outer, self.shift
        )

    def covariance(self, centered: bool) -> tuple[Tensor, Tensor]:
        """Weighted mean and covariance (second moment about 0 when not ``centered``).

        Returns
        -------
        mean : Tensor of shape (d,)
            Zeros when not ``centered``.
        covariance : Tensor of shape (d, d), or (d,) (the variances) when :attr:`diagonal`
        """
        mean = self.total / self.weight
        offset = mean - self.shift
        outer = self.outer / self.weight - self._outer(offset, offset)  # about the mean
        if centered:
            return mean, outer
        return torch.zeros_like(mean), outer + self._outer(mean, mean)


def _shift(X: Tensor, comm: Communicator = SINGLE) -> Tensor:
    """Return the first chunk's mean in float64: moments taken about it are free of cancellation.

    With ``comm``, the mean of every rank's first chunk (the same point on every rank).

    Returns
    -------
    Tensor of shape (d,)
        The shift, float64.
    """
    first = X[:_CHUNK_ROWS].to(dtype=torch.float64)
    if not comm.distributed:
        return first.mean(0)
    sums = comm.sum_(torch.cat([first.sum(0), first.new_full((1,), first.shape[0])]))
    return sums[:-1] / sums[-1]


def _weighted_chunks(X: Tensor, sample_weight: Tensor | None):
    """Yield ``(X_chunk, weights)`` in float64, ``_CHUNK_ROWS`` rows at a time: X is never converted whole.

    Yields
    ------
    tuple of Tensor
        The chunk and its weights (ones without ``sample_weight``).
    """
    for start in range(0, X.shape[0], _CHUNK_ROWS):
        chunk = X[start : start + _CHUNK_ROWS].to(dtype=torch.float64)
        if sample_weight is None:
            yield chunk, torch.ones(chunk.shape[0], dtype=torch.float64, device=X.device)
        else:
            yield chunk, sample_weight[start : start + _CHUNK_ROWS].to(dtype=torch.float64)


def feature_moments(
    X: Tensor, sample_weight: Tensor | None = None, comm: Communicator = SINGLE, diagonal: bool = False
) -> FeatureMoments:
    """Accumulate :class:`FeatureMoments` of ``X`` in row chunks, in float64.

    Each chunk is centred in float64. For float32 features the chunk's
    outer product (the ``O(chunk d^2)`` part) runs in float32, about half
    the time of float64's, on columns scaled by powers of two (features of
    any magnitude float32 holds neither overflow nor underflow there, see
    :func:`_float32_product`), and is summed in float64: its rounding, about
    ``1e-5`` of the largest variance, is of the order of the metric's
    ridge, below which the metric treats directions alike anyway; not
    while float32 matmuls may run in TF32 or bfloat16. Float64 features
    keep float64 throughout.

    Parameters
    ----------
    X : Tensor of shape (n, d)
        Features, on any device (the moments are computed there).
    sample_weight : Tensor of shape (n,), optional
        Non-negative weights (ones when None).
    comm : Communicator, optional
        ``X`` is a rank's shard: the moments of all ranks' rows, summed
        about a common shift in one all-reduce of ``d^2 + d + 1`` values
        (``2 d + 1`` with ``diagonal``).
    diagonal : bool, default=False
        Accumulate only the diagonal of the second moment (what the
        diagonal metric needs).

    Returns
    -------
    FeatureMoments
        Cost O(n d^2) flops (O(n d) with ``diagonal``); memory one float64
        chunk of ``_CHUNK_ROWS`` rows plus ``d x d`` (``d``).
    """
    d = X.shape[1]
    shift = _shift(X, comm)
    total, outer = shift.new_zeros(d), shift.new_zeros(d) if diagonal else shift.new_zeros(d, d)
    weight = shift.new_zeros(())
    # Each chunk's product in float32 (see above), unless float32 matmuls may
    # use TF32 or bfloat16 (set_float32_matmul_precision): their rounding
    # would be far above the metric's ridge.
    low = X.dtype == torch.float32 and float32_matmuls_exact()
    for chunk, w in _weighted_chunks(X, sample_weight):
        centred = chunk - shift
        total += w @ chunk
        if diagonal:
            outer += w @ (centred * centred)
        elif low:
            outer += _float32_product(centred, w)
        else:
            outer.addmm_((centred * w[:, None]).T, centred)
        weight += w.sum()
    if comm.distributed:
        m = outer.numel()
        sums = comm.sum_(torch.cat([outer.reshape(-1), total, weight.reshape(1)]))
        outer, total, weight = sums[:m].view(outer.shape), sums[m:-1], sums[-1]
    return FeatureMoments(float(weight), total, outer, shift)


def _float32_product(centred: Tensor, w: Tensor) -> Tensor:
    """Return ``sum_i w_i c_i c_i^T`` of a float64 chunk, the product run in float32, as float64.

    Each column and the weights are first scaled by a power of two (exact)
    that brings their largest magnitude into ``[0.5, 1)``, and the product
    is unscaled in float64: the squares of features beyond about ``1e19``
    would overflow float32, and those below about ``1e-19`` would underflow
    to zero (the features would look constant), whatever their relative
    spread.

    Returns
    -------
    Tensor of shape (d, d)
        Float64.
    """
    columns = _power_of_two_scales(centred.abs().amax(0))
    weights = _power_of_two_scales(w.abs().amax().reshape(1))
    scaled = (centred * columns).to(torch.float32)
    product = ((scaled * (w * weights)[:, None].to(torch.float32)).T @ scaled).to(torch.float64)
    return product / (columns[:, None] * columns[None, :] * weights)


def _power_of_two_scales(magnitudes: Tensor) -> Tensor:
    """Powers of two ``2^-e`` with ``magnitudes * 2^-e`` in ``[0.5, 1)`` (1 for zeros), float64.

    Returns
    -------
    Tensor
        Of the shape of ``magnitudes``.
    """
    _, exponent = torch.frexp(magnitudes)
    return torch.ldexp(torch.ones_like(magnitudes), -exponent)


def feature_standardization(
    X: Tensor, sample_weight: Tensor | None = None, comm: Communicator = SINGLE
) -> tuple[Tensor, Tensor]:
    """Weighted per-feature mean and ``1 / std`` (see :func:`_scales`), in row chunks, float64.

    With ``comm`` over all ranks' rows (one all-reduce of ``2 d + 1`` values).

    Returns
    -------
    mean : Tensor of shape (d,)
    scale : Tensor of shape (d,)
        Cost O(n d).
    """
    d = X.shape[1]
    shift = _shift(X, comm)
    total, square, weight = shift.new_zeros(d), shift.new_zeros(d), shift.new_zeros(())
    for chunk, w in _weighted_chunks(X, sample_weight):
        centred = chunk - shift
        total += w @ centred
        square += w @ (centred * centred)
        weight += w.sum()
    if comm.distributed:
        sums = comm.sum_(torch.cat([total, square, weight.reshape(1)]))
        total, square, weight = sums[:d], sums[d : 2 * d], sums[-1]
    offset = total / weight
    return shift + offset, _scales(torch.diag(square / weight - offset * offset))


@dataclass(frozen=True)
class FeatureMetric:
    """The affine whitening ``x^ = (x - mean) @ transform`` and the penalty weights there.

    Attributes
    ----------
    mean : Tensor of shape (d,)
        ``mu`` (zeros for a layer without intercept).
    transform : Tensor of shape (d, d), or (d,)
        ``T``: ``T^T Sigma_eps T = I`` and ``T^T T = diag(penalty)``; the
        diagonal metric keeps only ``T``'s diagonal (:attr:`diagonal`).
    inverse : Tensor of shape (d, d), or (d,)
        ``T^{-1}``, to map weights into the whitened coordinates.
    penalty : Tensor of shape (d,)
        ``e``: the L2 penalty ``||W||^2`` is ``sum_j e_j ||W^_{:, j}||^2``.
    scale : Tensor of shape (d,)
        ``diag(Sigma)^{-1/2}``, the per-feature standardisation (see :func:`standardized_first_layer`).
    """

    mean: Tensor
    transform: Tensor
    inverse: Tensor
    penalty: Tensor
    scale: Tensor

    def to(self, dtype: torch.dtype, device: torch.device | str) -> FeatureMetric:
        """Return the metric in ``dtype`` on ``device``, but for :attr:`penalty`, which keeps its dtype.

        The penalty weights ``e`` scale as ``1 / var``: for features of scale
        ``1e-20`` or ``1e20`` they lie beyond float32's range, where
        ``alpha e``, the coefficients a fit uses, may not; those are formed
        in float64 first (``FGNClassifier._penalty_coefficients``).

        Returns
        -------
        FeatureMetric
            A copy (or ``self`` when nothing changes).
        """
        mean, transform, inverse, _, scale = (t.to(dtype=dtype, device=device) for t in self.tensors())
        return FeatureMetric(mean, transform, inverse, self.penalty.to(device=device), scale)

    def tensors(self) -> tuple[Tensor, ...]:
        """``(mean, transform, inverse, penalty, scale)``."""
        return self.mean, self.transform, self.inverse, self.penalty, self.scale

    @property
    def diagonal(self) -> bool:
        """Whether ``T`` is diagonal (stored as its diagonal)."""
        return self.transform.ndim == 1

    def whiten(self, X: Tensor) -> Tensor:
        """``(X - mean) @ T``, shape (n, d), in ``X``'s dtype. Cost O(n d^2) (O(n d) when diagonal)."""
        return _times(X - self.mean.to(X.dtype), self.transform.to(X.dtype))

    def weights_to_whitened(self, coef: Tensor, intercept: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W, b) -> (W T^{-T}, b + W mu)``: the same affine map on whitened inputs.

        Returns
        -------
        coef : Tensor of shape (h, d)
        intercept : Tensor of shape (h,) or None
        """
        hat = _times(coef, self.inverse.to(coef.dtype), transpose=True)
        return hat, None if intercept is None else intercept + coef @ self.mean.to(coef.dtype)

    def weights_from_whitened(self, coef: Tensor, intercept: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W^, b^) -> (W^ T^T, b^ - W mu)``, the inverse of :meth:`weights_to_whitened`.

        Returns
        -------
        coef : Tensor of shape (h, d)
        intercept : Tensor of shape (h,) or None
        """
        coef = _times(coef, self.transform.to(coef.dtype), transpose=True)
        return coef, None if intercept is None else intercept - coef @ self.mean.to(coef.dtype)


def float32_matmuls_exact() -> bool:
    """Return whether float32 matmuls run in float32, not in TF32 or bfloat16.

    As ``torch.set_float32_matmul_precision("highest")`` leaves them.

    Returns
    -------
    bool
    """
    return torch.get_float32_matmul_precision() == "highest"


def is_diagonal_metric(n_features: int) -> bool:
    """Whether features this wide get the diagonal metric (beyond ``full_metric_max_features``)."""
    return n_features > get_tuning().full_metric_max_features


def _times(A: Tensor, B: Tensor, transpose: bool = False) -> Tensor:
    """Return ``A @ B`` (``A @ B^T`` with ``transpose``), a 1-D ``B`` standing for ``diag(B)``."""
    if B.ndim == 1:
        return A * B
    return A @ B.T if transpose else A @ B


def _scales(covariance: Tensor) -> Tensor:
    """``diag(Sigma)^{-1/2}``; (near-)constant features get the median scale of the others.

    A constant feature carries no information on its scale; giving it the
    typical one keeps ``T`` as well conditioned as the other features allow.

    Returns
    -------
    Tensor of shape (d,)
        The scales ``S``.
    """
    variance = (covariance if covariance.ndim == 1 else covariance.diagonal()).clamp_min(0.0)
    informative = variance > _CONSTANT_VARIANCE * float(variance.max())
    if not bool(informative.any()):
        return torch.ones_like(variance)
    typical = variance[informative].median()
    return torch.where(informative, variance, typical).rsqrt()


def make_feature_metric(
    moments: FeatureMoments, centered: bool = True, ridge: float | None = None, full: bool | None = None
) -> FeatureMetric:
    """Whitening and penalty weights for the metric ``Sigma + ridge * diag(Sigma)``.

    Parameters
    ----------
    moments : FeatureMoments
        The layer's input moments.
    centered : bool, default=True
        Whether the layer has an intercept (the metric is then taken about
        the mean, see the module docstring); otherwise about 0.
    ridge : float, optional
        Ridge on the correlation form (by default the tuning's ``metric_ridge``).
    full : bool, optional
        Full whitening or the diagonal metric; by default full up to
        ``full_metric_max_features`` features. Diagonal moments (see
        :func:`feature_moments`) give the diagonal metric.

    Returns
    -------
    FeatureMetric
        In float64 on the moments' device. Cost O(d^3) (two ``eigh``) for
        the full metric, O(d) for the diagonal one.

    Raises
    ------
    ValueError
        When ``full`` asks the full metric of diagonal moments.
    """
    ridge = get_tuning().metric_ridge if ridge is None else ridge
    mean, covariance = moments.covariance(centered)
    scale = _scales(covariance)
    d = scale.shape[0]
    if full and moments.diagonal:
        raise ValueError("The full metric needs the full second moment, not its diagonal.")
    if moments.diagonal or (is_diagonal_metric(d) if full is None else not full):
        return FeatureMetric(mean, scale, 1.0 / scale, scale**2, scale)
    correlation = scale[:, None] * covariance * scale[None, :]
    correlation.diagonal().add_(ridge)
    eigenvalues, Q = torch.linalg.eigh(correlation)
    whitening = (scale[:, None] * Q) * eigenvalues.clamp_min(ridge).rsqrt()  # T0 = S Q D^{-1/2}
    # T0 = V diag(sigma) U^T, T = T0 U = V diag(sigma): see the module docstring.
    V, sigma, _ = torch.linalg.svd(whitening)
    V, sigma = V.flip(1), sigma.flip(0)  # ascending penalties
    transform = V * sigma
    return FeatureMetric(mean, transform, V.T / sigma[:, None], sigma * sigma, scale)


def whitened_params(metric: FeatureMetric, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the first layer of a head (``coef_0``, ``intercept_0``) into whitened coordinates.

    Returns
    -------
    dict of Tensor
        A new dict; the other entries are shared with ``params``.
    """
    coef, intercept = metric.weights_to_whitened(params[COEF], params.get(INTERCEPT))
    return _with_first_layer(params, coef, intercept)


def unwhitened_params(metric: FeatureMetric, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`whitened_params`: the first layer back in the features' coordinates.

    Returns
    -------
    dict of Tensor
        A new dict; the other entries are shared with ``params``.
    """
    coef, intercept = metric.weights_from_whitened(params[COEF], params.get(INTERCEPT))
    return _with_first_layer(params, coef, intercept)


def standardized_first_layer(params: dict[str, Tensor], mean: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """Rescale a freshly drawn first layer as if the features had been standardised.

    ``W <- W diag(scale)`` and ``b <- b - W mu``: the pre-activations then
    have the spread the initialisation was drawn for (Glorot assumes unit
    inputs), whatever the features' units, so ReLU units are not all dead
    from the start on raw features. A function of the data only (per-feature
    moments), not of a basis of the metric.

    Returns
    -------
    dict of Tensor
        A new dict; the other entries are shared with ``params``.
    """
    coef = params[COEF] * scale.to(params[COEF].dtype)
    intercept = params.get(INTERCEPT)
    intercept = None if intercept is None else intercept - coef @ mean.to(coef.dtype)
    return _with_first_layer(params, coef, intercept)


def _with_first_layer(params: dict[str, Tensor], coef: Tensor, intercept: Tensor | None) -> dict[str, Tensor]:
    out = dict(params, coef_0=coef)
    if intercept is not None:
        out[INTERCEPT] = intercept
    return out
