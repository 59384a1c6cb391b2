"""When to rehash which site.

A schedule is a policy. It is asked after every optimizer step and at every epoch end
(``decide(ctx)`` with a :class:`RehashContext`); it answers with a :class:`RehashDecision`: the
names of the sites to rehash now (none: an empty list) and the history.csv rows it wants logged,
which the trainer writes. The trainer calls ``notify`` with the :class:`~hashexp.train.RehashEvent`
after the compressor ran. Measurements a schedule needs live in hashexp/merge/ (the drift
schedule's: :class:`hashexp.merge.drift.DriftMeter`). Schedules are checkpointed with the run, so a
resumed run rehashes at the same steps as an uninterrupted one.

* :class:`FixedSchedule`: every site on one clock.
* :class:`PerLayerSchedule`: each site on its own clock, with its own threshold and target.
* :class:`DriftSchedule`: a site is rehashed when its SimHash bits have drifted or enough of
  its neurons have a mergeable partner, measured cheaply every few steps.
* :class:`GradualSchedule`: every site's target width ramps from its full width to a final one
  between a start and an end step (Zhu & Gupta 2017), one rehash every few steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hashexp.errors import ConfigError
from hashexp.merge.drift import DriftMeter
from hashexp.utils.checks import check_at_least, check_cosine, check_fraction


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
        raise NotImplementedError

    def notify(self, ctx: RehashContext, event) -> None:
        """Count the rehash this schedule decided (a pulled proposal counts; its later merge does not).

        ``event`` is the trainer's :class:`~hashexp.train.RehashEvent`.
        """
        if event.merge_only:
            return
        self.count += 1
        for s in list(event.sites) + list(event.proposed or []):
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
                 max_rehashes: int | None = None, sites: list[str] | None = None) -> None:
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

    def decide(self, ctx: RehashContext) -> RehashDecision:
        if self.max_rehashes is not None and self.count >= self.max_rehashes:
            return RehashDecision()
        if self.unit == "epoch":
            if not ctx.epoch_end or not _due(ctx.epoch, self.start, self.every, self.stop):
                return RehashDecision()
        elif ctx.epoch_end or not _due(ctx.step, self.start, self.every, self.stop):
            return RehashDecision()
        return RehashDecision([n for n in _site_names(ctx) if self.sites is None or n in self.sites])


def _site_names(ctx: RehashContext) -> list[str]:
    return [s.name for s in ctx.sites]


def _check_known(configured, ctx: RehashContext, key: str) -> None:
    """ConfigError naming the model's sites when ``configured`` names a site the model lacks."""
    names = _site_names(ctx)
    unknown = sorted(set(configured) - set(names))
    if unknown:
        raise ConfigError(f"{key} names unknown site(s) {unknown}; this model's sites are {names}")


# ---------------------------------------------------------------------------------- per layer
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
        if p["unit"] not in ("step", "epoch"):
            raise ConfigError(f"{key}.unit={p['unit']!r}; choose step or epoch")
        for k, low in (("every", 1), ("start", 0)):
            if p[k] is None or int(p[k]) < low:
                raise ConfigError(f"{key}.{k} must be an integer >= {low}, got {p[k]!r}")
            p[k] = int(p[k])
        if p["max_rehashes"] is not None and int(p["max_rehashes"]) < 0:
            raise ConfigError(f"{key}.max_rehashes must be >= 0 or null, got {p['max_rehashes']}")
        check_cosine(f"{key}.threshold", p["threshold"], nullable=True)
        check_fraction(f"{key}.target_ratio", p["target_ratio"], nullable=True)
        check_at_least(f"{key}.target_width", p["target_width"], 1, nullable=True)
        p["enabled"] = bool(p["enabled"])
        return p

    def plan(self, site: str) -> dict[str, Any]:
        """The resolved settings of one site (its own keys over the group's defaults)."""
        return self.site_cfg.get(site, self.defaults)

    def decide(self, ctx: RehashContext) -> RehashDecision:
        names = _site_names(ctx)
        if self._known is None:
            _check_known(self.site_cfg, ctx, "schedule.sites")
            self._known = names
        out = []
        for n in names:
            p = self.plan(n)
            if not p["enabled"]:
                continue
            if p["max_rehashes"] is not None and self.per_site.get(n, 0) >= int(p["max_rehashes"]):
                continue
            if p["unit"] == "epoch":
                if ctx.epoch_end and _due(ctx.epoch, p["start"], p["every"], p["stop"]):
                    out.append(n)
            elif not ctx.epoch_end and _due(ctx.step, p["start"], p["every"], p["stop"]):
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
            kv = {k: self.plan(n)[k] for k in _OVERRIDE_KEYS if self.plan(n)[k] is not None}
            if kv:
                out[n] = kv
        return out


# ---------------------------------------------------------------------------------- gradual
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
        if not self.initial:
            self.initial = {s.name: s.width for s in ctx.sites}
            if self.sites is not None:
                _check_known(self.sites, ctx, "schedule.sites")
        t = ctx.step
        if ctx.epoch_end or not _due(t, self.start, self.every, self.end):
            return RehashDecision()
        self.step = t
        return RehashDecision([n for n in _site_names(ctx) if self.sites is None or n in self.sites])

    def site_overrides(self) -> dict[str, dict[str, Any]]:
        return {n: {"target_width": self.target(n, self.step)} for n in self.initial
                if self.sites is None or n in self.sites}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": dict(self.initial), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial = {k: int(v) for k, v in state.get("initial", {}).items()}
        self.step = int(state.get("step", 0))


# ---------------------------------------------------------------------------------- drift
class DriftSchedule(Schedule):
    """Rehash a site when its weights have moved or grown redundant, not on a clock.

    Every ``check_every`` steps, per site, a :class:`hashexp.merge.drift.DriftMeter` measures two
    cheap numbers: the fraction of the site's SimHash bits that flipped since its reference codes
    (taken at the first step, at the site's last rehash, or when its width or fan-in changed), and
    the share of sampled neurons with a near-duplicate partner (cosine >= ``threshold``).

    The site is rehashed when ``bit_flip >= flip_threshold`` or ``partner_frac >=
    partner_threshold``, or — the stability trigger, ``stable_threshold`` — once its codes
    have moved (``bit_flip >= stable_min_drift`` since the reference) and then stopped flipping
    (the flip fraction grew by at most ``stable_threshold`` since the previous check): trained
    neurons that settled, which frozen or untrained weights never do. All at least
    ``min_interval`` steps after the site's previous rehash (MONGOOSE,
    ICLR 2021, rebuilds its LSH tables on a similar drift test). Each measurement is a
    history.csv row of kind ``drift`` (``drift/metric_s``: that site's measurement seconds), handed
    to the trainer in the decision. The metric's own cost, re-referencing after rehashes included,
    is ``metric_time_s`` over ``metric_calls`` checks (``metric_avg_s``).

    Args:
        check_every: steps between checks (``every`` is its alias, so presets that set
            ``schedule.every`` compose; ``check_every`` wins when both are given).
        flip_threshold: bit-flip fraction in [0, 1] that triggers a rehash (null: never).
        partner_threshold: partner fraction in [0, 1] that triggers a rehash (null: never).
        stable_threshold: growth of the flip fraction between two checks at or below which a
            site that has drifted counts as settled and is rehashed (null: never).
        stable_min_drift: flip fraction since the reference a site needs before it can settle.
        min_interval: least steps between two rehashes of one site.
        threshold: two neurons are partners at cosine >= this (default: ``hashing.threshold``).
        bits: hyperplanes per site for the bit-flip codes (1..64, one packed word per neuron).
        sample: neurons sampled for the partner estimate (all when the site is smaller).
        start, stop, max_rehashes: no check before ``start`` or after ``stop``; at most
            ``max_rehashes`` rehashes per site.
        unit: must be ``step`` (checks are counted in optimizer steps).
        sites: restrict to these site names (None: all sites).
        seed: seeds the hyperplanes and the samples.
    """

    name = "drift"

    def __init__(self, check_every: int | None = None, flip_threshold: float | None = 0.15,
                 partner_threshold: float | None = 0.05, min_interval: int = 100, threshold: float | None = 0.7,
                 stable_threshold: float | None = None, stable_min_drift: float = 0.05,
                 bits: int = 64, sample: int = 128, start: int = 0, stop: int | None = None,
                 max_rehashes: int | None = None, unit: str = "step", every: int | None = None,
                 sites: list[str] | None = None, seed: int = 0) -> None:
        super().__init__()
        if unit != "step":
            raise ConfigError(f"schedule=drift checks every few optimizer steps: schedule.unit must be step, got {unit!r}")
        ce = check_every if check_every is not None else every
        if ce is None or int(ce) < 1:
            raise ConfigError(f"schedule.check_every must be an integer >= 1, got {ce!r}")
        for k, v in (("flip_threshold", flip_threshold), ("partner_threshold", partner_threshold),
                     ("stable_threshold", stable_threshold), ("stable_min_drift", stable_min_drift)):
            if v is not None and not (0.0 <= float(v) <= 1.0):
                raise ConfigError(f"schedule.{k} must be a fraction in [0, 1] or null, got {v}")
        if threshold is None:  # hashing.threshold is null (no pre-filter): partners at the data-free default
            threshold = 0.7
        check_cosine("schedule.threshold", threshold)
        if not (1 <= int(bits) <= 64):
            raise ConfigError(f"schedule.bits must be in 1..64, got {bits}")
        if int(sample) < 1 or int(min_interval) < 0 or int(start) < 0:
            raise ConfigError(f"schedule.sample must be >= 1, min_interval and start >= 0; got {sample}, "
                              f"{min_interval}, {start}")
        if max_rehashes is not None and int(max_rehashes) < 0:
            raise ConfigError(f"schedule.max_rehashes must be >= 0 or null, got {max_rehashes}")
        self.check_every = int(ce)
        self.flip_threshold = None if flip_threshold is None else float(flip_threshold)
        self.partner_threshold = None if partner_threshold is None else float(partner_threshold)
        self.stable_threshold = None if stable_threshold is None else float(stable_threshold)
        self.stable_min_drift = float(stable_min_drift)
        self.min_interval = int(min_interval)
        self.start, self.stop, self.max_rehashes = int(start), stop, max_rehashes
        self.sites = list(sites) if sites else None
        self.meter = DriftMeter(bits=bits, sample=sample, threshold=threshold, seed=seed)
        self.last_rehash: dict[str, int] = {}
        self.metric_time_s = 0.0
        self.metric_calls = 0
        self.last: dict[str, dict[str, float]] = {}
        self._checked = False
        self._started = False

    @property
    def threshold(self) -> float:
        """The partner cosine (the meter's)."""
        return self.meter.threshold

    @property
    def metric_avg_s(self) -> float:
        """Mean seconds per check (all sites together)."""
        return self.metric_time_s / max(self.metric_calls, 1)

    def measure(self, site, index: int, step: int) -> tuple[float, float]:
        """(bit-flip fraction since the site's reference codes, estimated partner fraction)."""
        return self.meter.measure(site, index, step)

    def _watched(self, name: str) -> bool:
        return self.sites is None or name in self.sites

    def decide(self, ctx: RehashContext) -> RehashDecision:
        if not self._checked:
            if self.sites:
                _check_known(self.sites, ctx, "schedule.sites")
            self._checked = True
        step = ctx.step
        if not self._started:
            # drift counts from the first step (a run's "rehash 0"), not from the first check
            t0 = time.perf_counter()
            for index, site in enumerate(ctx.sites):
                if site.name not in self.meter.refs and self._watched(site.name):
                    self.meter.reference(site, index)
            self.metric_time_s += time.perf_counter() - t0
            self._started = True
        if ctx.epoch_end or step < self.start or (self.stop is not None and step > self.stop):
            return RehashDecision()
        if (step - self.start) % self.check_every:
            return RehashDecision()
        out, rows = [], []
        t_all = time.perf_counter()
        for index, site in enumerate(ctx.sites):
            n = site.name
            if not self._watched(n):
                continue
            if self.max_rehashes is not None and self.per_site.get(n, 0) >= int(self.max_rehashes):
                continue
            t0 = time.perf_counter()
            flip, partner = self.meter.measure(site, index, step)
            dt = time.perf_counter() - t0
            fire = self._fires(n, step, flip, partner)
            if fire:
                out.append(n)
            self.last[n] = {"bit_flip": flip, "partner_frac": partner}
            rows.append({"kind": "drift", "step": step, "epoch": ctx.epoch, "drift/site": n,
                         "drift/bit_flip": flip, "drift/partner_frac": partner, "drift/rehashed": int(fire),
                         "drift/metric_s": dt})
        self.metric_time_s += time.perf_counter() - t_all
        self.metric_calls += 1
        return RehashDecision(out, rows)

    def _fires(self, name: str, step: int, flip: float, partner: float) -> bool:
        """The policy: past min_interval, and flips, partners or settling over their thresholds."""
        last = self.last_rehash.get(name)
        ready = last is None or step - last >= self.min_interval
        prev = self.last.get(name, {}).get("bit_flip")
        settled = (self.stable_threshold is not None and prev is not None and flip >= self.stable_min_drift
                   and flip - prev <= self.stable_threshold)
        return ready and ((self.flip_threshold is not None and flip >= self.flip_threshold)
                          or (self.partner_threshold is not None and partner >= self.partner_threshold)
                          or settled)

    def notify(self, ctx: RehashContext, event) -> None:
        super().notify(ctx, event)
        t0 = time.perf_counter()
        done = set(event.sites) | set(event.proposed or [])
        for index, site in enumerate(ctx.sites):
            if site.name in done:
                self.last_rehash[site.name] = int(event.step)
            if not self._watched(site.name):
                continue
            # new codes for rehashed sites and for those whose width or fan-in the surgery changed
            x = site.neuron_vectors().detach().cpu()
            if site.name in done or self.meter.stale(site.name, x):
                self.meter.reference(site, index, x)
                self.last.pop(site.name, None)  # flips count from the new reference
        self.metric_time_s += time.perf_counter() - t0

    def history_columns(self, sites) -> list[str]:
        return ["drift/site", "drift/bit_flip", "drift/partner_frac", "drift/rehashed", "drift/metric_s"]

    def state_dict(self) -> dict[str, Any]:
        meter = self.meter.state_dict()
        return {**super().state_dict(), "last_rehash": dict(self.last_rehash), "versions": meter["versions"],
                "refs": meter["refs"], "metric_time_s": self.metric_time_s, "metric_calls": self.metric_calls,
                "last": {n: dict(v) for n, v in self.last.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.last_rehash = {k: int(v) for k, v in state["last_rehash"].items()}
        self.meter.load_state_dict(state)
        self.metric_time_s, self.metric_calls = float(state["metric_time_s"]), int(state["metric_calls"])
        self.last = {n: {k: float(x) for k, x in v.items()} for n, v in state.get("last", {}).items()}
