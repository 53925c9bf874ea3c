"""scikit-learn's callback protocol (``sklearn.callback``, scikit-learn >= 1.9) for FGN fits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ._fitted import fitted_attributes

__all__ = ["EpochCallbacks"]


class EpochCallbacks:
    """Forward each iteration to scikit-learn's callback protocol (``sklearn.callback``).

    The fit is the root task and every iteration (epoch, or step in full
    batch) a subtask, whose end hook may ask to stop. Without callback
    support (scikit-learn < 1.9) every method is a no-op.

    Parameters
    ----------
    estimator : FGNClassifier
        The estimator being fitted (its callback context, its ``alpha``).
    head : Head
    X : array-like of shape (n_samples, n_features)
        This rank's features, as the hooks get them.
    y : ndarray of shape (n_samples,)
        Their labels.
    sample_weight : ndarray of shape (n_samples,)
        Their weights; the hooks get them as metadata unless all are 1.
    max_subtasks : int
        Iterations the fit runs at most.
    to_features : callable
        Maps the loop's parameters to the features' coordinates.
    """

    def __init__(self, estimator, head, X, y, sample_weight, max_subtasks, to_features):
        self.estimator, self.head, self.X, self.y = estimator, head, X, y
        self.to_features = to_features
        self.metadata = None if np.all(sample_weight == 1) else {"sample_weight": sample_weight}
        self.context = self.iteration = None
        if hasattr(estimator, "_init_callback_context"):
            self.context = estimator._init_callback_context(max_subtasks=max_subtasks)
            self.context.call_on_fit_task_begin(**self._hook_args())

    def _hook_args(self):
        return {"estimator": self.estimator, "X": self.X, "y": self.y, "metadata": self.metadata}

    def begin(self, state):
        """Open the subtask of the iteration ``state`` starts."""
        if self.context is not None:
            self.iteration = self.context.subcontext(task_name=f"iteration {state.n_iter}")
            self.iteration.call_on_fit_task_begin(**self._hook_args())

    def end(self, state):
        """Close the iteration's subtask.

        Returns
        -------
        bool
            Whether a callback asks the fit to stop.
        """
        if self.context is None:
            return False

        def attributes():
            params = self.to_features(state.params)
            return fitted_attributes(self.head, replace(state, params=params), float(self.estimator.alpha))

        stop = self.iteration.call_on_fit_task_end(**self._hook_args(), reconstruction_attributes=attributes)
        return bool(stop)

    def close(self):
        """Close the fit's root task."""
        if self.context is not None:
            self.context.call_on_fit_task_end(**self._hook_args(), reconstruction_attributes={})
