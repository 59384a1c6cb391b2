"""Blocked, batched removal orders: per-neuron greedy decisions, one factorization update per block.

The structured OBS order removes the neuron j with the smallest cost |W_j|^2 / H_jj (H the
inverse ridged calibration Gram), then updates H and the compensated weights. Updating after
every neuron costs width^2 per neuron and one round of small kernels each; updating after a block
of the cheapest neurons by the *current* scores (``obs_removal_order`` with ``block_frac``)
changes the decisions. Here a block of ``per_step`` neurons is chosen one by one with the exact
per-neuron scores (only the diagonals of the updated H and A = W^T W are needed, see
:func:`pick_block`), and H and A are updated once for the whole block: the same survivors as the
per-neuron order, a factor ``per_step`` fewer factorization updates.

Everything is batched over a leading dimension: the buckets of one site
(:mod:`hashexp.merge.order`), or the sites of a ResNet stage with equal shapes
(:func:`stage_removal_orders`: one batched Cholesky, one batched greedy loop, instead of a loop
over sites). :func:`batched_lsq_map` is the least-squares refit (``lsq_map``) over such a stack.
All of it runs on the device of its inputs; only the final (sites x removals) bookkeeping moves
to the CPU.
"""

from __future__ import annotations

import torch

from hashexp.merge.calibration import RemovalOrder, SiteCapture


def factors(xb: torch.Tensor, wb: torch.Tensor, valid: torch.Tensor, lam: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse ridged Grams H (nb, s, s) and weight Grams A = W^T W (nb, s, s), float32.

    ``xb`` (nb, rows, s) centred activations, ``wb`` (nb, out, s) consumer weights, ``lam``
    (nb, s) the ridge of each column; invalid (padding) columns get an identity Gram and zero
    weights, so they are inert.
    """
    xb = (xb * valid[:, None, :]).double()
    g = xb.transpose(1, 2) @ xb
    g = g + torch.diag_embed(torch.where(valid, lam.double(), torch.ones_like(lam, dtype=torch.float64)))
    h = torch.cholesky_inverse(torch.linalg.cholesky(g))
    wb = wb.float() * valid[:, None, :]
    return h.float(), wb.transpose(1, 2) @ wb


def pick_block(hs: list[torch.Tensor], gs: list[torch.Tensor], alive: torch.Tensor, m: int,
               quota: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's next ``m`` removals, chosen one by one as the per-neuron greedy order would.

    After picks P the scores need only the diagonals of the updated H and A:
    diag(H)_i - H_iP H_PP^-1 H_Pi and diag(A)_i - 2 A_iP C_.i + C_.i^T A_PP C_.i with
    C = H_PP^-1 H_P., so choosing a block costs m^2 * s per row and the factorization is
    updated once per block. ``quota`` (nb,) caps the picks of each row. Returns the picks
    (nb, m), which of them are real, and each pick's marginal cost (its greedy score).
    """
    nb, s = alive.shape
    dev = alive.device
    rows = torch.arange(nb, device=dev)[:, None]
    picks = torch.zeros(nb, 0, dtype=torch.long, device=dev)
    oks = torch.zeros(nb, 0, dtype=torch.bool, device=dev)
    costs = torch.zeros(nb, 0, dtype=torch.float64, device=dev)
    free = alive.clone()
    # rows of H and A at the picks so far (zero where a pick is not real), grown one pick at a time
    hps = [torch.zeros(nb, 0, s, dtype=torch.float64, device=dev) for _ in hs]
    aps = [torch.zeros(nb, 0, s, dtype=torch.float64, device=dev) for _ in hs]
    for t in range(m):
        score = torch.zeros(nb, s, dtype=torch.float64, device=dev)
        for h, a, hp, ap in zip(hs, gs, hps, aps):
            dh = h.diagonal(dim1=1, dim2=2).double()
            da = a.diagonal(dim1=1, dim2=2).double()
            if t:
                okf = oks.double()
                hpp = torch.gather(hp, 2, picks[:, None, :].expand(nb, t, t)) * okf[:, None, :]
                hpp = hpp + torch.diag_embed(1.0 - okf)
                c = torch.linalg.solve(hpp, hp)
                app = torch.gather(ap, 2, picks[:, None, :].expand(nb, t, t))
                dh = dh - (hp * c).sum(1)
                da = da - 2 * (ap * c).sum(1) + (c * (app @ c)).sum(1)
            score += da / dh.clamp_min(1e-30)
        allowed = free if quota is None else free & (quota > t)[:, None]
        score = torch.where(allowed, score, float("inf"))
        best = score.argmin(1, keepdim=True)
        ok = torch.isfinite(score.gather(1, best))
        free[rows[ok[:, 0]], best[ok[:, 0]]] = False
        picks = torch.cat([picks, best], 1)
        oks = torch.cat([oks, ok], 1)
        costs = torch.cat([costs, torch.where(ok, score.gather(1, best), 0.0).clamp_min(0.0)], 1)
        if t + 1 < m:
            okf = ok.double()[:, :, None]
            hps = [torch.cat([hp, h[rows, best].double() * okf], 1) for hp, h in zip(hps, hs)]
            aps = [torch.cat([ap, a[rows, best].double() * okf], 1) for ap, a in zip(aps, gs)]
    return picks, oks, costs


def _block_update(hs: list[torch.Tensor], gs: list[torch.Tensor], pick: torch.Tensor, ok: torch.Tensor
                  ) -> torch.Tensor:
    """Remove the block ``pick`` (real where ``ok``) from every consumer's H and A in place; returns
    each row's exact joint cost of the block, tr(H_BB^-1 A_BB) summed over consumers. The removed
    rows and columns of H and A become zero."""
    nb, m = pick.shape
    rows = torch.arange(nb, device=pick.device)[:, None]
    okf = ok.float()
    pair = okf[:, :, None] * okf[:, None, :]
    eye = torch.diag_embed(1.0 - okf)
    step_cost = torch.zeros(nb, dtype=torch.float64, device=pick.device)
    for i, (h, a) in enumerate(zip(hs, gs)):
        hb = h[rows, pick] * okf[..., None]  # (nb, m, s): rows of the removed, zero where invalid
        hbb = torch.gather(hb, 2, pick[:, None, :].expand(nb, m, m)) * pair + eye
        hbb_inv = torch.linalg.inv(hbb.double())
        ab = a[rows, pick] * okf[..., None]
        abb = torch.gather(ab, 2, pick[:, None, :].expand(nb, m, m)) * pair
        step_cost += (hbb_inv * abb.double().transpose(1, 2)).sum((1, 2))
        c = hbb_inv.float() @ hb  # (nb, m, s)
        hs[i] = h - hb.transpose(1, 2) @ c
        ac = ab.transpose(1, 2) @ c  # A_.B C
        gs[i] = a - ac - ac.transpose(1, 2) + c.transpose(1, 2) @ (abb @ c)
    return step_cost


def greedy_steps(hs: list[torch.Tensor], gs: list[torch.Tensor], alive: torch.Tensor, per_step: int,
                 quota: torch.Tensor | None = None, budget: torch.Tensor | None = None,
                 room: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the blocked greedy order on every row of the batch at once.

    Each step removes ``per_step`` neurons per row (:func:`pick_block`) with one block update
    of the row's H and A per consumer (W <- W - W_B C, C = H_BB^-1 H_B., gives
    A <- A - A_.B C - C^T A_B. + C^T A_BB C; a block costs tr(H_BB^-1 A_BB)). A row stops after
    ``quota`` removals or once its cumulative cost passes ``budget`` (the block that passes it
    is still recorded). Once a quarter of the columns are gone, the removed (zero) rows and
    columns of H and A are dropped, so later updates cost the survivors' size squared (per row
    of the batch, padded to the largest). Returns per step the picks' costs (nb, m) (marginals
    rescaled to the block's exact joint cost) and original slots (nb, m) (-1: no pick). ``hs`` and
    ``gs`` are updated in place.

    ``room``: only the first ``room`` removals of the rows' merged order (:func:`_merge_sequences`,
    by running-max cost) are needed. Every later pick of a row costs at least that row's running
    max so far, so once ``room`` picks cost strictly less than the smallest running max of the rows
    still removing, the merged order's first ``room`` entries (and their costs) can no longer
    change, and the loop stops: the same prefix as the full run, without its later steps.
    """
    nb, s = alive.shape
    dev = alive.device
    rows = torch.arange(nb, device=dev)[:, None]
    m = max(1, min(int(per_step), s))
    alive = alive.clone()
    left = None if quota is None else quota.clone().to(dev)
    spent = torch.zeros(nb, dtype=torch.float64, device=dev)
    col = torch.arange(s, device=dev).expand(nb, s)  # original slot of each (compacted) column
    gone = torch.zeros(nb, s, dtype=torch.bool, device=dev)
    steps_cost, steps_slot = [], []
    env = torch.zeros(nb, dtype=torch.float64, device=dev)  # each row's running-max cost
    fixed = 0  # picks whose cost is below every running max of the rows still removing
    for _ in range(-(-s // m)):
        if left is not None:
            alive &= (left > 0)[:, None]
        if not bool(alive.any()):
            break
        pick, ok, marginal = pick_block(hs, gs, alive, m, left)
        step_cost = _block_update(hs, gs, pick, ok)
        done = torch.zeros_like(alive)
        done[rows.expand_as(pick)[ok], pick[ok]] = True
        alive &= ~done
        gone |= done
        total = marginal.sum(1)
        marginal = marginal * torch.where(total > 0, step_cost.clamp_min(0.0) / total.clamp_min(1e-300), 1.0)[:, None]
        steps_cost.append(marginal)
        steps_slot.append(torch.where(ok, col.gather(1, pick), torch.full_like(pick, -1)))
        if left is not None:
            left = left - ok.sum(1)
        spent += step_cost.clamp_min(0.0)
        if budget is not None:
            alive &= (spent <= budget)[:, None]
        if room is not None:
            env, fixed = _settled(env, marginal, ok, steps_cost, steps_slot, alive, left)
            if fixed >= room:
                break
        n_keep = int((~gone).sum(1).max())
        if n_keep <= 0.75 * gone.shape[1]:  # compact: removed columns of H and A are zero, drop them
            keep = torch.argsort(gone.to(torch.int8), dim=1, stable=True)[:, :max(n_keep, 1)]
            hs[:] = [_submatrices(h, keep) for h in hs]
            gs[:] = [_submatrices(a, keep) for a in gs]
            alive, gone, col = alive.gather(1, keep), gone.gather(1, keep), col.gather(1, keep)
    return steps_cost, steps_slot


def _submatrices(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """h[b][keep[b]][:, keep[b]] for every row b: two gathers (3x faster than one 3-index lookup)."""
    nb, k = keep.shape
    rows = torch.gather(h, 1, keep[:, :, None].expand(nb, k, h.shape[2]))
    return torch.gather(rows, 2, keep[:, None, :].expand(nb, k, k))


def _settled(env: torch.Tensor, marginal: torch.Tensor, ok: torch.Tensor, steps_cost: list[torch.Tensor],
             steps_slot: list[torch.Tensor], alive: torch.Tensor, left: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """After a step of :func:`greedy_steps`: the rows' new running-max costs and how many picks so far
    cost strictly less than the smallest running max of the rows that still remove (their place
    in the merged order is settled)."""
    env = torch.maximum(env, torch.where(ok, marginal, torch.zeros_like(marginal)).max(1).values)
    active = alive.any(1) if left is None else alive.any(1) & (left > 0)
    if not bool(active.any()):
        return env, sum(int((p >= 0).sum()) for p in steps_slot)
    lower = env[active].min()
    cost = torch.cat(steps_cost, 1)
    real = torch.cat(steps_slot, 1) >= 0
    run = torch.cummax(torch.where(real, cost, torch.zeros_like(cost)), 1).values
    return env, int((real & (run < lower)).sum())


def _merge_sequences(steps_cost, steps_who, width: int, floor: int, energy: float,
                     max_error: float | None, block_frac: float) -> RemovalOrder:
    """One global order from the buckets' sequences of (neuron, marginal cost), in blocks of
    ``block_frac`` of the width. Sorting by each bucket's running-max cost keeps every bucket's
    own order; ties go to the earlier position."""
    room = width - int(floor)
    if not steps_cost or room <= 0:
        return RemovalOrder(blocks=[], cost=[], energy=energy)
    cost = torch.cat(steps_cost, 1)  # (nb, L)
    who = torch.cat(steps_who, 1)
    real = who >= 0
    env = torch.cummax(torch.where(real, cost, torch.zeros_like(cost)), 1).values
    env = torch.where(real, env, torch.full_like(env, float("inf")))
    t = torch.arange(cost.shape[1]).expand_as(cost).flatten()
    first = torch.argsort(t, stable=True)
    order = first[torch.argsort(env.flatten()[first], stable=True)]
    order = order[real.flatten()[order]][:room]
    flat = who.flatten()[order]
    cum = torch.cumsum(cost.flatten()[order], 0)
    if len(flat) == 0:
        return RemovalOrder(blocks=[], cost=[], energy=energy)
    chunk = max(1, int(block_frac * width))
    cuts = list(range(chunk, len(flat), chunk)) + [len(flat)]
    budget = None if max_error is None else float(max_error) ** 2 * energy
    blocks, out_cost, prev = [], [], 0
    for cut in cuts:
        blocks.append(flat[prev:cut].clone())
        out_cost.append(float(cum[cut - 1]))
        prev = cut
        if budget is not None and out_cost[-1] > budget:
            break
    return RemovalOrder(blocks=blocks, cost=out_cost, energy=energy)


def _ridge_of(xc: torch.Tensor, ridge: float) -> torch.Tensor:
    """(..., s) the exact order's ridge of each column: ridge * G_jj + 1e-12 * mean G_jj."""
    d = (xc.double() ** 2).sum(-2)
    return float(ridge) * d + 1e-12 * d.mean(-1, keepdim=True).clamp_min(1e-30)


def _group_key(cap: SiteCapture) -> tuple:
    return tuple((tuple(x.shape), tuple(w.shape)) for x, w in zip(cap.inputs, cap.weights))


def stage_removal_orders(caps: list[SiteCapture], eligibles: list[torch.Tensor], floors: list[int],
                         ridge: float = 1e-3, max_error: float | None | list[float | None] = None,
                         block_frac: float = 0.01, per_step: int = 8,
                         device: torch.device | str | None = None) -> list[RemovalOrder]:
    """The blocked whole-width OBS order of several sites, batched over sites of equal shapes.

    Sites whose consumers' inputs and weights have the same shapes (the blocks of a ResNet
    stage) are stacked: one batched Gram, Cholesky and greedy loop per group instead of one per
    site. Each site stops at its ``floor`` or once its cost passes ``max_error`` (relative,
    as in ``obs_removal_order``; one value, or one per site). Runs on ``device`` (None: the captures' device). Returns one
    order per site, in the order given, identical to the order each site gets alone.
    """
    errs = list(max_error) if isinstance(max_error, (list, tuple)) else [max_error] * len(caps)
    out: list[RemovalOrder | None] = [None] * len(caps)
    groups: dict[tuple, list[int]] = {}
    for i, cap in enumerate(caps):
        groups.setdefault(_group_key(cap), []).append(i)
    for idx in groups.values():
        dev = torch.device(device) if device is not None else caps[idx[0]].inputs[0].device
        hs, gs = [], []
        energy = torch.zeros(len(idx), dtype=torch.float64, device=dev)
        for k in range(len(caps[idx[0]].inputs)):
            x = torch.stack([caps[i].inputs[k] for i in idx]).to(dev).float()
            xc = x - x.mean(1, keepdim=True)
            w = torch.stack([caps[i].weights[k] for i in idx]).to(dev).float()
            valid = torch.ones(xc.shape[0], xc.shape[2], dtype=torch.bool, device=dev)
            h, a = factors(xc, w, valid, _ridge_of(xc, ridge))
            hs.append(h)
            gs.append(a)
            energy += ((xc @ w.transpose(1, 2)).double() ** 2).sum((1, 2))
        width = hs[0].shape[1]
        alive = torch.stack([eligibles[i].bool() for i in idx]).to(dev)
        quota = torch.tensor([max(width - int(floors[i]), 0) for i in idx], device=dev)
        budget = torch.tensor([float("inf") if errs[i] is None else float(errs[i]) ** 2 for i in idx],
                              dtype=torch.float64, device=dev) * energy
        costs, slots = greedy_steps(hs, gs, alive, per_step, quota, budget)
        for j, i in enumerate(idx):
            out[i] = _merge_sequences([c[j:j + 1].cpu() for c in costs], [p[j:j + 1].cpu() for p in slots],
                                      width, int(floors[i]), float(energy[j]), errs[i], block_frac)
    return out  # type: ignore[return-value]


def blocked_removal_order(cap: SiteCapture, eligible: torch.Tensor, floor: int, ridge: float = 1e-3,
                          max_error: float | None = None, block_frac: float = 0.01, per_step: int = 8,
                          device: torch.device | str | None = None) -> RemovalOrder:
    """The whole-width OBS order of one site, ``per_step`` greedy removals per factorization update;
    same contract as ``obs_removal_order`` (the costs are exact, not bounds)."""
    return stage_removal_orders([cap], [eligible], [floor], ridge, max_error, block_frac, per_step, device)[0]


def batched_lsq_map(x_old: torch.Tensor, x_new: torch.Tensor, ridge: float = 1e-3,
                    prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``lsq_map`` over a stack of sites: x_old (S, rows, n) ~ x_new (S, rows, k) @ T + c.

    Returns T (S, k, n) and c (S, n), float64, with the same ridge (toward ``prior`` (S, k, n))
    as the per-site refit; one batched Cholesky solve for the whole stack.
    """
    xo, xn = x_old.double(), x_new.double()
    mo, mn = xo.mean(1), xn.mean(1)
    xoc, xnc = xo - mo[:, None], xn - mn[:, None]
    g = xnc.transpose(1, 2) @ xnc
    d = g.diagonal(dim1=1, dim2=2)
    lam = float(ridge) * d + 1e-12 * d.mean(1, keepdim=True).clamp_min(1e-30)
    gr = g + torch.diag_embed(lam)
    rhs = xnc.transpose(1, 2) @ xoc
    if prior is not None:
        rhs = rhs + lam[:, :, None] * prior.double().to(rhs.device)
    chol, info = torch.linalg.cholesky_ex(gr)
    if bool((info != 0).any()):  # numerically indefinite (degenerate features): LU for the stack
        t = torch.linalg.solve(gr, rhs)
    else:
        t = torch.cholesky_solve(rhs, chol)
    return t, mo - (mn[:, None, :] @ t)[:, 0]
