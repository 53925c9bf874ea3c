"""Time and passes over X to a relative objective gap from one run per method: FGN vs scikit-learn and torch.

What is measured
----------------
The L2-regularised multinomial logistic regression objective

    f(W, b) = mean_i CE(W x_i + b, y_i) + ||W||_F^2 / (2 C n_samples),

which ``LogisticRegression(C=C)`` minimises (its lbfgs and newton-cg solvers
evaluate exactly this function) and ``FGNClassifier(alpha=1/C)`` too (for two
classes: one logit, the binary cross-entropy, as both estimators fit it). Each
method fits once, to a tight tolerance, and every evaluation of ``f`` that the
method makes anyway is recorded with its wall time (scikit-learn's
``LinearModelLoss.loss`` / ``loss_gradient``, FGN's trial-point objective, each
closure call of torch's L-BFGS): the smallest value seen by time ``t`` is the
method's progress at ``t``. No extra work is timed and no sweep of ``max_iter``
fits from scratch is needed (those sweeps, in ``exact_fit.py``, cost a sum of fits
and cannot reach small gaps on big problems within minutes). ``f*`` is the smallest
value any method reached; the report gives the first time at which
``(f - f*) / |f*|`` is at or below 1e-2, 1e-3, 1e-4, 1e-6 and 1e-8, its ratio to the
fastest scikit-learn solver at that gap, and at 1e-6 its ratio to torch's L-BFGS.
Each fitted model's objective is recomputed in numpy (float64) from its ``coef_``
and ``intercept_`` and checked against the smallest recorded value (a guard that the
recorded function is the objective; to 1e-8 relative, 1e-5 with ``--dtype float32``).

Passes over X
-------------
Beside seconds, the cost in **passes over X**: one pass is the multiply-adds of one
product of ``X`` (all ``n`` rows) with a ``(d, K)`` matrix, either direction
(``n d K``; ``K`` the logits, 1 for a binary problem), counted by
``_passes.PassCounter`` while the method fits, and logged with every recorded
evaluation (so the report also gives the passes to each gap):

* scikit-learn: ``LinearModelLoss.loss`` 1, ``loss_gradient`` and ``gradient`` 2,
  ``gradient_hessian_product`` 2 plus 2 per Hessian-vector product;
* torch L-BFGS: 2 per closure call (the logits, and ``X^T G`` in the backward);
* FGN: each forward pass, JVP and VJP of the linear head as ``rows / n`` of a pass
  (all rows, a curvature subsample, or the hard rows of a preconditioner), the feature
  metric's moments and the whitening of ``X`` as ``d / K`` each (``n d^2``; ``1 / K``
  for the diagonal metric), and beside them, in the same unit, the dense algebra of a
  step: row-space Grams (``m^2 (d + K)`` for ``m`` rows), Cholesky factors
  (``m^3 / 6``) and solves, the class-means model's Grams. stdout splits FGN's total
  into those three parts.

``O(n d)`` elementwise work, ``O(n K)`` work on logits and the optimisers' own
vector algebra are not counted (see ``_passes.py``).

Methods
-------
* ``LogisticRegression(C, solver="lbfgs" | "newton-cg", tol=1e-12)``;
* ``torch.optim.LBFGS`` (``torch LBFGS (strong Wolfe)``): full batch on the CPU,
  ``lr=1``, ``history_size=10``, ``line_search_fn="strong_wolfe"``,
  ``tolerance_grad=1e-12``, ``tolerance_change=1e-15``, ``max_iter=5000`` in one
  ``step(closure)``, parameters ``W`` (K x d) and ``b`` (K; one logit for two classes)
  from zero in the features' dtype, the objective above (``cross_entropy`` plus the
  penalty);
* ``FGNClassifier(alpha=1/C, batch_size=None, tol=1e-10)`` (its defaults otherwise:
  the feature metric; float64 features, so CG's curvature products run in float32
  while a step's tolerance is loose, checked in float64).

Before its first timed fit in a process each method runs 3 untimed iterations on 256
rows of the problem, so that no timed fit pays first-call costs (torch's first optimiser
step takes about a second of lazy initialisation). ``--methods FGN,torch``: only the
methods whose name contains one of those substrings (case-insensitive). ``--max-iter N``
caps every method's iterations (torch's L-BFGS otherwise runs up to 5000, which on a
weakly regularised 1000-class problem takes many minutes); ``--no-curvature-sample``
makes FGN take its curvature on every row (the A/B of the subsampled steps);
``--tuning NAME=VALUE`` (repeatable) sets a tuning constant (``sklearn_fgn.core.Tuning``).

Problems
--------
Those of ``exact_fit.py`` (``make_problems``): the standardised ``make_classification``
problem (20000 x 256 x 100, C = 1), digits (C = 1), and the embedding-like
``_data.make_embeddings(50000, 768, 200, exponent=2)`` (power-law covariance spectrum,
rows L2-normalised, C = 3), raw and after ``StandardScaler``; ``--quick`` makes them
small. ``--problems raw,synthetic``: only those of them whose name contains one of
those substrings. ``--extra NAME[@C]`` (repeatable, or comma-separated) adds problems
by their ``_data.load_problem`` name, e.g. ``emb:100000x512x1000:2@1``,
``emb:100000x512x1000:2:std`` or ``100000x512x1000``: the training part of its 80/20
split, C after ``@`` (default 1). Extras always run, whatever ``--problems`` says
(``--problems none`` runs the extras alone). ``--dtype float32`` casts every
problem's features to float32 for every method (default float64; in float32 the
gaps below about 1e-6 are at the objective's rounding level).

Run::

    python benchmarks/gap_trajectory.py --problems raw
    python benchmarks/gap_trajectory.py --problems none --extra emb:100000x512x1000:2@1 --dtype float32

Outputs: stdout and ``benchmarks/out/gap_trajectory{,_quick}.md`` (and ``.csv``, ``.json``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import preset_threads  # noqa: E402

preset_threads(sys.argv)

import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

import _common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _data import load_problem  # noqa: E402
from _passes import KINDS, PassCounter  # noqa: E402
from exact_fit import add_ratios, make_problems  # noqa: E402  (the same problems and ratios)
from exact_fit import objective as multinomial_objective  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression, _linear_loss  # noqa: E402

import sklearn_fgn._damping as fgn_damping  # noqa: E402
from sklearn_fgn import FGNClassifier  # noqa: E402
from sklearn_fgn.core import tuning_context  # noqa: E402

GAPS = (1e-2, 1e-3, 1e-4, 1e-6, 1e-8)
RATIO_GAP = 1e-6  # the gap of the ratio to torch's L-BFGS
TORCH_LBFGS = "torch LBFGS (strong Wolfe)"
METHODS = (
    'LogisticRegression(solver="lbfgs")',
    'LogisticRegression(solver="newton-cg")',
    TORCH_LBFGS,
    "FGNClassifier()",
)


class Recorder:
    """Wraps the functions that evaluate ``f`` so that each value is logged with its time and passes."""

    def __init__(self, counter: PassCounter):
        self.counter = counter
        self.log: list[tuple[float, float, float]] = []  # (seconds, f, passes so far)
        self.start = 0.0
        cls = _linear_loss.LinearModelLoss
        self._loss, self._loss_gradient = cls.loss, cls.loss_gradient
        self._fgn = fgn_damping.objective_from_logits

    # --exact-objective: FGN's and torch's evaluations are logged in float64 (see ``note``).
    exact = False

    def note(self, value, exact=None) -> None:
        """Log one evaluation of ``f``: seconds since the start, the value, the passes counted so far.

        With ``Recorder.exact`` and an ``exact`` callable, the value logged is ``exact()``: the same
        objective from the same logits, summed in float64, whose time is taken off the clock.
        """
        seconds = time.perf_counter() - self.start
        if Recorder.exact and exact is not None:
            began = time.perf_counter()
            value = exact()
            self.start += time.perf_counter() - began
        self.log.append((seconds, float(value), self.counter.passes))

    def __enter__(self):
        rec, cls = self, _linear_loss.LinearModelLoss

        def loss(obj, *a, **k):
            value = rec._loss(obj, *a, **k)
            rec.note(value)
            return value

        def loss_gradient(obj, *a, **k):
            value = rec._loss_gradient(obj, *a, **k)
            rec.note(value[0])
            return value

        def fgn_objective(*a, **k):
            value = rec._fgn(*a, **k)
            rec.note(value, lambda: rec._fgn(*_in_float64(a), **_in_float64(k)))
            return value

        cls.loss, cls.loss_gradient = loss, loss_gradient
        fgn_damping.objective_from_logits = fgn_objective
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        cls = _linear_loss.LinearModelLoss
        cls.loss, cls.loss_gradient = self._loss, self._loss_gradient
        fgn_damping.objective_from_logits = self._fgn


def _in_float64(value):
    """``value`` with every floating tensor in it (in tuples, lists and dicts too) cast to float64."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _in_float64(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_in_float64(v) for v in value)
    return value


def objective(coef: np.ndarray, intercept: np.ndarray, X, y_enc, alpha: float) -> float:
    """Mean cross-entropy + alpha/2 ||W||^2: multinomial (``exact_fit.objective``), or one logit for K = 2."""
    if coef.shape[0] > 1:
        return multinomial_objective(coef, intercept, X, y_enc, alpha)
    z = X @ coef[0] + intercept[0]
    return float(np.mean(np.logaddexp(0.0, z) - y_enc * z) + 0.5 * alpha * np.sum(coef * coef))


def fit_torch_lbfgs(X: np.ndarray, y_enc: np.ndarray, n_classes: int, C: float, rec, counter: PassCounter,
                    max_iter: int = 5000):  # fmt: skip
    """Minimise ``f`` by ``torch.optim.LBFGS`` in ``X``'s dtype on the CPU; return the fitted attributes.

    Each closure call adds 2 passes to ``counter`` and its value to ``rec`` (its ``note``).
    """
    Xt = torch.from_numpy(np.ascontiguousarray(X))
    n, d = Xt.shape
    binary = n_classes == 2
    n_logits = 1 if binary else n_classes
    y = torch.from_numpy(y_enc.astype(np.int64))
    target = y.to(Xt.dtype) if binary else y
    W = torch.zeros(n_logits, d, dtype=Xt.dtype, requires_grad=True)
    b = torch.zeros(n_logits, dtype=Xt.dtype, requires_grad=True)
    alpha = 1.0 / (C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)  # fmt: skip

    def closure():
        opt.zero_grad()
        logits = torch.addmm(b, Xt, W.T)
        if binary:
            data = F.binary_cross_entropy_with_logits(logits[:, 0], target)
        else:
            data = F.cross_entropy(logits, target)
        loss = data + 0.5 * alpha * W.square().sum()
        loss.backward()
        counter.add(2.0)  # X W^T forward, G^T X backward (no gradient for X)
        rec.note(loss.item(), lambda: exact(logits.detach(), W.detach()))
        return loss

    def exact(logits, W):
        logits = logits.double()
        if binary:
            data = F.binary_cross_entropy_with_logits(logits[:, 0], target.double())
        else:
            data = F.cross_entropy(logits, target)
        return float(data + 0.5 * alpha * W.double().square().sum())

    opt.step(closure)
    n_iter = opt.state[opt.param_groups[0]["params"][0]]["n_iter"]
    return types.SimpleNamespace(coef_=W.detach().numpy().copy(), intercept_=b.detach().numpy().copy(),
                                 n_iter_=n_iter)  # fmt: skip


def fit_method(method: str, X, y, y_enc, n_classes: int, C: float, rec, counter, max_iter: int | None = None):
    """Fit ``method`` (its own ``max_iter`` unless given); return the fitted model (or its attributes)."""
    if method == TORCH_LBFGS:
        return fit_torch_lbfgs(X, y_enc, n_classes, C, rec, counter, max_iter or 5000)
    if method.startswith("FGN"):
        est = FGNClassifier(alpha=1.0 / C, batch_size=None, tol=1e-10, max_iter=max_iter or 200, device="cpu",
                            random_state=0)  # fmt: skip
    else:
        solver = method.split('"')[1]
        limit = max_iter or (3000 if solver == "lbfgs" else 200)
        est = LogisticRegression(C=C, solver=solver, tol=1e-12, max_iter=limit)
    return est.fit(X, y)


WARMED_UP: set[str] = set()


def warm_up(method: str, X, y, y_enc, n_classes: int, C: float) -> None:
    """A few untimed iterations on 256 rows, once per method and process, so no timed fit pays first calls.

    Torch's first optimiser step costs about a second of lazy initialisation (which would
    otherwise fall on whichever torch method runs first).
    """
    rows = slice(0, min(256, len(y)))
    if method in WARMED_UP or len(np.unique(y[rows])) < 2:
        return
    WARMED_UP.add(method)
    counter = PassCounter(len(y[rows]), X.shape[1], 1 if n_classes == 2 else n_classes)
    no_record = types.SimpleNamespace(note=lambda value, exact=None: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_method(method, X[rows], y[rows], y_enc[rows], n_classes, C, no_record, counter, max_iter=3)


def run_method(method: str, X, y, y_enc, C: float, max_iter: int | None = None):
    """Fit once; return (log of (seconds, f, passes), total seconds, total passes, counter, fitted model)."""
    n_classes = int(y_enc.max()) + 1
    warm_up(method, X, y, y_enc, n_classes, C)
    counter = PassCounter(X.shape[0], X.shape[1], 1 if n_classes == 2 else n_classes)
    with counter, Recorder(counter) as rec, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = fit_method(method, X, y, y_enc, n_classes, C, rec, counter, max_iter)
        total = time.perf_counter() - rec.start
    return rec.log, total, counter.passes, counter, est


def at_gap(log, f_star: float, gap: float) -> tuple[float | None, float | None]:
    """First (seconds, passes) at which the best value so far is within ``gap`` of ``f_star``, else None's."""
    best = np.inf
    for seconds, f, passes in log:
        best = min(best, f)
        if (best - f_star) / abs(f_star) <= gap:
            return seconds, passes
    return None, None


def add_lbfgs_ratio(rows: list[dict], gap: float) -> None:
    """Set each row's ``vs torch@gap``: its ``t@gap (s)`` over torch L-BFGS's, or None."""
    reference = [r[f"t@{gap:g} (s)"] for r in rows if r["method"] == TORCH_LBFGS]
    best = reference[0] if reference else None
    for r in rows:
        t = r[f"t@{gap:g} (s)"]
        r[f"vs torch@{gap:g}"] = None if t is None or best is None else t / best


def run_problem(name: str, X, y, C: float, methods, max_iter: int | None = None) -> list[dict]:
    """Every method once on one problem; one table row per method."""
    y_enc = np.unique(y, return_inverse=True)[1]
    alpha = 1.0 / (C * len(y))
    X64 = X if X.dtype == np.float64 else X.astype(np.float64)  # the guard's objective, in float64
    tolerance = 1e-8 if X.dtype == np.float64 else 1e-5
    runs = {}
    print(f"\n## {name}: {X.shape[0]} x {X.shape[1]}, {y_enc.max() + 1} classes, {X.dtype}, C = {C:g}",
          flush=True)  # fmt: skip
    for method in methods:
        log, total, passes, counter, est = run_method(method, X, y, y_enc, C, max_iter)
        f_fit = objective(est.coef_.astype(np.float64), est.intercept_.astype(np.float64), X64, y_enc, alpha)
        f_last = min(f for _, f, _ in log)
        if abs(f_fit - f_last) > tolerance * abs(f_fit):
            raise RuntimeError(f"{method}: recorded objective {f_last!r} is not the model's {f_fit!r}")
        runs[method] = (log, total, passes, est)
        split = ""
        if method.startswith("FGN"):
            split = " (" + ", ".join(f"{kind} {counter.by_kind[kind]:.1f}" for kind in KINDS) + ")"
        print(f"  {method}: {total:.1f} s, {passes:.1f} passes{split}, {len(log)} evaluations, "
              f"f = {f_fit:.12f}", flush=True)  # fmt: skip
    f_star = min(min(f for _, f, _ in log) for log, _, _, _ in runs.values())
    rows = []
    for method, (log, total, passes, est) in runs.items():
        iters = int(np.max(est.n_iter_))
        row = {"problem": name, "method": method, "total (s)": total, "passes": passes, "iterations": iters,
               "evaluations": len(log)}  # fmt: skip
        for gap in GAPS:
            row[f"t@{gap:g} (s)"], row[f"passes@{gap:g}"] = at_gap(log, f_star, gap)
        row["final gap"] = (min(f for _, f, _ in log) - f_star) / abs(f_star)
        rows.append(row)
    add_ratios(rows, GAPS)
    add_lbfgs_ratio(rows, RATIO_GAP)
    return rows


def parse_extras(specs: list[str]) -> dict:
    """``{load_problem name: C}`` from ``--extra`` values (``NAME[@C]``, comma-separated or repeated)."""
    extras = {}
    for spec in ",".join(specs).split(","):
        if spec.strip():
            name, _, C = spec.strip().partition("@")
            extras[name] = float(C) if C else 1.0
    return extras


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--threads", type=int, default=2, help="threads for BLAS/OpenMP/torch (default 2)"),
        p.add_argument("--problems", default="",
                       help="comma-separated substrings of the built-in problem names to run (default all)"),
        p.add_argument("--extra", action="append", default=[],
                       help="extra problem NAME[@C]: a _data.load_problem name (e.g. emb:3000x64x20:2@1), "
                            "repeatable or comma-separated; always run"),
        p.add_argument("--methods", default="",
                       help="comma-separated substrings of the method names to run (case-insensitive)"),
        p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                       help="dtype of the features for every method (default float64)"),
        p.add_argument("--max-iter", type=int, default=None,
                       help="iteration cap of every method (default: each its own, torch L-BFGS 5000)"),
        p.add_argument("--no-curvature-sample", action="store_true",
                       help="FGN takes its curvature on every row (the fit before issue 33), for an A/B"),
        p.add_argument("--class-sep", type=float, default=1.0,
                       help="class_sep of the isotropic --extra problems (make_classification; default 1)"),
        p.add_argument("--exact-objective", action="store_true",
                       help="log FGN's and torch L-BFGS's objectives summed in float64 from their logits "
                            "(off the clock): float32 sums can disagree by more than a 1e-6 gap"),
        p.add_argument("--tuning", action="append", default=[], metavar="NAME=VALUE",
                       help="set a sklearn_fgn tuning constant for the run (repeatable), for an A/B"),
    ))  # fmt: skip
    print(_common.machine_description())
    Recorder.exact = args.exact_objective
    changes = dict(item.split("=", 1) for item in args.tuning)
    changes = {name: float(v) if any(c in v for c in ".e") else int(v) for name, v in changes.items()}
    if args.no_curvature_sample:
        changes["curvature_sample_share"] = 1.0
    tuned = tuning_context(**changes)  # held for the rest of the run (its exit restores the defaults)
    tuned.__enter__()
    if changes:
        print(f"tuning: {changes}")
    wanted_methods = [w.lower() for w in args.methods.split(",") if w]
    methods = [m for m in METHODS if not wanted_methods or any(w in m.lower() for w in wanted_methods)]
    if not methods:
        raise SystemExit(f"--methods {args.methods!r} matches none of {METHODS}")
    wanted = [w for w in args.problems.split(",") if w]
    problems = {
        name: (X, y, C)
        for name, (X, y, C) in make_problems(args.quick).items()
        if not wanted or any(w in name for w in wanted)
    }
    for name, C in parse_extras(args.extra).items():
        X_train, _, y_train, _ = load_problem(name, class_sep=args.class_sep, dtype=args.dtype)
        problems[name] = (X_train, y_train, C)
    rows = []
    for name, (X, y, C) in problems.items():
        rows += run_problem(name, np.ascontiguousarray(X, dtype=args.dtype), y, C, methods, args.max_iter)
    seconds_columns = ["problem", "method", "total (s)", "iterations", "evaluations"]
    seconds_columns += [f"t@{g:g} (s)" if kind == "t" else f"ratio@{g:g}" for g in GAPS for kind in "tr"]
    seconds_columns += [f"vs torch@{RATIO_GAP:g}", "final gap"]
    passes_columns = ["problem", "method", "passes"] + [f"passes@{gap:g}" for gap in GAPS]
    note = ("Relative gap (f - f*)/|f*| of the best objective each method had evaluated by that time, one "
            "fit per method (lbfgs and newton-cg at tol 1e-12, torch L-BFGS to tolerance_grad 1e-12, FGN at "
            f"tol 1e-10), features in {args.dtype}; wall seconds; ratio = time / fastest scikit-learn "
            f"solver at that gap; vs torch@{RATIO_GAP:g} = time / torch L-BFGS's at that gap.\n"
            f"Machine: {_common.machine_description()}")  # fmt: skip
    passes_note = ("One pass = the multiply-adds of one product of X (all n rows) with a (d, K) matrix, "
                   "n d K (K logits, 1 for two classes); passes@gap = passes counted by the first evaluation "
                   "at that gap; FGN's include the feature metric (d / K passes for its moments, d / K for "
                   "the whitening) and its dense algebra (row-space Grams, Cholesky factors); see "
                   "_passes.py.")  # fmt: skip
    for r in rows:  # "—" for gaps never reached (and ratios without a reference)
        for key in list(r):
            if "@" in key:
                r[key] = "—" if r[key] is None else r[key]
    markdown = (
        "# Time and passes over X to objective gap, one run per method\n\n" + note + "\n\n"
        + _common.markdown_table(rows, seconds_columns)
        + "\n\n## Passes over X\n\n" + passes_note + "\n\n" + _common.markdown_table(rows, passes_columns)
    )  # fmt: skip
    print("\n" + markdown)
    summary = {"rows": rows, "note": note, "passes_note": passes_note, "dtype": args.dtype}
    _common.write_outputs("gap_trajectory", rows, markdown, summary, args.quick)


if __name__ == "__main__":
    main()
