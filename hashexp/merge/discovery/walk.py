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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch import nn

from hashexp.merge.discovery.trace import Node, Trace, Value

ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish",
               nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu",
               nn.ELU: "elu", nn.Mish: "mish", nn.Softplus: "softplus", nn.SELU: "selu", nn.CELU: "celu",
               nn.Hardtanh: "hardtanh", nn.PReLU: "prelu"}
ACT_FUNCS = {"relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
             "mish", "softplus", "selu", "celu", "hardtanh"}
PASS_FUNCS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "contiguous",
              "clone", "float", "half", "double", "bfloat16", "to", "type", "detach", "abs", "neg", "exp", "log",
              "sqrt", "rsqrt", "square", "erf", "clamp", "clamp_min", "clamp_max", "clip", "requires_grad",
              "stochastic_depth", "sign", "floor", "ceil", "round", "reciprocal"}
BINARY = {"add": "add", "sub": "add", "rsub": "add", "mul": "mul", "div": "div", "true_divide": "div"}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nanmean"}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "expand",
           "expand_as"}
SPLIT = {"split", "chunk", "unbind", "split_with_sizes", "tensor_split", "narrow", "select", "index_select", "gather",
         "roll", "flip"}
ATTENTION = {"matmul", "mm", "bmm", "einsum", "baddbmm", "addmm", "scaled_dot_product_attention", "linear",
             "conv1d", "conv2d", "conv3d", "bilinear"}


def canon(op: str) -> str:
    """Function name without in-place/reflected decoration: ``__iadd__``/``add_`` -> ``add``."""
    m = re.fullmatch(r"__(?:i|r)?(\w+?)__", op)
    if m:
        op = m.group(1)
    if op.endswith("_") and not op.endswith("__"):
        op = op[:-1]
    return {"truediv": "div", "getitem": "getitem"}.get(op, op)


@dataclass(frozen=True)
class Layout:
    """Where channels lie in a tensor: ``axis``, the spaces along it (negative: a foreign
    segment of that many channels), ``block`` entries per channel."""

    axis: int
    segs: tuple[int, ...]
    block: int = 1


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


class Walk:
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
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def space(self, s: int) -> Space:
        return self.spaces[self.find(s)]

    def unify(self, a: int, b: int) -> None:
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
        s = Space(len(self.spaces), int(width), origin=node)
        self.spaces.append(s)
        self.parent.append(s.idx)
        if node.module is not None and isinstance(node.module, (nn.Linear, nn.modules.conv._ConvNd)):
            s.producers.append((node, None))
        if reason:
            s.reasons.append(reason)
        return s.idx

    def refuse(self, lay: Layout | None, reason: str) -> None:
        if lay is None:
            return
        for s in lay.segs:
            if s >= 0:
                self.space(s).reasons.append(reason)

    def each(self, lay: Layout, fn) -> None:
        for s in lay.segs:
            if s >= 0:
                fn(self.space(s))

    # -------------------------------------------------------------- helpers
    def depth_of(self, n: Node) -> None:
        d = max((self.depth.get(v.idx, 0) for v in n.inputs), default=0)
        if n.kind == "module" and isinstance(n.module, (nn.Linear, nn.modules.conv._ConvNd)):
            d += 1
        for v in n.outputs:
            self.depth[v.idx] = d

    def lay(self, v) -> Layout | None:
        return self.layout.get(v.idx) if isinstance(v, Value) else None

    def put(self, v: Value, lay: Layout | None) -> None:
        if lay is None:
            return
        self.layout[v.idx] = lay
        self.each(lay, lambda sp: sp.values.append(v))

    def where(self, n: Node) -> str:
        return f"{n.op} at {n.path or '<model>'}"

    def width_of(self, lay: Layout) -> int:
        return sum(self.spaces[self.find(s)].width if s >= 0 else -s for s in lay.segs)

    def pass_all(self, n: Node, lay: Layout | None, axis: int | None = None) -> None:
        if lay is None:
            return
        out = lay if axis is None else Layout(axis, lay.segs, lay.block)
        for v in n.outputs:
            self.put(v, out)

    def refuse_inputs(self, n: Node, reason: str) -> None:
        for v in n.inputs:
            self.refuse(self.lay(v), reason)

    # -------------------------------------------------------------- dispatch
    def visit(self, n: Node) -> None:
        if n.kind == "module":
            self.visit_module(n)
        else:
            self.visit_call(n)

    def visit_module(self, n: Node) -> None:
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
        if lay is None:
            return
        if lay.axis >= len(x.shape) - k:
            self.refuse(lay, f"{self.where(n)} pools over the channel axis")
            return
        self.pass_all(n, lay)

    # -------------------------------------------------------------- functions
    def visit_call(self, n: Node) -> None:
        op = canon(n.op)
        lays = [(v, self.lay(v)) for v in n.inputs]
        with_lay = [(v, lay) for v, lay in lays if lay is not None]
        if not with_lay:
            return
        x, lay = with_lay[0]
        nd = len(x.shape)
        if op in ACT_FUNCS or op in PASS_FUNCS:
            if len(with_lay) > 1 or len(n.inputs) > 1 and op not in ("to", "type"):
                others = [v for v in n.inputs[1:] if v is not x]
                if others and not all(self.broadcasts(lay, x, o) for o in others):
                    self.refuse(lay, f"{self.where(n)} combines the channels with another tensor")
                    return
            if op in ACT_FUNCS:
                self.each(lay, lambda sp: sp.acts.append((n, op)))
            self.pass_all(n, lay)
            return
        if op in BINARY:
            self.binary(n, BINARY[op])
            return
        if op in REDUCE:
            self.reduce(n, x, lay)
            return
        if op in RESHAPE:
            self.reshaped(n, lay, x, n.outputs[0] if n.outputs else None)
            return
        if op in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"):
            self.permuted(n, op, x, lay)
            return
        if op in ("cat", "concat", "concatenate"):
            self.cat(n)
            return
        if op in SPLIT:
            dim = self.arg(n, 2 if op in ("split", "chunk", "tensor_split", "split_with_sizes") else 1, "dim",
                           0 if op in ("split", "chunk", "tensor_split", "split_with_sizes", "unbind") else None)
            if op == "roll" and dim is None:
                self.refuse(lay, f"{self.where(n)} rolls the flattened tensor")
                return
            if dim is None or dim % nd == lay.axis:
                self.refuse(lay, f"{self.where(n)} splits or reorders the channel axis")
                return
            axis = lay.axis - (1 if op in ("unbind", "select") and dim % nd < lay.axis else 0)
            self.pass_all(n, lay, axis)
            return
        if op == "getitem":
            self.getitem(n, x, lay)
            return
        m = re.fullmatch(r"(adaptive_)?(avg|max|lp)_pool(\d)d(_with_indices)?", op)
        if m:
            self.pooled(n, lay, x, int(m.group(3)))
            return
        if op in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            self.pooled(n, lay, x, nd - 2)
            return
        if op == "pad":
            pad = self.arg(n, 1, "pad", ())
            self.pooled(n, lay, x, len(pad) // 2)
            return
        if op in ("softmax", "log_softmax"):
            dim = self.arg(n, 1, "dim", None)
            if dim is None or dim % nd == lay.axis:
                self.refuse(lay, f"{self.where(n)} normalizes over the channels (attention scores)")
                return
            self.pass_all(n, lay)
            return
        if op == "layer_norm":
            shape = self.arg(n, 1, "normalized_shape", ())
            if lay.axis >= nd - len(shape):
                self.refuse(lay, f"{self.where(n)} normalizes over the channel axis")
            else:
                self.pass_all(n, lay)
            return
        if op in ("group_norm", "rms_norm", "batch_norm", "instance_norm", "local_response_norm"):
            self.refuse_inputs(n, f"{self.where(n)} (functional norm) mixes or rescales channels")
            return
        if op in ATTENTION:
            self.refuse_inputs(n, f"{self.where(n)} mixes the channels (attention or a weight no module owns)")
            return
        if op in ("size", "dim", "numel", "__len__", "is_contiguous", "stride", "data_ptr", "item", "tolist",
                  "equal", "allclose"):
            return
        self.refuse_inputs(n, f"unknown op {n.op} at {n.path or '<model>'} on the channels")

    def arg(self, n: Node, pos: int, name: str, default):
        if len(n.args) > pos:
            return n.args[pos]
        return n.kwargs.get(name, default)

    def broadcasts(self, lay: Layout, x: Value, o: Value) -> bool:
        """``o`` combines with ``x`` without pairing one value per channel (size 1 or absent there)."""
        k = len(x.shape) - lay.axis  # position from the right
        return len(o.shape) < k or o.shape[len(o.shape) - k] == 1

    def binary(self, n: Node, kind: str) -> None:
        tensors = [v for v in n.inputs]
        if len(tensors) == 1:  # a scalar operand
            x = tensors[0]
            lay = self.lay(x)
            if kind == "add":
                self.each(lay, lambda sp: sp.acts.append((n, "shift")))
            self.pass_all(n, lay)
            return
        a, b = tensors[0], tensors[1]
        la, lb = self.lay(a), self.lay(b)
        if la is not None and lb is not None:
            ka, kb = len(a.shape) - la.axis, len(b.shape) - lb.axis
            wa, wb = a.shape[la.axis], b.shape[lb.axis]
            if ka == kb and wa == wb and la.block == lb.block and len(la.segs) == len(lb.segs) and all(
                    (sa >= 0) == (sb >= 0) and (sa >= 0 or sa == sb) for sa, sb in zip(la.segs, lb.segs)):
                if kind == "div":
                    self.refuse(la, f"{self.where(n)} divides channels by channels")
                    self.refuse(lb, f"{self.where(n)} divides channels by channels")
                for sa, sb in zip(la.segs, lb.segs):
                    if sa >= 0:
                        self.unify(sa, sb)
                        self.space(sa).flags.add("stream" if kind == "add" else "gated")
                out_lay = la if len(a.shape) >= len(b.shape) else lb
                self.pass_all(n, out_lay, len(n.outputs[0].shape) - ka if n.outputs else None)
                return
            for big, lbig, small, lsmall in ((a, la, b, lb), (b, lb, a, la)):
                if small.shape[lsmall.axis] == 1 and self.broadcasts(lbig, big, small):
                    self.refuse(lsmall, f"{self.where(n)} broadcasts one channel across another site")
                    self.pass_all(n, lbig)
                    return
            reason = f"{self.where(n)} combines channels of different layouts"
            self.refuse(la, reason)
            self.refuse(lb, reason)
            return
        x, lay, o = (a, la, b) if la is not None else (b, lb, a)
        if not self.broadcasts(lay, x, o):
            what = "a parameter or buffer" if o.origin == "param" else "a tensor no producer of the site writes"
            self.refuse(lay, f"{self.where(n)} combines the channels with {what}")
        elif kind == "add":
            self.each(lay, lambda sp: sp.acts.append((n, "shift")))
        self.pass_all(n, lay, len(n.outputs[0].shape) - (len(x.shape) - lay.axis) if n.outputs else None)

    def reduce(self, n: Node, x: Value, lay: Layout) -> None:
        nd = len(x.shape)
        dim = self.arg(n, 1, "dim", None)
        if isinstance(dim, (bool,)) or (dim is None and canon(n.op) in ("max", "min")):
            dim = None
        if dim is None:
            self.refuse(lay, f"{self.where(n)} reduces over every axis, the channels included")
            return
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [d % nd for d in dims]
        if lay.axis in dims:
            self.refuse(lay, f"{self.where(n)} reduces over the channel axis")
            return
        keep = bool(self.arg(n, 2, "keepdim", False))
        axis = lay.axis if keep else lay.axis - sum(d < lay.axis for d in dims)
        self.pass_all(n, lay, axis)

    def reshaped(self, n: Node, lay: Layout | None, x: Value, out: Value | None) -> None:
        if lay is None or out is None:
            return
        ins, outs = x.shape, out.shape
        pre = math.prod(ins[:lay.axis])
        size = ins[lay.axis]
        suf = math.prod(ins[lay.axis + 1:])
        nch = size // lay.block
        acc = 1
        for b, d in enumerate(outs):
            if acc == pre:
                if d == size:
                    self.pass_all(n, lay, b)
                    return
                if d > size and d % size == 0 and suf % (d // size) == 0:
                    self.pass_all(n, Layout(b, lay.segs, lay.block * (d // size)))
                    return
                if d < size and d % nch == 0 and lay.block % (d // nch) == 0 and d >= nch:
                    self.pass_all(n, Layout(b, lay.segs, d // nch))
                    return
                if d != 1:
                    break
            acc *= d
            if acc > pre:
                break
        self.refuse(lay, f"{self.where(n)} reshapes {tuple(ins)} -> {tuple(outs)} and splits or merges the channel axis")

    def permuted(self, n: Node, op: str, x: Value, lay: Layout) -> None:
        nd = len(x.shape)
        if op == "permute":
            dims = n.args[1:] if len(n.args) > 2 or not isinstance(self.arg(n, 1, "dims", None), (tuple, list)) \
                else self.arg(n, 1, "dims", None)
            dims = [d % nd for d in dims]
            axis = dims.index(lay.axis)
        elif op in ("transpose", "swapaxes", "swapdims"):
            d0, d1 = self.arg(n, 1, "dim0", 0) % nd, self.arg(n, 2, "dim1", 1) % nd
            axis = d1 if lay.axis == d0 else d0 if lay.axis == d1 else lay.axis
        elif op == "t":
            axis = (1 - lay.axis) if nd == 2 else lay.axis
        else:
            src, dst = self.arg(n, 1, "source", None), self.arg(n, 2, "destination", None)
            if not isinstance(src, int):
                self.refuse(lay, f"{self.where(n)}: movedim of several axes is not supported")
                return
            order = [d for d in range(nd) if d != src % nd]
            order.insert(dst % nd, src % nd)
            axis = order.index(lay.axis)
        self.pass_all(n, lay, axis)

    def cat(self, n: Node) -> None:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors", ())
        dim = self.arg(n, 1, "dim", 0)
        vals = [t for t in tensors if isinstance(t, Value)]
        lays = [self.lay(v) for v in vals]
        nd = len(vals[0].shape)
        dim %= nd
        ref = next(la for la in lays if la is not None)
        if dim == ref.axis:
            segs: list[int] = []
            for v, la in zip(vals, lays):
                if la is None:
                    if ref.block != 1:
                        self.refuse(ref, f"{self.where(n)} concatenates blocks of different sizes")
                        return
                    segs.append(-v.shape[dim])
                elif la.axis != dim or la.block != ref.block:
                    reason = f"{self.where(n)} concatenates tensors whose channels lie on different axes"
                    for la2 in lays:
                        self.refuse(la2, reason)
                    return
                else:
                    segs.extend(la.segs)
            roots = [self.find(s) for s in segs if s >= 0]
            for r in {r for r in roots if roots.count(r) > 1}:
                self.spaces[r].reasons.append(f"{self.where(n)} concatenates the same channels twice")
            for s in segs:
                if s >= 0:
                    self.space(s).flags.add("concat")
            self.pass_all(n, Layout(dim, tuple(segs), ref.block))
            return
        if any(la is None for la in lays):
            for la in lays:
                self.refuse(la, f"{self.where(n)} concatenates the site with a tensor no producer writes "
                                f"(e.g. a class token) along another axis")
            return
        for la in lays[1:]:
            if la.axis != ref.axis or len(la.segs) != len(ref.segs):
                for la2 in lays:
                    self.refuse(la2, f"{self.where(n)} concatenates different channel layouts")
                return
            for sa, sb in zip(ref.segs, la.segs):
                if sa >= 0 and sb >= 0:
                    self.unify(sa, sb)
        self.pass_all(n, ref)

    def getitem(self, n: Node, x: Value, lay: Layout) -> None:
        idx = n.args[1] if len(n.args) > 1 else None
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, Value) or isinstance(i, (list,)) for i in idx):
            self.refuse(lay, f"{self.where(n)} indexes with a tensor")
            return
        nd = len(x.shape)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        pos_in, pos_out, axis = 0, 0, None
        for i in idx:
            if i is Ellipsis:
                skip = nd - n_real
                if pos_in <= lay.axis < pos_in + skip:
                    axis = pos_out + (lay.axis - pos_in)
                pos_in += skip
                pos_out += skip
            elif i is None:
                pos_out += 1
            else:
                if pos_in == lay.axis:
                    if not (isinstance(i, slice) and i == slice(None)):
                        self.refuse(lay, f"{self.where(n)} selects part of the channel axis")
                        return
                    axis = pos_out
                pos_in += 1
                if not isinstance(i, int):
                    pos_out += 1
        if axis is None:
            axis = pos_out + (lay.axis - pos_in)
        self.pass_all(n, lay, axis)
