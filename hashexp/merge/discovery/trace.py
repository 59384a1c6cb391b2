"""Record what a model computes by running it once on a real batch.

Why executing, not symbolic tracing. Measured (benchmarks/bench_tracers.md, bench_anymodel.md):
on torchvision's classification models torch.fx.symbolic_trace succeeds too and captures the
graph 1.4-10x faster (it does not run the model), torch.export (non-strict) is 2-18x slower than
this recorder. fx was still not chosen: its proxies stop on data-dependent Python (branches on
shapes or values, ``torch._assert``, dict or dataclass outputs), common in timm and HuggingFace
code and in the peers' bug lists (NNI, Torch-Pruning), and fx gives no shapes, which the walk
needs (a reshape that splits channels, the block size of a flatten, concatenation offsets). The
numerical check runs the model anyway, and capture costs well under a second for most models.
Running the model under a ``TorchFunctionMode`` sees every torch function and tensor method the
Python code actually called, with real shapes, whatever the control flow; forward hooks see
every module call. In-place ops (``out += identity``, ``ReLU(inplace=True)``) are recorded as new
values of the same tensor.

The graph has one node per call of a *leaf* module (Linear, Conv, norms, activations, pooling,
dropout, attention, embeddings, RNNs: :data:`LEAF_TYPES`; nothing inside them is recorded) and one
node per torch function called outside leaves. Each node lists the :class:`Value` objects (the
tensors) it read and wrote. Values that no node produced are the model input, parameters, buffers
or constants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

#: modules recorded as one node each (their internals are not traced)
LEAF_TYPES: tuple[type, ...] = (
    nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus,
    nn.PReLU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Softmax, nn.modules.dropout._DropoutNd, nn.Identity,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten, nn.Embedding, nn.EmbeddingBag,
    nn.MultiheadAttention, nn.RNNBase, nn.Upsample,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(eq=False)
class Value:
    """One tensor seen in the trace (a new one after each in-place update).

    Attributes:
        idx: creation order.
        shape: its shape.
        node: index of the node that wrote it (None: model input, parameter, buffer, constant).
        origin: ``input``, ``param`` (an ``nn.Parameter`` or buffer), ``const`` or ``op``.
    """

    idx: int
    shape: tuple[int, ...]
    node: int | None
    origin: str


@dataclass(eq=False)
class Node:
    """One recorded call.

    Attributes:
        idx: execution order.
        kind: ``module`` (a leaf module call) or ``call`` (a torch function or tensor method).
        op: the module's class name or the function's name.
        path: the module's path (``module``) or the path of the innermost module running it.
        module: the leaf module (``module`` nodes).
        args, kwargs: the call's arguments with tensors replaced by their :class:`Value`.
        inputs: every input Value in argument order.
        outputs: every output Value (several for split/chunk).
        out: the call's output structure with tensors replaced by Values.
        inplace: the call modified its first input in place.
    """

    idx: int
    kind: str
    op: str
    path: str
    module: nn.Module | None
    args: tuple
    kwargs: dict
    inputs: list[Value]
    outputs: list[Value] = field(default_factory=list)
    out: Any = None
    inplace: bool = False


@dataclass
class Trace:
    """A recorded forward: nodes in execution order, the input and output Values, module calls."""

    nodes: list[Node]
    values: list[Value]
    inputs: list[Value]
    outputs: list[Value]
    calls: dict[int, int]            # id(module) -> number of calls
    paths: dict[int, str]            # id(module) -> path
    seconds: float = 0.0


def _name(func) -> str:
    n = getattr(func, "__name__", None) or str(func)
    return n


class _Recorder(TorchFunctionMode):
    """Records torch function calls made outside leaf modules; hooks record the leaf modules."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.nodes: list[Node] = []
        self.values: list[Value] = []
        self.of: dict[int, Value] = {}
        self.alive: list[torch.Tensor] = []   # keeps ids unique while the trace runs
        self.stack: list[str] = [""]
        self.leaf_depth = 0
        self.calls: dict[int, int] = {}
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.params = {id(t) for t in list(model.parameters()) + list(model.buffers())}
        self.pending: list[tuple[nn.Module, list, tuple, dict]] = []

    # -------------------------------------------------------------- values
    def value(self, t: torch.Tensor, node: int | None = None, origin: str = "op") -> Value:
        v = Value(len(self.values), tuple(t.shape), node, origin)
        self.values.append(v)
        self.of[id(t)] = v
        self.alive.append(t)
        return v

    def lookup(self, t: torch.Tensor) -> Value:
        v = self.of.get(id(t))
        if v is None:
            v = self.value(t, None, "param" if id(t) in self.params or isinstance(t, nn.Parameter) else "const")
        return v

    def _wrap_in(self, args, kwargs):
        flat, _ = tree_flatten((args, kwargs))
        ins = [self.lookup(t) for t in flat if isinstance(t, torch.Tensor)]
        a, k = tree_map(lambda t: self.of[id(t)] if isinstance(t, torch.Tensor) else t, (args, kwargs))
        return ins, a, k

    def _record(self, kind, op, path, module, args, kwargs, result, first_in: torch.Tensor | None,
                inplace: bool) -> None:
        ins, a, k = self._wrap_in(args, kwargs)
        node = Node(len(self.nodes), kind, op, path, module, a, k, ins)
        self.nodes.append(node)
        in_ids = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}

        def out_value(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in in_ids and not (inplace and first_in is not None and t is first_in):
                return self.of[id(t)]  # an op that returned its input unchanged (Identity, eval dropout)
            v = self.value(t, node.idx)
            node.outputs.append(v)
            return v

        node.out = tree_map(out_value, result)
        node.inplace = inplace

    # -------------------------------------------------------------- functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.leaf_depth:
            return result
        name = _name(func)
        if name in ("__get__", "__set__") and not isinstance(result, torch.Tensor):
            return result
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not flat_in and not isinstance(result, torch.Tensor):
            return result
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        inplace = bool(first is not None and result is first and (
            (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or kwargs.get("inplace")))
        self._record("call", name, self.stack[-1], None, args, kwargs, result, first, inplace)
        return result

    # -------------------------------------------------------------- module hooks
    def pre(self, module, args, kwargs):
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        path = self.paths.get(id(module), "?")
        self.stack.append(path)
        if isinstance(module, LEAF_TYPES):
            if self.leaf_depth == 0:
                self.pending.append((module, path, args, kwargs))
            self.leaf_depth += 1
        return None

    def post(self, module, args, kwargs, output):
        self.stack.pop()
        if isinstance(module, LEAF_TYPES):
            self.leaf_depth -= 1
            if self.leaf_depth == 0:
                mod, path, a, k = self.pending.pop()
                first = a[0] if a and isinstance(a[0], torch.Tensor) else None
                inplace = bool(getattr(module, "inplace", False)) and first is not None and output is first
                self._record("module", type(module).__name__, path, module, a, k, output, first, inplace)
        return None


def trace(model: nn.Module, example_input: Any, train: bool = False) -> Trace:
    """Run ``model(example_input)`` in eval mode without gradients and record every call.

    The model's training flags are restored afterwards; BatchNorm running statistics are not
    touched (eval mode) and no random number is drawn by the trace itself. ``train=True`` runs
    in training mode instead (for branches only training takes, e.g. auxiliary classifiers);
    buffers and the random number generator are restored afterwards.
    """
    if train:
        saved = [(m, n, b.clone()) for m in model.modules() for n, b in m.named_buffers(recurse=False)
                 if b is not None]
        modes = [(m, m.training) for m in model.modules()]
        with torch.random.fork_rng(devices=[]):
            try:
                model.train()
                return _trace(model, example_input, keep_mode=True)
            finally:
                with torch.no_grad():
                    for m, n, b in saved:
                        getattr(m, n).copy_(b)
                for m, tr in modes:
                    m.training = tr
    return _trace(model, example_input)


def _trace(model: nn.Module, example_input: Any, keep_mode: bool = False) -> Trace:
    rec = _Recorder(model)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, with_kwargs=True))
    modes = [(m, m.training) for m in model.modules()]
    if not keep_mode:
        model.eval()
    t0 = time.perf_counter()
    inputs = [t for t in tree_flatten(example_input)[0] if isinstance(t, torch.Tensor)]
    try:
        with torch.no_grad(), rec:
            in_vals = [rec.value(t, None, "input") for t in inputs]
            out = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, tr in modes:
            m.training = tr
    outs = [rec.of[id(t)] for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and id(t) in rec.of]
    return Trace(rec.nodes, rec.values, in_vals, outs, rec.calls, rec.paths, time.perf_counter() - t0)
