"""Tests of sklearn_fgn._cg.conjugate_gradient on dense float64 systems."""

import pytest
import torch
from conftest import SEEDS

from sklearn_fgn._cg import CG_STOP_REASONS, CGResult, conjugate_gradient

N = 20


def _spd(n, seed, cond=10.0):
    """Random SPD matrix with eigenvalues log-spaced in [1, cond], and a random rhs.

    Moderate conditioning: in float64, rounding delays CG's finite termination
    on spread spectra (cond 100 leaves ~1e-5 after n steps), not at cond 10.
    """
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    A = (Q * eigenvalues) @ Q.T
    A = 0.5 * (A + A.T)
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    return A, rhs


class _Counted:
    """A matvec that counts its calls."""

    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        return self.A @ v


def _true_residual(A, x, rhs):
    return float(torch.linalg.vector_norm(rhs - A @ x) / torch.linalg.vector_norm(rhs))


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_solves_spd_system_within_n_iterations(seed):
    A, rhs = _spd(N, seed)
    matvec = _Counted(A)
    result = conjugate_gradient(matvec, rhs, tol=1e-10, max_iter=N)
    assert isinstance(result, CGResult)
    assert result.reason == "converged"
    assert 1 <= result.n_iter <= N
    assert matvec.calls == result.n_iter
    assert result.residual_norm <= 1e-10
    assert _true_residual(A, result.solution, rhs) <= 1e-10
    torch.testing.assert_close(result.solution, torch.linalg.solve(A, rhs), rtol=1e-10, atol=1e-12)
    assert result.solution.dtype == torch.float64 and result.solution.shape == rhs.shape


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_exact_in_n_steps_with_few_distinct_eigenvalues(seed):
    # Three distinct eigenvalues: CG is exact after 3 iterations.
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    eigenvalues = torch.tensor([1.0, 4.0, 30.0], dtype=torch.float64).repeat_interleave(
        torch.tensor([7, 7, 6])
    )
    A = (Q * eigenvalues) @ Q.T
    rhs = torch.randn(N, generator=gen, dtype=torch.float64)
    result = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-10, max_iter=N)
    assert result.reason == "converged" and result.n_iter <= 4
    assert _true_residual(A, result.solution, rhs) <= 1e-10


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_treats_matrix_shaped_rhs_as_flat_vector(seed):
    A, rhs = _spd(12, seed)
    shaped = rhs.reshape(4, 3)
    result = conjugate_gradient(lambda v: (A @ v.reshape(-1)).reshape(4, 3), shaped, tol=1e-10, max_iter=12)
    assert result.reason == "converged"
    assert result.solution.shape == (4, 3)
    torch.testing.assert_close(
        result.solution.reshape(-1), torch.linalg.solve(A, rhs), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("max_iter", [1, 3])
def test_cg_reports_max_iter_when_capped(max_iter):
    A, rhs = _spd(N, 0, cond=1e4)
    matvec = _Counted(A)
    result = conjugate_gradient(matvec, rhs, tol=1e-14, max_iter=max_iter)
    assert result.reason == "max_iter"
    assert result.n_iter == max_iter == matvec.calls
    # The recursive residual is the true one (to rounding) and not below tol.
    assert result.residual_norm == pytest.approx(_true_residual(A, result.solution, rhs), rel=1e-8)
    assert result.residual_norm > 1e-14


def test_cg_max_iter_zero_returns_start():
    A, rhs = _spd(N, 0)
    matvec = _Counted(A)
    result = conjugate_gradient(matvec, rhs, tol=1e-10, max_iter=0)
    assert result.reason == "max_iter" and result.n_iter == 0 == matvec.calls
    assert torch.count_nonzero(result.solution) == 0
    assert result.residual_norm == pytest.approx(1.0)


@pytest.mark.parametrize("with_x0", [False, True])
def test_cg_zero_rhs(with_x0):
    A, _ = _spd(N, 1)
    matvec = _Counted(A)
    x0 = torch.ones(N, dtype=torch.float64) if with_x0 else None
    result = conjugate_gradient(matvec, torch.zeros(N, dtype=torch.float64), x0=x0)
    assert result.reason == "zero_rhs"
    assert result.n_iter == 0 and matvec.calls == 0
    assert result.residual_norm == 0.0
    assert torch.count_nonzero(result.solution) == 0 and result.solution.shape == (N,)


@pytest.mark.parametrize(
    "diagonal, rhs",
    [
        ([-1.0, -2.0, -3.0], [1.0, 1.0, 1.0]),  # negative definite
        ([1.0, -2.0, 3.0], [1.0, 1.0, 0.0]),  # indefinite: p'Ap = 1 - 2 < 0
        ([1.0, 0.0, 2.0], [0.0, 1.0, 0.0]),  # singular, rhs in the null space: p'Ap = 0
    ],
    ids=["negative", "indefinite", "singular"],
)
def test_cg_detects_nonpositive_curvature_at_first_step(diagonal, rhs):
    A = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    result = conjugate_gradient(
        lambda v: A @ v, torch.tensor(rhs, dtype=torch.float64), tol=1e-10, max_iter=10
    )
    assert result.reason == "nonpositive_curvature"
    assert result.n_iter == 1
    assert torch.count_nonzero(result.solution) == 0  # the iterate before the bad direction
    assert result.residual_norm == pytest.approx(1.0)
    assert torch.isfinite(result.solution).all()


def test_cg_detects_nonpositive_curvature_later():
    # Positive along rhs, negative curvature found at the second direction.
    A = torch.diag(torch.tensor([4.0, -1.0], dtype=torch.float64))
    rhs = torch.tensor([1.0, 1.0], dtype=torch.float64)  # p'Ap = 3 > 0 first
    result = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-12, max_iter=10)
    assert result.reason == "nonpositive_curvature"
    assert result.n_iter == 2
    first_iterate = (2.0 / 3.0) * rhs  # x_1 = (r'r / p'Ap) rhs
    torch.testing.assert_close(result.solution, first_iterate, rtol=1e-14, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_warm_start_at_solution_returns_immediately(seed):
    A, rhs = _spd(N, seed)
    solution = torch.linalg.solve(A, rhs)
    x0 = solution.clone()
    result = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-10, max_iter=N, x0=x0)
    assert result.reason == "converged"
    assert result.n_iter == 0
    assert result.residual_norm <= 1e-10
    assert torch.equal(result.solution, solution)
    assert torch.equal(x0, solution)  # x0 not modified in place


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_warm_start_elsewhere_still_converges(seed):
    A, rhs = _spd(N, seed)
    x0 = torch.linalg.solve(A, rhs) + 0.1 * torch.randn(
        N, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    result = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-10, max_iter=N, x0=x0)
    assert result.reason == "converged"
    assert _true_residual(A, result.solution, rhs) <= 1e-10


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_repeated_calls_are_bit_identical(seed):
    A, rhs = _spd(N, seed)
    first = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-9, max_iter=N)
    second = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-9, max_iter=N)
    assert torch.equal(first.solution, second.solution)
    assert (first.n_iter, first.residual_norm, first.reason) == (
        second.n_iter,
        second.residual_norm,
        second.reason,
    )


def test_cg_loose_tolerance_stops_early():
    # cond 1e2: 1e-2 takes about half of the N iterations that 1e-10 takes (at
    # cond 1e3 it took 19 of 20, so rounding alone could push it to the cap).
    A, rhs = _spd(N, 0, cond=1e2)
    result = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-2, max_iter=N)
    tight = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-10, max_iter=5 * N)
    assert result.reason == "converged" and tight.reason == "converged"
    assert result.n_iter < 0.75 * tight.n_iter
    assert result.residual_norm <= 1e-2
    assert _true_residual(A, result.solution, rhs) <= 1e-2 * 1.0001


def test_cg_stop_reasons_are_exactly_the_reasons_cg_returns():
    # One small system per way to stop: the constant names each outcome, and nothing else.
    A, rhs = _spd(N, 0)
    ill_conditioned, _ = _spd(N, 0, cond=1e7)
    A32, inverse32 = ill_conditioned.float(), torch.linalg.inv(ill_conditioned).float()

    def reason(A, rhs, **kwargs):
        return conjugate_gradient(lambda v: A @ v, rhs, **kwargs).reason

    reached = {
        reason(A, rhs, tol=1e-10, max_iter=N),  # converged
        reason(A, rhs, tol=1e-14, max_iter=1),  # max_iter
        reason(A, torch.zeros_like(rhs)),  # zero_rhs
        reason(-A, rhs),  # nonpositive_curvature
        reason(A32, rhs.float(), tol=1e-9, max_iter=50, preconditioner=lambda r: inverse32 @ r),  # stagnated
        reason(A, torch.full_like(rhs, float("inf"))),  # nonfinite
    }
    assert reached == set(CG_STOP_REASONS)


def test_cg_reports_overflow_instead_of_a_zero_step():
    # p'Ap = inf made the step length 0 and CG "stagnated" at x = 0, which
    # the fit then took for convergence (float32 iris features scaled by 1e10).
    rhs = torch.tensor([1e18, 1e18], dtype=torch.float32)
    result = conjugate_gradient(lambda v: 1e20 * v, rhs, tol=1e-6, max_iter=10)
    assert result.reason == "nonfinite" and result.n_iter == 1
    assert torch.count_nonzero(result.solution) == 0
    bad_rhs = torch.tensor([float("inf"), 1.0])
    assert conjugate_gradient(lambda v: v, bad_rhs).reason == "nonfinite"
    # Overflow at the second direction keeps the first iterate: x_1 = rhs
    # (r'r / p'Ap rounds to 1 in float32) with residual (0, -3e8), then p'Ap = inf.
    A = torch.diag(torch.tensor([1.0, 3e38]))
    rhs = torch.tensor([1.0, 1e-30])
    later = conjugate_gradient(lambda v: A @ v, rhs, tol=0.0, max_iter=10)
    assert later.reason == "nonfinite" and later.n_iter == 2
    assert torch.equal(later.solution, rhs)
    assert later.residual_norm == pytest.approx(3e8, rel=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_float32_cg_stops_when_the_iterate_stops_moving(seed, monkeypatch, tune):
    # cond 1e7 in float32 with an exact (float32) inverse as preconditioner:
    # after a few iterations the updates are round-off of x, and the recursive
    # residual is no longer the true one. Stopping there loses nothing
    # against running on.
    A, rhs = _spd(N, seed, cond=1e7)
    A32, rhs32, inverse32 = A.float(), rhs.float(), torch.linalg.inv(A).float()
    exact = torch.linalg.solve(A32.double(), rhs32.double())  # of the float32 system

    def solve():
        return conjugate_gradient(
            lambda v: A32 @ v, rhs32, tol=1e-9, max_iter=50, preconditioner=lambda r: inverse32 @ r
        )

    def error(x):
        return float(torch.linalg.vector_norm(x.double() - exact) / torch.linalg.vector_norm(exact))

    result = solve()
    assert result.reason == "stagnated" and result.n_iter <= 6
    assert result.solution.dtype == torch.float32
    tune(stagnation_ulps=0.0)
    longer = solve()
    assert longer.n_iter > result.n_iter
    assert error(result.solution) <= 1.1 * error(longer.solution)
    # The same system in float64 converges; the stop never fires there.
    inverse = torch.linalg.inv(A)
    result64 = conjugate_gradient(
        lambda v: A @ v, rhs, tol=1e-9, max_iter=50, preconditioner=lambda r: inverse @ r
    )
    assert result64.reason == "converged" and result64.n_iter <= 2


@pytest.mark.parametrize("seed", SEEDS)
def test_preconditioned_cg_solves_badly_scaled_system(seed):
    # D A D with D spanning 1e-2..1e2: Jacobi preconditioning undoes the scaling.
    A, rhs = _spd(N, seed)
    D = torch.logspace(-2, 2, N, dtype=torch.float64)
    scaled = D[:, None] * A * D[None, :]
    diagonal = torch.diagonal(scaled)
    matvec = _Counted(scaled)
    result = conjugate_gradient(matvec, rhs, tol=1e-9, max_iter=N, preconditioner=lambda r: r / diagonal)
    assert result.reason == "converged" and result.n_iter <= N
    assert _true_residual(scaled, result.solution, rhs) <= 1e-9
    # The stopping test is on the unpreconditioned residual.
    assert result.residual_norm == pytest.approx(_true_residual(scaled, result.solution, rhs), rel=1e-2)
    unpreconditioned = conjugate_gradient(lambda v: scaled @ v, rhs, tol=1e-9, max_iter=N)
    assert unpreconditioned.reason == "max_iter"  # so the preconditioner is what makes it work


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_with_exact_inverse_preconditioner_takes_one_iteration(seed):
    A, rhs = _spd(N, seed, cond=1e4)
    inverse = torch.linalg.inv(A)
    result = conjugate_gradient(
        lambda v: A @ v, rhs, tol=1e-10, max_iter=N, preconditioner=lambda r: inverse @ r
    )
    assert result.reason == "converged" and result.n_iter == 1
    torch.testing.assert_close(result.solution, torch.linalg.solve(A, rhs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_identity_preconditioner_is_plain_cg(seed):
    A, rhs = _spd(N, seed)
    plain = conjugate_gradient(lambda v: A @ v, rhs, tol=1e-9, max_iter=N)
    identity = conjugate_gradient(
        lambda v: A @ v, rhs, tol=1e-9, max_iter=N, preconditioner=lambda r: r.clone()
    )
    assert plain.n_iter == identity.n_iter
    torch.testing.assert_close(plain.solution, identity.solution, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tol", [1e-1, 1e-10])
def test_cg_image_is_second_map_of_the_solution(seed, tol):
    # image_matvec returns (A v, B v); CG accumulates B x along its iterates.
    A, rhs = _spd(N, seed)
    B = torch.randn(7, N, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    plain = conjugate_gradient(_Counted(A), rhs, tol=tol, max_iter=N)
    tracked = conjugate_gradient(None, rhs, tol=tol, max_iter=N, image_matvec=lambda v: (A @ v, B @ v))
    assert plain.image is None
    assert torch.equal(tracked.solution, plain.solution) and tracked.n_iter == plain.n_iter
    torch.testing.assert_close(tracked.image, B @ tracked.solution, rtol=1e-12, atol=1e-12)


def test_cg_image_needs_zero_start():
    A, rhs = _spd(N, 0)
    with pytest.raises(ValueError, match="x0"):
        conjugate_gradient(None, rhs, x0=rhs, image_matvec=lambda v: (A @ v, v))
