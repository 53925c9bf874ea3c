"""Inputs and outputs at the estimator boundary: numpy-like arrays, torch tensors, array-API arrays.

A torch tensor ``X`` is validated where it lies, on its device and in its
float dtype (float16 and bfloat16 become float32, integers float64, as
``check_array`` does), with no round trip through numpy: embeddings computed
on a GPU are fitted and scored there. Other array-API arrays (CuPy,
array-api-strict, ...) are read through numpy when scikit-learn's
``array_api_dispatch`` is on; anything else goes through ``validate_data``.

Outputs of the predict-like methods are numpy arrays, or, under
``sklearn.config_context(array_api_dispatch=True)``, arrays of the input's
namespace on its device, as scikit-learn's array-API estimators return them.
Fitted attributes always stay numpy, so that a model fitted on a GPU
unpickles and predicts on a machine without one.
"""

from __future__ import annotations

import contextlib
import mmap
import warnings

import numpy as np
import torch
from sklearn import get_config
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, column_or_1d, validate_data

FLOAT_DTYPES = [np.float64, np.float32]


def is_tensor(X) -> bool:
    return isinstance(X, torch.Tensor)


def numpy_dtype(dtype) -> type:
    """``np.float32`` for a float32 numpy or torch dtype, else ``np.float64``."""
    if isinstance(dtype, torch.dtype):
        return np.float32 if dtype == torch.float32 else np.float64
    return np.float32 if np.dtype(dtype) == np.float32 else np.float64


def nbytes(X) -> int:
    return X.element_size() * X.nelement() if is_tensor(X) else X.nbytes


def check_features(estimator, X, *, reset):
    """Validate ``X`` of shape (n_samples, n_features) and check or set ``n_features_in_``.

    Returns
    -------
    Tensor or ndarray
        A contiguous float32 or float64 tensor on ``X``'s device when ``X``
        is a tensor, else the array ``validate_data`` returns.
    """
    if is_tensor(X):
        return _check_tensor(estimator, X, reset)
    return validate_data(estimator, _read_array_api(X), dtype=FLOAT_DTYPES, reset=reset)


def check_training_data(estimator, X, y, sample_weight, *, reset):
    """Validate ``X`` (see :func:`check_features`), labels and non-negative sample weights.

    Returns
    -------
    X : Tensor or ndarray
    y : ndarray of shape (n_samples,)
    sample_weight : ndarray of shape (n_samples,)
        Ones when None; in the numpy float dtype of ``X``.

    Raises
    ------
    ValueError
        For invalid features, labels or weights, or ``X`` and ``y`` of
        different lengths.
    """
    if is_tensor(X):
        X = _check_tensor(estimator, X, reset)
        y = column_or_1d(to_numpy(y), warn=True)
        if y.shape[0] != X.shape[0]:
            raise ValueError(
                f"Found input variables with inconsistent numbers of samples: [{X.shape[0]}, {y.shape[0]}]"
            )
    else:
        X, y = validate_data(estimator, _read_array_api(X), to_numpy(y), dtype=FLOAT_DTYPES, reset=reset)
    check_classification_targets(y)
    dtype = numpy_dtype(X.dtype)
    sample_weight = _check_sample_weight(
        to_numpy(sample_weight), np.empty((X.shape[0], 0), dtype=dtype), dtype=dtype,
        ensure_non_negative=True,
    )  # fmt: skip
    return X, y, sample_weight


def to_numpy(a):
    """Return a tensor or array-API array as a host numpy array; None and numpy-like inputs as they are."""
    if a is None:
        return None
    if is_tensor(a):
        return a.detach().cpu().numpy()
    return _read_array_api(a)


def as_output(result, X):
    """Return ``result`` (a tensor or ndarray) as numpy, or in ``X``'s namespace under array-API dispatch.

    Labels that are not numbers (strings, objects) stay numpy.

    Returns
    -------
    ndarray, Tensor or array of ``X``'s namespace
        On ``X``'s device when not numpy.
    """
    namespace = _dispatched_namespace(X)
    if namespace is None or (isinstance(result, np.ndarray) and result.dtype.kind not in "biuf"):
        return result.detach().cpu().numpy() if is_tensor(result) else result
    if is_tensor(X):
        return torch.as_tensor(result, device=X.device)
    xp, device = namespace
    return xp.asarray(to_numpy(result), device=device)


def _dispatched_namespace(X):
    """``(xp, device)`` of a non-numpy ``X`` under array-API dispatch, else None."""
    if not get_config().get("array_api_dispatch", False) or isinstance(X, np.ndarray):
        return None
    if is_tensor(X):
        return torch, X.device
    from sklearn.utils._array_api import _is_numpy_namespace, get_namespace_and_device

    try:
        xp, _, device = get_namespace_and_device(X)
    except (TypeError, ValueError):  # lists, DataFrames: not array-API arrays
        return None
    return None if _is_numpy_namespace(xp) else (xp, device)


def _read_array_api(a):
    """Return a non-numpy array-API array (under dispatch) as a host numpy array; other inputs unchanged."""
    namespace = _dispatched_namespace(a)
    if namespace is None or is_tensor(a):
        return a
    from sklearn.utils._array_api import _convert_to_numpy

    return _convert_to_numpy(a, namespace[0])


def _check_tensor(estimator, X, reset):
    """``validate_data`` for a torch tensor, on its device."""
    name = type(estimator).__name__
    if X.layout != torch.strided:
        raise ValueError(f"{name} does not accept sparse tensors (layout {X.layout}); pass a dense tensor.")
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2D tensor of shape (n_samples, n_features), got a {X.ndim}D tensor of shape "
            f"{tuple(X.shape)} instead."
        )
    if X.is_complex():
        raise ValueError("Complex data not supported.")
    for axis, what in ((0, "sample"), (1, "feature")):
        if X.shape[axis] < 1:
            raise ValueError(
                f"Found array with 0 {what}(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                f"required by {name}."
            )
    if X.dtype not in (torch.float32, torch.float64):
        X = X.to(torch.float32 if X.is_floating_point() else torch.float64)
    X = X.detach().contiguous()
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"Input X contains NaN or infinity; {name} needs finite features.")
    _check_n_features(estimator, X.shape[1], reset)
    return X


def _check_n_features(estimator, n_features, reset):
    name = type(estimator).__name__
    if reset:
        estimator.n_features_in_ = n_features
        estimator.__dict__.pop("feature_names_in_", None)
        return
    if hasattr(estimator, "feature_names_in_"):
        warnings.warn(
            f"X does not have valid feature names, but {name} was fitted with feature names", stacklevel=4
        )
    if n_features != estimator.n_features_in_:
        raise ValueError(
            f"X has {n_features} features, but {name} is expecting {estimator.n_features_in_} "
            "features as input."
        )


@contextlib.contextmanager
def random_access(array):
    """Inside, the kernel reads a memory-mapped ``array`` page by page (``MADV_RANDOM``); else nothing.

    Mini-batches gather rows at random. On a memory-mapped file larger than
    the page cache, each row's page fault otherwise reads the kernel's whole
    read-ahead window around it (megabytes for one row of kilobytes), and an
    epoch reads the file many times over. The advice is taken back
    (``MADV_NORMAL``) on exit: predictions read the rows in order. Arrays
    that are not memory-mapped (or platforms without ``madvise``) are left alone.

    Yields
    ------
    None
    """
    mapping = _file_mapping(array)
    advised = False
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        try:
            mapping.madvise(mmap.MADV_RANDOM)
            advised = True
        except (OSError, ValueError):  # a closed mapping, or the kernel refused: advice is optional
            advised = False
    try:
        yield
    finally:
        if advised:
            with contextlib.suppress(OSError, ValueError):
                mapping.madvise(mmap.MADV_NORMAL)


def is_memory_mapped(array):
    """Return whether ``array`` is a ``np.memmap`` or a view of one (a tensor is not)."""
    return _file_mapping(array) is not None


def _file_mapping(array):
    """Return the ``mmap`` behind a ``np.memmap`` (or a view of one), else None."""
    while isinstance(array, np.ndarray):
        mapping = getattr(array, "_mmap", None)  # np.memmap and its views keep the mapping here
        if isinstance(mapping, mmap.mmap):
            return mapping
        array = array.base
    return None
