"""Self-checks of traced sites: what the tests and benchmarks/bench_anymodel.py measure.

- :func:`noop_error`: keeping every neuron of every site (through the surgery, members and
  offset consumers included) must leave the model's output unchanged;
- :func:`planted_error`: make neuron j of a site an exact copy of neuron i (every producer row,
  norm and member channel copied; every consumer's column of i split between i and j; for
  attention heads every channel of head j a copy of head i's), then merge j back into i: the
  merged model must compute what the planted one did;
- :func:`compress_half`: the least-squares hashed compressor keeps half of every site.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hashexp.merge.sites import MergeSite
from hashexp.merge.surgery import _channels, _on_site, apply_plan, prune_plan


def _out(model: nn.Module, x: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        y = model(*x) if isinstance(x, tuple) else model(x)
    return y if isinstance(y, torch.Tensor) else next(t for t in torch.utils._pytree.tree_flatten(y)[0]
                                                      if isinstance(t, torch.Tensor))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def noop_error(model: nn.Module, x: Any, sites: list[MergeSite]) -> float:
    """Relative output change after keeping every neuron of every site through the surgery."""
    y0 = _out(model, x)
    for s in sites:
        apply_plan(s, prune_plan(s, torch.arange(s.width, device=s.device)))
    return rel(_out(model, x), y0)


def plant_duplicate(site: MergeSite, i: int, j: int, split: float = 0.3) -> None:
    """Make neuron j an exact copy of neuron i; consumers read ``(1 - split)`` of i's column from i
    and ``split`` from j (their own column of j is overwritten)."""
    with torch.no_grad():
        for p in site.producers:
            for t in (p.module.weight, p.module.bias):
                if t is not None:
                    for part in range(p.parts):  # a fused q/k/v projection: the row of every part
                        t[part * site.width + j] = t[part * site.width + i]
            if p.norm is not None:
                for t in (p.norm.weight, p.norm.bias, p.norm.running_mean, p.norm.running_var):
                    if t is not None:
                        t[j] = t[i]
        for mem in site.members:
            off = mem.offset
            total = _channels(mem.module)
            for t in list(mem.module.parameters(recurse=False)) + list(mem.module.buffers(recurse=False)):
                if t is not None and t.dim() and t.shape[0] == total:
                    t[off + j] = t[off + i]
        width = site.width
        for c in site.consumers:
            def split_cols(w):
                w = w.clone()
                col = w[:, i].clone()
                w[:, i] = col * (1 - split)
                w[:, j] = col * split
                return w
            c.module.weight.data = _on_site(c.module.weight.data, c, width, split_cols)


def planted_error(model: nn.Module, x: Any, site: MergeSite) -> float:
    """Plant a duplicate pair in ``site`` and merge it back (survivor i keeps its rows, the
    consumers add j's columns to i's); the relative change of the planted model's output."""
    from hashexp.merge.plans import fixed_plan

    width, g = site.width, site.group
    if width < 2 * g:
        return 0.0
    n = width // g  # attention heads: plant whole heads (channel i * g + a copies into j * g + a)
    i, j = n // 3, n - 1 - n // 4
    if i == j:
        i, j = 0, 1
    fi, fj = torch.arange(i * g, (i + 1) * g), torch.arange(j * g, (j + 1) * g)
    for a, b in zip(fi.tolist(), fj.tolist()):
        plant_duplicate(site, a, b)
    y_p = _out(model, x)
    groups = torch.arange(width)
    groups[fj] = groups[fi]
    groups = torch.unique(groups, return_inverse=True)[1]
    keep = torch.ones(width, dtype=torch.bool)
    keep[fj] = False
    apply_plan(site, fixed_plan(site, groups, keep))
    return rel(_out(model, x), y_p)


def compress_half(model: nn.Module, calib: torch.Tensor, keep: float = 0.5, **kw) -> list:
    """Keep ``keep`` of every site with the default compressor (LSH proposes, least squares absorbs)."""
    from hashexp.merge.hashed import HashCompressor

    comp = HashCompressor(target_ratio=keep, compensation="lsq", **kw)
    return comp.compress(model, None, None, None, 0, calib=calib)
