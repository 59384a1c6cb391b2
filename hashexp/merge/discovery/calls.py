"""The rules for torch functions and tensor methods met on the channels (see walk.py).

A :class:`Layout` says where a tensor's channels lie; :class:`CallRules` maps each recorded
function call to what it does to them: pass through (elementwise, dropout, reductions and
pools over other axes, reshapes that keep the channel axis whole, permutes, indexing of other
axes), unify (add, multiply), concatenate at offsets, or refuse with the op and the module path.
Anything not listed refuses (fail closed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hashexp.merge.discovery.trace import Node, Value

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



class CallRules:
    """Mixin of :class:`~hashexp.merge.discovery.walk.Walk`: the rules for ``call`` nodes."""

    def visit_call(self, n: Node) -> None:
        """Propagate (or refuse) the channel layouts through one function or method call."""
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
            self.split(n, op, nd, lay)
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
        if op in ("softmax", "log_softmax", "layer_norm"):
            self.normalized(n, op, nd, lay)
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

    def split(self, n: Node, op: str, nd: int, lay) -> None:
        """Split, unbind, select or roll: passes the channels when it acts on another axis."""
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

    def normalized(self, n: Node, op: str, nd: int, lay) -> None:
        """Softmax or layer norm: refused when it normalizes over the channel axis, else passed."""
        if op == "layer_norm":
            shape = self.arg(n, 1, "normalized_shape", ())
            over = lay.axis >= nd - len(shape)
            what = "normalizes over the channel axis"
        else:
            dim = self.arg(n, 1, "dim", None)
            over = dim is None or dim % nd == lay.axis
            what = "normalizes over the channels (attention scores)"
        if over:
            self.refuse(lay, f"{self.where(n)} {what}")
        else:
            self.pass_all(n, lay)

    def arg(self, n: Node, pos: int, name: str, default):
        """The call's argument at position ``pos`` or keyword ``name``, else ``default``."""
        if len(n.args) > pos:
            return n.args[pos]
        return n.kwargs.get(name, default)

    def broadcasts(self, lay: Layout, x: Value, o: Value) -> bool:
        """``o`` combines with ``x`` without pairing one value per channel (size 1 or absent there)."""
        k = len(x.shape) - lay.axis  # position from the right
        return len(o.shape) < k or o.shape[len(o.shape) - k] == 1

    def binary(self, n: Node, kind: str) -> None:
        """An elementwise op of ``kind`` (add, mul, div, ...): unify equal layouts, refuse mixing ones."""
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
        """A reduction (sum, mean, max, ...): passes when the channel axis is kept, refuses otherwise."""
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
        """A view/reshape: follow the channel axis when it stays whole (or splits into blocks), else refuse."""
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
        """permute/transpose/t/movedim: move the layout's channel axis with the op."""
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
        """Concatenation: along the channels it chains the segments; along another axis it unifies them."""
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
        """Indexing: follow the channel axis through basic slicing; refuse selecting part of it."""
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
