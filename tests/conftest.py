"""Shared seeds, devices and thread limits for the sklearn_fgn test suite.

Every test passes on a CPU-only machine; CUDA cases skip with a reason.
Test modules import the constants directly (``from conftest import SEEDS``).
"""

import os

# Before scipy is imported (sklearn imports it): lets the tests run under
# sklearn.config_context(array_api_dispatch=True), and sklearn's common
# checks run their array-API check.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

# The test problems are tiny (n <= 16, P <= 60): intra-op threads only add
# synchronisation, and on a busy 2-core machine they made the suite ~6x slower.
torch.set_num_threads(1)

SEEDS = [0, 1, 2]
ALL_DEVICES = ["cpu", "cuda"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session", autouse=True)
def _one_blas_thread():
    """Run every BLAS/OpenMP pool loaded by collection time on one thread.

    The scikit-learn reference fits (lbfgs on digits) oversubscribed a busy
    2-core machine with one OpenMP/BLAS thread per core; the problems are too
    small to gain from threads anywhere.
    """
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(params=ALL_DEVICES)
def device(request):
    """Every device; ``cuda`` is skipped (with a reason) when it is absent."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(request.param)


@pytest.fixture
def tune():
    """Set tuning constants for one test: ``tune(hard_rows_min=8)`` (``sklearn_fgn.core.tuning_context``)."""
    from contextlib import ExitStack

    from sklearn_fgn.core import tuning_context

    with ExitStack() as stack:
        yield lambda **changes: stack.enter_context(tuning_context(**changes))
