"""Where a fit computes: the torch device, its memory, host tensors and the thread count.

``device="auto"`` resolves to a CUDA ``X``'s device, else to CUDA when torch
sees one, else the CPU (:func:`resolve_device`). Features are put on the
device when they take at most half of its free memory, else they stay in
host memory and travel batch by batch (:func:`fits_on`, :func:`to_tensor`).
An out-of-memory error of torch is re-raised as a :class:`DeviceMemoryError`
that names the setting to lower (:func:`out_of_memory_advice`). On the CPU
the fit's torch threads follow the OpenMP/BLAS limits in force
(:func:`torch_threads_like_threadpools`), as scikit-learn's parallel
workers set them.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from ._arrays import is_tensor, numpy_dtype

__all__ = [
    "DeviceMemoryError",
    "fits_on",
    "out_of_memory_advice",
    "resolve_device",
    "thread_limit",
    "to_tensor",
    "torch_dtype",
    "torch_threads_like_threadpools",
]


class DeviceMemoryError(torch.OutOfMemoryError, ValueError):
    """The GPU ran out of memory; the message names the setting to lower.

    A ``torch.OutOfMemoryError`` (so handlers of torch's error still catch
    it) and a ``ValueError`` (a setting of the estimator or the size of the
    input is the cure).
    """


@contextlib.contextmanager
def out_of_memory_advice(task, batch_size):
    """Re-raise torch's CUDA out-of-memory error as a :class:`DeviceMemoryError` that says what to lower.

    ``task``: ``"fit"`` or ``"predict"``; ``batch_size``: the fit's (None: full batch).

    Yields
    ------
    None

    Raises
    ------
    DeviceMemoryError
        When the body runs out of GPU memory.
    torch.OutOfMemoryError
        A ``DeviceMemoryError`` of the body (one), re-raised as it is.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if isinstance(exc, DeviceMemoryError):
            raise
        if task == "predict":
            advice = "predict on fewer rows at a time (the logits of all rows are held at once)"
        elif batch_size is None:
            advice = (
                "set batch_size (full batch now: each step holds a few (n_samples, n_classes) arrays), "
                "or device='cpu'"
            )
        else:
            advice = f"lower batch_size (now {batch_size}), or device='cpu'"
        raise DeviceMemoryError(f"The GPU ran out of memory during {task}: {advice}. torch: {exc}") from exc


def resolve_device(device, X=None):
    """Return the torch device of ``device``; ``"auto"`` is a CUDA ``X``'s device, else CUDA when present.

    Returns
    -------
    torch.device
        ``"cuda"`` resolves to the current CUDA device, by index.

    Raises
    ------
    ValueError
        For a device torch does not know, one that is neither CPU nor CUDA,
        or a CUDA device that is not there.
    """
    if isinstance(device, str) and device == "auto":
        if is_tensor(X) and X.is_cuda:
            return X.device
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1', ...)."
        ) from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device={device!r} is not supported: FGNClassifier runs on 'cpu' or CUDA "
            "('cuda', 'cuda:1', ...)."
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: there are only {torch.cuda.device_count()} CUDA devices.")
    if resolved.type == "cuda" and resolved.index is None:  # "cuda" is the current device, by index
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def fits_on(device, nbytes):
    """Return whether ``nbytes`` of data may live on ``device`` (half its free memory; the CPU: always).

    Returns
    -------
    bool
    """
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


def to_tensor(array, device, host=False):
    """Return ``array`` as a tensor on ``device``, or in host memory when ``host``.

    A tensor already on a CUDA device stays there when ``device`` is CUDA
    (it is on the device already, whatever ``host`` says). A numpy array
    in host memory is shared, not copied (a read-only memmap included).

    Returns
    -------
    Tensor
    """
    if is_tensor(array):
        if array.is_cuda and torch.device(device).type == "cuda":
            return array.to(device)
        return array.cpu() if host else array.to(device)
    array = np.ascontiguousarray(array)
    # torch.from_numpy shares memory, and warns on read-only arrays (memmaps):
    # they are shared too, never copied whole; the fit only reads its features.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor if host else tensor.to(device)


def torch_dtype(dtype):
    """Return the torch float dtype of a numpy or torch ``dtype``: float32, else float64.

    Returns
    -------
    torch.dtype
    """
    return torch.float32 if numpy_dtype(dtype) == np.float32 else torch.float64


@functools.cache
def _threadpool_controller():
    # Finding the loaded libraries reads /proc (a noticeable share of a small
    # fit): once per process; their thread counts are read afresh by every ``info()``.
    return ThreadpoolController()


def thread_limit():
    """Return the threads allowed here: torch's count, capped by the OpenMP/BLAS limits in force.

    Returns
    -------
    int
    """
    infos = _threadpool_controller().info()
    limits = [info["num_threads"] for info in infos if info.get("user_api") in ("openmp", "blas")]
    return min([torch.get_num_threads(), *limits])


@contextlib.contextmanager
def torch_threads_like_threadpools():
    """Cap torch's intra-op threads at the OpenMP/BLAS limits in force.

    scikit-learn and joblib limit native thread pools in parallel workers
    (``threadpoolctl``); torch keeps its own count, so it follows them here.

    Yields
    ------
    None
    """
    previous = torch.get_num_threads()
    target = thread_limit()
    if target != previous:
        torch.set_num_threads(target)
    try:
        yield
    finally:
        if target != previous:
            torch.set_num_threads(previous)
