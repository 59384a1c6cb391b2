"""``schedule=drift``: a site is rehashed when its SimHash bits have drifted or enough of its
neurons have a mergeable partner, measured cheaply every few steps. The measurements live in
hashexp/merge/ (:class:`hashexp.merge.drift.DriftMeter`); this module decides."""

from __future__ import annotations

import time
from typing import Any

from hashexp.errors import ConfigError
from hashexp.merge.drift import DriftMeter
from hashexp.schedules.base import RehashContext, RehashDecision, Schedule, check_known, check_max_rehashes
from hashexp.utils.checks import check_bits, check_cosine


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
    is ``metric_time_s`` over ``metric_calls`` checks.

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
        check_bits("schedule.bits", bits)
        if int(sample) < 1 or int(min_interval) < 0 or int(start) < 0:
            raise ConfigError(f"schedule.sample must be >= 1, min_interval and start >= 0; got {sample}, "
                              f"{min_interval}, {start}")
        check_max_rehashes(max_rehashes)
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

    def measure(self, site, index: int, step: int) -> tuple[float, float]:
        """(bit-flip fraction since the site's reference codes, estimated partner fraction)."""
        return self.meter.measure(site, index, step)

    def _watched(self, name: str) -> bool:
        return self.sites is None or name in self.sites

    def decide(self, ctx: RehashContext) -> RehashDecision:
        """Every ``check_every`` steps: measure each watched site, rehash those that fire; a ``drift`` row per site."""
        if not self._checked:
            if self.sites:
                check_known(self.sites, ctx, "schedule.sites")
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
        """Count the rehash; new reference codes for rehashed sites and for those the surgery changed."""
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
        """The ``drift/*`` columns of its measurement rows."""
        return ["drift/site", "drift/bit_flip", "drift/partner_frac", "drift/rehashed", "drift/metric_s"]

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the meter's references, last rehashes and measurements."""
        meter = self.meter.state_dict()
        return {**super().state_dict(), "last_rehash": dict(self.last_rehash), "versions": meter["versions"],
                "refs": meter["refs"], "metric_time_s": self.metric_time_s, "metric_calls": self.metric_calls,
                "last": {n: dict(v) for n, v in self.last.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        super().load_state_dict(state)
        self.last_rehash = {k: int(v) for k, v in state["last_rehash"].items()}
        self.meter.load_state_dict(state)
        self.metric_time_s, self.metric_calls = float(state["metric_time_s"]), int(state["metric_calls"])
        self.last = {n: {k: float(x) for k, x in v.items()} for n, v in state.get("last", {}).items()}
