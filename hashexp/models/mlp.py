"""Multi-layer perceptron with one merge site per hidden layer.

The classic fully connected classifier used by the hashed-network papers (SLIDE, MONGOOSE
train such MLPs with LSH). Each hidden layer i is a site: its Linear is the producer, the next
Linear the consumer, and the activation module the tap whose output the compressor watches.
The sites are found by tracing (hashexp.merge.discovery) and named ``fc1``, ``fc2``, ... by
:meth:`MLP.site_names`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod

import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.sites import HasMergeSites

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Module, HasMergeSites):
    """Fully connected classifier.

    Args:
        input_shape: per-sample input shape; inputs are flattened.
        num_classes: output width (never merged).
        widths: hidden widths, e.g. ``[2048, 2048]``.
        activation: ``relu``, ``gelu``, ``tanh`` or ``leaky_relu``.
        bias: whether the Linear layers have biases.
        site_widths: per-site widths (``{"fc1": 300, ...}``) overriding ``widths``; used to
            rebuild a merged model from model.pt.
    """

    def __init__(self, input_shape: Sequence[int] | int, num_classes: int, widths: Sequence[int] = (256, 256),
                 activation: str = "relu", bias: bool = True, site_widths: Mapping[str, int] | None = None) -> None:
        super().__init__()
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        widths = [int(w) for w in widths]
        if site_widths:
            names = [f"fc{i + 1}" for i in range(len(widths))]
            unknown = set(site_widths) - set(names)
            if unknown:
                raise ConfigError(f"model: unknown sites {sorted(unknown)} in site_widths; this MLP has {names}")
            widths = [int(site_widths.get(n, w)) for n, w in zip(names, widths)]
        if any(w < 1 for w in widths):
            raise ConfigError(f"model.widths must be positive integers, got {widths}")
        if activation not in _ACT:
            raise ConfigError(f"model.activation={activation!r} is not supported; choose one of {sorted(_ACT)}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_dim = int(prod(input_shape))
        self.num_classes = int(num_classes)
        self.activation = activation
        dims = [self.input_dim, *widths, self.num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(_ACT[activation]() for _ in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        x = x.flatten(1)
        for layer, act in zip(self.layers[:-1], self.acts):
            x = act(layer(x))
        return self.layers[-1](x)

    def site_names(self) -> dict[str, str]:
        """Names of the traced sites by first producer: hidden layer i is ``fc{i+1}``."""
        return {f"layers.{i}": f"fc{i + 1}" for i in range(len(self.acts))}
