"""The baselines: the classic alternatives, with the same schedule, targets, compensation and surgery.

``MagnitudePruner`` (structured L1 pruning of whole neurons, Li et al. 2017), ``RandomMerger``
(random groups) and ``NeuronMerging`` (Kim et al., NeurIPS 2020, with
:func:`neuron_merging_coefficients`). A ``width_plan`` (a hashed run's metrics.json) makes a
baseline hit exactly the widths that run reached at each rehash.
"""

from __future__ import annotations

import torch

from hashexp.errors import ConfigError
from hashexp.merge.compressor import Compressor
from hashexp.merge.sites import MergeSite
from hashexp.merge.surgery import MergePlan, merge_plan, prune_plan
from hashexp.utils.checks import check_cosine


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
