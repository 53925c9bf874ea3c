"""Torch tensors and array-API arrays in and out of the estimators (``sklearn_fgn._arrays``)."""

import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICES
from sklearn import config_context
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

from sklearn_fgn import FGNClassifier, FGNClassifierCV
from sklearn_fgn._device import DeviceMemoryError

METHODS = ("decision_function", "predict_proba", "predict_log_proba", "predict")


@pytest.fixture(scope="module")
def iris32():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X).astype(np.float32), y


def _fit_pair(X, y, **params):
    """The same estimator fitted on the numpy array and on a CPU tensor of it."""
    params = {"device": "cpu", "random_state": 0, **params}
    return FGNClassifier(**params).fit(X, y), FGNClassifier(**params).fit(torch.from_numpy(X), y)


@pytest.mark.parametrize(
    "params",
    [{}, {"hidden_layer_sizes": (8,)}, {"batch_size": 32, "early_stopping": True, "max_iter": 5}],
    ids=["linear-full-batch", "mlp", "mini-batch-early-stopping"],
)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_float32_tensor_fits_as_the_float32_array(iris32, params):
    X, y = iris32
    from_array, from_tensor = _fit_pair(X, y, **params)
    arrays = [from_array.coef_] if hasattr(from_array, "coef_") else from_array.coefs_
    tensors = [from_tensor.coef_] if hasattr(from_tensor, "coef_") else from_tensor.coefs_
    for a, b in zip(arrays, tensors, strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert from_tensor.n_iter_ == from_array.n_iter_
    assert from_tensor.n_features_in_ == 4


def test_outputs_are_numpy_without_dispatch(iris32):
    X, y = iris32
    est = FGNClassifier(device="cpu", random_state=0).fit(torch.from_numpy(X), torch.from_numpy(y))
    for method in METHODS:
        from_tensor = getattr(est, method)(torch.from_numpy(X))
        assert isinstance(from_tensor, np.ndarray), method
        np.testing.assert_array_equal(from_tensor, getattr(est, method)(X))
    assert est.predict_proba(torch.from_numpy(X)).dtype == np.float32
    assert est.score(torch.from_numpy(X), y) > 0.95


def test_outputs_follow_the_input_namespace_under_dispatch(iris32):
    X, y = iris32
    est = FGNClassifier(device="cpu", random_state=0).fit(X, y)
    X_t = torch.from_numpy(X)
    with config_context(array_api_dispatch=True):
        for method in METHODS:
            out = getattr(est, method)(X_t)
            assert isinstance(out, torch.Tensor), method
            assert out.device == X_t.device
            np.testing.assert_array_equal(out.numpy(), getattr(est, method)(X))
            assert isinstance(getattr(est, method)(X), np.ndarray)  # numpy in, numpy out
        assert est.predict_proba(X_t).dtype == torch.float32
    assert isinstance(est.coef_, np.ndarray)


def test_string_labels_stay_numpy_under_dispatch(iris32):
    X, y = iris32
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    est = FGNClassifier(device="cpu", random_state=0).fit(torch.from_numpy(X), labels)
    with config_context(array_api_dispatch=True):
        predicted = est.predict(torch.from_numpy(X))
    assert isinstance(predicted, np.ndarray) and predicted.dtype.kind == "U"
    assert np.mean(predicted == labels) > 0.95


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float16, np.float32), (torch.bfloat16, np.float32), (torch.int64, np.float64)],
)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_tensor_dtypes_are_cast_as_check_array_casts(iris32, dtype, expected):
    X, y = iris32
    est = FGNClassifier(device="cpu", random_state=0, max_iter=3).fit(torch.from_numpy(X * 4).to(dtype), y)
    assert est.coef_.dtype == expected


def test_tensor_that_requires_grad_is_accepted(iris32):
    X, y = iris32
    X_t = torch.from_numpy(X).requires_grad_(True)
    est = FGNClassifier(device="cpu", random_state=0).fit(X_t, y)
    assert X_t.grad is None
    assert est.predict(X_t).shape == (150,)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda X: X[:, 0], "Expected a 2D tensor"),
        (lambda X: X.masked_fill(X > 2, float("nan")), "NaN or infinity"),
        (lambda X: X[:0], "0 sample"),
        (lambda X: X.to(torch.complex64), "Complex"),
        (lambda X: X.to_sparse(), "sparse"),
    ],
    ids=["1d", "nan", "empty", "complex", "sparse"],
)
def test_bad_tensors_raise_value_error(iris32, make, match):
    X, y = iris32
    with pytest.raises(ValueError, match=match):
        FGNClassifier(device="cpu").fit(make(torch.from_numpy(X)), y)


def test_wrong_number_of_features_and_lengths_raise(iris32):
    X, y = iris32
    est = FGNClassifier(device="cpu", random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but FGNClassifier is expecting 4"):
        est.predict(torch.from_numpy(X[:, :3]))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        FGNClassifier(device="cpu").fit(torch.from_numpy(X), y[:-1])


def test_cv_on_tensors_matches_arrays(iris32):
    X, y = iris32
    params = {"Cs": [0.1, 10.0], "cv": 3, "device": "cpu", "random_state": 0}
    from_array = FGNClassifierCV(**params).fit(X, y)
    from_tensor = FGNClassifierCV(**params).fit(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_array_equal(from_array.scores_, from_tensor.scores_)
    np.testing.assert_array_equal(from_array.coef_, from_tensor.coef_)
    with config_context(array_api_dispatch=True):
        proba = from_tensor.predict_proba(torch.from_numpy(X))
    assert isinstance(proba, torch.Tensor)
    np.testing.assert_allclose(proba.numpy(), from_array.predict_proba(X), rtol=1e-6)


def test_cuda_out_of_memory_names_the_setting_to_lower(iris32, monkeypatch):
    X, y = iris32
    est = FGNClassifier(device="cpu", batch_size=64, random_state=0).fit(X, y)
    before = est.coef_.copy()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("sklearn_fgn._estimator.run_epochs", out_of_memory)
    with pytest.raises(DeviceMemoryError, match=r"lower batch_size \(now 64\)"):
        est.fit(X, y)
    np.testing.assert_array_equal(est.coef_, before)  # the failed fit left the model as it was
    with pytest.raises(ValueError, match="set batch_size"):
        FGNClassifier(device="cpu").fit(X, y)


def test_cuda_fitted_model_holds_no_tensors_and_predicts_without_cuda(iris32, tmp_path):
    """A model fitted with ``device="cuda"`` unpickles and predicts where CUDA is absent.

    Simulated on any machine: the fitted attributes are numpy (no tensor is
    pickled), and a child process that sees no GPU loads a model whose
    ``device`` says CUDA and predicts as the parent does.
    """
    X, y = iris32
    device = "cuda" if "cuda" in DEVICES else "cpu"
    est = FGNClassifier(device=device, random_state=0).fit(torch.from_numpy(X).to(device), y)
    est.set_params(device="cuda")
    assert not [k for k, v in vars(est).items() if isinstance(v, torch.Tensor)]
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(est))
    np.save(tmp_path / "X.npy", X)
    code = (
        "import pickle, sys, numpy as np, torch; assert not torch.cuda.is_available(); "
        f"est = pickle.loads(open({str(path)!r}, 'rb').read()); "
        f"np.save({str(tmp_path / 'p.npy')!r}, est.predict_proba(np.load({str(tmp_path / 'X.npy')!r})))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), est.predict_proba(X), rtol=1e-6)


@pytest.mark.skipif("cuda" not in DEVICES, reason="CUDA not available")
def test_cuda_tensor_fit_stays_on_the_gpu(iris32):
    X, y = iris32
    X_cuda = torch.from_numpy(X).cuda()
    est = FGNClassifier(random_state=0).fit(X_cuda, torch.from_numpy(y).cuda())  # device="auto"
    reference = FGNClassifier(device="cpu", random_state=0).fit(X, y)
    np.testing.assert_allclose(est.coef_, reference.coef_, rtol=1e-3, atol=1e-4)
    with config_context(array_api_dispatch=True):
        proba = est.predict_proba(X_cuda)
        labels = est.predict(X_cuda)
    assert proba.is_cuda and proba.dtype == torch.float32 and labels.is_cuda
    assert isinstance(est.predict(X_cuda), np.ndarray)
    assert (labels.cpu().numpy() == y).mean() > 0.95


@pytest.mark.skipif("cuda" not in DEVICES, reason="CUDA not available")
def test_cuda_mini_batch_fit_from_cuda_tensor_with_early_stopping(iris32):
    X, y = iris32
    params = {"batch_size": 32, "early_stopping": True, "max_iter": 5, "random_state": 0}
    est = FGNClassifier(device="cuda", **params).fit(torch.from_numpy(X).cuda(), y)
    reference = FGNClassifier(device="cpu", **params).fit(X, y)
    assert est.n_iter_ == reference.n_iter_
    np.testing.assert_allclose(est.coef_, reference.coef_, rtol=1e-3, atol=1e-3)


def test_auto_batch_is_full_batch_where_it_fits_in_half_the_memory():
    from sklearn_fgn._heads import Head
    from sklearn_fgn._plan import full_batch_fits

    imagenet = Head(1024, 1000, (), "relu", True)
    # 12 (n, K) float32 arrays of 1281167 x 1000 and X: 66.7 GB.
    assert full_batch_fits(1281167, imagenet, 4, 150e9)  # H200 (139.8 GiB)
    assert not full_batch_fits(1281167, imagenet, 4, 80e9)
    assert not full_batch_fits(1281167, imagenet, 8, 150e9)  # float64 doubles it
    probe = Head(512, 1000, (), "relu", True)
    assert full_batch_fits(100000, probe, 4, 24e9)  # 5 GB: a laptop's RAM, a recent GPU
    assert not full_batch_fits(100000, probe, 4, 8e9)


def test_cpu_auto_batch_size_weighs_the_hosts_memory(iris32, tune):
    from sklearn_fgn._plan import device_memory, resolve_batch_size

    X, y = iris32
    est = FGNClassifier(device="cpu")
    est.classes_ = np.unique(y)
    cpu = torch.device("cpu")
    memory = device_memory(cpu)
    assert memory is not None and memory > 2**30  # this host reports its RAM
    linear, mlp = est._make_head((), 4), est._make_head((8,), 4)
    n = 2**22  # 12 * 3 + 4 float32 values a row: 671 MB
    assert resolve_batch_size(est.batch_size, n, linear, X, cpu) is None
    assert resolve_batch_size(est.batch_size, n, mlp, X, cpu) == 512  # an MLP: above 8192 rows
    assert resolve_batch_size(est.batch_size, 150, mlp, X, cpu) is None
    tune(auto_full_batch_memory_share=(12 * 3 + 4) * 4 * n / memory * 0.99)  # just short of n rows
    assert resolve_batch_size(est.batch_size, n, linear, X, cpu) == 512
    assert resolve_batch_size(est.batch_size, n // 2, linear, X, cpu) is None
    assert resolve_batch_size(est.batch_size, n // 2, linear, X.astype(np.float64), cpu) == 512
    # fits that run at once (a search's n_jobs) share the memory
    assert resolve_batch_size(est.batch_size, n // 2, linear, X, cpu, concurrent=2) == 512
    assert resolve_batch_size(est.batch_size, n // 4, linear, X, cpu, concurrent=2) is None


def test_read_only_memmap_is_read_in_place_and_fits_as_the_array(iris32, tmp_path):
    """A read-only memmap is shared, not copied; a mini-batch fit with a validation split reads its rows."""
    from sklearn_fgn._device import to_tensor

    X, y = iris32
    path = tmp_path / "X.f32"
    X.tofile(path)
    X_map = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    assert to_tensor(X_map, "cpu", host=True).data_ptr() == X_map.ctypes.data
    params = {"batch_size": 32, "early_stopping": True, "max_iter": 4, "device": "cpu", "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "array is not writable" warning either
        warnings.simplefilter("ignore", ConvergenceWarning)
        from_map = FGNClassifier(**params).fit(X_map, y)
        from_array = FGNClassifier(**params).fit(np.array(X), y)
    np.testing.assert_array_equal(from_map.coef_, from_array.coef_)
    np.testing.assert_array_equal(from_map.predict_proba(X_map), from_array.predict_proba(X))


def test_auto_batch_size_reads_a_memmap_in_batches_never_a_whitened_copy(tmp_path):
    """Issue 35, item 5: full batch would whiten a copy of the memmap; "auto" reads it in batches."""
    from sklearn.datasets import make_classification

    X, y = make_classification(3000, 20, n_informative=10, n_classes=5, random_state=0)
    X = X.astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    X_map = np.load(tmp_path / "X.npy", mmap_mode="r")
    params = {"max_iter": 3, "device": "cpu", "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        from_map = FGNClassifier(**params).fit(X_map, y)
        batches = FGNClassifier(batch_size=512, **params).fit(X, y)
        full = FGNClassifier(**params).fit(X, y)  # in memory "auto" is full batch here
    np.testing.assert_array_equal(from_map.coef_, batches.coef_)
    assert from_map.validation_scores_ is not None and full.validation_scores_ is None


_REPEATED_FIT = """
import hashlib, sys, warnings
import numpy as np
from sklearn_fgn import FGNClassifier
X = np.load(sys.argv[1], mmap_mode="r")
y = np.arange(X.shape[0]) % 300
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    clf = FGNClassifier(batch_size=512, max_iter=1, early_stopping=True, device="cpu", random_state=3)
    clf.fit(X, y)
print(hashlib.sha256(clf.coef_.tobytes() + clf.intercept_.tobytes()).hexdigest())
"""


def test_a_memmap_fit_is_bitwise_repeatable_across_processes(tmp_path):
    """Issue 35, item 11: same data, seed and machine give the same model in another process.

    Another process places X's pages, the batches and the allocator's blocks
    at other addresses; no reduction may depend on them. Many classes, a
    validation split and mini-batches, as the memmap probe that varied.
    """
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6000, 64), dtype=np.float32) + np.repeat(rng.standard_normal((300, 64)), 20, 0)
    np.save(tmp_path / "X.npy", X.astype(np.float32))
    digests = {
        subprocess.run(
            [sys.executable, "-c", _REPEATED_FIT, str(tmp_path / "X.npy")],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout.strip()
        for _ in range(2)
    }  # fmt: skip
    assert len(digests) == 1, digests


_MLP_FIT = """
import hashlib, sys, warnings
import numpy as np, torch
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler
from sklearn_fgn import FGNClassifier
torch.set_num_threads(1)
X, y = load_digits(return_X_y=True)
X = StandardScaler().fit_transform(X)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    clf = FGNClassifier(hidden_layer_sizes=(32, 16), activation="tanh", batch_size=128, max_iter=4,
                        device="cpu", random_state=0).fit(X, y)
print(repr(clf.loss_curve_), hashlib.sha256(b"".join(c.tobytes() for c in clf.coefs_)).hexdigest())
"""


def test_a_fit_and_its_loss_curve_are_bitwise_repeatable_across_processes():
    """Issue 35, item 11: MKL's default paths sum in an alignment-dependent order.

    A numpy X's address differs from process to process; without MKL's
    reproducible mode (which importing the package asks for) the last
    ``loss_curve_`` value of this fit changed from run to run.
    """
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    runs = [
        subprocess.Popen([sys.executable, "-c", _MLP_FIT], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    outputs = {run.communicate(timeout=120)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(outputs) == 1, outputs


def test_importing_the_package_asks_mkl_for_reproducible_sums_unless_the_user_chose():
    code = "import os, sklearn_fgn; print(os.environ['MKL_CBWR'])"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "AUTO"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "MKL_CBWR": "COMPATIBLE"}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "COMPATIBLE"


def test_mini_batch_fit_reads_a_memmap_page_by_page_and_gives_the_advice_back(iris32, tmp_path, monkeypatch):
    """Random row gathers on a memmap: MADV_RANDOM during the epochs, MADV_NORMAL after."""
    import mmap

    import sklearn_fgn._arrays as arrays

    X, y = iris32
    np.save(tmp_path / "X.npy", X)
    X_map = np.load(tmp_path / "X.npy", mmap_mode="r")
    mapping = arrays._file_mapping(X_map)
    assert isinstance(mapping, mmap.mmap)
    assert arrays._file_mapping(np.asarray(X_map)[10:20]) is mapping  # views lead back to it
    assert arrays._file_mapping(np.array(X)) is None

    advice = []

    class Recorder:
        def madvise(self, option):
            advice.append(option)

    monkeypatch.setattr(arrays, "_file_mapping", lambda array: None if array is None else Recorder())
    params = {"max_iter": 2, "device": "cpu", "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        FGNClassifier(batch_size=None, **params).fit(X_map, y)
        assert advice == []  # full batch reads X once, in order
        FGNClassifier(batch_size=32, early_stopping=False, **params).fit(X_map, y)
        assert advice == [mmap.MADV_RANDOM, mmap.MADV_NORMAL]  # the epochs
        FGNClassifier(batch_size=32, early_stopping=True, **params).fit(X_map, y)
    assert advice == [mmap.MADV_RANDOM, mmap.MADV_NORMAL] * 3  # the validation rows' gather, the epochs


def test_order_free_passes_read_a_row_subset_in_row_order():
    from sklearn_fgn._batches import RowSubset
    from sklearn_fgn._metric import feature_moments
    from sklearn_fgn._prepare import in_row_order

    X = torch.randn(50, 3, dtype=torch.float64)
    rows = torch.randperm(50)[:30]
    weights = torch.rand(30, dtype=torch.float64)
    sorted_X, sorted_w = in_row_order(RowSubset(X, rows), weights)
    assert torch.equal(sorted_X.rows, torch.sort(rows).values)
    assert torch.equal(sorted_X.materialize(), X[torch.sort(rows).values])
    before, after = feature_moments(RowSubset(X, rows), weights), feature_moments(sorted_X, sorted_w)
    for a, b in [(before.covariance(True)[1], after.covariance(True)[1]), (before.total, after.total)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hidden", [(), (8,)])
def test_predictions_in_row_chunks_equal_the_whole(iris32, tune, hidden):
    X, y = iris32
    est = FGNClassifier(hidden_layer_sizes=hidden, device="cpu", random_state=0).fit(X, y)
    whole = {m: getattr(est, m)(X) for m in METHODS}
    tune(predict_chunk_rows=7)  # 150 rows: 22 chunks
    for method in METHODS:
        np.testing.assert_allclose(getattr(est, method)(X), whole[method], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(est.predict(X), whole["predict"])
