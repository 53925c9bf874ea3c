"""Tests of sklearn_fgn._heads: shapes, initialisation, forward pass."""

import pytest
import torch
from cases import BASE_CASES, case_id, make_problem
from conftest import SEEDS

from sklearn_fgn._heads import (
    ACTIVATIONS,
    Head,
    activation_slope,
    forward,
    forward_with_cache,
    init_params,
    is_penalized,
)

HEADS = [
    Head(4, 3),
    Head(4, 1, fit_intercept=False),
    Head(4, 5, (5,), "tanh"),
    Head(4, 2, (4, 3), "gelu", fit_intercept=False),
    Head(6, 1, (4, 3), "logistic"),
    Head(3, 3, (5,), "relu"),
]


def _head_id(head):
    return f"{head.layer_sizes}-{head.activation}-{'int' if head.fit_intercept else 'noint'}"


def _torch_module(head, params):
    """The same head as a ``torch.nn.Sequential`` with copied parameters."""
    modules = []
    sizes = head.layer_sizes
    torch_activations = {
        "relu": torch.nn.ReLU(),
        "tanh": torch.nn.Tanh(),
        "logistic": torch.nn.Sigmoid(),
        "gelu": torch.nn.GELU(),
    }
    for layer in range(head.n_layers):
        linear = torch.nn.Linear(sizes[layer], sizes[layer + 1], bias=head.fit_intercept, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(params[f"coef_{layer}"])
            if head.fit_intercept:
                linear.bias.copy_(params[f"intercept_{layer}"])
        modules.append(linear)
        if layer < head.n_layers - 1:
            modules.append(torch_activations[head.activation])
    return torch.nn.Sequential(*modules)


@pytest.mark.parametrize("case", BASE_CASES, ids=case_id)
def test_forward_matches_torch_nn(case):
    head, params, X, _, _ = make_problem(case)
    logits = forward(head, params, X)
    assert logits.shape == (case.n_samples, case.n_logits)
    assert logits.dtype == torch.float64
    with torch.no_grad():
        expected = _torch_module(head, params)(X)
    torch.testing.assert_close(logits, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("head", HEADS, ids=_head_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_params_shapes_dtype_and_forward_shape(head, dtype):
    params = init_params(head, torch.Generator().manual_seed(0), dtype, "cpu")
    expected_keys = []
    for layer in range(head.n_layers):
        expected_keys.append(f"coef_{layer}")
        if head.fit_intercept:
            expected_keys.append(f"intercept_{layer}")
    assert list(params) == expected_keys
    sizes = head.layer_sizes
    for layer in range(head.n_layers):
        assert params[f"coef_{layer}"].shape == (sizes[layer + 1], sizes[layer])
        if head.fit_intercept:
            assert params[f"intercept_{layer}"].shape == (sizes[layer + 1],)
    assert all(t.dtype == dtype and t.device.type == "cpu" for t in params.values())
    X = torch.randn(7, head.n_features, dtype=dtype)
    assert forward(head, params, X).shape == (7, head.n_logits)
    assert forward(head, params, X).dtype == dtype


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n_logits", [1, 2, 4])
def test_linear_head_initialises_to_zero(n_logits, fit_intercept):
    head = Head(5, n_logits, fit_intercept=fit_intercept)
    params = init_params(head, torch.Generator().manual_seed(3), torch.float64, "cpu")
    assert head.is_linear and head.n_layers == 1
    assert all(torch.count_nonzero(t) == 0 for t in params.values())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("head", [h for h in HEADS if not h.is_linear], ids=_head_id)
def test_same_generator_seed_gives_identical_params(head, seed):
    first = init_params(head, torch.Generator().manual_seed(seed), torch.float64, "cpu")
    second = init_params(head, torch.Generator().manual_seed(seed), torch.float64, "cpu")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = init_params(head, torch.Generator().manual_seed(seed + 100), torch.float64, "cpu")
    assert not torch.equal(first["coef_0"], other["coef_0"])
    # Non-zero weights (symmetry breaking) and zero biases.
    assert all(torch.count_nonzero(t) == t.numel() for k, t in first.items() if k.startswith("coef_"))
    assert all(torch.count_nonzero(t) == 0 for k, t in first.items() if k.startswith("intercept_"))
    # float32 params are the float64 draws, rounded (CPU and CUDA start alike).
    single = init_params(head, torch.Generator().manual_seed(seed), torch.float32, "cpu")
    assert all(torch.equal(single[k], first[k].float()) for k in first)


def test_init_params_does_not_touch_global_rng():
    head = Head(4, 3, (5,), "tanh")
    state = torch.random.get_rng_state()
    init_params(head, torch.Generator().manual_seed(0), torch.float64, "cpu")
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("case", BASE_CASES, ids=case_id)
def test_forward_with_cache(case):
    head, params, X, _, _ = make_problem(case)
    logits, inputs, preacts = forward_with_cache(head, params, X)
    torch.testing.assert_close(logits, forward(head, params, X), rtol=0, atol=0)
    assert len(inputs) == len(preacts) == head.n_layers
    assert preacts[-1] is logits or torch.equal(preacts[-1], logits)
    assert inputs[0] is X
    activation = ACTIVATIONS[head.activation]
    for layer in range(head.n_layers):
        assert preacts[layer].shape == (X.shape[0], head.layer_sizes[layer + 1])
        if layer > 0:
            torch.testing.assert_close(inputs[layer], activation(preacts[layer - 1]), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_slope_matches_autograd(name, dtype):
    # Every activation has a slope; relu's is autograd's 0 at exactly 0.
    pre = torch.cat([torch.linspace(-6, 6, 121, dtype=dtype), torch.zeros(1, dtype=dtype)])
    expected = torch.func.vmap(torch.func.grad(ACTIVATIONS[name]))(pre)
    slope = activation_slope(name, pre, ACTIVATIONS[name](pre))
    if slope is None:
        assert name == "identity"
        slope = torch.ones_like(pre)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(slope, expected, rtol=8 * eps, atol=8 * eps)
    assert slope.dtype == dtype
    if name == "relu":
        assert slope[-1] == 0 and expected[-1] == 0


def test_is_penalized():
    assert is_penalized("coef_0") and is_penalized("coef_3")
    assert not is_penalized("intercept_0") and not is_penalized("intercept_2")
    params = init_params(Head(3, 4, (5, 2), "relu"), torch.Generator().manual_seed(0), torch.float64, "cpu")
    assert {k for k in params if is_penalized(k)} == {k for k, t in params.items() if t.ndim == 2}


def test_head_properties():
    head = Head(6, 4, (5, 3))
    assert head.layer_sizes == (6, 5, 3, 4)
    assert head.n_layers == 3 and not head.is_linear
    assert Head(6, 4).is_linear
    with pytest.raises(AttributeError):
        head.n_features = 2  # frozen
