"""From the walk's spaces to merge sites: refusals, order, names, taps, activations.

Order: sites go by the depth (longest chain of Linear/Conv layers from the input) of their
first producer; a residual stream, which starts where the blocks reading it start, comes before
a block's inner site of the same depth; then by execution order. Producers of a site go by
depth too (the stream's opener first), consumers and members by execution order. This is
exactly the order of the sites the shipped models used to declare by hand (tests/test_discovery.py).

Names: a model may map first-producer paths to names (``model.site_names()``, e.g. ``fc1``,
``stream1``); otherwise a site is named by its first producer's module path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hashexp.merge.discovery.trace import Node, Trace
from hashexp.merge.discovery.walk import Layout, Space, Walk, canon
from hashexp.merge.site import Consumer, Member, MergeSite, Producer


@dataclass
class SkippedSite:
    """A width the tracer found but will not merge, and why."""

    name: str
    kind: str
    width: int
    reason: str


@dataclass
class Candidate:
    """A root space with its ordered parts, before verification."""

    root: Space
    producers: list[tuple[Node, nn.Module | None]]
    depth: int
    first_idx: int


def _linear_or_conv(m) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


def build_sites(walk: Walk, tr: Trace, model: nn.Module) -> tuple[list[MergeSite], list[SkippedSite]]:
    """Turn every root space into a :class:`MergeSite` or a :class:`SkippedSite` (in site order)."""
    roots = sorted({walk.find(s.idx) for s in walk.spaces})
    names = dict(model.site_names()) if callable(getattr(model, "site_names", None)) else {}
    shared = _shared_parameters(model)
    cands = []
    sites: list[MergeSite] = []
    skipped: list[SkippedSite] = []
    for r in roots:
        sp = walk.spaces[r]
        prods = sorted({id(p): (p, nrm) for p, nrm in sp.producers}.values(),
                       key=lambda pn: (walk.depth.get(pn[0].outputs[0].idx, 0), pn[0].idx))
        if not prods:  # channels of an embedding, an RNN, attention internals: listed, never merged
            if sp.origin is not None:
                skipped.append(SkippedSite(sp.origin.path, "+".join(sorted(sp.flags)) or "plain", sp.width,
                                           "; ".join(dict.fromkeys(sp.reasons)) or "no Linear or Conv produces it"))
            continue
        d = walk.depth.get(prods[0][0].outputs[0].idx, 0)
        cands.append(Candidate(sp, prods, d, prods[0][0].idx))
    cands.sort(key=lambda c: (c.depth, -len(c.producers), c.first_idx))
    for c in cands:
        first = c.producers[0][0].path
        name = names.get(first, first)
        kind = "+".join(sorted(c.root.flags)) or "plain"
        reasons = list(dict.fromkeys(c.root.reasons)) + _structural_reasons(walk, tr, c, shared)
        if reasons:
            skipped.append(SkippedSite(name, kind, c.root.width, "; ".join(reasons)))
            continue
        sites.append(_site(walk, tr, c, name, kind))
    return sites, skipped


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of modules that share a parameter object with another module (tied weights)."""
    owner: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), []).append(m)
    return {id(m) for ms in owner.values() if len(ms) > 1 for m in ms}


def _structural_reasons(walk: Walk, tr: Trace, c: Candidate, shared: set[int]) -> list[str]:
    sp = c.root
    out = []
    if not sp.consumers:
        out.append("no Linear or Conv reads these channels")
    mods = [(p.module, p.path) for p, _ in c.producers] + [(n.module, n.path) for n, _ in sp.consumers + sp.members]
    for m, path in mods:
        if tr.calls.get(id(m), 0) > 1:
            out.append(f"module {path} is called {tr.calls[id(m)]} times (shared weights)")
        if id(m) in shared:
            out.append(f"module {path} shares (ties) its weights with another module")
    for n, lay in sp.consumers + sp.members:
        roots = [walk.find(s) for s in lay.segs if s >= 0]
        if roots.count(sp.idx) > 1:
            out.append(f"{n.op} at {n.path} reads these channels twice")
    return list(dict.fromkeys(out))


def _span(walk: Walk, segs) -> tuple:
    parts = []
    for s in segs:
        if s < 0:
            parts.append(-s)
            continue
        sp = walk.space(s)
        prod = next((p.module for p, _ in sp.producers if _linear_or_conv(p.module)), None)
        parts.append(prod if prod is not None and not sp.reasons else sp.width)
    return tuple(parts)


def _split(walk: Walk, root: int, lay: Layout) -> tuple[tuple, tuple]:
    segs = list(lay.segs)
    pos = next(i for i, s in enumerate(segs) if s >= 0 and walk.find(s) == root)
    return _span(walk, segs[:pos]), _span(walk, segs[pos + 1:])


def _norm_after(walk: Walk, n: Node):
    if not n.outputs:
        return None
    uses = walk.uses.get(n.outputs[0].idx, [])
    if len(uses) == 1 and isinstance(uses[0].module, nn.modules.batchnorm._BatchNorm):
        return uses[0].module
    return None


def _first_use(uses):
    """(node, layout) pairs in forward order, one per module (its first use)."""
    seen: set[int] = set()
    out = []
    for n, lay in sorted(uses, key=lambda nl: nl[0].idx):
        if id(n.module) not in seen:
            seen.add(id(n.module))
            out.append((n, lay))
    return out


def _site(walk: Walk, tr: Trace, c: Candidate, name: str, kind: str) -> MergeSite:
    sp = c.root
    producers = [Producer(n.module, nrm) for n, nrm in c.producers]
    consumers = [Consumer(n.module, *_split(walk, sp.idx, lay), lay.block, _norm_after(walk, n))
                 for n, lay in _first_use(sp.consumers)]
    members = [Member(n.module, *_split(walk, sp.idx, lay)) for n, lay in _first_use(sp.members)]
    acts = list(dict.fromkeys(a for _, a in sp.acts))
    activation = "identity" if not acts else acts[0] if len(acts) == 1 else "mixed"
    return MergeSite(name=name, producers=producers, consumers=consumers, activation=activation,
                     tap=_tap(walk, tr, sp), members=members, gated="gated" in sp.flags, kind=kind)


def _tap(walk: Walk, tr: Trace, sp: Space) -> nn.Module | None:
    """An activation module that runs on this site's channels only and whose outputs are what
    every consumer reads; None if there is none (mass is then read from a consumer's input)."""
    by_mod: dict[int, list[Node]] = {}
    for n, _ in sp.acts:
        if n.kind == "module":
            by_mod.setdefault(id(n.module), []).append(n)
    want = {_source(walk, tr, n.inputs[0]).idx for n, _ in sp.consumers}
    for calls in by_mod.values():
        m = calls[0].module
        if tr.calls.get(id(m), 0) != len({n.idx for n in calls}):
            continue  # it also runs on other tensors
        if not all(walk.lay(n.inputs[0]) is not None and len(walk.lay(n.inputs[0]).segs) == 1 for n in calls):
            continue
        outs = {v.idx for n in calls for v in (n.outputs or n.inputs[:1])}
        if want <= outs:
            return m
    return None


_THROUGH = (nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.modules.pooling._AdaptiveAvgPoolNd,
            nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def _source(walk: Walk, tr: Trace, v):
    """Walk back from a consumer's input through single-input reshapes, pools and dropout."""
    while v.node is not None:
        n = tr.nodes[v.node]
        ins = [u for u in n.inputs if walk.lay(u) is not None]
        if len(ins) != 1 or (n.kind == "module" and not isinstance(n.module, _THROUGH)):
            break
        if n.kind == "call" and canon(n.op) not in _THROUGH_CALLS:
            break
        v = ins[0]
    return v


_THROUGH_CALLS = {"flatten", "view", "reshape", "mean", "amax", "adaptive_avg_pool2d", "adaptive_avg_pool1d",
                  "avg_pool2d", "max_pool2d", "dropout", "contiguous", "squeeze", "permute", "transpose"}
