"""Every tuning constant of a fit, in one place, with what it decides.

The code reads them through :func:`get_tuning` at the moment it decides, so
:func:`tuning_context` changes them for the fits inside a ``with`` block
(tests shrink a threshold to reach a branch on small data; a study varies one).
The defaults are the product's; docs/design.md gives the reasoning behind
the rules they parametrise. The setting is process-wide (threads of
``FGNClassifierCV(n_jobs=...)`` see it; worker processes do not).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real

__all__ = ["Tuning", "get_tuning", "tuning_context"]


@dataclass(frozen=True)
class Tuning:
    """The constants of the fit's rules; change them with :func:`tuning_context`."""

    # --- The step's solver and preconditioners (_preconditioners, _inner, _cg) ---
    # solver="auto" forms the n x n Gram and factorises it up to this many rows
    # (O(n^2) memory), and only while that costs less than gram_worth_cg_iters
    # CG iterations: the Gram solves the FGN system exactly and preconditions
    # the GGN's, where Lambda-preconditioned CG may need tens of iterations.
    cholesky_max_rows: int = 4096
    gram_worth_cg_iters: int = 20
    # Full-batch steps on whitened features precondition CG with the exact FGN
    # solve on the hardest rows when they carry at least hard_rows_share of the
    # curvature; their Gram costs at most hard_rows_build_cg CG iterations,
    # holds at most hard_rows_max rows, and is not worth building for fewer
    # than hard_rows_min.
    hard_rows_share: float = 0.25
    # ... on a curvature sample (rows drawn by their traces), at least this many
    # times the hard rows' share of the sample's rows.
    hard_rows_concentration: float = 2.0
    hard_rows_build_cg: int = 4
    hard_rows_max: int = 4096
    hard_rows_min: int = 256
    # Otherwise the class-means model: up to this many logits with every label
    # group per logit (its build is O(K^2 (d + K)) work and K^3 memory), beyond
    # with each logit's class_means_top_groups heaviest groups (0: the
    # Kronecker model there), fewer where their (K, r, d) means would pass
    # class_means_max_entries entries.
    class_means_max_logits: int = 256
    class_means_top_groups: int = 32
    class_means_max_entries: int = 2**26
    # Entries of the (k, d, G) batched product per chunk in the class-means build.
    grams_chunk_entries: int = 2**24
    # Mixed precision (full-batch steps of a linear head on float64 features):
    # CG's curvature products run in float32 whenever the step's tolerance is
    # at least this; Newton's end game (tighter tolerances) is float64.
    mixed_min_tol: float = 1e-4
    # An update below this many ulps of the iterate (in its dtype) ends CG: "stagnated".
    stagnation_ulps: float = 10.0

    # --- The damping and the step along it (_damping) ---
    # Levenberg-Marquardt: lambda stays inside these bounds.
    damping_bounds: tuple[float, float] = (1e-8, 1e8)
    # Backtracking along a rejected step: sufficient-decrease constant and the
    # most halvings tried (t >= 2**-max_backtracks).
    armijo: float = 1e-4
    max_backtracks: int = 10
    # Full batch: a trusted step is lengthened to the model's minimiser along
    # it when that lies at least this far out.
    lengthen_min: float = 1.25

    # --- CG's tolerance and cap per step (_stepper) ---
    # cg_tol="auto" on mini-batches: a batch's step is noisy anyway, and a
    # tighter solve buys no accuracy per epoch.
    auto_cg_tol: float = 1e-2
    # cg_max_iter="auto": on mini-batches, and in full batch (where the forcing
    # term ends the solve).
    auto_cg_max_iter: int = 100
    auto_cg_max_iter_full_batch: int = 1000

    # --- Stopping (_stopping) ---
    # Full batch: a step converges the fit only if its decrease is at most
    # this share of the previous step's.
    superlinear: float = 0.1
    # Full batch: a step whose estimated gap is below this many times tol may
    # be the last one, and is solved accurately enough to end the fit ...
    last_step_gap: float = 10.0
    # ... from this tol up: below it tol^2 is near float64's round-off, and the
    # step after the one that meets the stop's bounds is what makes the
    # coefficients exact where the objective is flat (below it, too, no run
    # of quasi-Newton steps ends a fit: a Newton step does).
    last_step_min_tol: float = 1e-6
    # ... and a step whose damping term is this share of its slope (the
    # damping a thousand times the curvature along it) cannot end the fit.
    damping_dominated: float = 0.999
    # Full batch, linear head: CG's tolerance eta is at least
    # sqrt(model_error_share * e), e = |1 - ratio| of the last trusted unit
    # step (the share of the decrease the quadratic model misses; an inexact
    # solve misses about eta^2, and solving the model far beyond its own error
    # buys no decrease), read on decreases at least model_error_resolution
    # times the objective's resolution.
    model_error_share: float = 1.0
    model_error_resolution: float = 100.0
    # Scored path fits: a step may leave this share of the gap tolerance undone
    # by its inexact solve, and steps are solved no tighter than that asks ...
    path_miss: float = 0.25
    # ... their gap is relative to the decrease from the intercept-only model
    # where that is smaller than the objective, down to this share of it.
    path_scale_floor: float = 1e-3

    # --- The curvature sample of full-batch linear fits (_stepper) ---
    # This share of the rows to start with, at least this many rows and this
    # many per logit; the sample doubles after a step along which its
    # curvature was off the whole batch's by more than this factor, and beyond
    # this share of the rows every row is used. CG minimises the sampled model,
    # so it picks directions the sample underrates (a ratio below 1 is usual,
    # and the bound is loose so as not to grow on that bias; docs/design.md §6).
    curvature_sample_share: float = 0.1
    curvature_sample_min_rows: int = 4096
    curvature_rows_per_logit: int = 10
    curvature_sample_error: float = 3.0
    curvature_sample_max_share: float = 0.125

    # --- Quasi-Newton steps of full-batch linear fits (_stepper, _quasi_newton) ---
    # After a Newton step that cost more than this many passes over X (one for
    # its gradient, two per CG product on every row; a sampled product counts
    # as its share of the rows), the fit tries quasi-Newton steps (two passes
    # each) from the last quasi_newton_pairs secant pairs of its steps (inf:
    # never), and goes on with the kind that gains more per pass.
    quasi_newton_after_passes: float = 8.0
    quasi_newton_pairs: int = 10
    # ... on top of a model of the curvature rebuilt every this many of them.
    quasi_newton_model_refresh: int = 5
    # ... in fits where one pass over X (n d K multiply-adds) is at least this
    # much work (below, a fit takes a fraction of a second either way).
    quasi_newton_min_work: float = 2.0**27
    # Their gain per pass is read from the sums of their decreases over the
    # last two windows of quasi_newton_rate_window steps, and the gap they
    # leave from the geometric tail at the slowest rate of the last window
    # (below tol, the fit stops).
    quasi_newton_rate_window: int = 3
    # A run of them goes on while it gains at least this share of the last
    # Newton step's gain per pass at every reading, and all of it at one of
    # the last quasi_newton_behind readings: each gain is read at its own
    # phase of the fit, and a window's is noisy within a factor of about 2.
    quasi_newton_keep_share: float = 0.5
    quasi_newton_behind: int = 2

    # --- The feature metric (_metric) ---
    # Up to this many features the metric is the full whitening (two d x d
    # eigendecompositions, O(d^3)); beyond, the diagonal metric.
    full_metric_max_features: int = 2048
    # Ridge on the correlation form, relative to its mean eigenvalue (1): the
    # metric treats directions with less than this share of the variance alike.
    metric_ridge: float = 1e-4

    # --- The estimator's "auto" rules ---
    # batch_size="auto": a linear head fits full batch wherever this many of
    # its (n, K) arrays and X take at most this share of the device's memory
    # (a GPU's, or the host's RAM), else auto_batch_size rows.
    auto_full_batch_arrays: int = 12
    auto_full_batch_memory_share: float = 0.5
    # An MLP head (or a linear head where the host's memory is unknown): full
    # batch while n_samples * n_logits stays below this; an MLP head also
    # needs n_samples <= auto_mlp_full_batch_max_samples.
    auto_full_batch_max_entries: int = 2**24
    auto_batch_size: int = 512
    auto_mlp_full_batch_max_samples: int = 8192
    # early_stopping="auto" holds out at most this many rows (or two per class).
    auto_validation_rows: int = 2048
    # Rows whose logits the predict methods compute at once, and at most about
    # this many logits (16 MiB in float32): many classes, fewer rows.
    predict_chunk_rows: int = 2**15
    predict_chunk_logits: int = 2**22

    # --- FGNClassifierCV (_cv) ---
    # The refit of the chosen C runs to at most this tol, or, where its end
    # game converges only linearly, to this estimated relative gap.
    refit_tol: float = 1e-8
    refit_gap_tol: float = 1e-6
    # CG iterations per step of a path fit: path fits stop at a gap of tol,
    # which truncated Newton steps reach sooner than solves run to the forcing term.
    path_cg_max_iter: int = 100
    # Path fits on folds whose logits product (rows x features x classes) is at
    # least path_large_work solve their steps only as accurately as their gap
    # asks, and from path_float32_min_tol up fit float64 features in float32.
    path_float32_min_tol: float = 1e-6
    path_large_work: float = 1e8

    # --- Data-parallel fits (_distributed) ---
    # A rank blocked in a gloo collective looks for a failed peer this often (seconds).
    peer_check_seconds: float = 0.5


_lock = threading.Lock()
_current = Tuning()


def get_tuning() -> Tuning:
    """Return the tuning constants in force.

    Returns
    -------
    Tuning
    """
    return _current


def _problem(changes: dict) -> str | None:
    """Return what is wrong with ``changes`` (unknown names, values that are not numbers), or None."""
    names = {f.name for f in dataclasses.fields(Tuning)}
    unknown = sorted(set(changes) - names)
    if unknown:
        return f"unknown tuning constant(s) {unknown}; the constants are {sorted(names)}"
    for name, value in changes.items():
        default = getattr(Tuning, name)
        parts = tuple(value) if isinstance(default, tuple) and isinstance(value, (tuple, list)) else (value,)
        if isinstance(default, tuple) and len(parts) != len(default):
            return f"tuning constant {name} takes {len(default)} numbers, got {value!r}"
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in parts):
            return f"tuning constant {name} must be a real number, got {value!r}"
    return None


@contextmanager
def tuning_context(**changes) -> Generator[Tuning, None, None]:
    """Change tuning constants for the fits inside the ``with`` block, then restore them.

    Parameters
    ----------
    **changes
        ``name=value`` for fields of :class:`Tuning`.

    Yields
    ------
    Tuning
        The constants in force inside the block.

    Raises
    ------
    ValueError
        For a name that is not a tuning constant, or a value that is not a number.
    """
    global _current
    problem = _problem(changes)
    if problem is not None:
        raise ValueError(problem)
    with _lock:
        previous = _current
        _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        with _lock:
            _current = previous
