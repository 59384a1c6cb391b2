"""What every rehash schedule shares: the question (:class:`RehashContext`), the answer
(:class:`RehashDecision`), the :class:`Schedule` interface and its small validations.

A schedule is a policy. It is asked after every optimizer step and at every epoch end
(``decide(ctx)``); it answers with the names of the sites to rehash now (none: an empty list) and
the history.csv rows it wants logged, which the trainer writes. The trainer calls ``notify`` with
the :class:`~hashexp.merge.reports.RehashEvent` after the Rehasher ran. Schedules are
checkpointed with the run, so a resumed run rehashes at the same steps as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hashexp.errors import ConfigError


@dataclass
class RehashContext:
    """What a schedule sees when asked: where training is and the network's sites now.

    ``epoch`` counts finished epochs at an epoch end (``epoch_end``) and the running epoch's
    index after a step.
    """

    step: int
    epoch: int
    epoch_end: bool
    sites: list = field(default_factory=list)
    model: Any = None
    stats: Any = None
    rehashes: int = 0
    steps_per_epoch: int = 0


@dataclass
class RehashDecision:
    """A schedule's answer: the sites to rehash now and the history.csv rows to log (in order)."""

    sites: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sites)


class Schedule:
    """Interface. Subclasses implement ``decide``."""

    name = "base"

    def __init__(self) -> None:
        self.count = 0
        self.per_site: dict[str, int] = {}

    def decide(self, ctx: RehashContext) -> RehashDecision:  # pragma: no cover - interface
        """The sites to rehash now and the history rows to log."""
        raise NotImplementedError

    def notify(self, ctx: RehashContext, event) -> None:
        """Count the rehash this schedule decided (a pulled proposal counts; its later merge does not).

        ``event`` is the trainer's :class:`~hashexp.merge.reports.RehashEvent`.
        """
        if event.merge_only:
            return
        self.count += 1
        for s in list(event.sites) + list(event.proposed or []):
            self.per_site[s] = self.per_site.get(s, 0) + 1

    def rehash_within(self, step: int, steps: int, steps_per_epoch: int) -> bool:
        """Whether a rehash may come at one of the steps ``step .. step + steps - 1`` (after its
        optimizer step, or at the epoch end it closes): training-row calibration records only the
        batches a rehash can use. True unless the schedule knows better (a clock does)."""
        return True

    def history_columns(self, sites) -> list[str]:
        """Extra history.csv columns this schedule writes (none by default)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: rehashes decided so far, in all and per site."""
        return {"count": self.count, "per_site": dict(self.per_site)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.count = int(state["count"])
        self.per_site = dict(state["per_site"])


def check_unit(unit: str, key: str = "schedule") -> str:
    """``step`` or ``epoch``: what a schedule's clock counts."""
    if unit not in ("step", "epoch"):
        raise ConfigError(f"{key}.unit={unit!r}; choose step or epoch")
    return unit


def check_max_rehashes(value, key: str = "schedule") -> int | None:
    """At most this many rehashes (an integer >= 0), or None for no limit."""
    if value is not None and int(value) < 0:
        raise ConfigError(f"{key}.max_rehashes must be >= 0 or null, got {value}")
    return None if value is None else int(value)


def check_clock(key: str, unit: str, every, start) -> tuple[str, int, int]:
    """A clock's ``unit``, ``every`` (>= 1) and ``start`` (>= 0), checked and converted."""
    check_unit(unit, key)
    for k, v, low in (("every", every, 1), ("start", start, 0)):
        if v is None or int(v) < low:
            raise ConfigError(f"{key}.{k} must be an integer >= {low}, got {v!r}")
    return unit, int(every), int(start)


def due(t: int, start: int, every: int, stop: int | None) -> bool:
    """Whether count ``t`` is a tick of the clock (start, start + every, ... up to stop)."""
    return t >= start and (stop is None or t <= stop) and (t - start) % every == 0


def site_names(ctx: RehashContext) -> list[str]:
    """The names of the network's sites now."""
    return [s.name for s in ctx.sites]


def check_known(configured, ctx: RehashContext, key: str) -> None:
    """ConfigError naming the model's sites when ``configured`` names a site the model lacks."""
    names = site_names(ctx)
    unknown = sorted(set(configured) - set(names))
    if unknown:
        raise ConfigError(f"{key} names unknown site(s) {unknown}; this model's sites are {names}")
