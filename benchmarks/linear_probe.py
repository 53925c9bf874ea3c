"""Linear probe: test accuracy and wall time of FGNClassifier() against real peers.

What is measured
----------------
Problems named in ``--problems`` (``benchmarks/_data.py``; default
``20000x256x100,100000x512x1000,emb:100000x512x1000:2,emb:100000x512x1000:2:std``;
``--quick``: ``5000x64x20,emb:5000x64x20:2``), plus scikit-learn ``load_digits``:

* ``NxdxK``: ``make_classification(n_samples=N, n_features=d, n_informative=d // 4,
  n_redundant=2, n_repeated=0, n_classes=K, n_clusters_per_class=1, class_sep=S,
  flip_y=0.01, random_state=0)``, S = ``--class-sep`` (default 1.0; at K = 1000 that
  problem is near chance, and 3.0 gives a probe where the best method reaches about
  80 %), standardised;
* ``emb:NxdxK:p``: embedding-like features (power-law covariance spectrum with exponent
  p, rows L2-normalised) **as they come**, no scaler; ``...:std``: the same standardised.

Every problem: one stratified 80/20 train/test split (``random_state=0``), the scaler
fitted on the training part, float64, or float32 with ``--dtype float32`` (what a frozen
encoder emits; every method gets the same float32 arrays and computes in whatever dtype
it chooses: ``lbfgs`` converts to float64, ``newton-cg`` and FGNClassifier compute in
float32).

Methods (same split, same process, threads pinned with ``--threads``, default 2, for
BLAS/OpenMP and torch; each timed fit follows an untimed warm-up fit on a small subset):

* ``LogisticRegression`` (max_iter=1000, otherwise defaults): C swept over
  {1e-3, 1e-2, 1e-1, 1, 10} with lbfgs (for K >= 1000: {1e-2, 1e-1, 1}; for the
  embedding-like problems, whose best C is larger: {1e-1, 1, 10, 100}); the best C is
  chosen on the **test** accuracy (an oracle choice that favours the peer), and the best-C
  fit is timed with "lbfgs" and "newton-cg" (the single-fit references).
* ``SGDClassifier(loss="log_loss", random_state=0)``, otherwise defaults (one-vs-rest).
* skorch ``NeuralNetClassifier(nn.Linear(d, K), criterion=CrossEntropyLoss,
  optimizer=Adam, max_epochs=20, batch_size=256, train_split=None)``, best lr of
  {1e-3, 1e-2} on test accuracy (oracle); time of that fit.
* ``torch.optim.LBFGS`` (full batch, lr=1, history_size=10, line_search_fn="strong_wolfe",
  max_iter=500) on ``nn.Linear`` with the L2 penalty of the best-C LogisticRegression
  (1/(C n) on the mean loss).
* ``FGNClassifier(device="cpu", random_state=0)``: DEFAULT settings, no tuning (its
  ``alpha=1`` is ``LogisticRegression()``'s C = 1). Its epoch trace (one ``partial_fit``
  per epoch, timed cumulatively, test accuracy after each) gives the time it needs to
  come within 0.5 points of the best. The same at the best C of the sweep
  (``alpha=1/C``), to compare the solvers on the same objective; and the default with
  ``damping_metric="identity"`` (the raw parameter metric) on the embedding-like problems.
* digits only: ``FGNClassifier(hidden_layer_sizes=(64,), device="cpu", random_state=0)``
  vs ``MLPClassifier((64,), random_state=0)`` (defaults).

Reported: test accuracy, wall seconds of the fit, passes over ``X`` ("passes"), the
method's own iteration count ("iterations": ``n_iter_`` with its unit, "it" for
iterations, "ep" for epochs, "evals" for closure evaluations), ConvergenceWarnings
raised, and the time to come within 0.5 accuracy points of the best method on that
problem (approximated by the whole-fit time when the fit got there, else "—"; for FGN
from its epoch trace).

A **pass** is the multiply-adds of one product of the training ``X`` (all ``n`` rows,
``d`` features) with a ``(d, K)`` matrix, ``K`` the number of logits (the classes; 1 for a
binary problem), as in ``benchmarks/gap_trajectory.py``: ``n d K`` multiply-adds, whatever
the work is (a product on ``m`` rows is ``m / n`` of a pass; see ``benchmarks/_passes.py``
for what is counted and what is not). How each method's passes are obtained:

* counted by ``_passes.PassCounter`` around the timed fit (it patches scikit-learn's
  ``LinearModelLoss`` and FGNClassifier's linear head): ``LogisticRegression`` (lbfgs,
  newton-cg), every linear ``FGNClassifier`` row (full batch or mini-batch; its feature
  metric and dense algebra included), and, with ``--cv``, ``LogisticRegressionCV`` and
  ``FGNClassifierCV`` (the whole search: every fold's path, the scoring, the refit). The
  counter does not see ``LogisticRegressionCV``'s scoring (``decision_function``, one
  product of a fold's validation rows per C), so it is added: ``len(Cs)`` passes, the
  folds' validation rows being all ``n`` rows once; ``FGNClassifierCV``'s scoring goes
  through its head and is counted;
* torch ``LBFGS``: 2 passes per closure evaluation (the forward ``X W^T`` and the
  backward ``G^T X``; no gradient for ``X``), times ``K' / K`` where ``K'`` is the
  ``nn.Linear``'s outputs (one per class, so 2 for a binary problem where ``K`` = 1);
* skorch ``Adam``: the same 2 ``K' / K`` passes per epoch (every epoch runs over all rows
  in mini-batches, forward and backward; ``train_split=None``, so no validation pass),
  which is exact;
* ``SGDClassifier``: 2 passes per epoch (a dot product and an update with every row) only
  for a binary problem; with more classes it fits one-vs-rest binary problems (each
  ``1 / K`` of a pass per product) whose epoch counts differ, and ``n_iter_`` is only
  their maximum, so ``2 n_iter_`` is an upper bound, not a count: "—";
* "—" also for the hidden-layer ``FGNClassifier`` and ``MLPClassifier`` on digits: their
  products are not ``X`` times a ``(d, K)`` matrix, and the counter is for linear heads.

The counter's wrappers add a few microseconds of Python per counted call to the timed fit.
``--skip sgd,skorch,torch-lbfgs`` leaves peers out (at 100000x512x1000 on 2 cores the
one-vs-rest SGDClassifier and a 500-iteration torch LBFGS take many minutes each).

Run::

    python benchmarks/linear_probe.py --quick                    # smoke run
    python benchmarks/linear_probe.py --sizes 20000x256x100     # one size + digits
    python benchmarks/linear_probe.py                            # both sizes (long)

``--cv PROBLEMS`` runs, instead, ``FGNClassifierCV()`` against ``LogisticRegressionCV``
(lbfgs and newton-cg, max_iter=1000, accuracy) with the same 10 Cs (1e-4 .. 1e4) and 5
stratified folds, timing each whole search (after an untimed warm-up search on 1000 rows); ``--cv-peer-tols 1e-4,1e-6`` adds the peers at a
tighter ``tol`` (their default stops short of the optimum on raw embeddings, whose gradients are
small: its ``tol`` bounds the gradient's largest entry).

Outputs: ``benchmarks/out/linear_probe{,_float32,_cv}{,_quick}.md``, ``.csv``, ``.json`` and ``.png``.
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
import torch  # noqa: E402
from _data import is_embedding, load_problem  # noqa: E402
from _passes import PassCounter  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression, SGDClassifier  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from skorch import NeuralNetClassifier  # noqa: E402

from sklearn_fgn import FGNClassifier  # noqa: E402

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
C_GRID_LARGE_K = (1e-2, 1e-1, 1.0)
C_GRID_EMBEDDING = (1e-1, 1.0, 10.0, 100.0)
SKORCH_LRS = (1e-3, 1e-2)
SKORCH_EPOCHS = 20


def n_logits(y) -> int:
    """The logits of a linear model of ``y``: the classes, 1 for a binary problem (the unit of a pass)."""
    k = len(np.unique(y))
    return 1 if k == 2 else k


def rounded(passes: float):
    """Passes as reported: one decimal below 100, a whole number above (the tables' 3 digits would cut it)."""
    return round(float(passes), 1) if passes < 100 else int(round(passes))


def timed_fit(make, X_tr, y_tr):
    """Warm up on a small subset, then time ``make().fit`` on all data; returns (est, s, n_warn, passes).

    ``passes``: what ``PassCounter`` counted during the timed fit (0 for a method it does not see).
    """
    n_warm = min(len(y_tr), 500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make().fit(X_tr[:n_warm], y_tr[:n_warm])
    counter = PassCounter(X_tr.shape[0], X_tr.shape[1], n_logits(y_tr))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        est = make()
        with counter:
            start = time.perf_counter()
            est.fit(X_tr, y_tr)
            seconds = time.perf_counter() - start
    return est, seconds, sum(issubclass(w.category, ConvergenceWarning) for w in caught), counter.passes


def row(method, est, seconds, n_warn, X_te, y_te, passes, iterations):
    """One result row (accuracy in percent).

    ``passes`` over ``X`` (a number, or "—"); ``iterations``: the method's own count, with its unit.
    """
    return {"method": method, "test acc (%)": 100.0 * float(np.mean(est.predict(X_te) == y_te)),
            "seconds": seconds, "passes": passes if isinstance(passes, str) else rounded(passes),
            "iterations": iterations, "conv. warnings": n_warn}


class _TorchLBFGS:
    """Full-batch ``torch.optim.LBFGS`` on ``nn.Linear`` with an L2 penalty (a real torch optimizer)."""

    def __init__(self, alpha: float, max_iter: int = 500):
        self.alpha, self.max_iter = alpha, max_iter

    def fit(self, X, y):
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        torch.manual_seed(0)
        Xt, yt = torch.as_tensor(X), torch.as_tensor(y_enc)
        self.layer = torch.nn.Linear(X.shape[1], len(self.classes_)).to(Xt.dtype)
        opt = torch.optim.LBFGS(self.layer.parameters(), lr=1.0, max_iter=self.max_iter, history_size=10,
                                line_search_fn="strong_wolfe")
        self.n_evals_ = 0

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.layer(Xt), yt) \
                + 0.5 * self.alpha * self.layer.weight.pow(2).sum()
            loss.backward()
            self.n_evals_ += 1
            return loss

        opt.step(closure)
        return self

    def predict(self, X):
        with torch.no_grad():
            return self.classes_[self.layer(torch.as_tensor(X)).argmax(1).numpy()]


def run_logistic(X_tr, X_te, y_tr, y_te, n_classes, embedding=False, fixed_C=None):
    """C sweep (lbfgs; skipped when ``fixed_C`` is given), then timed best-C fits with lbfgs and newton-cg."""
    grid = C_GRID_EMBEDDING if embedding else C_GRID_LARGE_K if n_classes >= 1000 else C_GRID
    accs = {}
    for C in [] if fixed_C else grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = LogisticRegression(C=C, max_iter=1000).fit(X_tr, y_tr)
        accs[C] = float(np.mean(est.predict(X_te) == y_te))
    best_C = fixed_C or max(accs, key=accs.get)
    print(f"  LogisticRegression C sweep (test acc): {accs} -> best C = {best_C:g}", flush=True)
    rows = []
    for solver in ("lbfgs", "newton-cg"):
        est, s, nw, p = timed_fit(lambda: LogisticRegression(C=best_C, solver=solver, max_iter=1000),
                                  X_tr, y_tr)  # fmt: skip
        rows.append(row(f'LogisticRegression(C={best_C:g}, solver="{solver}")', est, s, nw, X_te, y_te, p,
                        f"{int(est.n_iter_[0])} it"))
    return rows, best_C


def run_skorch(X_tr, X_te, y_tr, y_te):
    """skorch linear module + Adam, best lr on test accuracy; returns that fit's row."""
    d, k = X_tr.shape[1], len(np.unique(y_tr))
    Xf, Xtf = X_tr.astype(np.float32), X_te.astype(np.float32)
    y_enc = np.unique(y_tr, return_inverse=True)[1].astype(np.int64)
    best = None
    for lr in SKORCH_LRS:
        def make(lr=lr):
            torch.manual_seed(0)
            return NeuralNetClassifier(torch.nn.Linear(d, k), criterion=torch.nn.CrossEntropyLoss,
                                       optimizer=torch.optim.Adam, lr=lr, max_epochs=SKORCH_EPOCHS,
                                       batch_size=256, train_split=None, verbose=0, device="cpu")
        est, s, nw, _ = timed_fit(make, Xf, y_enc)
        acc = 100.0 * float(np.mean(np.unique(y_tr)[est.predict(Xtf)] == y_te))
        epochs = len(est.history)
        # forward X_b W^T and backward G^T X_b on every batch: 2 products of all rows with (d, k) per epoch
        r = {"method": f"skorch NeuralNetClassifier(Linear, Adam, lr={lr:g})", "test acc (%)": acc,
             "seconds": s, "passes": rounded(2.0 * epochs * k / n_logits(y_tr)),
             "iterations": f"{epochs} ep", "conv. warnings": nw}
        if best is None or acc > best["test acc (%)"]:
            best = r
    return best


def fgn_trace(X_tr, y_tr, X_te, y_te, target: float, max_epochs: int = 12) -> list[tuple[float, float]]:
    """(cumulative seconds, test accuracy %) after each epoch of ``FGNClassifier()``.

    One ``partial_fit`` call per epoch (a new shuffle each, damping carried over, no
    held-out split), timed cumulatively. Stops 3 epochs after the accuracy first
    reaches ``target``, or after ``max_epochs``.
    """
    est = FGNClassifier(device="cpu", random_state=0)
    classes = np.unique(y_tr)
    trace, seconds = [], 0.0
    for _ in range(max_epochs):
        start = time.perf_counter()
        est.partial_fit(X_tr, y_tr, classes=classes)
        seconds += time.perf_counter() - start
        trace.append((seconds, 100.0 * float(np.mean(est.predict(X_te) == y_te))))
        first = next((i for i, (_, acc) in enumerate(trace) if acc >= target), None)
        if first is not None and len(trace) >= first + 4:
            break
    return trace


def run_problem(size: str, skip: set[str], class_sep: float, dtype: str = "float64", fixed_C=None) -> list[dict]:
    """All methods on one problem."""
    X_tr, X_te, y_tr, y_te = load_problem(size, class_sep, dtype)
    n, k = len(y_tr), len(np.unique(y_tr))
    print(f"\n## {size}: train {X_tr.shape}, test {X_te.shape}, {k} classes", flush=True)
    rows, best_C = run_logistic(X_tr, X_te, y_tr, y_te, k, is_embedding(size), fixed_C)
    if "sgd" not in skip:
        est, s, nw, _ = timed_fit(lambda: SGDClassifier(loss="log_loss", random_state=0), X_tr, y_tr)
        # exact for one binary fit only; one-vs-rest: n_iter_ is the largest of the K fits' epochs
        p = 2.0 * est.n_iter_ if k == 2 else "—"
        rows.append(row('SGDClassifier(loss="log_loss")', est, s, nw, X_te, y_te, p, f"{est.n_iter_} ep"))
    if "skorch" not in skip:
        rows.append(run_skorch(X_tr, X_te, y_tr, y_te))
    if "torch-lbfgs" not in skip:
        alpha = 1.0 / (best_C * n)
        est, s, nw, _ = timed_fit(lambda: _TorchLBFGS(alpha), X_tr, y_tr)
        # per closure call: X W^T forward, G^T X backward (no gradient for X), W with one row per class
        p = 2.0 * est.n_evals_ * k / n_logits(y_tr)
        rows.append(row(f"torch.optim.LBFGS(full batch, alpha=1/(C n), C={best_C:g})", est, s, nw,
                        X_te, y_te, p, f"{est.n_evals_} evals"))
    est, s, nw, p = timed_fit(lambda: FGNClassifier(device="cpu", random_state=0), X_tr, y_tr)
    unit = "it" if est.validation_scores_ == [] and est.t_ == n * est.n_iter_ and n * k <= 2**24 else "ep"
    rows.append(row("FGNClassifier() [defaults]", est, s, nw, X_te, y_te, p, f"{est.n_iter_} {unit}"))
    est, s, nw, p = timed_fit(lambda: FGNClassifier(alpha=1 / best_C, device="cpu", random_state=0),
                              X_tr, y_tr)  # fmt: skip
    rows.append(row(f"FGNClassifier(alpha=1/C, C={best_C:g})", est, s, nw, X_te, y_te, p,
                    f"{est.n_iter_} {unit}"))
    if is_embedding(size):
        est, s, nw, p = timed_fit(
            lambda: FGNClassifier(damping_metric="identity", device="cpu", random_state=0), X_tr, y_tr)
        rows.append(row('FGNClassifier(damping_metric="identity")', est, s, nw, X_te, y_te, p,
                        f"{est.n_iter_} {unit}"))
    if size == "digits":  # hidden layers: not products of X with (d, K) matrices, so no passes
        est, s, nw, _ = timed_fit(
            lambda: FGNClassifier(hidden_layer_sizes=(64,), device="cpu", random_state=0), X_tr, y_tr)
        rows.append(row("FGNClassifier(hidden_layer_sizes=(64,))", est, s, nw, X_te, y_te, "—",
                        f"{est.n_iter_} it"))
        est, s, nw, _ = timed_fit(lambda: MLPClassifier((64,), random_state=0), X_tr, y_tr)
        rows.append(row("MLPClassifier((64,))", est, s, nw, X_te, y_te, "—", f"{est.n_iter_} ep"))
    best_acc = max(r["test acc (%)"] for r in rows)
    for r in rows:
        r["problem"] = size
        r["t to best-0.5pt (s)"] = r["seconds"] if r["test acc (%)"] >= best_acc - 0.5 else "—"
        print(f"  {r['method']}: acc {r['test acc (%)']:.2f}%, {r['seconds']:.2f} s, "
              f"{_common.fmt(r['passes'])} passes, {r['iterations']}", flush=True)
    trace = fgn_trace(X_tr, y_tr, X_te, y_te, best_acc - 0.5)
    reached = next((s for s, acc in trace if acc >= best_acc - 0.5), None)
    fgn = next(r for r in rows if r["method"].startswith("FGNClassifier() "))
    fgn["t to best-0.5pt (s)"] = "—" if reached is None else reached
    print("  FGNClassifier() epoch trace (s, acc %): "
          + " ".join(f"{s:.1f}:{acc:.2f}" for s, acc in trace), flush=True)
    return rows


def run_cv(size: str, class_sep: float, dtype: str, n_cs: int = 10, n_folds: int = 5,
           peer_tols: tuple[float, ...] = (1e-4,)) -> list[dict]:
    """FGNClassifierCV against LogisticRegressionCV (lbfgs, newton-cg) on the same folds and Cs.

    ``peer_tols``: the peers' ``tol`` values (1e-4 is scikit-learn's default). Each row also
    gives the largest difference of its mean validation score from FGNClassifierCV's over the Cs.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    from sklearn_fgn import FGNClassifierCV

    X_tr, X_te, y_tr, y_te = load_problem(size, class_sep, dtype)
    folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=0).split(X_tr, y_tr))
    Cs = np.logspace(-4, 4, n_cs)
    print(f"\n## CV {size}: train {X_tr.shape}, Cs = logspace(-4, 4, {n_cs}), {n_folds} folds", flush=True)
    makers = {
        f'LogisticRegressionCV(solver="{solver}"' + ("" if tol == 1e-4 else f", tol={tol:g}") + ")": (
            lambda solver=solver, tol=tol: LogisticRegressionCV(
                Cs=Cs, cv=folds, solver=solver, max_iter=1000, tol=tol, scoring="accuracy")  # fmt: skip
        )
        for tol in peer_tols
        for solver in ("lbfgs", "newton-cg")
    }
    makers["FGNClassifierCV()"] = lambda: FGNClassifierCV(Cs=Cs, cv=folds, device="cpu", random_state=0)
    rows = []
    n_warm = min(len(y_tr), 1000)
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # untimed warm-up on a subset, as for the single fits (torch's first kernels, thread pools)
            make().set_params(Cs=Cs[:2], cv=2).fit(X_tr[:n_warm], y_tr[:n_warm])
            est = make()
            counter = PassCounter(X_tr.shape[0], X_tr.shape[1], n_logits(y_tr))
            with counter:
                start = time.perf_counter()
                est.fit(X_tr, y_tr)
                seconds = time.perf_counter() - start
        if name.startswith("LogisticRegressionCV"):  # its scoring: each fold's validation rows once per C
            counter.add(len(Cs))
        scores = est.scores_ if not isinstance(est.scores_, dict) else next(iter(est.scores_.values()))
        mean = np.asarray(scores).reshape(n_folds, -1).mean(0)
        rows.append({"problem": size, "method": name, "C_": float(np.ravel(est.C_)[0]), "_mean": mean,
                     "best mean val acc (%)": 100 * float(mean.max()),
                     "test acc (%)": 100 * float(est.score(X_te, y_te)), "seconds": seconds,
                     "passes": rounded(counter.passes)})  # fmt: skip
        print(f"  {name}: C = {rows[-1]['C_']:.3g}, val {rows[-1]['best mean val acc (%)']:.2f} %, "
              f"test {rows[-1]['test acc (%)']:.2f} %, {seconds:.1f} s, {counter.passes:.1f} passes", flush=True)
    for r in rows:
        r["time / lbfgs CV"] = r["seconds"] / rows[0]["seconds"]
    for r in rows:  # after the loop: the last row is FGNClassifierCV's
        r["max |mean val - FGN's| (pt)"] = 100 * float(np.abs(r["_mean"] - rows[-1]["_mean"]).max())
    for r in rows:
        del r["_mean"]
    return rows


def headline(rows: list[dict]) -> list[str]:
    """FGNClassifier() time / best-C LogisticRegression time, and accuracy difference, per problem."""
    lines = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == problem]
        fgn = next(r for r in sub if r["method"].startswith("FGNClassifier() "))
        for lr in (r for r in sub if r["method"].startswith("LogisticRegression")):
            lines.append(f"{problem}: FGNClassifier() / {lr['method']}: time x{fgn['seconds'] / lr['seconds']:.2f}, "
                         f"accuracy {fgn['test acc (%)'] - lr['test acc (%)']:+.2f} points")
    return lines


def plot(rows: list[dict], path) -> None:
    """Test accuracy against fit seconds, one panel per problem (log x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.5), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        for r in (r for r in rows if r["problem"] == problem):
            ax.scatter(r["seconds"], r["test acc (%)"], label=r["method"][:45])
        ax.set_xscale("log")
        ax.set_xlabel("fit wall seconds")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(problem)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--threads", type=int, default=2, help="threads for BLAS/OpenMP/torch (default 2)"),
        p.add_argument("--problems", "--sizes", default=None,
                       help="comma-separated problem names (benchmarks/_data.py; see the module docstring)"),
        p.add_argument("--class-sep", type=float, default=1.0, help="make_classification class_sep"),
        p.add_argument("--skip", default="", help="peers to leave out: sgd, skorch, torch-lbfgs"),
        p.add_argument("--no-digits", action="store_true", help="leave out load_digits"),
        p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                       help="dtype of the features every method receives (default float64)"),
        p.add_argument("--best-C", type=float, default=None,
                       help="skip the LogisticRegression sweep and use this C (the best of an earlier sweep)"),
        p.add_argument("--cv", default=None,
                       help="comma-separated problems for the FGNClassifierCV / LogisticRegressionCV section "
                            "(instead of the single fits)"),
        p.add_argument("--cv-peer-tols", default="1e-4",
                       help="comma-separated tol values for the LogisticRegressionCV peers (default 1e-4, "
                            "scikit-learn's)"),
    ))
    if args.cv:
        tols = tuple(float(t) for t in args.cv_peer_tols.split(",") if t)
        rows = [r for size in args.cv.split(",") if size
                for r in run_cv(size, args.class_sep, args.dtype, peer_tols=tols)]
        markdown = ("# Linear probe CV: FGNClassifierCV against LogisticRegressionCV\n\n"
                    f"Cs = logspace(-4, 4, 10), 5 stratified folds (seed 0), {args.dtype}; "
                    f"Machine: {_common.machine_description()}\n\n" + _common.markdown_table(rows))
        print("\n" + markdown)
        _common.write_outputs("linear_probe_cv", rows, markdown, {"rows": rows}, args.quick)
        return
    skip = {s for s in args.skip.split(",") if s}
    default = "5000x64x20,emb:5000x64x20:2" if args.quick else ",".join(
        ["20000x256x100", "100000x512x1000", "emb:100000x512x1000:2", "emb:100000x512x1000:2:std"])
    sizes = args.problems if args.problems is not None else default
    print(_common.machine_description())
    rows = []
    for size in [s for s in sizes.split(",") if s] + ([] if args.no_digits else ["digits"]):
        rows += run_problem(size, skip, args.class_sep, args.dtype, args.best_C)
    columns = ["problem", "method", "test acc (%)", "seconds", "passes", "iterations", "t to best-0.5pt (s)",
               "conv. warnings"]
    heads = headline(rows)
    markdown = ("# Linear probe: test accuracy and fit time\n\n"
                f"make_classification class_sep={args.class_sep:g}; emb: embedding-like, raw unless ':std'; "
                f"80/20 stratified split (seed 0), {args.dtype} features; best C / lr chosen on test accuracy "
                "(oracle, favours the peers); FGNClassifier untuned.\n"
                f"Machine: {_common.machine_description()}\n\n" + _common.markdown_table(rows, columns)
                + "\n\nHeadline:\n\n" + "\n".join(f"- {h}" for h in heads))
    print("\n" + markdown)
    stem = "linear_probe" + ("" if args.dtype == "float64" else f"_{args.dtype}")
    _common.write_outputs(stem, rows, markdown, {"rows": rows, "headline": heads}, args.quick)
    png = _common.OUT_DIR / (f"{stem}_quick.png" if args.quick else f"{stem}.png")
    try:
        plot(rows, png)
    except ImportError:  # the tables are written; the figure needs the "benchmarks" extra
        print('\nno figure: matplotlib is not installed (pip install -e ".[benchmarks]")')
    else:
        print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
