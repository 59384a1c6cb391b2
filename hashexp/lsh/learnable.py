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

Cost. :meth:`fit` was profiled on the 784-2048-2048 preset's layers (benchmarks/bench_learnable.md):
per Adam update, two (rows x d x K*L) matmuls and ~20 passes over the (pairs x K*L) soft bits,
one transcendental (log) per bit. It now (1) computes the per-table collision as a product of
(1 + t_i t_j) / 2 over the table's K bits instead of exp(sum(log)), and writes the gradient out
by hand (no autograd graph; equal to autograd's, see the tests), (2) runs the two matmuls in
bfloat16 where the CPU has native bf16 dot products (avx512_bf16 / AMX) or on CUDA, (3) takes
log(1 - p) per table with ``log`` (torch's CPU ``log1p`` ran ~8x slower on these shapes), and (4)
stops once every positive pair collides under the hard bits (``stop_recall``, the compressor's
default; checked from the soft bits' signs, which each step computes anyway), at most 10 updates
at lr 0.2 on 2048 negatives instead of 40 at 0.02 on 4096: 2-8 steps reach recall 1.0 on the
benchmark's four cases, where a fixed 6 lose 0.001-0.0015 on planted clusters. The pair mining (:func:`top_cosine_pairs`) builds no (N, N) Gram: bf16 blocks of
the upper triangle, a short list above a sampled cut, re-ranked by exact cosine
(:func:`pair_cosines`, in cache-sized chunks). Mining + training: see benchmarks/bench_learnable.md
for the ratio against the first version, measured side by side.

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

from hashexp.lsh.pairs import (_matmul_dtype, activation_correlation, gram, mine_pairs, pair_cosines,  # noqa: F401
                                random_cosine_pairs, random_pairs, rescore_pairs, top_cosine_pairs, top_pairs)
from hashexp.lsh.simhash import SimHash

#: the pair mining lives in :mod:`hashexp.lsh.pairs`; its public names stay importable from here
__all__ = ["LearnableSimHash", "activation_correlation", "collision_pr", "gram", "mine_pairs", "pair_cosines",
           "random_cosine_pairs", "random_pairs", "rescore_pairs", "top_cosine_pairs", "top_pairs"]


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

    def fit(self, x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, updates: int = 10, lr: float = 0.2,
            temperature: float = 2.0, pos_weight: float = 1.0, neg_weight: float = 1.0,
            matmul_dtype: str = "auto", threads: int | None = 1, stop_recall: float | None = None) -> dict[str, Any]:
        """Train the projections with Adam on positive and negative pairs of rows of ``x``.

        Minimises :meth:`loss` with a hand-written gradient (see the module docstring).

        Args:
            x: (N, dim) vectors (normalized here; SimHash ignores norms).
            pos, neg: (P, 2) index pairs that should / should not collide.
            updates: Adam steps; lr: its learning rate.
            temperature: slope ``a`` of the tanh relaxation (higher: closer to hard bits).
            pos_weight, neg_weight: weights of the two loss terms.
            matmul_dtype: ``auto`` (bfloat16 for large products where the hardware has bf16 dot
                products, else float32), ``float32`` or ``bfloat16``: the dtype of the two
                matmuls per update; the soft bits, the loss and Adam stay float32.
            threads: torch intra-op threads while fitting (restored afterwards; None: leave
                them). One by default: a fit is many small ops, and with two threads on this
                project's busy 2-core machine the same fit ran 2.5-30x slower than with one.
            stop_recall: stop before an update once this fraction of the positives collide in
                at least one table under the hard sign bits (the soft bits' signs, computed
                anyway); ``updates`` is then the most. None: always ``updates`` steps.

        Returns:
            ``{"loss_before", "loss_after", "updates" (the steps taken), "hard_recall" (of the
            positives, before the last step taken, or at the stop), "time_s"}``.
        """
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if stop_recall is not None and not 0.0 < float(stop_recall) <= 1.0:
            raise ValueError(f"stop_recall must be in (0, 1] or None, got {stop_recall}")
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(int(threads))
        try:
            return self._fit(x, pos, neg, updates, lr, temperature, pos_weight, neg_weight, matmul_dtype, stop_recall)
        finally:
            torch.set_num_threads(before)

    def _fit(self, x, pos, neg, updates, lr, temperature, pos_weight, neg_weight, matmul_dtype,
             stop_recall=None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if matmul_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be auto, float32 or bfloat16, got {matmul_dtype!r}")
        pos = torch.as_tensor(pos, dtype=torch.long).reshape(-1, 2)
        neg = torch.as_tensor(neg, dtype=torch.long).reshape(-1, 2)
        # only rows that occur in a pair take part: one small matmul per update
        rows, inv = torch.unique(torch.cat([pos, neg]).flatten(), return_inverse=True)
        inv = inv.view(-1, 2).to(x.device)
        u = x.detach()[rows.to(x.device)].float()
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        pr, nr = inv[: len(pos)], inv[len(pos):]
        p = self.projections
        d, nb = p.shape
        dt = _matmul_dtype(matmul_dtype, u.shape[0] * d * nb, u.device)
        ul = u.to(device=p.device, dtype=dt)
        ulT = ul.T.contiguous()
        scale = float(temperature) * math.sqrt(u.shape[1])
        opt = torch.optim.Adam([p], lr=lr)

        stats: dict[str, float] = {}

        def evaluate(grad: bool) -> float:
            loss, g = self._loss_grad(ul, ulT, pr, nr, scale, float(pos_weight), float(neg_weight), grad, stats)
            p.grad = g
            return loss

        first, done, last = None, 0, None
        for _ in range(int(updates)):
            loss = evaluate(True)
            first = loss if first is None else first
            if stop_recall is not None and stats.get("hard_recall", 0.0) >= float(stop_recall):
                last = loss
                break
            opt.step()
            done += 1
        last = evaluate(False) if last is None else last
        p.grad = None
        return {"loss_before": first if first is not None else last, "loss_after": last, "updates": done,
                "hard_recall": stats.get("hard_recall", float("nan")), "time_s": time.perf_counter() - t0}

    def _loss_grad(self, ul: torch.Tensor, ulT: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float,
                   pos_weight: float, neg_weight: float, grad: bool,
                   stats: dict | None = None) -> tuple[float, torch.Tensor | None]:
        """:meth:`loss` of unit rows ``ul`` (matmul dtype; ``ulT`` its transpose) and its gradient
        w.r.t. the projections, written out: no autograd graph."""
        r = self.projections.detach()
        rn = r.norm(dim=0, keepdim=True).clamp_min(1e-12)
        rh = r / rn
        t = torch.tanh((ul @ rh.to(ul.dtype)).float().mul_(scale))
        g_t = torch.zeros_like(t) if grad else None
        total = _pairs_loss(t, torch.cat([pos, neg]), len(pos), self.bits, self.tables, pos_weight, neg_weight, g_t,
                            stats)
        if not grad:
            return total, None
        g_z = g_t.mul_(1.0 - t * t).mul_(scale)
        g_rh = (ulT @ g_z.to(ul.dtype)).float()
        # through the column normalisation rh = r / |r|
        return total, (g_rh - rh * (g_rh * rh).sum(0, keepdim=True)) / rn

    def loss_grad(self, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float = 2.0,
                  pos_weight: float = 1.0, neg_weight: float = 1.0) -> tuple[float, torch.Tensor]:
        """:meth:`loss` on unit rows ``u`` and its gradient w.r.t. ``projections`` (float32), as
        :meth:`fit` computes them."""
        u = u.detach().float()
        return self._loss_grad(u, u.T.contiguous(), torch.as_tensor(pos).reshape(-1, 2),
                               torch.as_tensor(neg).reshape(-1, 2), float(temperature) * math.sqrt(u.shape[1]),
                               float(pos_weight), float(neg_weight), True)


def _pairs_loss(t: torch.Tensor, pairs: torch.Tensor, n_pos: int, K: int, L: int, pos_weight: float,
                neg_weight: float, g_t: torch.Tensor | None, stats: dict | None = None) -> float:
    """:meth:`LearnableSimHash.loss` on soft bits ``t`` (rows, L*K) for ``pairs`` = positives
    (the first ``n_pos``) then negatives, in product form, in one pass over the pairs; adds its
    gradient w.r.t. ``t`` into ``g_t`` when given, and the positives' hard any-table collision
    rate (same sign in all K bits of a table) into ``stats["hard_recall"]``."""
    n, n_neg = len(pairs), len(pairs) - n_pos
    ti, tj = t[pairs[:, 0]], t[pairs[:, 1]]
    h = (ti * tj).add_(1.0).mul_(0.5).clamp_min_(1e-12)  # (1 + t_i t_j) / 2 per bit
    if stats is not None and n_pos:  # h > 1/2 <=> the two signs agree
        stats["hard_recall"] = float((h[:n_pos] > 0.5).view(n_pos, L, K).all(-1).any(-1).float().mean())
    q = h.view(n, L, K).prod(-1)  # soft collision per table
    pc = q.clamp_max(1 - 1e-6)
    log_part = torch.log(1.0 - pc)  # log(1 - p_l); torch's CPU log1p is ~8x slower than log here
    loss = 0.0
    if n_pos:
        log_miss = log_part[:n_pos].sum(-1)
        hit = (-torch.expm1(log_miss)).clamp_min(1e-12)
        loss += float(-torch.log(hit).sum()) * pos_weight / n_pos
    if n_neg:
        loss += float(-log_part[n_pos:].sum()) * neg_weight / n_neg
    if g_t is None:
        return loss
    g_q = (1.0 - pc).reciprocal_()  # d(-log(1 - p_l))/d p_l, the negatives' term
    if n_neg:
        g_q[n_pos:] *= neg_weight / n_neg
    if n_pos:  # d(-log hit)/d p_l = -(miss / hit) / (1 - p_l)
        c = -(torch.exp(log_miss) / hit) * (hit > 1e-12) * (pos_weight / n_pos)
        g_q[:n_pos] *= c[:, None]
    g_q.mul_(q).mul_(q < 1 - 1e-6)  # times d p_l / d log q_l = q_l; the clamps pass no gradient
    g_h = (g_q[:, :, None] / h.view(n, L, K)).view(n, -1)  # d q / d h_k = q / h_k
    g_h.mul_((h > 1e-12) * 0.5)  # d h / d(t_i t_j) = 1/2
    g_t.index_add_(0, pairs[:, 0], g_h * tj)
    g_t.index_add_(0, pairs[:, 1], g_h.mul_(ti))
    return loss


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
