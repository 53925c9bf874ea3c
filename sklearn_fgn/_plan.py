"""The fit plan: what ``"auto"`` means for this data, head and device, decided once per fit.

:func:`make_fit_plan` resolves the device, the batch size
(:func:`resolve_batch_size`), early stopping (:func:`resolve_early_stopping`)
and the held-out rows (:func:`validation_rows`), then prepares the data
(:func:`._prepare.prepare_data`); the frozen :class:`FitPlan` carries all of
it through the fit, and through every ``alpha`` of a regularisation path.
:class:`SearchFit` says how a fit of FGNClassifierCV's search differs from
a plain one.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from ._arrays import is_memory_mapped, numpy_dtype
from ._device import out_of_memory_advice, resolve_device
from ._heads import Head
from ._prepare import PreparedData, can_stratify, prepare_data
from ._ranks import RowLayout, comm_of
from ._tuning import get_tuning

__all__ = [
    "PLAIN_FIT",
    "FitPlan",
    "SearchFit",
    "device_memory",
    "full_batch_fits",
    "make_fit_plan",
    "resolve_batch_size",
    "resolve_early_stopping",
    "validation_rows",
]


@dataclasses.dataclass(frozen=True)
class SearchFit:
    """How a fit of FGNClassifierCV's search (a fold's path, or the refit) differs from a plain fit.

    Attributes
    ----------
    gap_tol : float or None
        Full-batch fits whose end game converges only linearly stop at this
        estimated relative gap (see ``LoopConfig``) instead of running to
        Newton's rate; None: a plain fit.
    scored_only : bool
        The fits are only scored (a fold's path in FGNClassifierCV) and need a gap
        of ``gap_tol`` and no more (``LoopConfig.null_loss``).
    classes : ndarray or None
        Every class of the search, a superset of ``y``'s (a fold may lack a
        rare class: its logits are fitted with no rows, as
        ``LogisticRegressionCV`` does, so every fold has the same classes).
    validated : bool
        ``X``, ``y`` and ``sample_weight`` were validated by the search
        (rows of what it validated, features perhaps cast to float32): the
        fit does not validate them again.
    concurrent : int
        How many of the search's fits run at once on this host (its
        ``n_jobs``): each counts on that share of the device's memory when
        ``batch_size="auto"`` chooses full batch.
    """

    gap_tol: float | None = None
    scored_only: bool = False
    classes: np.ndarray | None = None
    validated: bool = False
    concurrent: int = 1

    @property
    def in_search(self):
        """Whether this is a search's fit at all (which an interrupt ends at once)."""
        return self.gap_tol is not None or self.scored_only


PLAIN_FIT = SearchFit()


@dataclasses.dataclass(frozen=True)
class FitPlan:
    """Everything a fit decides before its loop, once (a path: once for all its ``alpha``).

    Attributes
    ----------
    head : Head
    X : ndarray or Tensor of shape (n_local, n_features)
        The features as validated; in a data-parallel fit this rank's shard.
    y_enc : ndarray of int of shape (n_samples,)
        Encoded labels of all rows (every rank's, in rank order).
    device : torch.device
        Where the fit computes.
    batch_size : int or None
        The loop's batch size, decided on all rows (None: full batch).
    full_batch_rows : bool
        The batch-size rule, applied to the training rows alone (after the
        hold-out), says full batch: they are gathered and whitened once.
        Where the hold-out takes a fit just below the rule's limit this
        holds though ``batch_size`` is not None; the loop then draws its
        mini-batches from the whitened rows.
    early_stopping : bool
        Whether ``n_validation`` rows are held out and the fit stops on them.
    n_validation : int
        Rows held out (0 without early stopping).
    layout : RowLayout or None
        This rank's rows among all ranks' (None in a single process).
    search : SearchFit
    prepared : PreparedData
        The class weights, tensors and feature metric.
    """

    head: Head
    X: object
    y_enc: np.ndarray
    device: torch.device
    batch_size: int | None
    full_batch_rows: bool
    early_stopping: bool
    n_validation: int
    layout: RowLayout | None = None
    search: SearchFit = PLAIN_FIT
    prepared: PreparedData | None = None

    @property
    def comm(self):
        """The communicator of the fit (the single process without a layout)."""
        return comm_of(self.layout)

    @property
    def local_rows(self):
        """The slice of all rows that this rank's ``X`` holds."""
        if self.layout is None:
            return slice(None)
        return slice(self.layout.offset, self.layout.offset + self.X.shape[0])

    @property
    def mini_batch(self):
        """Whether the loop's steps see fewer than all training rows."""
        return self.batch_size is not None and self.batch_size < self.prepared.data.n_total


def make_fit_plan(
    estimator, X, y_enc, sample_weight, head, layout=None, early_stopping=None, search=PLAIN_FIT
):
    """Resolve ``estimator``'s ``"auto"`` settings for this data, then prepare it (see :class:`FitPlan`).

    ``sample_weight``: of all rows, before class weights. ``early_stopping``:
    None resolves ``estimator.early_stopping``; ``partial_fit`` passes False.
    Preparing draws the validation split from ``estimator._rng``; running
    out of GPU memory there raises a :class:`._device.DeviceMemoryError`.

    Returns
    -------
    FitPlan
    """
    device = resolve_device(estimator.device, X)
    n_samples, n_classes = y_enc.shape[0], len(estimator.classes_)
    batch_size = resolve_batch_size(
        estimator.batch_size, n_samples, head, X, device, layout, search.concurrent
    )
    n_validation = validation_rows(
        n_samples, estimator.validation_fraction, estimator.early_stopping, n_classes
    )
    if early_stopping is None:
        early_stopping = resolve_early_stopping(
            estimator.early_stopping, y_enc, batch_size, n_validation, n_classes
        )
    n_validation = n_validation if early_stopping else 0
    n_train = n_samples - n_validation
    # The batch size of the training rows alone: only a hold-out under "auto" can change it.
    train_batch_size = batch_size
    if n_validation and estimator.batch_size == "auto":
        train_batch_size = resolve_batch_size(
            estimator.batch_size, n_train, head, X, device, layout, search.concurrent
        )
    full_batch_rows = train_batch_size is None or train_batch_size >= n_train
    plan = FitPlan(
        head, X, y_enc, device, batch_size, full_batch_rows, early_stopping, n_validation, layout, search,
    )  # fmt: skip
    with out_of_memory_advice("fit", batch_size):
        return dataclasses.replace(plan, prepared=prepare_data(estimator, plan, sample_weight))


def resolve_batch_size(batch_size, n_samples, head, X, device, layout=None, concurrent=1):
    """Return ``batch_size``, or what ``"auto"`` means for this data, head and device (None: full).

    In a data-parallel fit (``layout``) the rules weigh the rows of the
    largest shard, what one device holds and computes on per step
    (the same on every rank). ``concurrent`` fits at once (a search's
    ``n_jobs``) share the device's memory.

    Returns
    -------
    int or None
        The batch size; None for full batch.
    """
    if batch_size != "auto":
        return batch_size
    if is_memory_mapped(X):  # full batch would hold a whitened copy of it; batches read it in place
        return get_tuning().auto_batch_size
    if layout is not None:
        n_samples = math.ceil(n_samples * layout.largest_share)
    memory = device_memory(device) if head.is_linear else None
    if memory is not None:
        itemsize = np.dtype(numpy_dtype(X.dtype)).itemsize
        full = full_batch_fits(n_samples, head, itemsize, memory / concurrent)
    else:
        full = n_samples * head.n_logits <= get_tuning().auto_full_batch_max_entries
    if not head.is_linear:
        full = full and n_samples <= get_tuning().auto_mlp_full_batch_max_samples
    return None if full else get_tuning().auto_batch_size


def device_memory(device):
    """Return the bytes of memory a fit on ``device`` can count on: a GPU's, or the host's RAM.

    The total, not the free memory, so that the choice is the same on every
    run on one machine. None where the host does not report it (``sysconf``
    lacks the pages on some platforms).

    Returns
    -------
    int or None
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def full_batch_fits(n_samples, head, itemsize, device_memory):
    """Return whether a linear head's full-batch fit fits in a share of ``device_memory`` bytes.

    A full-batch step holds about ten (n_samples, n_logits) arrays at once
    (logits, probabilities, the step's logits, trial logits), counted with a
    margin as ``auto_full_batch_arrays``, beside the features (the fit's
    whitened copy). Wherever that fits, the linear head fits full batch on
    any device, so that one estimator gives one model, the optimum of its
    objective, on a CPU as on a GPU (on large data a full-batch step takes
    its curvature on a sample of the rows, docs/design.md §6).

    Returns
    -------
    bool
    """
    tuning = get_tuning()
    arrays = tuning.auto_full_batch_arrays * n_samples * head.n_logits + n_samples * head.n_features
    return arrays * itemsize <= tuning.auto_full_batch_memory_share * device_memory


def validation_rows(n_samples, validation_fraction, early_stopping, n_classes):
    """Rows held out: ``validation_fraction``, capped for ``early_stopping="auto"``.

    A few thousand rows rank epochs as well as a tenth of a large data
    set does; the rest is worth more as training data.

    Returns
    -------
    int
        The number of validation rows.
    """
    n_val = int(np.ceil(validation_fraction * n_samples))
    if early_stopping == "auto":
        n_val = min(n_val, max(get_tuning().auto_validation_rows, 2 * n_classes))
    return n_val


def resolve_early_stopping(early_stopping, y_enc, batch_size, n_validation, n_classes):
    """Return whether to stop early: ``"auto"`` does for mini-batch fits whose split can be stratified.

    Returns
    -------
    bool
    """
    if early_stopping != "auto":
        return bool(early_stopping)
    n_samples = y_enc.shape[0]
    if batch_size is None or batch_size >= n_samples:
        return False
    return can_stratify(y_enc, n_validation, n_classes)
