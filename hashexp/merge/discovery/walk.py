"""Walk a recorded forward and follow each Linear/Conv output channel to where it is read.

Every Linear/Conv output opens a *space* (its channels). A tensor's :class:`Layout` says which
axis carries channels and which spaces lie along it (several after a concatenation), each
channel occupying ``block`` consecutive entries (after a flatten of a conv output). The walk
visits nodes in execution order:

- ops that act on each channel alone pass the layout through (activations, dropout, pooling
  and reductions over other axes, reshapes that keep the channel axis whole, permutes);
- BatchNorm joins the space (folded into the producer when it reads the producer's output and
  nothing else does; otherwise a per-channel *member*); a depthwise conv joins as a member;
- an add (residual) or a multiply (a gate) of two tensors unifies their spaces;
- ``cat`` along the channel axis lists the spaces at their offsets;
- a Linear/Conv reading the channel axis is a *consumer*;
- everything else that touches the channel axis refuses the spaces, with a reason naming the
  op and the module path. Unknown ops refuse (fail closed) and their outputs carry no layout.

This module holds the spaces and the rules for leaf modules; calls.py the rules for functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from hashexp.merge.discovery.calls import CallRules, Layout, canon  # noqa: F401 (re-exported)
from hashexp.merge.discovery.trace import Node, Trace, Value

ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish",
               nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu",
               nn.ELU: "elu", nn.Mish: "mish", nn.Softplus: "softplus", nn.SELU: "selu", nn.CELU: "celu",
               nn.Hardtanh: "hardtanh", nn.PReLU: "prelu"}

@dataclass(eq=False)
class Space:
    """A set of channels that must keep one width (union-find node; data lives on the root)."""

    idx: int
    width: int
    producers: list[tuple[Node, nn.Module | None]] = field(default_factory=list)  # (node, folded norm)
    consumers: list[tuple[Node, Layout]] = field(default_factory=list)
    members: list[tuple[Node, Layout]] = field(default_factory=list)
    acts: list[tuple[Node, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    values: list[Value] = field(default_factory=list)
    origin: Node | None = None


class Walk(CallRules):
    """Layouts of every Value and the spaces they belong to (see the module docstring)."""

    def __init__(self, tr: Trace) -> None:
        self.tr = tr
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.layout: dict[int, Layout] = {}
        self.depth: dict[int, int] = {}
        self.uses: dict[int, list[Node]] = {}
        for n in tr.nodes:
            for v in n.inputs:
                self.uses.setdefault(v.idx, []).append(n)
        for n in tr.nodes:
            self.depth_of(n)
            self.visit(n)
        for v in tr.outputs:
            self.refuse(self.layout.get(v.idx), "reaches the model output")

    # -------------------------------------------------------------- union-find
    def find(self, s: int) -> int:
        """Union-find root of channel space ``s`` (with path halving)."""
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def space(self, s: int) -> Space:
        """The Space that channel space ``s`` belongs to (its root's)."""
        return self.spaces[self.find(s)]

    def unify(self, a: int, b: int) -> None:
        """Merge two channel spaces into one: their producers, consumers, members, reasons and flags."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        A, B = self.spaces[ra], self.spaces[rb]
        for f in ("producers", "consumers", "members", "acts", "reasons", "values"):
            getattr(A, f).extend(getattr(B, f))
        A.flags |= B.flags

    def new_space(self, node: Node, width: int, reason: str | None = None) -> int:
        """A fresh channel space of ``width`` produced by ``node`` (refused with ``reason`` if given); its index."""
        s = Space(len(self.spaces), int(width), origin=node)
        self.spaces.append(s)
        self.parent.append(s.idx)
        if node.module is not None and isinstance(node.module, (nn.Linear, nn.modules.conv._ConvNd)):
            s.producers.append((node, None))
        if reason:
            s.reasons.append(reason)
        return s.idx

    def refuse(self, lay: Layout | None, reason: str) -> None:
        """Record ``reason`` against every channel space of ``lay`` (no-op for None)."""
        if lay is None:
            return
        for s in lay.segs:
            if s >= 0:
                self.space(s).reasons.append(reason)

    def each(self, lay: Layout, fn) -> None:
        """Call ``fn`` on each channel space of ``lay``."""
        for s in lay.segs:
            if s >= 0:
                fn(self.space(s))

    # -------------------------------------------------------------- helpers
    def depth_of(self, n: Node) -> None:
        """Record the depth (producers passed on the way) of ``n``'s outputs."""
        d = max((self.depth.get(v.idx, 0) for v in n.inputs), default=0)
        if n.kind == "module" and isinstance(n.module, (nn.Linear, nn.modules.conv._ConvNd)):
            d += 1
        for v in n.outputs:
            self.depth[v.idx] = d

    def lay(self, v) -> Layout | None:
        """The layout a traced value carries (None for constants and untracked values)."""
        return self.layout.get(v.idx) if isinstance(v, Value) else None

    def put(self, v: Value, lay: Layout | None) -> None:
        """Attach ``lay`` to value ``v`` and list ``v`` under its channel spaces."""
        if lay is None:
            return
        self.layout[v.idx] = lay
        self.each(lay, lambda sp: sp.values.append(v))

    def where(self, n: Node) -> str:
        """``op at path``: how refusal reasons name a node."""
        return f"{n.op} at {n.path or '<model>'}"

    def width_of(self, lay: Layout) -> int:
        """Total width of a layout's segments (sites and foreign channels)."""
        return sum(self.spaces[self.find(s)].width if s >= 0 else -s for s in lay.segs)

    def pass_all(self, n: Node, lay: Layout | None, axis: int | None = None) -> None:
        """Give every output of ``n`` the layout ``lay`` (with its channel axis moved to ``axis``)."""
        if lay is None:
            return
        out = lay if axis is None else Layout(axis, lay.segs, lay.block)
        for v in n.outputs:
            self.put(v, out)

    def refuse_inputs(self, n: Node, reason: str) -> None:
        """Refuse every channel space that reaches ``n`` through its inputs."""
        for v in n.inputs:
            self.refuse(self.lay(v), reason)

    # -------------------------------------------------------------- dispatch
    def visit(self, n: Node) -> None:
        """Dispatch one traced node to the module or the call rules."""
        if n.kind == "module":
            self.visit_module(n)
        else:
            self.visit_call(n)

    def visit_module(self, n: Node) -> None:
        """Propagate the layouts through one module call (producers, norms, pass-through, refusals)."""
        m = n.module
        x = n.inputs[0] if n.inputs else None
        lay = self.lay(x)
        out = n.outputs[0] if n.outputs else None
        if isinstance(m, nn.Linear):
            if lay is not None:
                if lay.axis != len(x.shape) - 1:
                    self.refuse(lay, f"{self.where(n)} reads another axis than the channels")
                else:
                    self.each(lay, lambda sp: sp.consumers.append((n, lay)))
            if out is not None:
                self.put(out, Layout(len(out.shape) - 1, (self.new_space(n, m.out_features),)))
            return
        if isinstance(m, nn.modules.conv._ConvNd):
            self.visit_conv(n, m, x, lay, out)
            return
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if lay is not None:
                if lay.axis != 1:
                    self.refuse(lay, f"{self.where(n)} normalizes another axis than the channels")
                elif self.folds(n, x, lay):
                    sp = self.space(lay.segs[0])
                    sp.producers = [(p, m if p.outputs and p.outputs[0] is x else nrm) for p, nrm in sp.producers]
                else:
                    self.each(lay, lambda sp: sp.members.append((n, lay)))
            self.pass_all(n, lay)
            return
        if isinstance(m, (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())):
            if lay is not None and lay.axis >= len(x.shape) - len(m.normalized_shape):
                self.refuse(lay, f"{self.where(n)} normalizes over the channel axis")
            self.pass_all(n, lay)
            return
        if isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)):
            self.refuse(lay, f"{self.where(n)} normalizes across channels")
            self.pass_all(n, lay)
            return
        if isinstance(m, tuple(ACT_MODULES)):
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self.refuse(lay, f"{self.where(n)} has per-channel slopes")
            if lay is not None:
                self.each(lay, lambda sp: sp.acts.append((n, ACT_MODULES[type(m)])))
            self.pass_all(n, lay)
            return
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.Identity)):
            self.pass_all(n, lay)
            return
        if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                          nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample)):
            k = int(re.search(r"(\d)d", type(m).__name__.lower()).group(1)) if re.search(r"\dd", type(m).__name__.lower()) \
                else len(x.shape) - 2
            self.pooled(n, lay, x, k)
            return
        if isinstance(m, nn.Flatten):
            self.reshaped(n, lay, x, n.outputs[0] if n.outputs else None)
            return
        if isinstance(m, nn.Softmax):
            if lay is not None and m.dim is not None and m.dim % len(x.shape) == lay.axis:
                self.refuse(lay, f"{self.where(n)} normalizes over the channels (attention scores)")
                return
            self.pass_all(n, lay)
            return
        # attention, embeddings, RNNs: their outputs open a space that stays whole
        kind = {nn.MultiheadAttention: "nn.MultiheadAttention internals", nn.Embedding: "an embedding table",
                nn.EmbeddingBag: "an embedding table"}.get(type(m), "an RNN" if isinstance(m, nn.RNNBase)
                                                           else f"unsupported module {type(m).__name__}")
        self.refuse_inputs(n, f"{self.where(n)}: {kind}")
        for v in n.outputs:
            self.put(v, Layout(len(v.shape) - 1, (self.new_space(n, v.shape[-1], f"produced by {kind} at {n.path}"),)))

    def visit_conv(self, n: Node, m, x: Value, lay: Layout | None, out: Value | None) -> None:
        """A conv module: producer and consumer of channels, or depthwise member; transposed convs refuse."""
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        transposed = getattr(m, "transposed", False)
        if transposed:
            self.refuse(lay, f"{self.where(n)}: transposed convs are not supported")
            if out is not None:
                self.put(out, Layout(1, (self.new_space(n, out.shape[1], f"transposed conv {n.path}"),)))
            return
        if lay is not None and lay.axis != 1:
            self.refuse(lay, f"{self.where(n)} reads another axis than the channels")
            lay = None
        if depthwise:
            if lay is not None:
                self.each(lay, lambda sp: (sp.members.append((n, lay)), sp.flags.add("depthwise")))
                self.pass_all(n, lay)
            elif out is not None:
                self.put(out, Layout(1, (self.new_space(n, m.out_channels,
                                                        f"depthwise conv {n.path} on channels that are not a site"),)))
            return
        reason = None
        if m.groups > 1:
            reason = f"grouped conv {n.path} (groups={m.groups}) ties its channels in groups"
            self.refuse(lay, reason)
        elif lay is not None:
            self.each(lay, lambda sp: sp.consumers.append((n, lay)))
        if out is not None:
            self.put(out, Layout(1, (self.new_space(n, m.out_channels, reason),)))

    def folds(self, n: Node, x: Value, lay: Layout) -> bool:
        """BatchNorm reads a producer's output directly and alone: fold it into that producer."""
        if len(lay.segs) != 1 or lay.segs[0] < 0 or x.node is None:
            return False
        src = self.tr.nodes[x.node]
        if not (src.kind == "module" and isinstance(src.module, (nn.Linear, nn.modules.conv._ConvNd))):
            return False
        if src.module.groups > 1 if isinstance(src.module, nn.modules.conv._ConvNd) else False:
            return False
        return len(self.uses.get(x.idx, [])) == 1

    def pooled(self, n: Node, lay: Layout | None, x: Value, k: int) -> None:
        """A pool/interpolate/pad over the last ``k`` axes: passes unless it touches the channel axis."""
        if lay is None:
            return
        if lay.axis >= len(x.shape) - k:
            self.refuse(lay, f"{self.where(n)} pools over the channel axis")
            return
        self.pass_all(n, lay)

    # -------------------------------------------------------------- functions
