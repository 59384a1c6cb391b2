"""``schedule=gradual``: every site's target width ramps from its full width to a final one
between a start and an end step (Zhu & Gupta 2017), one rehash every few steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hashexp.errors import ConfigError
from hashexp.schedules.base import RehashContext, RehashDecision, Schedule, check_known, due, site_names
from hashexp.utils.checks import check_fraction


class GradualSchedule(Schedule):
    """Target widths that ramp from the full width to a final one (Zhu & Gupta, ICLR-W 2018).

    Every ``every`` steps from ``start`` to ``end`` each site is rehashed with the target width
    w(t) = w_final + (w_0 - w_final) (1 - p)^3, p = (t - start) / (end - start) (``shape=cubic``:
    fast early, gentle late) or w_0 - (w_0 - w_final) p (``linear``); w_final is
    ``final_ratio`` of the site's width at the first rehash, or ``final_width``. The target is
    handed to the compressor per site, so the error budget (``hashing.max_error``) can still stop
    a rehash short of it; set ``hashing.max_error=null`` to follow the ramp exactly.

    Args:
        start, end, every: the ramp's first and last step and the steps between rehashes.
        final_ratio: final width as a share of the first width (used when ``final_width`` is None).
        final_width: final width per site (an int for all, or a mapping name -> width).
        shape: ``cubic`` or ``linear``.
        sites: restrict to these site names (None: all).
    """

    name = "gradual"

    def __init__(self, start: int = 100, end: int = 1000, every: int = 100, final_ratio: float = 0.25,
                 final_width: int | dict[str, int] | None = None, shape: str = "cubic",
                 sites: list[str] | None = None, unit: str = "step") -> None:
        super().__init__()
        if unit != "step":
            raise ConfigError(f"schedule=gradual ramps over optimizer steps: schedule.unit must be step, got {unit!r}")
        if int(every) < 1 or int(start) < 0 or int(end) <= int(start):
            raise ConfigError(f"schedule=gradual needs every >= 1 and 0 <= start < end; got every={every}, "
                              f"start={start}, end={end}")
        check_fraction("schedule.final_ratio", final_ratio)
        if shape not in ("cubic", "linear"):
            raise ConfigError(f"schedule.shape={shape!r}; choose cubic or linear")
        self.start, self.end, self.every = int(start), int(end), int(every)
        if isinstance(final_width, Mapping):  # a Hydra DictConfig too: {site: width}
            final_width = {str(k): int(v) for k, v in final_width.items()}
        self.final_ratio, self.final_width, self.shape = float(final_ratio), final_width, shape
        self.sites = list(sites) if sites else None
        self.initial: dict[str, int] = {}
        self.step = 0

    def target(self, name: str, step: int) -> int:
        """The ramp's width for site ``name`` at ``step``."""
        w0 = self.initial[name]
        fw = self.final_width
        wf = (fw.get(name, w0) if isinstance(fw, dict) else int(fw)) if fw is not None else \
            max(1, round(w0 * self.final_ratio))
        p = min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)
        frac = (1.0 - p) ** 3 if self.shape == "cubic" else 1.0 - p
        return int(round(wf + (w0 - wf) * frac))

    def decide(self, ctx: RehashContext) -> RehashDecision:
        """Every site on each ``every``-th step of the ramp (widths taken at the first call)."""
        if not self.initial:
            self.initial = {s.name: s.width for s in ctx.sites}
            if self.sites is not None:
                check_known(self.sites, ctx, "schedule.sites")
        t = ctx.step
        if ctx.epoch_end or not due(t, self.start, self.every, self.end):
            return RehashDecision()
        self.step = t
        return RehashDecision([n for n in site_names(ctx) if self.sites is None or n in self.sites])

    def rehash_within(self, step: int, steps: int, steps_per_epoch: int) -> bool:
        """Whether a step of the ramp falls on ``step .. step + steps - 1``."""
        return any(due(t, self.start, self.every, self.end) for t in range(step, step + steps))

    def site_overrides(self) -> dict[str, dict[str, Any]]:
        """Each site's ramp width now, as its ``target_width``."""
        return {n: {"target_width": self.target(n, self.step)} for n in self.initial
                if self.sites is None or n in self.sites}

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the initial widths and the last ramp step."""
        return {**super().state_dict(), "initial": dict(self.initial), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        super().load_state_dict(state)
        self.initial = {k: int(v) for k, v in state.get("initial", {}).items()}
        self.step = int(state.get("step", 0))
