"""Fast Gauss-Newton classifier heads for scikit-learn and PyTorch."""

__version__ = "0.1.0"
