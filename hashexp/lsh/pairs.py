"""Pair mining for the learnable hash: the pairs of neurons that should collide (the most similar
by cosine) and those that should not (random pairs below a cosine), without an (N, N) Gram where
the CPU allows, in bfloat16 where it has native bf16 dot products, re-ranked exactly.

:func:`top_cosine_pairs` multiplies only the upper triangle in bf16 row blocks, keeps the entries
above a cut estimated from sampled rows and re-ranks them by exact cosine (:func:`pair_cosines`),
rescanning at a lower cut when the k-th exact cosine does not clear the bf16 error: the result is
the exact top k. :func:`random_cosine_pairs` draws negatives and computes cosines only for them.
The Gram-based :func:`top_pairs` / :func:`random_pairs` / :func:`mine_pairs` are the references.
"""

from __future__ import annotations

import functools

import torch

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
