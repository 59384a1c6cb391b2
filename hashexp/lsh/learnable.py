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

import functools
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


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (where bf16 matmuls beat float32)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _matmul_dtype(choice: str, work: int, device: torch.device) -> torch.dtype:
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    fast = device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16())
    return torch.bfloat16 if fast and work >= 1 << 24 else torch.float32


def gram(u: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """(N, N) float32 ``u @ u.T``; in bfloat16 (float32 accumulation; for unit rows |error| <
    0.005, on average ~1e-4) where that is faster (see :func:`LearnableSimHash.fit`'s ``matmul_dtype``), unless
    ``exact``. For mining training pairs, where a few pairs near a threshold may swap."""
    dt = torch.float32 if exact else _matmul_dtype("auto", u.shape[0] * u.shape[0] * u.shape[1], u.device)
    if dt == torch.float32:
        return u.float() @ u.float().T
    b = u.to(dt)
    return (b @ b.T).float()


# ------------------------------------------------------------------------------- pair mining
def top_pairs(sim: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """(P, 2) pairs i < j with ``sim >= threshold``: the ``k`` most similar ones (P <= k)."""
    n = sim.shape[0]
    cut = float(threshold)
    total = n * (n - 1) // 2
    if n >= 512 and 0 < k <= total // 16:
        # Raise the cut to about the 2k-th largest value, estimated from a sample of pairs, so
        # that the list below holds a few thousand entries instead of millions; if too few
        # pass, fall back to the threshold (same result either way, only cheaper).
        g = torch.Generator().manual_seed(n)
        i = torch.randint(0, n, (1 << 15,), generator=g)
        j = torch.randint(0, n, (1 << 15,), generator=g)
        sample = sim[i[i != j], j[i != j]].float()
        est = float(torch.quantile(sample, 1.0 - 2.0 * k / total))
        if est > cut:
            idx = torch.triu(sim >= est, diagonal=1).flatten().nonzero().squeeze(1)
            if len(idx) >= k:
                return _top_of(sim, idx, k, n)
    keep = torch.triu(sim >= cut, diagonal=1)
    idx = keep.flatten().nonzero().squeeze(1)
    return _top_of(sim, idx, k, n)


def _top_of(sim: torch.Tensor, idx: torch.Tensor, k: int, n: int) -> torch.Tensor:
    if len(idx) > k:
        idx = idx[torch.topk(sim.flatten()[idx], int(k)).indices]
    return torch.stack([idx // n, idx % n], dim=1)


def rescore_pairs(u: torch.Tensor, pairs: torch.Tensor, threshold: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` pairs of ``pairs`` with the highest exact cosine of unit rows ``u`` that reach
    ``threshold``, and those cosines (most similar first): ranks candidates that an approximate
    (bf16, :func:`gram`) similarity proposed, e.g. its top 2k above ``threshold - 0.01``."""
    if len(pairs) == 0:
        return pairs.reshape(0, 2), torch.zeros(0)
    exact = pair_cosines(u, pairs)
    keep = exact >= threshold
    pairs, exact = pairs[keep], exact[keep]
    order = torch.argsort(-exact, stable=True)[: int(k)]
    return pairs[order], exact[order]


def pair_cosines(u: torch.Tensor, pairs: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(P,) float32 ``<u_i, u_j>`` of each pair, in chunks of ``chunk`` pairs: the two gathered
    (chunk, d) blocks stay in cache (on the 2048 x 2049 layer, 4096 pairs: 17 ms against 93 ms
    for one gather of all pairs, benchmarks/bench_learnable.md)."""
    out = torch.empty(len(pairs), dtype=torch.float32, device=u.device)
    for s in range(0, len(pairs), chunk):
        c = pairs[s:s + chunk]
        out[s:s + chunk] = (u[c[:, 0]].float() * u[c[:, 1]].float()).sum(1)
    return out


def top_cosine_pairs(u: torch.Tensor, threshold: float, k: int, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` pairs i < j of unit rows ``u`` with the highest cosine that reach ``threshold``,
    and their exact cosines (most similar first), without the (N, N) Gram.

    Row blocks are multiplied only against themselves and the rows after them (the upper
    triangle: 56% of the Gram's work at N = 2048 in blocks of 256), in :func:`gram`'s dtype
    (bf16 where faster, |error| < 0.005 on unit rows). Entries above a cut are kept: the cut is
    the estimated 2k-th largest cosine (64 random rows against all) less 0.01, or the
    threshold. The short list is re-ranked by exact cosine; the result is the exact top k
    whenever its k-th cosine clears the cut by 0.01 (more than the bf16 error), else the scan is
    repeated at ``threshold - 0.01``.
    """
    n, d = u.shape
    total = n * (n - 1) // 2
    dt = _matmul_dtype("auto", n * n * d // 2, u.device)
    ub = u.to(dt)
    floor = float(threshold) - (0.01 if dt != torch.float32 else 0.0)  # a scan at floor misses nothing
    cut = floor
    if n >= 512 and 0 < k <= total // 16:  # 64 random rows against all: ~128k sampled pairs, one small matmul
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:64].to(u.device)
        s = (ub[rows] @ ub.T).float()
        s[torch.arange(len(rows), device=u.device), rows] = -2.0  # not the pairs (i, i)
        flat = s.flatten()
        est = float(torch.kthvalue(flat, max(1, int(len(flat) * (1.0 - 2.0 * k / total)))).values)
        cut = max(cut, est - 0.01)
    while True:
        cand = _upper_scan(ub, cut, block)
        cos = pair_cosines(u, cand)
        ok = cos >= threshold
        cand, cos = cand[ok], cos[ok]
        order = torch.argsort(-cos, stable=True)[: int(k)]
        cand, cos = cand[order], cos[order]
        if cut <= floor or (len(cos) == k and float(cos[-1]) >= cut + 0.01):
            return cand, cos
        cut = floor


def _upper_scan(ub: torch.Tensor, cut: float, block: int) -> torch.Tensor:
    """(P, 2) pairs i < j with ``ub_i . ub_j >= cut``, one row block against the rows from it on."""
    n = ub.shape[0]
    found = []
    for a in range(0, n, block):
        s = ub[a:a + block] @ ub[a:].T
        r, c = (s >= cut).nonzero(as_tuple=True)
        keep = c > r
        found.append(torch.stack([r[keep] + a, c[keep] + a], 1))
    return torch.cat(found) if found else torch.zeros(0, 2, dtype=torch.long)


def random_cosine_pairs(u: torch.Tensor, below: float, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`random_pairs` on the exact cosines of unit rows ``u``, computed for the drawn pairs
    only (no Gram), in slices of k + 64 until k pass: the same pairs as
    ``random_pairs(u @ u.T, ...)`` with the same generator."""
    n, k = u.shape[0], int(k)
    m = 4 * k + 64
    i = torch.randint(0, max(n, 1), (m,), generator=generator)
    j = torch.randint(0, max(n, 1), (m,), generator=generator)
    ok = i != j
    pairs = torch.sort(torch.stack([i[ok], j[ok]], 1), dim=1).values
    kept, found = [], 0
    for s in range(0, len(pairs), k + 64):
        part = pairs[s:s + k + 64]
        part = part[pair_cosines(u, part) < below]
        kept.append(part)
        found += len(part)
        if found >= k:
            break
    return torch.cat(kept)[:k] if kept else pairs[:0]


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
