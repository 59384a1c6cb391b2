"""Merge sites: one width shared by several tensors.

A site is the unit the compressor works on (the same idea as Torch-Pruning's dependency
groups, declared by hand by each model):

- producers: layers whose *output* axis is the site's width (Linear rows, Conv out-channels,
  their biases), each optionally followed by a BatchNorm on that axis;
- consumers: layers whose *input* axis is the site's width (the next Linear's columns, the next
  Conv's in-channels);
- a tap: the module whose forward output holds the site's activations, hooked to accumulate
  per-neuron activation mass for activation-weighted representatives.

Hashing, grouping, surgery and optimizer remapping are written once against this class; models
only say which tensors share a width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: activations f with f(a x) = a f(x) for a > 0: rescaled duplicates merge exactly
POSITIVELY_HOMOGENEOUS = {"relu", "leaky_relu", "identity"}
ACTIVATIONS = {"relu", "leaky_relu", "identity", "gelu", "tanh"}


@dataclass(eq=False)
class Producer:
    """A layer whose output axis (weight dim 0) is the site's width, with an optional norm after it."""

    module: nn.Module
    norm: nn.modules.batchnorm._BatchNorm | None = None

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (width, fan_in) and bias (width,) of the layer with its norm folded in (eval form)."""
        w = self.module.weight.detach().flatten(1)
        b = self.module.bias.detach() if self.module.bias is not None else torch.zeros(
            w.shape[0], dtype=w.dtype, device=w.device)
        if self.norm is None:
            return w, b
        c, shift = norm_affine(self.norm)
        return w * c[:, None], b * c + shift


@dataclass(eq=False)
class Consumer:
    """A layer whose input axis (weight dim 1) is the site's width."""

    module: nn.Module


@dataclass(eq=False)
class MergeSite:
    """One shared width: its producers, consumers, activation and activation tap.

    Args:
        name: stable identifier used in configs, logs and history.csv (e.g. ``"fc1"``).
        producers: layers (with optional norms) whose outputs have this width.
        consumers: layers whose inputs have this width.
        activation: nonlinearity applied to the site; decides the merge rule.
        tap: module whose output is the post-activation tensor (N, width, ...) to hook.
        min_width: the compressor never takes the site below this width.
    """

    name: str
    producers: list[Producer]
    consumers: list[Consumer]
    activation: str = "relu"
    tap: nn.Module | None = None
    min_width: int = 1

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"site {self.name}: unknown activation {self.activation!r}; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        if not self.producers or not self.consumers:
            raise ValueError(f"site {self.name}: needs at least one producer and one consumer")
        widths = {out_width(p.module) for p in self.producers} | {in_width(c.module) for c in self.consumers}
        if len(widths) != 1:
            raise ValueError(f"site {self.name}: producers and consumers disagree on width: {sorted(widths)}")

    @property
    def width(self) -> int:
        return out_width(self.producers[0].module)

    @property
    def device(self) -> torch.device:
        """Where the site's tensors live (its first producer's weight)."""
        return self.producers[0].module.weight.device

    @property
    def homogeneous(self) -> bool:
        """True when positive rescalings of a neuron merge exactly (ReLU-like activations)."""
        return self.activation in POSITIVELY_HOMOGENEOUS

    def neuron_vectors(self) -> torch.Tensor:
        """(width, D) matrix: each neuron's [w; b] over all producers, norms folded in.

        A residual stream concatenates the vectors of every producer that adds into it, so a
        channel is similar to another only where it agrees in all of them.
        """
        parts = []
        for p in self.producers:
            w, b = p.folded()
            parts.append(w)
            parts.append(b[:, None])
        return torch.cat(parts, dim=1).float()

    def producer_parameters(self) -> list[nn.Parameter]:
        """The producers' parameters whose dim 0 is this site's width: one row per neuron in each."""
        out: list[nn.Parameter] = []
        for p in self.producers:
            out += [t for t in (p.module.weight, p.module.bias) if t is not None]
            if p.norm is not None and p.norm.affine:
                out += [p.norm.weight, p.norm.bias]
        return out

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter whose shape depends on this site's width."""
        return self.producer_parameters() + [c.module.weight for c in self.consumers]


def out_width(m: nn.Module) -> int:
    return int(m.weight.shape[0])


def in_width(m: nn.Module) -> int:
    return int(m.weight.shape[1])


def norm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = c * x + shift, per channel."""
    var = bn.running_var.detach() if bn.running_var is not None else torch.ones(bn.num_features)
    mean = bn.running_mean.detach() if bn.running_mean is not None else torch.zeros(bn.num_features)
    c = torch.rsqrt(var + bn.eps)
    shift = -mean * c
    if bn.affine:
        c = c * bn.weight.detach()
        shift = shift * bn.weight.detach() + bn.bias.detach()
    return c, shift


class HasMergeSites:
    """Mixin for models: declare ``merge_sites()`` and expose ``widths()``/``config_widths``.

    A model rebuilt from ``widths()`` must have the same parameter shapes as the merged one,
    so that model.pt can be loaded into a freshly built model.
    """

    def merge_sites(self) -> list[MergeSite]:  # pragma: no cover - interface
        raise NotImplementedError

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.merge_sites()}


def model_sites(model: nn.Module) -> list[MergeSite]:
    """The merge sites of ``model``: the one place every caller asks for them (today the model's
    own ``merge_sites()``; site discovery by tracing extends this)."""
    return model.merge_sites()
