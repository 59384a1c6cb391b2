"""Merge sites found by tracing: any model, no hand-written site declarations.

``find_sites(model, x)`` runs the model once on ``x`` and records every call
(:mod:`~hashexp.merge.discovery.trace`), follows each Linear/Conv output channel to the layers
that read it (:mod:`~hashexp.merge.discovery.walk`), builds the sites in forward order with
their names, taps and activations (:mod:`~hashexp.merge.discovery.build`), and checks each one by
number (:mod:`~hashexp.merge.discovery.verify`). What it does not understand it refuses, with the
op and module path (fail closed): a refused width stays as it is.

    from hashexp.merge.discovery import find_sites
    found = find_sites(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    print(found)            # the sites, and the skipped widths with why
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.discovery.build import SkippedSite, build_sites
from hashexp.merge.discovery.heads import find_head_sites, runs_without_a_head
from hashexp.merge.discovery.trace import trace
from hashexp.merge.discovery.verify import verify_sites
from hashexp.merge.discovery.walk import Walk
from hashexp.merge.site import MergeSite

__all__ = ["SiteDiscovery", "SkippedSite", "attach_example", "discovered_sites", "find_sites", "shrink_to_widths"]

#: samples of the example input used by the numerical check (it needs no more)
VERIFY_SAMPLES = 2


@dataclass
class SiteDiscovery:
    """What :func:`find_sites` found.

    Attributes:
        sites: the merge sites, in forward order.
        skipped: widths found but refused, each with its reason.
        trace_s: seconds spent tracing, walking and verifying.
    """

    sites: list[MergeSite]
    skipped: list[SkippedSite] = field(default_factory=list)
    trace_s: float = 0.0
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        rows = [("site", "kind", "width", "producers", "consumers")]
        for s in self.sites:
            width = str(s.width) if s.group == 1 else f"{s.width} ({s.width // s.group}x{s.group})"  # heads x head_dim
            rows.append((s.name, s.kind, width, str(len(s.producers)), str(len(s.consumers))))
        w = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "  ".join("-" * x for x in w))
        out = [f"{len(self.sites)} sites, {len(self.skipped)} skipped, traced in {self.trace_s:.2f} s", *lines]
        if self.skipped:
            out.append("skipped:")
            out += [f"  {s.name} ({s.kind}, width {s.width}): {s.reason}" for s in self.skipped]
        return "\n".join(out)


def _example_slice(x: Any, n: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:n]
    if isinstance(x, tuple):
        return tuple(_example_slice(t, n) for t in x)
    return x


def find_sites(model: nn.Module, example_input: torch.Tensor, ignore: Sequence[str] = (),
               verify: bool = True) -> SiteDiscovery:
    """Trace ``model`` on ``example_input`` and return its merge sites and the refused widths.

    Args:
        model: any ``nn.Module``; it runs once in eval mode without gradients (its training
            flags and BatchNorm statistics are left as they were).
        example_input: a real batch (a tensor, or a tuple of positional inputs). Sites are
            found by running it, so it must take the paths that training takes.
        ignore: site names (or any producer's module path) to leave at full width.
        verify: check every site by number (:mod:`~hashexp.merge.discovery.verify`); a site
            that fails is refused with what changed where.

    The example input is remembered on the model (:func:`attach_example`), so that
    :func:`hashexp.merge.sites.model_sites` can re-trace it later.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny forwards: threads only add contention
    try:
        return _find_sites(model, example_input, ignore, verify)
    finally:
        torch.set_num_threads(threads)


def _find_sites(model: nn.Module, example_input: Any, ignore: Sequence[str], verify: bool) -> SiteDiscovery:
    t0 = time.perf_counter()
    x = _example_slice(example_input, max(VERIFY_SAMPLES, 2))
    try:
        tr = trace(model, x)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"find_sites: running {type(model).__name__} on the example input failed "
                          f"({type(e).__name__}: {e}); pass an input the model accepts, or declare the "
                          "sites with model.merge_sites()") from e
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    untraced: list[SkippedSite] = []
    if any(id(m) not in tr.calls for m in layers):
        # some layers only run in training mode (auxiliary classifiers): trace that path
        try:
            tr_train = trace(model, x, train=True)
            if sum(id(m) in tr_train.calls for m in layers) > sum(id(m) in tr.calls for m in layers):
                tr = tr_train
        except Exception as e:  # the training-mode path does not run on this input (e.g. too small)
            note = f"never ran on the example input; the training-mode forward failed ({type(e).__name__}: {e})"
            untraced = [SkippedSite(p, "untraced", int(m.weight.shape[0]), note)
                        for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and id(m) not in tr.calls]
    walk = Walk(tr)
    sites, skipped = build_sites(walk, tr, model)
    sites, skipped = _with_heads(model, tr, x, sites, skipped)
    skipped += untraced
    ignore = list(ignore or ())
    if ignore:
        keys = {s.name: s for s in sites}
        by_path = {_path(model, p.module): s for s in sites for p in s.producers}
        known = set(keys) | set(by_path) | {s.name for s in skipped}
        unknown = [k for k in ignore if k not in known]
        if unknown:
            raise ConfigError(f"ignore names {unknown}, which match no site of {type(model).__name__}; "
                              f"its sites are {[s.name for s in sites]}")
        drop = {id(keys.get(k) or by_path.get(k)) for k in ignore if k in keys or k in by_path}
        for s in [s for s in sites if id(s) in drop]:
            skipped.append(SkippedSite(s.name, s.kind, s.width, "ignored by the caller"))
        sites = [s for s in sites if id(s) not in drop]
    if verify and sites:
        failed = verify_sites(model, x, sites)
        for s in [s for s in sites if s.name in failed]:
            skipped.append(SkippedSite(s.name, s.kind, s.width, failed[s.name]))
        sites = [s for s in sites if s.name not in failed]
    found = SiteDiscovery(sites, skipped, time.perf_counter() - t0)
    found.modules = {_path(model, m): m for m in _modules(sites)}
    attach_example(model, example_input)
    object.__setattr__(model, "_hashexp_discovery", found)
    object.__setattr__(model, "_hashexp_ignore", tuple(ignore))
    return found


def _with_heads(model: nn.Module, tr, x: Any, sites: list[MergeSite], skipped: list[SkippedSite]
                ) -> tuple[list[MergeSite], list[SkippedSite]]:
    """Add the attention-head sites (:mod:`hashexp.merge.heads`) in forward order: each replaces the
    refusal of its qkv projection's width; recognized attention that cannot lose heads is refused."""
    found, refused = find_head_sites(model, tr, x)
    skipped = skipped + [SkippedSite(p, "heads", h, why) for p, h, why in refused]
    if not found:
        return sites, skipped
    failed = runs_without_a_head(model, x, [s for _, s in found])
    for _, s in found:
        if s.name in failed:
            skipped.append(SkippedSite(s.name, "heads", s.width // s.group, failed[s.name]))
    found = [(i, s) for i, s in found if s.name not in failed]
    names = {s.name for _, s in found}
    skipped = [k for k in skipped if not (k.name in names and k.kind != "heads")]
    first = {}
    for n in tr.nodes:
        if n.kind == "module" and n.module is not None:
            first.setdefault(id(n.module), n.idx)
    out = list(sites)
    for idx, hs in sorted(found, key=lambda t: t[0]):
        pos = next((k for k, s in enumerate(out) if first.get(id(s.producers[0].module), -1) > idx), len(out))
        out.insert(pos, hs)
    return out, skipped


def _modules(sites: list[MergeSite]) -> list[nn.Module]:
    out = []
    for s in sites:
        out += [p.module for p in s.producers] + [p.norm for p in s.producers if p.norm is not None]
        out += [c.module for c in s.consumers] + [m.module for m in s.members]
        if s.tap is not None:
            out.append(s.tap)
    return out


def _path(model: nn.Module, m: nn.Module) -> str:
    for p, mm in model.named_modules():
        if mm is m:
            return p
    return "?"


def attach_example(model: nn.Module, x: Any) -> None:
    """Remember an example input on ``model`` (a few samples, on the CPU) for later re-tracing."""
    small = _example_slice(x, max(VERIFY_SAMPLES, 2))
    small = tuple(t.detach().cpu().clone() for t in small) if isinstance(small, tuple) else small.detach().cpu().clone()
    object.__setattr__(model, "_hashexp_example", small)


def _example_for(model: nn.Module) -> Any:
    x = getattr(model, "_hashexp_example", None)
    if x is None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ConfigError(f"{type(model).__name__} declares no merge_sites() and has no example input; "
                              "call hashexp.merge.discovery.find_sites(model, x) or attach_example(model, x) first")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((VERIFY_SAMPLES, *shape), generator=gen)
    p = next(model.parameters(), None)
    if p is not None:
        x = tuple(t.to(p.device) for t in x) if isinstance(x, tuple) else x.to(p.device)
    return x


def _still_valid(model: nn.Module, found: SiteDiscovery) -> bool:
    """The cached sites still name the model's modules (true after ``copy.deepcopy``, which copies
    the cache along with the modules; false once a module was replaced)."""
    mods = dict(model.named_modules())
    return all(mods.get(p) is m for p, m in found.modules.items())


def discovered_sites(model: nn.Module) -> list[MergeSite]:
    """The traced sites of ``model``, cached on it (re-traced if its modules were replaced)."""
    found = getattr(model, "_hashexp_discovery", None)
    if found is None or not _still_valid(model, found):
        found = find_sites(model, _example_for(model), ignore=getattr(model, "_hashexp_ignore", ()))
    return found.sites


def shrink_to_widths(model: nn.Module, widths: Mapping[str, int], example_input: Any = None) -> None:
    """Slim a freshly built full-width model to merged widths: each named site keeps its first w channels.

    A traced model is rebuilt from its architecture plus these widths, and then its merged
    model.pt state dict loads into it. Unknown names and widths above a site's width are errors.
    """
    from hashexp.merge.surgery import apply_plan, prune_plan

    if example_input is not None:  # the architecture's sites, as found (and checked) before the merge
        find_sites(model, example_input, ignore=getattr(model, "_hashexp_ignore", ()), verify=False)
    sites = {s.name: s for s in discovered_sites(model)}
    unknown = sorted(set(widths) - set(sites))
    if unknown:
        raise ConfigError(f"widths name {unknown}, which are not sites of {type(model).__name__} "
                          f"(its sites: {sorted(sites)})")
    for name, w in widths.items():
        site = sites[name]
        w = int(w)
        if not 1 <= w <= site.width:
            raise ConfigError(f"width {w} for site {name} must be in 1..{site.width}")
        if w % site.group:
            raise ConfigError(f"width {w} for site {name} must be a multiple of {site.group} "
                              f"(its channels are attention heads of {site.group})")
        if w < site.width:
            apply_plan(site, prune_plan(site, torch.arange(w, device=site.device)))


