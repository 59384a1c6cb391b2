"""Plans and their measures, shared by every compressor.

A :class:`MergePlan` says what happens to each neuron of a site (its group, or -1 to drop it) and
with which coefficients producers and consumers combine (the merge math: docs/DESIGN.md and
:mod:`hashexp.merge.surgery`, which applies a plan). Here: building plans (:func:`merge_plan`,
:func:`prune_plan`, :func:`fixed_plan` from a pulled proposal, :func:`proposal_groups` back),
checking them against a site (:func:`check_plan`: whole groups, selections only where members
cannot mix), the survivor each removed neuron joins (:func:`nearest_survivor`), the old channel each
new one continues (:func:`survivor_index`), and the measured relative error of a merged site
(:func:`site_error`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.site import MergeSite

_EPS = 1e-12


@dataclass
class MergePlan:
    """What to do with each neuron of one site.

    Attributes:
        labels: (width,) int64, group of each neuron in [0, new_width), or -1 to drop it.
        r: (width,) producer coefficients: representative p_g = sum_{labels==g} r_i p_i.
        m: (width,) consumer coefficients: new column g = sum_{labels==g} m_i V[:, i].
        a: (width,) normalized activation weights (sum to 1 in each group); used for the
            statistics of norms that cannot be combined linearly (BatchNorm mean/var, scale).
        new_width: number of groups.
    """

    labels: torch.Tensor
    r: torch.Tensor
    m: torch.Tensor
    a: torch.Tensor
    new_width: int


def merge_plan(site: MergeSite, labels: torch.Tensor, act_mass: torch.Tensor | None = None,
               representative: str = "mean", vectors: torch.Tensor | None = None) -> MergePlan:
    """Coefficients that merge each group of ``labels`` into its representative.

    ``mean``: the activation-weighted mean direction (below). ``keep``: the member with the
    largest activation mass stays unchanged and the others fold into it with s_i c_i / s_r
    (ReLU-like sites only). ``vectors``: the (width, D) neuron rows the coefficients come from
    (None: the site's current ``neuron_vectors()``; a baseline passes the rows recorded before
    the compression step).
    """
    p = site.neuron_vectors() if vectors is None else vectors
    width = p.shape[0]
    labels = torch.as_tensor(labels, dtype=torch.long, device=p.device)
    if labels.shape != (width,):
        raise ValueError(f"site {site.name}: labels must have shape ({width},), got {tuple(labels.shape)}")
    n_groups = int(labels.max().item()) + 1 if width else 0
    a = _mass(act_mass, width, p.device)
    a_sum = torch.zeros(n_groups, device=p.device, dtype=p.dtype).index_add_(0, labels, a)
    a_norm = a / a_sum[labels]
    if representative == "keep":
        if not site.homogeneous:
            raise ValueError(f"site {site.name}: representative=keep needs a ReLU-like activation")
        s = p.norm(dim=1).clamp_min(_EPS)
        u = p / s[:, None]
        best = torch.full((n_groups,), -1.0, device=p.device, dtype=a.dtype).scatter_reduce(
            0, labels, a, reduce="amax")
        idx = torch.arange(width, device=p.device)
        rep = torch.full((n_groups,), width, device=p.device, dtype=torch.long).scatter_reduce(
            0, labels[a >= best[labels]], idx[a >= best[labels]], reduce="amin")  # lowest index on ties
        is_rep = torch.zeros(width, dtype=torch.bool, device=p.device)
        is_rep[rep] = True
        r = is_rep.to(p.dtype)
        c = (u * u[rep][labels]).sum(1).clamp_min(0.0)
        m = s * c / s[rep][labels]
        a_rep = is_rep.to(p.dtype)
        return MergePlan(labels=labels, r=r, m=m, a=a_rep, new_width=n_groups)
    if site.homogeneous:
        s = p.norm(dim=1).clamp_min(_EPS)
        u = p / s[:, None]
        u_sum = torch.zeros(n_groups, p.shape[1], device=p.device, dtype=p.dtype).index_add_(0, labels, a[:, None] * u)
        u_len = u_sum.norm(dim=1).clamp_min(_EPS)
        s_r = torch.zeros(n_groups, device=p.device, dtype=p.dtype).index_add_(0, labels, a * s) / a_sum
        r = (a / s) * (s_r / u_len)[labels]
        # Member i's pre-activation projects onto the representative's direction with factor
        # c_i = cos(u_i, u_G): h_i ~ (s_i c_i / s_r) h_r is the least-squares fit, exact (c_i = 1)
        # for duplicates and rescalings, and it does not inflate outputs for looser groups.
        c = (u * (u_sum / u_len[:, None])[labels]).sum(1).clamp_min(0.0)
        m = s * c / s_r[labels]
    else:
        r = a_norm
        m = torch.ones_like(a)
    return MergePlan(labels=labels, r=r, m=m, a=a_norm, new_width=n_groups)


def prune_plan(site: MergeSite, keep: torch.Tensor) -> MergePlan:
    """Keep the neurons in ``keep`` (indices or a bool mask), drop the rest."""
    width = site.width
    dev = site.device
    keep = torch.as_tensor(keep, device=dev)
    if keep.dtype == torch.bool:
        keep = keep.nonzero().flatten()
    keep = keep.sort().values
    labels = torch.full((width,), -1, dtype=torch.long, device=dev)
    labels[keep] = torch.arange(len(keep), device=dev)
    ones = (labels >= 0).float()
    return MergePlan(labels=labels, r=ones, m=ones, a=ones, new_width=int(len(keep)))


def _mass(act_mass: torch.Tensor | None, width: int, device) -> torch.Tensor:
    if act_mass is None:
        return torch.ones(width, device=device)
    a = torch.as_tensor(act_mass, dtype=torch.float32, device=device).clamp_min(0)
    if a.shape != (width,):
        raise ValueError(f"activation mass must have shape ({width},), got {tuple(a.shape)}")
    # A neuron that never fired still belongs to its group; give it a small weight, not zero.
    floor = a.max().clamp_min(1.0) * 1e-6
    return a + floor


def is_selection(plan: MergePlan) -> bool:
    """True when each group's representative is one of its members, unchanged (r = 1 there, 0 for
    the others): producers keep or drop rows, consumers may still add the members' columns."""
    keep = plan.labels >= 0
    labels, r = plan.labels[keep], plan.r[keep]
    chosen = r != 0
    if not bool(torch.allclose(r[chosen], torch.ones_like(r[chosen]))):
        return False
    return bool((torch.bincount(labels[chosen], minlength=plan.new_width) == 1).all())


def check_plan(site: MergeSite, plan: MergePlan, what: str = "this plan") -> None:
    """Refuse a plan whose representatives mix several neurons' rows on a site where only keeping
    a member (and adding the others' consumer columns to it) is exact."""
    if site.group > 1 and not whole_groups(plan, site.group):
        raise ConfigError(f"site {site.name}: {what} keeps part of a group of {site.group} channels, but "
                          f"{site.restricted}; a plan on this site must keep or remove whole groups, in order "
                          "(hashing=simhash with compensation=lsq plans whole heads)")
    if site.restricted and not is_selection(plan):
        raise ConfigError(f"site {site.name}: {what} replaces neurons by a mix of several, but {site.restricted}; "
                          "use hashing.compensation=lsq with hashing.representative=keep (or a pruning baseline), "
                          "or leave the site out (ignore / hashing.sites)")


def whole_groups(plan: MergePlan, group: int) -> bool:
    """True when ``plan`` keeps or drops whole groups of ``group`` channels and keeps each kept
    group's channels together, in order (channel j of a kept group stays at offset j of its new group)."""
    labels = plan.labels.reshape(-1, group)
    kept = labels >= 0
    if not bool((kept.all(1) | (~kept).all(1)).all()):
        return False
    lk = labels[kept.all(1)]
    if not len(lk):
        return True
    return bool((lk[:, 0] % group == 0).all() and (lk - lk[:, :1] == torch.arange(group, device=lk.device)).all())


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
        return {"groups": nearest_survivor(cap, keep), "keep": keep}
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


def nearest_survivor(cap: cal.SiteCapture, keep: torch.Tensor) -> torch.Tensor:
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


def survivor_index(plan: MergePlan) -> torch.Tensor:
    """(new_width,) the old channel each new channel of ``plan`` continues (its group's last member)."""
    keep = plan.labels >= 0
    index = torch.empty(plan.new_width, dtype=torch.long)
    index[plan.labels[keep].cpu()] = keep.nonzero().flatten().cpu()
    return index


def site_error(old: cal.SiteCapture, new: cal.SiteCapture, index: torch.Tensor | None = None) -> float:
    """Relative pre-activation error over all consumers of a site (centred, energy-weighted).

    A consumer that also writes into the site (a block whose input and output are the same
    residual stream, e.g. MobileNetV3's first block) has lost output channels too: its old outputs
    are compared on the channels that survive (``index``: :func:`survivor_index` of the plan).
    """
    num = den = 0.0
    for yo, yn in zip(old.outputs, new.outputs):
        yo, yn = yo.double(), yn.double()
        if yo.shape[1] != yn.shape[1] and index is not None and yn.shape[1] == len(index):
            yo = yo[:, index.to(yo.device)]
        d = yn - yo
        num += float(((d - d.mean(0)) ** 2).sum())
        den += float(((yo - yo.mean(0)) ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5
