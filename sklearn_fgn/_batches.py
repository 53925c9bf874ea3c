"""Batches: the training rows as the loop feeds them to the steps, one batch at a time on the device.

A fit's rows (:class:`TrainingData`) may stay on the host, be a view of a
larger array (:class:`RowSubset`) or one rank's share of a data-parallel
fit (:class:`Shard`); :func:`iter_batches` shuffles them into batches
(:class:`Batch`) on the compute device, each weighted by the whole data's
mean weight (``docs/design.md`` section 1; section 9 for the ranks' shares).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Batch", "RowSubset", "Shard", "TrainingData", "iter_batches", "prime_host_allocator"]


@dataclass(frozen=True)
class Batch:
    """One batch of tensors on the compute device.

    ``weight_total`` divides ``sample_weight`` instead of its sum (see
    :func:`._objective.normalized_weights`). ``n_rows``: the rows of the whole
    batch when these are one rank's share of it (``X``'s rows otherwise).
    """

    X: Tensor
    y: Tensor
    sample_weight: Tensor | None
    weight_total: float | None = None
    n_rows: int | None = None

    @property
    def size(self) -> int:
        """Rows in the whole batch (over all ranks)."""
        return self.X.shape[0] if self.n_rows is None else self.n_rows


def iter_batches(
    X: Tensor, y: Tensor, sample_weight: Tensor | None, batch_size: int | None,
    generator: torch.Generator, device: torch.device,
    transform: Callable[[Tensor], Tensor] | None = None, shard: Shard | None = None,
) -> Iterator[Batch]:  # fmt: skip
    """Shuffled batches moved to ``device`` one at a time (``X`` may stay on the host).

    A batch's weights are divided by its size times the mean of
    ``sample_weight`` (see :func:`._objective.normalized_weights`); ``transform``
    (the feature whitening) is applied to each batch's ``X`` on ``device``.
    With ``shard`` the rows are one rank's share of a data-parallel fit
    (see :func:`_shard_batches`).

    Yields
    ------
    Batch
        The next batch (the whole data when ``batch_size`` is None or >= n).
    """
    if shard is not None:
        yield from _shard_batches(X, y, sample_weight, batch_size, generator, device, transform, shard)
        return
    n = X.shape[0]
    weight_mean = None if sample_weight is None else float(sample_weight.double().mean())
    if batch_size is None or batch_size >= n:
        yield _to_device(X, y, sample_weight, device, _total(y.shape[0], weight_mean), transform)
        return
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        sw = None if sample_weight is None else sample_weight[idx]
        yield _to_device(X[idx], y[idx], sw, device, _total(idx.shape[0], weight_mean), transform)


def _total(n_rows: int, weight_mean: float | None) -> float | None:
    return None if weight_mean is None else n_rows * weight_mean


def _shard_batches(
    X: Tensor, y: Tensor, sample_weight: Tensor | None, batch_size: int | None,
    generator: torch.Generator, device: torch.device, transform: Callable[[Tensor], Tensor] | None,
    shard: Shard,
) -> Iterator[Batch]:  # fmt: skip
    """Yield a rank's share of the batches one process would draw from all ranks' rows.

    The epoch's order is ``randperm(shard.n_total)`` from the same generator
    on every rank, so batch ``b`` holds the same rows as in a single process
    on the concatenated data; this rank yields the rows of it that it holds
    (in that order; possibly none: it still takes part in the step's
    reductions), weighted by the whole batch's size and the data's mean
    weight. Cost per epoch: O(n_total) to invert the order, O(n_local log n_local) to sort.

    Yields
    ------
    Batch
        This rank's rows of the next batch, with ``n_rows`` the batch's size.
    """
    n = shard.n_total
    weight_mean = shard.weight_total / n
    if batch_size is None or batch_size >= n:
        yield _to_device(X, y, sample_weight, device, shard.weight_total, transform, n)
        return
    order = torch.randperm(n, generator=generator)
    place = torch.empty_like(order)
    place[order] = torch.arange(n)  # each training position's place in the epoch
    key = place[shard.positions]
    key, local = torch.sort(key)
    counts = torch.bincount(key // batch_size, minlength=-(-n // batch_size)).tolist()
    for start, rows in zip(range(0, n, batch_size), torch.split(local, counts), strict=True):
        size = min(batch_size, n - start)
        sw = None if sample_weight is None else sample_weight[rows]
        yield _to_device(X[rows], y[rows], sw, device, size * weight_mean, transform, size)


def _to_device(
    X: Tensor, y: Tensor, sample_weight: Tensor | None, device: torch.device, total: float | None,
    transform: Callable[[Tensor], Tensor] | None = None, n_rows: int | None = None,
) -> Batch:  # fmt: skip
    if X.device != device:
        pin = device.type == "cuda" and X.device.type == "cpu"  # host -> GPU: page-locked, asynchronous
        move = lambda t: t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)  # noqa: E731
        X, y, sample_weight = move(X), move(y), None if sample_weight is None else move(sample_weight)
    return Batch(X if transform is None else transform(X), y, sample_weight, total, n_rows)


# glibc's malloc serves blocks above its mmap threshold by mmap and returns
# heap memory to the OS once more than its trim threshold lies free at the
# top; both start low (128 KiB) and rise, to at most 32 MiB and 64 MiB, only
# when a block that large is freed (``man mallopt``). A mini-batch step
# allocates and frees MB-sized temporaries, which are otherwise handed back
# and faulted in again on every step. Freeing one 31 MiB block raises both
# thresholds to glibc's own ceiling.
_ALLOCATOR_PRIMER_BYTES = 31 * 2**20


@functools.cache
def prime_host_allocator() -> None:
    """Free one 31 MiB block so that glibc keeps a step's freed memory for the next step.

    Opt-in: it changes the allocator's thresholds for the whole process, so
    the library never calls it; a process that runs many mini-batch CPU fits
    may (``sklearn_fgn.prime_host_allocator()``, once). Elsewhere (other
    allocators) it costs an unused allocation.
    """
    torch.empty(_ALLOCATOR_PRIMER_BYTES, dtype=torch.uint8, device="cpu")


class RowSubset:
    """Rows ``rows`` of ``X`` without copying them: what a validation split leaves for training.

    It offers what a fit reads from its features, ``shape``, ``dtype``,
    ``device`` and row indexing (a slice or an index tensor, which gathers
    those rows alone), so that a large ``X`` (a memory-mapped array, a GPU
    tensor) is never copied whole; :meth:`materialize` copies the rows out.
    """

    def __init__(self, X: Tensor, rows: Tensor):
        self.X, self.rows = X, rows.to(X.device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows.shape[0], *self.X.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    @property
    def device(self) -> torch.device:
        return self.X.device

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, Tensor):
            index = index.to(self.rows.device)
        return self.X[self.rows[index]]

    def materialize(self) -> Tensor:
        return self.X[self.rows]

    def in_row_order(self) -> tuple[RowSubset, Tensor]:
        """Return the same rows sorted by their place in ``X``, and the permutation that sorts them.

        A pass whose result does not depend on the order (the feature
        moments) then reads a memory-mapped ``X`` front to back, which the
        kernel's read-ahead serves, instead of at random.

        Returns
        -------
        rows : RowSubset
        order : Tensor of int64
            ``rows.rows == self.rows[order]``.
        """
        rows, order = torch.sort(self.rows)
        return RowSubset(self.X, rows), order


@dataclass(frozen=True)
class Shard:
    """Where a rank's training rows lie among all ranks' (a data-parallel fit).

    Attributes
    ----------
    positions : Tensor of shape (n_local,), int64 on the host
        Each local training row's position in the training rows of the
        single process on the concatenated data (what its batches index).
    n_total : int
        Training rows over all ranks.
    weight_total : float
        Their total weight (``n_total`` without sample weights).
    """

    positions: Tensor
    n_total: int
    weight_total: float


@dataclass(frozen=True)
class TrainingData:
    """Training (and optional validation) tensors; ``X`` may live on the host.

    ``sample_weight_val`` weights the validation accuracy. ``transform``, when
    given, maps each batch's ``X`` (on the device) to the features the head
    sees (the feature whitening of mini-batch fits); ``X_val`` is already mapped.
    ``X`` may be a :class:`RowSubset` (mini-batches gather their rows from it).
    ``shard``: the tensors are this rank's share of a data-parallel fit
    (validation rows too).
    """

    X: Tensor | RowSubset
    y: Tensor
    sample_weight: Tensor | None
    device: torch.device
    X_val: Tensor | None = None
    y_val: Tensor | None = None
    sample_weight_val: Tensor | None = None
    transform: Callable[[Tensor], Tensor] | None = None
    shard: Shard | None = None

    @property
    def n_total(self) -> int:
        """Training rows over all ranks."""
        return self.X.shape[0] if self.shard is None else self.shard.n_total

    @property
    def weight_total(self) -> float:
        """Total weight of the training rows over all ranks (their number without sample weights)."""
        if self.shard is not None:
            return self.shard.weight_total
        return self.X.shape[0] if self.sample_weight is None else float(self.sample_weight.double().sum())
