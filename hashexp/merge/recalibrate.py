"""Re-estimate BatchNorm statistics after a merge (REPAIR-style).

Merging folds each group's BN into one representative whose running mean and variance are
activation-weighted averages of the members'. That is exact for duplicates but only approximate
for near-duplicates, and downstream BNs then see slightly shifted inputs; REPAIR (Jordan et al.,
ICLR 2023) and Model Folding (ICLR 2025) show that re-estimating the statistics on a few training
batches recovers most of the lost accuracy at the cost of a few forward passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from hashexp.merge.sites import MergeSite, model_sites

_BN = nn.modules.batchnorm._BatchNorm


def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
                   momentum: float | None = None,
                   sites: Iterable[MergeSite | str] | None = None) -> int:
    """Reset and re-estimate BatchNorm running statistics from ``batches``; returns samples seen.

    Args:
        model: the network; its BNs (and their modes) are changed in place, then modes restored.
        batches: input tensors, or ``(x, y, ...)`` tuples whose first item is the input.
        momentum: ``None`` (default) gives the exact cumulative average over the batches given;
            a float uses an exponential moving average with that momentum instead.
        sites: only the norms of these sites' producers (MergeSite objects or site names of
            ``model_sites(model)``); all BNs of the model when ``None``.

    Only the selected BNs run in train mode; everything else stays in eval mode, so dropout or
    other BNs do not disturb the estimate. Runs under ``torch.no_grad``: weights never change.
    """
    norms = _select_norms(model, sites)
    it = iter(batches)
    first = next(it, None)
    if first is None:
        # checked before resetting: an empty iterable must not leave the stats wiped out
        raise ValueError("recalibrate_bn: no batches given; pass a few training batches")
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum) for bn in norms]
    device = next(model.parameters()).device
    seen = 0
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = momentum
            bn.train()
        with torch.no_grad():
            for batch in _chain(first, it):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device, non_blocking=True))
                seen += int(x.shape[0])
    finally:
        for bn, mom in saved:
            bn.momentum = mom
        for m, training in modes:
            m.training = training
    return seen


def _chain(first, rest):
    yield first
    yield from rest


def _select_norms(model: nn.Module, sites) -> list[_BN]:
    if sites is None:
        cands = [m for m in model.modules() if isinstance(m, _BN)]
    else:
        by_name = None
        cands = []
        for s in sites:
            if isinstance(s, str):
                if by_name is None:
                    by_name = {x.name: x for x in model_sites(model)}
                if s not in by_name:
                    raise ValueError(f"recalibrate_bn: unknown site {s!r}; the model has {list(by_name)}")
                s = by_name[s]
            cands += [p.norm for p in s.producers if p.norm is not None]
    out, ids = [], set()
    for bn in cands:
        if bn.track_running_stats and id(bn) not in ids:
            ids.add(id(bn))
            out.append(bn)
    return out
