"""A fixed set of fits, printed step by step to the last digit: proof that a refactoring kept the arithmetic.

Run it before and after a change and compare the two files; any difference
in a loss, a damping, a CG count or a coefficient's bits shows::

    python benchmarks/arithmetic_trace.py > before.txt
    ...change the code...
    python benchmarks/arithmetic_trace.py > after.txt
    diff before.txt after.txt && echo "same arithmetic"

Each fit prints its per-epoch lines (``verbose=1``: loss to 8 decimals, damping,
curvature, CG iterations; the seconds removed), ``loss_curve_`` in full
(``repr`` of each float), ``n_iter_`` and a SHA-256 of the fitted parameters'
bytes. The set covers the paths a refactoring can touch: the linear head full
batch (feature metric, float64 and float32; the Cholesky, hard-row,
class-means and Kronecker preconditioners; the curvature sample), mini-batches
with early stopping, the MLP full batch and mini-batch, GGN curvature,
``partial_fit`` and ``warm_start``, ``FGNClassifierCV`` and the skorch net.
Everything runs on the CPU with one thread and MKL in its reproducible mode
(``MKL_CBWR=AUTO`` unless set), so that the reductions' order is fixed.
"""

from __future__ import annotations

import os

# MKL's default code paths sum in an order that depends on the operands' memory
# alignment, which differs from run to run: a reduction can then differ in its
# last bit between two runs of the same code. Its conditional numerical
# reproducibility mode fixes the order; it is read when MKL starts, before torch.
os.environ.setdefault("MKL_CBWR", "AUTO")

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_digits  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from sklearn_fgn import FGNClassifier, FGNClassifierCV  # noqa: E402


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


def _blobs(n, d, k, seed, scale=1.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)) * scale
    y = rng.integers(0, k, n)
    X = means[y] + rng.standard_normal((n, d))
    return X.astype(dtype), y


def _fit_lines(model, X, y, method="fit", **fit_params):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(model, method)(X, y, **fit_params)
    return [re.sub(r", [0-9.]+ s$", "", line) for line in out.getvalue().splitlines()]


def _report(name, model, lines):
    print(f"== {name}")
    for line in lines:
        print("  " + line)
    if hasattr(model, "loss_curve_"):
        print("  loss_curve_ " + " ".join(repr(float(v)) for v in model.loss_curve_))
        print(f"  n_iter_ {model.n_iter_}")
    if hasattr(model, "coefs_"):
        print("  params " + _digest(*model.coefs_, *model.intercepts_))
    elif hasattr(model, "coef_"):
        print("  params " + _digest(model.coef_, model.intercept_))


def linear_cases():
    digits_X, digits_y = load_digits(return_X_y=True)
    Xs = StandardScaler().fit_transform(digits_X)
    cancer_X, cancer_y = load_breast_cancer(return_X_y=True)
    X300, y300 = _blobs(3000, 24, 300, seed=1, scale=0.4)
    Xbig, ybig = _blobs(60000, 16, 40, seed=2, scale=0.3, dtype=np.float32)
    Xmb, ymb = _blobs(6000, 20, 8, seed=3, scale=0.5)
    base = {"device": "cpu", "verbose": 1, "random_state": 0}
    yield "linear digits raw float64 full batch", FGNClassifier(batch_size=None, **base), digits_X, digits_y
    yield (
        "linear digits std float32 full batch C=100",
        FGNClassifier(batch_size=None, alpha=0.01, **base),
        Xs.astype(np.float32),
        digits_y,
    )
    yield (
        "linear cancer cholesky",
        FGNClassifier(batch_size=None, solver="cholesky", **base),
        cancer_X,
        cancer_y,
    )
    yield (
        "linear cancer ggn identity",
        FGNClassifier(batch_size=None, curvature="ggn", damping_metric="identity", **base),
        cancer_X,
        cancer_y,
    )
    yield "linear 300 classes full batch", FGNClassifier(batch_size=None, alpha=0.1, **base), X300, y300
    yield "linear 60000 rows curvature sample", FGNClassifier(batch_size=None, alpha=1e-3, **base), Xbig, ybig
    yield "linear mini-batch early stopping", FGNClassifier(batch_size=256, **base), Xmb, ymb
    yield (
        "linear class_weight balanced",
        FGNClassifier(batch_size=None, class_weight="balanced", **base),
        Xmb[:2000],
        ymb[:2000],
    )


def mlp_cases():
    digits_X, digits_y = load_digits(return_X_y=True)
    Xs = StandardScaler().fit_transform(digits_X)
    base = {"device": "cpu", "verbose": 1, "random_state": 0}
    yield (
        "mlp digits full batch",
        FGNClassifier(hidden_layer_sizes=(32,), batch_size=None, max_iter=15, **base),
        Xs,
        digits_y,
    )
    yield (
        "mlp digits mini-batch",
        FGNClassifier(hidden_layer_sizes=(32, 16), activation="tanh", batch_size=128, max_iter=4, **base),
        Xs,
        digits_y,
    )
    yield (
        "mlp digits float32 ggn",
        FGNClassifier(hidden_layer_sizes=(16,), curvature="ggn", batch_size=256, max_iter=3, **base),
        Xs.astype(np.float32),
        digits_y,
    )


def incremental_cases():
    X, y = _blobs(3000, 12, 5, seed=4, scale=0.5)
    m = FGNClassifier(batch_size=200, device="cpu", random_state=0, verbose=1)
    lines = []
    for start in range(0, 3000, 1000):
        lines += _fit_lines(
            m, X[start : start + 1000], y[start : start + 1000], "partial_fit", classes=np.arange(5)
        )
    _report("partial_fit three chunks", m, lines)
    m = FGNClassifier(batch_size=None, warm_start=True, max_iter=3, device="cpu", random_state=0, verbose=1)
    lines = _fit_lines(m, X, y) + _fit_lines(m, X, y)
    _report("warm_start twice", m, lines)


def cv_case():
    X, y = load_breast_cancer(return_X_y=True)
    cv = FGNClassifierCV(Cs=4, cv=3, device="cpu", random_state=0, n_jobs=1)
    lines = _fit_lines(cv, X, y)
    print("== FGNClassifierCV breast_cancer")
    for line in lines:
        print("  " + line)
    print("  C_ " + repr(np.asarray(cv.C_).tolist()) + " n_iter_ " + repr(np.asarray(cv.n_iter_).tolist()))
    print("  scores " + _digest(*(cv.scores_.values() if isinstance(cv.scores_, dict) else [cv.scores_])))
    print("  params " + _digest(cv.coef_, cv.intercept_))


def skorch_case():
    try:
        from sklearn_fgn.skorch import FGNNeuralNetClassifier
    except ImportError:
        print("== skorch: not installed")
        return
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    net = FGNNeuralNetClassifier(
        module,
        max_epochs=3,
        batch_size=256,
        verbose=0,
        iterator_train__shuffle=False,
        train_split=None,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.fit(X, y)
    print("== skorch digits MLP")
    for key in ("loss", "damping", "cg_iter", "step_norm", "step_size"):
        print(f"  {key} " + " ".join(repr(v) for v in net.history[:, "batches", :, key][-1]))
    print("  params " + _digest(*[p.detach().numpy() for p in net.module_.parameters()]))


def main() -> int:
    torch.set_num_threads(1)
    for name, model, X, y in [*linear_cases(), *mlp_cases()]:
        _report(name, model, _fit_lines(model, X, y))
    incremental_cases()
    cv_case()
    skorch_case()
    return 0


if __name__ == "__main__":
    sys.exit(main())
