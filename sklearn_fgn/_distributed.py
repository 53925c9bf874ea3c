r"""Data-parallel fits on ``torch.distributed``: every sum over rows is all-reduced.

Each rank of a process group holds a shard of the rows; the objective,
its gradient and every curvature product are sums over rows, so a rank
computes its shard's part and one all-reduce adds the parts. Parameters stay
replicated: CG's vectors live in parameter space and every rank runs the
same iteration on the same reduced products, so its inner products need no
communication. Per step that is

* one all-reduce of ``P + 1`` values (gradient and loss),
* one all-reduce of ``P`` values per CG iteration (the curvature product),
* one scalar all-reduce per objective evaluated along the step (the trial,
  backtracking or lengthening), and ``K^2`` values for the Kronecker
  preconditioner of a full-batch linear step in the feature metric,

plus, once per fit, the feature moments (``d^2 + d + 1`` values) and the
labels and weights (``n`` each, gathered so that every rank draws the same
validation split and batches as one process on the concatenated rows).

:class:`Communicator` is the single process (every reduction the identity);
:class:`ProcessGroupCommunicator` wraps a process group and counts what
it sends. A collective that fails (another rank raised or died, or the
group's timeout passed) raises :class:`DistributedFitError`.

A rank whose fit raises (an error, or Ctrl-C) and stays alive would leave
its peers blocked in their next collective until the group's timeout (30
minutes on gloo). So :meth:`ProcessGroupCommunicator.fit_scope` writes the
failure to the group's store, and on gloo every collective waits in slices
of ``peer_check_seconds``, reading the store between them: the peers raise
a :class:`DistributedFitError` that names the failed rank and its error
within about that time. (NCCL's collectives do not block the host; a peer
waits there in its next synchronisation, until NCCL's own timeout.)
"""

from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tuning import get_tuning

__all__ = ["Communicator", "CommStats", "DistributedFitError", "ProcessGroupCommunicator", "communicator"]


# The store key under which a rank reports that its fit failed (``{fit}``: the fit's number).
_FAILURE_KEY = "sklearn_fgn/fit{fit}/failed"


class DistributedFitError(RuntimeError):
    """A collective of a data-parallel fit failed: another rank raised, died or timed out.

    ``from_peer`` is True when a peer reported its own failure (the message
    names it), so this rank does not report one in turn.
    """

    def __init__(self, message: str, from_peer: bool = False):
        super().__init__(message)
        self.from_peer = from_peer


@dataclass
class CommStats:
    """What a communicator sent: collectives, values and seconds spent in them (this rank)."""

    calls: int = 0
    values: int = 0
    bytes: int = 0
    seconds: float = 0.0
    largest: int = 0

    def reset(self) -> None:
        self.calls = self.values = self.bytes = self.largest = 0
        self.seconds = 0.0


class Communicator:
    """The single process: one rank, every reduction is the identity."""

    world_size = 1
    rank = 0
    distributed = False

    def __init__(self) -> None:
        self.stats = CommStats()

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; return it."""
        return tensor

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` with rank ``src``'s, in place; return it."""
        return tensor

    def gather_objects(self, obj) -> list:
        """Return every rank's ``obj`` (picklable), in rank order."""
        return [obj]

    @contextlib.contextmanager
    def fit_scope(self):
        """Run one fit; on a single process there are no peers to tell of a failure.

        Yields
        ------
        None
        """
        yield

    def sum_params(
        self, params: dict[str, Tensor], *scalars: Tensor
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Sum a parameter dict and 0-d tensors over the ranks in one all-reduce.

        Returns
        -------
        params : dict of Tensor
            The sums, shaped as ``params``.
        scalars : list of Tensor
            The summed 0-d tensors.
        """
        return params, list(scalars)


SINGLE = Communicator()


class ProcessGroupCommunicator(Communicator):
    """Reductions over the default ``torch.distributed`` process group.

    Tensors are reduced on their own device; a CUDA tensor under a backend
    without CUDA support (gloo) is reduced through a host copy. It keeps no
    reference to the group (rank, size and backend are asked each time): a
    group kept alive past ``destroy_process_group`` is destroyed during
    interpreter shutdown, where gloo's threads can abort the process.
    """

    distributed = True
    group = None  # the default group, whichever it is when a collective runs

    def __init__(self):
        import torch.distributed as dist

        super().__init__()
        self.dist = dist

    @property
    def world_size(self) -> int:
        return self.dist.get_world_size()

    @property
    def rank(self) -> int:
        return self.dist.get_rank()

    @property
    def backend(self) -> str:
        return self.dist.get_backend()

    def _run(self, what: str, size: int, fn):
        start = time.perf_counter()
        try:
            out = fn()
        except DistributedFitError:
            raise
        except Exception as exc:  # gloo: RuntimeError / DistBackendError on a peer's failure or timeout
            raise DistributedFitError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({type(exc).__name__}: {exc}). "
                "Another rank probably raised or died (its own error names the cause), or the process "
                "group's timeout passed."
            ) from exc
        self.stats.calls += 1
        self.stats.values += size
        self.stats.largest = max(self.stats.largest, size)
        self.stats.seconds += time.perf_counter() - start
        return out

    fits = 0  # data-parallel fits begun on this rank: every rank counts the same

    @contextlib.contextmanager
    def fit_scope(self):
        """Run one data-parallel fit; if it raises here, tell the peers through the group's store.

        Every rank enters it once per fit, so the fits' numbers agree and a
        failure is read only by the fit it belongs to.

        Yields
        ------
        None
        """
        self.fits += 1
        try:
            yield
        except BaseException as exc:
            if not getattr(exc, "from_peer", False):
                self._report_failure(f"rank {self.rank} raised {type(exc).__name__}: {exc}")
            raise

    def _report_failure(self, message: str) -> None:
        store = _default_store()
        if store is not None:
            with contextlib.suppress(Exception):  # a broken store: the peers fall back on the timeout
                store.set(_FAILURE_KEY.format(fit=self.fits), message[:2000])

    def _peer_failure(self) -> str | None:
        """Return a peer's failure report of this fit, if one was written."""
        store, key = _default_store(), _FAILURE_KEY.format(fit=self.fits)
        if store is None or not store.check([key]):
            return None
        return store.get(key).decode(errors="replace")

    def _wait(self, work, what: str) -> None:
        """Wait for an asynchronous gloo collective, raising if a peer reports a failed fit meanwhile.

        Raises
        ------
        DistributedFitError
            With ``from_peer``, when a peer's fit failed while this rank waited.
        """
        while True:
            try:
                work.wait(datetime.timedelta(seconds=get_tuning().peer_check_seconds))
                return
            except Exception:
                if work.is_completed():  # the collective itself failed
                    raise
            failure = self._peer_failure()
            if failure is not None:
                raise DistributedFitError(
                    f"rank {self.rank} of {self.world_size}: {what} stopped: {failure}. Every rank's fit "
                    "ends; the group's collectives are out of step now (start a new process group).",
                    from_peer=True,
                )

    def _collective(self, what: str, size: int, op, tensor: Tensor, **kwargs) -> None:
        if self.backend != "gloo":  # NCCL's collectives do not block the host: no wait to watch
            self._run(what, size, lambda: op(tensor, group=self.group, **kwargs))
            return
        self._run(what, size, lambda: self._wait(op(tensor, group=self.group, async_op=True, **kwargs), what))

    def _on_backend(self, tensor: Tensor) -> Tensor:
        return tensor.cpu() if tensor.is_cuda and self.backend == "gloo" else tensor

    def sum_(self, tensor: Tensor) -> Tensor:
        buffer = self._on_backend(tensor)
        self.stats.bytes += buffer.numel() * buffer.element_size()
        what = f"all_reduce of {buffer.numel()} values"
        self._collective(what, buffer.numel(), self.dist.all_reduce, buffer)
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        buffer = self._on_backend(tensor)
        self.stats.bytes += buffer.numel() * buffer.element_size()
        self._collective(f"broadcast of {buffer.numel()} values", buffer.numel(), self.dist.broadcast, buffer,
                         src=src)  # fmt: skip
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def gather_objects(self, obj) -> list:
        out = [None] * self.world_size
        self._run("all_gather_object", 0, lambda: self.dist.all_gather_object(out, obj, group=self.group))
        return out

    def sum_params(self, params, *scalars):
        flat = torch.cat([t.reshape(-1) for t in params.values()] + [s.reshape(1) for s in scalars])
        self.sum_(flat)
        out, start = {}, 0
        for k, t in params.items():
            out[k] = flat[start : start + t.numel()].view_as(t)
            start += t.numel()
        return out, [flat[start + i] for i in range(len(scalars))]


def _default_store():
    """Return the default process group's store (None where torch keeps it elsewhere)."""
    from torch.distributed import distributed_c10d

    getter = getattr(distributed_c10d, "_get_default_store", None)
    try:
        return getter() if getter is not None else None
    except (RuntimeError, ValueError):  # no default group (destroyed meanwhile)
        return None


_DEFAULT_GROUP: list[ProcessGroupCommunicator] = []  # made on first use; holds its stats only


def communicator(distributed: bool) -> Communicator:
    """Return the single process, or a communicator over the default process group.

    One communicator for the default group, so that its :class:`CommStats`
    add up over fits (``benchmarks/distributed.py`` reads them).

    Returns
    -------
    Communicator
        :data:`SINGLE`, or the default group's :class:`ProcessGroupCommunicator`.

    Raises
    ------
    ValueError
        If ``distributed`` but no default process group is initialised.
    """
    if not distributed:
        return SINGLE
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised default process group: call "
            "torch.distributed.init_process_group (torchrun sets its environment) before fit."
        )
    if not _DEFAULT_GROUP:
        _DEFAULT_GROUP.append(ProcessGroupCommunicator())
    return _DEFAULT_GROUP[0]
