"""Compressors: decide a grouping per site, then hand it to the surgery.

``HashCompressor`` is the method: neuron vectors [w; b] -> SimHash fingerprints (or the MIPS
transform for activations that are not positively homogeneous) -> clsh candidate pairs ->
exact cosine check -> greedy agglomeration, most similar pairs first -> every member verified
against its group's representative -> activation-weighted merge. LSH only proposes; the
exact cosine decides.

The baselines share the schedule, the target widths and the surgery:
``MagnitudePruner`` (structured L1 pruning of whole neurons, Li et al. 2017) and
``RandomMerger`` (random groups, merged like the hashed ones). A ``width_plan`` (a hashed run's
metrics.json) makes a baseline hit exactly the widths that run reached at each rehash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError, DataError
from hashexp.merge.sites import MergeSite
from hashexp.merge.surgery import MergePlan, apply_plan, merge_plan, prune_plan

_PAIR_CHUNK = 1 << 18


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
    """

    name = "base"

    def __init__(self, target_ratio: float | None = None, target_width: int | Mapping[str, int] | None = None,
                 min_width: int | Mapping[str, int] = 1, width_plan: str | None = None,
                 sites: list[str] | None = None, seed: int = 0, window: int = 50, name: str | None = None) -> None:
        if target_ratio is not None and not (0.0 < float(target_ratio) <= 1.0):
            raise ConfigError(f"hashing.target_ratio must be in (0, 1], got {target_ratio}")
        if window < 0:
            raise ConfigError(f"hashing.window must be >= 0, got {window}")
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
        return max(min(t, width), self._min_width(site))

    # -------------------------------------------------------------- main entry
    def compress(self, model, names: list[str] | None, stats, optimizer, step: int, dist=None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Compress the named sites of ``model`` in place; returns one report per site.

        ``overrides`` maps a site name to attribute values used for that site only (e.g. a
        per-layer schedule's ``{"fc2": {"threshold": 0.9, "target_ratio": 0.7}}``).
        """
        reports = []
        for idx, site in enumerate(model.merge_sites()):
            if names is not None and site.name not in names:
                continue
            if self.sites is not None and site.name not in self.sites:
                continue
            mass = stats.mass(site.name) if stats is not None else None
            if dist is not None and mass is not None:
                mass = dist.all_reduce_sum(mass)
            before = site.width
            with self._overridden((overrides or {}).get(site.name)):
                plan = self.plan_site(site, idx, mass) if (dist is None or dist.is_main) else None
            if dist is not None:
                plan = dist.broadcast_plan(plan, site)
            if plan is not None and plan.new_width < before:
                apply_plan(site, plan, optimizer)
            reports.append({"site": site.name, "before": before, "after": site.width, "step": step})
        self.calls += 1
        return reports

    def plan_site(self, site: MergeSite, index: int, mass: torch.Tensor | None) -> MergePlan | None:
        raise NotImplementedError

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
                if k == "threshold" and v is not None and not (-1.0 <= float(v) <= 1.0):
                    raise ConfigError(f"threshold must be a cosine in [-1, 1], got {v}")
                if k == "target_ratio" and v is not None and not (0.0 < float(v) <= 1.0):
                    raise ConfigError(f"target_ratio must be in (0, 1], got {v}")
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
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.calls * 1009 + index) % (2**63))


class HashCompressor(Compressor):
    """LSH-proposed, cosine-verified, activation-weighted merging (the hashed network).

    Args:
        threshold: minimum cosine of every member to its group's representative, in [-1, 1].
        bits, tables: K bits per table, L tables of SimHash.
        min_tables: a pair is a candidate when it collides in at least this many tables.
        transform: ``auto`` (SimHash for ReLU-like sites, MIPS otherwise), ``simhash`` or ``mips``.
        max_group_size: largest group (0: unlimited).
        max_rounds: rounds of pairwise merging per rehash (each at most halves the width).
        max_pairs: refuse to verify more candidate pairs than this (raise bits instead).
        other arguments: see :class:`Compressor`.
    """

    name = "simhash"

    def __init__(self, threshold: float = 0.9, bits: int = 8, tables: int = 8, min_tables: int = 1,
                 transform: str = "auto", max_group_size: int = 0, max_pairs: int = 20_000_000,
                 max_rounds: int = 8, n_threads: int = 0, **kw) -> None:
        super().__init__(**kw)
        if not (-1.0 <= float(threshold) <= 1.0):
            raise ConfigError(f"hashing.threshold must be a cosine in [-1, 1], got {threshold}")
        if transform not in ("auto", "simhash", "mips"):
            raise ConfigError(f"hashing.transform={transform!r}; choose auto, simhash or mips")
        if not (1 <= int(bits) <= 64):
            raise ConfigError(f"hashing.bits must be in 1..64, got {bits}")
        if int(tables) < 1 or not (1 <= int(min_tables) <= int(tables)):
            raise ConfigError(f"hashing.tables must be >= 1 and 1 <= min_tables <= tables, got {tables}, {min_tables}")
        if max_group_size < 0:
            raise ConfigError(f"hashing.max_group_size must be >= 0 (0: unlimited), got {max_group_size}")
        self.threshold = float(threshold)
        self.bits, self.tables, self.min_tables = int(bits), int(tables), int(min_tables)
        self.transform = transform
        self.max_group_size = int(max_group_size)
        self.max_pairs = int(max_pairs)
        if int(max_rounds) < 1:
            raise ConfigError(f"hashing.max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = int(max_rounds)
        self.n_threads = int(n_threads)
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

    def plan_site(self, site: MergeSite, index: int, mass: torch.Tensor | None) -> MergePlan | None:
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
        t = self.threshold
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
            pairs = self.candidate_pairs(site, index + 7919 * rnd, rep)
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
        dev = site.producers[0].module.weight.device
        return merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev))


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
                             "max_rounds", "n_threads"})


class _Baseline(Compressor):
    def __init__(self, **kw) -> None:
        ignored = {k: kw.pop(k) for k in list(kw) if k in HASH_ONLY_KNOBS}
        super().__init__(**kw)
        self.ignored_knobs = ignored


class MagnitudePruner(_Baseline):
    """Structured L1-norm pruning of whole neurons (Li et al., ICLR 2017), same targets."""

    name = "magnitude"

    def plan_site(self, site: MergeSite, index: int, mass) -> MergePlan | None:
        target = self.target(site)
        if target is None:
            raise ConfigError("hashing=magnitude needs hashing.target_ratio, hashing.target_width or hashing.width_plan")
        if target >= site.width:
            return None
        score = site.neuron_vectors().abs().sum(1)
        keep = torch.topk(score, target).indices
        return prune_plan(site, keep)


class RandomMerger(_Baseline):
    """Random groups of near-equal size, merged with the same activation-weighted rule."""

    name = "random"

    def plan_site(self, site: MergeSite, index: int, mass) -> MergePlan | None:
        target = self.target(site)
        if target is None:
            raise ConfigError("hashing=random needs hashing.target_ratio, hashing.target_width or hashing.width_plan")
        width = site.width
        if target >= width:
            return None
        perm = torch.randperm(width, generator=self._generator(index))
        labels = torch.empty(width, dtype=torch.long)
        labels[perm] = torch.arange(width) % target
        dev = site.producers[0].module.weight.device
        return merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev))


def _load_width_plan(path: str) -> list[dict[str, int]]:
    """Widths after each rehash of a finished run, from its metrics.json (or its run dir)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise DataError(f"hashing.width_plan={path}: file not found; pass a hashed run's metrics.json or run dir")
    try:
        with open(path) as f:
            m = json.load(f)
        return [{k: int(v) for k, v in e["after"].items()} for e in m["rehash_events"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"hashing.width_plan={path}: not a hashexp metrics.json with rehash_events ({e})") from None
