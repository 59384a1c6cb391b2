"""``schedule=per_layer``: each site on its own clock, with its own threshold and target."""

from __future__ import annotations

from typing import Any

from hashexp.errors import ConfigError
from hashexp.schedules.base import (RehashContext, RehashDecision, Schedule, check_clock, check_known,
                                    check_max_rehashes, due, site_names)
from hashexp.utils.checks import check_at_least, check_cosine, check_fraction

_PLAN_KEYS = ("unit", "every", "start", "stop", "max_rehashes", "threshold", "target_ratio", "target_width", "enabled")
_OVERRIDE_KEYS = ("threshold", "target_ratio", "target_width")


class PerLayerSchedule(Schedule):
    """Each site on its own clock and with its own merge knobs.

    Early layers of a network often settle (and grow redundant) at another pace than late
    ones; a per-site schedule rehashes each at its own interval, with its own cosine threshold
    and target, so that a cautious layer is not dragged along by an eager one.

    Args:
        unit, every, start, stop, max_rehashes: defaults for every site, as in
            :class:`FixedSchedule`; ``max_rehashes`` counts the rehashes of each site.
        threshold, target_ratio, target_width: default merge knobs handed to the compressor
            for each site (None: the compressor's own ``hashing.*`` value).
        sites: ``{site: {key: value}}`` with any of the keys above plus ``enabled`` (False:
            never rehash that site). Sites not listed use the defaults. A site name the model
            does not have is an error at the first decision.
    """

    name = "per_layer"

    def __init__(self, unit: str = "epoch", every: int = 1, start: int = 1, stop: int | None = None,
                 max_rehashes: int | None = None, threshold: float | None = None,
                 target_ratio: float | None = None, target_width: int | None = None,
                 sites: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        defaults = {"unit": unit, "every": every, "start": start, "stop": stop, "max_rehashes": max_rehashes,
                    "threshold": threshold, "target_ratio": target_ratio, "target_width": target_width,
                    "enabled": True}
        self.defaults = self._validate(defaults, "schedule")
        self.site_cfg: dict[str, dict[str, Any]] = {}
        for s, kv in (sites or {}).items():
            if kv is None:
                kv = {}
            if not hasattr(kv, "items"):
                raise ConfigError(f"schedule.sites.{s} must be a mapping of {list(_PLAN_KEYS)}, got {kv!r}")
            bad = sorted(set(kv) - set(_PLAN_KEYS))
            if bad:
                raise ConfigError(f"schedule.sites.{s}: unknown key(s) {bad}; allowed: {list(_PLAN_KEYS)}")
            self.site_cfg[str(s)] = self._validate({**self.defaults, **dict(kv)}, f"schedule.sites.{s}")
        self._known: list[str] | None = None

    @staticmethod
    def _validate(p: dict[str, Any], key: str) -> dict[str, Any]:
        p = dict(p)
        p["unit"], p["every"], p["start"] = check_clock(key, p["unit"], p["every"], p["start"])
        check_max_rehashes(p["max_rehashes"], key)
        check_cosine(f"{key}.threshold", p["threshold"], nullable=True)
        check_fraction(f"{key}.target_ratio", p["target_ratio"], nullable=True)
        check_at_least(f"{key}.target_width", p["target_width"], 1, nullable=True)
        p["enabled"] = bool(p["enabled"])
        return p

    def site_settings(self, site: str) -> dict[str, Any]:
        """The resolved settings of one site (its own keys over the group's defaults)."""
        return self.site_cfg.get(site, self.defaults)

    def decide(self, ctx: RehashContext) -> RehashDecision:
        """The enabled sites whose own clock ticks now (within their ``max_rehashes``)."""
        names = site_names(ctx)
        if self._known is None:
            check_known(self.site_cfg, ctx, "schedule.sites")
            self._known = names
        out = []
        for n in names:
            p = self.site_settings(n)
            if not p["enabled"]:
                continue
            if p["max_rehashes"] is not None and self.per_site.get(n, 0) >= int(p["max_rehashes"]):
                continue
            if p["unit"] == "epoch":
                if ctx.epoch_end and due(ctx.epoch, p["start"], p["every"], p["stop"]):
                    out.append(n)
            elif not ctx.epoch_end and due(ctx.step, p["start"], p["every"], p["stop"]):
                out.append(n)
        return RehashDecision(out)

    def site_overrides(self) -> dict[str, dict[str, Any]]:
        """``{site: {threshold/target_ratio/target_width: value}}`` for the compressor (non-null only).

        The one place a schedule reaches into the compressor: the trainer passes these to every
        ``compress``/``propose`` call as ``overrides``, where they replace the ``hashing.*`` knob of
        that site for that rehash. (They are compressor knobs; they sit in ``schedule.sites`` so
        that one entry gives a site its clock and its knobs together.)
        """
        names = set(self._known or []) | set(self.site_cfg)
        out = {}
        for n in sorted(names):
            kv = {k: self.site_settings(n)[k] for k in _OVERRIDE_KEYS if self.site_settings(n)[k] is not None}
            if kv:
                out[n] = kv
        return out
