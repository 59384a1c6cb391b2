"""The hashed network's compressor: LSH proposes, data decides, least squares absorbs.

With ``compensation=lsq`` (the default; hashexp/merge/calibration.py):

1. candidates: SimHash of each neuron's centred calibration activations (``activations``:
   neurons that fire together), of its weights [w; b] (``weights``), or all pairs (``exact``,
   the ablation that shows what hashing changed); an optional cosine pre-filter (``threshold``);
2. eligibility: every neuron in a candidate pair may go; they go cheapest first by the measured
   error of the consumers' pre-activation after a least-squares refit (the error-ordered plan:
   structured OBS costs on the calibration set), until the site's error budget ``max_error`` or
   its target width is reached;
3. representatives: ``keep`` leaves each survivor unchanged, ``mean`` replaces it by the
   activation-weighted mean of its group (each removed neuron joins its most correlated
   survivor);
4. the consumers are refit by ridge least squares on the calibration set, in forward order (the
   base, :mod:`hashexp.merge.compressor`).

``candidates=auto`` lists all pairs below the width where hashing starts to pay (the crossover
modelled in :mod:`hashexp.lsh.params`). With ``compensation=weights`` or ``none`` the plan is the
data-free cosine path of the first version (:mod:`hashexp.merge.cosine`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.budget import (allocate, check_budget, layer_flops, neuron_flops, planned_keep, site_weights,
                                  spent_error)
from hashexp.merge.compressor import Compressor
from hashexp.merge.plans import nearest_survivor
from hashexp.merge.cosine import pair_cosines, plan_by_cosine
from hashexp.merge.greedy import stage_removal_orders
from hashexp.merge.heads import head_removal_order, head_vectors
from hashexp.merge.order import check_order_knobs, removal_order
from hashexp.merge.sites import MergeSite, model_sites
from hashexp.merge.surgery import MergePlan, merge_plan, prune_plan
from hashexp.merge.training_rows import example_input
from hashexp.merge.width_plan import load_width_plan
from hashexp.utils.checks import check_at_least, check_bits, check_cosine
from hashexp.utils.seeding import EVENT_MIX, SITE_MIX, derive_seed

CANDIDATES = ("activations", "weights", "exact", "auto")
REPRESENTATIVES = ("keep", "mean")
#: calibration rows used as a neuron's activation signature for hashing
_MAX_SIGNATURE = 2048


class HashCompressor(Compressor):
    """The hashed network: LSH proposes, data (or, data-free, the cosine) decides.

    Args:
        candidates: what LSH hashes to propose pairs: ``activations`` (each neuron's centred
            calibration activations), ``weights`` ([w; b], norms folded in) or ``exact`` (all
            pairs, no hashing), or ``auto``: exact below ``auto_width`` neurons, activations above.
            ``compensation=weights/none`` always hash weights.
        auto_width: the width from which ``candidates=auto`` hashes (None: the crossover that
            hashexp.lsh.params models for the pre-filter cosine, 0.9 without one).
        representative: ``keep`` (survivors stay unchanged, the consumers absorb the rest) or
            ``mean`` (activation-weighted mean of the group); None: keep with ``lsq``, mean otherwise.
        max_error: per-site, per-rehash budget on the relative error of the consumers'
            pre-activation on the calibration set (``compensation=lsq``; None: only the target
            width or ``min_width`` stops merging).
        threshold: cosine pre-filter. With ``lsq``: a candidate pair must reach it (None: every
            candidate counts). With ``weights``/``none``: the least cosine of every member to its
            group's representative (None: 0.7), the data-free verification.
        bits, tables: K bits per table, L tables of SimHash.
        min_tables: a pair is a candidate when it collides in at least this many tables.
        transform: ``auto`` (SimHash for ReLU-like sites, MIPS otherwise), ``simhash`` or ``mips``
            (weight candidates only).
        max_group_size: largest group (0: unlimited; data-free path).
        max_rounds: rounds of pairwise merging per rehash (data-free path).
        max_pairs: refuse to verify more candidate pairs than this (raise bits instead).
        block_frac: share of the width removed per step of the error-ordered removal.
        order: the removal order (:mod:`hashexp.merge.order`): ``exact`` (structured OBS over the
            whole width), ``blocked`` (the same with per-neuron greedy decisions, one factorization
            update per ``per_step`` neurons, on the site's device), ``restricted`` (OBS inside LSH
            buckets of ``bucket_size`` neurons, linear in width) or ``auto`` (restricted from
            ``order_width`` neurons on).
        order_width, bucket_size, per_step: see ``order``; ``per_step`` neurons leave each bucket
            per factorization update.
        budget: ``site`` (every site stops at ``max_error`` and keeps ``target_ratio`` of its
            width) or ``global`` (:mod:`hashexp.merge.budget`: one error budget of
            ``n_sites * max_error^2`` and, with ``target_ratio``, one FLOPs ratio across all
            sites, spent cheapest error per saved FLOP first; ``compensation=lsq`` only).
        flops_plan: a run's metrics.json (or run dir), with ``budget=global``: rehash k keeps the
            multiply-adds that run's sites' layers had after its rehash k (one global FLOPs target
            per rehash, :func:`hashexp.merge.budget.planned_keep`), so a global run reaches the
            FLOPs of a per-site run rehash by rehash and differs only in where it cuts; past the
            plan nothing is removed. Replaces ``target_ratio``; with ``max_error`` whichever budget
            binds first stops (``max_error=null`` for equal FLOPs).
        global_weight: with ``budget=global``, ``consumers`` (a site's squared relative error counts
            once per consumer layer, in the ranking and in the budget:
            :func:`hashexp.merge.budget.site_weights`; the default: at equal FLOPs on the ResNet-20
            subset run it is 4.0 pp better than ``none``, benchmarks/bench_budget_train.md) or
            ``none`` (once per site). Sites with one consumer each (an MLP) are the same either way.
        batch_sites: order the removals of all sites at once before merging (``compensation=lsq``):
            the blocked order (:mod:`hashexp.merge.greedy`) batched over sites of equal shapes
            (the blocks of a ResNet stage), on the model's device, from captures of the network
            before this rehash (as ``budget=global`` does); replaces ``order`` for these sites.
        other arguments: see :class:`Compressor`.
    """

    name = "simhash"

    def __init__(self, threshold: float | None = None, bits: int = 8, tables: int = 8, min_tables: int = 1,
                 transform: str = "auto", max_group_size: int = 0, max_pairs: int = 20_000_000,
                 max_rounds: int = 8, n_threads: int = 0, candidates: str = "activations",
                 representative: str | None = None, max_error: float | None = None, block_frac: float = 0.01,
                 auto_width: int | None = None, order: str = "auto", order_width: int | None = None,
                 bucket_size: int = 128, per_step: int = 8, budget: str = "site", batch_sites: bool = False,
                 flops_plan: str | None = None, global_weight: str = "consumers", **kw) -> None:
        super().__init__(**kw)
        check_order_knobs(order, order_width, bucket_size, per_step)
        self.order, self.order_width = order, None if order_width is None else int(order_width)
        self.bucket_size, self.per_step = int(bucket_size), int(per_step)
        self.budget = check_budget(budget)
        self._global_removed: dict[str, tuple[torch.Tensor, int]] = {}
        self.flops_plan = self._load_flops_plan(flops_plan)
        site_weights([], global_weight)  # checked here, computed per rehash
        self.global_weight = global_weight
        self.batch_sites = bool(batch_sites)
        self._site_orders: dict[str, tuple[cal.RemovalOrder, torch.Tensor]] = {}
        check_cosine("hashing.threshold", threshold, nullable=True)
        if transform not in ("auto", "simhash", "mips"):
            raise ConfigError(f"hashing.transform={transform!r}; choose auto, simhash or mips")
        check_bits("hashing.bits", bits)
        if int(tables) < 1 or not (1 <= int(min_tables) <= int(tables)):
            raise ConfigError(f"hashing.tables must be >= 1 and 1 <= min_tables <= tables, got {tables}, {min_tables}")
        if max_group_size < 0:
            raise ConfigError(f"hashing.max_group_size must be >= 0 (0: unlimited), got {max_group_size}")
        if candidates not in CANDIDATES:
            raise ConfigError(f"hashing.candidates={candidates!r}; choose {', '.join(CANDIDATES)}")
        if representative is None:  # survivors stay with least squares; the data-free rule takes the mean
            representative = "keep" if self.compensation == "lsq" else "mean"
        if representative not in REPRESENTATIVES:
            raise ConfigError(f"hashing.representative={representative!r}; choose {', '.join(REPRESENTATIVES)}")
        if max_error is not None and not (0.0 < float(max_error) <= 1.0):
            raise ConfigError(f"hashing.max_error must be a relative error in (0, 1] or null, got {max_error}")
        if not (0.0 < float(block_frac) <= 0.5):
            raise ConfigError(f"hashing.block_frac must be in (0, 0.5], got {block_frac}")
        self.threshold = None if threshold is None else float(threshold)
        self.bits, self.tables, self.min_tables = int(bits), int(tables), int(min_tables)
        self.transform = transform
        self.max_group_size = int(max_group_size)
        self.max_pairs = int(max_pairs)
        if int(max_rounds) < 1:
            raise ConfigError(f"hashing.max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = int(max_rounds)
        self.n_threads = int(n_threads)
        self.candidates = candidates
        self.representative = representative
        self.max_error = None if max_error is None else float(max_error)
        self.block_frac = float(block_frac)
        self.auto_width = check_at_least("hashing.auto_width", auto_width, 1, nullable=True)
        self.last_stats: dict[str, dict[str, Any]] = {}

    def _load_flops_plan(self, path: str | None) -> list[dict[str, int]] | None:
        """``hashing.flops_plan`` checked against the other targets and read (widths after each rehash)."""
        if path is None:
            return None
        if self.budget != "global":
            raise ConfigError(f"hashing.flops_plan={path} is a global FLOPs target per rehash; it needs "
                              "hashing.budget=global")
        if self.target_ratio is not None or self.followed_widths is not None:
            raise ConfigError("hashing.flops_plan sets the FLOPs target itself; set hashing.target_ratio=null and "
                              "hashing.width_plan=null")
        return load_width_plan(path)

    def hash_vectors(self, site: MergeSite) -> torch.Tensor:
        """The vectors weight candidates hash: [w; b], MIPS-transformed for sites that are not ReLU-like
        (``transform``)."""
        x = site.neuron_vectors()
        use_mips = self.transform == "mips" or (self.transform == "auto" and not site.homogeneous)
        if use_mips:
            from hashexp.lsh import mips_transform

            x = mips_transform(x)
        return x

    def make_hasher(self, site: MergeSite, index: int, dim: int):
        """A SimHash of ``bits`` x ``tables`` for site ``index``, seeded per rehash."""
        from hashexp.lsh import SimHash

        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator(index)))
        return SimHash(dim, self.bits, self.tables, seed=seed)

    def candidate_pairs(self, site: MergeSite, index: int, x: torch.Tensor) -> np.ndarray:
        """Pairs (i < j) of rows of ``x`` that collide in at least ``min_tables`` clsh tables."""
        import clsh

        hasher = self.make_hasher(site, index, x.shape[1])
        codes = hasher.fingerprint(x.detach().cpu())
        t = clsh.LSHTables(self.tables, n_threads=self.n_threads)
        t.build(codes)
        return t.candidate_pairs(self.min_tables)

    def plan_site(self, site: MergeSite, index: int, mass: torch.Tensor | None,
                  capture: cal.SiteCapture | None = None) -> MergePlan | None:
        """The error-ordered plan (``compensation=lsq``) or the data-free cosine path."""
        if self.compensation == "lsq":
            return self._plan_by_error(site, index, mass, capture)
        if self.budget == "global":
            raise ConfigError("hashing.budget=global spends measured errors; it needs hashing.compensation=lsq")
        if self.representative == "keep" and not site.homogeneous:
            raise ConfigError(f"site {site.name} ({site.activation}): representative=keep with compensation="
                              f"{self.compensation} folds members by a positive scale, which needs a ReLU-like "
                              "activation; use compensation=lsq or representative=mean")
        return self._finish(self._plan_by_cosine(site, index, mass))

    def _plan_by_error(self, site: MergeSite, index: int, mass: torch.Tensor | None,
                       cap: cal.SiteCapture) -> MergePlan | None:
        """Remove candidate neurons cheapest-first by measured error, within budget and target."""
        if site.name in self._global_removed:  # budget=global: _prepare chose this site's removals
            removed, candidates = self._global_removed.pop(site.name)
            return self._removal_plan(site, mass, cap, removed, candidates, None)
        width = site.width
        target = self.target(site)
        floor = max(self._min_width(site), target if target is not None else 0)
        if width <= floor:
            return None
        if site.name in self._site_orders:  # batch_sites: _prepare ordered this site with the others
            order, eligible = self._site_orders.pop(site.name)
        else:
            eligible = self.eligible(site, index, cap)
            order = self._order(site, index, cap, eligible, floor, self.max_error)
        nb = len(order.blocks)
        if self.max_error is not None:
            while nb > 0 and order.rel_error(nb) > self.max_error:
                nb -= 1
        return self._removal_plan(site, mass, cap, order.removed(nb), int(eligible.sum()), order.rel_error(nb))

    def _order(self, site: MergeSite, index: int, cap: cal.SiteCapture, eligible: torch.Tensor, floor: int,
               max_error: float | None) -> cal.RemovalOrder:
        """The site's removal order (``hashing.order``), down to ``floor``, cut at ``max_error``."""
        if site.group > 1:  # attention heads: whole heads, one per step
            return head_removal_order(cap, site.group, eligible, floor, self.ridge, max_error)
        return removal_order(cap, eligible, floor, self.ridge, max_error, self.block_frac, self.order,
                             self.order_width, self.bucket_size, self.per_step,
                             seed=derive_seed(self.seed, index, scale=EVENT_MIX, weights=(1,)), device=site.device)

    def _removal_plan(self, site: MergeSite, mass, cap: cal.SiteCapture, removed: torch.Tensor, candidates: int,
                      estimated: float | None) -> MergePlan | None:
        """The plan that removes ``removed`` (a prefix of an order, rounded to ``round_to``)."""
        width = site.width
        if self.round_to > 1:  # keep a prefix of the order: a subset of a block never costs more
            removed = removed[:width - self._round(width - len(removed), width)]
        removed = removed[:len(removed) - len(removed) % site.group]  # whole heads (blocks are heads)
        self.last_stats[site.name] = {"candidates": candidates, "removed": int(len(removed)),
                                      "estimated_error": estimated}
        if len(removed) == 0:
            return None
        keep = torch.ones(width, dtype=torch.bool)
        keep[removed] = False
        dev = site.device
        if self.representative == "keep":
            return prune_plan(site, keep.to(dev))
        labels = nearest_survivor(cap, keep)
        return merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev))

    def _prepare(self, model, sites: list[MergeSite], calib: torch.Tensor,
                 overrides: Mapping[str, Mapping[str, Any]] | None) -> None:
        """Order every site's removals on the network before this rehash when ``budget=global``
        (then spend one budget across them: :func:`hashexp.merge.budget.allocate`) or
        ``batch_sites`` (all orders in one batched call per group of equal shapes)."""
        self._global_removed, self._site_orders = {}, {}
        glob = self.budget == "global"
        if self.compensation != "lsq" or not sites or not (glob or self.batch_sites):
            return
        if glob:  # the FLOPs target of this rehash first: a plan that keeps everything orders nothing
            widths, layers, flops, keep = self._global_target(model, sites, calib)
            if keep is not None and keep >= 1.0:
                self._global_removed = {s.name: (torch.zeros(0, dtype=torch.long), 0) for s in sites}
                self.last_budget = {"blocks": {s.name: 0 for s in sites}, "flops_per_neuron": flops,
                                    "keep_flops": keep, "error_spent": 0.0}
                return
        index_of = {s.name: i for i, s in enumerate(model_sites(model))}
        caps, eligibles, floors, errors, candidates = [], [], [], [], {}
        for site in sites:
            idx = index_of[site.name]
            caps.append(self.measure(model, site, calib, derive_seed(self.seed, idx, scale=SITE_MIX, weights=(1,))))
            with self._overridden(self._site_knobs(site.name, overrides)):
                saved = self.target_ratio
                if glob:
                    self.target_ratio = None  # the ratio is global here
                try:
                    t = self.target(site)
                    floors.append(max(self._min_width(site), t if t is not None else 0))
                    eligibles.append(self.eligible(site, idx, caps[-1]))
                    errors.append(None if glob else self.max_error)
                finally:
                    self.target_ratio = saved
            candidates[site.name] = int(eligibles[-1].sum())
        found = [None] * len(sites)
        flat = [i for i, site in enumerate(sites) if site.group == 1] if self.batch_sites else []
        if flat:  # attention heads (group > 1) keep their own whole-head order
            batched = stage_removal_orders([caps[i] for i in flat], [eligibles[i] for i in flat],
                                           [floors[i] for i in flat], self.ridge, [errors[i] for i in flat],
                                           self.block_frac, self.per_step, device=sites[0].device)
            for i, o in zip(flat, batched):
                found[i] = o
        for i, site in enumerate(sites):
            if found[i] is None:
                found[i] = self._order(site, index_of[site.name], caps[i], eligibles[i], floors[i], None)
        orders = {site.name: o for site, o in zip(sites, found)}
        if not glob:
            self._site_orders = {site.name: (o, el) for site, o, el in zip(sites, found, eligibles)}
            return
        weights = site_weights(sites, self.global_weight)
        take = allocate(orders, flops, widths, self.max_error, keep, layers, weights)
        self._global_removed = {n: (orders[n].removed(k), candidates[n]) for n, k in take.items()}
        self.last_budget = {"blocks": take, "flops_per_neuron": flops, "keep_flops": keep,
                            "error_spent": spent_error(orders, take, weights), "weights": weights}

    def _global_target(self, model, sites: list[MergeSite], calib: torch.Tensor):
        """``budget=global``: the sites' widths, their layers' FLOPs, the FLOPs of one neuron of each,
        and the share of the layers' FLOPs this rehash keeps (``target_ratio``, or the ``flops_plan``
        run's FLOPs after the same rehash; None: only the error budget)."""
        widths = {site.name: site.width for site in sites}
        layers = layer_flops(model, sites, example_input(calib))
        keep = self.target_ratio
        if self.flops_plan is not None:
            plan = self.flops_plan
            keep = planned_keep(layers, widths, plan[self.calls] if self.calls < len(plan) else None)
        return widths, layers, neuron_flops(layers, widths), keep

    def eligible(self, site: MergeSite, index: int, cap: cal.SiteCapture) -> torch.Tensor:
        """(width,) bool: neurons in at least one candidate pair (that passes the pre-filter)."""
        width = site.width
        candidates = self.candidates
        if candidates == "auto" or (site.group > 1 and candidates == "activations"):
            # attention heads are few (4-16): below the crossover every pair is listed, as with auto
            candidates = "exact" if width // site.group < self.crossover(min(cap.inputs[0].shape[0], _MAX_SIGNATURE)) \
                else "activations"
        self.last_candidates = candidates
        if candidates == "exact" and self.threshold is None:
            return torch.ones(width, dtype=torch.bool)
        g = site.group
        if g > 1:  # attention heads: each head's output block is one vector (weights: its q/k/v rows)
            v = head_vectors(cap.inputs[0], g) if candidates == "activations" else \
                site.neuron_vectors().cpu().float().reshape(width // g, -1)
        elif candidates == "activations":
            x = cap.inputs[0]
            if x.shape[0] > _MAX_SIGNATURE:  # rows are samples (or sampled positions): a fixed subset
                x = x[torch.linspace(0, x.shape[0] - 1, _MAX_SIGNATURE).long()]
            v = (x - x.mean(0)).T.contiguous().float()
        else:
            v = self.hash_vectors(site).cpu().float()
        u = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if candidates == "exact":
            pairs = _exact_pairs(u, self.threshold)
        else:
            pairs = self.candidate_pairs(site, index, u)
            if self.threshold is not None and len(pairs):
                pairs = pairs[pair_cosines(u, pairs) >= self.threshold]
        out = torch.zeros(width // g, dtype=torch.bool)
        if len(pairs):
            out[torch.as_tensor(pairs, dtype=torch.long).flatten()] = True
        return out.repeat_interleave(g)

    def crossover(self, dim: int) -> int:
        """Width from which ``candidates=auto`` hashes instead of listing all pairs."""
        if self.auto_width is not None:
            return self.auto_width
        from hashexp.lsh.params import crossover_width

        return crossover_width(0.9 if self.threshold is None else self.threshold, dim=dim)

    def _plan_by_cosine(self, site: MergeSite, index: int, mass: torch.Tensor | None) -> MergePlan | None:
        """The data-free path (``compensation=weights/none``): :func:`hashexp.merge.cosine.plan_by_cosine`."""
        return plan_by_cosine(self, site, index, mass)


def _exact_pairs(u: torch.Tensor, threshold: float, block: int = 1024) -> np.ndarray:
    """All pairs i < j with cosine >= ``threshold`` (rows of ``u`` unit), from a blocked Gram."""
    n = u.shape[0]
    out = []
    for i0 in range(0, n, block):
        g = u[i0:i0 + block] @ u.T
        i, j = (g >= threshold).nonzero(as_tuple=True)
        i = i + i0
        sel = i < j
        out.append(torch.stack([i[sel], j[sel]], 1))
    return torch.cat(out).numpy() if out else np.zeros((0, 2), dtype=np.int64)
