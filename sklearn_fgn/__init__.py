"""Fast Gauss-Newton classifier heads for scikit-learn and PyTorch."""

from ._batches import prime_host_allocator
from ._cv import FGNClassifierCV
from ._device import DeviceMemoryError
from ._distributed import DistributedFitError
from ._estimator import FGNClassifier

__all__ = [
    "DeviceMemoryError",
    "DistributedFitError",
    "FGNClassifier",
    "FGNClassifierCV",
    "__version__",
    "prime_host_allocator",
]
__version__ = "0.1.0"
