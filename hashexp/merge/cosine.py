"""The data-free cosine path: the first version's plan, kept as an ablation.

With ``hashing.compensation=weights`` (or ``none``) no calibration data decides: SimHash of each
neuron's [w; b] (or its MIPS transform) -> clsh candidate pairs -> exact cosine -> greedy
agglomeration, most similar first -> every member verified against its group's representative
(:func:`verify_groups`) -> activation-weighted merge with the s_i c_i / s_r consumer scaling
(``none``: the folded members' columns summed unscaled). Weight cosine is a cliff (docs/DESIGN.md,
"verification by function"): this path is the baseline the data-driven plan of
:mod:`hashexp.merge.hashed` is measured against.
"""

from __future__ import annotations

import numpy as np
import torch

from hashexp.errors import ConfigError
from hashexp.merge.sites import MergeSite
from hashexp.merge.surgery import MergePlan, merge_plan
from hashexp.utils.seeding import EVENT_MIX, derive_seed

_PAIR_CHUNK = 1 << 18
#: member-to-representative cosine of the data-free path when hashing.threshold is null
WEIGHTS_THRESHOLD = 0.7


def plan_by_cosine(comp, site: MergeSite, index: int, mass: torch.Tensor | None) -> MergePlan | None:
    """Group the site's neurons of compressor ``comp`` (a HashCompressor) in rounds of greedy pairwise merging, most similar first.

    Each round hashes the current group representatives, verifies the candidate pairs by
    exact cosine, merges a greedy matching of the best pairs (each group joins at most one
    other, so chains of merely-adjacent neurons never snowball into one group), then
    verifies every member against its new representative. Rounds repeat until the target
    width is met or nothing passes the threshold; each round at most halves the width.
    """
    import clsh

    width = site.width
    target = comp.target(site)
    floor = comp._min_width(site)
    if width <= floor or (target is not None and target >= width):
        return None
    goal = floor if target is None else max(target, floor)
    x = comp.hash_vectors(site).cpu()
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    a = mass.detach().float().cpu() if mass is not None else torch.ones(width)
    a = a.clamp_min(0) + a.abs().max().clamp_min(1.0) * 1e-6
    t = WEIGHTS_THRESHOLD if comp.threshold is None else comp.threshold
    # Two equally weighted members with cosine c sit at cosine sqrt((1 + c) / 2) from their
    # representative, so a pair can only pass verification if c >= 2 t^2 - 1.
    pair_floor = 2 * t * t - 1 if t > 0 else -1.0
    labels = torch.arange(width)
    stats = {"candidates": 0, "verified_pairs": 0, "rounds": 0}
    for rnd in range(comp.max_rounds):
        g = int(labels.max()) + 1
        if g <= goal:
            break
        rep = torch.zeros(g, u.shape[1]).index_add_(0, labels, a[:, None] * u)
        rep = rep / rep.norm(dim=1, keepdim=True).clamp_min(1e-12)
        size = torch.bincount(labels, minlength=g)
        pairs = comp.candidate_pairs(site, derive_seed(index, rnd, weights=(EVENT_MIX,)), rep)
        if len(pairs) > comp.max_pairs:
            raise ConfigError(f"site {site.name}: {len(pairs)} candidate pairs exceed hashing.max_pairs="
                              f"{comp.max_pairs}; raise hashing.bits or hashing.min_tables")
        cos = pair_cosines(rep, pairs)
        ok = cos >= pair_floor
        if comp.max_group_size:
            pt = torch.as_tensor(pairs, dtype=torch.long)
            ok &= ((size[pt[:, 0]] + size[pt[:, 1]]) <= comp.max_group_size).numpy() if len(pt) else ok
        stats["candidates"] += len(pairs)
        stats["verified_pairs"] += int(ok.sum())
        if not ok.any():
            break
        glab = clsh.union_groups(g, np.ascontiguousarray(pairs[ok], dtype=np.int64),
                                 np.ascontiguousarray(cos[ok], dtype=np.float64), 2, g - goal)
        new = verify_groups(u, torch.as_tensor(glab, dtype=torch.long)[labels], a, t)
        stats["rounds"] = rnd + 1
        if int(new.max()) + 1 >= g:
            break
        labels = new
    stats["groups"] = int(labels.max()) + 1
    comp.last_stats[site.name] = stats
    if stats["groups"] >= width:
        return None
    dev = site.device
    return merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev), comp.representative)


def pair_cosines(u: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """Exact cosine of each candidate pair (rows of ``u`` are unit vectors), memory bounded.

    Dense candidate sets (a sizeable share of all n^2 pairs, typical for a layer's few thousand
    neurons) are read off a blocked Gram matrix: one matmul per block instead of two gathers of
    P x d. Sparse ones gather the two rows of each pair in chunks.
    """
    n, p = u.shape[0], len(pairs)
    out = np.empty(p, dtype=np.float64)
    if p == 0:
        return out
    pt = torch.as_tensor(pairs, dtype=torch.long)
    if n * n <= 16 * p:
        rows = max(1, (1 << 24) // max(n, 1))
        starts = np.searchsorted(pairs[:, 0], np.arange(0, n + rows, rows))  # pairs sorted by i
        for b, i0 in enumerate(range(0, n, rows)):
            lo, hi = int(starts[b]), int(starts[b + 1])
            if lo == hi:
                continue
            gram = u[i0:i0 + rows] @ u.T
            out[lo:hi] = gram[pt[lo:hi, 0] - i0, pt[lo:hi, 1]].double().numpy()
        return out
    for i in range(0, p, _PAIR_CHUNK):
        c = pt[i:i + _PAIR_CHUNK]
        out[i:i + len(c)] = (u[c[:, 0]] * u[c[:, 1]]).sum(1).double().numpy()
    return out


def verify_groups(u: torch.Tensor, labels: torch.Tensor, mass: torch.Tensor, threshold: float,
                  max_rounds: int = 25) -> torch.Tensor:
    """Split off every member whose cosine to its group's representative is below ``threshold``.

    The representative direction is the activation-weighted mean of the members' unit
    vectors. Removing a member moves the representative, so this repeats until every member
    passes; after ``max_rounds`` the groups that still fail are dissolved. Vectorized: no loop
    over neurons or groups.
    """
    labels = labels.clone()
    n = len(labels)
    a = mass.float().clamp_min(0) + mass.float().abs().max().clamp_min(1.0) * 1e-6
    for _ in range(max_rounds + 1):
        labels = torch.unique(labels, return_inverse=True)[1]
        g = int(labels.max()) + 1 if n else 0
        rep = torch.zeros(g, u.shape[1], dtype=u.dtype).index_add_(0, labels, a[:, None].to(u.dtype) * u)
        rep = rep / rep.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = (u * rep[labels]).sum(1)
        size = torch.bincount(labels, minlength=g)
        bad = (cos < threshold - 1e-6) & (size[labels] > 1)
        if not bool(bad.any()):
            return labels
        if _ == max_rounds:
            bad_groups = torch.zeros(g, dtype=torch.bool)
            bad_groups[labels[bad]] = True
            bad = bad_groups[labels]
        # each failing member becomes its own group (fresh labels past the current ones)
        labels[bad] = g + torch.arange(int(bad.sum()))
    return torch.unique(labels, return_inverse=True)[1]
