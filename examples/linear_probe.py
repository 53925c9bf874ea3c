"""Linear probe on embeddings as an encoder emits them: FGN against scikit-learn.

The "embeddings" are synthetic and look like a frozen encoder's output: rows
L2-normalised, a power-law covariance spectrum over four decades, 20 classes
whose structure lives mostly in the leading directions (``make_embeddings``
below). No scaler: users feed them as they come.

``LogisticRegression(C=1)`` and ``FGNClassifier()`` (its ``alpha = 1 / C = 1``)
minimise the same objective; the script prints both accuracies, how often
their predictions agree, and the fit times. ``examples/linear_probe_cv.py``
chooses ``C`` by cross-validation, as probe protocols do.

Run: ``python examples/linear_probe.py [--threads 2] [--device auto]``.
"""

import argparse
import os
import time


def _pin_threads(n):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def make_embeddings(n, d, n_classes, seed=0):
    """Rows L2-normalised, covariance spectrum ``j^-2``, class means decaying one power faster."""
    import numpy as np

    rng = np.random.default_rng(seed)
    j = np.arange(1, d + 1)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    means = rng.standard_normal((n_classes, d)) * j ** -1.5 * 2.0
    y = rng.integers(0, n_classes, size=n)
    X = (means[y] + rng.standard_normal((n, d)) * j**-1.0) @ basis.T
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def _timed(model, X, y):
    start = time.perf_counter()
    model.fit(X, y)
    return model, time.perf_counter() - start


def _one_fit(X_train, X_test, y_train, y_test, device):
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from sklearn_fgn import FGNClassifier

    lr, t_lr = _timed(LogisticRegression(C=1.0, max_iter=1000), X_train, y_train)
    fgn, t_fgn = _timed(FGNClassifier(device=device, random_state=0), X_train, y_train)
    agree = np.mean(lr.predict(X_test) == fgn.predict(X_test))
    print("One fit at C = 1 (the same objective for both):")
    print(f"  LogisticRegression(C=1)   test accuracy {lr.score(X_test, y_test):6.2%}   fit {t_lr:6.2f} s")
    print(f"  FGNClassifier()           test accuracy {fgn.score(X_test, y_test):6.2%}   fit {t_fgn:6.2f} s")
    print(f"  Their test predictions agree on {agree:.1%}: both found the optimum of that objective.")
    print(f"  FGNClassifier took {t_fgn / t_lr:.2f}x the time of LogisticRegression.\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    _pin_threads(args.threads)  # before numpy and torch start their thread pools

    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    X, y = make_embeddings(12000, 128, 20)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"Linear probe on raw embedding-like features: {len(X_train)} train / {len(X_test)} test rows, "
        f"{X.shape[1]} features, {len(np.unique(y))} classes (chance {1 / len(np.unique(y)):.0%}); "
        f"{args.threads} threads, FGN on {device}; times are wall seconds of fit().\n"
    )
    with threadpool_limits(args.threads):
        _one_fit(X_train, X_test, y_train, y_test, device)
    print("Cross-validating C as a probe protocol does: examples/linear_probe_cv.py (FGNClassifierCV).")


if __name__ == "__main__":
    main()
