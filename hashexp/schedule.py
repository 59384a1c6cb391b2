"""When to rehash which site.

A schedule is asked after every optimizer step and at every epoch end; it answers with the
names of the sites to rehash now (an empty list: none). The trainer calls ``notify`` after the
compressor ran. Schedules are checkpointed with the run, so a resumed run rehashes at the same
steps as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from hashexp.errors import ConfigError


class Schedule:
    """Interface. Subclasses implement ``decide``."""

    name = "base"

    def __init__(self) -> None:
        self.count = 0
        self.per_site: dict[str, int] = {}

    def decide(self, ctx: dict[str, Any], hist=None) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def notify(self, ctx: dict[str, Any], event: dict[str, Any]) -> None:
        self.count += 1
        for s in event.get("sites", []):
            self.per_site[s] = self.per_site.get(s, 0) + 1

    def history_columns(self, sites) -> list[str]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "per_site": dict(self.per_site)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.per_site = dict(state["per_site"])


def _check_unit(unit: str) -> str:
    if unit not in ("step", "epoch"):
        raise ConfigError(f"schedule.unit={unit!r}; choose step or epoch")
    return unit


def _due(t: int, start: int, every: int, stop: int | None) -> bool:
    return t >= start and (stop is None or t <= stop) and (t - start) % every == 0


class FixedSchedule(Schedule):
    """Rehash every site every ``every`` steps or epochs from ``start`` to ``stop``.

    Args:
        unit: ``step`` (checked after each optimizer step) or ``epoch`` (at each epoch end).
        every: interval in that unit.
        start: first rehash at this step/epoch count (epoch k means after k epochs).
        stop: no rehash after this step/epoch (None: no limit).
        max_rehashes: stop after this many rehashes (None: no limit).
        sites: restrict to these site names (None: all sites).
    """

    name = "fixed"

    def __init__(self, unit: str = "epoch", every: int = 1, start: int = 1, stop: int | None = None,
                 max_rehashes: int | None = None, sites: list[str] | None = None, name: str = "fixed") -> None:
        super().__init__()
        self.unit = _check_unit(unit)
        if every < 1:
            raise ConfigError(f"schedule.every must be >= 1, got {every}")
        if start < 0:
            raise ConfigError(f"schedule.start must be >= 0, got {start}")
        if max_rehashes is not None and max_rehashes < 0:
            raise ConfigError(f"schedule.max_rehashes must be >= 0 or null, got {max_rehashes}")
        self.every, self.start, self.stop, self.max_rehashes = int(every), int(start), stop, max_rehashes
        self.sites = list(sites) if sites else None

    def decide(self, ctx: dict[str, Any], hist=None) -> list[str]:
        if self.max_rehashes is not None and self.count >= self.max_rehashes:
            return []
        if self.unit == "epoch":
            if not ctx["epoch_end"] or not _due(ctx["epoch"], self.start, self.every, self.stop):
                return []
        elif ctx["epoch_end"] or not _due(ctx["step"], self.start, self.every, self.stop):
            return []
        names = [s.name for s in ctx["sites"]]
        return [n for n in names if self.sites is None or n in self.sites]
