"""Compressors: decide a grouping per site, then hand it to the surgery.

``HashCompressor`` is the method. With ``compensation=lsq`` (the default) LSH proposes, data
decides and least squares absorbs (hashexp/merge/calibration.py):

1. candidates: SimHash of each neuron's centred calibration activations (``activations``:
   neurons that fire together), of its weights [w; b] (``weights``), or all pairs (``exact``,
   the ablation that shows what hashing changed); an optional cosine pre-filter (``threshold``);
2. every neuron in a candidate pair may go; they go cheapest first by the measured error of the
   consumers' pre-activation after a least-squares refit (structured OBS costs on the
   calibration set), until the site's error budget ``max_error`` or its target width is reached;
3. representatives: ``keep`` leaves each survivor unchanged, ``mean`` replaces it by the
   activation-weighted mean of its group (each removed neuron joins its most correlated
   survivor);
4. the consumers are refit by ridge least squares on the calibration set, in forward order.

With ``compensation=weights`` it is the data-free rule of the first version: SimHash of
[w; b] -> clsh candidate pairs -> exact cosine -> greedy agglomeration, most similar first ->
every member verified against its representative -> activation-weighted merge with the s_i c_i
/ s_r consumer scaling; ``none`` drops the folded members' columns.

The baselines share the schedule, the target widths, the compensation and the surgery:
``MagnitudePruner`` (structured L1 pruning of whole neurons, Li et al. 2017), ``RandomMerger``
(random groups) and ``NeuronMerging`` (Kim et al., NeurIPS 2020). A ``width_plan`` (a hashed
run's metrics.json) makes a baseline hit exactly the widths that run reached at each rehash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError, DataError
from hashexp.merge import calibration as cal
from hashexp.merge.budget import allocate, check_budget, neuron_flops
from hashexp.merge.order import check_order_knobs, removal_order
from hashexp.merge.pull import PullConfig
from hashexp.merge.sites import MergeSite
from hashexp.merge.surgery import (MergePlan, apply_consumers, apply_producers, merge_plan, prune_plan,
                                   refit_consumer)
from hashexp.utils.checks import check_at_least, check_cosine, check_fraction
from hashexp.utils.seeding import P1000003, P1009, P7919, derive_seed

_PAIR_CHUNK = 1 << 18
COMPENSATIONS = ("lsq", "weights", "none")
CANDIDATES = ("activations", "weights", "exact", "auto")
REPRESENTATIVES = ("keep", "mean")
#: member-to-representative cosine of the data-free path when hashing.threshold is null
WEIGHTS_THRESHOLD = 0.7
#: calibration rows used as a neuron's activation signature for hashing
_MAX_SIGNATURE = 2048


@dataclass
class SiteReport:
    """What one rehash did to one site: its width before and after, the step, and the measured
    relative error of its consumers' pre-activation on the calibration set (0 without one).

    Indexable like the dicts of older checkpoints (``report["site"]``)."""

    site: str
    before: int
    after: int
    step: int
    error: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.__dataclass_fields__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Compressor:
    """Base class: targets, width plans, the per-site loop, DDP agreement, reports.

    Args:
        target_ratio: keep this fraction of each site's current width at every rehash.
        target_width: final width per site (int for all sites, or a mapping name -> width).
        min_width: never go below this width (int, or a mapping name -> width).
        width_plan: path to a run's metrics.json; rehash k takes that run's widths after its
            rehash k (so baselines match a hashed run exactly).
        sites: restrict compression to these site names (None: all).
        seed: seeds every random choice (hash projections, random groups).
        window: batches of activation statistics kept for representatives.
        round_to: a site that changes ends at a multiple of this width (1: any width); the error
            budget and targets are rounded up, never down, so it costs at most round_to - 1 neurons.
        compensation: how consumers absorb a merge: ``lsq`` (ridge least squares on the
            calibration set), ``weights`` (the data-free s_i c_i / s_r rule) or ``none``.
        calib_samples: training samples in the calibration set, drawn by the trainer with the run
            seed (None: 1024, or the whole split if smaller).
        ridge: ridge of the least-squares fits, relative to the mean feature energy.
        pull: centripetal pull (:mod:`hashexp.merge.pull`): ``{steps, strength, average_grads,
            max_error}``; with ``steps > 0`` a rehash proposes (:meth:`propose`) and the trainer
            merges the pulled groups ``steps`` later (``compress(..., fixed=...)``).
        bn_recalib_batches: after each rehash the trainer re-estimates BatchNorm statistics on this
            many training batches (0: never; None: the trainer's ``bn_recalib_batches``).
        site_overrides: per-site values of these knobs, ``{site: {knob: value}}`` (e.g.
            ``{fc2: {max_error: 0.05, target_ratio: 0.7}}``); a schedule's per-site values
            (``schedule=per_layer``) win over them.
    """

    name = "base"

    def __init__(self, target_ratio: float | None = None, target_width: int | Mapping[str, int] | None = None,
                 min_width: int | Mapping[str, int] = 1, width_plan: str | None = None,
                 sites: list[str] | None = None, seed: int = 0, window: int = 50, name: str | None = None,
                 compensation: str = "lsq", calib_samples: int | None = None, ridge: float = 1e-3,
                 round_to: int = 1, pull: Mapping[str, Any] | None = None,
                 bn_recalib_batches: int | None = None,
                 site_overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        if target_ratio is not None:
            check_fraction("hashing.target_ratio", target_ratio)
        if window < 0:
            raise ConfigError(f"hashing.window must be >= 0, got {window}")
        if compensation not in COMPENSATIONS:
            raise ConfigError(f"hashing.compensation={compensation!r}; choose {', '.join(COMPENSATIONS)}")
        check_at_least("hashing.calib_samples", calib_samples, 1, nullable=True)
        if not (0.0 < float(ridge) < 1.0):
            raise ConfigError(f"hashing.ridge must be in (0, 1), got {ridge}")
        if int(round_to) < 1:
            raise ConfigError(f"hashing.round_to must be an integer >= 1, got {round_to}")
        if bn_recalib_batches is not None and int(bn_recalib_batches) < 0:
            raise ConfigError(f"hashing.bn_recalib_batches must be >= 0, got {bn_recalib_batches}")
        self.bn_recalib_batches = None if bn_recalib_batches is None else int(bn_recalib_batches)
        if site_overrides is not None and not (isinstance(site_overrides, Mapping)
                                               and all(isinstance(v, Mapping) for v in site_overrides.values())):
            raise ConfigError(f"hashing.site_overrides must map site names to {{knob: value}}, got {site_overrides!r}")
        self.site_overrides = {str(k): dict(v) for k, v in (site_overrides or {}).items()}
        self.round_to = int(round_to)
        self.pull = PullConfig.parse(pull)
        self.compensation = compensation
        self.calib_samples = None if calib_samples is None else int(calib_samples)
        self.ridge = float(ridge)
        self.target_ratio = None if target_ratio is None else float(target_ratio)
        self.target_width = dict(target_width) if isinstance(target_width, Mapping) else target_width
        self.min_width = dict(min_width) if isinstance(min_width, Mapping) else int(min_width)
        self.plan = _load_width_plan(width_plan) if width_plan else None
        self.sites = list(sites) if sites else None
        self.seed = int(seed)
        self.window = int(window)
        self.calls = 0
        if name:
            self.name = name

    # -------------------------------------------------------------- targets
    def _min_width(self, site: MergeSite) -> int:
        mw = self.min_width.get(site.name, 1) if isinstance(self.min_width, dict) else self.min_width
        return max(int(mw), int(site.min_width), 1)

    def target(self, site: MergeSite) -> int | None:
        """Width this site should reach now, or None for threshold-only grouping."""
        width = site.width
        t = None
        if self.plan is not None:
            if self.calls >= len(self.plan):
                return width
            t = self.plan[self.calls].get(site.name, width)
        elif self.target_width is not None:
            tw = self.target_width.get(site.name) if isinstance(self.target_width, dict) else self.target_width
            if tw is not None:
                t = int(tw)
                if t < 1:
                    raise ConfigError(f"hashing.target_width for site {site.name} must be >= 1, got {t}")
        if self.target_ratio is not None and self.plan is None:
            r = max(1, int(round(width * self.target_ratio)))
            t = r if t is None else max(t, r)
        if t is None:
            return None
        if t > width and self.plan is None:
            raise ConfigError(f"target width {t} for site {site.name} is above its current width {width}; "
                              f"choose a target <= {width}")
        return self._round(max(min(t, width), self._min_width(site)), width)

    def _round(self, new: int, width: int) -> int:
        """``new`` rounded up to a multiple of ``round_to`` (hardware-friendly widths), at most ``width``."""
        n = self.round_to
        return new if n <= 1 else min(width, -(-new // n) * n)

    # -------------------------------------------------------------- main entry
    def compress(self, model, names: list[str] | None, stats, optimizer, step: int, dist=None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 calib: torch.Tensor | None = None,
                 fixed: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list[SiteReport]:
        """Compress the named sites of ``model`` in place; returns one :class:`SiteReport` per site.

        ``overrides`` maps a site name to attribute values used for that site only (e.g. a
        per-layer schedule's ``{"fc2": {"threshold": 0.9, "target_ratio": 0.7}}``). ``calib``
        holds the calibration inputs (the trainer's fixed samples); ``compensation=lsq`` needs
        them, and with them every report carries the measured relative error of the site's
        consumers (``error``). Sites go in forward order, each measured through the network
        with the earlier sites already merged. Under DDP rank 0 decides and refits; the other
        ranks apply its plan and its least-squares maps, so every rank holds the same network.
        ``fixed`` maps a site name to a pulled proposal (``{"groups", "keep"}``, see
        :meth:`propose`): that site merges exactly those groups into their survivors instead of
        planning anew.
        """
        if self.compensation == "lsq" and calib is None:
            raise ConfigError(f"hashing={self.name} with compensation=lsq needs calibration inputs (calib=...); "
                              "the trainer and hashexp.compress pass them, or choose hashing.compensation=weights")
        main = dist is None or dist.is_main
        reports = []
        sites = model.merge_sites()
        unknown = sorted(set(self.site_overrides) - {s.name for s in sites})
        if unknown:
            raise ConfigError(f"hashing.site_overrides names {unknown}, which are not sites of this model "
                              f"({', '.join(s.name for s in sites)})")
        # the norm after each layer (a consumer of one site is often a producer of another)
        norm_of = {id(p.module): p.norm for s in sites for p in s.producers if p.norm is not None}
        if main and calib is not None:
            self._prepare(model, [s for s in sites if (names is None or s.name in names)
                                  and (self.sites is None or s.name in self.sites)], calib, overrides)
        for idx, site in enumerate(sites):
            if names is not None and site.name not in names:
                continue
            if self.sites is not None and site.name not in self.sites:
                continue
            mass = stats.mass(site.name) if stats is not None else None
            if dist is not None and mass is not None:
                mass = dist.all_reduce_sum(mass)
            before = site.width
            seed = derive_seed(self.seed, idx, scale=P1009, weights=(1,))
            cap = cal.capture_site(model, site, calib, seed) if calib is not None and main else None
            if fixed is not None and site.name in fixed:
                plan = fixed_plan(site, fixed[site.name]["groups"], fixed[site.name]["keep"])
            else:
                with self._overridden(self._site_knobs(site.name, overrides)):
                    plan = self.plan_site(site, idx, mass, cap) if main else None
                if dist is not None:
                    plan = dist.broadcast_plan(plan, site)
            error = 0.0
            if plan is not None and plan.new_width < before:
                apply_producers(site, plan, optimizer)
                if self.compensation == "lsq":
                    maps = self._refit(model, site, plan, cap, calib, seed, optimizer, norm_of) if main else None
                    if dist is not None:
                        maps = dist.broadcast_object(maps)
                        if not main:
                            for cons, (t, c) in zip(site.consumers, maps["maps"]):
                                refit_consumer(cons.module, t.to(cons.module.weight.device),
                                               c.to(cons.module.weight.device), optimizer,
                                               norm_of.get(id(cons.module)))
                    error = maps["error"]
                else:
                    apply_consumers(site, plan, optimizer)
                    if cap is not None:
                        error = _site_error(cap, cal.capture_site(model, site, calib, seed))
                    if dist is not None:
                        error = dist.broadcast_object(error)
            reports.append(SiteReport(site=site.name, before=before, after=site.width, step=step,
                                      error=round(float(error), 6)))
        self.calls += 1
        return reports

    def propose(self, model, names: list[str] | None, stats, step: int, dist=None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None,
                calib: torch.Tensor | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Plan the named sites without merging: ``{site: {"groups", "keep"}}`` for the pull.

        Each site is planned as :meth:`compress` would (with ``pull.max_error`` as the budget
        when set); each neuron the plan removes joins the group of its most correlated survivor
        on the calibration set (``groups``: (width,) group index, ``keep``: (width,) survivors,
        one per group). Sites with nothing to merge are left out. Under DDP rank 0 plans and
        broadcasts.
        """
        main = dist is None or dist.is_main
        out: dict[str, dict[str, torch.Tensor]] = {}
        if main:
            for idx, site in enumerate(model.merge_sites()):
                if (names is not None and site.name not in names) or (self.sites is not None and site.name not in self.sites):
                    continue
                mass = stats.mass(site.name) if stats is not None else None
                cap = cal.capture_site(model, site, calib, derive_seed(self.seed, idx, scale=P1009, weights=(1,))) \
                    if calib is not None else None
                knobs = self._site_knobs(site.name, overrides)
                if self.pull.max_error is not None and hasattr(self, "max_error"):
                    knobs["max_error"] = self.pull.max_error
                with self._overridden(knobs):
                    plan = self.plan_site(site, idx, mass, cap)
                if plan is None or plan.new_width >= site.width:
                    continue
                out[site.name] = proposal_groups(plan, cap)
        if dist is not None:
            out = dist.broadcast_object(out)
        return out

    def _refit(self, model, site: MergeSite, plan: MergePlan, cap: cal.SiteCapture, calib: torch.Tensor,
               seed: int, optimizer, norm_of: Mapping[int, Any]) -> dict[str, Any]:
        """Refit the site's consumers in forward order; returns their maps and the measured error.

        The ridge shrinks toward the plan's weight-rule map (column i -> group labels_i with m_i).
        """
        maps: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(site.consumers)
        keep = plan.labels >= 0
        prior = torch.zeros(plan.new_width, len(plan.labels), dtype=torch.float64)
        cols = keep.nonzero().flatten().cpu()
        prior[plan.labels[keep].cpu(), cols] = plan.m[keep].double().cpu()

        def refit(k: int, module, rows: torch.Tensor) -> None:
            t, c = cal.lsq_map(cap.inputs[k].to(rows.device), rows, self.ridge, prior)
            refit_consumer(module, t.to(rows.device), c.to(rows.device), optimizer, norm_of.get(id(module)))
            maps[k] = (t.cpu(), c.cpu())

        after = cal.capture_site(model, site, calib, seed, before_consumer=refit)
        return {"maps": maps, "error": _site_error(cap, after)}

    def plan_site(self, site: MergeSite, index: int, mass: torch.Tensor | None,
                  capture: cal.SiteCapture | None = None) -> MergePlan | None:
        raise NotImplementedError

    def _prepare(self, model, sites: list[MergeSite], calib: torch.Tensor,
                 overrides: Mapping[str, Mapping[str, Any]] | None) -> None:
        """Called once per rehash (rank 0) before the sites are planned; a global budget plans here."""

    def _finish(self, plan: MergePlan | None) -> MergePlan | None:
        """``compensation=none``: consumer columns of a group are summed unscaled (m = 1)."""
        if plan is not None and self.compensation == "none":
            plan.m = (plan.labels >= 0).to(plan.m.dtype)
        return plan

    def _site_knobs(self, name: str, overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
        """This site's knob values: ``hashing.site_overrides``, then the schedule's on top."""
        return {**self.site_overrides.get(name, {}), **dict((overrides or {}).get(name) or {})}

    @contextmanager
    def _overridden(self, values: Mapping[str, Any] | None):
        """Temporarily set per-site knobs (threshold, target_ratio, target_width, ...)."""
        if not values:
            yield
            return
        unknown = [k for k in values if not hasattr(self, k)]
        if unknown:
            raise ConfigError(f"per-site override(s) {unknown} are not knobs of hashing={self.name}")
        saved = {k: getattr(self, k) for k in values}
        try:
            for k, v in values.items():
                if k == "threshold" and v is not None:
                    check_cosine("threshold", v)
                if k == "target_ratio" and v is not None:
                    check_fraction("target_ratio", v)
                setattr(self, k, v)
            yield
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.calls, index, scale=P1000003,
                                                         weights=(P1009, 1), modulus=2**63))


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
            whole width), ``restricted`` (OBS inside LSH buckets of ``bucket_size`` neurons,
            linear in width) or ``auto`` (restricted from ``order_width`` neurons on).
        order_width, bucket_size, per_step: see ``order``; ``per_step`` neurons leave each bucket
            per factorization update.
        budget: ``site`` (every site stops at ``max_error`` and keeps ``target_ratio`` of its
            width) or ``global`` (:mod:`hashexp.merge.budget`: one error budget of
            ``n_sites * max_error^2`` and, with ``target_ratio``, one FLOPs ratio across all
            sites, spent cheapest error per saved FLOP first; ``compensation=lsq`` only).
        other arguments: see :class:`Compressor`.
    """

    name = "simhash"

    def __init__(self, threshold: float | None = None, bits: int = 8, tables: int = 8, min_tables: int = 1,
                 transform: str = "auto", max_group_size: int = 0, max_pairs: int = 20_000_000,
                 max_rounds: int = 8, n_threads: int = 0, candidates: str = "activations",
                 representative: str | None = None, max_error: float | None = None, block_frac: float = 0.01,
                 auto_width: int | None = None, order: str = "exact", order_width: int | None = None,
                 bucket_size: int = 128, per_step: int = 8, budget: str = "site", **kw) -> None:
        super().__init__(**kw)
        self.budget = check_budget(budget)
        self._global_removed: dict[str, tuple[torch.Tensor, int]] = {}
        check_order_knobs(order, order_width, bucket_size, per_step)
        self.order, self.order_width = order, None if order_width is None else int(order_width)
        self.bucket_size, self.per_step = int(bucket_size), int(per_step)
        check_cosine("hashing.threshold", threshold, nullable=True)
        if transform not in ("auto", "simhash", "mips"):
            raise ConfigError(f"hashing.transform={transform!r}; choose auto, simhash or mips")
        if not (1 <= int(bits) <= 64):
            raise ConfigError(f"hashing.bits must be in 1..64, got {bits}")
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

    def hash_vectors(self, site: MergeSite) -> torch.Tensor:
        x = site.neuron_vectors()
        use_mips = self.transform == "mips" or (self.transform == "auto" and not site.homogeneous)
        if use_mips:
            from hashexp.lsh import mips_transform

            x = mips_transform(x)
        return x

    def make_hasher(self, site: MergeSite, index: int, dim: int):
        from hashexp.lsh import SimHash

        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator(index)))
        return SimHash(dim, self.bits, self.tables, seed=seed)

    def candidate_pairs(self, site: MergeSite, index: int, x: torch.Tensor) -> np.ndarray:
        import clsh

        hasher = self.make_hasher(site, index, x.shape[1])
        codes = hasher.fingerprint(x.detach().cpu())
        t = clsh.LSHTables(self.tables, n_threads=self.n_threads)
        t.build(codes)
        return t.candidate_pairs(self.min_tables)

    def plan_site(self, site: MergeSite, index: int, mass: torch.Tensor | None,
                  capture: cal.SiteCapture | None = None) -> MergePlan | None:
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
        eligible = self.eligible(site, index, cap)
        order = self._order(site, index, cap, eligible, floor, self.max_error)
        nb = len(order.blocks)
        if self.max_error is not None:
            while nb > 0 and order.rel_error(nb) > self.max_error:
                nb -= 1
        return self._removal_plan(site, mass, cap, order.removed(nb), int(eligible.sum()), order.rel_error(nb))

    def _order(self, site: MergeSite, index: int, cap: cal.SiteCapture, eligible: torch.Tensor, floor: int,
               max_error: float | None):
        return removal_order(cap, eligible, floor, self.ridge, max_error, self.block_frac, self.order,
                             self.order_width, self.bucket_size, self.per_step,
                             seed=derive_seed(self.seed, index, scale=P7919, weights=(1,)))

    def _removal_plan(self, site: MergeSite, mass, cap: cal.SiteCapture, removed: torch.Tensor, candidates: int,
                      estimated: float | None) -> MergePlan | None:
        """The plan that removes ``removed`` (a prefix of an order, rounded to ``round_to``)."""
        width = site.width
        if self.round_to > 1:  # keep a prefix of the order: a subset of a block never costs more
            removed = removed[:width - self._round(width - len(removed), width)]
        self.last_stats[site.name] = {"candidates": candidates, "removed": int(len(removed)),
                                      "estimated_error": estimated}
        if len(removed) == 0:
            return None
        keep = torch.ones(width, dtype=torch.bool)
        keep[removed] = False
        dev = site.device
        if self.representative == "keep":
            return prune_plan(site, keep.to(dev))
        labels = _nearest_survivor(cap, keep)
        return merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev))

    def _prepare(self, model, sites: list[MergeSite], calib: torch.Tensor,
                 overrides: Mapping[str, Mapping[str, Any]] | None) -> None:
        """``budget=global``: order every site's removals on the network before this rehash, then
        spend one budget across them (:func:`hashexp.merge.budget.allocate`)."""
        self._global_removed = {}
        if self.budget != "global" or self.compensation != "lsq" or not sites:
            return
        index_of = {s.name: i for i, s in enumerate(model.merge_sites())}
        orders, widths, candidates = {}, {}, {}
        for site in sites:
            idx = index_of[site.name]
            cap = cal.capture_site(model, site, calib, derive_seed(self.seed, idx, scale=P1009, weights=(1,)))
            with self._overridden(self._site_knobs(site.name, overrides)):
                saved, self.target_ratio = self.target_ratio, None  # the ratio is global here
                try:
                    t = self.target(site)
                    floor = max(self._min_width(site), t if t is not None else 0)
                    eligible = self.eligible(site, idx, cap)
                    candidates[site.name] = int(eligible.sum())
                    orders[site.name] = self._order(site, idx, cap, eligible, floor, None)
                finally:
                    self.target_ratio = saved
            widths[site.name] = site.width
        flops = neuron_flops(model, sites, calib)
        take = allocate(orders, flops, widths, self.max_error, self.target_ratio)
        self._global_removed = {n: (orders[n].removed(k), candidates[n]) for n, k in take.items()}
        self.last_budget = {"blocks": take, "flops_per_neuron": flops}

    def eligible(self, site: MergeSite, index: int, cap: cal.SiteCapture) -> torch.Tensor:
        """(width,) bool: neurons in at least one candidate pair (that passes the pre-filter)."""
        width = site.width
        candidates = self.candidates
        if candidates == "auto":
            candidates = "exact" if width < self.crossover(min(cap.inputs[0].shape[0], _MAX_SIGNATURE)) \
                else "activations"
        self.last_candidates = candidates
        if candidates == "exact" and self.threshold is None:
            return torch.ones(width, dtype=torch.bool)
        if candidates == "activations":
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
                pairs = pairs[_pair_cosines(u, pairs) >= self.threshold]
        out = torch.zeros(width, dtype=torch.bool)
        if len(pairs):
            out[torch.as_tensor(pairs, dtype=torch.long).flatten()] = True
        return out

    def crossover(self, dim: int) -> int:
        """Width from which ``candidates=auto`` hashes instead of listing all pairs."""
        if self.auto_width is not None:
            return self.auto_width
        from hashexp.lsh.params import crossover_width

        return crossover_width(0.9 if self.threshold is None else self.threshold, dim=dim)

    def _plan_by_cosine(self, site: MergeSite, index: int, mass: torch.Tensor | None) -> MergePlan | None:
        """Group the site's neurons in rounds of greedy pairwise merging, most similar first.

        Each round hashes the current group representatives, verifies the candidate pairs by
        exact cosine, merges a greedy matching of the best pairs (each group joins at most one
        other, so chains of merely-adjacent neurons never snowball into one group), then
        verifies every member against its new representative. Rounds repeat until the target
        width is met or nothing passes the threshold; each round at most halves the width.
        """
        import clsh

        width = site.width
        target = self.target(site)
        floor = self._min_width(site)
        if width <= floor or (target is not None and target >= width):
            return None
        goal = floor if target is None else max(target, floor)
        x = self.hash_vectors(site).cpu()
        u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        a = mass.detach().float().cpu() if mass is not None else torch.ones(width)
        a = a.clamp_min(0) + a.abs().max().clamp_min(1.0) * 1e-6
        t = WEIGHTS_THRESHOLD if self.threshold is None else self.threshold
        # Two equally weighted members with cosine c sit at cosine sqrt((1 + c) / 2) from their
        # representative, so a pair can only pass verification if c >= 2 t^2 - 1.
        pair_floor = 2 * t * t - 1 if t > 0 else -1.0
        labels = torch.arange(width)
        stats = {"candidates": 0, "verified_pairs": 0, "rounds": 0}
        for rnd in range(self.max_rounds):
            g = int(labels.max()) + 1
            if g <= goal:
                break
            rep = torch.zeros(g, u.shape[1]).index_add_(0, labels, a[:, None] * u)
            rep = rep / rep.norm(dim=1, keepdim=True).clamp_min(1e-12)
            size = torch.bincount(labels, minlength=g)
            pairs = self.candidate_pairs(site, derive_seed(index, rnd, weights=(P7919,)), rep)
            if len(pairs) > self.max_pairs:
                raise ConfigError(f"site {site.name}: {len(pairs)} candidate pairs exceed hashing.max_pairs="
                                  f"{self.max_pairs}; raise hashing.bits or hashing.min_tables")
            cos = _pair_cosines(rep, pairs)
            ok = cos >= pair_floor
            if self.max_group_size:
                pt = torch.as_tensor(pairs, dtype=torch.long)
                ok &= ((size[pt[:, 0]] + size[pt[:, 1]]) <= self.max_group_size).numpy() if len(pt) else ok
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
        self.last_stats[site.name] = stats
        if stats["groups"] >= width:
            return None
        dev = site.device
        return merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev), self.representative)


def proposal_groups(plan: MergePlan, cap: cal.SiteCapture | None) -> dict[str, torch.Tensor]:
    """A plan as pull groups: ``groups`` (width,) in [0, new_width), ``keep`` one survivor per group.

    A pruning plan (dropped neurons labelled -1) sends each dropped neuron to its most correlated
    survivor on the calibration set; a merge plan keeps its groups, with the lowest index of each
    group as its survivor.
    """
    labels = plan.labels.cpu()
    if (labels < 0).any():
        if cap is None:
            raise ConfigError("a pruning plan needs calibration activations to form pull groups")
        keep = labels >= 0
        return {"groups": _nearest_survivor(cap, keep), "keep": keep}
    width = len(labels)
    first = torch.full((plan.new_width,), width, dtype=torch.long).scatter_reduce(
        0, labels, torch.arange(width), reduce="amin")
    keep = torch.zeros(width, dtype=torch.bool)
    keep[first] = True
    return {"groups": labels.clone(), "keep": keep}


def fixed_plan(site: MergeSite, groups: torch.Tensor, keep: torch.Tensor) -> MergePlan:
    """Merge each group into its survivor: the survivor's producer rows stay, the group's consumer
    columns add up (exact when the pull made the members equal); lsq then refits the consumers."""
    dev = site.device
    groups = torch.as_tensor(groups, dtype=torch.long, device=dev)
    keep = torch.as_tensor(keep, dtype=torch.bool, device=dev)
    if groups.shape != (site.width,) or keep.shape != (site.width,):
        raise ValueError(f"site {site.name}: pull groups have shape {tuple(groups.shape)}, the site has width {site.width}")
    n = int(groups.max()) + 1
    if int(torch.bincount(groups[keep], minlength=n).min()) != 1 or int(keep.sum()) != n:
        raise ValueError(f"site {site.name}: every pull group needs exactly one survivor")
    r = keep.float()
    return MergePlan(labels=groups, r=r, m=torch.ones_like(r), a=r.clone(), new_width=n)


def _nearest_survivor(cap: cal.SiteCapture, keep: torch.Tensor) -> torch.Tensor:
    """Group labels: each survivor its own group, each removed neuron in its most correlated survivor's."""
    g = cal.centred_gram(cap.inputs[0])
    d = g.diagonal().clamp_min(1e-30).sqrt()
    corr = g / d[:, None] / d[None, :]
    kept = keep.nonzero().flatten()
    labels = torch.full((len(keep),), -1, dtype=torch.long)
    labels[kept] = torch.arange(len(kept))
    gone = (~keep).nonzero().flatten()
    if len(gone):
        labels[gone] = corr[gone][:, kept].argmax(1)
    return labels


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


def _site_error(old: cal.SiteCapture, new: cal.SiteCapture) -> float:
    """Relative pre-activation error over all consumers of a site (centred, energy-weighted)."""
    num = den = 0.0
    for yo, yn in zip(old.outputs, new.outputs):
        yo, yn = yo.double(), yn.double()
        d = yn - yo
        num += float(((d - d.mean(0)) ** 2).sum())
        den += float(((yo - yo.mean(0)) ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def _pair_cosines(u: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
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


#: knobs of the hashed compressor that baselines accept and ignore, so one preset can switch
#: between hashing=simhash and hashing=magnitude/random with a single override
HASH_ONLY_KNOBS = frozenset({"threshold", "bits", "tables", "min_tables", "transform", "max_group_size", "max_pairs",
                             "max_rounds", "n_threads", "candidates", "representative", "max_error", "block_frac",
                             "auto_width", "order", "order_width", "bucket_size", "per_step", "budget"})


class _Baseline(Compressor):
    """Target-driven baselines; their classic form compensates by the weight rule."""

    own_knobs: frozenset = frozenset()

    def __init__(self, compensation: str = "weights", **kw) -> None:
        ignored = {k: kw.pop(k) for k in list(kw) if k in HASH_ONLY_KNOBS and k not in self.own_knobs}
        super().__init__(compensation=compensation, **kw)
        self.ignored_knobs = ignored

    def _target_or_fail(self, site: MergeSite) -> int | None:
        target = self.target(site)
        if target is None:
            raise ConfigError(f"hashing={self.name} needs hashing.target_ratio, hashing.target_width or hashing.width_plan")
        return None if target >= site.width else target


class MagnitudePruner(_Baseline):
    """Structured L1-norm pruning of whole neurons (Li et al., ICLR 2017), same targets.

    With ``compensation=lsq`` the survivors' consumers are refit on the calibration set, which
    separates *which* neurons go from *how* the survivors compensate.
    """

    name = "magnitude"

    def plan_site(self, site: MergeSite, index: int, mass, capture=None) -> MergePlan | None:
        target = self._target_or_fail(site)
        if target is None:
            return None
        score = site.neuron_vectors().abs().sum(1)
        keep = torch.topk(score, target).indices
        return prune_plan(site, keep)


class RandomMerger(_Baseline):
    """Random groups of near-equal size, merged with the same activation-weighted rule."""

    name = "random"

    def plan_site(self, site: MergeSite, index: int, mass, capture=None) -> MergePlan | None:
        target = self._target_or_fail(site)
        if target is None:
            return None
        width = site.width
        perm = torch.randperm(width, generator=self._generator(index))
        labels = torch.empty(width, dtype=torch.long)
        labels[perm] = torch.arange(width) % target
        dev = site.device
        return self._finish(merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev)))


class NeuronMerging(_Baseline):
    """Neuron Merging (Kim et al., NeurIPS 2020): prune by L1, fold each pruned neuron into a survivor.

    Data-free. The survivors are the ``target`` neurons with the largest L1 norm of [w; b]
    (BN folded in for conv+BN sites). Each pruned neuron j goes to the survivor i whose
    direction is most cosine-similar; when that cosine reaches ``threshold`` its consumer
    column is added to i's, scaled by the norm ratio |p_j| / |p_i| (exact when p_j is a positive
    multiple of p_i and the activation is ReLU-like), otherwise it is dropped.

    Args:
        threshold: the cosine a pruned neuron needs to its survivor to be merged (the paper
            tunes it per architecture).
        other arguments: see :class:`Compressor`.
    """

    name = "neuron_merging"
    own_knobs = frozenset({"threshold"})

    def __init__(self, threshold: float | None = 0.45, **kw) -> None:
        super().__init__(**kw)
        check_cosine("hashing.threshold", threshold, note=" for neuron_merging")
        self.threshold = float(threshold)

    def plan_site(self, site: MergeSite, index: int, mass, capture=None) -> MergePlan | None:
        if self.compensation == "weights" and not site.homogeneous:
            raise ConfigError(f"site {site.name} ({site.activation}): neuron_merging folds neurons by a positive "
                              "scale, which needs a ReLU-like activation; use hashing.compensation=lsq")
        target = self._target_or_fail(site)
        if target is None:
            return None
        p = site.neuron_vectors()
        labels, m, survivor = neuron_merging_coefficients(p, target, self.threshold)
        one = survivor.to(p.device, p.dtype)
        return self._finish(MergePlan(labels=labels.to(p.device), r=one, m=m.to(p.device), a=one, new_width=target))


def neuron_merging_coefficients(p: torch.Tensor, keep: int, threshold: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, consumer coefficients and survivor mask of Neuron Merging for neuron vectors ``p`` (width, D).

    Survivors: the ``keep`` largest L1 norms, labelled 0..keep-1 in index order with m = 1.
    Pruned neuron j: label of its most cosine-similar survivor i and m_j = |p_j| / |p_i| when the
    cosine is >= ``threshold``; label -1 (dropped) otherwise.
    """
    width = p.shape[0]
    keep_idx = torch.topk(p.abs().sum(1), keep).indices.sort().values
    labels = torch.full((width,), -1, dtype=torch.long)
    labels[keep_idx] = torch.arange(keep)
    m = torch.zeros(width, dtype=p.dtype)
    m[keep_idx] = 1.0
    norm = p.norm(dim=1).clamp_min(1e-12)
    u = p / norm[:, None]
    gone = (labels < 0).nonzero().flatten()
    if len(gone):
        cos = u[gone] @ u[keep_idx].T
        best, arg = cos.max(1)
        ok = best >= threshold
        partner = keep_idx[arg]
        labels[gone[ok]] = arg[ok]
        m[gone[ok]] = norm[gone[ok]] / norm[partner[ok]]
    survivor = torch.zeros(width, dtype=torch.bool)
    survivor[keep_idx] = True
    return labels, m, survivor


def _load_width_plan(path: str) -> list[dict[str, int]]:
    """Widths after each rehash of a finished run, from its metrics.json (or its run dir); for a run
    with the centripetal pull, the widths each rehash proposed (so a baseline reaches them at the
    same decisions, without the pull's delay)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise DataError(f"hashing.width_plan={path}: file not found; pass a hashed run's metrics.json or run dir")
    try:
        with open(path) as f:
            m = json.load(f)
        events = m["rehash_events"]
        if any("proposed" in e for e in events):
            # a pulled run: its k-th decision proposed these widths (merged `pull.steps` later)
            return [{k: int(v) for k, v in e["proposed_width"].items()} for e in events if "proposed" in e]
        return [{k: int(v) for k, v in e["after"].items()} for e in events]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"hashing.width_plan={path}: not a hashexp metrics.json with rehash_events ({e})") from None
