"""Simple-LSH for maximum inner product search (Neyshabur & Srebro, ICML 2015).

Cosine LSH ignores norms, but "which stored vector has the largest inner product with q"
depends on them. Simple-LSH scales every item into the unit ball, x / M with M the largest
norm, and appends sqrt(1 - |x/M|^2) so that all items lie on the unit sphere; a query is
normalized and gets a 0. Then <P(x), Q(q)> = <x, q> / (M |q|): the angle between
transformed vectors is monotone in the inner product, and SimHash on them finds large
inner products (an asymmetric hash made symmetric). For neuron merging the item transform
alone is used on both sides: two neurons collide only if they agree in direction and in
norm, which is what merging non-homogeneous activations (tanh, GELU) needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hashexp.errors import ConfigError


def _as_matrix(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x) or x.ndim != 2:
        raise ConfigError(f"{name}: x must be a 2-D tensor (N, d), got {getattr(x, 'shape', type(x).__name__)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ConfigError(f"{name}: x must be real-valued, got {x.dtype}")
    return x if x.is_floating_point() else x.float()


def mips_transform(x: torch.Tensor, M: float | None = None) -> torch.Tensor:
    """Items onto the unit sphere: ``[x / M, sqrt(max(0, 1 - |x|^2 / M^2))]``, shape (N, d+1).

    Args:
        x: (N, d) items.
        M: scale, at least the largest row norm for an exact embedding (larger rows are
            clamped to the sphere's equator). Default: the largest row norm; when every row
            is zero, 1 (all rows map to the pole [0, ..., 0, 1]).
    """
    x = _as_matrix(x, "mips_transform")
    if M is None:
        M = float(x.norm(dim=1).max()) if len(x) else 1.0
        if M == 0.0:
            M = 1.0
    elif not isinstance(M, (int, float)) or isinstance(M, bool) or not math.isfinite(M) or M <= 0:
        raise ConfigError(f"mips_transform: M must be a finite number > 0, got {M!r}")
    xs = x / M
    tail = (1.0 - (xs * xs).sum(dim=1, keepdim=True)).clamp_min(0.0).sqrt()
    return torch.cat([xs, tail], dim=1)


def mips_query_transform(q: torch.Tensor) -> torch.Tensor:
    """Queries: ``[q / |q|, 0]``, shape (N, d+1); a zero query stays zero."""
    q = _as_matrix(q, "mips_query_transform")
    qs = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    return torch.cat([qs, qs.new_zeros(len(qs), 1)], dim=1)
