"""sklearn_fgn.core.tuning_context: the fit's constants set for a block, checked, restored, and all read."""

import dataclasses
import pathlib
import re

import pytest
import torch

from sklearn_fgn.core import Head, StepOptions, Tuning, compute_step, get_tuning, tuning_context

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sklearn_fgn"


def test_a_block_changes_the_constants_and_restores_them_even_on_error():
    default = get_tuning()
    with tuning_context(hard_rows_min=8, damping_bounds=(1e-6, 1e6)) as inside:
        assert get_tuning() is inside
        assert inside.hard_rows_min == 8 and inside.damping_bounds == (1e-6, 1e6)
        with tuning_context(hard_rows_min=9):
            assert get_tuning().hard_rows_min == 9 and get_tuning().damping_bounds == (1e-6, 1e6)
        assert get_tuning().hard_rows_min == 8
    assert get_tuning() == default == Tuning()
    with pytest.raises(RuntimeError), tuning_context(armijo=0.5):
        raise RuntimeError
    assert get_tuning().armijo == Tuning().armijo


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hard_rows_minimum": 8}, "unknown tuning constant.*hard_rows_minimum"),
        ({"armijo": "0.1"}, "armijo must be a real number"),
        ({"armijo": True}, "armijo must be a real number"),
        ({"damping_bounds": (1e-8,)}, "damping_bounds takes 2 numbers"),
    ],
)
def test_bad_changes_raise_naming_the_constant(changes, message):
    with pytest.raises(ValueError, match=message), tuning_context(**changes):
        pass
    assert get_tuning() == Tuning()


def test_a_changed_constant_reaches_the_step():
    # Under solver="auto" a small batch takes the Gram-Cholesky solve; with
    # cholesky_max_rows below its size, CG.
    gen = torch.Generator().manual_seed(0)
    d, K = 30, 10
    head = Head(d, K)
    params = {
        "coef_0": torch.zeros(K, d, dtype=torch.float64),
        "intercept_0": torch.zeros(K, dtype=torch.float64),
    }
    X = torch.randn(40, d, generator=gen, dtype=torch.float64)
    y = torch.arange(40) % K
    options = StepOptions(damping=1e-3, solver="auto", curvature="ggn", cg_tol=1e-10, cg_max_iter=200)
    assert compute_step(head, params, X, y, None, options).solver == "cholesky"
    with tuning_context(cholesky_max_rows=10):
        assert compute_step(head, params, X, y, None, options).solver == "cg"


def test_every_constant_is_read_by_the_package():
    source = "\n".join(p.read_text() for p in PACKAGE.glob("*.py") if p.name != "_tuning.py")
    unread = [f.name for f in dataclasses.fields(Tuning) if not re.search(rf"\.{f.name}\b", source)]
    assert unread == []
