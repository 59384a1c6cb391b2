"""Attention heads found in a trace (the site kind ``heads``; what it means: :mod:`hashexp.merge.heads`).

A fused projection whose only reader views its output as ``(..., 3, heads, head_dim)``, and the
first Linear after it in the same module, reading a ``(..., heads, head_dim)`` tensor reshaped to
``heads * head_dim`` features, form a head site: producer the fused projection (``parts = 3``),
consumer the output projection, ``group = head_dim``. The site is then checked by number like any
other (:mod:`~hashexp.merge.discovery.verify`) and by running the model with one head removed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hashexp.merge.site import Consumer, MergeSite, Producer

_VIEWS = ("view", "reshape")
_FLATS = ("view", "reshape", "flatten")
MHA_REASON = ("nn.MultiheadAttention: its fused in_proj_weight is not a Linear and F.multi_head_attention_forward "
              "needs num_heads * head_dim == embed_dim (the query width), so a head cannot leave without "
              "replacing the module; write attention with a fused qkv Linear (hashexp.models.vit.Attention)")


def find_head_sites(model: nn.Module, tr, x: Any) -> tuple[list[tuple[int, MergeSite]], list[tuple[str, int, str]]]:
    """Head sites of ``model`` in trace ``tr``: ``[(call index of the qkv projection, site)]`` and
    ``[(path, heads, reason)]`` of the attention it recognized but refuses."""
    found, refused = [], []
    mods = dict(model.named_modules())
    for path, m in mods.items():
        if isinstance(m, nn.MultiheadAttention) and id(m) in tr.calls:
            refused.append((path, int(m.num_heads), MHA_REASON))
    readers: dict[int, list] = {}
    for n in tr.nodes:
        for v in n.inputs:
            readers.setdefault(v.idx, []).append(n)
    for n in tr.nodes:
        m = n.module
        if n.kind != "module" or not isinstance(m, nn.Linear) or tr.calls.get(id(m)) != 1 or not n.outputs:
            continue
        split = _qkv_split(n, readers)
        if split is None:
            continue
        heads, head_dim = split
        proj = _output_projection(n, tr, heads, head_dim)
        if proj is None:
            continue
        width = heads * head_dim
        site = MergeSite(name=n.path, producers=[Producer(m, parts=3)], consumers=[Consumer(proj)],
                         activation="attention", tap=None, min_width=head_dim, kind="heads", group=head_dim)
        found.append((n.idx, site))
    return found, refused


def _qkv_split(n, readers) -> tuple[int, int] | None:
    """(heads, head_dim) when the Linear's output is read only by one view to (..., 3, heads, head_dim)."""
    out = n.outputs[0]
    rs = readers.get(out.idx, [])
    if len(rs) != 1 or rs[0].op not in _VIEWS or not rs[0].outputs:
        return None
    shp, lead = rs[0].outputs[0].shape, out.shape[:-1]
    if len(shp) != len(lead) + 3 or tuple(shp[:len(lead)]) != tuple(lead) or shp[-3] != 3:
        return None
    if 3 * shp[-2] * shp[-1] != out.shape[-1]:
        return None
    return int(shp[-2]), int(shp[-1])


def _output_projection(n, tr, heads: int, head_dim: int) -> nn.Module | None:
    """The Linear after ``n`` in the same parent module whose input is a (..., heads, head_dim)
    tensor reshaped to heads * head_dim features."""
    parent = n.path.rsplit(".", 1)[0] if "." in n.path else ""
    for k in tr.nodes[n.idx + 1:]:
        m = k.module
        if k.kind != "module" or not isinstance(m, nn.Linear):
            continue
        if parent and not k.path.startswith(parent + "."):
            return None
        src = tr.nodes[k.inputs[0].node] if k.inputs and k.inputs[0].node is not None else None
        if (src is not None and src.op in _FLATS and src.inputs and tuple(src.inputs[0].shape[-2:]) == (heads, head_dim)
                and m.in_features == heads * head_dim and tr.calls.get(id(m)) == 1):
            return m
        return None
    return None


def runs_without_a_head(model: nn.Module, x: Any, sites: list[MergeSite]) -> dict[str, str]:
    """Remove the last head of every site at once (and, if the forward fails, of each alone), run the
    model, put the weights back; returns ``{site: reason}`` for the sites whose forward fails."""
    from hashexp.merge.surgery import apply_plan, prune_plan

    def attempt(group: list[MergeSite]) -> str | None:
        saved = [(mod, {a: getattr(mod, a) for a in ("weight", "bias", "in_features", "out_features")})
                 for s in group for mod in (s.producers[0].module, s.consumers[0].module)]
        try:
            for s in group:
                if s.width > s.group:
                    apply_plan(s, prune_plan(s, torch.arange(s.width - s.group, device=s.device)))
            with torch.no_grad():
                model(*x) if isinstance(x, tuple) else model(x)
            return None
        except Exception as e:  # the forward does not follow the projection's width
            return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        finally:
            for mod, attrs in saved:
                for a, v in attrs.items():
                    setattr(mod, a, v)

    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if not sites or attempt(sites) is None:
            return {}
        out = {}
        for s in sites:
            err = attempt([s])
            if err:
                out[s.name] = (f"its heads are recognized, but the model does not run with one head removed ({err}): "
                               "the attention module reshapes to a fixed width or keeps its own head count "
                               "(timm's Attention does both); read the count from the qkv projection's width")
        return out
    finally:
        for m, t in training:
            m.training = t
