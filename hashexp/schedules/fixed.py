"""``schedule=fixed``: every site on one clock, every few steps or epochs."""

from __future__ import annotations

from hashexp.schedules.base import (RehashContext, RehashDecision, Schedule, check_clock, check_max_rehashes, due,
                                    site_names)


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
                 max_rehashes: int | None = None, sites: list[str] | None = None) -> None:
        super().__init__()
        self.unit, self.every, self.start = check_clock("schedule", unit, every, start)
        self.stop, self.max_rehashes = stop, check_max_rehashes(max_rehashes)
        self.sites = list(sites) if sites else None

    def decide(self, ctx: RehashContext) -> RehashDecision:
        """Every (allowed) site on a tick of the clock, until ``max_rehashes``."""
        if self.max_rehashes is not None and self.count >= self.max_rehashes:
            return RehashDecision()
        if self.unit == "epoch":
            if not ctx.epoch_end or not due(ctx.epoch, self.start, self.every, self.stop):
                return RehashDecision()
        elif ctx.epoch_end or not due(ctx.step, self.start, self.every, self.stop):
            return RehashDecision()
        return RehashDecision([n for n in site_names(ctx) if self.sites is None or n in self.sites])

    def rehash_within(self, step: int, steps: int, steps_per_epoch: int) -> bool:
        """Whether a tick of the clock falls on steps ``step .. step + steps - 1`` (unit ``epoch``:
        an epoch that ends there), while rehashes remain."""
        if self.max_rehashes is not None and self.count >= self.max_rehashes:
            return False
        last = step + steps - 1
        if self.unit == "step":
            return any(due(t, self.start, self.every, self.stop) for t in range(step, last + 1))
        spe = max(int(steps_per_epoch), 1)
        return any(due(e, self.start, self.every, self.stop) for e in range(-(-step // spe), last // spe + 1))
