"""Linear and MLP heads as explicit-parameter functions.

A head is a frozen :class:`Head` spec plus a parameter dict
``{"coef_0": W_0, "intercept_0": b_0, ..., "coef_L": W_L, "intercept_L": b_L}``
where ``W_l`` has the torch layout ``(fan_out, fan_in)``. The last layer
produces the logits: ``n_classes`` of them, or one for a binary problem.
``coef_*`` entries are penalised by ``alpha``; ``intercept_*`` entries are not.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "COEF",
    "INTERCEPT",
    "Head",
    "Params",
    "activation_slope",
    "coef_key",
    "forward",
    "forward_with_cache",
    "init_params",
    "intercept_key",
    "is_penalized",
]

# A parameter set: name -> tensor (``coef_0``, ``intercept_0``, ...; a module's names for a logits function).
Params = dict[str, Tensor]


def coef_key(layer: int) -> str:
    """Return the name of layer ``layer``'s weight matrix in a head's parameters, ``"coef_{layer}"``."""
    return f"coef_{layer}"


def intercept_key(layer: int) -> str:
    """Return the name of layer ``layer``'s bias in a head's parameters, ``"intercept_{layer}"``."""
    return f"intercept_{layer}"


# The linear head's parameters (and an MLP's first layer's, which the feature metric whitens).
COEF, INTERCEPT = coef_key(0), intercept_key(0)
ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "logistic": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
}
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_slope(pre: Tensor, out: Tensor) -> Tensor:
    # gelu(x) = x Phi(x) (the exact erf form, torch's default): Phi(x) + x phi(x)
    cdf = 0.5 * (1.0 + torch.erf(pre * _INV_SQRT_2))
    return cdf + pre * torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI


# d act / d pre from the pre-activation and the activation's output; None: slope 1.
_SLOPES = {
    "identity": None,
    "relu": lambda pre, out: (pre > 0).to(pre.dtype),  # 0 at 0, as torch's autograd
    "tanh": lambda pre, out: 1.0 - out * out,
    "logistic": lambda pre, out: out * (1.0 - out),
    "gelu": _gelu_slope,
}


def activation_slope(name: str, pre: Tensor, out: Tensor) -> Tensor | None:
    """Elementwise derivative of activation ``name`` at ``pre``, given ``out = act(pre)``.

    Returns
    -------
    Tensor or None
        The slopes, shaped like ``pre``; None for the identity (slope 1).
    """
    slope = _SLOPES[name]
    return None if slope is None else slope(pre, out)


@dataclass(frozen=True)
class Head:
    """Shape of a head: ``n_features -> hidden_layer_sizes -> n_logits``.

    Parameters
    ----------
    n_features : int
        Input width ``d``.
    n_logits : int
        Output width: the number of classes, or 1 for a single-logit binary head.
    hidden_layer_sizes : tuple of int, default=()
        ``()`` is the linear (multinomial logistic) head.
    activation : str, default="relu"
        One of ``ACTIVATIONS``; applied after every hidden layer.
    fit_intercept : bool, default=True
        Whether every layer has a bias.
    """

    n_features: int
    n_logits: int
    hidden_layer_sizes: tuple[int, ...] = ()
    activation: str = "relu"
    fit_intercept: bool = True

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """All widths, input first, logits last."""
        return (self.n_features, *self.hidden_layer_sizes, self.n_logits)

    @property
    def n_layers(self) -> int:
        """Number of affine layers."""
        return len(self.hidden_layer_sizes) + 1

    @property
    def is_linear(self) -> bool:
        """Whether the head is a single affine map."""
        return self.n_layers == 1

    # The head protocol (shared with ``_curvature.FunctionHead``, a logits function's head).
    has_layers = True  # per-layer structure: closed-form JVP/VJP and the exact row-space Gram

    def logits_fn(self):
        """Return ``(params, X) -> logits``, this head's forward pass."""
        return functools.partial(forward, self)

    def penalized(self, params: Params) -> frozenset[str]:
        """Return the names ``alpha`` penalises: the weights ``coef_*``, never the biases."""
        return frozenset(k for k in params if is_penalized(k))


def is_penalized(name: str) -> bool:
    """Whether parameter ``name`` is penalised by ``alpha`` (weights are, biases not)."""
    return name.startswith(coef_key(0)[:-1])


def init_params(
    head: Head, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
) -> Params:
    """Return initial parameters.

    The linear head starts at zero (the convex problem needs no symmetry
    breaking). MLP layers use Glorot-uniform weights drawn from ``generator``
    (on the CPU, so CPU and CUDA fits start identically) and zero biases.

    Returns
    -------
    dict of Tensor
        Parameters on ``device`` in ``dtype``.
    """
    params = {}
    sizes = head.layer_sizes
    for layer in range(head.n_layers):
        fan_in, fan_out = sizes[layer], sizes[layer + 1]
        if head.is_linear:
            weight = torch.zeros(fan_out, fan_in, dtype=torch.float64)
        else:
            gain = 2.0 if head.activation == "logistic" else 6.0
            bound = math.sqrt(gain / (fan_in + fan_out))
            weight = (torch.rand(fan_out, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        params[f"coef_{layer}"] = weight.to(dtype=dtype, device=device)
        if head.fit_intercept:
            params[f"intercept_{layer}"] = torch.zeros(fan_out, dtype=dtype, device=device)
    return params


def _affine(head: Head, params: Params, layer: int, inputs: Tensor) -> Tensor:
    out = inputs @ params[f"coef_{layer}"].T
    if head.fit_intercept:
        out = out + params[f"intercept_{layer}"]
    return out


def forward(head: Head, params: Params, X: Tensor) -> Tensor:
    """Return the logits ``(n, n_logits)`` of ``X`` ``(n, n_features)``.

    Cost: one matmul per layer. Pure function of ``params`` (usable under
    ``torch.func`` transforms).

    Returns
    -------
    Tensor of shape (n, n_logits)
        The logits.
    """
    activation = ACTIVATIONS[head.activation]
    hidden = X
    for layer in range(head.n_layers - 1):
        hidden = activation(_affine(head, params, layer, hidden))
    return _affine(head, params, head.n_layers - 1, hidden)


def forward_with_cache(head: Head, params: Params, X: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Forward pass keeping every layer's input and pre-activation.

    Returns
    -------
    logits : Tensor of shape (n, n_logits)
    inputs : list of Tensor
        ``inputs[l]`` is the input of layer ``l`` (``X`` for layer 0).
    preacts : list of Tensor
        ``preacts[l]`` is the output of layer ``l`` before its activation;
        ``preacts[-1]`` is ``logits``. They are part of the autograd graph so
        that one backward pass gives the gradient with respect to each.
    """
    activation = ACTIVATIONS[head.activation]
    inputs, preacts = [], []
    hidden = X
    for layer in range(head.n_layers):
        inputs.append(hidden)
        pre = _affine(head, params, layer, hidden)
        preacts.append(pre)
        hidden = activation(pre) if layer < head.n_layers - 1 else pre
    return hidden, inputs, preacts
