"""The compressor base: what every method shares, and how a plan reaches the network.

A compressor decides, per merge site, which neurons merge or go (``plan_site``, one per method:
:mod:`hashexp.merge.hashed` for the hashed network, :mod:`hashexp.merge.cosine` for its data-free
ablation, :mod:`hashexp.merge.baselines` for the classic alternatives). The base holds what they
share:

- targets: ``target_ratio``, ``target_width``, ``min_width``, ``round_to`` and a ``width_plan``
  (:mod:`hashexp.merge.width_plan`: a baseline follows a hashed run's widths rehash by rehash);
- per-site knobs: ``site_overrides`` and a schedule's per-site values on top (which wins is
  written once, in docs/DESIGN.md, "the error budget");
- the orchestration of :meth:`Compressor.compress`: sites in forward order, each measured on the
  calibration set through the already merged upstream network, the surgery on model and
  optimizer, the least-squares refit of the consumers (:mod:`hashexp.merge.calibration`), DDP
  agreement (rank 0 decides and refits, the other ranks apply), one
  :class:`~hashexp.merge.reports.SiteReport` per site;
- :meth:`Compressor.propose` for the centripetal pull, and :func:`fixed_plan` to merge a pulled
  proposal.

When and with which statistics and calibration set a compressor runs is the
:class:`~hashexp.merge.rehasher.Rehasher`'s business, not the compressor's.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch

from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.plans import fixed_plan, nearest_survivor, proposal_groups, site_error, survivor_index
from hashexp.merge.reports import SiteReport
from hashexp.merge.sites import MergeSite, model_sites
from hashexp.merge.surgery import MergePlan, apply_consumers, apply_producers, check_plan, refit_consumer
from hashexp.merge.training_rows import RecordedRows, check_keeps_survivors, refit_on_rows
from hashexp.merge.width_plan import load_width_plan
from hashexp.utils.checks import check_at_least, check_cosine, check_fraction
from hashexp.utils.seeding import SEED_MIX, SITE_MIX, derive_seed

__all__ = ["COMPENSATIONS", "Compressor", "fixed_plan", "nearest_survivor", "proposal_groups", "site_error",
           "survivor_index"]

COMPENSATIONS = ("lsq", "weights", "none")


class Compressor:
    """Base class: targets, width plans, the per-site loop, DDP agreement, reports.

    Args:
        target_ratio: keep this fraction of each site's current width at every rehash.
        target_width: final width per site (int for all sites, or a mapping name -> width).
        min_width: never go below this width (int, or a mapping name -> width).
        width_plan: path to a run's metrics.json; rehash k takes that run's widths after its
            rehash k (so baselines match a hashed run exactly).
        sites: restrict compression to these site names (None: all).
        seed: seeds every random choice (hash projections, random groups).
        round_to: a site that changes ends at a multiple of this width (1: any width); the error
            budget and targets are rounded up, never down, so it costs at most round_to - 1 neurons.
        compensation: how consumers absorb a merge: ``lsq`` (ridge least squares on the
            calibration set), ``weights`` (the data-free s_i c_i / s_r rule) or ``none``.
        ridge: ridge of the least-squares fits, relative to the mean feature energy.
        site_overrides: per-site values of these knobs, ``{site: {knob: value}}`` (e.g.
            ``{fc2: {max_error: 0.05, target_ratio: 0.7}}``); a schedule's per-site values
            (``schedule=per_layer``) win over them.
        conv_samples: calibration samples a site with conv consumers runs (the first of the
            calibration set; their spatial positions give the rows); sites of Linear consumers
            run the whole set.
    """

    name = "base"

    def __init__(self, target_ratio: float | None = None, target_width: int | Mapping[str, int] | None = None,
                 min_width: int | Mapping[str, int] = 1, width_plan: str | None = None,
                 sites: list[str] | None = None, seed: int = 0, name: str | None = None,
                 compensation: str = "lsq", ridge: float = 1e-3, round_to: int = 1,
                 site_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 conv_samples: int = cal.CONV_SAMPLES) -> None:
        if target_ratio is not None:
            check_fraction("hashing.target_ratio", target_ratio)
        if compensation not in COMPENSATIONS:
            raise ConfigError(f"hashing.compensation={compensation!r}; choose {', '.join(COMPENSATIONS)}")
        if not (0.0 < float(ridge) < 1.0):
            raise ConfigError(f"hashing.ridge must be in (0, 1), got {ridge}")
        if int(round_to) < 1:
            raise ConfigError(f"hashing.round_to must be an integer >= 1, got {round_to}")
        if site_overrides is not None and not (isinstance(site_overrides, Mapping)
                                               and all(isinstance(v, Mapping) for v in site_overrides.values())):
            raise ConfigError(f"hashing.site_overrides must map site names to {{knob: value}}, got {site_overrides!r}")
        self.site_overrides = {str(k): dict(v) for k, v in (site_overrides or {}).items()}
        self.conv_samples = check_at_least("hashing.conv_samples", conv_samples, 1)
        self.round_to = int(round_to)
        self.compensation = compensation
        self.ridge = float(ridge)
        self.target_ratio = None if target_ratio is None else float(target_ratio)
        self.target_width = dict(target_width) if isinstance(target_width, Mapping) else target_width
        self.min_width = dict(min_width) if isinstance(min_width, Mapping) else int(min_width)
        # the width plan: widths after each rehash of the run it follows (None: targets decide)
        self.followed_widths = load_width_plan(width_plan) if width_plan else None
        self.sites = list(sites) if sites else None
        self.seed = int(seed)
        self.calls = 0
        if name:
            self.name = name

    # -------------------------------------------------------------- targets
    def _min_width(self, site: MergeSite) -> int:
        mw = self.min_width.get(site.name, 1) if isinstance(self.min_width, dict) else self.min_width
        return max(int(mw), int(site.min_width), 1)

    def target(self, site: MergeSite) -> int | None:
        """Width this site should reach now, or None for threshold-only grouping."""
        width = site.width
        t = None
        if self.followed_widths is not None:
            if self.calls >= len(self.followed_widths):
                return width
            t = self.followed_widths[self.calls].get(site.name, width)
        elif self.target_width is not None:
            tw = self.target_width.get(site.name) if isinstance(self.target_width, dict) else self.target_width
            if tw is not None:
                t = int(tw)
                if t < 1:
                    raise ConfigError(f"hashing.target_width for site {site.name} must be >= 1, got {t}")
        if self.target_ratio is not None and self.followed_widths is None:
            r = max(1, int(round(width * self.target_ratio)))
            t = r if t is None else max(t, r)
        if t is None:
            return None
        if t > width and self.followed_widths is None:
            raise ConfigError(f"target width {t} for site {site.name} is above its current width {width}; "
                              f"choose a target <= {width}")
        t = self._round(max(min(t, width), self._min_width(site)), width)
        g = site.group  # attention heads leave whole: round up to a whole head
        return t if g <= 1 else min(width, -(-t // g) * g)

    def _round(self, new: int, width: int) -> int:
        """``new`` rounded up to a multiple of ``round_to`` (hardware-friendly widths), at most ``width``."""
        n = self.round_to
        return new if n <= 1 else min(width, -(-new // n) * n)

    # -------------------------------------------------------------- main entry
    def compress(self, model, names: list[str] | None, stats, optimizer, step: int, dist=None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 calib: torch.Tensor | None = None,
                 fixed: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list[SiteReport]:
        """Compress the named sites of ``model`` in place; returns one :class:`SiteReport` per site.

        ``overrides`` maps a site name to attribute values used for that site only (e.g. a
        per-layer schedule's ``{"fc2": {"threshold": 0.9, "target_ratio": 0.7}}``). ``calib``
        holds the calibration inputs (the trainer's fixed samples); ``compensation=lsq`` needs
        them, and with them every report carries the measured relative error of the site's
        consumers (``error``). Sites go in forward order, each measured through the network
        with the earlier sites already merged. Under DDP rank 0 decides and refits; the other
        ranks apply its plan and its least-squares maps, so every rank holds the same network.
        ``fixed`` maps a site name to a pulled proposal (``{"groups", "keep"}``, see
        :meth:`propose`): that site merges exactly those groups into their survivors instead of
        planning anew. ``calib`` may also be :class:`~hashexp.merge.training_rows.RecordedRows`
        (``hashing.calibration=training``): every site is then planned, refit and measured on the
        rows the training forward recorded, with no calibration pass.
        """
        if self.compensation == "lsq" and calib is None:
            raise ConfigError(f"hashing={self.name} with compensation=lsq needs calibration inputs (calib=...); "
                              "the trainer and hashexp.compress pass them, or choose hashing.compensation=weights")
        main = dist is None or dist.is_main
        reports = []
        sites = model_sites(model)
        self.before_compress(sites)
        unknown = sorted(set(self.site_overrides) - {s.name for s in sites})
        if unknown:
            raise ConfigError(f"hashing.site_overrides names {unknown}, which are not sites of this model "
                              f"({', '.join(s.name for s in sites)})")
        # the norm after each layer (a consumer of one site is often a producer of another)
        norm_of = {id(p.module): p.norm for s in sites for p in s.producers if p.norm is not None}
        if main and calib is not None:
            self._prepare(model, [s for s in sites if (names is None or s.name in names)
                                  and (self.sites is None or s.name in self.sites)], calib, overrides)
        chosen = [(idx, site) for idx, site in enumerate(sites) if (names is None or site.name in names)
                  and (self.sites is None or site.name in self.sites)]
        seeds = {site.name: derive_seed(self.seed, idx, scale=SITE_MIX, weights=(1,)) for idx, site in chosen}
        # later sites measured by an earlier pass, valid until the network changes
        measured: dict[str, cal.SiteCapture] = {}
        for pos, (idx, site) in enumerate(chosen):
            mass = stats.mass(site.name) if stats is not None else None
            if dist is not None and mass is not None:
                mass = dist.all_reduce_sum(mass)
            before = site.width
            seed = seeds[site.name]
            later = [(s, seeds[s.name]) for _, s in chosen[pos + 1:]]
            cap = measured.pop(site.name, None)
            if cap is None and calib is not None and main:
                if isinstance(calib, RecordedRows):
                    cap = calib.capture(site)
                else:
                    caps = cal.capture_sites(model, [(site, seed, None)], calib, self.conv_samples, optional=later)
                    cap = caps[0]
                    measured.update({s.name: c for (s, _), c in zip(later, caps[1:]) if c is not None})
            if fixed is not None and site.name in fixed:
                plan = fixed_plan(site, fixed[site.name]["groups"], fixed[site.name]["keep"])
            else:
                with self._overridden(self._site_knobs(site.name, overrides)):
                    plan = self.plan_site(site, idx, mass, cap) if main else None
                if dist is not None:
                    plan = dist.broadcast_plan(plan, site)
            error = 0.0
            if plan is not None and plan.new_width < before:
                measured.clear()
                error = self._apply(model, site, plan, cap, calib, seed, optimizer, norm_of, later, dist, measured)
            reports.append(SiteReport(site=site.name, before=before, after=site.width, step=step,
                                      error=round(float(error), 6)))
        self.before_compress(None)
        self.calls += 1
        return reports

    def _apply(self, model, site: MergeSite, plan: MergePlan, cap: cal.SiteCapture | None, calib, seed: int,
               optimizer, norm_of: dict, later: list, dist, measured: dict) -> float:
        """Apply ``plan`` to ``site``: producers, then the consumers (least-squares refit on rank 0,
        broadcast to the others, or the plan's own rule); returns the measured relative error.
        Later sites measured by the refit pass are added to ``measured``."""
        check_plan(site, plan, f"hashing={self.name} (compensation={self.compensation})")
        main = dist is None or dist.is_main
        rows = calib if isinstance(calib, RecordedRows) else None
        if rows is not None:
            check_keeps_survivors(plan, f"hashing={self.name}", site.name)
        apply_producers(site, plan, optimizer)
        if self.compensation == "lsq":
            if rows is not None:
                maps = refit_on_rows(site, plan, cap, self.ridge, optimizer, norm_of) if main else None
            else:
                maps = self._refit(model, site, plan, cap, calib, seed, optimizer, norm_of, later) if main else None
            if main:
                measured.update(maps.pop("next"))
            if dist is not None:
                maps = dist.broadcast_object(maps)
                if not main:
                    for cons, (t, c) in zip(site.consumers, maps["maps"]):
                        refit_consumer(cons, t.to(cons.module.weight.device), c.to(cons.module.weight.device),
                                       optimizer, norm_of.get(id(cons.module)))
            if rows is not None:  # every rank's ring buffers follow the merge
                rows.after_merge(site, survivor_index(plan))
            return maps["error"]
        apply_consumers(site, plan, optimizer)
        error = 0.0
        if cap is not None:
            error = site_error(cap, cal.capture_site(model, site, calib, seed, conv_samples=self.conv_samples),
                               survivor_index(plan))
        if dist is not None:
            error = dist.broadcast_object(error)
        return error

    def propose(self, model, names: list[str] | None, stats, step: int, dist=None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None,
                calib: torch.Tensor | None = None, max_error: float | None = None
                ) -> dict[str, dict[str, torch.Tensor]]:
        """Plan the named sites without merging: ``{site: {"groups", "keep"}}`` for the pull.

        Each site is planned as :meth:`compress` would (with ``max_error``, the pull's budget, in
        place of the compressor's when given); each neuron the plan removes joins the group of its most correlated survivor
        on the calibration set (``groups``: (width,) group index, ``keep``: (width,) survivors,
        one per group). Sites with nothing to merge are left out. Under DDP rank 0 plans and
        broadcasts.
        """
        main = dist is None or dist.is_main
        out: dict[str, dict[str, torch.Tensor]] = {}
        if main:
            self.before_compress(model_sites(model))
            for idx, site in enumerate(model_sites(model)):
                if (names is not None and site.name not in names) or (self.sites is not None and site.name not in self.sites):
                    continue
                mass = stats.mass(site.name) if stats is not None else None
                cap = self.measure(model, site, calib, derive_seed(self.seed, idx, scale=SITE_MIX, weights=(1,)))
                knobs = self._site_knobs(site.name, overrides)
                if max_error is not None and hasattr(self, "max_error"):
                    knobs["max_error"] = max_error
                with self._overridden(knobs):
                    plan = self.plan_site(site, idx, mass, cap)
                if plan is None or plan.new_width >= site.width:
                    continue
                out[site.name] = proposal_groups(plan, cap)
            self.before_compress(None)
        if dist is not None:
            out = dist.broadcast_object(out)
        return out

    def _refit(self, model, site: MergeSite, plan: MergePlan, cap: cal.SiteCapture, calib: torch.Tensor,
               seed: int, optimizer, norm_of: Mapping[int, Any],
               later: list[tuple[MergeSite, int]] = ()) -> dict[str, Any]:
        """Refit the site's consumers in forward order; returns their maps and the measured error.

        The ridge shrinks toward the plan's weight-rule map (column i -> group labels_i with m_i).
        A pruning plan's survivors whose rows did not change (the consumers before any refit of
        this pass) keep their columns exactly and only the removed neurons are solved
        (:func:`~hashexp.merge.calibration.lsq_map` ``same``). ``later`` [(site, seed)]: the sites
        to compress after this one; the first is measured in the same pass when it runs the same
        inputs, the others when the pass reaches them anyway (``next`` in the result: ``{name:
        capture}``, exactly what a pass of their own would record on the refitted network).
        """
        maps: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(site.consumers)
        keep = plan.labels >= 0
        prior = torch.zeros(plan.new_width, len(plan.labels), dtype=torch.float64)
        cols = keep.nonzero().flatten().cpu()
        prior[plan.labels[keep].cpu(), cols] = plan.m[keep].double().cpu()
        pruned = bool(keep.sum() == plan.new_width) and bool((plan.m[keep] == 1).all())
        same = survivor_index(plan)

        def refit(k: int, module, rows: torch.Tensor) -> None:
            old = cap.inputs[k].to(rows.device)
            kw = {}
            if pruned:
                sub = old[:, same.to(rows.device)]
                if rows.shape == sub.shape and torch.allclose(rows, sub, rtol=1e-5, atol=1e-6 * float(sub.abs().max())):
                    kw["same"] = same
            t, c = cal.lsq_map(old, rows, self.ridge, prior, **kw)
            refit_consumer(site.consumers[k], t.to(rows.device), c.to(rows.device), optimizer, norm_of.get(id(module)))
            maps[k] = (t.cpu(), c.cpu())

        specs = [(site, seed, refit)]
        n = self.conv_samples
        if later and cal.calibration_inputs(later[0][0], calib, n).shape[0] == cal.calibration_inputs(site, calib, n).shape[0]:
            specs.append((later[0][0], later[0][1], None))
        optional = list(later[len(specs) - 1:])
        caps = cal.capture_sites(model, specs, calib, n, optional=optional)
        nxt = list(zip([s for s, _, _ in specs[1:]] + [s for s, _ in optional], caps[1:]))
        return {"maps": maps, "error": site_error(cap, caps[0], same), "next": {s.name: c for s, c in nxt if c is not None}}

    def measure(self, model, site: MergeSite, calib, seed: int) -> cal.SiteCapture | None:
        """The site's calibration capture: a pass over ``calib`` inputs, or its recorded training rows
        (:class:`~hashexp.merge.training_rows.RecordedRows`); None without calibration."""
        if calib is None:
            return None
        if isinstance(calib, RecordedRows):
            return calib.capture(site)
        return cal.capture_site(model, site, calib, seed, conv_samples=self.conv_samples)

    def plan_site(self, site: MergeSite, index: int, mass: torch.Tensor | None,
                  capture: cal.SiteCapture | None = None) -> MergePlan | None:
        """The plan of one site (None: leave it), from its activation ``mass`` and calibration ``capture``; one per
        method."""
        raise NotImplementedError

    def _prepare(self, model, sites: list[MergeSite], calib: torch.Tensor,
                 overrides: Mapping[str, Mapping[str, Any]] | None) -> None:
        """Called once per rehash (rank 0) before the sites are planned; a global budget plans here."""

    # --- the pre-compression network (baselines score every site on it, as their papers do)
    def before_compress(self, sites: list[MergeSite] | None) -> None:
        """Called with all sites before a compression step changes any of them, and with None after it.

        The base class records nothing (the hashed compressor measures each site through the
        already-merged upstream network); baselines record each site's weights here.
        """

    def _finish(self, plan: MergePlan | None) -> MergePlan | None:
        """``compensation=none``: consumer columns of a group are summed unscaled (m = 1)."""
        if plan is not None and self.compensation == "none":
            plan.m = (plan.labels >= 0).to(plan.m.dtype)
        return plan

    def _site_knobs(self, name: str, overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
        """This site's knob values: ``hashing.site_overrides``, then the schedule's on top."""
        return {**self.site_overrides.get(name, {}), **dict((overrides or {}).get(name) or {})}

    @contextmanager
    def _overridden(self, values: Mapping[str, Any] | None):
        """Temporarily set per-site knobs (threshold, target_ratio, target_width, ...)."""
        if not values:
            yield
            return
        unknown = [k for k in values if not hasattr(self, k)]
        if unknown:
            raise ConfigError(f"per-site override(s) {unknown} are not knobs of hashing={self.name}")
        saved = {k: getattr(self, k) for k in values}
        try:
            for k, v in values.items():
                if k == "threshold" and v is not None:
                    check_cosine("threshold", v)
                if k == "target_ratio" and v is not None:
                    check_fraction("target_ratio", v)
                setattr(self, k, v)
            yield
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the number of rehashes so far (width plans follow it)."""
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.calls = int(state["calls"])

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.calls, index, scale=SEED_MIX,
                                                         weights=(SITE_MIX, 1), modulus=2**63))

