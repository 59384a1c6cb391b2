"""The baselines: the classic alternatives, with the same schedule, targets, compensation and surgery.

They follow their papers: every site is scored on the network before the compression step and all
are cut at once (``scoring=original``; ``sequential`` is hashexp's behaviour before issue 22);
tests/test_baselines_reference.py checks them against numpy references of the papers' equations.

``MagnitudePruner`` (structured L1 pruning of whole neurons, Li et al. 2017), ``RandomMerger``
(random groups) and ``NeuronMerging`` (Kim et al., NeurIPS 2020, with
:func:`neuron_merging_coefficients`). A ``width_plan`` (a hashed run's metrics.json) makes a
baseline hit exactly the widths that run reached at each rehash.
"""

from __future__ import annotations

import torch

from hashexp.errors import ConfigError
from hashexp.merge.compressor import Compressor
from hashexp.merge.heads import keep_groups
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

    Data-free. The survivors are the ``target`` neurons with the largest L1 norm of [w; b]
    (BN folded in for conv+BN sites). Each pruned neuron j goes to the survivor i whose
    direction is most cosine-similar; when that cosine reaches ``threshold`` its consumer
    column is added to i's, scaled by the norm ratio |p_j| / |p_i| (exact when p_j is a positive
    multiple of p_i and the activation is ReLU-like), otherwise it is dropped. With
    ``scoring=original`` (the paper's algorithm) selection, cosines and norm ratios come from every
    site's rows before this step, and the scaling folds into the consumer's current columns (the
    next layer's rows are the already-merged ones, Z_l applied to W_{l+1} after Z_{l-1}).

    On Linear sites this is the paper's rule exactly. On conv+BN sites it is the same rule on the
    BN-folded filters (exact for a BN-rescaled channel); the paper instead selects by the raw
    kernel L1 and matches by a blend of the raw-kernel cosine and a BN bias term (its lambda).

    Args:
        threshold: the cosine a pruned neuron needs to its survivor to be merged (the paper
            tunes it per architecture).
        other arguments: see :class:`_Baseline` and :class:`Compressor`.
    """

    name = "neuron_merging"
    own_knobs = frozenset({"threshold"})

    def __init__(self, threshold: float | None = 0.45, **kw) -> None:
        super().__init__(**kw)
        check_cosine("hashing.threshold", threshold, note=" for neuron_merging")
        self.threshold = float(threshold)

    def plan_site(self, site: MergeSite, index: int, mass, capture=None) -> MergePlan | None:
        """Survivors by L1 norm, each pruned neuron folded into its most cosine-similar survivor."""
        if self.compensation == "weights" and not site.homogeneous:
            raise ConfigError(f"site {site.name} ({site.activation}): neuron_merging folds neurons by a positive "
                              "scale, which needs a ReLU-like activation; use hashing.compensation=lsq")
        target = self._target_or_fail(site)
        if target is None:
            return None
        p = self.vectors(site, "folded")
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
