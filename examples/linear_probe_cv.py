"""A linear-probe sweep as a user runs it: validation accuracy against C, FGN and scikit-learn.

Raw embedding-like features (``make_embeddings`` of ``examples/linear_probe.py``:
L2-normalised rows, power-law spectrum), 5-fold cross-validation over 10 values
of C from 1e-2 to 1e4 with ``FGNClassifierCV`` and ``LogisticRegressionCV``
(lbfgs) on the same folds. Prints the chosen C, the refitted model's test
accuracy and the wall seconds of each, and saves mean validation accuracy
against C for both to ``examples/out/linear_probe_cv.png`` when matplotlib is
installed.

Run: ``python examples/linear_probe_cv.py [--threads 2] [--device auto]``.
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path


def _plot(Cs, scores, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, mean in scores.items():
        ax.semilogx(Cs, 100 * mean, marker="o", label=name)
    ax.set_xlabel("C (FGN: alpha = 1 / C)")
    ax.set_ylabel("mean validation accuracy (%)")
    ax.set_title("5-fold CV on raw embedding-like features")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, train_test_split
    from threadpoolctl import threadpool_limits

    from sklearn_fgn import FGNClassifierCV

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from linear_probe import make_embeddings

    torch.set_num_threads(args.threads)
    X, y = make_embeddings(12000, 128, 20)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X_train, y_train))
    Cs = np.logspace(-2, 4, 10)
    models = {
        "LogisticRegressionCV": LogisticRegressionCV(Cs=Cs, cv=folds, max_iter=1000, scoring="accuracy"),
        "FGNClassifierCV": FGNClassifierCV(Cs=Cs, cv=folds, device=args.device, random_state=0),
    }
    scores = {}
    with threadpool_limits(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9's announced default changes
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(X_train, y_train)
            seconds = time.perf_counter() - start
            scores[name] = np.asarray(model.scores_[1] if isinstance(model.scores_, dict) else model.scores_)
            scores[name] = scores[name].reshape(len(folds), -1).mean(0)
            C, accuracy = float(np.ravel(model.C_)[0]), model.score(X_test, y_test)
            print(f"{name:22s} C = {C:<9.3g} test accuracy {accuracy:6.2%}   {seconds:6.2f} s")
    _plot(Cs, scores, Path(__file__).resolve().parent / "out" / "linear_probe_cv.png")


if __name__ == "__main__":
    main()
