"""Activation statistics of the merge sites: what weighs a representative.

Forward hooks on each site's tap sum |activation| per neuron over recent training batches; the
compressor weighs group members by these sums (an activation-weighted mean of their directions).
A traced site without a tap of its own (an activation module shared with other sites) is
measured on its first consumer's input instead (its channels only).
"""

from __future__ import annotations

from collections import deque

import torch

from hashexp.merge.sites import MergeSite, site_input


class ActivationStats:
    """Summed |activation| per neuron of each site over the last ``window`` training batches.

    Hooks run only in training mode, so evaluation batches never weigh a representative. The
    sums are per-batch tensors in a ring buffer; ``reset(site)`` after a rehash because the
    width changed. ``window=0`` keeps everything since the last reset.
    """

    def __init__(self, sites: list[MergeSite], window: int = 50, enabled: bool = True) -> None:
        self.window = int(window)
        self.buffers: dict[str, deque] = {}
        self.handles = []
        self.enabled = enabled
        if enabled:
            for s in sites:
                self._attach(s)

    def _attach(self, site: MergeSite) -> None:
        buf: deque = deque(maxlen=self.window or None)
        self.buffers[site.name] = buf
        if site.tap is None:
            cons = site.consumers[0]

            def pre(module, inputs, buf=buf, site=site, cons=cons):
                if module.training and torch.is_tensor(inputs[0]):
                    with torch.no_grad():
                        x = site_input(cons, inputs[0], site.width)
                        buf.append(x.detach().abs().sum(dim=[d for d in range(x.dim()) if d != 1]).float())

            self.handles.append(cons.module.register_forward_pre_hook(pre))
            return

        def hook(module, inputs, output, buf=buf):
            if module.training and torch.is_tensor(output):
                with torch.no_grad():
                    dims = [d for d in range(output.dim()) if d != 1]
                    buf.append(output.detach().abs().sum(dim=dims).float())

        self.handles.append(site.tap.register_forward_hook(hook))

    def mass(self, name: str) -> torch.Tensor | None:
        """Summed |activation| per neuron of site ``name`` over the window (None before any batch)."""
        buf = self.buffers.get(name)
        if not buf:
            return None
        return torch.stack(list(buf)).sum(0)

    def reset(self, name: str | None = None) -> None:
        """Forget the sums of site ``name`` (all sites when None), e.g. after its width changed."""
        for k, buf in self.buffers.items():
            if name is None or k == name:
                buf.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The ring buffers as (batches, width) CPU tensors, for checkpoints.

        Without them a rehash soon after a resume would weigh representatives by fewer batches
        than the uninterrupted run did.
        """
        return {k: torch.stack(list(buf)).cpu() if buf else torch.zeros(0) for k, buf in self.buffers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Continue from :meth:`state_dict` on ``device``."""
        for k, t in state.items():
            buf = self.buffers.get(k)
            if buf is None:
                continue
            buf.clear()
            for row in t.to(device):
                buf.append(row)

    def remove(self) -> None:
        """Unhook from the model."""
        for h in self.handles:
            h.remove()
        self.handles = []
