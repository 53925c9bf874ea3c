"""Tests of sklearn_fgn._margin against torch's own cross-entropy (float64)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import SEEDS

import sklearn_fgn._margin as margin_module
from sklearn_fgn._margin import (
    LogitCurvature,
    MarginStats,
    competitor_log_proba,
    curvature_weight,
    log_curvature_weight,
    loss_derivative,
    margin,
    margin_direction,
    per_example_loss,
    row_blocks,
)

N = 9
# n_logits: K >= 2 softmax heads, and 1 for the single-logit binary head.
N_LOGITS = [1, 2, 3, 5]


def _logits(n_logits, seed, scale=3.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(N, n_logits, generator=gen, dtype=torch.float64)
    y = torch.randint(0, max(n_logits, 2), (N,), generator=gen)
    return logits.to(dtype), y


def _reference_loss(logits, y):
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_logits", N_LOGITS)
def test_loss_of_margin_is_cross_entropy(n_logits, seed):
    logits, y = _logits(n_logits, seed)
    loss = per_example_loss(margin(logits, y))
    torch.testing.assert_close(loss, _reference_loss(logits, y), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_logits", N_LOGITS)
def test_gradient_of_margin_loss_matches_cross_entropy(n_logits, seed):
    logits, y = _logits(n_logits, seed)
    z = logits.clone().requires_grad_()
    (grad_margin,) = torch.autograd.grad(per_example_loss(margin(z, y)).sum(), z)
    (grad_ref,) = torch.autograd.grad(_reference_loss(z, y).sum(), z)
    torch.testing.assert_close(grad_margin, grad_ref, rtol=1e-12, atol=1e-14)
    # The closed form phi'(m) a used by the step is the same gradient.
    m = margin(logits, y)
    closed_form = loss_derivative(m)[:, None] * margin_direction(logits, y)
    torch.testing.assert_close(closed_form, grad_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_logits", N_LOGITS)
def test_margin_direction_is_jacobian_of_margin(n_logits, seed):
    logits, y = _logits(n_logits, seed)
    jac = torch.func.jacrev(lambda z: margin(z, y))(logits)  # (n, n, n_logits)
    per_example = jac[torch.arange(N), torch.arange(N)]
    torch.testing.assert_close(margin_direction(logits, y), per_example, rtol=1e-12, atol=1e-14)
    # m_i depends on z_i only.
    off_diagonal = jac.clone()
    off_diagonal[torch.arange(N), torch.arange(N)] = 0.0
    assert torch.count_nonzero(off_diagonal) == 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_logits", N_LOGITS)
def test_curvature_weight_is_py_times_one_minus_py(n_logits, seed):
    logits, y = _logits(n_logits, seed)
    if n_logits == 1:
        p_true = torch.where(y == 1, torch.sigmoid(logits[:, 0]), torch.sigmoid(-logits[:, 0]))
    else:
        p_true = torch.softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
    m = margin(logits, y)
    expected = p_true * (1 - p_true)
    torch.testing.assert_close(curvature_weight(m), expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(log_curvature_weight(m), expected.log(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(loss_derivative(m), -(1 - p_true), rtol=1e-12, atol=1e-15)
    # w is phi'' : the derivative of phi'(m), by autograd.
    mm = m.clone().requires_grad_()
    (second,) = torch.autograd.grad(loss_derivative(mm).sum(), mm)
    torch.testing.assert_close(curvature_weight(m), second, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_softmax_hessian_decomposition(n_classes, seed):
    logits, y = _logits(n_classes, seed)
    p = torch.softmax(logits, dim=1)
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    a = margin_direction(logits, y)
    q = competitor_log_proba(logits, y).exp()
    w = curvature_weight(margin(logits, y))
    p_true = p.gather(1, y[:, None])[:, 0]
    true_vs_rest = w[:, None, None] * a[:, :, None] * a[:, None, :]
    within = (1 - p_true)[:, None, None] * (torch.diag_embed(q) - q[:, :, None] * q[:, None, :])
    torch.testing.assert_close(true_vs_rest + within, hessian, rtol=0, atol=1e-12)
    assert torch.all(q.gather(1, y[:, None]) == 0)
    torch.testing.assert_close(q.sum(1), torch.ones(N, dtype=q.dtype), rtol=0, atol=1e-14)
    assert torch.linalg.eigvalsh(within).min() >= -1e-14
    if n_classes == 2:  # q is one-hot: the dropped term vanishes exactly
        assert torch.count_nonzero(within) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_logits", N_LOGITS)
def test_extreme_logits_stay_finite(n_logits, dtype):
    logits, y = _logits(n_logits, seed=7, scale=1.0, dtype=dtype)
    logits = torch.sign(logits) * 1e4  # every entry +-1e4: margins of 0 or +-2e4
    logits[0, 0] = -1e4
    m = margin(logits, y)
    assert m.dtype == dtype
    for value in (m, per_example_loss(m), curvature_weight(m), log_curvature_weight(m), loss_derivative(m)):
        assert torch.isfinite(value).all()
    assert (curvature_weight(m) >= 0).all() and (curvature_weight(m) <= 0.25).all()
    # Rounding of logits of size 1e4 limits the margin to ~eps * 1e4 absolute.
    eps = torch.finfo(dtype).eps
    reference = _reference_loss(logits, y)
    finite = torch.isfinite(reference)
    assert finite.any()
    tol = dict(rtol=8 * eps, atol=8 * eps * 1e4)
    torch.testing.assert_close(per_example_loss(m)[finite], reference[finite], **tol)
    exact = _reference_loss(logits.double(), y)
    torch.testing.assert_close(per_example_loss(m).double(), exact, **tol)
    # Badly misclassified rows: loss -m, log w about -|m|, nothing overflows.
    bad = m < -1e3
    assert bad.any()
    torch.testing.assert_close(per_example_loss(m)[bad], -m[bad], rtol=8 * eps, atol=0)
    torch.testing.assert_close(log_curvature_weight(m)[bad], m[bad], rtol=8 * eps, atol=0)
    if n_logits > 1:
        assert torch.isfinite(competitor_log_proba(logits, y).exp()).all()
        assert torch.isfinite(margin_direction(logits, y)).all()


def test_margin_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        margin(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        margin(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_logits", [2, 3, 5])
@pytest.mark.parametrize("scale", [3.0, 1e3])
def test_margin_stats_match_softmax_and_logsumexp(n_logits, seed, scale):
    # One masked softmax gives m (via max - log max q), a = e_y - q and
    # p = sigmoid(-m) q + sigmoid(m) e_y; compare with the direct formulas.
    logits, y = _logits(n_logits, seed, scale=scale)
    stats = MarginStats(logits, y)
    masked = logits.scatter(1, y[:, None], float("-inf"))
    expected_margin = logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(masked, dim=1)
    torch.testing.assert_close(stats.margin, expected_margin, rtol=1e-13, atol=1e-13 * scale)
    torch.testing.assert_close(stats.proba, torch.softmax(logits, dim=1), rtol=1e-12, atol=1e-300)
    expected_direction = -torch.softmax(masked, dim=1)
    expected_direction[torch.arange(N), y] = 1.0
    torch.testing.assert_close(stats.direction, expected_direction, rtol=1e-13, atol=1e-300)
    assert torch.isfinite(stats.margin).all() and torch.isfinite(stats.proba).all()


def test_margin_stats_single_logit_has_no_softmax():
    logits, y = _logits(1, 0)
    stats = MarginStats(logits, y)
    torch.testing.assert_close(stats.margin, margin(logits, y), rtol=0, atol=0)
    torch.testing.assert_close(stats.direction, margin_direction(logits, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiclass"):
        _ = stats.proba


@pytest.mark.parametrize("seed", SEEDS)
def test_row_blocks_give_the_whole_arrays_results(seed, monkeypatch):
    # Blocks of 2 rows (a remainder of 1 in N = 9) give the same margins, competitors, traces and
    # curvature along a step, bit for bit, as the whole arrays; with the direct formulas in float64.
    logits, y = _logits(5, seed)
    u = torch.randn(N, 5, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(seed + 9), dtype=torch.float64)
    results = []
    for entries in (10, 2**20):
        monkeypatch.setattr(margin_module, "_BLOCK_ENTRIES", entries)
        assert len(row_blocks(logits)) == (5 if entries == 10 else 1)
        stats = MarginStats(logits, y)
        curvature = LogitCurvature(stats, weights, "ggn")
        results.append((stats.margin, stats.proba, curvature.trace(), curvature.along(u)))
    for blocked, whole in zip(*results, strict=True):
        torch.testing.assert_close(blocked, whole, rtol=0, atol=0)
    p = torch.softmax(logits, dim=1)
    torch.testing.assert_close(results[0][2], weights * (1 - (p * p).sum(1)), rtol=1e-13, atol=1e-15)
    expected = weights * ((p * u * u).sum(1) - (p * u).sum(1) ** 2)
    torch.testing.assert_close(results[0][3], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_logits", [1, 2, 6])
@pytest.mark.parametrize("formed", [False, True])
def test_scaled_direction_is_the_scaled_margin_direction_exactly(n_logits, formed):
    # The gradient's coefficients without the direction's (n, K) array: the very same numbers.
    gen = torch.Generator().manual_seed(n_logits)
    logits = 5 * torch.randn(40, n_logits, generator=gen, dtype=torch.float64)
    y = torch.randint(0, max(n_logits, 2), (40,), generator=gen)
    scale = -torch.rand(40, generator=gen, dtype=torch.float64)
    stats = MarginStats(logits, y)
    if formed:
        stats.direction  # noqa: B018
    expected = scale[:, None] * margin_direction(logits, y)
    assert torch.equal(stats.scaled_direction(scale), expected)


@pytest.mark.parametrize("formed", [False, True])
def test_trace_and_along_read_the_probabilities_by_blocks_with_the_same_numbers(formed, monkeypatch):
    # Before the whole (n, K) proba is formed, each block of rows forms its own entries.
    monkeypatch.setattr(margin_module, "_BLOCK_ENTRIES", 7 * 6)  # blocks of 7 rows and a remainder
    gen = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 6, (40,), generator=gen)
    weights = torch.rand(40, generator=gen, dtype=torch.float64)
    u = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    stats = MarginStats(logits, y)
    if formed:
        stats.proba  # noqa: B018
    curvature = margin_module.LogitCurvature(stats, weights, "ggn")
    trace, along = curvature.trace(), curvature.along(u)
    assert ("proba" in stats.__dict__) == formed  # not formed by the blocks
    proba = torch.softmax(logits, 1)  # the dense float64 reference
    torch.testing.assert_close(trace, weights * (1 - (proba * proba).sum(1)), rtol=1e-12, atol=1e-15)
    hessian_along = (proba * u * u).sum(1) - (proba * u).sum(1) ** 2
    torch.testing.assert_close(along, weights * hessian_along, rtol=1e-12, atol=1e-15)
    whole = MarginStats(logits, y).proba
    for rows in margin_module.row_blocks(logits):  # the same formula: equal up to the last bit
        torch.testing.assert_close(stats.proba_rows(rows), whole[rows], rtol=4e-16, atol=0)
