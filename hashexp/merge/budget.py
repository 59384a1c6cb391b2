"""One error (and FLOPs) budget across all sites: ``hashing.budget=global``.

With ``budget=site`` (the default) every site stops at the same relative error ``max_error``
and keeps at least ``target_ratio`` of its width. Users of pruning tools ask for global ratios
instead, and sites differ in what a neuron costs (error) and what it saves (FLOPs). With
``budget=global`` a rehash first orders every site's removals (hashexp/merge/order.py, on the
network before this rehash), then spends one budget across the sites, cheapest error per saved
FLOP first:

- error: the sum over sites of the squared relative error of the consumers' pre-activation
  stays within ``n_sites * max_error^2`` (what per-site budgets would allow in total);
- FLOPs: with ``target_ratio`` the layers the sites touch keep at least that share of their
  multiply-adds (a global ratio, counted exactly: a layer between two sites shrinks with both),
  not of each width; or, with ``flops_plan``, the multiply-adds another run (a per-site run of
  the same seed) had after the same rehash (:func:`planned_keep`): equal FLOPs rehash by rehash.

:func:`allocate` is the exact greedy: blocks of all sites are merged by (running-max) error per
FLOP, so each site's own order is kept, and taken until the next block would break either
budget. :func:`layer_flops` measures the layers by hooks; :func:`neuron_flops` is what one
neuron of each site costs at the current widths.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class LayerFlops:
    """Multiply-adds per sample of one layer the sites touch, and the sites of its two axes: it
    scales with (producer site's width) x (consumer site's width), a ratio of 1 for an axis that
    belongs to no compressed site."""

    flops: float
    out_site: str | None
    in_site: str | None


def layer_flops(model: nn.Module, sites: list[MergeSite], x: torch.Tensor) -> list[LayerFlops]:
    """The layers that the ``sites`` touch, with their multiply-adds per sample measured by hooks
    on one forward of ``x[:1]`` (weight size times output positions)."""
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
    out_site = {id(p.module): s.name for s in sites for p in s.producers}
    in_site = {id(c.module): s.name for s in sites for c in s.consumers}
    return [LayerFlops(float(positions.get(k, 1) * m.weight.numel()), out_site.get(k), in_site.get(k))
            for k, m in modules.items()]


def neuron_flops(layers: list[LayerFlops], widths: dict[str, int]) -> dict[str, float]:
    """Multiply-adds per sample that one neuron of each site costs at the current widths: its
    share of every layer it produces (one output channel) or consumes (one input channel)."""
    out = {n: 0.0 for n in widths}
    for layer in layers:
        for site in {layer.out_site, layer.in_site} - {None}:
            out[site] += layer.flops / widths[site]
    return out


def total_flops(layers: list[LayerFlops], widths: dict[str, int], kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """Multiply-adds of the layers when site n keeps ``kept[n]`` neurons (tensors of one shape:
    one value per candidate prefix), vectorized over the prefixes."""
    total = torch.zeros(next(iter(kept.values())).shape, dtype=torch.float64)
    for layer in layers:
        f = torch.full_like(total, layer.flops)
        for site in (layer.out_site, layer.in_site):
            if site is not None:
                f = f * kept[site].double() / widths[site]
        total = total + f
    return total


def planned_keep(layers: list[LayerFlops], widths: dict[str, int], target: dict[str, int] | None) -> float:
    """The share of the layers' current multiply-adds to keep so that they cost what they cost at
    the widths ``target`` (a followed run's widths after the same rehash; a site it does not name
    keeps its width): 1.0 (remove nothing) past the plan or where this network is already as
    small. Exact, since each layer's FLOPs scale with the widths of its two axes."""
    if target is None:
        return 1.0
    now = total_flops(layers, widths, {n: torch.tensor([w]) for n, w in widths.items()})
    then = total_flops(layers, widths, {n: torch.tensor([int(target.get(n, w))]) for n, w in widths.items()})
    return min(1.0, float(then[0]) / max(float(now[0]), 1e-30))


def spent_error(orders: dict[str, RemovalOrder], take: dict[str, int]) -> float:
    """The summed squared relative error of the blocks taken (``{site: blocks}``), as the orders
    estimate it: what :func:`allocate` spends of ``n_sites * max_error^2``."""
    return float(sum(orders[n].rel_error(k) ** 2 for n, k in take.items() if k))


def allocate(orders: dict[str, RemovalOrder], flops: dict[str, float], widths: dict[str, int],
             max_error: float | None, keep_flops: float | None,
             layers: list[LayerFlops] | None = None) -> dict[str, int]:
    """Blocks of each site's order to take under one global budget (see the module docstring).

    Returns ``{site: number of blocks}``. The taken blocks spend at most ``n_sites * max_error^2``
    of summed squared relative error and remove at most ``(1 - keep_flops)`` of the summed
    neuron FLOPs (with ``layers``: of the layers' true FLOPs, which shrink with both widths of a
    layer); in the merged order, the first block not taken would break one of them. ``flops``
    (per neuron) ranks the blocks by error per saved FLOP.
    """
    names = [n for n in orders if orders[n].blocks]
    take = {n: 0 for n in orders}
    if not names:
        return take
    err_budget = None if max_error is None else len(orders) * float(max_error) ** 2
    first_order = sum(widths[n] * flops[n] for n in orders)
    flop_budget = None if keep_flops is None else (1.0 - float(keep_flops)) * first_order
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
    if keep_flops is not None and layers is not None:
        size = torch.cat([torch.tensor([len(b) for b in orders[n].blocks], dtype=torch.long) for n in names])[order]
        site = site_of[order]
        kept = {n: torch.full((len(order),), widths[n]) for n in orders}
        kept.update({n: widths[n] - torch.cumsum(torch.where(site == i, size, 0), 0) for i, n in enumerate(names)})
        full = float(total_flops(layers, widths, {n: torch.tensor([widths[n]]) for n in orders})[0])
        ok &= total_flops(layers, widths, kept) >= float(keep_flops) * full * (1 - 1e-12)
    elif flop_budget is not None:
        ok &= cf <= flop_budget * (1 + 1e-12)
    n_take = int(ok.long().cumprod(0).sum())  # the longest prefix within both budgets
    counts = torch.bincount(site_of[order[:n_take]], minlength=len(names))
    for i, n in enumerate(names):
        take[n] = int(counts[i])
    return take
