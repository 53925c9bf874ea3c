"""scikit-learn's estimator checks over the linear and the MLP head."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_fgn import FGNClassifier


@parametrize_with_checks([FGNClassifier(device="cpu"), FGNClassifier(hidden_layer_sizes=(8,), device="cpu")])
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
