"""Fast Gauss-Newton classifier heads for scikit-learn and PyTorch."""

from ._cv import FGNClassifierCV
from ._estimator import FGNClassifier

__all__ = ["FGNClassifier", "FGNClassifierCV", "__version__"]
__version__ = "0.1.0"
