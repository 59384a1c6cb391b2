"""One error (and FLOPs) budget across all sites: ``hashing.budget=global``.

With ``budget=site`` (the default) every site stops at the same relative error ``max_error``
and keeps at least ``target_ratio`` of its width. Users of pruning tools ask for global ratios
instead, and sites differ in what a neuron costs (error) and what it saves (FLOPs). With
``budget=global`` a rehash first orders every site's removals (hashexp/merge/order.py, on the
network before this rehash), then spends one budget across the sites, cheapest error per saved
FLOP first:

- error: the sum over sites of the squared relative error of the consumers' pre-activation
  stays within ``n_sites * max_error^2`` (what per-site budgets would allow in total); with
  ``global_weight=consumers`` (the default) a site's error counts once per consumer layer, in the ranking and
  in the budget (``n_consumer_layers * max_error^2``): a residual stream's error reaches every
  block that reads it, which one pooled relative error does not see;
- FLOPs: with ``target_ratio`` the layers the sites touch keep at least that share of their
  multiply-adds (a global ratio, counted exactly: a layer between two sites shrinks with both),
  not of each width; or, with ``flops_plan``, the multiply-adds another run (a per-site run of
  the same seed) had after the same rehash (:func:`planned_keep`): equal FLOPs rehash by rehash.

:func:`allocate` is the greedy: blocks of all sites are merged by (running-max) error per
FLOP, so each site's own order is kept, and taken while they fit; a block that would break either
budget ends its site, and the others go on (every site's next block would overspend).
:func:`layer_flops` measures the layers by hooks; :func:`neuron_flops` is what one neuron of each
site costs at the current widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.calibration import RemovalOrder
from hashexp.merge.sites import MergeSite

BUDGETS = ("site", "global")
#: what one unit of a site's squared relative error counts in a global budget: once per site, or
#: once per consumer layer (a residual stream read by k convs counts k times)
GLOBAL_WEIGHTS = ("none", "consumers")


def check_budget(budget: str) -> str:
    """``hashing.budget`` validated: ``site`` or ``global``."""
    if budget not in BUDGETS:
        raise ConfigError(f"hashing.budget={budget!r}; choose {', '.join(BUDGETS)}")
    return budget


def site_weights(sites: list[MergeSite], weight: str) -> dict[str, float] | None:
    """``hashing.global_weight``: None (every site's error counts once) or, for ``consumers``, each
    site's number of consumer layers."""
    if weight not in GLOBAL_WEIGHTS:
        raise ConfigError(f"hashing.global_weight={weight!r}; choose {', '.join(GLOBAL_WEIGHTS)}")
    return None if weight == "none" else {s.name: float(len(s.consumers)) for s in sites}


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


def spent_error(orders: dict[str, RemovalOrder], take: dict[str, int],
                weights: dict[str, float] | None = None) -> float:
    """The summed (weighted) squared relative error of the blocks taken (``{site: blocks}``), as the
    orders estimate it: what :func:`allocate` spends of its error budget."""
    w = weights or {}
    return float(sum(w.get(n, 1.0) * orders[n].rel_error(k) ** 2 for n, k in take.items() if k))


def allocate(orders: dict[str, RemovalOrder], flops: dict[str, float], widths: dict[str, int],
             max_error: float | None, keep_flops: float | None,
             layers: list[LayerFlops] | None = None, weights: dict[str, float] | None = None) -> dict[str, int]:
    """Blocks of each site's order to take under one global budget (see the module docstring).

    Returns ``{site: number of blocks}``. The taken blocks spend at most ``n_sites * max_error^2``
    of summed squared relative error and remove at most ``(1 - keep_flops)`` of the summed
    neuron FLOPs (with ``layers``: of the layers' true FLOPs, which shrink with both widths of a
    layer). Blocks go in the merged order while they fit; a block that would break a budget ends
    its own site (its later blocks may not go before it) and the other sites go on, so at the end
    every site's next block would break one of the budgets: the share removed is within the
    smallest such block of what was given, not within the largest (a residual stream's channel
    costs 2.5% of a ResNet-20's FLOPs). ``flops`` (per neuron) ranks the blocks by error per saved
    FLOP. ``weights`` (``{site: w}``, :func:`site_weights`) count a site's squared relative error w
    times, in the ranking and in the budget (``sum of w * max_error^2``); None: once each.
    """
    names = [n for n in orders if orders[n].blocks]
    take = {n: 0 for n in orders}
    if not names:
        return take
    w = {n: 1.0 for n in orders} if weights is None else {n: float(weights[n]) for n in orders}
    site, size, d_err, d_flop = _merged_blocks(orders, names, flops, w)
    err_budget = None if max_error is None else sum(w.values()) * float(max_error) ** 2
    flop_budget = None if keep_flops is None else (1.0 - float(keep_flops)) * sum(widths[n] * flops[n] for n in orders)
    full = None if keep_flops is None or layers is None else \
        float(total_flops(layers, widths, {n: torch.tensor([widths[n]]) for n in orders})[0])
    live = torch.ones(len(site), dtype=torch.bool)  # blocks still in the running, in the merged order
    while True:  # one round per site that a budget ends: at most len(names) + 1 rounds
        idx = live.nonzero().flatten()
        ok = torch.ones(len(idx), dtype=torch.bool)
        if err_budget is not None:
            ok &= torch.cumsum(d_err[idx], 0) <= err_budget * (1 + 1e-12)
        if full is not None:
            kept = {n: torch.full((len(idx),), widths[n]) for n in orders}
            kept.update({n: widths[n] - torch.cumsum(torch.where(site[idx] == i, size[idx], 0), 0)
                         for i, n in enumerate(names)})
            ok &= total_flops(layers, widths, kept) >= float(keep_flops) * full * (1 - 1e-12)
        elif flop_budget is not None:
            ok &= torch.cumsum(d_flop[idx], 0) <= flop_budget * (1 + 1e-12)
        n_ok = int(ok.long().cumprod(0).sum())  # the longest prefix within both budgets
        if n_ok == len(idx):
            break
        first = int(idx[n_ok])  # it would overspend: its site ends here, the others go on
        live[first:] &= site[first:] != site[first]
    counts = torch.bincount(site[live], minlength=len(names))
    for i, n in enumerate(names):
        take[n] = int(counts[i])
    return take


def _merged_blocks(orders: dict[str, RemovalOrder], names: list[str], flops: dict[str, float],
                   weights: dict[str, float]):
    """All sites' blocks merged by (running-max) weighted error per saved FLOP, each site's own order
    kept: (site index, neurons, weighted squared relative error added, FLOPs saved) per block, in
    that order."""
    site_of, keys, d_err, d_flop, size = [], [], [], [], []
    for i, n in enumerate(names):
        o = orders[n]
        rel = weights[n] * torch.tensor(o.cost, dtype=torch.float64) / max(o.energy, 1e-30)
        de = torch.diff(rel, prepend=torch.zeros(1, dtype=torch.float64)).clamp_min(0.0)
        sz = torch.tensor([len(b) for b in o.blocks], dtype=torch.long)
        df = sz.double() * flops[n]
        keys.append(torch.cummax(de / df.clamp_min(1e-30), 0).values)  # keeps the site's own order
        site_of.append(torch.full((len(de),), i))
        d_err.append(de)
        d_flop.append(df)
        size.append(sz)
    site_of, key = torch.cat(site_of), torch.cat(keys)
    step = torch.cat([torch.arange(len(k)) for k in keys])
    first = torch.argsort(step, stable=True)
    order = first[torch.argsort(key[first], stable=True)]
    return site_of[order], torch.cat(size)[order], torch.cat(d_err)[order], torch.cat(d_flop)[order]
