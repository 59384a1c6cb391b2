"""Verify a found site by number: perturb one channel, see exactly the claimed inputs change.

Every Linear/Conv of the model (except the site's depthwise members) is frozen at the output it
gave on the clean pass, so a perturbation can only travel through what lies between layers
(activations, norms, adds, concatenations, reshapes). Then channel c of every producer of the
site (every part of a fused q/k/v projection) is moved up (and, in a second pass, down) by more
than the channel's range. The site passes when each consumer's input changed in the claimed
channel (at its offset, in its block; for attention heads, in its head's columns) and nowhere
else, every other layer's input and the model output did not change, and some consumer saw the
change. A leak the walk did not see (an op that mixes channels, a reader it
missed) fails the site, with what changed where.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from hashexp.merge.site import MergeSite


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def _call(model: nn.Module, x: Any):
    return model(*x) if isinstance(x, tuple) else model(x)


def _channels_changed(m: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Indices on the input channel axis (dim 1 of a conv, features of a Linear) where a != b."""
    diff = (a - b).abs()
    tol = 1e-5 * (1.0 + float(b.abs().max()))
    if isinstance(m, nn.Linear):
        d = diff.reshape(-1, diff.shape[-1]).amax(0)
    else:
        d = diff.movedim(1, 0).reshape(diff.shape[1], -1).amax(1)
    return (d > tol).nonzero().flatten()


def verify_sites(model: nn.Module, x: Any, sites: list[MergeSite]) -> dict[str, str]:
    """Check each site numerically (see the module docstring); returns ``{name: reason}`` of failures."""
    layers = _layers(model)
    clean_in: dict[int, list[torch.Tensor]] = {}
    clean_out: dict[int, list[torch.Tensor]] = {}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    handles = []

    def rec(module, inputs, output):
        clean_in.setdefault(id(module), []).append(inputs[0].detach().clone())
        clean_out.setdefault(id(module), []).append(output.detach().clone())

    try:
        for _, m in layers:
            handles.append(m.register_forward_hook(rec))
        with torch.no_grad():
            y0 = [t.clone() for t in tree_flatten(_call(model, x))[0] if isinstance(t, torch.Tensor)]
        for h in handles:
            h.remove()
        handles = []
        failures = {}
        for site in sites:
            reason = _verify_one(model, x, site, layers, clean_in, clean_out, y0)
            if reason:
                failures[site.name] = reason
        return failures
    finally:
        for h in handles:
            h.remove()
        for m, tr in modes:
            m.training = tr


def _verify_one(model, x, site: MergeSite, layers, clean_in, clean_out, y0) -> str | None:
    """Try a few channels (a saturated or dead channel may hide a change) with a large and a small
    step up and down; every try must stay inside the claimed inputs, one must show up."""
    width = site.width
    if not any(id(k.module) in clean_in for k in site.consumers):
        return "its layers run only in training mode (an auxiliary branch), where it cannot be checked by number"
    tried = list(dict.fromkeys((width // 2, width // 3, 0, width - 1, width // 4, (3 * width) // 4)))
    for c in tried:
        for scale in (4.0, 0.05):
            res = _perturb(model, x, site, layers, clean_in, clean_out, y0, c, scale)
            if res != "unseen":
                return res
    return f"numerical check: perturbing channels {tried} changed no consumer input"


def _perturb(model, x, site: MergeSite, layers, clean_in, clean_out, y0, c: int, scale: float) -> str | None:
    members = {id(m.module) for m in site.members}
    producers = {id(p.module) for p in site.producers}
    parts = {id(p.module): p.parts for p in site.producers}
    width = site.width
    cons = {id(k.module): k for k in site.consumers}
    paths = {id(m): p for p, m in layers}
    by_id = {id(m): m for _, m in layers}
    any_seen = False
    for sign in (1.0, -1.0):
        seen_in: dict[int, list[torch.Tensor]] = {}
        count: dict[int, int] = {}

        def pre(module, inputs):
            seen_in.setdefault(id(module), []).append(inputs[0].detach().clone())

        def frozen(module):
            def forward(*args, **kwargs):
                k = count.get(id(module), 0)
                count[id(module)] = k + 1
                out = clean_out[id(module)][k].clone()
                if id(module) in producers:
                    for part in range(parts.get(id(module), 1)):  # a fused q/k/v projection: every part
                        ch = out.select(-1 if isinstance(module, nn.Linear) else 1, part * width + c)
                        ch.add_(sign * scale * (1.0 + float(ch.abs().max())))
                return out
            return forward

        handles, patched = [], []
        for _, m in layers:
            handles.append(m.register_forward_pre_hook(pre))
            if id(m) not in members:  # skip the layer's compute: its output is the clean one
                m.forward = frozen(m)
                patched.append(m)
        try:
            with torch.no_grad():
                y = [t for t in tree_flatten(_call(model, x))[0] if isinstance(t, torch.Tensor)]
        except Exception as e:  # a perturbation must never break a forward the clean input ran
            return f"numerical check: the perturbed forward failed ({type(e).__name__}: {e})"
        finally:
            for h in handles:
                h.remove()
            for m in patched:
                del m.forward
        for a, b in zip(y, y0):
            if not torch.equal(a, b) and not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                return f"numerical check: perturbing channel {c} changed the model output"
        for mid, ins in seen_in.items():
            if mid in members:
                continue
            m = by_id[mid]
            for a, b in zip(ins, clean_in.get(mid, [])):
                changed = _channels_changed(m, a, b)
                if not len(changed):
                    continue
                if mid not in cons:
                    return (f"numerical check: perturbing channel {c} changed the input of {paths[mid]}, "
                            f"which the site does not list as a consumer")
                k = cons[mid]
                g = site.group  # a head's q/k rows change all of its output features
                lo = (k.offset + c // g * g) * k.block
                span = g * k.block
                ok = (changed >= lo) & (changed < lo + span)
                if not bool(ok.all()):
                    bad = changed[~ok][:5].tolist()
                    return (f"numerical check: perturbing channel {c} changed input entries {bad} of consumer "
                            f"{paths[mid]}, expected only {lo}..{lo + span - 1}")
                any_seen = True
    return None if any_seen else "unseen"
