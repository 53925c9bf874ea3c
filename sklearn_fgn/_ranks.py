"""What the ranks of a data-parallel fit agree on before they fit (``docs/design.md`` §9).

Every rank calls ``fit`` with its own shard of the rows. Before the loop
they agree on: whether every rank's data passed validation
(:func:`every_rank_raises_if_one_does`), the settings and feature width they
fit with, all ranks' labels and weights (so that the classes, validation
split and batches are those of one process on the concatenated rows), where
this rank's rows lie among all ranks' (:class:`RowLayout`,
:func:`gather_labels_and_weights`), and one random seed
(:func:`seed_of_rank_zero`). A single process has no layout and agrees with
itself at no cost.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from ._arrays import numpy_dtype
from ._distributed import SINGLE, Communicator

__all__ = [
    "RowLayout",
    "comm_of",
    "every_rank_raises_if_one_does",
    "gather_labels_and_weights",
    "rows_on_this_rank",
    "seed_from",
    "seed_of_rank_zero",
    "settings_ranks_share",
]


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """A rank's rows in a data-parallel fit: ``X`` holds rows ``offset:offset + len(X)`` of all ranks'.

    ``largest_share``: the largest shard's share of all rows.
    """

    comm: Communicator
    offset: int
    largest_share: float = 1.0


def comm_of(layout):
    """Return the communicator of a data-parallel fit's ``layout`` (the single process without one).

    Returns
    -------
    Communicator
    """
    return SINGLE if layout is None else layout.comm


@contextlib.contextmanager
def every_rank_raises_if_one_does(comm):
    """Run the body on every rank; if it raised on any, raise on all (no rank waits for a failed one).

    A single process runs the body as it is. Otherwise the ranks exchange
    their errors (one ``all_gather_object``): a rank re-raises its own, the
    others a ``ValueError`` naming the first rank that failed.

    Yields
    ------
    None

    Raises
    ------
    ValueError
        On the ranks whose body ran, when another rank's raised.
    """
    if not comm.distributed:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001  (shared with the other ranks, then re-raised)
        error = exc
    messages = comm.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise ValueError(f"distributed fit: rank {rank} of {comm.world_size} rejected its data: {message}")


def gather_labels_and_weights(comm, X, y, sample_weight, settings=None):
    """Every rank's labels and weights, concatenated in rank order, and this rank's layout.

    Single process: ``(y, sample_weight, None)``. Otherwise one
    ``all_gather_object`` of ``(n_features, dtype, settings, y, sample_weight)``;
    the ranks must agree on the number of features, the dtype and the
    ``settings`` (the estimator's parameters, ``partial_fit``'s classes):
    ranks that fit differently would wait on each other's collectives.

    Returns
    -------
    tuple
        ``(y, sample_weight, layout)``.

    Raises
    ------
    ValueError
        On every rank, when the ranks' features differ in width or dtype, or their settings differ.
    """
    if not comm.distributed:
        return y, sample_weight, None
    shape = (X.shape[1], str(numpy_dtype(X.dtype)))
    parts = comm.gather_objects((shape, repr(settings), np.asarray(y), sample_weight))
    if len({part[0] for part in parts}) > 1:
        described = ", ".join(f"rank {r}: {w} features, {t}" for r, ((w, t), *_) in enumerate(parts))
        raise ValueError(f"distributed fit: the ranks' X differ in width or dtype ({described}).")
    differing = [rank for rank, part in enumerate(parts) if part[1] != parts[0][1]]
    if differing:
        raise ValueError(
            f"distributed fit: rank {differing[0]}'s settings differ from rank 0's; every rank must fit "
            f"with the same parameters (and classes): {parts[differing[0]][1]} against {parts[0][1]}."
        )
    sizes = [part[2].shape[0] for part in parts]
    y = np.concatenate([part[2] for part in parts])
    sample_weight = np.concatenate([part[3] for part in parts])
    return y, sample_weight, RowLayout(comm, sum(sizes[: comm.rank]), max(sizes) / sum(sizes))


def settings_ranks_share(estimator):
    """Return the parameters all ranks of a data-parallel fit share (not the device, verbosity or seed).

    Returns
    -------
    dict
        The estimator's parameters by name, sorted.
    """
    params = estimator.get_params()
    return {k: params[k] for k in sorted(params) if k not in ("device", "verbose", "random_state")}


def seed_of_rank_zero(comm, random_state):
    """:func:`seed_from` on rank 0, shared: ``random_state=None`` draws the same seed on every rank.

    Returns
    -------
    int
    """
    return comm.gather_objects(seed_from(random_state))[0]


def rows_on_this_rank(rows, offset, n_local):
    """Return the entries of ``rows`` (global indices) in ``offset:offset + n_local``, in their order.

    Returns
    -------
    ndarray of int
    """
    return rows[(rows >= offset) & (rows < offset + n_local)]


def seed_from(random_state):
    """Return an int seed from ``random_state`` (None draws one from numpy's global RNG).

    Returns
    -------
    int
    """
    from sklearn.utils import check_random_state

    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
