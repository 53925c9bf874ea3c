"""Fast Gauss-Newton classifier heads for scikit-learn and PyTorch."""

from ._estimator import FGNClassifier

__all__ = ["FGNClassifier", "__version__"]
__version__ = "0.1.0"
