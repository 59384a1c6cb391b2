"""Centripetal pull: propose groups at a rehash, pull them together, merge them later.

The idea is Centripetal SGD (Ding et al., CVPR 2019). A rehash with ``hashing.pull.steps > 0``
only *proposes* each site's merge: the compressor plans it as usual (LSH candidates, the
calibration set, the error budget) and every neuron it would remove joins the group of its
most correlated survivor. For the next ``steps`` optimizer steps the members of each group

- share one gradient and one optimizer state: the group's means (``average_grads``), so they
  stop drifting apart, and
- decay toward the group's mean: ``p_i <- p_i - strength (p_i - mean_G p)`` after every step,

in every producer parameter of the site (weight rows, bias, norm scale and shift). The
distance between members shrinks by a factor ``1 - strength`` per step, so after the pull the
group's members compute the same function and the merge (least-squares refit of the consumers)
is nearly exact. The merge happens at the proposal's step plus ``steps``, with the proposal's
survivors; a site under pull is not proposed again before then.

The state (groups, survivors, start and end step) is checkpointed, and under DDP rank 0 plans
the proposal and broadcasts it; the pull itself is a deterministic function of the (all-reduced)
gradients and the weights, so every rank keeps the same network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hashexp.errors import ConfigError
from hashexp.merge.sites import MergeSite


@dataclass
class PullConfig:
    """``hashing.pull``: ``steps`` (0: merge at once), ``strength`` in (0, 1], ``average_grads``,
    ``max_error``: the proposal's error budget (None: ``hashing.max_error``)."""

    steps: int = 0
    strength: float = 0.1
    average_grads: bool = True
    max_error: float | None = None

    @classmethod
    def parse(cls, value: Any) -> PullConfig:
        """From ``hashing.pull`` (a mapping, None for the defaults, or an instance); checked."""
        if value is None:
            return cls()
        if isinstance(value, PullConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"hashing.pull must be a mapping like {{steps: 100, strength: 0.1}}, got {value!r}")
        unknown = sorted(set(value) - {"steps", "strength", "average_grads", "max_error"})
        if unknown:
            raise ConfigError(f"hashing.pull: unknown key(s) {unknown}; known: steps, strength, average_grads, max_error")
        try:
            cfg = cls(steps=int(value.get("steps", 0)), strength=float(value.get("strength", 0.1)),
                      average_grads=bool(value.get("average_grads", True)),
                      max_error=None if value.get("max_error") is None else float(value["max_error"]))
        except (TypeError, ValueError):
            raise ConfigError(f"hashing.pull: steps must be an integer and strength/max_error numbers, got {dict(value)}") from None
        if cfg.steps < 0:
            raise ConfigError(f"hashing.pull.steps must be >= 0, got {cfg.steps}")
        if not (0.0 < cfg.strength <= 1.0):
            raise ConfigError(f"hashing.pull.strength must be in (0, 1], got {cfg.strength}")
        if cfg.max_error is not None and cfg.max_error <= 0:
            raise ConfigError(f"hashing.pull.max_error must be > 0 or null, got {cfg.max_error}")
        return cfg

    @property
    def enabled(self) -> bool:
        """Whether rehashes propose and pull (``steps > 0``)."""
        return self.steps > 0


def _group_mean(t: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise mean of ``t`` over each group, broadcast back to every member: (width, ...)."""
    flat = t.reshape(t.shape[0], -1)
    s = torch.zeros(len(counts), flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, labels, flat)
    return (s / counts[:, None].to(flat.dtype))[labels].reshape(t.shape)


class Pull:
    """The proposals in flight, one per site: ``groups`` (width,) group of each neuron, ``keep``
    (width,) bool survivors, ``start``/``end`` steps."""

    def __init__(self, cfg: PullConfig) -> None:
        self.cfg = cfg
        self.active: dict[str, dict[str, Any]] = {}

    # ---------------------------------------------------------------- proposals
    def start(self, name: str, groups: torch.Tensor, keep: torch.Tensor, step: int) -> None:
        """Start pulling ``name``'s proposal (``groups``, survivors ``keep``) at ``step``."""
        groups = groups.detach().long()
        self.active[name] = {"groups": groups, "keep": keep.detach().bool(), "start": int(step),
                             "end": int(step) + self.cfg.steps,
                             "counts": torch.bincount(groups)}

    @torch.no_grad()
    def share_state(self, site: MergeSite, optimizer: torch.optim.Optimizer | None) -> None:
        """Members of a group start the pull with their group's mean optimizer state (Adam moments,
        SGD momentum): with shared gradients their updates are then equal, and the distance to the
        group mean shrinks by exactly ``1 - strength`` per step."""
        a = self.active.get(site.name)
        if optimizer is None or a is None or not self.cfg.average_grads:
            return
        g, c = a["groups"], a["counts"]
        for t in site.producer_parameters():
            for v in optimizer.state.get(t, {}).values():
                if torch.is_tensor(v) and v.shape == t.shape:
                    v.copy_(_group_mean(v, g.to(v.device), c.to(v.device)))

    def busy(self, name: str) -> bool:
        """Whether ``name`` is under pull."""
        return name in self.active

    def due(self, step: int, final: bool = False) -> list[str]:
        """Sites whose pull has run its steps (every site under pull when ``final``)."""
        return [n for n, a in self.active.items() if final or step >= a["end"]]

    def pop(self, name: str) -> dict[str, Any]:
        """End ``name``'s pull; its proposal."""
        return self.active.pop(name)

    def _sites(self, sites: list[MergeSite]):
        for s in sites:
            a = self.active.get(s.name)
            if a is not None and (a["counts"] > 1).any():
                yield s, a

    # ---------------------------------------------------------------- the pull
    @torch.no_grad()
    def average_grads(self, sites: list[MergeSite]) -> None:
        """Members of a group share their group's mean gradient (after backward, before the step)."""
        if not self.cfg.average_grads:
            return
        for site, a in self._sites(sites):
            g, c = a["groups"], a["counts"]
            for t in site.producer_parameters():
                if t.grad is not None:
                    t.grad.copy_(_group_mean(t.grad, g.to(t.device), c.to(t.device)))

    @torch.no_grad()
    def contract(self, sites: list[MergeSite]) -> None:
        """Centripetal decay toward the group mean (after the optimizer step)."""
        s = self.cfg.strength
        for site, a in self._sites(sites):
            g, c = a["groups"], a["counts"]
            for t in site.producer_parameters():
                t.sub_(s * (t - _group_mean(t, g.to(t.device), c.to(t.device))))

    @torch.no_grad()
    def distance(self, site: MergeSite) -> float | None:
        """Mean relative distance of the members of groups (size > 1) to their group's mean, over
        the site's producer parameters: mean_i ||p_i - mean_G p|| / ||mean_G p||; None when idle."""
        a = self.active.get(site.name)
        if a is None:
            return None
        g, c = a["groups"], a["counts"]
        members = (c > 1)[g]
        if not members.any():
            return 0.0
        rows = torch.cat([t.detach().reshape(t.shape[0], -1).double() for t in site.producer_parameters()], dim=1)
        mean = _group_mean(rows, g.to(rows.device), c.to(rows.device))
        d = (rows - mean).norm(dim=1) / mean.norm(dim=1).clamp_min(1e-12)
        return float(d[members.to(d.device)].mean())

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The proposals in flight (for checkpoints)."""
        return {n: {"groups": a["groups"].cpu(), "keep": a["keep"].cpu(), "start": a["start"], "end": a["end"]}
                for n, a in self.active.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.active = {}
        for n, a in state.items():
            self.active[n] = {"groups": a["groups"].long(), "keep": a["keep"].bool(), "start": int(a["start"]),
                              "end": int(a["end"]), "counts": torch.bincount(a["groups"].long())}
