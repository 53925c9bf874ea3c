"""Count passes over the features during a fit, for scikit-learn's linear models and FGNClassifier.

One **pass** is the multiply-adds of one product of ``X`` (all ``n`` rows, ``d``
features) with a ``(d, K)`` matrix, either direction: ``n d K``, with ``K`` the
number of logits (the classes; 1 for a binary problem with one logit). It is the
unit of every count here, whatever the work is: a product on a subset of ``m``
rows is ``m / n`` of a pass, the ``n d^2`` of a feature covariance is ``d / K``
passes, and float32 products count like float64 ones.

What :class:`PassCounter` counts while it is active (it patches the functions
below and restores them on exit):

* scikit-learn (``sklearn.linear_model._linear_loss.LinearModelLoss``):
  ``loss`` 1 pass (the logits), ``loss_gradient`` and ``gradient`` 2 (the logits
  and the gradient's ``X^T G``), ``gradient_hessian_product`` 2 for the call and 2
  for each call of the Hessian product it returns (``X s`` and ``X^T (...)``).
* FGNClassifier (a linear head): every product with rows of ``X`` by the rows it
  multiplies, ``rows / n`` per call: the head's ``forward`` (wherever a module
  imported it by name), the JVP and VJP of ``_curvature._linearize_linear`` (the
  gradient, CG's curvature products, the step's image in the logits; a product on
  a curvature subsample or on the hard rows counts its rows only), and the
  class-group moments of the class-means preconditioner (``rows (G + 1) d``
  multiply-adds, ``G`` label groups). The feature metric: its moments
  (``_metric.feature_moments``, ``rows d^2``, i.e. ``d / K`` passes on all rows;
  ``rows d`` when diagonal) and each whitening (``FeatureMetric.whiten``, the same).
  Dense algebra that a step does beside the products, in the same unit: the
  row-space Gram of ``fgn_gram`` (``m^2 (d + K)`` for ``m`` rows), the Cholesky
  factor of a Woodbury preconditioner (``m^3 / 6``) and its two triangular solves
  per application (``m^2``), and the class-means model's per-logit Grams
  (``_preconditioners._weighted_grams``, ``K G^2 d``).
* Not counted: ``O(n d)`` elementwise work (casts, row norms, gathers; at most
  ``1 / K`` of a pass each), the ``O(n K)`` work on logits, factorisations of
  ``d x d`` / ``K x K`` / ``G x G`` matrices, and a method's own bookkeeping
  (L-BFGS's two-loop recursion, CG's vector updates). A method that the counter
  does not patch (a torch optimiser) adds its passes itself with :meth:`PassCounter.add`.

Usage::

    with PassCounter(n_samples, n_features, n_logits) as counter:
        est.fit(X, y)
    counter.passes, counter.by_kind
"""

from __future__ import annotations

import dataclasses
import sys

from sklearn.linear_model import _linear_loss

import sklearn_fgn  # noqa: F401  (imports every module whose names are patched)
from sklearn_fgn import _curvature, _heads, _metric, _preconditioners

KINDS = ("X products", "feature metric", "dense algebra")


def _rows(X) -> int:
    return X.shape[0] if hasattr(X, "shape") else len(X)


class PassCounter:
    """Context manager counting passes over ``X`` (see the module docstring); ``.passes`` is the total.

    ``by_kind`` splits it into products with rows of ``X`` (``"X products"``),
    the feature metric's moments and whitening (``"feature metric"``) and the
    row-space Grams and factorisations (``"dense algebra"``).
    """

    def __init__(self, n_samples: int, n_features: int, n_logits: int):
        self.n_samples, self.n_features, self.n_logits = n_samples, n_features, n_logits
        self.unit = float(n_samples) * n_features * n_logits  # multiply-adds of one pass
        self.passes = 0.0
        self.by_kind = dict.fromkeys(KINDS, 0.0)
        self._undo: list[tuple[object, str, object]] = []

    def add(self, passes: float, kind: str = "X products") -> None:
        """Add ``passes`` (in passes, not multiply-adds) to the total and to ``kind``."""
        self.passes += passes
        self.by_kind[kind] += passes

    def add_work(self, multiply_adds: float, kind: str) -> None:
        """Add ``multiply_adds`` of work, counted in passes."""
        self.add(multiply_adds / self.unit, kind)

    def share(self, X) -> float:
        """One product on the rows of ``X``, in passes: ``rows / n_samples``."""
        return _rows(X) / self.n_samples

    # --------------------------------------------------------------- patching
    def _set(self, owner, name: str, value) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _set_everywhere(self, original, wrapper) -> None:
        """Replace ``original`` by ``wrapper`` in every ``sklearn_fgn`` module that holds it by name."""
        for module_name, module in list(sys.modules.items()):
            if module_name == "sklearn_fgn" or module_name.startswith("sklearn_fgn."):
                for name, value in list(vars(module).items()):
                    if value is original:
                        self._set(module, name, wrapper)

    def __enter__(self) -> PassCounter:
        self._patch_sklearn()
        self._patch_fgn()
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)

    def _patch_sklearn(self) -> None:
        counter, cls = self, _linear_loss.LinearModelLoss
        loss, loss_gradient, gradient = cls.loss, cls.loss_gradient, cls.gradient
        gradient_hessian_product = cls.gradient_hessian_product

        def counted_loss(obj, coef, X, *a, **k):
            counter.add(counter.share(X))
            return loss(obj, coef, X, *a, **k)

        def counted_loss_gradient(obj, coef, X, *a, **k):
            counter.add(2 * counter.share(X))
            return loss_gradient(obj, coef, X, *a, **k)

        def counted_gradient(obj, coef, X, *a, **k):
            counter.add(2 * counter.share(X))
            return gradient(obj, coef, X, *a, **k)

        def counted_gradient_hessian_product(obj, coef, X, *a, **k):
            share = counter.share(X)
            counter.add(2 * share)
            grad, hessp = gradient_hessian_product(obj, coef, X, *a, **k)

            def counted_hessp(s):
                counter.add(2 * share)
                return hessp(s)

            return grad, counted_hessp

        self._set(cls, "loss", counted_loss)
        self._set(cls, "loss_gradient", counted_loss_gradient)
        self._set(cls, "gradient", counted_gradient)
        self._set(cls, "gradient_hessian_product", counted_gradient_hessian_product)

    def _patch_fgn(self) -> None:
        counter = self
        forward, linearize_linear = _heads.forward, _curvature._linearize_linear
        moments, whiten = _metric.feature_moments, _metric.FeatureMetric.whiten
        gram, woodbury = _preconditioners.fgn_gram, _preconditioners.make_fgn_preconditioner
        group_moments, weighted_grams = _preconditioners.class_group_moments, _preconditioners._weighted_grams

        def counted_forward(head, params, X):
            counter.add(counter.share(X))
            return forward(head, params, X)

        def counted_linearize_linear(head, params, X, logits):
            lin = linearize_linear(head, params, X, logits)  # its forward pass, if any, counts itself
            share = counter.share(X)

            def jvp(v):
                counter.add(share)
                return lin.jvp(v)

            def vjp(cotangent):
                counter.add(share)
                return lin.vjp(cotangent)

            return dataclasses.replace(lin, jvp=jvp, vjp=vjp)

        def counted_moments(X, *a, **k):
            diagonal = k.get("diagonal", a[2] if len(a) > 2 else False)
            d = X.shape[1]
            counter.add_work(_rows(X) * d * (1 if diagonal else d), "feature metric")
            return moments(X, *a, **k)

        def counted_whiten(metric, X):
            d = X.shape[1]
            counter.add_work(_rows(X) * d * (1 if metric.diagonal else d), "feature metric")
            return whiten(metric, X)

        def counted_gram(head, params, X, *a, **k):
            sizes = head.layer_sizes
            counter.add_work(_rows(X) ** 2 * (sum(sizes[:-1]) + sum(sizes[1:])), "dense algebra")
            return gram(head, params, X, *a, **k)

        def counted_woodbury(fgn_op, gram_matrix, *a, **k):
            m = gram_matrix.shape[0]
            counter.add_work(m**3 / 6, "dense algebra")  # the Cholesky factor
            apply = woodbury(fgn_op, gram_matrix, *a, **k)
            if apply is None:
                return None

            def counted_apply(residual):  # its JVP and VJP count themselves
                counter.add_work(m**2, "dense algebra")
                return apply(residual)

            return counted_apply

        def counted_group_moments(X, y, weights, n_groups, *a, **k):
            counter.add_work(_rows(X) * X.shape[1] * (n_groups + 1), "X products")
            return group_moments(X, y, weights, n_groups, *a, **k)

        def counted_weighted_grams(U, weights):
            counter.add_work(weights.shape[0] * U.shape[0] * U.shape[1] ** 2, "dense algebra")
            return weighted_grams(U, weights)

        self._set_everywhere(forward, counted_forward)
        self._set_everywhere(linearize_linear, counted_linearize_linear)
        self._set_everywhere(moments, counted_moments)
        self._set(_metric.FeatureMetric, "whiten", counted_whiten)
        self._set_everywhere(gram, counted_gram)
        self._set_everywhere(woodbury, counted_woodbury)
        self._set_everywhere(group_moments, counted_group_moments)
        self._set_everywhere(weighted_grams, counted_weighted_grams)
