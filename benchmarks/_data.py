"""Benchmark problems: isotropic ``make_classification`` probes and embedding-like ones.

Embedding-like features (``make_embeddings``) imitate what a frozen encoder
emits: within-class noise with a power-law covariance spectrum
``lambda_j = j^-exponent`` (j = 1..d; exponent 2 at d = 512 spans 5.4 decades)
and class means whose spread decays one power faster (``j^-(exponent + 1)``:
the class structure lives mostly in the leading components, but every
direction carries some), in a random orthonormal basis, with every row then
L2-normalised (each coordinate about 1/sqrt(d)). The low-variance directions
still matter, which is what makes a fit in the raw parameter metric slow there.

Problem names (``load_problem``):

* ``"NxdxK"``: ``make_classification`` as in the earlier benchmarks, standardised;
* ``"emb:NxdxK:p"``: ``make_embeddings`` with exponent ``p``, **raw** (L2-normalised rows);
* ``"emb:NxdxK:p:std"``: the same after ``StandardScaler``;
* ``"digits"``: scikit-learn's digits, standardised.

Every problem: one stratified 80/20 split (``random_state=0``), the scaler
(when any) fitted on the training part.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

# Class-mean spread relative to the noise in the leading direction.
EMBEDDING_CLASS_SEP = 3.0


def make_embeddings(n: int, d: int, n_classes: int, exponent: float = 2.0,
                    class_sep: float = EMBEDDING_CLASS_SEP, seed: int = 0):  # fmt: skip
    """Return ``(X, y)``: L2-normalised rows with a power-law covariance spectrum (float64)."""
    rng = np.random.default_rng(seed)
    j = np.arange(1, d + 1, dtype=np.float64)
    root = j ** (-exponent / 2)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    means = rng.standard_normal((n_classes, d)) * j ** (-(exponent + 1) / 2) * class_sep
    y = rng.integers(0, n_classes, size=n)
    X = (means[y] + rng.standard_normal((n, d)) * root) @ basis.T
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y


def is_embedding(name: str) -> bool:
    """Whether ``name`` is an embedding-like problem."""
    return name.startswith("emb:")


def load_problem(name: str, class_sep: float = 1.0, dtype: str = "float64"):
    """Return ``(X_tr, X_te, y_tr, y_te)`` for a problem name (see the module docstring)."""
    scale = True
    if name == "digits":
        X, y = load_digits(return_X_y=True)
    elif is_embedding(name):
        parts = name.split(":")
        n, d, k = (int(v) for v in parts[1].split("x"))
        X, y = make_embeddings(n, d, k, exponent=float(parts[2]))
        scale = len(parts) > 3 and parts[3] == "std"
    else:
        n, d, k = (int(v) for v in name.split("x"))
        X, y = make_classification(n_samples=n, n_features=d, n_informative=d // 4, n_redundant=2,
                                   n_repeated=0, n_classes=k, n_clusters_per_class=1, class_sep=class_sep,
                                   flip_y=0.01, random_state=0)  # fmt: skip
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    if scale:
        scaler = StandardScaler().fit(X_tr)
        X_tr, X_te = scaler.transform(X_tr), scaler.transform(X_te)
    return X_tr.astype(dtype), X_te.astype(dtype), y_tr, y_te
