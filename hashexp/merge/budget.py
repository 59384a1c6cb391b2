"""One error (and FLOPs) budget across all sites: ``hashing.budget=global``.

With ``budget=site`` (the default) every site stops at the same relative error ``max_error``
and keeps at least ``target_ratio`` of its width. Users of pruning tools ask for global ratios
instead, and sites differ in what a neuron costs (error) and what it saves (FLOPs). With
``budget=global`` a rehash first orders every site's removals (hashexp/merge/order.py, on the
network before this rehash), then spends one budget across the sites, cheapest error per saved
FLOP first:

- error: the sum over sites of the squared relative error of the consumers' pre-activation
  stays within ``n_sites * max_error^2`` (what per-site budgets would allow in total);
- FLOPs: with ``target_ratio`` the sites keep at least that share of their summed neuron FLOPs
  (a global ratio), not of each width.

:func:`allocate` is the exact greedy: blocks of all sites are merged by (running-max) error per
FLOP, so each site's own order is kept, and taken until the next block would break either
budget. :func:`neuron_flops` measures what one neuron of each site costs per sample.
"""

from __future__ import annotations

import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.calibration import RemovalOrder
from hashexp.merge.sites import MergeSite

BUDGETS = ("site", "global")


def check_budget(budget: str) -> str:
    """``hashing.budget`` validated: ``site`` or ``global``."""
    if budget not in BUDGETS:
        raise ConfigError(f"hashing.budget={budget!r}; choose {', '.join(BUDGETS)}")
    return budget


def neuron_flops(model: nn.Module, sites: list[MergeSite], x: torch.Tensor) -> dict[str, float]:
    """Multiply-adds per sample that one neuron of each site costs: its share of every producer
    (one output channel: fan-in times output positions) and of every consumer (one input
    channel: fan-out times output positions), measured with hooks on one forward of ``x[:1]``."""
    positions: dict[int, int] = {}

    def hook(module, inputs, output):
        positions[id(module)] = int(output[0, 0].numel()) if output.dim() > 2 else 1

    modules = {id(m): m for s in sites for m in [p.module for p in s.producers] + [c.module for c in s.consumers]}
    handles = [m.register_forward_hook(hook) for m in modules.values()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
        for m, tr in modes:
            m.training = tr
    out = {}
    for s in sites:
        f = 0.0
        for p in s.producers:
            w = p.module.weight
            f += positions.get(id(p.module), 1) * w[0].numel()
        for c in s.consumers:
            w = c.module.weight
            f += positions.get(id(c.module), 1) * w.numel() / s.width
        out[s.name] = f
    return out


def allocate(orders: dict[str, RemovalOrder], flops: dict[str, float], widths: dict[str, int],
             max_error: float | None, keep_flops: float | None) -> dict[str, int]:
    """Blocks of each site's order to take under one global budget (see the module docstring).

    Returns ``{site: number of blocks}``. The taken blocks spend at most ``n_sites * max_error^2``
    of summed squared relative error and remove at most ``(1 - keep_flops)`` of the summed
    neuron FLOPs; in the merged order, the first block not taken would break one of them.
    """
    names = [n for n in orders if orders[n].blocks]
    take = {n: 0 for n in orders}
    if not names:
        return take
    err_budget = None if max_error is None else len(orders) * float(max_error) ** 2
    total_flops = sum(widths[n] * flops[n] for n in orders)
    flop_budget = None if keep_flops is None else (1.0 - float(keep_flops)) * total_flops
    site_of, step_of, keys, d_err, d_flop = [], [], [], [], []
    for i, n in enumerate(names):
        o = orders[n]
        rel = torch.tensor(o.cost, dtype=torch.float64) / max(o.energy, 1e-30)
        de = torch.diff(rel, prepend=torch.zeros(1, dtype=torch.float64)).clamp_min(0.0)
        df = torch.tensor([len(b) * flops[n] for b in o.blocks], dtype=torch.float64)
        rate = torch.cummax(de / df.clamp_min(1e-30), 0).values  # keeps the site's own order
        site_of.append(torch.full((len(de),), i))
        step_of.append(torch.arange(len(de)))
        keys.append(rate)
        d_err.append(de)
        d_flop.append(df)
    site_of, step_of, key = torch.cat(site_of), torch.cat(step_of), torch.cat(keys)
    first = torch.argsort(step_of, stable=True)
    order = first[torch.argsort(key[first], stable=True)]
    ce = torch.cumsum(torch.cat(d_err)[order], 0)
    cf = torch.cumsum(torch.cat(d_flop)[order], 0)
    ok = torch.ones(len(order), dtype=torch.bool)
    if err_budget is not None:
        ok &= ce <= err_budget * (1 + 1e-12)
    if flop_budget is not None:
        ok &= cf <= flop_budget * (1 + 1e-12)
    n_take = int(ok.long().cumprod(0).sum())  # the longest prefix within both budgets
    counts = torch.bincount(site_of[order[:n_take]], minlength=len(names))
    for i, n in enumerate(names):
        take[n] = int(counts[i])
    return take
