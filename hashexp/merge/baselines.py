"""The baselines: the classic alternatives, with the same schedule, targets, compensation and surgery.

They follow their papers: every site is scored on the network before the compression step and all
are cut at once (``scoring=original``; ``sequential`` is hashexp's behaviour before issue 22);
tests/test_baselines_reference.py checks them against numpy references of the papers' equations.

``MagnitudePruner`` (structured L1 pruning of whole neurons, Li et al. 2017), ``RandomMerger``
(random groups) and ``NeuronMerging`` (Kim et al., NeurIPS 2020, its plain and Conv-BN rules in
:mod:`hashexp.merge.neuron_merging`). A ``width_plan`` (a hashed run's metrics.json) makes a
baseline hit exactly the widths that run reached at each rehash.
"""

from __future__ import annotations

import torch

from hashexp.errors import ConfigError
from hashexp.merge.compressor import Compressor
from hashexp.merge.heads import keep_groups
from hashexp.merge.neuron_merging import (BN_RULES, bn_statistics, conv_bn_merging_coefficients,
                                          neuron_merging_coefficients)
from hashexp.merge.sites import MergeSite
from hashexp.merge.surgery import MergePlan, merge_plan, prune_plan
from hashexp.utils.checks import check_cosine


#: knobs of the hashed compressor that baselines accept and ignore, so one preset can switch
#: between hashing=simhash and hashing=magnitude/random with a single override
HASH_ONLY_KNOBS = frozenset({"threshold", "bits", "tables", "min_tables", "transform", "max_group_size", "max_pairs",
                             "max_rounds", "n_threads", "candidates", "representative", "max_error", "block_frac",
                             "auto_width", "order", "order_width", "bucket_size", "per_step", "budget"})


#: how baselines score a compression step's sites: on the network before the step (the papers) or
#: each site after the upstream sites were cut (hashexp before issue 22)
SCORINGS = ("original", "sequential")


class _Baseline(Compressor):
    """Target-driven baselines; their classic form compensates by the weight rule.

    Args:
        scoring: ``original`` (the papers: every site's scores, cosine matches and norm ratios
            come from the network as it was before this compression step, and all sites are cut
            at once) or ``sequential`` (each site is scored after the sites upstream of it were
            cut, so its producers have already lost their input columns).
        other arguments: see :class:`Compressor`.
    """

    own_knobs: frozenset = frozenset()

    def __init__(self, compensation: str = "weights", scoring: str = "original", **kw) -> None:
        ignored = {k: kw.pop(k) for k in list(kw) if k in HASH_ONLY_KNOBS and k not in self.own_knobs}
        super().__init__(compensation=compensation, **kw)
        if scoring not in SCORINGS:
            raise ConfigError(f"hashing.scoring={scoring!r}; choose original (score every site on the network "
                              "before this compression step, as the papers do) or sequential (score each site "
                              "after the sites upstream of it were cut)")
        self.scoring = scoring
        self.ignored_knobs = ignored
        self._before: dict[str, dict[str, torch.Tensor]] = {}

    def before_compress(self, sites: list[MergeSite] | None) -> None:
        """``scoring=original``: record each site's weight rows before any site of this step changes."""
        self._before = {} if sites is None or self.scoring != "original" else {
            s.name: {"raw": producer_vectors(s), "folded": s.neuron_vectors()} for s in sites}

    def vectors(self, site: MergeSite, kind: str) -> torch.Tensor:
        """(width, D) rows of the site's neurons: ``raw`` (each producer's own [w; b]) or ``folded``
        ([w; b] with the norm folded in), as recorded before this step (``original``) or now."""
        rec = self._before.get(site.name)
        if rec is None:
            return producer_vectors(site) if kind == "raw" else site.neuron_vectors()
        if rec[kind].shape[0] != site.width:
            raise RuntimeError(f"site {site.name}: recorded {rec[kind].shape[0]} neurons before this step, "
                               f"it has {site.width}; a site changed before it was planned")
        return rec[kind]

    def _target_or_fail(self, site: MergeSite) -> int | None:
        target = self.target(site)
        if target is None:
            raise ConfigError(f"hashing={self.name} needs hashing.target_ratio, hashing.target_width or hashing.width_plan")
        return None if target >= site.width else target


def producer_vectors(site: MergeSite) -> torch.Tensor:
    """(width, D): each neuron's own [w; b] over all producers, norms *not* folded in.

    Li et al. (2017) rank a conv filter by the sum of its absolute kernel weights and Kim et al.
    (2020) a Linear neuron by the L1 norm of [w; b]; a BatchNorm after the layer is not part of
    either score (a bias-free conv contributes b = 0).
    """
    parts = []
    for p in site.producers:
        if p.parts > 1:  # a fused q/k/v projection: each channel's rows of every part (no norm)
            w, b = p.folded()
            parts += [w, b]
            continue
        w = p.module.weight.detach().flatten(1)
        b = p.module.bias.detach() if p.module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                                 device=w.device)
        parts += [w, b[:, None]]
    return torch.cat(parts, dim=1).float()


class MagnitudePruner(_Baseline):
    """Structured L1-norm pruning of whole neurons (Li et al., ICLR 2017), same targets.

    A neuron's score is the L1 norm of its producers' own [w; b] (kernel weights for a bias-free
    conv; a BatchNorm is not folded in), on the network before this compression step
    (``scoring=original``): the ``target`` largest stay, every site is cut at once.
    With ``compensation=lsq`` the survivors' consumers are refit on the calibration set, which
    separates *which* neurons go from *how* the survivors compensate.
    """

    name = "magnitude"

    def plan_site(self, site: MergeSite, index: int, mass, capture=None) -> MergePlan | None:
        """Keep the ``target`` neurons with the largest L1 norm of [w; b]."""
        target = self._target_or_fail(site)
        if target is None:
            return None
        score = self.vectors(site, "raw").abs().sum(1)
        if site.group > 1:  # attention heads: a head's score is the L1 norm of its q/k/v rows
            return prune_plan(site, keep_groups(score, site.group, target))
        keep = torch.topk(score, target).indices
        return prune_plan(site, keep)


class RandomMerger(_Baseline):
    """Random groups of near-equal size, merged with the same activation-weighted rule (its
    directions and norms from the network before this step with ``scoring=original``)."""

    name = "random"

    def plan_site(self, site: MergeSite, index: int, mass, capture=None) -> MergePlan | None:
        """Random groups of near-equal size, ``target`` of them, merged activation-weighted."""
        target = self._target_or_fail(site)
        if target is None:
            return None
        width = site.width
        if site.group > 1:  # attention heads are never averaged: random heads stay
            score = torch.rand(width // site.group, generator=self._generator(index)).repeat_interleave(site.group)
            return prune_plan(site, keep_groups(score, site.group, target).to(site.device))
        perm = torch.randperm(width, generator=self._generator(index))
        labels = torch.empty(width, dtype=torch.long)
        labels[perm] = torch.arange(width) % target
        dev = site.device
        return self._finish(merge_plan(site, labels.to(dev), None if mass is None else mass.to(dev),
                                       vectors=self.vectors(site, "folded")))


class NeuronMerging(_Baseline):
    """Neuron Merging (Kim et al., NeurIPS 2020): prune by L1, fold each pruned neuron into a survivor.

    Data-free; the scaling matrices come from :mod:`hashexp.merge.neuron_merging`, whose docstring
    gives the equations. A site whose single producer has a BatchNorm (conv+BN, Linear+BN) follows
    the paper's Conv-BN rule by default (``bn_rule=paper``): survivors by the L1 norm of the raw
    filter, each pruned channel n paired with the survivor m minimizing
    lambda (1 - cos(W_n, W_m)) + (1 - lambda) |B_nm| / S_nm (min-max normalised), folded with the
    scale S_nm = s (gamma_n sigma_m) / (gamma_m sigma_n) when the cosine reaches ``threshold``; the
    survivor's BN stays. ``bn_rule=code`` computes S and B as the authors' code does (sigma =
    running_var, pruned and kept swapped), ``bn_rule=folded`` the plain rule on BN-folded rows.
    Every other site (Linear without BN; a residual stream, where several layers add into a
    channel and the paper gives no rule) uses the plain rule: survivors by the L1 norm of [w; b]
    (BN folded in), the most cosine-similar survivor and the norm ratio |p_n| / |p_m|.

    With ``scoring=original`` (the paper's algorithm) selection, cosines, scales and BN statistics
    come from every site before this step, and the scaling folds into the consumer's current columns
    (the next layer's rows are the already-merged ones, Z_l applied to W_{l+1} after Z_{l-1}).

    Args:
        threshold: the cosine a pruned neuron needs to its survivor to be merged (the paper
            tunes it per architecture; its ResNet setting is 0.1).
        bn_rule: ``paper``, ``code`` or ``folded``: how sites with a BatchNorm after their layer merge.
        bn_lambda: the Conv-BN rule's lambda, the weight of the filter's cosine distance against
            the leftover bias (the authors' ResNet setting is 0.85).
        other arguments: see :class:`_Baseline` and :class:`Compressor`.
    """

    name = "neuron_merging"
    own_knobs = frozenset({"threshold"})

    def __init__(self, threshold: float | None = 0.45, bn_rule: str = "paper", bn_lambda: float = 0.85, **kw) -> None:
        super().__init__(**kw)
        check_cosine("hashing.threshold", threshold, note=" for neuron_merging")
        if bn_rule not in BN_RULES:
            raise ConfigError(f"hashing.bn_rule={bn_rule!r}; choose paper (Neuron Merging's Conv-BN rule from the "
                              "paper's equations), code (as the authors' code computes it) or folded (the plain "
                              "rule on BN-folded rows)")
        if bn_lambda is None or not 0.0 <= float(bn_lambda) <= 1.0:
            raise ConfigError(f"hashing.bn_lambda must be in [0, 1] (1: match by the filters' cosine only), got {bn_lambda}")
        self.threshold = float(threshold)
        self.bn_rule = bn_rule
        self.bn_lambda = float(bn_lambda)
        self._bn_before: dict[str, tuple[torch.Tensor, float]] = {}

    def before_compress(self, sites: list[MergeSite] | None) -> None:
        """Also record the BatchNorm statistics of every Conv-BN site (``scoring=original``)."""
        super().before_compress(sites)
        recorded = sites if sites is not None and self.scoring == "original" else []
        self._bn_before = {s.name: bn_statistics(s.producers[0].norm) for s in recorded if self.conv_bn(s)}

    def conv_bn(self, site: MergeSite) -> bool:
        """True when ``site`` merges by the Conv-BN rule: one producer, a BatchNorm after it, ``bn_rule`` not folded."""
        return (self.bn_rule != "folded" and len(site.producers) == 1 and site.producers[0].parts == 1
                and site.producers[0].norm is not None)

    def plan_site(self, site: MergeSite, index: int, mass, capture=None) -> MergePlan | None:
        """Survivors by L1 norm, each pruned neuron folded into a survivor (Conv-BN or plain rule)."""
        if self.compensation == "weights" and not site.homogeneous:
            raise ConfigError(f"site {site.name} ({site.activation}): neuron_merging folds neurons by a positive "
                              "scale, which needs a ReLU-like activation; use hashing.compensation=lsq")
        target = self._target_or_fail(site)
        if target is None:
            return None
        if self.conv_bn(site):
            raw = self.vectors(site, "raw")  # [kernel; bias] of the one producer
            bn, eps = self._bn_before.get(site.name) or bn_statistics(site.producers[0].norm)
            labels, m, survivor = conv_bn_merging_coefficients(raw[:, :-1], raw[:, -1], bn, eps, target,
                                                               self.threshold, self.bn_lambda, self.bn_rule)
        else:
            labels, m, survivor = neuron_merging_coefficients(self.vectors(site, "folded"), target, self.threshold)
        dev = site.device
        one = survivor.to(dev, torch.float32)
        return self._finish(MergePlan(labels=labels.to(dev), r=one, m=m.to(dev, torch.float32), a=one,
                                      new_width=target))
