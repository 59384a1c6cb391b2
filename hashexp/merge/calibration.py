"""Calibration: what a site's neurons compute, measured on a fixed set of training samples.

Weight cosine is a cliff: trained neurons are seldom near-duplicates in weight space, yet many
are redundant in what they compute. So the merge decisions of ``compensation=lsq`` are made on
data:

- a fixed calibration set (:func:`calibration_index`): ``calib_samples`` training samples drawn
  with the run seed, the same on every DDP rank and across resume;
- :func:`capture_site`: one forward pass through the *current* network (upstream sites already
  merged) that records, for each consumer of the site, its input rows (the site's features:
  post-activation outputs; for convs the channel vectors at sampled spatial positions) and its
  output rows (the consumer's pre-activation). The pass stops as soon as every consumer of the
  site has run, so early sites cost a fraction of a forward. :func:`capture_sites` records
  several sites in one pass: the refit pass of a site also measures the next one, and a pass
  records the later sites it reaches anyway, so a rehash runs about one pass per site;
- :func:`obs_removal_order`: which neurons to remove, in order of increasing error. Removing
  input feature j of a linear consumer Y = X W^T and refitting the other columns by least
  squares costs |W_j|^2 / [G^-1]_jj (G = X^T X; the structured Optimal Brain Surgeon step,
  Hassibi & Stork 1993), and the costs of successive removals add up to exactly the refit's
  output error. Blocks of the cheapest neurons are removed at once with the exact block update;
- :func:`lsq_map`: the refit itself (a pruning plan's unchanged survivors keep their columns
  exactly, so only the removed neurons are solved). After the producers are merged, the old features are
  regressed on the new ones with an intercept (ridge, so dead or duplicate neurons never make
  it singular): X_old ~ X_new T + c. The consumer's weight becomes W T^T and its bias b + W c,
  which reproduces its pre-activation in the least-squares sense. A conv is linear in its input
  channels, so the same channel map applies at every kernel position;
- :func:`relative_error`: the consumer's measured pre-activation error after the merge,
  |dY - mean(dY)| / |Y - mean(Y)| (constant shifts are left to the bias or to the BatchNorm
  that follows and is recalibrated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.site import Consumer, MergeSite, consumer_output, site_input
from hashexp.merge.solves import consumer_energy, solve_dtype, spd_solve, take_map
from hashexp.utils.seeding import EVENT_MIX, derive_seed

#: calibration samples when hashing.calib_samples is null (or the whole split if smaller)
DEFAULT_SAMPLES = 1024
#: rows of conv features kept per consumer (sampled spatial positions over all samples)
MAX_CONV_ROWS = 8192
#: calibration samples a site with conv consumers runs by default (``hashing.conv_samples``): their
#: spatial positions already give far more rows than MAX_CONV_ROWS, and a conv forward is the
#: expensive part of a rehash
CONV_SAMPLES = 256


def calibration_index(n_train: int, samples: int, seed: int) -> torch.Tensor:
    """Indices of the calibration samples: the first ``samples`` of a seeded permutation.

    Depends only on (n_train, samples, seed), so every DDP rank and every resume draws the same.
    """
    samples = int(samples)
    if samples < 1:
        raise ConfigError(f"hashing.calib_samples must be >= 1, got {samples}")
    if samples > n_train:
        raise ConfigError(f"hashing.calib_samples={samples} exceeds the {n_train} training samples; "
                          f"choose at most {n_train}")
    gen = torch.Generator().manual_seed(derive_seed(seed, scale=2_654_435_761, offset=97, modulus=2**63))
    return torch.randperm(n_train, generator=gen)[:samples].sort().values


@dataclass
class SiteCapture:
    """What one calibration pass saw at a site's consumers (one entry per consumer).

    Attributes:
        inputs: (rows, width) float32 input features of each consumer.
        outputs: (rows, out) float32 pre-activations of each consumer.
        weights: (out * kernel, width) float64 weight matrix of each consumer (kernel positions
            as extra outputs), cloned at capture time.
    """

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)


class _Stop(Exception):
    """Raised by a hook once every consumer of the site has run: the rest of the forward is skipped."""


def _rows(t: torch.Tensor, gen: torch.Generator, cap: int) -> torch.Tensor:
    """(N, C, *spatial) -> (rows, C): all rows for Linear inputs, sampled positions for convs.

    Rows are a copy: a later in-place op of the model (``ReLU(inplace=True)``) must not change them.
    """
    if t.dim() == 2:
        t = t.detach()
        return t.float() if t.dtype != torch.float32 else t.clone()
    flat = t.detach().movedim(1, -1).reshape(-1, t.shape[1]).float()
    if flat.shape[0] <= cap:
        return flat
    idx = torch.randint(0, flat.shape[0], (cap,), generator=gen).to(flat.device)
    return flat.index_select(0, idx)


def weight_matrix(module: nn.Module | Consumer, width: int | None = None) -> torch.Tensor:
    """(out * kernel, in) float64 view of a Linear or conv weight: one row per output and tap.

    For a :class:`Consumer` that reads the site at an offset or in blocks: only the site's
    ``width`` columns, each block position counted as a tap.
    """
    if isinstance(module, Consumer):
        cons, module = module, module.module
        if not cons.plain:
            w = module.weight.detach().double()
            if cons.block > 1:
                w = w.reshape(w.shape[0], -1, cons.block)
            w = w[:, cons.offset:cons.offset + width]
            return w.transpose(0, 1).reshape(w.shape[1], -1).T.contiguous()
    w = module.weight.detach().double()
    if w.dim() == 2:
        return w
    return w.transpose(0, 1).reshape(w.shape[1], -1).T.contiguous()


def calibration_inputs(site: MergeSite, x: torch.Tensor, conv_samples: int = CONV_SAMPLES) -> torch.Tensor:
    """The calibration inputs a site's pass runs: ``x``, or its first ``conv_samples`` for a site
    with conv consumers."""
    if any(isinstance(c.module, nn.modules.conv._ConvNd) for c in site.consumers):
        return x[:int(conv_samples)]
    return x


def capture_site(model: nn.Module, site: MergeSite, x: torch.Tensor, seed: int = 0,
                 before_consumer: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
                 conv_samples: int = CONV_SAMPLES) -> SiteCapture:
    """Run the calibration inputs ``x`` through ``model`` (eval mode, no grad) and record the site
    (a site with conv consumers runs the first ``conv_samples`` of ``x``).

    ``before_consumer(k, module, input_rows)`` runs inside consumer k's forward pre-hook, in
    forward order, before the consumer computes: it may rewrite the consumer (the least-squares
    refit), and the rest of the pass then sees the refitted consumer. Conv rows are sampled at
    the same positions in every pass with the same ``seed`` and shapes.
    """
    return capture_sites(model, [(site, seed, before_consumer)], x, conv_samples)[0]


def capture_sites(model: nn.Module, specs: list[tuple[MergeSite, int, Callable | None]],
                  x: torch.Tensor, conv_samples: int = CONV_SAMPLES,
                  optional: list[tuple[MergeSite, int]] = ()) -> list[SiteCapture | None]:
    """One calibration pass that records several sites: ``specs`` is ``[(site, seed,
    before_consumer)]`` (see :func:`capture_site`); the pass stops once every consumer of every
    site in ``specs`` has run. ``optional`` ``[(site, seed)]``: sites also recorded when all their
    consumers run before the pass stops (free: the pass goes no further for them); their entries
    follow those of ``specs``, None for a site not complete (or that runs other inputs).

    A module computes after every module before it in the forward, and a ``before_consumer``
    rewrites its consumer before that consumer computes, so each site's rows are exactly those of
    a pass of its own through the network as it is once every rewrite of this pass is done: the
    refit pass of one site also measures the next site (the compressor's forward order), and a
    rehash needs one pass per site instead of two. The sites in ``specs`` must run the same inputs
    (:func:`calibration_inputs`).
    """
    xs = {calibration_inputs(site, x, conv_samples).shape[0] for site, _, _ in specs}
    if len(xs) != 1:
        raise ValueError("capture_sites: the sites run different calibration inputs; capture them one by one")
    x = calibration_inputs(specs[0][0], x, conv_samples)
    extra = [(site, seed, None) for site, seed in optional
             if calibration_inputs(site, x, conv_samples).shape[0] == x.shape[0]
             and all(site is not s for s, _, _ in specs)]
    caps = [SiteCapture() for _ in specs + extra]
    pending = {(j, k) for j, (site, _, _) in enumerate(specs) for k in range(len(site.consumers))}
    handles = []
    for j, ((site, seed, before_consumer), cap) in enumerate(zip(specs + extra, caps)):
        # rewriting sites first: their hooks run first
        handles += _capture_hooks(site, seed, before_consumer, cap, pending, j)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        for m, tr in modes:
            m.training = tr
    for (site, _, _), cap in zip(specs, caps):
        missing = [site.consumers[k].module.__class__.__name__ for k in range(len(cap.outputs)) if cap.outputs[k] is None]
        if missing:
            raise RuntimeError(f"site {site.name}: consumers {missing} did not run in the forward pass")
    done = {id(site): cap for (site, _, _), cap in zip(extra, caps[len(specs):])
            if all(o is not None for o in cap.outputs)}
    return caps[:len(specs)] + [done.get(id(site)) for site, _ in optional]


def _capture_hooks(site: MergeSite, seed: int, before_consumer, cap: SiteCapture, pending: set, j: int) -> list:
    """The pre- and post-hooks that record ``site`` into ``cap`` (see :func:`capture_sites`); the
    post-hook stops the pass once ``pending`` (required (site, consumer) pairs) is empty."""
    n = len(site.consumers)
    cap.inputs, cap.outputs, cap.weights = [None] * n, [None] * n, [None] * n  # type: ignore[list-item]
    gens = {}

    def gen_for(k: int, which: int) -> torch.Generator:
        if (k, which) not in gens:
            gens[k, which] = torch.Generator().manual_seed(derive_seed(seed, k, which, scale=EVENT_MIX, weights=(31, 1)))
        return gens[k, which]

    def pre(module, inputs, k):
        rows = _rows(site_input(site.consumers[k], inputs[0], site.width), gen_for(k, 0), MAX_CONV_ROWS)
        if before_consumer is not None:
            before_consumer(k, module, rows)
        cap.inputs[k] = rows.cpu()  # decisions are made on the CPU; only the refit runs on the device
        cap.weights[k] = weight_matrix(site.consumers[k], site.width).cpu()

    def post(module, inputs, output, k):
        cap.outputs[k] = _rows(consumer_output(module, output), gen_for(k, 1), MAX_CONV_ROWS).cpu()
        if (j, k) in pending:
            pending.discard((j, k))
            if not pending:
                raise _Stop

    handles = []
    for k, c in enumerate(site.consumers):
        handles.append(c.module.register_forward_pre_hook(lambda m, i, k=k: pre(m, i, k)))
        handles.append(c.module.register_forward_hook(lambda m, i, o, k=k: post(m, i, o, k)))
    return handles


def _ridge(g: torch.Tensor, ridge: float) -> torch.Tensor:
    """G + diag(ridge * G_jj + 1e-12 * mean G_jj): ridge on standardised features, so the fit does
    not depend on each neuron's scale, and a dead neuron (G_jj = 0) stays free to remove (its
    cost is 1e-12 of an average one) without making G singular."""
    d = g.diagonal()
    lam = float(ridge) * d + 1e-12 * float(d.mean().clamp_min(1e-30))
    return g + torch.diag(lam)


def _spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive definite matrix by Cholesky (LU if it is not numerically SPD)."""
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(a))
    except RuntimeError:
        return torch.linalg.inv(a)


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """``Xc^T Xc`` in float64, ``Xc`` the columns of ``x`` (rows are samples) minus their mean."""
    xc = x.double() - x.double().mean(0)
    return xc.T @ xc


def lsq_map(x_old: torch.Tensor, x_new: torch.Tensor, ridge: float = 1e-3,
            prior: torch.Tensor | None = None, same: torch.Tensor | None = None,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares with intercept: x_old ~ x_new @ T + c; returns T (k, n) and c (n,), float64.

    The ridge pulls T toward ``prior`` (k, n) instead of toward zero: the plan's own weight-rule
    map, so a survivor that is unchanged (``representative=keep``) keeps exactly its column
    (T = I there) and only the removed neurons are regressed on the survivors.

    ``same`` (k,) long, optional: new feature i *is* old feature ``same[i]`` (``x_new[:, i] ==
    x_old[:, same[i]]``) and ``prior[:, same[i]]`` is the unit vector e_i (a pruning plan measured
    before any other change). Those columns of T are then e_i exactly (zero residual at the prior,
    the unique minimum) and only the other columns are solved: the cost falls with the share of
    survivors.

    ``dtype``: the solve's precision (None: :func:`hashexp.merge.solves.solve_dtype`; then, with
    ``same`` and a zero prior on the solved columns, a map the exact removal cost of these
    survivors offered, :func:`hashexp.merge.solves.take_map`, is used instead of solving again).
    """
    k, n = x_new.shape[1], x_old.shape[1]
    dt = solve_dtype(k, ridge) if dtype is None else dtype
    dev = x_old.device
    mn = x_new.double().mean(0)  # means in float64: the intercept is exact to its precision
    cols = torch.arange(n, device=dev)
    if same is not None:
        free = torch.ones(n, dtype=torch.bool, device=dev)
        free[same.to(dev)] = False
        cols = free.nonzero().flatten()
    xo = x_old.index_select(1, cols) if same is not None else x_old
    mo = xo.double().mean(0)
    offered = take_map(x_old, same, ridge) if same is not None and dtype is None else None
    if offered is not None and (prior is None or not bool(prior[:, cols].any())):
        sol = offered.to(dev)  # the exact removal cost of these survivors solved it already
    else:
        xnc = x_new.to(dt) - mn.to(dt)
        g = xnc.T @ xnc
        gr = _ridge(g, ridge)
        rhs = xnc.T @ (xo.to(dt) - mo.to(dt))
        if prior is not None:
            rhs = rhs + (gr - g).diagonal()[:, None] * prior.to(device=rhs.device, dtype=dt)[:, cols]
        sol = spd_solve(gr, rhs).double()
    shift = mo - mn @ sol
    if same is None:
        return sol, shift
    t = torch.zeros(k, n, dtype=torch.float64, device=dev)
    t[torch.arange(len(same), device=dev), same.to(dev)] = 1.0
    t[:, cols] = sol
    c = torch.zeros(n, dtype=torch.float64, device=dev)
    c[cols] = shift
    return t, c


def relative_error(y_old: torch.Tensor, y_new: torch.Tensor) -> float:
    """|dY - mean(dY)| / |Y_old - mean(Y_old)| over rows (outputs as columns)."""
    yo, yn = y_old.double(), y_new.double()
    d = yn - yo
    num = (d - d.mean(0)).norm()
    den = (yo - yo.mean(0)).norm().clamp_min(1e-30)
    return float(num / den)


@dataclass
class RemovalOrder:
    """Greedy removal sequence of one site (blocks of neurons, cheapest first).

    Attributes:
        blocks: the neuron indices removed at each step, in order.
        cost: cumulative output error (squared, summed over consumers) after each block.
        energy: the consumers' total centred output energy (squared), the error's denominator.
    """

    blocks: list[torch.Tensor]
    cost: list[float]
    energy: float

    def rel_error(self, n_blocks: int) -> float:
        """Relative output error sqrt(cost / energy) after the first ``n_blocks`` blocks (0 for none)."""
        if n_blocks == 0:
            return 0.0
        return math.sqrt(max(self.cost[n_blocks - 1], 0.0) / max(self.energy, 1e-30))

    def removed(self, n_blocks: int) -> torch.Tensor:
        """The neuron indices of the first ``n_blocks`` blocks, concatenated in removal order."""
        if n_blocks == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(self.blocks[:n_blocks])


def obs_removal_order(cap: SiteCapture, eligible: torch.Tensor, floor: int, ridge: float = 1e-3,
                      max_error: float | None = None, block_frac: float = 0.01) -> RemovalOrder:
    """Remove eligible neurons cheapest-first, blocks of ``block_frac`` of the width, down to ``floor``.

    The order does not depend on ``max_error``: the budget only says where to stop computing
    (the first block whose cumulative error passes it is still recorded), so a larger budget
    always keeps a prefix at least as long, i.e. never a wider site. Each consumer keeps its own
    inverse Gram H = (X^T X + ridge)^-1 and its own compensated weights; a block B costs
    sum_consumers tr(W_B H_BB^-1 W_B^T) and updates W <- W - W_B H_BB^-1 H_B., H <- H - H_.B H_BB^-1 H_B.
    H is inverted in float64; the rank-b updates, which dominate (width^2 per removed neuron),
    run in float32 on the surviving rows and columns only (the arrays are compacted as the site
    shrinks).
    """
    width = int(cap.inputs[0].shape[1])
    hs, ws = [], []
    energy = 0.0
    outs = list(cap.outputs) if len(cap.outputs) == len(cap.inputs) else [None] * len(cap.inputs)
    for x, w, y in zip(cap.inputs, cap.weights, outs):
        g = centred_gram(x)
        energy += consumer_energy(x, w, y, g)
        hs.append(_spd_inverse(_ridge(g, ridge)).float())
        ws.append(w.float().clone())
    idx = torch.arange(width)  # original index of each surviving row/column
    allowed = eligible.clone().bool()
    blocks: list[torch.Tensor] = []
    costs: list[float] = []
    total = 0.0
    budget = None if max_error is None else float(max_error) ** 2 * energy
    while True:
        n_alive = len(idx)
        room = n_alive - int(floor)
        cand = allowed[idx]
        n_cand = int(cand.sum())
        if room <= 0 or n_cand == 0:
            break
        score = torch.zeros(n_alive, dtype=torch.float64)
        for h, w in zip(hs, ws):
            score += ((w * w).sum(0) / h.diagonal().clamp_min(1e-30)).double()
        score[~cand] = float("inf")
        b = max(1, min(room, n_cand, int(block_frac * n_alive)))
        blk = torch.topk(score, b, largest=False).indices.sort().values
        keep = torch.ones(n_alive, dtype=torch.bool)
        keep[blk] = False
        kept = keep.nonzero().flatten()
        step = 0.0
        for i, (h, w) in enumerate(zip(hs, ws)):
            hb = h.index_select(0, blk)  # (b, alive)
            hbb_inv = torch.linalg.inv(hb.index_select(1, blk).double())
            wb = w.index_select(1, blk)
            step += float(((wb.double() @ hbb_inv) * wb.double()).sum())
            c = hbb_inv.float() @ hb.index_select(1, kept)  # (b, kept)
            hk = h.index_select(0, kept)
            hs[i] = torch.addmm(hk.index_select(1, kept), hk.index_select(1, blk), c, alpha=-1.0)
            ws[i] = torch.addmm(w.index_select(1, kept), wb, c, alpha=-1.0)
        total += max(step, 0.0)
        blocks.append(idx[blk])
        idx = idx[keep]
        costs.append(total)
        if budget is not None and total > budget:
            break
    return RemovalOrder(blocks=blocks, cost=costs, energy=energy)
