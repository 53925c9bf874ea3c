"""The session settings of conftest.py reach the libraries the tests use."""

import sklearn.linear_model  # noqa: F401  (loads scikit-learn's OpenMP and SciPy's BLAS at collection)
import torch
from threadpoolctl import threadpool_info


def test_every_blas_and_openmp_pool_runs_one_thread():
    pools = threadpool_info()
    assert {pool["user_api"] for pool in pools} == {"blas", "openmp"}, pools
    assert [pool for pool in pools if pool["num_threads"] != 1] == []
    assert torch.get_num_threads() == 1
