"""Fast Gauss-Newton classifier heads for scikit-learn and PyTorch."""

import os

# Intel MKL (torch's CPU BLAS on x86) sums in an order that depends on its
# operands' memory alignment, which changes from run to run, unless its
# conditional numerical reproducibility mode is on; MKL reads this when it
# starts (the first matrix product of the process). A user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

from ._batches import prime_host_allocator  # noqa: E402
from ._cv import FGNClassifierCV  # noqa: E402
from ._device import DeviceMemoryError  # noqa: E402
from ._distributed import DistributedFitError  # noqa: E402
from ._estimator import FGNClassifier  # noqa: E402

__all__ = [
    "DeviceMemoryError",
    "DistributedFitError",
    "FGNClassifier",
    "FGNClassifierCV",
    "__version__",
    "prime_host_allocator",
]
__version__ = "0.1.0"
