"""Removal orders that scale: LSH buckets bound the structured OBS order.

The exact order (:func:`hashexp.merge.calibration.obs_removal_order`) inverts the site's whole
calibration Gram G = X^T X and updates it after every block: width^3 to start and width^2 per
removed neuron, so a 4k-wide layer costs about 8x a 2k-wide one. Yet a neuron's removal is
absorbed almost entirely by the few survivors that compute nearly the same thing. So:

- :func:`balanced_buckets` hashes each neuron's centred calibration activations with random
  hyperplanes, each split at its bucket's median instead of at zero (SimHash with balanced
  buckets: a random-projection tree). Neurons that fire together share a bucket, and no bucket
  holds more than ``bucket_size`` neurons;
- :func:`restricted_removal_order` runs the structured OBS order on the block-diagonal part of
  G that the buckets select: each bucket's Gram (bucket_size^2), its inverse and its rank-b
  updates, batched over all buckets at once. Every bucket removes its ``per_step`` cheapest
  neurons per step with one factorization update per block. The per-bucket sequences are then
  merged into one global order by their (running-max) cost per neuron, so each bucket's own
  order is kept. Cost: rows * width * bucket_size for the Grams plus width * bucket_size^2 for
  the order, linear in width for a fixed bucket size.

The block-diagonal costs are upper bounds of the exact ones (a removed neuron is compensated
only by its bucket's survivors, the final least-squares refit uses all of them), so an error
budget stops no later than the exact order's would. ``candidates=exact`` with ``order=exact``
stays the reference.
"""

from __future__ import annotations

import math

import torch

from hashexp.errors import ConfigError
from hashexp.merge.calibration import RemovalOrder, SiteCapture

#: calibration rows used to hash a neuron's activations into a bucket
MAX_SIGNATURE_ROWS = 2048
ORDERS = ("exact", "restricted", "auto")
#: width from which ``order=auto`` restricts the order to buckets (measured: benchmarks/bench_merge_cost.md)
AUTO_WIDTH = 2048


def balanced_buckets(v: torch.Tensor, bucket_size: int, seed: int = 0) -> torch.Tensor:
    """Bucket label of each row of ``v`` (n, d): random hyperplanes, each split at the bucket's median.

    Level l splits every current bucket in two halves by the projection on one shared random
    direction, so after ceil(log2(n / bucket_size)) levels every bucket holds at most
    ``bucket_size`` rows (sizes differ by at most one within a level). Vectorized: one sort per
    level, no loop over buckets. Deterministic for a given ``seed``.
    """
    n = v.shape[0]
    if bucket_size < 2:
        raise ConfigError(f"hashing.bucket_size must be >= 2, got {bucket_size}")
    levels = max(0, math.ceil(math.log2(max(n, 1) / bucket_size)))
    node = torch.zeros(n, dtype=torch.long)
    if levels == 0:
        return node
    gen = torch.Generator().manual_seed(int(seed))
    r = torch.randn(v.shape[1], levels, generator=gen, dtype=v.dtype)
    proj = v @ r  # (n, levels): every level's projection in one matmul
    pos = torch.arange(n)
    for lvl in range(levels):
        order = torch.argsort(proj[:, lvl], stable=True)
        order = order[torch.argsort(node[order], stable=True)]  # by node, then by projection
        nodes_sorted = node[order]
        count = torch.bincount(node, minlength=int(node.max()) + 1)
        start = torch.cumsum(count, 0) - count
        rank = pos - start[nodes_sorted]  # position of each row inside its node
        upper = (2 * rank >= count[nodes_sorted]).long()
        new = torch.empty_like(node)
        new[order] = 2 * nodes_sorted + upper
        node = new
    return torch.unique(node, return_inverse=True)[1]


def _signature(x: torch.Tensor) -> torch.Tensor:
    """(width, rows) unit vectors: each neuron's centred activations on a fixed subset of rows."""
    if x.shape[0] > MAX_SIGNATURE_ROWS:
        x = x[torch.linspace(0, x.shape[0] - 1, MAX_SIGNATURE_ROWS).long()]
    v = (x - x.mean(0)).T.contiguous().float()
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _padded_members(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buckets, size) member indices of each bucket (padding -1) and the validity mask."""
    n = len(labels)
    nb = int(labels.max()) + 1
    count = torch.bincount(labels, minlength=nb)
    size = int(count.max())
    order = torch.argsort(labels, stable=True)
    start = torch.cumsum(count, 0) - count
    slot = torch.arange(n) - start[labels[order]]
    members = torch.full((nb, size), -1, dtype=torch.long)
    members[labels[order], slot] = order
    return members, members >= 0


def _bucket_factors(x: torch.Tensor, w: torch.Tensor, members: torch.Tensor, valid: torch.Tensor,
                    ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inverse ridged Grams (nb, s, s) and weights (nb, out, s) of one consumer, and its energy.

    The ridge is the exact order's (per neuron, relative to the mean energy of the whole width),
    so each bucket's diagonal block equals the same block of the full ridged Gram. Padding slots
    get an identity Gram and zero weights: inert.
    """
    xc = x.double() - x.double().mean(0)
    d = (xc * xc).sum(0)
    lam = float(ridge) * d + 1e-12 * float(d.mean().clamp_min(1e-30))
    idx = members.clamp_min(0)
    xb = xc[:, idx] * valid  # (rows, nb, s)
    g = torch.einsum("rbi,rbj->bij", xb, xb)
    diag = torch.where(valid, lam[idx], torch.ones_like(lam[idx]))
    g = g + torch.diag_embed(diag)
    h = torch.cholesky_inverse(torch.linalg.cholesky(g))
    wd = w.double()
    wb = wd[:, idx].permute(1, 0, 2) * valid[:, None, :]  # (nb, out, s)
    energy = float(((xc @ wd.T) ** 2).sum())
    return h.float(), wb.float(), energy


def restricted_removal_order(cap: SiteCapture, eligible: torch.Tensor, floor: int, ridge: float = 1e-3,
                             max_error: float | None = None, block_frac: float = 0.01,
                             bucket_size: int = 128, per_step: int = 1, seed: int = 0) -> RemovalOrder:
    """The structured OBS order inside LSH buckets; same contract as ``obs_removal_order``.

    Buckets come from :func:`balanced_buckets` on the first consumer's input activations. Each
    step removes, in every bucket at once, its ``per_step`` cheapest eligible neurons with one
    block update of that bucket's inverse Gram and compensated weights. The per-bucket
    sequences are merged by running-max cost per neuron into one order, cut at ``floor`` and at
    the first block past ``max_error``, and returned in blocks of ``block_frac`` of the width.
    """
    if per_step < 1:
        raise ConfigError(f"hashing.per_step must be >= 1, got {per_step}")
    width = int(cap.inputs[0].shape[1])
    labels = balanced_buckets(_signature(cap.inputs[0]), bucket_size, seed)
    members, valid = _padded_members(labels)
    nb, s = members.shape
    factors = [_bucket_factors(x, w, members, valid, ridge) for x, w in zip(cap.inputs, cap.weights)]
    energy = sum(f[2] for f in factors)
    hs = [f[0] for f in factors]
    ws = [f[1] for f in factors]
    alive = valid & eligible.bool()[members.clamp_min(0)]
    steps_n, steps_cost, steps_who = [], [], []
    rows = torch.arange(nb)[:, None]
    for _ in range(-(-s // per_step)):
        if not bool(alive.any()):
            break
        score = torch.zeros(nb, s, dtype=torch.float64)
        for h, w in zip(hs, ws):
            score += ((w * w).sum(1) / h.diagonal(dim1=1, dim2=2).clamp_min(1e-30)).double()
        score[~alive] = float("inf")
        m = min(per_step, s)
        pick = torch.topk(score, m, dim=1, largest=False).indices  # (nb, m)
        ok = torch.isfinite(score.gather(1, pick))  # a bucket with fewer than m candidates left
        step_cost = torch.zeros(nb, dtype=torch.float64)
        eye = torch.diag_embed((~ok).float())
        for i, (h, w) in enumerate(zip(hs, ws)):
            hb = h[rows, pick] * ok[..., None]  # (nb, m, s): rows of the removed, zero where invalid
            pair = ok[:, :, None] & ok[:, None, :]
            hbb = torch.gather(hb, 2, pick[:, None, :].expand(nb, m, m)) * pair + eye
            hbb_inv = torch.linalg.inv(hbb.double())
            wb = torch.gather(w, 2, pick[:, None, :].expand(nb, w.shape[1], m)) * ok[:, None, :]
            wbd = wb.double()
            step_cost += ((wbd @ hbb_inv) * wbd).sum((1, 2))
            c = hbb_inv.float() @ hb  # (nb, m, s)
            hs[i] = h - hb.transpose(1, 2) @ c
            ws[i] = w - wb @ c
        done = torch.zeros(nb, s, dtype=torch.bool)
        done[rows.expand_as(pick)[ok], pick[ok]] = True
        alive &= ~done
        steps_n.append(ok.sum(1))
        steps_cost.append(step_cost.clamp_min(0.0))
        steps_who.append(torch.where(ok, members.gather(1, pick), torch.full_like(pick, -1)))
    return _merge_sequences(steps_n, steps_cost, steps_who, width, floor, energy, max_error, block_frac)


def _merge_sequences(steps_n, steps_cost, steps_who, width: int, floor: int, energy: float,
                     max_error: float | None, block_frac: float) -> RemovalOrder:
    """One global order from the buckets' step sequences, in blocks of ``block_frac`` of the width."""
    room = width - int(floor)
    if not steps_n or room <= 0:
        return RemovalOrder(blocks=[], cost=[], energy=energy)
    n = torch.stack(steps_n, 1)  # (nb, T)
    cost = torch.stack(steps_cost, 1)
    who = torch.stack(steps_who, 1)  # (nb, T, m)
    rate = torch.where(n > 0, cost / n.clamp_min(1), torch.full_like(cost, float("inf")))
    env = torch.cummax(rate, 1).values  # each bucket's steps stay in their own order
    t = torch.arange(n.shape[1]).expand_as(n)
    key = env.flatten()
    first = torch.argsort(t.flatten(), stable=True)
    order = first[torch.argsort(key[first], stable=True)]  # by envelope, ties by step
    order = order[torch.isfinite(key[order])]
    seq = who.reshape(-1, who.shape[2])[order]
    per = n.flatten()[order]
    cum = torch.cumsum(cost.flatten()[order], 0)
    flat = seq[seq >= 0]  # neurons in order
    ends = torch.cumsum(per, 0)  # neurons removed after each step
    flat = flat[:room]
    if len(flat) == 0:
        return RemovalOrder(blocks=[], cost=[], energy=energy)
    chunk = max(1, int(block_frac * width))
    cuts = list(range(chunk, len(flat), chunk)) + [len(flat)]
    # cost after `c` neurons: the cumulative cost of the step that contains the c-th (an upper
    # bound when the cut splits a step: a subset of a block never costs more)
    at = torch.searchsorted(ends, torch.tensor(cuts), right=False).clamp_max(len(cum) - 1)
    costs = cum[at].tolist()
    budget = None if max_error is None else float(max_error) ** 2 * energy
    blocks, out_cost, prev = [], [], 0
    for cut, c in zip(cuts, costs):
        blocks.append(flat[prev:cut].clone())
        out_cost.append(float(c))
        prev = cut
        if budget is not None and c > budget:
            break
    return RemovalOrder(blocks=blocks, cost=out_cost, energy=energy)


def check_order_knobs(order: str, order_width: int | None, bucket_size: int, per_step: int) -> None:
    """One clear error for a bad ``hashing.order`` / ``order_width`` / ``bucket_size`` / ``per_step``."""
    if order not in ORDERS:
        raise ConfigError(f"hashing.order={order!r}; choose {', '.join(ORDERS)}")
    if order_width is not None and int(order_width) < 1:
        raise ConfigError(f"hashing.order_width must be >= 1 or null, got {order_width}")
    if int(bucket_size) < 2:
        raise ConfigError(f"hashing.bucket_size must be >= 2, got {bucket_size}")
    if int(per_step) < 1:
        raise ConfigError(f"hashing.per_step must be >= 1, got {per_step}")


def removal_order(cap: SiteCapture, eligible: torch.Tensor, floor: int, ridge: float, max_error: float | None,
                  block_frac: float, order: str = "exact", order_width: int | None = None,
                  bucket_size: int = 128, per_step: int = 1, seed: int = 0) -> RemovalOrder:
    """The site's removal order: ``exact`` (whole-width OBS), ``restricted`` (inside LSH buckets) or
    ``auto`` (restricted from ``order_width`` neurons on, exact below; None: ``AUTO_WIDTH``)."""
    from hashexp.merge.calibration import obs_removal_order

    width = int(cap.inputs[0].shape[1])
    if order == "auto":
        order = "restricted" if width >= (AUTO_WIDTH if order_width is None else int(order_width)) else "exact"
    if order == "restricted" and width > bucket_size:
        return restricted_removal_order(cap, eligible, floor, ridge, max_error, block_frac,
                                        bucket_size=bucket_size, per_step=per_step, seed=seed)
    return obs_removal_order(cap, eligible, floor, ridge, max_error, block_frac)
