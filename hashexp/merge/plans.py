"""Plans and their measures, shared by every compressor: the plan of a pulled proposal
(:func:`fixed_plan`) and the proposal of a plan (:func:`proposal_groups`), the survivor each removed
neuron joins (:func:`nearest_survivor`), the old channel each new one continues
(:func:`survivor_index`), and the measured relative error of a merged site (:func:`site_error`)."""

from __future__ import annotations

import torch

from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.sites import MergeSite
from hashexp.merge.surgery import MergePlan


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
