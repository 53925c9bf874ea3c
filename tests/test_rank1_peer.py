"""Tests of the rank-1 curvature peer (benchmarks/_rank1.py) against dense float64 references."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import SEEDS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _rank1 import Rank1Curvature, damped_rank1_solve  # noqa: E402

P, SHAPES = 20, [(3, 5), (5,)]  # two tensors, 20 parameters in all
DAMPINGS = [1e-2, 1.0, 10.0]


def _split(vec):
    """A flat vector as tensors of SHAPES."""
    return [t.reshape(s) for t, s in zip(vec.split([15, 5]), SHAPES, strict=True)]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _dense_curvature(grads, beta):
    """u u^T with u the bias-corrected moving average of ``grads`` (float64, dense)."""
    t = len(grads)
    weights = torch.tensor([(1 - beta) * beta ** (t - 1 - k) for k in range(t)], dtype=torch.float64)
    u = (weights[:, None] * torch.stack(grads)).sum(0) / (1 - beta**t)
    return torch.outer(u, u), u, weights / (1 - beta**t)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("damping", DAMPINGS)
def test_solve_matches_dense_solve(seed, damping):
    gen = torch.Generator().manual_seed(seed)
    u, g = torch.randn(2, P, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(damping * torch.eye(P, dtype=torch.float64) + torch.outer(u, u), g)
    got = _flat(damped_rank1_solve(_split(g), _split(u), damping))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # the rank-one term matters: the answer is not the plain damped gradient
    assert torch.linalg.vector_norm(got - g / damping) > 1e-3 * torch.linalg.vector_norm(g / damping)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("damping", DAMPINGS)
def test_optimizer_steps_match_dense_solve(seed, damping):
    """Each step moves theta by -lr (lambda I + G_t)^-1 g_t, G_t from the whole gradient history."""
    gen = torch.Generator().manual_seed(seed)
    beta, lr = 0.8, 0.5
    params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    opt = Rank1Curvature(params, damping=damping, beta=beta, lr=lr)
    history = []
    for _ in range(4):
        g = torch.randn(P, generator=gen, dtype=torch.float64) + 1.0  # nonzero mean: u does not vanish
        history.append(g)
        for p, gp in zip(params, _split(g), strict=True):
            p.grad = gp.clone()
        before = _flat(params).detach().clone()
        opt.step()
        G, _, _ = _dense_curvature(history, beta)
        expected = -lr * torch.linalg.solve(damping * torch.eye(P, dtype=torch.float64) + G, g)
        torch.testing.assert_close(_flat(params).detach() - before, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_curvature_is_survey_average_less_centred_covariance(seed):
    """The module docstring's identity: sum_k w_k v_k v_k^T = u u^T + sum_k w_k (v_k - u)(v_k - u)^T."""
    gen = torch.Generator().manual_seed(seed)
    beta = 0.9
    grads = list(torch.randn(6, P, generator=gen, dtype=torch.float64))
    G, u, weights = _dense_curvature(grads, beta)
    survey = sum(w * torch.outer(v, v) for w, v in zip(weights, grads, strict=True))
    covariance = sum(w * torch.outer(v - u, v - u) for w, v in zip(weights, grads, strict=True))
    torch.testing.assert_close(survey, G + covariance, rtol=0, atol=1e-12)
    assert torch.linalg.matrix_norm(covariance) > 0.1 * torch.linalg.matrix_norm(G)


@pytest.mark.parametrize("seed", SEEDS)
def test_one_step_lowers_logistic_loss(seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = (X @ torch.randn(5, generator=gen, dtype=torch.float64) > 0).to(torch.float64)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = Rank1Curvature([w, b], damping=1.0)

    def loss_fn():
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y)

    loss = loss_fn()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    assert float(after) < float(loss.detach()) - 1e-3
    assert not torch.equal(w.detach(), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"damping": 0.0}, "damping"), ({"beta": 1.0}, "beta"), ({"lr": -1.0}, "lr")],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rank1Curvature([torch.zeros(2, requires_grad=True)], **kwargs)
