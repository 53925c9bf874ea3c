"""Linear probe on frozen embeddings: FGNClassifier next to LogisticRegression.

The "embeddings" are synthetic: ``make_classification`` with 20000 samples,
256 features (64 informative, 64 redundant), 50 classes, ``class_sep=1.5``,
``random_state=0`` — the shape of a probe on a small frozen encoder. Both
models fit the same standardized 80/20 split with the same thread count, and
the script prints test accuracy and wall seconds for each.

Run: ``python examples/linear_probe.py [--threads 2] [--device auto]``.
"""

import argparse
import os
import time


def _pin_threads(n):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    _pin_threads(args.threads)

    import torch
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from sklearn_fgn import FGNClassifier

    torch.set_num_threads(args.threads)
    X, y = make_classification(
        n_samples=20000, n_features=256, n_informative=64, n_redundant=64,
        n_classes=50, class_sep=1.5, random_state=0,
    )  # fmt: skip
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)

    models = {
        "LogisticRegression(C=1.0)": LogisticRegression(C=1.0, max_iter=1000),
        "FGNClassifier()": FGNClassifier(device=args.device, random_state=0),
    }
    print(f"{'model':28s} {'test accuracy':>14s} {'seconds':>9s}")
    with threadpool_limits(args.threads):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(X_train, y_train)
            seconds = time.perf_counter() - start
            print(f"{name:28s} {model.score(X_test, y_test):14.4f} {seconds:9.2f}")


if __name__ == "__main__":
    main()
