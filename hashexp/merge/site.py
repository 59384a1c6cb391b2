"""A merge site: one width shared by several tensors (the types; hashexp.merge.sites says which
sites a model has).

A site is the unit the compressor works on (the same idea as Torch-Pruning's dependency
groups, declared by hand by each model):

- producers: layers whose *output* axis is the site's width (Linear rows, Conv out-channels,
  their biases), each optionally followed by a BatchNorm on that axis;
- consumers: layers whose *input* axis is the site's width (the next Linear's columns, the next
  Conv's in-channels);
- a tap: the module whose forward output holds the site's activations, hooked to accumulate
  per-neuron activation mass for activation-weighted representatives.

Sites found by tracing (:mod:`hashexp.merge.discovery`) add three generalizations:

- a consumer may read the site at a channel offset (after a concatenation, the channels of the
  other inputs before and after it) and as blocks of features (a Linear after flattening a conv
  output: channel c is features c*block .. c*block+block-1);
- members: per-channel layers that are not directly after a producer (a BatchNorm after a
  concatenation, a depthwise conv) lose the same channels as the site;
- a gated site (a squeeze-excitation scale multiplies its channels) has the gate's producer
  among its producers;
- a grouped site (attention heads, ``group`` = the head width): a producer may hold the site's
  rows ``parts`` times (a fused q/k/v projection: rows ``p * width + f``), and channels come and go
  only in whole groups of ``group`` (:mod:`hashexp.merge.heads`).

A site with members, a gate or groups can only keep or drop neurons (``restricted``): folding one
neuron into another by the weight rule needs the producer-activation-consumer chain alone.

Hashing, grouping, surgery and optimizer remapping are written once against this class; models
only say which tensors share a width (or let the tracer find it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

#: activations f with f(a x) = a f(x) for a > 0: rescaled duplicates merge exactly
POSITIVELY_HOMOGENEOUS = {"relu", "leaky_relu", "identity"}
ACTIVATIONS = {"relu", "leaky_relu", "identity", "gelu", "tanh", "relu6", "silu", "hardswish", "hardsigmoid",
               "sigmoid", "elu", "mish", "softplus", "selu", "celu", "hardtanh", "prelu", "mixed", "attention"}


@dataclass(eq=False)
class Producer:
    """A layer whose output axis (weight dim 0) is the site's width, with an optional norm after it.

    ``parts`` > 1: the output axis holds the site's channels that many times in a row (a fused
    q/k/v projection: channel f is rows f, width + f, 2 * width + f); no norm then.
    """

    module: nn.Module
    norm: nn.modules.batchnorm._BatchNorm | None = None
    parts: int = 1

    @property
    def width(self) -> int:
        """The site's width as this producer sees it (its output rows over ``parts``)."""
        return out_width(self.module) // self.parts

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (width, fan_in * parts) and bias (width, parts) of the layer with its norm folded
        in (eval form); each channel's rows of all parts side by side."""
        w = self.module.weight.detach().flatten(1)
        b = self.module.bias.detach() if self.module.bias is not None else torch.zeros(
            w.shape[0], dtype=w.dtype, device=w.device)
        if self.parts > 1:
            n = w.shape[0] // self.parts
            return (w.reshape(self.parts, n, -1).transpose(0, 1).reshape(n, -1),
                    b.reshape(self.parts, n).T)
        if self.norm is None:
            return w, b
        c, shift = norm_affine(self.norm)
        return w * c[:, None], b * c + shift

    def rows(self, labels: torch.Tensor, coef: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A channel plan (``labels`` (width,) in [0, n) or -1, coefficients) as a plan of this
        producer's output rows: row p * width + f goes to p * n + labels[f]."""
        if self.parts == 1:
            return labels, coef, n
        width = len(labels)
        part = torch.arange(self.parts, device=labels.device)[:, None]
        rows = torch.where(labels >= 0, part * n + labels, torch.full_like(labels, -1)).flatten()
        return rows, coef.repeat(self.parts), n * self.parts if width else 0


Span = Sequence["nn.Module | int"]


def span_width(parts: Span) -> int:
    """Channels in a list of segments: an int is a fixed count, a module its current output width."""
    return sum(p if isinstance(p, int) else out_width(p) for p in parts)


@dataclass(eq=False)
class Consumer:
    """A layer whose input axis (weight dim 1) holds the site's channels.

    Args:
        module: a Linear or (ungrouped) Conv.
        before, after: the other channels on its input axis, before and after the site's (a
            concatenation): fixed counts or producer modules whose current width counts, so the
            offsets stay right while other sites shrink.
        block: input features per channel (a Linear reading a flattened conv output).
        norm: a BatchNorm right after this layer; a bias-less consumer hands it the constant
            shift of a least-squares refit.
    """

    module: nn.Module
    before: Span = ()
    after: Span = ()
    block: int = 1
    norm: nn.modules.batchnorm._BatchNorm | None = None

    @property
    def offset(self) -> int:
        """Channel index where the site starts on this layer's input axis."""
        return span_width(self.before)

    @property
    def plain(self) -> bool:
        """True when the layer reads exactly the site's channels, one feature each."""
        return not self.before and not self.after and self.block == 1


@dataclass(eq=False)
class Member:
    """A per-channel layer inside a site (BatchNorm not right after a producer, depthwise conv).

    Dim 0 of its parameters and buffers runs over its channels; the site's channels sit at
    ``offset`` (the channels ``before`` and ``after`` it belong to other sites).
    """

    module: nn.Module
    before: Span = ()
    after: Span = ()

    @property
    def offset(self) -> int:
        """Index of the site's first channel in the member's dim 0."""
        return span_width(self.before)


@dataclass(eq=False)
class MergeSite:
    """One shared width: its producers, consumers, activation and activation tap.

    Args:
        name: stable identifier used in configs, logs and history.csv (e.g. ``"fc1"``).
        producers: layers (with optional norms) whose outputs have this width.
        consumers: layers whose inputs have this width.
        activation: nonlinearity applied to the site; decides the merge rule.
        tap: module whose output is the post-activation tensor (N, width, ...) to hook; None:
            activation mass is read from the first consumer's input.
        min_width: the compressor never takes the site below this width.
        members: per-channel layers between producers and consumers (see :class:`Member`).
        gated: a product of two of the site's tensors (a squeeze-excitation gate) ties them.
        group: channels leave only in whole groups of this many (attention heads: the head
            width); the site's width is a multiple of it.
        kind: what the tracer saw (``plain``, ``stream``, ``concat``, ``gated``, ...), for display.
    """

    name: str
    producers: list[Producer]
    consumers: list[Consumer]
    activation: str = "relu"
    tap: nn.Module | None = None
    min_width: int = 1
    members: list[Member] = field(default_factory=list)
    gated: bool = False
    kind: str = "plain"
    group: int = 1

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"site {self.name}: unknown activation {self.activation!r}; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        if not self.producers or not self.consumers:
            raise ValueError(f"site {self.name}: needs at least one producer and one consumer")
        widths = {p.width for p in self.producers} | {
            (in_width(c.module) // c.block) - c.offset - span_width(c.after) for c in self.consumers}
        if len(widths) != 1:
            raise ValueError(f"site {self.name}: producers and consumers disagree on width: {sorted(widths)}")
        if self.group < 1 or self.width % self.group:
            raise ValueError(f"site {self.name}: width {self.width} is not a multiple of its group {self.group}")

    @property
    def width(self) -> int:
        """Number of channels of the site (its producers' output width)."""
        return self.producers[0].width

    @property
    def device(self) -> torch.device:
        """Where the site's tensors live (its first producer's weight)."""
        return self.producers[0].module.weight.device

    @property
    def homogeneous(self) -> bool:
        """True when positive rescalings of a neuron merge exactly (ReLU-like activations)."""
        return self.activation in POSITIVELY_HOMOGENEOUS and not self.restricted

    @property
    def restricted(self) -> str | None:
        """Why neurons of this site can only be kept or dropped, not folded into others (None: they can)."""
        if self.group > 1:
            return (f"its channels are attention heads of {self.group} (softmax(q k^T) v is not linear in a "
                    "head's rows: a head is kept or removed whole, never averaged with another)")
        if self.gated:
            return "a gate multiplies its channels (squeeze-excitation)"
        if self.members:
            kinds = sorted({type(m.module).__name__ for m in self.members})
            return f"per-channel layers ({', '.join(kinds)}) sit between its producers and consumers"
        return None

    def neuron_vectors(self) -> torch.Tensor:
        """(width, D) matrix: each neuron's [w; b] over all producers, norms folded in.

        A residual stream concatenates the vectors of every producer that adds into it, so a
        channel is similar to another only where it agrees in all of them.
        """
        parts = []
        for p in self.producers:
            w, b = p.folded()
            parts.append(w)
            parts.append(b.reshape(len(b), -1))
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
        out = self.producer_parameters() + [c.module.weight for c in self.consumers]
        for m in self.members:
            out += [p for p in m.module.parameters(recurse=False)]
        return out


def out_width(m: nn.Module) -> int:
    """Output width of a Linear/Conv: dim 0 of its weight."""
    return int(m.weight.shape[0])


def in_width(m: nn.Module) -> int:
    """Input width of a Linear/Conv: dim 1 of its weight (per group for a grouped conv)."""
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


def site_input(cons: Consumer, x: torch.Tensor, width: int) -> torch.Tensor:
    """The site's channels in a consumer's input, as (N, width, ...): channel axis 1.

    A Linear's features (last axis) move to axis 1 (tokens become extra positions); a Linear
    reading blocks of features gives (N, width, block); concatenated channels of other sites
    are cut off. A plain 2-D Linear or conv input is returned as is.
    """
    if isinstance(cons.module, nn.Linear):
        if cons.block > 1:
            x = x.reshape(x.shape[0], -1, cons.block)
        elif x.dim() > 2:
            x = x.movedim(-1, 1)
    if cons.before or cons.after:
        off = cons.offset
        x = x[:, off:off + width]
    return x


def consumer_output(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A consumer's output with its channels on axis 1 (a Linear over tokens: features moved there)."""
    if isinstance(module, nn.Linear) and y.dim() > 2:
        return y.movedim(-1, 1)
    return y
