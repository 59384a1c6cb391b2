"""Surgery: replace a site's neurons by group representatives, in the model and its optimizer.

Merge math (docs/DESIGN.md). Neuron i of a site has the parameter vector p_i = [w_i; b_i] (norms
folded in), scale s_i = |p_i| and direction u_i = p_i / s_i. With activation mass a_i:

- positively homogeneous activations (ReLU): the representative of group G is
  p_r = s_r * u_G with u_G = normalize(sum a_i u_i) and s_r = sum a_i s_i / sum a_i, and every
  consumer column becomes sum_{i in G} (s_i c_i / s_r) V[:, i] with c_i = cos(u_i, u_G). If
  u_i = u_j then h_i = (s_i / s_j) h_j, so exact duplicates and positive rescalings (c_i = 1)
  merge with no change in function; for near-duplicates s_i c_i / s_r is the least-squares
  scale of h_i on h_r's direction (DESIGN's s_i / s_r overshoots by 1 / c_i).
- other activations (tanh, GELU): p_r = sum a_i p_i / sum a_i and consumers sum their columns
  unscaled (groups were hashed on the MIPS transform, so they agree in norm as well).

Both are linear in the p_i: p_r = sum_i R_i p_i. The same coefficients map the optimizer's
first moments (and their squares the second moments), so training continues with merged state
instead of a reset. Each changed parameter is replaced by a new one, in the module and in the
optimizer's param groups, with its state re-mapped.

A plan may also drop neurons (label -1): that is structured pruning, used by the magnitude
baseline, through the same code path.

Traced sites (:mod:`hashexp.merge.discovery`) may have consumers that read the site at an offset
or in blocks (only the site's columns change) and per-channel members (BatchNorm after a
concatenation, depthwise convs). Members can only keep or drop channels, so a plan that folds
several neurons into one is refused on such a site (:func:`check_plan`).
"""

from __future__ import annotations


import torch
from torch import nn

from hashexp.merge.plans import MergePlan, check_plan, is_selection, merge_plan, prune_plan, whole_groups
from hashexp.merge.site import Consumer, MergeSite, norm_affine

_EPS = 1e-12

#: building and checking plans lives in :mod:`hashexp.merge.plans`; these names stay importable from here
__all__ = ["MergePlan", "apply_consumers", "apply_members", "apply_plan", "apply_producers", "check_plan",
           "is_selection", "merge_plan", "prune_plan", "refit_consumer", "whole_groups"]


def _combine(t: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """out[..., g, ...] = sum_{labels==g} coef_i * t[..., i, ...] along ``dim`` (dropped: label -1)."""
    keep = labels >= 0
    if not bool(keep.all()):
        t = t.index_select(dim, keep.nonzero().flatten())
        labels, coef = labels[keep], coef[keep]
    shape = [1] * t.dim()
    shape[dim] = -1
    out_shape = list(t.shape)
    out_shape[dim] = n
    out = torch.zeros(out_shape, dtype=t.dtype, device=t.device)
    return out.index_add_(dim, labels, t * coef.to(t.dtype).reshape(shape))


class _StateMapper:
    """Swaps a parameter for its merged version, in the module and in the optimizer.

    A new ``nn.Parameter`` replaces the old one (autograd caches a leaf's shape, so resizing
    ``.data`` in place is not safe); the optimizer's param groups are pointed at it and its
    state is mapped with the same linear map as the parameter, so nothing stale is left.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.opt = optimizer

    def __call__(self, module: nn.Module, attr: str, new: torch.Tensor, labels, coef, dim: int, n: int) -> None:
        old = getattr(module, attr)
        param = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        setattr(module, attr, param)
        if self.opt is None:
            return
        for group in self.opt.param_groups:
            group["params"] = [param if q is old else q for q in group["params"]]
        st = self.opt.state.pop(old, None)
        if st is None:
            return
        for key, val in list(st.items()):
            if torch.is_tensor(val) and val.shape == old.shape and val.dim() > 0:
                # second moments combine like variances of a weighted sum: squared coefficients
                c = coef * coef if "sq" in key else coef
                st[key] = _combine(val, labels, c, dim, n)
        self.opt.state[param] = st


def apply_plan(site: MergeSite, plan: MergePlan, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Rewrite every tensor of ``site`` (and the optimizer state of each) according to ``plan``."""
    apply_producers(site, plan, optimizer)
    apply_consumers(site, plan, optimizer)


def _swap(module: nn.Module, attr: str, fn, fn_sq, optimizer: torch.optim.Optimizer | None) -> None:
    """Replace ``module.attr`` by ``fn(old)`` (a new Parameter) and map its optimizer state alike
    (second moments, keys with "sq", by ``fn_sq``)."""
    old = getattr(module, attr)
    new = fn(old.data)
    param = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
    setattr(module, attr, param)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [param if q is old else q for q in group["params"]]
    st = optimizer.state.pop(old, None)
    if st is None:
        return
    for key, val in list(st.items()):
        if torch.is_tensor(val) and val.shape == old.shape and val.dim() > 0:
            st[key] = (fn_sq if "sq" in key else fn)(val)
    optimizer.state[param] = st


def _selection_index(plan: MergePlan) -> torch.Tensor:
    """For a selection plan: the old channel kept for each new channel, in label order."""
    kept = ((plan.labels >= 0) & (plan.r != 0)).nonzero().flatten()
    return kept[plan.labels[kept].argsort()]


def apply_members(site: MergeSite, plan: MergePlan, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Members keep the channels the plan keeps (each member's other sites' channels stay)."""
    if not site.members:
        return
    check_plan(site, plan)
    src = _selection_index(plan)
    width = len(plan.labels)
    with torch.no_grad():
        for mem in site.members:
            mod = mem.module
            off = mem.offset
            total = _channels(mod)
            idx = torch.cat([torch.arange(off), off + src.cpu(), torch.arange(off + width, total)])
            n_total = len(idx)
            for name, p in list(mod.named_parameters(recurse=False)):
                if p.dim() and p.shape[0] == total:
                    i = idx.to(p.device)
                    _swap(mod, name, lambda t, i=i: t.index_select(0, i), lambda t, i=i: t.index_select(0, i), optimizer)
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.dim() and b.shape[0] == total:
                    setattr(mod, name, b.index_select(0, idx.to(b.device)))
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.num_features = n_total
            elif isinstance(mod, nn.modules.conv._ConvNd):
                mod.in_channels = mod.out_channels = mod.groups = n_total


def _channels(mod: nn.Module) -> int:
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return int(mod.num_features)
    return int(mod.weight.shape[0])


def apply_producers(site: MergeSite, plan: MergePlan, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Producers (and their norms) become the group representatives ``sum r_i p_i``."""
    labels, r, a, n = plan.labels, plan.r, plan.a, plan.new_width
    remap = _StateMapper(optimizer)
    with torch.no_grad():
        for prod in site.producers:
            mod, bn = prod.module, prod.norm
            w = mod.weight
            if bn is None:
                rl, rr, rn = prod.rows(labels, r, n)  # a fused q/k/v producer: the plan on each part
                remap(mod, "weight", _combine(w.data, rl, rr, 0, rn), rl, rr, 0, rn)
                if mod.bias is not None:
                    remap(mod, "bias", _combine(mod.bias.data, rl, rr, 0, rn), rl, rr, 0, rn)
                _set_out(mod, rn)
                continue
            else:
                c, _ = norm_affine(bn)
                c = c.to(w.dtype)
                _, bf = prod.folded()
                bf_r = _combine(bf, labels, r, 0, n)
                c_r = _combine(c.abs().clamp_min(_EPS), labels, a, 0, n)
                # raw weights with a positive scale c_r: W_r = Wf_r / c_r  (linear in the W_i)
                wcoef = r * c / c_r[labels].clamp_min(_EPS) if n else r
                remap(mod, "weight", _combine(w.data, labels, wcoef, 0, n), labels, wcoef, 0, n)
                mu_r = _combine(bn.running_mean, labels, a, 0, n)
                var_r = _combine(bn.running_var, labels, a, 0, n)
                b_r = None
                if mod.bias is not None:
                    b_r = _combine(mod.bias.data, labels, a, 0, n)
                    remap(mod, "bias", b_r, labels, a, 0, n)
                shift = -mu_r if b_r is None else b_r - mu_r
                gamma_r = c_r * torch.sqrt(var_r + bn.eps)
                beta_r = bf_r.flatten() - c_r * shift
                bn.running_mean = mu_r
                bn.running_var = var_r
                if bn.affine:
                    remap(bn, "weight", gamma_r, labels, a, 0, n)
                    remap(bn, "bias", beta_r, labels, a, 0, n)
                bn.num_features = n
            _set_out(mod, n)
    apply_members(site, plan, optimizer)


def apply_consumers(site: MergeSite, plan: MergePlan, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Consumers take the weight rule: new column g = ``sum_{labels==g} m_i V[:, i]``."""
    labels, m, n = plan.labels, plan.m, plan.new_width
    remap = _StateMapper(optimizer)
    width = len(labels)
    with torch.no_grad():
        for cons in site.consumers:
            mod = cons.module
            if cons.plain:
                remap(mod, "weight", _combine(mod.weight.data, labels, m, 1, n), labels, m, 1, n)
                _set_in(mod, n)
                continue
            m_sq = m * m
            _swap(mod, "weight", lambda t: _on_site(t, cons, width, lambda w: _combine(w, labels, m, 1, n)),
                  lambda t: _on_site(t, cons, width, lambda w: _combine(w, labels, m_sq, 1, n)), optimizer)
            _set_in(mod, int(mod.weight.shape[1]))


def _on_site(w: torch.Tensor, cons: Consumer, width: int, fn) -> torch.Tensor:
    """Apply ``fn`` to the site's columns of a consumer weight, as (out, width, *kernel or block)."""
    block = cons.block
    v = w.reshape(w.shape[0], -1, block) if block > 1 else w
    off = cons.offset
    mid = fn(v[:, off:off + width])
    out = torch.cat([v[:, :off], mid.to(v.dtype), v[:, off + width:]], 1)
    return out.reshape(w.shape[0], -1) if block > 1 else out


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """The precision a parameter's map is applied in: float64 for float64 tensors, else float32 (the
    map of a float32 weight is rounded to float32 anyway; float32 products run about twice as fast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dense_map(t: torch.Tensor, tmap: torch.Tensor, split: tuple | None = None) -> torch.Tensor:
    """out[:, g, ...] = sum_i t[:, i, ...] tmap[g, i]: a (k, n) map applied on dim 1.

    Columns of ``tmap`` that are unit vectors (a survivor that keeps its column, most of a
    pruning refit) are copied, not multiplied: the product runs over the other columns only.
    ``split``: :func:`_unit_split` of ``tmap``, when several tensors take maps of the same pattern.
    When every new column is exactly one copied column (a pruning refit), the copies are gathered
    into the output and the product is added in place (one gather and one addmm for a matrix).
    """
    tmap = tmap.to(t.dtype)
    rest, src, dst = _unit_split(tmap) if split is None else split
    if len(src) == 0:
        return torch.einsum("oi...,gi->og...", t, tmap)
    if len(src) == tmap.shape[0] and t.dim() == 2 and bool((dst.sort().values == torch.arange(
            len(dst), device=dst.device)).all()):
        out = t.index_select(1, src[torch.argsort(dst)])
        return out.addmm_(t.index_select(1, rest), tmap.index_select(1, rest).T) if len(rest) else out
    out = torch.einsum("oi...,gi->og...", t.index_select(1, rest), tmap.index_select(1, rest))
    return out.index_add_(1, dst, t.index_select(1, src))


def _unit_split(tmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rest, src, dst) of a (k, n) map: the columns that are not unit vectors, those that are, and
    the new column each of those is copied to. Squaring the map (second moments) keeps them."""
    unit = (tmap != 0).sum(0) == 1
    unit &= tmap.sum(0) == 1
    src = unit.nonzero().flatten()
    return (~unit).nonzero().flatten(), src, tmap.index_select(1, src).argmax(0)


def refit_consumer(module: nn.Module | Consumer, tmap: torch.Tensor, shift: torch.Tensor | None,
                   optimizer: torch.optim.Optimizer | None = None,
                   norm: nn.modules.batchnorm._BatchNorm | None = None) -> None:
    """Least-squares refit of one consumer: input features x_old = x_new @ tmap + shift.

    The weight becomes W tmap^T (every kernel position alike) and the bias b + W shift (summed
    over kernel positions). A consumer without bias hands the constant W shift to the BatchNorm
    that follows it (``norm``): its running mean moves by -W shift, so eval outputs are unchanged
    (train-mode batch statistics absorb it anyway). Optimizer moments follow the same map
    (second moments with squared coefficients). A :class:`Consumer` that reads the site at an
    offset or in blocks has only the site's columns mapped.
    """
    if isinstance(module, Consumer):
        cons = module
        norm = norm if norm is not None else cons.norm
        if not cons.plain:
            _refit_columns(cons, tmap, shift, optimizer, norm)
            return
        module = cons.module
    n_new = int(tmap.shape[0])
    with torch.no_grad():
        old = module.weight
        w = old.data
        split = _unit_split(tmap)
        new_w = _dense_map(w.to(_work_dtype(w)), tmap, split).to(w.dtype)
        param = nn.Parameter(new_w.contiguous(), requires_grad=old.requires_grad)
        setattr(module, "weight", param)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [param if q is old else q for q in group["params"]]
            st = optimizer.state.pop(old, None)
            if st is not None:
                for key, val in list(st.items()):
                    if torch.is_tensor(val) and val.shape == old.shape and val.dim() > 0:
                        tm = tmap * tmap if "sq" in key else tmap
                        st[key] = _dense_map(val.to(_work_dtype(val)), tm, split).to(val.dtype)
                optimizer.state[param] = st
        if shift is not None:
            wsum = w.double().flatten(2).sum(2) if w.dim() > 2 else w.double()
            delta = wsum @ shift.double().to(w.device)
            if getattr(module, "bias", None) is not None:
                module.bias.data.add_(delta.to(module.bias.dtype))
            elif norm is not None and norm.running_mean is not None:
                norm.running_mean.sub_(delta.to(norm.running_mean.dtype))
        _set_in(module, n_new)


def _refit_columns(cons: Consumer, tmap: torch.Tensor, shift: torch.Tensor | None,
                   optimizer: torch.optim.Optimizer | None, norm) -> None:
    """:func:`refit_consumer` on the site's columns of a consumer that reads other channels too."""
    mod = cons.module
    width = int(tmap.shape[1])
    with torch.no_grad():
        w = mod.weight.data
        if shift is not None:
            v = w.reshape(w.shape[0], -1, cons.block) if cons.block > 1 else w
            mid = v[:, cons.offset:cons.offset + width].double()
            delta = (mid.flatten(2).sum(2) if mid.dim() > 2 else mid) @ shift.double().to(w.device)
        tm, tm_sq = tmap.double(), (tmap * tmap).double()
        _swap(mod, "weight",
              lambda t: _on_site(t, cons, width, lambda x: _dense_map(x.to(_work_dtype(x)), tm).to(x.dtype)),
              lambda t: _on_site(t, cons, width, lambda x: _dense_map(x.to(_work_dtype(x)), tm_sq).to(x.dtype)),
              optimizer)
        if shift is not None:
            if getattr(mod, "bias", None) is not None:
                mod.bias.data.add_(delta.to(mod.bias.dtype))
            elif norm is not None and norm.running_mean is not None:
                norm.running_mean.sub_(delta.to(norm.running_mean.dtype))
        _set_in(mod, int(mod.weight.shape[1]))


def _set_out(mod: nn.Module, n: int) -> None:
    if isinstance(mod, nn.Linear):
        mod.out_features = n
    elif isinstance(mod, nn.modules.conv._ConvNd):
        mod.out_channels = n


def _set_in(mod: nn.Module, n: int) -> None:
    if isinstance(mod, nn.Linear):
        mod.in_features = n
    elif isinstance(mod, nn.modules.conv._ConvNd):
        mod.in_channels = n
