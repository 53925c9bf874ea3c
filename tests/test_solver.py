"""Tests of the step-length control (sklearn_fgn._damping, _stepper) and the stopping rules (_stopping).

The steps are checked against dense float64 references.
"""

import math
import platform
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from cases import (
    Case,
    dense_ggn,
    dense_objective_fn,
    flatten,
    make_problem,
    penalty_mask,
    reference_weights,
)

from sklearn_fgn._batches import Batch
from sklearn_fgn._damping import StepRecord, _lengthen, _Ray, levenberg_marquardt
from sklearn_fgn._heads import forward
from sklearn_fgn._solver import LoopConfig
from sklearn_fgn._step import compute_step
from sklearn_fgn._stepper import Stepper, StepperState, _track_full_batch_step
from sklearn_fgn._stopping import (
    _geometric_tail,
    full_batch_converged,
    path_gap_tol,
    remaining_gap,
)
from sklearn_fgn._system import StepOptions
from sklearn_fgn._tuning import Tuning

TUNING = Tuning()  # the defaults, which these tests read

EXACT = 1e-12


def damped_update(head, params, batch, damping, cfg, curvature, cg_tol, full_batch=False):
    """:meth:`Stepper.step` with fixed curvature and CG tolerance: ``(params, next damping, record, logits)``.

    ``full_batch`` lets a trusted step be lengthened and drops the damping floor.
    """
    cfg = replace(cfg, curvature=curvature, cg_tol=cg_tol)
    stepper = Stepper(cfg, full_batch, head.n_logits, batch.X.dtype)
    _, params, logits, record = stepper.step(head, params, batch, damping, StepperState())
    return params, record.next_damping, record, logits


def forcing_term(cfg, state, full_batch, dtype):
    """CG's tolerance for the next step of a fit with ``cfg`` (:meth:`Stepper.forcing_term`)."""
    return Stepper(cfg, full_batch, n_logits=3, dtype=dtype).forcing_term(state)


def _setup(case: Case, damping: float):
    """Problem, config, dense objective and the step ``damped_update`` computes."""
    problem = make_problem(case)
    head, params, X, y, sw = problem
    cfg = LoopConfig(alpha=case.alpha, damping=damping, curvature="ggn", solver="cg", cg_max_iter=200)
    fn = dense_objective_fn(head, params, X, y, reference_weights(sw, X.shape[0], X), case.alpha)
    options = StepOptions(
        alpha=case.alpha, damping=damping, curvature="ggn", solver="cg", cg_tol=EXACT, cg_max_iter=200
    )
    step = compute_step(head, params, X, y, sw, options)
    return problem, cfg, fn, flatten(step.step)


def _ray(problem, case, fn, delta):
    """Dense slope g'delta, curvature delta'(G + alpha P)delta and objective along the ray."""
    head, params, X, y, sw = problem
    theta = flatten(params)
    G = dense_ggn(head, params, X, y, reference_weights(sw, X.shape[0], X))
    model = G + case.alpha * torch.diag(penalty_mask(params))
    slope = float(torch.func.grad(fn)(theta) @ delta)
    return slope, float(delta @ model @ delta), (lambda t: float(fn(theta + t * delta)))


@pytest.mark.parametrize(
    "case",
    [
        Case(n_classes=3, n_samples=16, alpha=0.01, seed=0),
        Case(hidden_layer_sizes=(5,), n_classes=3, n_samples=16, alpha=0.01, seed=1),
    ],
    ids=["linear", "mlp"],
)
def test_trusted_full_batch_step_is_lengthened_to_the_model_minimiser(case):
    damping = 1.0  # dominates the curvature: the step is far too short
    problem, cfg, fn, delta = _setup(case, damping)
    slope, curvature, f = _ray(problem, case, fn, delta)
    t_star = -slope / curvature
    predicted = -(t_star * slope + 0.5 * t_star**2 * curvature)
    ratio = (f(0.0) - f(t_star)) / predicted
    assert t_star >= TUNING.lengthen_min and ratio > 0.75  # the precondition of the extension
    head, params, X, y, sw = problem
    new_params, next_damping, record, logits = damped_update(
        head, params, Batch(X, y, sw), damping, cfg, "ggn", EXACT, full_batch=True
    )
    assert record.accepted and record.step_size == pytest.approx(t_star, rel=1e-8)
    torch.testing.assert_close(flatten(new_params), flatten(params) + t_star * delta, rtol=1e-8, atol=1e-12)
    assert record.new_loss == pytest.approx(f(t_star), rel=1e-10)
    assert record.new_loss < f(1.0)  # better than the step as computed
    assert record.predicted_decrease == pytest.approx(predicted, rel=1e-8)
    assert record.ratio == pytest.approx(ratio, rel=1e-6)
    # Levenberg-Marquardt runs from lambda / t*, the damping the longer step corresponds to.
    expected = levenberg_marquardt(f(0.0), f(t_star), predicted, damping / t_star, 1e-8)[2]
    assert next_damping == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(logits, forward(head, new_params, X), rtol=1e-10, atol=1e-12)


def test_a_linear_heads_long_step_is_taken_where_its_objective_is_lower_than_the_unit_steps():
    # From a damping far above the curvature the unit step is a short gradient step. At t* the model
    # overestimates the decrease (ratio 0.55: no agreement), but the objective there is far below the
    # unit step's and passes Armijo: the lower of the two values the step has evaluated is taken, and
    # the ratio at t* sets the next damping.
    case = Case(n_classes=5, n_samples=40, alpha=1e-3, seed=2)
    damping = 10.0
    problem, cfg, fn, delta = _setup(case, damping)
    slope, curvature, f = _ray(problem, case, fn, delta)
    t_star = -slope / curvature
    predicted = -(t_star * slope + 0.5 * t_star**2 * curvature)
    ratio = (f(0.0) - f(t_star)) / predicted
    assert t_star >= TUNING.lengthen_min and ratio <= 0.75  # the model's test fails ...
    assert f(t_star) < f(1.0) and f(t_star) <= f(0.0) + TUNING.armijo * t_star * slope  # ... Armijo's holds
    head, params, X, y, sw = problem
    new_params, next_damping, record, _ = damped_update(
        head, params, Batch(X, y, sw), damping, cfg, "ggn", EXACT, full_batch=True
    )
    assert record.accepted and record.step_size == pytest.approx(t_star, rel=1e-8)
    assert record.new_loss == pytest.approx(f(t_star), rel=1e-10)
    assert record.ratio == pytest.approx(ratio, rel=1e-6)
    expected = levenberg_marquardt(f(0.0), f(t_star), predicted, damping / t_star, 1e-8)[2]
    assert next_damping == pytest.approx(expected, rel=1e-6)
    # The objective's test is off where the unit loss given is -inf (an MLP head's steps): the unit step.
    weights = reference_weights(sw, X.shape[0], X)
    options = StepOptions(alpha=case.alpha, damping=damping, curvature="ggn", solver="cg", cg_tol=EXACT,
                          cg_max_iter=200)  # fmt: skip
    result = compute_step(head, params, X, y, sw, options)
    ray = _Ray(head, params, Batch(X, y, sw), result, weights, case.alpha)
    assert _lengthen(ray, f(0.0), f(1.0)) is not None
    assert _lengthen(ray, f(0.0), -math.inf) is None


def test_step_is_not_lengthened_when_the_model_disagrees_or_on_mini_batches():
    case = Case(n_classes=3, n_samples=16, alpha=0.01, seed=1)
    problem, cfg, fn, delta = _setup(case, 1.0)
    slope, curvature, f = _ray(problem, case, fn, delta)
    t_star = -slope / curvature
    ratio = (f(0.0) - f(t_star)) / -(t_star * slope + 0.5 * t_star**2 * curvature)
    assert not (t_star >= TUNING.lengthen_min and ratio > 0.75)  # the extension's test fails here
    head, params, X, y, sw = problem
    for full_batch in (True, False):
        new_params, _, record, _ = damped_update(
            head, params, Batch(X, y, sw), 1.0, cfg, "ggn", EXACT, full_batch=full_batch
        )
        assert record.step_size == 1.0
        torch.testing.assert_close(flatten(new_params), flatten(params) + delta, rtol=1e-8, atol=1e-12)
    # A case that would be lengthened is not on mini-batches (there the damping is a step size).
    case = Case(n_classes=3, n_samples=16, alpha=0.01, seed=0)
    problem, cfg, _, _ = _setup(case, 1.0)
    head, params, X, y, sw = problem
    _, _, record, _ = damped_update(head, params, Batch(X, y, sw), 1.0, cfg, "ggn", EXACT, full_batch=False)
    assert record.step_size == 1.0


@pytest.mark.parametrize("hidden, seed", [((), 1), ((), 2), ((5,), 0), ((5,), 2)])
def test_rejected_step_is_cut_back_by_armijo_backtracking(hidden, seed):
    # Tiny damping on 8 examples and 15+ parameters: the step overshoots.
    case = Case(hidden_layer_sizes=hidden, n_classes=3, n_samples=8, seed=seed)
    damping = 1e-6
    problem, cfg, fn, delta = _setup(case, damping)
    slope, curvature, f = _ray(problem, case, fn, delta)
    assert f(1.0) > f(0.0) and slope < 0  # the full step is rejected, delta is a descent direction
    armijo = lambda t: f(t) <= f(0.0) + TUNING.armijo * t * slope  # noqa: E731
    t = next(0.5**k for k in range(1, 11) if armijo(0.5**k))
    head, params, X, y, sw = problem
    for full_batch in (True, False):
        new_params, next_damping, record, logits = damped_update(
            head, params, Batch(X, y, sw), damping, cfg, "ggn", EXACT, full_batch=full_batch
        )
        assert record.accepted and record.step_size == t and record.ratio < 0
        assert record.new_loss == pytest.approx(f(t), rel=1e-10) and record.new_loss < record.loss
        torch.testing.assert_close(flatten(new_params), flatten(params) + t * delta, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(logits, forward(head, new_params, X), rtol=1e-10, atol=1e-12)
    assert next_damping == 2 * damping  # on a mini-batch the damping doubles after a bad step
    _, next_damping, _, _ = damped_update(
        head, params, Batch(X, y, sw), damping, cfg, "ggn", EXACT, full_batch=True
    )
    if hidden:  # and after an MLP's full-batch step (its GGN is not the objective's Hessian)
        assert next_damping == 2 * damping
        return
    # A linear head's full-batch step sets the damping whose step along delta is t delta: the damped
    # model s slope + s^2 (c + lambda') |delta|^2 / 2, c the dense curvature along delta, is least at
    # s = t (and at s = 1 with lambda: the system was solved).
    square = float(delta @ delta)
    assert -slope / (curvature + damping * square) == pytest.approx(1.0, rel=1e-8)
    assert next_damping > 2 * damping
    assert -slope / (curvature + next_damping * square) == pytest.approx(t, rel=1e-8)


def test_constant_schedule_takes_the_step_as_computed():
    case = Case(n_classes=3, n_samples=8, seed=1)
    problem, cfg, fn, delta = _setup(case, 1e-6)
    cfg = LoopConfig(alpha=0.0, damping=1e-6, curvature="ggn", solver="cg", damping_schedule="constant")
    head, params, X, y, sw = problem
    new_params, next_damping, record, _ = damped_update(
        head, params, Batch(X, y, sw), 1e-6, cfg, "ggn", EXACT
    )
    assert record.new_loss > record.loss and record.step_size == 1.0 and next_damping == 1e-6
    torch.testing.assert_close(flatten(new_params), flatten(params) + delta, rtol=1e-8, atol=1e-12)


def _record(ratio=1.001, step_size=1.0, accepted=True, cg_tol=0.05, predicted=3e-4):
    return StepRecord(3.0, 2.9, accepted, 1e-3, "ggn", 5, predicted, ratio, cg_tol, step_size)


def test_remaining_gap_is_left_out_decrease_plus_model_error():
    relative = 1e-4
    assert remaining_gap(_record(), relative) == pytest.approx(relative * (0.05**2 + 0.001))
    for record in (
        _record(step_size=2.0),
        _record(step_size=0.5),
        _record(ratio=0.3),
        _record(accepted=False),
    ):
        assert remaining_gap(record, relative) == math.inf


@pytest.mark.parametrize("relative, ratio, dtype, expected", [
    (3e-8, 0.0, torch.float32, True),  # below float32's resolution: the ratio is noise
    (3e-8, 0.0, torch.float64, False),  # float64 still resolves it: keep going
    (1e-13, 0.0, torch.float64, True),
    (3e-6, 0.0, torch.float32, False),  # untrusted and above round-off
    (3e-6, 1.0, torch.float32, True),  # trusted, below tol, solved accurately
])  # fmt: skip
def test_full_batch_stop_at_the_objectives_roundoff(relative, ratio, dtype, expected):
    record = _record(ratio=ratio, cg_tol=0.01, predicted=3.0 * relative)  # loss 3.0
    assert full_batch_converged(record, LoopConfig(alpha=0.0, tol=1e-4), dtype) is expected


@pytest.mark.parametrize("tol, gap, previous, expected", [
    (1e-4, 1e-6, 1e-4, 0.05), (0.0, 1e-6, 1e-4, 0.01), (1e-4, math.inf, 1e-4, 0.01),
    (1e-4, 1e-12, 1e-4, 0.5),  # not tighter than that
    (1e-4, 1e-4, 2e-3, 0.5e-4 / 1e-4**0.5),  # ... nor looser
    (1e-4, 5e-4, 1e-2, 0.5e-4 / 5e-4**0.5),  # tol < gap <= 10 tol: may be the last, solved to end the fit
    (1e-4, 2e-3, 1e-4, 0.01),  # too far for the last step
    (1e-4, 5e-4, 1e-3, 1e-3**0.5),  # decreasing linearly (gap > superlinear * previous): cannot end it
    (1e-4, 5e-9, 1e-8, 0.5),  # ... unless its decrease is below tol^2 (then not tighter than it asks)
    (1e-7, 5e-7, 1e-4, 0.01),  # tol^2 near round-off: the step after makes the coefficients exact
    (1e-7, 5e-8, 1e-4, 0.01),  # ... and is not loosened below Eisenstat-Walker's term
    (1e-7, 1e-12, 1e-4, 0.5e-7 / 1e-12**0.5),  # ... unless the gap is far below tol
])  # fmt: skip
def test_forcing_term_asks_what_the_stop_rule_needs(tol, gap, previous, expected):
    cfg = LoopConfig(alpha=0.0, tol=tol)
    state = StepperState(last_relative_decrease=previous, gap_estimate=gap)
    eta = forcing_term(cfg, state, full_batch=True, dtype=torch.float64)
    assert eta == pytest.approx(expected)
    # The Eisenstat-Walker term alone is sqrt(previous); a fixed cg_tol and mini-batches ignore the gap.
    assert forcing_term(LoopConfig(alpha=0.0, cg_tol=1e-3), state, True, torch.float64) == 1e-3
    assert forcing_term(cfg, state, False, torch.float64) == 1e-2


def test_forcing_term_is_no_tighter_than_the_models_error():
    # The model missed e = |1 - ratio| of the last decrease: CG stops at eta >= sqrt(e), capped at 0.5.
    cfg = LoopConfig(alpha=0.0, tol=1e-4)
    state = StepperState(last_relative_decrease=1e-4, gap_estimate=1e-3, model_error=0.09)
    assert forcing_term(cfg, state, True, torch.float64) == pytest.approx(0.3)
    state.model_error = 0.0  # no error read: Eisenstat-Walker's term
    assert forcing_term(cfg, state, True, torch.float64) == pytest.approx(0.01)


@pytest.mark.parametrize("linear, step_size, ratio, predicted, expected", [
    (True, 1.0, 1.12, 3e-2, 0.12),  # a trusted unit step of a linear head
    (False, 1.0, 1.12, 3e-2, 0.0),  # an MLP head's
    (True, 0.5, 1.12, 3e-2, 0.0),  # a cut step
    (True, 1.0, 0.4, 3e-2, 0.0),  # an untrusted one
    (True, 1.0, 1.12, 3e-12, 0.0),  # a decrease at round-off: its ratio is noise
])  # fmt: skip
def test_the_models_error_is_read_on_trusted_resolved_steps(linear, step_size, ratio, predicted, expected):
    state = StepperState()
    _track_full_batch_step(state, _record(ratio, step_size, predicted=predicted), linear, torch.float64)
    assert state.model_error == pytest.approx(expected)


def test_forcing_term_of_path_fits_is_not_tightened_for_the_last_step():
    # FGNClassifierCV's path fits (gap_tol) end on the linear rule, which asks nothing of the last solve.
    state = StepperState(last_relative_decrease=1e-2, gap_estimate=5e-4)
    assert forcing_term(LoopConfig(alpha=0.0, tol=1e-4), state, True, torch.float64) < 0.01
    path = LoopConfig(alpha=0.0, tol=1e-4, gap_tol=1e-4)
    assert forcing_term(path, state, True, torch.float64) == pytest.approx(0.1)  # Eisenstat-Walker
    state.gap_estimate = 1e-12  # far below tol: still loosened, as before
    assert forcing_term(path, state, True, torch.float64) == pytest.approx(0.5)


_FAULTS_PER_STEP = """
import resource, sys, torch
from sklearn_fgn._heads import Head, init_params
from sklearn_fgn._batches import Batch, prime_host_allocator
from sklearn_fgn._solver import LoopConfig
from sklearn_fgn._stepper import Stepper, StepperState, _track_full_batch_step
torch.set_num_threads(1)
if sys.argv[1] == "prime":
    prime_host_allocator()
g = torch.Generator().manual_seed(0)
X, y = torch.randn(512, 256, generator=g), torch.randint(0, 1000, (512,), generator=g)
head = Head(256, 1000, (), "relu", True)
params, cfg = init_params(head, g, torch.float32, "cpu"), LoopConfig(alpha=1e-4, batch_size=512)
stepper = Stepper(cfg, False, head.n_logits, torch.float32)  # mini-batch: FGN, cg_tol 1e-2, floor 1.0
step = lambda: stepper.step(head, params, Batch(X, y, None), 1.0, StepperState())
for _ in range(3):
    step()
faults = []
for _ in range(7):  # the median step: an occasional burst of faults elsewhere in the process is not a step's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[3])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
def test_primed_allocator_keeps_a_steps_memory_for_the_next():
    # Without priming, glibc handed each step's MB-sized temporaries back to
    # the OS and the next step faulted them in again.
    faults = {
        mode: float(
            subprocess.run(
                [sys.executable, "-c", _FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True
            ).stdout
        )  # fmt: skip
        for mode in ("plain", "prime")
    }
    if faults["plain"] < 200:
        pytest.skip(f"this allocator keeps the memory anyway ({faults['plain']} faults per step)")
    assert faults["prime"] < 0.1 * faults["plain"], faults


@pytest.mark.parametrize("previous, expected", [
    (math.inf, True),  # first step: nothing says the convergence is slow
    (3e-5, True),  # the decrease shrank tenfold: Newton's end game
    (1e-5, False),  # shrinking by 0.3 per step: the gap left is a multiple of the decrease
])  # fmt: skip
def test_full_batch_does_not_stop_while_converging_linearly(previous, expected):
    record = _record(ratio=1.0, cg_tol=0.01, predicted=3.0 * 3e-6)  # relative decrease 3e-6, loss 3.0
    cfg = LoopConfig(alpha=0.0, tol=1e-4)
    assert full_batch_converged(record, cfg, torch.float64, previous) is expected


_ALLOCATOR_UNTOUCHED = """
import warnings
import sklearn_fgn._batches as batches
from sklearn.datasets import load_iris
from sklearn_fgn import FGNClassifier
X, y = load_iris(return_X_y=True)
warnings.simplefilter("ignore")
FGNClassifier(batch_size=32, max_iter=2, device="cpu").fit(X, y)
print(batches.prime_host_allocator.cache_info().currsize)
"""


def test_fits_leave_the_process_allocator_alone():
    # Priming changes glibc's thresholds for the whole process: opt-in only.
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_UNTOUCHED], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize("gap_tol, previous, expected", [
    (None, 1e-5, False),  # Newton's rule: a linear end game goes on
    (1e-4, 1e-5, True),  # r = 0.3: the tail 3e-6 * 0.3 / 0.7 = 1.3e-6 is below gap_tol
    (1e-6, 1e-5, False),  # ... but not below 1e-6
    (1e-4, 3.05e-6, False),  # r = 0.98: the tail 3e-6 * 0.98 / 0.02 = 1.5e-4 is not
])  # fmt: skip
def test_gap_tol_stops_a_linear_end_game_at_its_estimated_tail(gap_tol, previous, expected):
    # cg_tol = 0.5: the step fails Newton's accuracy rule, so only the tail rule can stop the fit.
    record = _record(ratio=1.0, cg_tol=0.5, predicted=3.0 * 3e-6)  # relative decrease 3e-6, loss 3.0
    cfg = LoopConfig(alpha=0.0, tol=1e-4, gap_tol=gap_tol)
    tail = _geometric_tail(3e-6, previous)
    assert (tail <= (gap_tol or 0.0)) is expected
    assert full_batch_converged(record, cfg, torch.float64, previous) is expected


def test_scored_path_gap_is_measured_against_the_decrease_from_the_null_model():
    # loss 3.0; null_loss 3.3: the coefficients lower the objective by 0.3, a tenth of it.
    cfg = LoopConfig(alpha=0.0, tol=1e-4, gap_tol=1e-4, null_loss=3.3)
    assert path_gap_tol(cfg, 3.0) == pytest.approx(1e-4 * 0.3 / 3.0)
    assert path_gap_tol(replace(cfg, null_loss=9.0), 3.0) == pytest.approx(1e-4)  # the objective is smaller
    # Not yet below the null model (a drawn start): the floor.
    assert path_gap_tol(replace(cfg, null_loss=2.0), 3.0) == pytest.approx(1e-4 * TUNING.path_scale_floor)


@pytest.mark.parametrize("null_loss, cg_tol, relative, expected", [
    (None, 0.5, 3e-6, False),  # Newton's rule: a loose last solve cannot end the fit
    (30.0, 0.5, 3e-6, True),  # scored: eta^2 p = 7.5e-7 <= path_miss * 1e-4
    (30.0, 0.5, 3e-4, False),  # ... but p is above tol
    (3.03, 0.5, 3e-6, False),  # the decrease from the null model is 1 % of the loss: gap_tol 1e-6
    (3.03, 0.2, 8e-7, True),  # ... met by a small, accurate enough step: 0.04 * 8e-7 <= path_miss * 1e-6
])  # fmt: skip
def test_scored_path_fits_stop_at_their_gap_tolerance(null_loss, cg_tol, relative, expected):
    record = _record(ratio=1.0, cg_tol=cg_tol, predicted=3.0 * relative)  # loss 3.0
    cfg = LoopConfig(alpha=0.0, tol=1e-4, gap_tol=1e-4, null_loss=null_loss)
    assert full_batch_converged(record, cfg, torch.float64, previous=math.inf) is expected


def test_forcing_term_of_scored_path_fits_asks_their_gap_only():
    # eta^2 p <= path_miss gap_tol with p the present gap estimate, not the Eisenstat-Walker sqrt(p).
    state = StepperState(last_relative_decrease=1e-3, gap_estimate=1e-3, last_loss=3.0)
    cfg = LoopConfig(alpha=0.0, tol=1e-4, gap_tol=1e-4, null_loss=30.0)
    expected = (TUNING.path_miss * 1e-4 / 1e-3) ** 0.5
    assert forcing_term(cfg, state, True, torch.float64) == pytest.approx(expected)
    state.gap_estimate = 1e-5
    assert forcing_term(cfg, state, True, torch.float64) == pytest.approx(0.5)
    state.gap_estimate = 1e-1  # far: Eisenstat-Walker's sqrt(1e-3) is looser
    assert forcing_term(cfg, state, True, torch.float64) == pytest.approx(1e-3**0.5)
    # After an untrusted step (no gap estimate) its decrease stands for the gap: a decrease of
    # 2.5e-7 asks no tight solve of the next step (Eisenstat-Walker's term would be 5e-4).
    state.gap_estimate, state.last_relative_decrease = math.inf, 2.5e-7
    assert forcing_term(cfg, state, True, torch.float64) == pytest.approx(0.5)
    assert forcing_term(LoopConfig(alpha=0.0, tol=1e-4, gap_tol=1e-4), state, True, torch.float64) == (
        pytest.approx(2.5e-7**0.5)
    )
