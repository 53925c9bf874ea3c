"""Time to a relative objective gap from one run per method: FGNClassifier vs LogisticRegression.

What is measured
----------------
The L2-regularised multinomial logistic regression objective

    f(W, b) = mean_i CE(W x_i + b, y_i) + ||W||_F^2 / (2 C n_samples),

which ``LogisticRegression(C=C)`` minimises (its lbfgs and newton-cg solvers
evaluate exactly this function) and ``FGNClassifier(alpha=1/C)`` too. Each method
fits once, to a tight tolerance, and every evaluation of ``f`` that the method
makes anyway is recorded with its wall time (scikit-learn's
``LinearModelLoss.loss`` / ``loss_gradient``, FGN's trial-point objective): the
smallest value seen by time ``t`` is the method's progress at ``t``. No extra
work is timed and no sweep of ``max_iter`` fits from scratch is needed (those
sweeps, in ``exact_fit.py``, cost a sum of fits and cannot reach small gaps on
big problems within minutes). ``f*`` is the smallest value any method reached;
the report gives the first time at which ``(f - f*) / |f*|`` is at or below 1e-3,
1e-4, 1e-6 and 1e-8, and its ratio to the fastest scikit-learn solver at that gap.
Each fitted model's objective is recomputed in numpy from its ``coef_`` and
``intercept_`` and checked against the last recorded value (a guard that the
recorded function is the objective).

Methods: ``LogisticRegression(C, solver="lbfgs" | "newton-cg", tol=1e-12)`` and
``FGNClassifier(alpha=1/C, batch_size=None, tol=1e-10)`` (its defaults otherwise:
the feature metric; float64 features, so CG's curvature products run in float32
while a step's tolerance is loose, checked in float64).

Problems
--------
Those of ``exact_fit.py`` (``make_problems``): the standardised ``make_classification``
problem (20000 x 256 x 100, C = 1), digits (C = 1), and the embedding-like
``_data.make_embeddings(50000, 768, 200, exponent=2)`` (power-law covariance spectrum,
rows L2-normalised, C = 3), raw and after ``StandardScaler``; ``--quick`` makes them
small. ``--problems raw,synthetic``: only the problems whose name contains one of those
substrings.

Run::

    python benchmarks/gap_trajectory.py --problems raw

Outputs: stdout and ``benchmarks/out/gap_trajectory{,_quick}.md``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import preset_threads  # noqa: E402

preset_threads(sys.argv)

import time  # noqa: E402
import warnings  # noqa: E402

import _common  # noqa: E402
import numpy as np  # noqa: E402
from exact_fit import add_ratios, make_problems, objective  # noqa: E402  (the same problems, objective, ratios)
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression, _linear_loss  # noqa: E402

import sklearn_fgn._solver as fgn_solver  # noqa: E402
from sklearn_fgn import FGNClassifier  # noqa: E402

GAPS = (1e-3, 1e-4, 1e-6, 1e-8)
METHODS = ('LogisticRegression(solver="lbfgs")', 'LogisticRegression(solver="newton-cg")', "FGNClassifier()")


class Recorder:
    """Wraps the functions that evaluate ``f`` so that each value is logged with its time."""

    def __init__(self):
        self.log: list[tuple[float, float]] = []
        self.start = 0.0
        cls = _linear_loss.LinearModelLoss
        self._loss, self._loss_gradient = cls.loss, cls.loss_gradient
        self._fgn = fgn_solver.objective_from_logits

    def _note(self, value) -> None:
        self.log.append((time.perf_counter() - self.start, float(value)))

    def __enter__(self):
        rec, cls = self, _linear_loss.LinearModelLoss

        def loss(obj, *a, **k):
            value = rec._loss(obj, *a, **k)
            rec._note(value)
            return value

        def loss_gradient(obj, *a, **k):
            value = rec._loss_gradient(obj, *a, **k)
            rec._note(value[0])
            return value

        def fgn_objective(*a, **k):
            value = rec._fgn(*a, **k)
            rec._note(value)
            return value

        cls.loss, cls.loss_gradient = loss, loss_gradient
        fgn_solver.objective_from_logits = fgn_objective
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        cls = _linear_loss.LinearModelLoss
        cls.loss, cls.loss_gradient = self._loss, self._loss_gradient
        fgn_solver.objective_from_logits = self._fgn


def run_method(method: str, X, y, C: float):
    """Fit once; return (log of (seconds, f), total seconds, fitted estimator)."""
    if method.startswith("FGN"):
        est = FGNClassifier(alpha=1.0 / C, batch_size=None, tol=1e-10, max_iter=200, device="cpu",
                            random_state=0)  # fmt: skip
    else:
        solver = method.split('"')[1]
        est = LogisticRegression(C=C, solver=solver, tol=1e-12, max_iter=3000 if solver == "lbfgs" else 200)
    with Recorder() as rec, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
        total = time.perf_counter() - rec.start
    return rec.log, total, est


def time_to_gap(log, f_star: float, gap: float):
    """First time at which the best value so far is within ``gap`` of ``f_star`` (relative), else None."""
    best = np.inf
    for seconds, f in log:
        best = min(best, f)
        if (best - f_star) / abs(f_star) <= gap:
            return seconds
    return None


def run_problem(name: str, X, y, C: float) -> list[dict]:
    """Every method once on one problem; one table row per method."""
    y_enc = np.unique(y, return_inverse=True)[1]
    alpha = 1.0 / (C * len(y))
    runs = {}
    print(f"\n## {name}: C = {C:g}", flush=True)
    for method in METHODS:
        log, total, est = run_method(method, X, y, C)
        f_fit = objective(est.coef_, est.intercept_, X, y_enc, alpha)
        f_last = min(f for _, f in log)
        if abs(f_fit - f_last) > 1e-8 * abs(f_fit):
            raise RuntimeError(f"{method}: recorded objective {f_last!r} is not the model's {f_fit!r}")
        runs[method] = (log, total, est)
        print(f"  {method}: {total:.1f} s, f = {f_fit:.12f}", flush=True)
    f_star = min(min(f for _, f in log) for log, _, _ in runs.values())
    rows = []
    for method, (log, total, est) in runs.items():
        iters = est.n_iter_ if method.startswith("FGN") else int(np.max(est.n_iter_))
        row = {"problem": name, "method": method, "total (s)": total, "iterations": iters}
        for gap in GAPS:
            row[f"t@{gap:g} (s)"] = time_to_gap(log, f_star, gap)
        row["final gap"] = (min(f for _, f in log) - f_star) / abs(f_star)
        rows.append(row)
    add_ratios(rows, GAPS)
    return rows


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--threads", type=int, default=2, help="threads for BLAS/OpenMP/torch (default 2)"),
        p.add_argument("--problems", default="", help="comma-separated substrings of problem names to run"),
    ))  # fmt: skip
    print(_common.machine_description())
    problems = make_problems(args.quick)
    wanted = [w for w in args.problems.split(",") if w]
    rows = []
    for name, (X, y, C) in problems.items():
        if not wanted or any(w in name for w in wanted):
            rows += run_problem(name, X, y, C)
    columns = ["problem", "method", "total (s)", "iterations"]
    columns += [f"{kind}@{gap:g}{' (s)' if kind == 't' else ''}" for gap in GAPS for kind in ("t", "ratio")]
    columns += ["final gap"]
    note = ("Relative gap (f - f*)/|f*| of the best objective each method had evaluated by that time, one "
            "fit per method (lbfgs and newton-cg at tol 1e-12, FGN at tol 1e-10); ratio = time / fastest "
            "scikit-learn solver at that gap.\n"
            f"Machine: {_common.machine_description()}")  # fmt: skip
    for r in rows:  # "—" for gaps never reached
        for key in columns[4:-1]:
            r[key] = "—" if r[key] is None else r[key]
    table = _common.markdown_table(rows, columns)
    markdown = "# Time to objective gap, one run per method\n\n" + note + "\n\n" + table
    print("\n" + markdown)
    _common.write_outputs("gap_trajectory", rows, markdown, {"rows": rows, "note": note}, args.quick)


if __name__ == "__main__":
    main()
