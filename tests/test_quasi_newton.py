"""Quasi-Newton steps of full-batch linear fits (issue 33; docs/design.md §11).

The direction is the L-BFGS inverse of the fit's secant pairs on top of a
scaled model of the curvature: checked against the dense BFGS recursion in
float64. The step is the whole batch's model minimiser along it, and a fit
that takes such steps reaches the optimum of the Newton-only fit and of
scikit-learn's ``LogisticRegression``.
"""

import math
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cases import dense_ggn, flatten
from conftest import SEEDS
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from test_step import _system
from test_subsample import _objective

import sklearn_fgn._step as step_module
import sklearn_fgn._stepper as stepper_module
from sklearn_fgn import FGNClassifier
from sklearn_fgn._damping import StepRecord
from sklearn_fgn._quasi_newton import SecantMemory
from sklearn_fgn._solver import LoopConfig
from sklearn_fgn._step import compute_step
from sklearn_fgn._stepper import Stepper, StepperState, _choose_direction, _track_full_batch_step
from sklearn_fgn._stopping import full_batch_converged, geometric_tail
from sklearn_fgn._system import StepOptions
from sklearn_fgn._tuning import get_tuning


def _quadratic(seed, P=12):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(P, P, generator=g, dtype=torch.float64)
    A = Q @ Q.T + 0.1 * torch.eye(P, dtype=torch.float64)
    b = torch.randn(P, generator=g, dtype=torch.float64)
    points = [torch.randn(P, generator=g, dtype=torch.float64) for _ in range(5)]
    return A, b, points


def _observe(memory, point, gradient):
    memory.observe({"w": point}, {"w": gradient})


@pytest.mark.parametrize("seed", SEEDS)
def test_two_loop_direction_is_the_dense_bfgs_inverse(seed):
    # H_{j+1} = (I - rho s y') H_j (I - rho y s') + rho s s', H_0 = gamma M^{-1}, gamma = s'y / y'M^{-1}y
    # of the latest pair (Nocedal and Wright 7.4, 7.20): the recursion written densely.
    A, b, points = _quadratic(seed)
    P = A.shape[0]
    m_diag = torch.linspace(0.5, 3.0, P, dtype=torch.float64)
    memory = SecantMemory(size=3)
    for point in points:
        _observe(memory, point, A @ point - b)
    g = A @ points[-1] - b
    steps = [points[j + 1] - points[j] for j in range(len(points) - 1)][-3:]
    pairs = [(s, A @ s) for s in steps]
    s_last, y_last = pairs[-1]
    gamma = float(s_last @ y_last) / float(y_last @ (y_last / m_diag))
    H = torch.diag(gamma / m_diag)
    eye = torch.eye(P, dtype=torch.float64)
    for s, y in pairs:
        rho = 1.0 / float(s @ y)
        H = (eye - rho * torch.outer(s, y)) @ H @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    direction = memory.direction(g, lambda r: r / m_diag)
    torch.testing.assert_close(direction, -H @ g, rtol=1e-10, atol=1e-12)
    assert len(memory.pairs) == 3  # the last three of four pairs


@pytest.mark.parametrize("seed", SEEDS)
def test_the_inverse_satisfies_the_latest_secant_equation(seed):
    # H y = s for the newest pair, whatever H_0: the defining property of the BFGS update.
    A, b, points = _quadratic(seed)
    memory = SecantMemory(size=10)
    for point in points:
        _observe(memory, point, A @ point - b)
    s, y = points[-1] - points[-2], A @ (points[-1] - points[-2])
    torch.testing.assert_close(-memory.direction(y, lambda r: 2.0 * r), s, rtol=1e-9, atol=1e-11)


def test_pairs_without_positive_curvature_are_dropped_and_no_pairs_is_the_model_step():
    memory = SecantMemory(size=5)
    _observe(memory, torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    # s = e1, y = -e1: s'y < 0, a pair that would make H indefinite.
    _observe(memory, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert len(memory.pairs) == 0
    g = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(memory.direction(g, lambda r: r / 4.0), -g / 4.0, rtol=0, atol=0)


def test_the_model_of_h0_is_rebuilt_every_refresh_directions_and_after_a_newton_step():
    memory, builds = SecantMemory(3), []

    def build():
        builds.append(len(builds))
        return lambda r: r * (len(builds) + 1.0)

    applied = [memory.inverse_model(build, refresh=2)(torch.ones(1)) for _ in range(5)]
    assert len(builds) == 3 and [float(a) for a in applied] == [2.0, 2.0, 3.0, 3.0, 4.0]
    memory.forget_model()
    memory.inverse_model(build, refresh=2)
    assert len(builds) == 4


@pytest.mark.parametrize("seed", SEEDS)
def test_quasi_newton_step_is_the_whole_batch_model_minimiser_along_its_direction(seed):
    # The step's logits move by exactly J delta, its curvature is the dense GGN's along it plus the
    # penalty's, and its length is where the model t slope + t^2 c / 2 is least: slope + c = 0.
    system = _system(seed)
    head, params, X, y = system.head, system.params, system.X, system.y
    options = StepOptions(alpha=system.coefficients, damping=1e-4, curvature="ggn", secant=SecantMemory(5))
    moved = {k: v + 0.01 * torch.randn_like(v, generator=torch.Generator().manual_seed(seed)) for k, v in
             params.items()}  # fmt: skip
    weights = system.weights * y.shape[0]  # any positive sample weights: the same normalised omega
    compute_step(head, moved, X, y, weights, options)  # the first observation
    qn = replace(options, quasi_newton=True)
    result = compute_step(head, params, X, y, weights, qn)
    assert result.direction == "quasi-newton" and result.solve.n_iter == 0
    assert len(qn.secant.pairs) == 1
    delta = result.step
    torch.testing.assert_close(result.logits_step, X @ delta["coef_0"].T + delta["intercept_0"])
    G = dense_ggn(head, params, X, y, system.weights)
    flat = flatten(delta)
    penalty = float((system.coefficients["coef_0"] * delta["coef_0"] ** 2).sum())
    assert float(result.step_curvature) == pytest.approx(float(flat @ G @ flat) + penalty, rel=1e-10)
    assert float(result.slope) == pytest.approx(float(flatten(result.gradient) @ flat), rel=1e-12)
    assert float(result.slope) < 0.0
    assert float(result.slope + result.step_curvature) == pytest.approx(0.0, abs=1e-12 * -float(result.slope))
    assert float(result.predicted_decrease) == pytest.approx(-0.5 * float(result.slope), rel=1e-12)


def test_a_direction_that_is_no_descent_falls_back_to_the_model_step_and_forgets_the_pairs():
    # Pairs are kept only with s'y > 0; round-off could still give an ascent direction. Planted here: a pair
    # with s'y < 0 makes -H g point uphill, and the step must be -M^-1 g (Lambda^-1 here) scaled instead.
    system = _system(0)
    head, params, X, y = system.head, system.params, system.X, system.y
    memory = SecantMemory(5)
    g = flatten(system.gradient)
    memory.pairs.append((g.clone(), -4.0 * g, -1.0 / (4.0 * float(g @ g))))
    memory._last = (flatten(params).clone(), g.clone())  # observed at this very point: no new pair
    options = StepOptions(alpha=system.coefficients, damping=1e-4, curvature="ggn", secant=memory,
                          quasi_newton=True)  # fmt: skip
    result = compute_step(head, params, X, y, system.weights * y.shape[0], options)
    assert len(memory.pairs) == 0 and memory._last is not None
    lam = flatten({k: torch.zeros_like(v) + system.damping[k] for k, v in system.gradient.items()})
    expected = -g / lam
    expected_coef = expected[: params["coef_0"].numel()].reshape(params["coef_0"].shape)
    direction = result.step["coef_0"]
    cosine = float((direction * expected_coef).sum() / (direction.norm() * expected_coef.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-12) and float(result.slope) < 0.0


def _spy(monkeypatch, owner, name, original, read):
    """Replace ``owner.name`` by ``original`` that also records ``read(result)`` of every call, in order."""
    seen = []

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(read(result))
        return result

    monkeypatch.setattr(owner, name, spy)
    return seen


@pytest.fixture
def directions(monkeypatch):
    """The direction of every step the fits of the test compute, in order."""
    return _spy(monkeypatch, stepper_module, "compute_step", step_module.compute_step, lambda r: r.direction)


def _fit(X, y, alpha, **params):
    params = {"batch_size": None, "tol": 1e-10, "max_iter": 500, "random_state": 0, **params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FGNClassifier(alpha=alpha, **params).fit(X, y)


@pytest.mark.parametrize(
    "n_classes, C, standardise", [(2, 1.0, True), (5, 1.0, False), (5, 100.0, True), (30, 10.0, True)]
)
def test_fit_with_quasi_newton_steps_reaches_the_newton_and_logistic_regression_optimum(
    n_classes, C, standardise, tune, directions
):
    X, y = make_classification(n_samples=3000, n_features=12, n_informative=8, n_classes=n_classes,
                               n_clusters_per_class=1, class_sep=2.0, random_state=n_classes)  # fmt: skip
    if not standardise:
        X = X * np.logspace(-2, 1, 12) + 3.0
    tune(quasi_newton_after_passes=math.inf)
    newton = _fit(X, y, 1.0 / C)
    tune(quasi_newton_after_passes=-1.0, quasi_newton_min_work=0.0)  # every Newton step counts as expensive
    mixed = _fit(X, y, 1.0 / C)
    assert directions[0] == "newton" and directions.count("quasi-newton") >= 3
    reference = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=500).fit(X, y)
    f_mixed, f_newton = _objective(mixed, X, y, 1.0 / C), _objective(newton, X, y, 1.0 / C)
    f_ref = _objective(reference, X, y, 1.0 / C)
    assert abs(f_mixed - f_newton) <= 1e-8 * f_newton
    assert f_mixed <= f_ref * (1 + 1e-8)
    np.testing.assert_allclose(mixed.predict_proba(X), reference.predict_proba(X), rtol=0, atol=1e-4)


def test_default_fit_reaches_the_optimum_at_its_tolerance(tune):
    # A fit that takes quasi-Newton steps stops within tol of the optimum (here far within it).
    X, y = make_classification(n_samples=3000, n_features=20, n_informative=12, n_classes=8,
                               n_clusters_per_class=1, class_sep=3.0, random_state=0)  # fmt: skip
    tight = _fit(X, y, 1.0)
    tune(quasi_newton_after_passes=-1.0, quasi_newton_min_work=0.0)
    fit = _fit(X, y, 1.0, tol=1e-6)
    f_fit, f_tight = _objective(fit, X, y, 1.0), _objective(tight, X, y, 1.0)
    assert 0.0 <= (f_fit - f_tight) / f_tight <= 1e-6


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_tight_tol_ends_on_newton_steps_as_exact_as_newton_alone(dtype, tune, directions):
    # Below last_step_min_tol a run hands over to Newton steps (its tail below tol, or its decrease below
    # the objective's resolution), solved to the gap: the coefficients are exact where the objective is
    # flat. A run's own stop left probabilities 1e-4 from LogisticRegression's on this problem.
    X, y = make_classification(n_samples=4000, n_features=30, n_informative=20, n_classes=12,
                               n_clusters_per_class=1, class_sep=3.0, random_state=3)  # fmt: skip
    w = np.random.default_rng(0).uniform(0.2, 3.0, len(y))
    tune(quasi_newton_after_passes=-1.0, quasi_newton_min_work=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = FGNClassifier(alpha=1.0, batch_size=None, tol=1e-8, max_iter=500, random_state=0,
                            class_weight="balanced").fit(X.astype(dtype), y, sample_weight=w)  # fmt: skip
    reference = LogisticRegression(C=1.0, tol=1e-12, max_iter=5000, class_weight="balanced")
    reference.fit(X, y, sample_weight=w)
    assert directions.count("quasi-newton") >= 10 and directions[-1] == "newton"
    np.testing.assert_allclose(fit.predict_proba(X), reference.predict_proba(X), rtol=0, atol=2e-5)


@pytest.mark.parametrize("min_work, batch_size, hidden, expected", [
    (0.0, None, (), True),
    (3000 * 12 * 5 + 1, None, (), False),  # a pass below the work that pays: Newton steps alone
    (0.0, 256, (), False),  # mini-batches
    (0.0, None, (4,), False),  # an MLP head
])  # fmt: skip
def test_quasi_newton_steps_only_in_full_batch_linear_fits_of_enough_work(
    min_work, batch_size, hidden, expected, tune, monkeypatch
):
    X, y = make_classification(n_samples=3000, n_features=12, n_informative=8, n_classes=5, random_state=0)
    tune(quasi_newton_min_work=min_work)
    seen = _spy(monkeypatch, Stepper, "for_fit", Stepper.for_fit, lambda stepper: stepper.quasi_newton)
    _fit(X, y, 1.0, batch_size=batch_size, hidden_layer_sizes=hidden, max_iter=2)
    assert seen and all(flag is expected for flag in seen)


def _qn_record(predicted, loss=1.0, ratio=1.0, accepted=True):
    return StepRecord(loss, loss - predicted, accepted, 1e-8, "ggn", 0, predicted, ratio, 1.0,
                      direction="quasi-newton")  # fmt: skip


@pytest.mark.parametrize("rate, expected", [
    (0.5, True),  # tail p r / (1 - r) = p = 5e-5 <= tol
    (0.8, False),  # tail 4 p = 2e-4 > tol
    (math.inf, False),  # no rate yet: nothing bounds the gap
    (1.2, False),  # decreases growing
])  # fmt: skip
def test_quasi_newton_steps_stop_on_the_geometric_tail_at_the_slowest_rate(rate, expected):
    cfg = LoopConfig(alpha=0.0, tol=1e-4)
    gap = geometric_tail(5e-5, rate)  # the Stepper's estimate after this step
    record = _qn_record(5e-5)
    assert full_batch_converged(record, cfg, torch.float64, previous=1e-4, gap_estimate=gap) is expected
    # Newton's rule (a superlinear decrease, here 0.5 of the previous one is not) asks more.
    newton = StepRecord(1.0, 1.0 - 5e-5, True, 1e-8, "ggn", 3, 5e-5, 1.0, 0.01)
    assert full_batch_converged(newton, cfg, torch.float64, previous=1e-4, gap_estimate=gap) is False
    # A run that took less than the objective's resolution (float32: 1.2e-7) over its last steps together
    # ends the fit whatever the tail, where the model promised no more than tol: the objective resolves no
    # further progress. One such decrease alone does not: a slow run's can fall below it by round-off.
    noisy = geometric_tail(1e-9, 2.0)  # ratios of round-off decreases: no estimate
    run = dict(gap_estimate=noisy, run_decrease=6e-9)
    assert full_batch_converged(_qn_record(1e-9), cfg, torch.float32, 1e-4, **run) is True
    assert full_batch_converged(_qn_record(1e-9), cfg, torch.float32, 1e-4, gap_estimate=noisy) is False
    assert full_batch_converged(_qn_record(1e-9), cfg, torch.float64, 1e-4, **run) is False
    promised = StepRecord(1.0, 1.0 - 1e-9, True, 1e-8, "ggn", 0, 1e-3, 1e-6, 1.0, direction="quasi-newton")
    assert full_batch_converged(promised, cfg, torch.float32, 1e-4, **run) is False
    # An unresolved decrease's ratio is noise: the tail of the predicted decreases (finite here) decides.
    untrusted = _qn_record(1e-9, ratio=0.0)
    assert full_batch_converged(untrusted, cfg, torch.float32, 1e-4, gap_estimate=2e-9) is True
    assert full_batch_converged(untrusted, cfg, torch.float32, 1e-4, gap_estimate=2e-4) is False
    # Below last_step_min_tol it does not (a Newton step follows the run, solved to the gap).
    tight = LoopConfig(alpha=0.0, tol=1e-8)
    assert full_batch_converged(_qn_record(1e-9), tight, torch.float32, 1e-4, **run) is False


def test_a_run_estimates_the_gap_by_the_geometric_tail_of_its_decreases(tune):
    # Decreases halving: the tail p r / (1 - r) = p.
    tune(quasi_newton_rate_window=3)
    state = StepperState()
    for p in (8e-4, 4e-4, 2e-4):
        _track_full_batch_step(state, _qn_record(p), True, torch.float64)
    assert state.slowest_rate(resolution=0.0) == pytest.approx(0.5)
    assert state.gap_estimate == pytest.approx(2e-4)
    _track_full_batch_step(state, _qn_record(1e-4), True, torch.float64)
    assert state.gap_estimate == pytest.approx(1e-4)
    # A Newton step resets the run and takes the Newton decreases the forcing term reads.
    _track_full_batch_step(state, StepRecord(1.0, 1.0 - 5e-5, True, 1e-8, "ggn", 3, 5e-5, 1.0, 0.1), True,
                           torch.float64)  # fmt: skip
    assert state.recent_decreases == () and state.last_relative_decrease == pytest.approx(5e-5)


def test_an_unresolved_run_estimates_the_gap_from_its_predicted_decreases(tune):
    # float32 resolves relative decreases down to 1.2e-7. Taken decreases of 5e-8, round-off, leave the
    # estimate to the predicted ones: halving, their tail is the last one; flat, there is no estimate.
    tune(quasi_newton_rate_window=3)
    state = StepperState()
    for p in (8e-8, 4e-8, 2e-8):
        _track_full_batch_step(state, _qn_record(p, ratio=0.6), True, torch.float32)
    assert state.recent_predicted == (8e-8, 4e-8, 2e-8)
    assert state.gap_estimate == pytest.approx(2e-8)
    state = StepperState()
    for p in (5e-8, 6e-8, 5e-8):
        _track_full_batch_step(state, _qn_record(p, ratio=1.0), True, torch.float32)
    assert state.gap_estimate == math.inf
    # Resolved decreases (float64) keep the estimate on those taken: here taken half of those predicted.
    state = StepperState()
    for p in (8e-8, 4e-8, 2e-8):
        record = _qn_record(p)
        _track_full_batch_step(state, replace(record, new_loss=record.loss - p / 2), True, torch.float64)
    assert state.recent_decreases == pytest.approx((4e-8, 2e-8, 1e-8))
    assert state.gap_estimate == pytest.approx(1e-8)


def _outcome(direction, n_iter=0, reason="converged", build=0.0):
    return SimpleNamespace(direction=direction, solve=SimpleNamespace(n_iter=n_iter, reason=reason),
                           preconditioner_products=build)  # fmt: skip


def test_choice_of_direction_follows_the_measured_gain_per_pass(tune):
    tune(quasi_newton_after_passes=8.0, quasi_newton_rate_window=3)
    state = StepperState()
    # A cheap Newton step: no quasi-Newton step follows.
    state.last_relative_decrease, state.gap_estimate = 1e-2, 1e-3
    _choose_direction(state, _outcome("newton", 3), _qn_record(1e-2), share=1.0, resolution=1e-12)
    assert not state.quasi_newton
    assert state.newton_gain == pytest.approx(math.log10(11.0) / 7.0)
    # An expensive one (40 products): quasi-Newton steps are tried (no measure of them yet).
    _choose_direction(state, _outcome("newton", 40), _qn_record(1e-2), share=1.0, resolution=1e-12)
    assert state.quasi_newton and state.newton_gain == pytest.approx(math.log10(11.0) / 81.0)
    # ... unless on a curvature sample, where 30 products on a tenth of the rows cost 8 passes (7, and
    # the JVP on every row that gives the whole batch's model along the step).
    _choose_direction(state, _outcome("newton", 30), _qn_record(1e-2), share=0.1, resolution=1e-12)
    assert not state.quasi_newton
    assert state.newton_gain == pytest.approx(math.log10(11.0) / 8.0)
    # A preconditioner's build counts as the products it costs: 3 products and a build of 4 are 15 passes.
    _choose_direction(state, _outcome("newton", 3, build=4.0), _qn_record(1e-2), share=1.0, resolution=1e-12)
    assert state.quasi_newton and state.newton_gain == pytest.approx(math.log10(11.0) / 15.0)
    # A run whose decreases shrink by 0.5 per step gains log10(2) / 2 per pass: it goes on.
    state.newton_gain = 0.01
    state.recent_decreases = (32e-3, 16e-3, 8e-3, 4e-3, 2e-3, 1e-3)
    _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-3), share=1.0, resolution=1e-12)
    assert state.quasi_newton and state.quasi_newton_gain == pytest.approx(math.log10(2.0) / 2.0)
    # One shrinking by 0.99 per step gains less than half the Newton step did: back to Newton ...
    state.recent_decreases = tuple(1e-3 * 0.99**j for j in range(6))
    _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-3), share=1.0, resolution=1e-12)
    assert not state.quasi_newton
    # ... and an expensive Newton step gaining more per pass than that run stays Newton.
    state.last_relative_decrease, state.gap_estimate = 1e-3, 1e-4
    _choose_direction(state, _outcome("newton", 20), _qn_record(1e-3), share=1.0, resolution=1e-12)
    assert not state.quasi_newton
    # A rejected quasi-Newton step returns the fit to Newton steps.
    state.quasi_newton, state.quasi_newton_gain, state.recent_decreases = True, math.inf, ()
    rejected = _qn_record(1e-3, accepted=False)
    _choose_direction(state, _outcome("quasi-newton"), rejected, share=1.0, resolution=1e-12)
    assert not state.quasi_newton
    _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-3), share=1.0, resolution=1e-12)
    assert state.quasi_newton
    # One decrease below the resolution alone does not end the run; a window of them summing below it does.
    state.recent_decreases = (1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-8)
    state.taken = (1e-3, 1e-8)  # as _track_full_batch_step leaves it: rates read off the predicted ones
    _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-8), share=1.0, resolution=1e-7)
    assert state.quasi_newton
    state.recent_decreases = (1e-8,) * 6
    _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-8), share=1.0, resolution=1e-7)
    assert not state.quasi_newton


def test_a_run_reads_its_rate_from_sums_of_decreases_and_goes_on_within_a_share_of_newton(tune):
    # Decreases that alternate about a trend of 0.8 per step (a ratio of consecutive ones above 1, which
    # a ratio of two single decreases would read as no gain): the sums of two windows of three read
    # 0.8^3 exactly, -log10(0.8) / 2 = 0.048 per pass; kept at a first reading against a Newton gain of
    # 0.09 (within 1/2 of it), not against 0.1.
    tune(quasi_newton_rate_window=3, quasi_newton_keep_share=0.5)
    trend = [0.8**j for j in range(6)]
    wobble = [1.0, 0.5, 1.5] * 2
    decreases = tuple(1e-3 * t * w for t, w in zip(trend, wobble, strict=True))
    assert decreases[2] > decreases[1]
    for newton_gain, expected in ((0.09, True), (0.1, False)):
        state = StepperState(recent_decreases=decreases, newton_gain=newton_gain)
        _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-4), share=1.0, resolution=1e-12)
        assert state.quasi_newton_gain == pytest.approx(-math.log10(0.8) / 2.0)
        assert state.quasi_newton is expected
    # Below the Newton gain but within half of it: the run goes on for one reading, not two in a row;
    # a reading at or above it in between starts the count again.
    tune(quasi_newton_behind=2)
    state = StepperState(recent_decreases=decreases, newton_gain=0.06)
    for expected in (True, False):
        _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-4), share=1.0, resolution=1e-12)
        assert state.quasi_newton is expected
    state = StepperState(recent_decreases=decreases, newton_gain=0.06)
    for newton_gain, expected in ((0.06, True), (0.04, True), (0.06, True), (0.06, False)):
        state.newton_gain = newton_gain
        _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-4), share=1.0, resolution=1e-12)
        assert state.quasi_newton is expected
    # Before two windows, no gain is read: the run goes on at the gain it had.
    state = StepperState(recent_decreases=decreases[:5], newton_gain=1.0)
    _choose_direction(state, _outcome("quasi-newton"), _qn_record(1e-4), share=1.0, resolution=1e-12)
    assert state.quasi_newton_gain == math.inf and state.quasi_newton


def test_a_truncated_newton_step_hands_over_at_the_gain_its_decrease_shows(tune):
    # A Newton step whose CG hit its cap is no Newton step: quasi-Newton steps follow, and the Newton
    # gain they must beat is at most the decades of the gap that its decrease, against the step's
    # before it, shows per pass: -log10(1e-3 / 1e-2) / 7 for 3 products on all rows (its own estimate,
    # log10(1 + 1e-3 / 1e-9) / 7, is far above).
    tune(quasi_newton_after_passes=8.0)
    state = StepperState()
    for decrease in (1e-2, 1e-3):
        state.taken = (state.taken[1], decrease)
    state.newton_gain, state.last_relative_decrease, state.gap_estimate = 0.5, 1e-3, 1e-9
    _choose_direction(state, _outcome("newton", 3, "max_iter"), _qn_record(1e-3), share=1.0,
                      resolution=1e-12)  # fmt: skip
    assert state.quasi_newton and state.newton_gain == pytest.approx(1.0 / 7.0)
    # Not above the step's own estimate (log10(1 + p / gap) over its passes): the minimum of the two.
    state.gap_estimate = 1e-3 / (10**0.07 - 1.0)
    _choose_direction(state, _outcome("newton", 3, "max_iter"), _qn_record(1e-3), share=1.0,
                      resolution=1e-12)  # fmt: skip
    assert state.quasi_newton and state.newton_gain == pytest.approx(0.01)
    # A truncated first step (no decrease before it to read a rate from): its own estimate, and no math
    # error on the inf of the decreases not yet taken.
    first = StepperState(last_relative_decrease=1e-2, gap_estimate=1e-3)
    first.taken = (first.taken[1], 1e-2)
    _choose_direction(first, _outcome("newton", 3, "max_iter"), _qn_record(1e-2), share=1.0,
                      resolution=1e-12)  # fmt: skip
    assert first.quasi_newton and first.newton_gain == pytest.approx(math.log10(11.0) / 7.0)
    # _track_full_batch_step keeps the last two decreases taken, of either kind.
    _track_full_batch_step(state, _qn_record(2e-4), True, torch.float64)
    assert state.taken == (1e-3, pytest.approx(2e-4))


@pytest.mark.parametrize("share, expected", [(1.0, 3), (0.1, 35), (0.001, 250)])
def test_newton_steps_before_any_quasi_newton_run_get_the_cg_of_the_passes_that_try_them(
    share, expected, tune
):
    # 1 + 2 k share <= quasi_newton_after_passes: 3 products on all rows, 35 on a tenth of them;
    # never above cg_max_iter. Once a run of quasi-Newton steps was measured, Newton's own cap.
    tune(quasi_newton_after_passes=8.0, auto_cg_max_iter_full_batch=250)
    cfg = LoopConfig(alpha=1.0, cg_max_iter="auto")
    stepper = Stepper(cfg, full_batch=True, n_logits=5, dtype=torch.float64, quasi_newton=True)
    state = StepperState()
    assert stepper._cg_budget(state, share) == expected
    state.quasi_newton_gain = 0.1
    assert stepper._cg_budget(state, share) == 250
    assert replace(stepper, quasi_newton=False)._cg_budget(StepperState(), share) == 250


def test_the_chosen_preconditioner_reports_its_build_in_curvature_products():
    # What _choose_direction counts beside CG's products: the hard rows' Gram and factor at their budget,
    # the Kronecker class factor's n K^2 against a product's 2 n K (d + 1), nothing for Lambda^{-1}.
    import sklearn_fgn._preconditioners as preconditioners

    system = _system(0, "ggn")
    n_logits, width = system.n_logits, system.X.shape[1] + 1
    assert preconditioners.Kronecker.build_products(system) == pytest.approx(n_logits / (2.0 * width))
    assert preconditioners.HardRows.build_products(system) == get_tuning().hard_rows_build_cg
    plain = preconditioners.choose_preconditioner(system, preconditioners.PreconditionerRequest(solver="cg"))
    assert plain == ("cg", None, 0.0)
    structured = preconditioners.PreconditionerRequest(solver="cg", structured=True)
    chosen = preconditioners.choose_preconditioner(system, structured)
    model = next(m for m in preconditioners.PRECONDITIONERS if m.affordable(system, structured)
                 and m.build(system, structured) is not None)  # fmt: skip
    assert chosen.apply is not None and chosen.build_products == model.build_products(system)
