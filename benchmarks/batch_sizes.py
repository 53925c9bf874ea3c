"""FGNClassifier's default fit at several batch sizes, on one device: where does "auto" stand?

For each problem (``benchmarks/_data.py`` names) and each ``batch_size``,
fits ``FGNClassifier(device=..., batch_size=b, random_state=0)`` (other
settings default) after an untimed warm-up, and prints test accuracy, wall
seconds (synchronised on CUDA), epochs and the time of the ``"auto"`` fit
divided by each. Used to choose the default batch size per device.

Run::

    python benchmarks/batch_sizes.py --device cuda --batch-sizes auto 2048 8192
    python benchmarks/batch_sizes.py --problems 2000x32x10 --batch-sizes auto 256   # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402, F401  (sets the thread variables)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _data import load_problem  # noqa: E402

from sklearn_fgn import FGNClassifier  # noqa: E402

PROBLEMS = ["100000x512x1000", "emb:100000x512x1000:2"]


def fit_once(X_tr, y_tr, X_te, y_te, batch_size, device):
    """Return (test accuracy %, seconds, n_iter_) of one default fit at ``batch_size``."""
    batch = batch_size if batch_size == "auto" else int(batch_size)
    est = FGNClassifier(device=device, batch_size=batch, random_state=0)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X_tr, y_tr)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return 100.0 * float(np.mean(est.predict(X_te) == y_te)), seconds, est.n_iter_


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--problems", nargs="+", default=PROBLEMS)
    parser.add_argument("--batch-sizes", nargs="+", default=["auto", "2048", "8192"])
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print("| problem | batch_size | test acc (%) | seconds | epochs | time / auto |")
    print("|---|---|---|---|---|---|")
    for name in args.problems:
        kwargs = {} if name.startswith("emb:") else {"class_sep": 3.0}
        X_tr, X_te, y_tr, y_te = load_problem(name, dtype="float32", **kwargs)
        fit_once(X_tr[:4096], y_tr[:4096], X_te, y_te, 512, device)  # warm-up
        auto_seconds = None
        for batch_size in args.batch_sizes:
            acc, seconds, epochs = fit_once(X_tr, y_tr, X_te, y_te, batch_size, device)
            auto_seconds = seconds if batch_size == "auto" else auto_seconds
            ratio = "" if auto_seconds is None else f"{seconds / auto_seconds:.2f}"
            print(f"| {name} | {batch_size} | {acc:.2f} | {seconds:.2f} | {epochs} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
