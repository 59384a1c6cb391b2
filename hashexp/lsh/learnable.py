"""Learnable SimHash: hyperplanes trained so that mergeable neurons collide.

Random hyperplanes (Charikar 2002) treat every direction alike; a layer's neurons are not
spread alike. MONGOOSE (Chen et al., ICLR 2021) learns the LSH projections from the data the
tables serve: pairs that should meet are pulled into a shared bucket, random pairs pushed
apart. Here the sign bits are relaxed with tanh so the bucket-collision probability is
differentiable:

    t_ik = tanh(a * sqrt(d) * <u_i, r_k> / |r_k|)          soft bit k of unit vector u_i
    p_l(i, j) = prod_{k in table l} (1 + t_ik t_jk) / 2      soft collision in table l
    P(i, j) = 1 - prod_l (1 - p_l(i, j))                     soft collision in >= 1 table

and trained with a binary cross-entropy: -log P for positives, -log(1 - P) for negatives.
Column norms are divided out, so only directions are learned; at hashing time the plain sign
of x @ R is taken exactly as in SimHash (the relaxation is for training only).

``collision_pr`` measures a hasher against the exact answer: the precision and recall of its
candidate pairs with respect to the pairs whose cosine reaches a threshold.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from hashexp.lsh.simhash import SimHash


class LearnableSimHash(SimHash):
    """SimHash whose projections (dim, K*L) are an ``nn.Parameter`` trained by :meth:`fit`.

    Args:
        dim: input dimension.
        bits: K sign bits per table.
        tables: L tables.
        seed: seeds the initial (random Gaussian, i.e. plain SimHash) projections.
    """

    def __init__(self, dim: int, bits: int, tables: int, seed: int = 0) -> None:
        super().__init__(dim, bits, tables, seed=seed)
        init = self.projections.detach().clone().float()
        del self._buffers["projections"]  # the parent's buffer becomes a trainable parameter
        self.projections = nn.Parameter(init)

    # ---------------------------------------------------------------- relaxation
    def soft_bits(self, u: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
        """(N, L, K) soft sign bits in (-1, 1) of unit rows ``u``."""
        r = self.projections / self.projections.norm(dim=0, keepdim=True).clamp_min(1e-12)
        z = (u @ r) * math.sqrt(u.shape[1])
        return torch.tanh(temperature * z).view(u.shape[0], self.tables, self.bits)

    @staticmethod
    def log_table_collision(t: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """(P, L) log soft collision probability per table of each pair (i, j) of ``pairs``."""
        q = (1.0 + t[pairs[:, 0]] * t[pairs[:, 1]]) * 0.5
        return torch.log(q.clamp_min(1e-12)).sum(-1)

    def loss(self, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float = 2.0,
             pos_weight: float = 1.0, neg_weight: float = 1.0) -> torch.Tensor:
        """Binary cross-entropy of soft any-table collision: positives meet, negatives part."""
        t = self.soft_bits(u, temperature)
        total = u.new_zeros(())
        if len(pos):
            log_miss = torch.log1p(-self.log_table_collision(t, pos).exp().clamp_max(1 - 1e-6)).sum(-1)
            total = total + pos_weight * (-torch.log((-torch.expm1(log_miss)).clamp_min(1e-12))).mean()
        if len(neg):
            p = self.log_table_collision(t, neg).exp().clamp_max(1 - 1e-6)
            total = total + neg_weight * (-torch.log1p(-p).sum(-1)).mean()
        return total

    def fit(self, x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, updates: int = 40, lr: float = 0.02,
            temperature: float = 2.0, pos_weight: float = 1.0, neg_weight: float = 1.0) -> dict[str, Any]:
        """Train the projections with Adam on positive and negative pairs of rows of ``x``.

        Args:
            x: (N, dim) vectors (normalized here; SimHash ignores norms).
            pos, neg: (P, 2) index pairs that should / should not collide.
            updates: Adam steps; lr: its learning rate.
            temperature: slope ``a`` of the tanh relaxation (higher: closer to hard bits).
            pos_weight, neg_weight: weights of the two loss terms.

        Returns:
            ``{"loss_before", "loss_after", "updates", "time_s"}``.
        """
        t0 = time.perf_counter()
        u = x.detach().float()
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        pos = torch.as_tensor(pos, dtype=torch.long).reshape(-1, 2)
        neg = torch.as_tensor(neg, dtype=torch.long).reshape(-1, 2)
        # only rows that occur in a pair take part: one small matmul per update
        rows, inv = torch.unique(torch.cat([pos, neg]).flatten(), return_inverse=True)
        inv = inv.view(-1, 2)
        ur, pr, nr = u[rows], inv[: len(pos)], inv[len(pos):]
        opt = torch.optim.Adam([self.projections], lr=lr)
        kw = dict(temperature=temperature, pos_weight=pos_weight, neg_weight=neg_weight)
        with torch.enable_grad():
            first = last = None
            for _ in range(int(updates)):
                loss = self.loss(ur, pr, nr, **kw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                first = float(loss.detach()) if first is None else first
            with torch.no_grad():
                last = float(self.loss(ur, pr, nr, **kw))
        self.projections.grad = None
        return {"loss_before": first if first is not None else last, "loss_after": last,
                "updates": int(updates), "time_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------- pair mining
def top_pairs(sim: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """(P, 2) pairs i < j with ``sim >= threshold``: the ``k`` most similar ones (P <= k)."""
    n = sim.shape[0]
    keep = (sim >= threshold) & torch.ones(n, n, dtype=torch.bool).triu_(1)
    idx = keep.flatten().nonzero().squeeze(1)
    if len(idx) > k:
        idx = idx[torch.topk(sim.flatten()[idx], int(k)).indices]
    return torch.stack([idx // n, idx % n], dim=1)


def random_pairs(sim: torch.Tensor, below: float, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Up to ``k`` random pairs i < j with ``sim < below`` (drawn, then filtered: no n^2 list)."""
    n = sim.shape[0]
    m = 4 * int(k) + 64
    i = torch.randint(0, max(n, 1), (m,), generator=generator)
    j = torch.randint(0, max(n, 1), (m,), generator=generator)
    ok = i != j
    i, j = i[ok], j[ok]
    ok = sim[i, j] < below
    return torch.stack([torch.minimum(i, j), torch.maximum(i, j)], 1)[ok][: int(k)]


def mine_pairs(sim: torch.Tensor, pos_threshold: float, neg_threshold: float, max_pos: int, max_neg: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives: the most similar pairs with ``sim >= pos_threshold`` (at most ``max_pos``);
    negatives: random pairs with ``sim < neg_threshold`` (at most ``max_neg``)."""
    return top_pairs(sim, pos_threshold, max_pos), random_pairs(sim, neg_threshold, max_neg, generator)


def activation_correlation(batches: torch.Tensor) -> torch.Tensor | None:
    """(N, N) Pearson correlation of per-batch activation sums (B, N) across batches, or None
    when there are fewer than 3 batches to correlate."""
    if batches is None or batches.shape[0] < 3:
        return None
    a = batches.double() - batches.double().mean(0, keepdim=True)
    a = a / a.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return (a.T @ a).float()


# ------------------------------------------------------------------------------- evaluation
def collision_pr(vectors: torch.Tensor, hasher, threshold: float, min_tables: int = 1) -> tuple[float, float]:
    """Precision and recall of a hasher's candidate pairs against the exact mergeable pairs.

    A pair is a candidate when it shares a bucket in at least ``min_tables`` of the hasher's
    tables (clsh), and mergeable when its exact cosine is at least ``threshold``.

    Returns:
        (precision, recall); precision is 0.0 when nothing collides, recall 1.0 when no pair
        is mergeable.
    """
    import clsh

    x = torch.as_tensor(vectors).detach().float().cpu()
    codes = np.ascontiguousarray(hasher.fingerprint(x), dtype=np.uint64)
    t = clsh.LSHTables(codes.shape[1])
    t.build(codes)
    pairs = torch.as_tensor(np.asarray(t.candidate_pairs(int(min_tables))), dtype=torch.long).reshape(-1, 2)
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = u @ u.T
    n_true = int(torch.triu(cos >= threshold, diagonal=1).sum())
    tp = int((cos[pairs[:, 0], pairs[:, 1]] >= threshold).sum()) if len(pairs) else 0
    precision = tp / len(pairs) if len(pairs) else 0.0
    recall = tp / n_true if n_true else 1.0
    return precision, recall
