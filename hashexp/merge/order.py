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


import torch

from hashexp.errors import ConfigError
from hashexp.merge.calibration import RemovalOrder, SiteCapture
from hashexp.merge.greedy import _merge_sequences, _ridge_of, blocked_removal_order, factors, greedy_steps
from hashexp.merge.solves import consumer_energy, offer_map, solve_dtype, spd_factor

#: calibration rows used to hash a neuron's activations into a bucket
MAX_SIGNATURE_ROWS = 2048
ORDERS = ("exact", "blocked", "restricted", "auto")
#: width from which ``order=auto`` restricts the order to buckets (measured: benchmarks/bench_merge_cost.md)
AUTO_WIDTH = 1024


def balanced_buckets(v: torch.Tensor, bucket_size: int, seed: int = 0, window: float = 0.2) -> torch.Tensor:
    """Bucket label of each row of ``v`` (n, d): random hyperplanes that split buckets near their median.

    Every bucket larger than ``bucket_size`` is split in two by the projection of its rows on a
    fresh random direction, at the widest gap between consecutive projections within
    ``window`` of its median (not at the median itself: near-duplicates project side by side,
    and a cut through them would separate the neurons that compensate each other best). Each
    split leaves both halves at least (0.5 - window) of the bucket, so there are O(log(n /
    bucket_size)) rounds. Vectorized: one sort per round, no loop over buckets. Deterministic for
    a given ``seed``.
    """
    n = v.shape[0]
    if bucket_size < 2:
        raise ConfigError(f"hashing.bucket_size must be >= 2, got {bucket_size}")
    node = torch.zeros(n, dtype=torch.long)
    if n <= bucket_size:
        return node
    gen = torch.Generator().manual_seed(int(seed))
    pos = torch.arange(n)
    while True:
        count = torch.bincount(node)
        big = count > bucket_size
        if not bool(big.any()):
            break
        proj = v @ torch.randn(v.shape[1], generator=gen, dtype=v.dtype)
        order = torch.argsort(proj, stable=True)
        order = order[torch.argsort(node[order], stable=True)]  # by node, then by projection
        ns = node[order]
        start = torch.cumsum(count, 0) - count
        rank = pos - start[ns]  # position of each row inside its node
        c = count[ns]
        p = proj[order]
        # gap before each row (to the previous row of the same node); only cut inside the window
        gap = torch.zeros(n, dtype=p.dtype)
        gap[1:] = p[1:] - p[:-1]
        lo = torch.floor((0.5 - window) * c).clamp_min(1)
        hi = torch.ceil((0.5 + window) * c).clamp_max(c - 1)
        ok = (rank >= lo) & (rank <= hi) & big[ns]
        gap = torch.where(ok, gap, torch.full_like(gap, -1.0))
        # cut of each node: the rank with the widest gap (ties: the one nearest the median)
        tie = (rank.double() - c.double() / 2).abs() / (n + 1.0)
        best = torch.full((len(count),), -2.0, dtype=torch.float64).scatter_reduce(
            0, ns, gap.double() - 1e-12 * tie * gap.abs().max().double(), reduce="amax")
        is_cut = ok & ((gap.double() - 1e-12 * tie * gap.abs().max().double()) == best[ns])
        cut = torch.full((len(count),), n, dtype=torch.long).scatter_reduce(0, ns, torch.where(is_cut, rank, n),
                                                                         reduce="amin")
        upper = (big[ns] & (rank >= cut[ns])).long()
        new = torch.empty_like(node)
        new[order] = 2 * ns + upper
        node = torch.unique(new, return_inverse=True)[1]
    return node


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


def _bucket_factors(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None, members: torch.Tensor,
                    valid: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inverse ridged Grams H (nb, s, s), weight Grams A = W_b^T W_b (nb, s, s) of one consumer, and
    its centred output energy |X_c W^T|^2 (:func:`~hashexp.merge.solves.consumer_energy`, from the
    captured outputs ``y`` where they pair with ``x``).

    The ridge is the exact order's (per neuron, relative to the mean energy of the whole width),
    so each bucket's diagonal block equals the same block of the full ridged Gram. Working on A
    instead of W makes every later step independent of the consumer's output count.
    """
    xc = x.float() - x.float().mean(0)
    lam = _ridge_of(xc, ridge)
    idx = members.clamp_min(0)
    wf = w.float()
    h, a = factors(xc[:, idx].permute(1, 0, 2), wf[:, idx].permute(1, 0, 2), valid, lam[idx])
    return h, a, consumer_energy(x, w, y)


def restricted_removal_order(cap: SiteCapture, eligible: torch.Tensor, floor: int, ridge: float = 1e-3,
                             max_error: float | None = None, block_frac: float = 0.01,
                             bucket_size: int = 128, per_step: int = 1, seed: int = 0) -> RemovalOrder:
    """The structured OBS order inside LSH buckets; same contract as ``obs_removal_order``.

    Buckets come from :func:`balanced_buckets` on the first consumer's input activations. Each
    step removes, in every bucket at once, its ``per_step`` cheapest eligible neurons with one
    block update of that bucket's inverse Gram H and weight Gram A (the compensated weights
    W <- W - W_B C with C = H_BB^-1 H_B. give A <- A - A_.B C - C^T A_B. + C^T A_BB C; a block
    costs tr(H_BB^-1 A_BB)). The per-bucket sequences are merged by running-max cost per neuron
    into one order, cut at ``floor`` and at the first block past ``max_error``, and returned in
    blocks of ``block_frac`` of the width.
    """
    if per_step < 1:
        raise ConfigError(f"hashing.per_step must be >= 1, got {per_step}")
    width = int(cap.inputs[0].shape[1])
    labels = balanced_buckets(_signature(cap.inputs[0]), bucket_size, seed)
    members, valid = _padded_members(labels)
    outs = list(cap.outputs) if len(cap.outputs) == len(cap.inputs) else [None] * len(cap.inputs)
    facs = [_bucket_factors(x, w, y, members, valid, ridge) for x, w, y in zip(cap.inputs, cap.weights, outs)]
    energy = sum(f[2] for f in facs)
    hs = [f[0] for f in facs]
    gs = [f[1] for f in facs]
    alive = valid & eligible.bool()[members.clamp_min(0)]
    steps_cost, steps_slot = greedy_steps(hs, gs, alive, per_step, room=max(width - int(floor), 0))
    steps_who = [torch.where(p >= 0, members.gather(1, p.clamp_min(0)), p) for p in steps_slot]
    return _merge_sequences(steps_cost, steps_who, width, floor, energy, max_error, block_frac)


def removal_cost(cap: SiteCapture, removed: torch.Tensor, ridge: float = 1e-3, dtype: torch.dtype | None = None,
                 offer: bool = False) -> float:
    """Exact structured-OBS cost of removing the neurons ``removed`` at once (summed over consumers).

    With survivors K, Z = X_S W_S^T (centred) and the exact order's ridge Lambda, the cost
    tr(W_S [H_SS]^-1 W_S^T) (H the inverse ridged Gram of the whole width) equals
    tr(W_S Lambda_S W_S^T) + tr(Z^T (I + X_K Lambda_K^-1 X_K^T)^-1 Z)
    (Schur complement, then the push-through identity). The kernel form costs rows^2 * |K|, the
    primal form (G_KK + Lambda_K) |K|^2 * rows: whichever is smaller, so for a fixed calibration set
    the cost is linear in width. It is the number an error budget is checked against. A consumer
    with more outputs than removed neurons goes through A_S = W_S^T W_S instead of Z.
    ``dtype``: the precision of the factorization (None: :func:`hashexp.merge.solves.solve_dtype`
    of the survivors; both forms' matrices have the ridged Gram's conditioning bound).

    ``offer``: also solve the survivors' least-squares map of the removed neurons from the same
    factorization, T_S = (G_KK + Lambda_K)^-1 G_KS (two triangular solves more), and offer it to the
    consumers' refit of this capture (:func:`hashexp.merge.solves.offer_map`), which then skips its
    own Gram and solve: the map a pruning refit with these survivors computes, to the ridge's
    1e-12 floor (taken over the whole width here, over the survivors there).
    """
    width = int(cap.inputs[0].shape[1])
    gone = torch.zeros(width, dtype=torch.bool)
    gone[removed] = True
    kept, out = (~gone).nonzero().flatten(), gone.nonzero().flatten()
    dt = solve_dtype(len(kept), ridge) if dtype is None else dtype
    total = 0.0
    for x, w in zip(cap.inputs, cap.weights):
        xc = x.double() - x.double().mean(0)
        d = (xc * xc).sum(0)
        lam = float(ridge) * d + 1e-12 * float(d.mean().clamp_min(1e-30))
        ws = w.index_select(1, out).double()
        total += float((ws ** 2 * lam[out]).sum())
        cost, t_s = _projected_cost(xc.index_select(1, out).to(dt), xc.index_select(1, kept).to(dt), ws.to(dt),
                                    lam[kept].to(dt), want_map=offer)
        total += cost
        if offer:
            offer_map(x, kept, ridge, t_s)
    return max(total, 0.0)


def _projected_cost(xs: torch.Tensor, xk: torch.Tensor, ws: torch.Tensor, lk: torch.Tensor,
                    want_map: bool = False) -> tuple[float, torch.Tensor | None]:
    """tr(Z^T (I + X_K Lambda_K^-1 X_K^T)^-1 Z), Z = X_S W_S^T: the data part of :func:`removal_cost`,
    and with ``want_map`` the map T_S = (X_K^T X_K + Lambda_K)^-1 X_K^T X_S (float64), else None.

    Kernel form (rows <= |K|): |L^-1 Z|^2 with L L^T = I + X_K Lambda_K^-1 X_K^T, and
    T_S = Lambda_K^-1 X_K^T L^-T L^-1 X_S. Primal form: |Z|^2 - |L^-1 X_K^T Z|^2 with
    L L^T = G_KK + Lambda_K, and T_S = L^-T L^-1 X_K^T X_S. With more outputs than removed
    neurons, |M Z|^2 = sum(A_S * (M X_S)^T (M X_S)), A_S = W_S^T W_S, costs less than Z itself.
    """
    wide = ws.shape[0] > ws.shape[1]
    a = ws.T @ ws if wide else None

    def quad(v: torch.Tensor) -> float:  # |v W_S^T|^2
        if a is not None:
            return float(((v.T @ v) * a.to(v.dtype)).double().sum())
        return float(((v @ ws.T.to(v.dtype)).double() ** 2).sum())

    if xk.shape[0] <= xk.shape[1]:  # fewer rows than survivors: kernel form
        xs_k = xk / lk.sqrt()
        kmat = xs_k @ xs_k.T
        kmat.diagonal().add_(1.0)
        chol = _factor(kmat)
        if not (wide or want_map):
            z = (xs @ ws.T).to(chol.dtype)
            return float((torch.linalg.solve_triangular(chol, z, upper=False).double() ** 2).sum()), None
        v = torch.linalg.solve_triangular(chol, xs.to(chol.dtype), upper=False)
        if not want_map:
            return quad(v), None
        u = torch.linalg.solve_triangular(chol.mT, v, upper=True)
        return quad(v), ((xk.to(chol.dtype).T @ u) / lk.to(chol.dtype)[:, None]).double()
    g = xk.T @ xk
    g.diagonal().add_(lk)
    chol = _factor(g)
    if not (wide or want_map):
        z = xs @ ws.T
        proj = torch.linalg.solve_triangular(chol, (xk.T @ z).to(chol.dtype), upper=False)
        return float((z.double() ** 2).sum() - (proj.double() ** 2).sum()), None
    p = torch.linalg.solve_triangular(chol, (xk.T @ xs).to(chol.dtype), upper=False)
    whole = float(((xs.T @ xs).double() * a.double()).sum()) if wide else float(((xs @ ws.T).double() ** 2).sum())
    t_s = torch.linalg.solve_triangular(chol.mT, p, upper=True).double() if want_map else None
    return whole - quad(p), t_s


def _factor(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``a``; a float32 one that fails is redone in float64."""
    chol = spd_factor(a)
    if chol is None and a.dtype != torch.float64:
        chol = spd_factor(a.double())
    if chol is None:
        raise RuntimeError("removal_cost: the ridged Gram is not positive definite")
    return chol


def cut_by_budget(cap: SiteCapture, order: RemovalOrder, max_error: float, ridge: float = 1e-3) -> RemovalOrder:
    """The longest prefix of ``order`` (in blocks) whose exact cost (:func:`removal_cost`) is within
    ``max_error``, found by bisection (the exact cost of nested removals never decreases). The
    estimated costs of an approximate order are upper bounds, so the cut never moves backwards:
    the prefix within the estimate is taken as is, and blocks past it are checked exactly."""
    budget = float(max_error) ** 2 * order.energy
    costs = list(order.cost)
    lo = 0  # blocks known to be within budget
    while lo < len(costs) and costs[lo] <= budget:
        lo += 1
    hi = len(costs)
    exact_at = {}
    if lo < hi:
        c = removal_cost(cap, order.removed(hi), ridge, offer=True)  # the likeliest cut: offer its refit map
        exact_at[hi] = c
        if c <= budget:
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            exact_at[mid] = c = removal_cost(cap, order.removed(mid), ridge)
            if c <= budget:
                lo = mid
            else:
                hi = mid
    # costs inside the prefix: the estimates, never above the exact cost at the cut
    final = exact_at.get(lo, costs[lo - 1] if lo else 0.0)
    out = [min(c, final) for c in costs[:lo]]
    return RemovalOrder(blocks=order.blocks[:lo], cost=out, energy=order.energy)


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
                  bucket_size: int = 128, per_step: int = 8, seed: int = 0,
                  device: torch.device | str | None = None) -> RemovalOrder:
    """The site's removal order: ``exact`` (whole-width OBS), ``blocked`` (whole-width OBS with
    per-neuron greedy decisions and one factorization update per ``per_step`` neurons, on the
    captures' device: :mod:`hashexp.merge.greedy`), ``restricted`` (inside LSH buckets) or
    ``auto`` (restricted from ``order_width`` neurons on, exact below; None: ``AUTO_WIDTH``).
    ``device``: where the blocked order runs (None: the captures' device)."""
    from hashexp.merge.calibration import obs_removal_order

    width = int(cap.inputs[0].shape[1])
    if order == "auto":
        order = "restricted" if width >= (AUTO_WIDTH if order_width is None else int(order_width)) else "exact"
    if order == "restricted" and width > bucket_size:
        est = restricted_removal_order(cap, eligible, floor, ridge, None, block_frac,
                                       bucket_size=bucket_size, per_step=per_step, seed=seed)
        return est if max_error is None else cut_by_budget(cap, est, max_error, ridge)
    if order == "blocked":
        return blocked_removal_order(cap, eligible, floor, ridge, max_error, block_frac, per_step, device)
    return obs_removal_order(cap, eligible, floor, ridge, max_error, block_frac)
