"""Exact fit: time to a relative objective gap, FGNClassifier vs LogisticRegression.

What is measured
----------------
The L2-regularised multinomial logistic regression objective

    f(W, b) = mean_i CE(W x_i + b, y_i) + ||W||_F^2 / (2 C n_samples),

which is exactly ``LogisticRegression(C=C)`` divided by ``C * n_samples`` and the
objective of ``FGNClassifier(alpha=1/C)`` (its ``alpha`` is ``1/C``). For each
method we fit with a growing iteration budget (``max_iter`` in 1, 2, ..., 12, then a
geometric grid 16, 23, 32, ..., ``tol`` set to ~0 so the budget is what stops it), time
each fit from scratch, evaluate ``f`` on the fitted ``coef_``/``intercept_`` with the
same numpy code for every method, and report the first wall time at which the relative
gap ``(f - f*) / |f*|`` is below 1e-3, 1e-4 and 1e-6. Beyond 12 iterations the grid is
coarse (steps of ~1.4x in ``max_iter``), so times are upper bounds quantised to the grid,
equally for every method. ``f*`` is the minimum of ``LogisticRegression(solver="newton-cg",
tol=1e-10, max_iter=1000)`` and every objective value seen in the sweeps.

Methods: ``FGNClassifier(batch_size=None, alpha=1/C, curvature=...)`` for
curvature in {"auto", "fgn", "ggn"} (device="cpu", tol=0, otherwise defaults: the
feature metric), the same with ``damping_metric="identity"`` for "auto", and
``LogisticRegression(C=C, solver=...)`` for "lbfgs", "newton-cg" and, when
n_features * n_classes <= 5000 (dense Hessian affordable), "newton-cholesky".
ConvergenceWarnings are expected in the sweeps (budgets are cut on purpose) and are
suppressed. Ratios are to the fastest scikit-learn solver at the same gap, all in one
process.

Problems
--------
* ``synthetic``: ``make_classification(n_samples=20000, n_features=256, n_informative=64,
  n_redundant=2, n_repeated=0, n_classes=100, n_clusters_per_class=2, class_sep=1.0,
  flip_y=0.01, random_state=0)`` (the non-mentioned ones are the scikit-learn defaults,
  written out), standardised with ``StandardScaler``, C = 1, whole set (no split: this
  measures optimisation, not generalisation). ``--quick``: n_samples=3000,
  n_features=64, n_informative=32, n_classes=20.
* ``digits``: ``load_digits()`` (1797 x 64, 10 classes), standardised, C = 1.
* ``emb``: embedding-like features (``_data.make_embeddings``: power-law covariance
  spectrum with exponent 2, rows L2-normalised), 50000 x 768 x 200, C = 3, raw (as an
  encoder emits them) and after ``StandardScaler``. ``--quick``: 5000 x 64 x 20.

Threads: OMP/OPENBLAS/MKL_NUM_THREADS and ``torch.set_num_threads`` are all set to
``--threads`` (default 2) before numpy and torch are imported.

Run::

    python benchmarks/exact_fit.py            # full run (several minutes)
    python benchmarks/exact_fit.py --quick    # smoke run (under a minute)
    python benchmarks/exact_fit.py --problems raw,synthetic   # only those problems

Outputs: stdout, ``benchmarks/out/exact_fit{,_quick}.md``, ``.csv`` and ``.json``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import preset_threads  # noqa: E402

preset_threads(sys.argv)

import time  # noqa: E402
import warnings  # noqa: E402

import _common  # noqa: E402  (sets thread env vars, imports numpy and torch)
import numpy as np  # noqa: E402
from _data import make_embeddings  # noqa: E402
from scipy.special import logsumexp  # noqa: E402
from sklearn.datasets import load_digits, make_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from sklearn_fgn import FGNClassifier  # noqa: E402

GAPS = (1e-3, 1e-4, 1e-6)
C = 1.0


def iteration_grid(limit: int) -> list[int]:
    """1, 2, ..., 12, then 16, 23, 32, ... up to ``limit`` (ratio ~1.4)."""
    grid, m = [], 1.0
    while int(m) <= limit:
        if not grid or int(m) != grid[-1]:
            grid.append(int(m))
        m = m + 1 if m < 12 else m * 1.4
    return grid


def make_problems(quick: bool) -> dict:
    """``(X, y, C)`` per problem name."""
    if quick:
        spec = dict(n_samples=3000, n_features=64, n_informative=32, n_classes=20)
    else:
        spec = dict(n_samples=20000, n_features=256, n_informative=64, n_classes=100)
    X, y = make_classification(**spec, n_redundant=2, n_repeated=0, n_clusters_per_class=2,
                               class_sep=1.0, flip_y=0.01, random_state=0)
    Xd, yd = load_digits(return_X_y=True)
    shape = (5000, 64, 20) if quick else (50000, 768, 200)
    Xe, ye = make_embeddings(*shape, exponent=2.0)
    emb = "emb " + "x".join(map(str, shape))
    return {
        "synthetic " + "x".join(str(spec[k]) for k in ("n_samples", "n_features", "n_classes")):
            (StandardScaler().fit_transform(X), y, C),
        "digits 1797x64x10": (StandardScaler().fit_transform(Xd), yd, C),
        emb + " raw": (Xe, ye, 3.0),
        emb + " standardised": (StandardScaler().fit_transform(Xe), ye, 3.0),
    }


def objective(coef: np.ndarray, intercept: np.ndarray, X, y_enc, alpha: float) -> float:
    """Mean cross-entropy + alpha/2 ||W||^2 (multinomial, K >= 3)."""
    logits = X @ coef.T + intercept
    ce = logsumexp(logits, axis=1) - logits[np.arange(len(y_enc)), y_enc]
    return float(ce.mean() + 0.5 * alpha * np.sum(coef * coef))


def make_estimator(method: str, C: float, max_iter: int):
    """A fresh estimator for ``method`` (its settings are in its name) with iteration budget ``max_iter``."""
    settings = dict(part.split("=") for part in method[method.index("(") + 1 : -1].split(", "))
    settings = {k: v.strip('"') for k, v in settings.items()}
    if method.startswith("FGN"):
        return FGNClassifier(batch_size=None, alpha=1.0 / C, tol=0.0, max_iter=max_iter, device="cpu",
                             random_state=0, **settings)  # fmt: skip
    return LogisticRegression(C=C, tol=1e-12, max_iter=max_iter, **settings)


def sweep(method: str, X, y, y_enc, C: float, f_ref: float, budget_s: float, max_iter: int):
    """(max_iter, seconds, objective) for growing budgets until gap < 1e-6 or time is up."""
    points, spent, alpha = [], 0.0, 1.0 / (C * len(y))
    for m in iteration_grid(max_iter):
        est = make_estimator(method, C, m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            start = time.perf_counter()
            est.fit(X, y)
            seconds = time.perf_counter() - start
        f = objective(est.coef_, est.intercept_, X, y_enc, alpha)
        if not np.isfinite(f):
            print(f"  !! {method} max_iter={m}: non-finite objective {f}", flush=True)
        points.append((m, seconds, f))
        spent += seconds
        if (f - f_ref) / abs(f_ref) < 0.5 * GAPS[-1] or spent > budget_s:
            break
    return points


def time_to_gap(points, f_star: float, gap: float):
    """First (seconds, max_iter) whose relative gap is <= ``gap``, else (None, None)."""
    for m, seconds, f in points:
        if (f - f_star) / abs(f_star) <= gap:
            return seconds, m
    return None, None


def run_problem(name: str, X, y, C: float, budget_s: float) -> list[dict]:
    """All method sweeps on one problem; returns one table row per method."""
    y_enc = np.unique(y, return_inverse=True)[1]
    n, d = X.shape
    K = len(np.unique(y))
    alpha = 1.0 / (C * n)
    start = time.perf_counter()
    ref = LogisticRegression(C=C, solver="newton-cg", tol=1e-10, max_iter=1000).fit(X, y)
    f_ref = objective(ref.coef_, ref.intercept_, X, y_enc, alpha)
    print(f"\n## {name}: C = {C:g}, 1/(C n) = {alpha:.3g}; reference newton-cg(tol=1e-10) "
          f"f = {f_ref:.10f} ({ref.n_iter_[0]} iterations, {time.perf_counter() - start:.1f} s)", flush=True)
    methods = ['LogisticRegression(solver="lbfgs")', 'LogisticRegression(solver="newton-cg")']
    if d * K <= 5000:
        methods.append('LogisticRegression(solver="newton-cholesky")')
    methods += [f'FGNClassifier(curvature="{c}")' for c in ("auto", "fgn", "ggn")]
    methods.append('FGNClassifier(curvature="auto", damping_metric="identity")')
    sweeps = {}
    for method in methods:
        limit = 3000 if "lbfgs" in method else 500
        sweeps[method] = sweep(method, X, y, y_enc, C, f_ref, budget_s, limit)
        m, s, f = sweeps[method][-1]
        print(f"  {method}: last max_iter={m}, {s:.2f} s, gap {(f - f_ref) / abs(f_ref):.2e}", flush=True)
    f_star = min([f_ref] + [f for pts in sweeps.values() for _, _, f in pts])
    rows = []
    for method, points in sweeps.items():
        row = {"problem": name, "method": method}
        for gap in GAPS:
            row[f"t@{gap:g} (s)"], row[f"iters@{gap:g}"] = time_to_gap(points, f_star, gap)
        row["final gap"] = (points[-1][2] - f_star) / abs(f_star)
        row["fits in sweep"] = len(points)
        rows.append(row)
    add_ratios(rows, GAPS)
    return rows


def add_ratios(rows: list[dict], gaps) -> None:
    """Set each row's ``ratio@gap``: its ``t@gap (s)`` over the fastest scikit-learn solver's, or None."""
    for gap in gaps:
        times = [r[f"t@{gap:g} (s)"] for r in rows if r["method"].startswith("Logistic")]
        best = min((t for t in times if t is not None), default=None)
        for r in rows:
            t = r[f"t@{gap:g} (s)"]
            r[f"ratio@{gap:g}"] = None if t is None or best is None else t / best


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--threads", type=int, default=2, help="threads for BLAS/OpenMP/torch (default 2)"),
        p.add_argument("--budget", type=float, default=None, help="seconds of fits per method sweep"),
        p.add_argument("--problems", default=None,
                       help="comma-separated substrings of the problems to run (raw,synthetic)"),
    ))  # fmt: skip
    budget = args.budget or (20.0 if args.quick else 150.0)
    print(_common.machine_description())
    rows = []
    wanted = None if args.problems is None else args.problems.split(",")
    for name, (X, y, C_problem) in make_problems(args.quick).items():
        if wanted is None or any(w in name for w in wanted):
            rows += run_problem(name, X, y, C_problem, budget)
    columns = ["problem", "method"] + [f"t@{g:g} (s)" for g in GAPS] + [f"ratio@{g:g}" for g in GAPS] \
        + ["final gap"]
    table = _common.markdown_table(rows, columns)
    for r in rows:  # "—" for targets never reached within the budget
        for g in GAPS:
            for key in (f"t@{g:g} (s)", f"ratio@{g:g}"):
                r[key] = "—" if r[key] is None else r[key]
    table = _common.markdown_table(rows, columns)
    note = (f"Relative objective gap (f - f*)/|f*|, C as given per problem (FGN alpha = 1/C); time of the "
            f"first fit in a max_iter sweep (from scratch) that reaches the gap; ratio = time / fastest "
            f"scikit-learn solver at that gap; '—' = not reached within {budget:g} s of sweep fits.\n"
            f"Machine: {_common.machine_description()}")
    markdown = "# Exact fit: time to objective gap\n\n" + note + "\n\n" + table
    print("\n" + markdown)
    _common.write_outputs("exact_fit", rows, markdown, {"rows": rows, "note": note}, args.quick)


if __name__ == "__main__":
    main()
