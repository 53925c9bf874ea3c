"""The default mini-batch fit's stopping rule: a patience of 5 epochs (the default) against 2.

What is measured
----------------
``FGNClassifier()`` with its defaults (a hold-out of at most 2048 rows, the
best epoch's parameters kept, ``n_iter_no_change=5``) against the same with
``n_iter_no_change=2``, in one process, on the problem shapes the default
must serve (``benchmarks/_data.py`` names):

* isotropic many-class: ``100000x512x1000``, class_sep 3, standardised;
* few samples per class: ``30000x256x1000``, class_sep 3 (24 training rows per class),
  and the same with 64 features (``30000x64x1000``), whose held-out score dips after
  the first epoch and then climbs for some fifty epochs;
* many samples per class: ``250000x128x100``, class_sep 1.5 (2000 per class);
* embedding-like, raw (L2-normalised rows, power-law spectrum): ``emb:100000x256x300:2``,
  and the same standardised (``...:std``).

(On the raw ``emb:100000x512x1000:2`` the held-out score rises every epoch
for more than ten epochs, so both patiences run the same epochs there.)

Each fit reports test accuracy, wall seconds, epochs, and the epoch whose
parameters were kept. ``LogisticRegression(C)`` (lbfgs) is timed beside them
where ``PROBLEMS`` gives a problem's best C (found by the C sweep of
``linear_probe.py``; the sweep itself is not timed here), and the ratio of
each FGN fit's time to it is reported.

Run::

    python benchmarks/default_stopping.py                    # all shapes (a few minutes on 2 cores)
    python benchmarks/default_stopping.py --quick            # a small smoke run
"""

from __future__ import annotations

import sys

from _threads import preset_threads  # noqa: E402

preset_threads(sys.argv)

import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from _common import markdown_table, parse_args, write_outputs  # noqa: E402  (pins the threads)
from _data import load_problem  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from sklearn_fgn import FGNClassifier  # noqa: E402

# (problem, class_sep, best C of linear_probe.py's lbfgs sweep or None)
PROBLEMS = [
    ("100000x512x1000", 3.0, 0.01),
    ("30000x256x1000", 3.0, None),
    ("30000x64x1000", 3.0, None),
    ("250000x128x100", 1.5, None),
    ("emb:100000x256x300:2", 1.0, None),
    ("emb:100000x256x300:2:std", 1.0, None),
]
QUICK = [("30000x64x1000", 3.0, None), ("emb:30000x64x1000:2", 1.0, None)]  # mini-batch fits
PATIENCES = (5, 2)


def fit_fgn(patience: int, X_tr, y_tr, X_te, y_te) -> dict:
    """One default fit with ``n_iter_no_change=patience``; its row."""
    est = FGNClassifier(n_iter_no_change=patience, device="cpu", random_state=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X_tr, y_tr)
    seconds = time.perf_counter() - start
    scores = est.validation_scores_
    kept = 1 + int(np.argmax(scores)) if scores else est.n_iter_
    return {
        "method": f"FGNClassifier(n_iter_no_change={patience})" + (" [default]" if patience == 5 else ""),
        "test acc (%)": 100.0 * float(np.mean(est.predict(X_te) == y_te)),
        "seconds": seconds, "epochs": est.n_iter_, "kept epoch": kept,
    }  # fmt: skip


def fit_logistic(C: float, X_tr, y_tr, X_te, y_te) -> dict:
    """``LogisticRegression(C)`` with lbfgs, timed; its row."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = LogisticRegression(C=C, max_iter=1000).fit(X_tr, y_tr)
    seconds, accuracy = time.perf_counter() - start, 100.0 * float(np.mean(est.predict(X_te) == y_te))
    return {
        "method": f"LogisticRegression(C={C:g})", "test acc (%)": accuracy, "seconds": seconds,
        "epochs": f"{int(est.n_iter_[0])} it", "kept epoch": "",
    }  # fmt: skip


def run(problem: str, class_sep: float, best_C: float | None) -> list[dict]:
    """Both patiences (and LogisticRegression at ``best_C``) on one problem."""
    X_tr, X_te, y_tr, y_te = load_problem(problem, class_sep, "float32")
    print(f"\n## {problem} (class_sep {class_sep:g}): train {X_tr.shape}", flush=True)
    with warnings.catch_warnings():  # warm-up, untimed
        warnings.simplefilter("ignore", ConvergenceWarning)
        FGNClassifier(max_iter=1, device="cpu").fit(X_tr[:2000], y_tr[:2000])
    rows = [fit_fgn(p, X_tr, y_tr, X_te, y_te) for p in PATIENCES]
    if best_C is not None:
        rows.append(fit_logistic(best_C, X_tr, y_tr, X_te, y_te))
        for r in rows:
            r["time / LR"] = r["seconds"] / rows[-1]["seconds"]
    for r in rows:
        r["problem"] = problem
        print(f"  {r['method']}: {r['test acc (%)']:.2f} %, {r['seconds']:.2f} s, {r['epochs']} "
              f"(kept {r['kept epoch']})", flush=True)  # fmt: skip
    return rows


def main() -> None:
    args = parse_args(__doc__)
    rows = [r for p in (QUICK if args.quick else PROBLEMS) for r in run(*p)]
    columns = ["problem", "method", "test acc (%)", "seconds", "epochs", "kept epoch", "time / LR"]
    markdown = markdown_table(rows, columns)
    print("\n" + markdown)
    write_outputs("default_stopping", rows, markdown, {}, args.quick)


if __name__ == "__main__":
    main()
