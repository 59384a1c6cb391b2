"""Attention heads as a merge site: found in a trace, removed whole, absorbed by least squares.

A head of multi-head attention is the unit the site loses: its q, k and v rows in a fused qkv
projection and its ``head_dim`` input columns of the output projection. The site is written in
features (width ``heads * head_dim``, ``group = head_dim``): the producer holds them three times
(``parts = 3``: q, k, v rows ``p * width + f``), the output projection reads them plainly, and a
plan keeps or drops whole groups (:func:`hashexp.merge.surgery.check_plan`).

What "merge" means for heads. ``softmax(q k^T / sqrt(d)) v`` is not linear in a head's rows, so
two heads are never averaged (not q/k, not v): a head is *removed*, and the output projection is
refit by ridge least squares on the calibration set, regressing every old head's output features
on the surviving heads' (the method's ``representative=keep`` with ``compensation=lsq``, which
needs no homogeneity). A removed head whose output the survivors reproduce costs nothing; planted
duplicate heads (same q, k, v rows; the output projection's columns split between them) are
merged back exactly.

Planning works on per-head vectors so that the error-ordered plan and the budget apply unchanged:

- candidates (:func:`head_vectors`): each head's output block on the calibration set, centred and
  flattened (heads that compute the same thing collide), hashed or listed like neurons;
- the order (:func:`head_removal_order`): structured OBS over the projection's input features,
  one whole head per step (cost ``tr(W_B H_BB^-1 W_B^T)`` for the head's columns B, the exact
  block update after it), so the budget cuts a prefix of whole heads.

Discovery (:func:`hashexp.merge.discovery.heads.find_head_sites`) recognizes a fused projection whose output is viewed as
``(..., 3, heads, head_dim)`` and an output projection, in the same module, that reads a
``(..., heads, head_dim)`` tensor reshaped back to ``heads * head_dim`` features: the zoo ViT's
``Attention``, and any module written that way (timm's ``Attention`` with fused qkv). Each is
checked by number (perturbing one head's q, k, v rows changes only that head's columns of the
projection's input) and by running the model with one head removed: a module whose forward does
not follow the projection's width (timm's ``Attention`` reshapes to its input width and reads
``num_heads``) is refused with the error. ``nn.MultiheadAttention`` is refused with its reason:
its ``in_proj_weight`` is not a Linear, and ``F.multi_head_attention_forward`` requires
``num_heads * head_dim == embed_dim`` (the query width), so heads cannot leave without replacing it.
"""

from __future__ import annotations

import torch

from hashexp.merge import calibration as cal

def head_vectors(x: torch.Tensor, group: int, rows: int = 2048) -> torch.Tensor:
    """(heads, rows * group): each head's centred output block on (a fixed subset of) the calibration rows."""
    if x.shape[0] > rows:
        x = x[torch.linspace(0, x.shape[0] - 1, rows).long()]
    xc = (x - x.mean(0)).float()
    return xc.reshape(xc.shape[0], -1, group).permute(1, 0, 2).reshape(xc.shape[1] // group, -1).contiguous()


def head_removal_order(cap: cal.SiteCapture, group: int, eligible: torch.Tensor, floor: int,
                       ridge: float = 1e-3, max_error: float | None = None) -> cal.RemovalOrder:
    """Remove eligible heads (``eligible``: (width,) per feature) cheapest first, one per step, down to
    ``floor`` features; the budget ``max_error`` only says where to stop computing (as
    :func:`hashexp.merge.calibration.obs_removal_order`, of which this is the grouped form)."""
    width = int(cap.inputs[0].shape[1])
    heads = width // group
    hs, ws, energy = [], [], 0.0
    for x, w in zip(cap.inputs, cap.weights):
        g = cal.centred_gram(x)
        energy += float(((w @ g) * w).sum())
        hs.append(cal._spd_inverse(cal._ridge(g, ridge)))
        ws.append(w.clone())
    alive = list(range(heads))
    allowed = eligible.reshape(heads, group).any(1)
    blocks, costs, total = [], [], 0.0
    budget = None if max_error is None else float(max_error) ** 2 * energy
    while (len(alive) - 1) * group >= floor and any(bool(allowed[h]) for h in alive):
        best, best_cost = None, float("inf")
        for j, h in enumerate(alive):
            if not bool(allowed[h]):
                continue
            b = torch.arange(j * group, (j + 1) * group)
            c = sum(float(((w[:, b] @ torch.linalg.inv(hh[b][:, b])) * w[:, b]).sum()) for hh, w in zip(hs, ws))
            if c < best_cost:
                best, best_cost = j, c
        b = torch.arange(best * group, (best + 1) * group)
        keep = torch.ones(len(alive) * group, dtype=torch.bool)
        keep[b] = False
        for i, (hh, w) in enumerate(zip(hs, ws)):
            hbb_inv = torch.linalg.inv(hh[b][:, b])
            c = hbb_inv @ hh[b][:, keep]
            ws[i] = (w[:, keep] - w[:, b] @ c)
            hs[i] = hh[keep][:, keep] - hh[keep][:, b] @ c
        total += max(best_cost, 0.0)
        h = alive.pop(best)
        blocks.append(torch.arange(h * group, (h + 1) * group))
        costs.append(total)
        if budget is not None and total > budget:
            break
    return cal.RemovalOrder(blocks=blocks, cost=costs, energy=energy)


def keep_groups(score: torch.Tensor, group: int, n_keep: int) -> torch.Tensor:
    """Feature indices of the ``n_keep // group`` groups with the largest summed ``score`` (sorted)."""
    per = score.reshape(-1, group).sum(1)
    top = torch.topk(per, max(1, n_keep // group)).indices.sort().values
    return (top[:, None] * group + torch.arange(group, device=top.device)).flatten()
