"""Predictions from logits, a chunk of rows at a time, shared by FGNClassifier and FGNClassifierCV.

An estimator that inherits :class:`LogitsPredictionMixin` defines
``_logits_map(X)``; the mixin turns it into ``decision_function``,
``predict_log_proba``, ``predict_proba`` and ``predict``, computing the
logits of ``predict_chunk_rows`` rows (fewer with many classes) at a time.
"""

from __future__ import annotations

import torch
from sklearn.utils.validation import check_is_fitted

from ._arrays import as_output, check_features, is_tensor
from ._device import out_of_memory_advice, to_tensor
from ._tuning import get_tuning

__all__ = [
    "LogitsPredictionMixin",
    "fitted_features",
    "log_softmax",
]


class LogitsPredictionMixin:
    """``decision_function``, ``predict_log_proba``, ``predict_proba`` and ``predict`` from ``_logits_map``.

    ``_logits_map(X)`` checks that the estimator is fitted, validates ``X``
    and returns it as a tensor (on its device when it was one, see
    :func:`fitted_features`) with the map from rows of it to their logits,
    shape (rows, n_logits) (one column for a binary problem). The methods
    apply it ``predict_chunk_rows`` rows (fewer with many classes:
    ``predict_chunk_logits`` logits) at a time, so that their temporaries
    (and ``predict``'s logits) take memory in proportion to a chunk, not to ``X``.
    """

    def decision_function(self, X):
        """Logits (``raw_prediction``) of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_classes)
            The single logit of the positive class for binary problems.
        """
        logits = torch.cat(list(self._logit_chunks(X)))
        return as_output(logits[:, 0] if logits.shape[1] == 1 else logits, X)

    def predict_log_proba(self, X):
        """Log class probabilities, from ``log_softmax`` (``logsigmoid`` for binary).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Log-probabilities in the order of ``classes_``.
        """
        return as_output(self._log_proba(X), X)

    def predict_proba(self, X):
        """Class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Probabilities in the order of ``classes_``.
        """
        return as_output(self._log_proba(X).exp(), X)

    def predict(self, X):
        """Predicted class labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        index = torch.cat(
            [(z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1) for z in self._logit_chunks(X)]
        )
        return as_output(self.classes_[index.cpu().numpy()], X)

    def _log_proba(self, X):
        return torch.cat([log_softmax(z) for z in self._logit_chunks(X)])

    def _logit_chunks(self, X):
        """Validate ``X`` once; yield the logits of a chunk of rows at a time (see the class docstring).

        Yields
        ------
        Tensor of shape (rows, n_logits)
        """
        X, logits_of = self._logits_map(X)
        tuning = get_tuning()
        n_classes = max(len(self.classes_), 1)
        rows = max(1, min(tuning.predict_chunk_rows, tuning.predict_chunk_logits // n_classes))
        with torch.no_grad(), out_of_memory_advice("predict", None):
            for start in range(0, X.shape[0], rows):
                yield logits_of(X[start : start + rows])


def log_softmax(logits):
    """Log class probabilities from logits; a single logit is the positive class's against 0.

    Returns
    -------
    Tensor of shape (rows, n_classes)
    """
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    return torch.log_softmax(logits, dim=1)


def fitted_features(estimator, X):
    """Check that ``estimator`` is fitted and validate ``X`` against it, as the tensor its logits take.

    A tensor stays on its device; anything else becomes a host tensor
    (sharing the validated array's memory).

    Returns
    -------
    Tensor of shape (n_samples, n_features_in_)
    """
    check_is_fitted(estimator)
    X = check_features(estimator, X, reset=False)
    return X if is_tensor(X) else to_tensor(X, "cpu", host=True)
