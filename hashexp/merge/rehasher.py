"""The Rehasher owns compression during training (and, once, in one-shot compression).

The trainer knows *that* it compresses, not *how*: it holds one :class:`Rehasher` and calls
:meth:`Rehasher.rehash` when the schedule names sites. The Rehasher holds everything a rehash
needs besides the network and its optimizer:

- the activation statistics of the sites (:class:`~hashexp.merge.stats.ActivationStats`,
  ``window`` batches) that weigh representatives;
- the calibration set: ``calib_samples`` fixed training samples, drawn with the run seed,
  identical on every rank and across a resume;
- the centripetal pull (:mod:`hashexp.merge.pull`): with ``pull.steps > 0`` a rehash proposes,
  members are pulled together during the next steps (:meth:`after_backward`,
  :meth:`after_step`), and a later rehash merges them;
- BatchNorm re-estimation on ``bn_recalib_batches`` training batches after each rehash;
- with ``calibration=training``, the calibration rows recorded by the training forward on the
  last ``calib_batches`` batches (:mod:`hashexp.merge.training_rows`): a rehash then runs no
  calibration pass;
- the compressor (:class:`~hashexp.merge.compressor.Compressor`), which decides *what* merges.

Each rehash returns a :class:`RehashEvent` (metrics.json ``rehash_events``). Its state (the
compressor's, the calibration index, the pull's, the statistics) is one ``state_dict``, stored
in checkpoint.pt under the same keys as before the Rehasher existed, so older checkpoints resume.

Config: the keys ``hashing.window``, ``hashing.calib_samples``, ``hashing.calibration``,
``hashing.calib_batches``, ``hashing.bn_recalib_batches`` and ``hashing.pull`` are the Rehasher's (:data:`REHASHER_KNOBS`); every other ``hashing.*`` key is the
compressor's. :func:`build_rehasher` splits one ``hashing`` config into the two.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hashexp.data import BatchIterator
from hashexp.errors import ConfigError
from hashexp.merge.calibration import DEFAULT_SAMPLES, calibration_index
from hashexp.merge.pull import Pull, PullConfig
from hashexp.merge.recalibrate import recalibrate_bn
from hashexp.merge.sites import MergeSite, model_sites, model_widths
from hashexp.merge.stats import ActivationStats
from hashexp.merge.training_rows import CALIBRATIONS, TrainingCapture, default_samples
from hashexp.merge.reports import RehashEvent
from hashexp.utils.checks import check_at_least
from hashexp.utils.seeding import EVENT_MIX, derive_seed

__all__ = ["REHASHER_KNOBS", "RehashEvent", "Rehasher", "build_rehasher"]

#: the ``hashing.*`` keys that configure the Rehasher, not the compressor
REHASHER_KNOBS = ("window", "calib_samples", "calibration", "calib_batches", "bn_recalib_batches", "pull")


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Rehasher:
    """Compression during training: statistics, calibration set, pull, BN re-estimation, dispatch.

    Args:
        compressor: decides each site's merge (``compress``, ``propose``, ``state_dict``).
        window: batches of activation statistics kept for representatives (0: all since the
            last rehash of the site).
        calib_samples: training samples in the calibration set, drawn with the run seed (None:
            1024, or the whole split if smaller).
        bn_recalib_batches: after each rehash, re-estimate BatchNorm statistics on this many
            training batches (0: never; None: the trainer's ``bn_recalib_batches``).
        pull: centripetal pull ``{steps, strength, average_grads, max_error}``; with
            ``steps > 0`` a rehash proposes and the pulled groups merge ``steps`` later.
        calibration: ``passes`` (forward the calibration set at every rehash) or ``training``
            (rows recorded by the training forward on the last ``calib_batches`` batches; needs
            ``compensation=lsq`` with surviving neurons kept unchanged, and no pull).
        calib_batches: K, the training batches whose rows ``calibration=training`` keeps (at most
            about ``calib_samples`` rows per consumer in all, ``ceil(rows / K)`` per batch).

    Before training, :meth:`attach` binds it to the run (model, data, seed, batch size, DDP).
    """

    def __init__(self, compressor, window: int = 50, calib_samples: int | None = None,
                 bn_recalib_batches: int | None = None, pull: Mapping[str, Any] | PullConfig | None = None,
                 calibration: str = "passes", calib_batches: int = 8) -> None:
        if int(window) < 0:
            raise ConfigError(f"hashing.window must be >= 0, got {window}")
        check_at_least("hashing.calib_samples", calib_samples, 1, nullable=True)
        if bn_recalib_batches is not None and int(bn_recalib_batches) < 0:
            raise ConfigError(f"hashing.bn_recalib_batches must be >= 0, got {bn_recalib_batches}")
        self.compressor = compressor
        self.window = int(window)
        self.calib_samples = None if calib_samples is None else int(calib_samples)
        self.bn_recalib_batches = None if bn_recalib_batches is None else int(bn_recalib_batches)
        self.pull_config = PullConfig.parse(pull)
        self.pull = Pull(self.pull_config) if self.pull_config.enabled else None
        self.calibration_mode = _check_calibration(calibration, compressor, self.pull_config.enabled)
        self.calib_batches = check_at_least("hashing.calib_batches", calib_batches, 1)
        self.rows: TrainingCapture | None = None
        self.stats: ActivationStats | None = None
        self.calib_index: torch.Tensor | None = None
        self.data = None
        self.seed = 0
        self.batch_size = 1
        self.dist = None

    # ------------------------------------------------------------------ binding to a run
    def attach(self, model: nn.Module, data, seed: int, batch_size: int, dist=None,
               bn_recalib_batches: int | None = 0) -> None:
        """Bind to a run: hook the activation statistics on ``model``'s sites and draw the
        calibration set from ``data``'s training split with ``seed``. ``bn_recalib_batches`` is the
        fallback when the Rehasher's own is None (the trainer's older spelling)."""
        self.data, self.seed, self.batch_size, self.dist = data, int(seed), int(batch_size), dist
        if self.bn_recalib_batches is None:
            self.bn_recalib_batches = int(bn_recalib_batches or 0)
        n_train = len(data.x_train)
        self.calib_index = calibration_index(n_train, self.calib_samples or min(DEFAULT_SAMPLES, n_train), self.seed)
        self.watch(model)

    def watch(self, model: nn.Module) -> None:
        """(Re)hook the activation statistics (and, with ``calibration=training``, the row recorder)
        on ``model``'s sites (after a model is rebuilt)."""
        if self.stats is not None:
            self.stats.remove()
        self.stats = ActivationStats(model_sites(model), window=self.window)
        if self.rows is not None:
            self.rows.remove()
            self.rows = None
        if self.calibration_mode == "training":
            self.rows = TrainingCapture(model_sites(model), self.calib_batches,
                                        default_samples(self.calib_samples, len(self.data.x_train)),
                                        getattr(self.compressor, "conv_samples", 256), self.seed)

    def own_knobs(self) -> dict[str, Any]:
        """Its ``hashing.*`` knobs a resume may adopt (:data:`~hashexp.train.checkpoint.ADDED_KNOBS`)."""
        return {"calibration": self.calibration_mode, "calib_batches": self.calib_batches}

    def adopt(self, knob: str, value: Any) -> None:
        """Set one of :meth:`own_knobs` (a resume of a checkpoint that predates it); the row recorder
        follows at the next :meth:`watch`."""
        if knob == "calibration":
            self.calibration_mode = _check_calibration(value, self.compressor, self.pull_config.enabled)
        elif knob == "calib_batches":
            self.calib_batches = check_at_least("hashing.calib_batches", value, 1)
        else:
            raise KeyError(knob)

    def calibration(self) -> torch.Tensor | None:
        """The calibration inputs (fixed training samples), on the data's device."""
        if self.calib_index is None:
            return None
        x = self.data.x_train
        return x[self.calib_index.to(x.device)]

    # ------------------------------------------------------------------ the training step
    def before_forward(self, n_global: int, schedule=None, step: int = 0) -> None:
        """Training step ``step`` (counted from 1) forwards a global batch of ``n_global`` samples (this
        rank: its slice). With ``calibration=training`` its rows are recorded when a rehash may use them:
        ``schedule.rehash_within`` says whether one may come within ``calib_batches`` steps (no
        schedule: no rehash comes). Recording only those batches keeps exactly the rows an always-recording ring
        buffer holds at each rehash, at a fraction of the cost."""
        if self.rows is not None:
            lo = self.dist.bounds(n_global)[0] if self.dist is not None else 0
            per_epoch = -(-len(self.data.x_train) // self.batch_size)
            wanted = schedule is not None and schedule.rehash_within(step, self.calib_batches, per_epoch)
            self.rows.begin_batch(lo, n_global, record=bool(wanted))

    def after_backward(self, model: nn.Module) -> None:
        """With a pull in flight: members of each pulled group share their group's mean gradient.
        (The training forward is over: the row recorder stops recording.)"""
        if self.rows is not None:
            self.rows.end_batch()
        if self.pull is not None and self.pull.active:
            self.pull.average_grads(model_sites(model))

    def after_step(self, model: nn.Module) -> None:
        """With a pull in flight: members decay toward their group's mean."""
        if self.pull is not None and self.pull.active:
            self.pull.contract(model_sites(model))

    def pull_due(self, step: int, final: bool) -> bool:
        """Whether a pulled proposal is due to merge now (every one when ``final``)."""
        return self.pull is not None and bool(self.pull.due(step, final=final))

    def history_columns(self, sites: list[MergeSite]) -> list[str]:
        """history.csv columns of its own: the pull distance of each site (with the pull on)."""
        return [f"pull/{s.name}" for s in sites] if self.pull is not None else []

    def row(self, model: nn.Module, event: RehashEvent | None) -> dict[str, float]:
        """Its cells of a step row: each pulled site's member-to-representative distance."""
        out: dict[str, float] = {}
        if self.pull is None:
            return out
        for site in model_sites(model):
            d = self.pull.distance(site)
            if d is None and event is not None:
                d = (event.pull_distance or {}).get(site.name)
            if d is not None:
                out[f"pull/{site.name}"] = d
        return out

    # ------------------------------------------------------------------ a rehash
    def rehash(self, model: nn.Module, optimizer, names: list[str], step: int, epoch: int, rehashes: int,
               final: bool = False, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> RehashEvent:
        """Compress ``names`` (model and optimizer in place), then re-estimate BatchNorm.

        With the pull on, pulls that are due (or all of them when ``final``, the run's last step)
        merge first, then ``names`` not under pull are proposed; a proposal made when ``final``
        merges at once (there is no step left to pull). ``rehashes`` counts the earlier rehashes
        (it seeds the BN re-estimation batches).
        """
        t0 = time.perf_counter()
        before = model_widths(model)
        if self.dist is not None:  # every rank merges the same network: rank 0's BN statistics
            self.dist.sync_buffers(model)
        calib = self._calibration_source()
        extra: dict[str, Any] = {}
        if self.rows is not None:
            self.rows.active = False  # BN re-estimation batches are not training batches
        try:
            if self.pull is None or (final and not self.pull.active):
                reports = self.compressor.compress(model, names, self.stats, optimizer, step, dist=self.dist,
                                                   overrides=overrides, calib=calib)
            else:
                reports = self._pull_rehash(model, optimizer, names, step, final, overrides, calib, extra)
            after = model_widths(model)
            for r in reports:
                self.stats.reset(r["site"])
            # LR schedulers hold param groups, not params: they need no rebuild after surgery
            if self.bn_recalib_batches and _has_bn(model):
                gen = torch.Generator().manual_seed(derive_seed(self.seed, rehashes + 1, weights=(EVENT_MIX,)))
                it = BatchIterator(self.data.x_train, self.data.y_train, self.batch_size, shuffle=True, generator=gen)
                recalibrate_bn(model, (xb for _, (xb, _) in zip(range(self.bn_recalib_batches), it)))
        finally:
            if self.rows is not None:
                self.rows.active = True
        return RehashEvent(step=step, epoch=epoch, before=before, after=after, time_s=time.perf_counter() - t0,
                           sites=[r["site"] for r in reports], reports=reports,
                           error={r["site"]: r["error"] for r in reports if "error" in r}, **extra)

    def _calibration_source(self):
        """The calibration inputs (``passes``), or every rank's recorded rows (``training``; a
        collective under DDP, so every rank calls it)."""
        if self.rows is None:
            return self.calibration()
        recorded = self.rows.gather(self.dist)
        recorded.example = self.data.x_train[:1]
        return recorded

    def _pull_rehash(self, model: nn.Module, optimizer, names: list[str], step: int, final: bool, overrides,
                     calib, extra: dict[str, Any]) -> list:
        """With the pull on: merge the pulls that are due (all of them when ``final``), then propose
        ``names`` not under pull (merged at once when ``final``). Fills ``extra`` with the event's
        pull keys; returns the merge reports."""
        comp = self.compressor
        kw = dict(dist=self.dist, overrides=overrides, calib=calib)
        extra["merge_only"] = not names
        reports = []
        due = self.pull.due(step, final=final)
        sites = {s.name: s for s in model_sites(model)}
        if due:
            extra["pull_distance"] = {n: self.pull.distance(sites[n]) for n in due}
            fixed = {n: self.pull.pop(n) for n in due}
            reports = comp.compress(model, due, self.stats, optimizer, step, fixed=fixed, **kw)
        fresh = [n for n in names if not self.pull.busy(n)]
        heads = [n for n in fresh if sites[n].group > 1]  # pulling heads together would average q/k: they merge at once
        if heads and not final:
            reports += comp.compress(model, heads, self.stats, optimizer, step, **kw)
            fresh = [n for n in fresh if n not in heads]
        if fresh and final:
            reports += comp.compress(model, fresh, self.stats, optimizer, step, **kw)
        elif fresh:
            proposals = comp.propose(model, fresh, self.stats, step, max_error=self.pull_config.max_error, **kw)
            sites = {s.name: s for s in model_sites(model)}  # the merges above rebuilt the due sites
            for n, p in proposals.items():
                self.pull.start(n, p["groups"], p["keep"], step)
                self.pull.share_state(sites[n], optimizer)
            extra["proposed"] = sorted(proposals)
            extra["proposed_width"] = {n: int(p["keep"].sum()) for n, p in proposals.items()}
        return reports

    # ------------------------------------------------------------------ one-shot
    @torch.no_grad()
    def collect(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        """Activation statistics from ``batches`` (train mode, BatchNorm running stats untouched)."""
        bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bn]
        model.train()
        for m in bn:  # statistics passes must not move BatchNorm running stats
            m.momentum = 0.0
        try:
            for xb in batches:
                model(xb)
        finally:
            for m, mom in zip(bn, momenta):
                m.momentum = mom

    def compress(self, model: nn.Module) -> list:
        """One-shot: compress every site with the statistics collected so far and the calibration
        set (no optimizer); the compressor's :class:`~hashexp.merge.reports.SiteReport` per site."""
        return self.compressor.compress(model, None, self.stats, None, 0, calib=self.calibration())

    def finish(self, model: nn.Module, bn_batches: Iterable[torch.Tensor] | None = None) -> None:
        """One-shot: unhook the statistics; re-estimate BatchNorm on ``bn_batches`` (when the model
        has BatchNorm and ``bn_recalib_batches`` > 0)."""
        self.stats.remove()
        if bn_batches is not None and self.bn_recalib_batches and _has_bn(model):
            recalibrate_bn(model, bn_batches)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``{compressor, calib_index, pull, stats}``: the checkpoint.pt fields it owns (``stats``:
        this rank's statistics)."""
        comp = self.compressor.state_dict() if hasattr(self.compressor, "state_dict") else None
        return {"compressor": comp, "calib_index": self.calib_index,
                "pull": self.pull.state_dict() if self.pull is not None else None,
                "stats": self.stats.state_dict() if self.stats is not None else {},
                "rows": self.rows.local_state() if self.rows is not None else None}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        """Continue from :meth:`state_dict` (``stats``: this rank's statistics, or None to keep)."""
        if state.get("compressor") is not None and hasattr(self.compressor, "load_state_dict"):
            self.compressor.load_state_dict(state["compressor"])
        if state.get("calib_index") is not None and self.calib_index is not None:
            self.calib_index = state["calib_index"]
        if self.pull is not None:
            self.pull.load_state_dict(state.get("pull") or {})
        if state.get("stats") is not None and self.stats is not None:
            self.stats.load_state_dict(state["stats"], device)
        if state.get("rows") is not None and self.rows is not None:
            self.rows.load_local_state(state["rows"], device)


def _check_calibration(calibration: str, compressor, pull: bool) -> str:
    """``hashing.calibration``, checked against what recorded rows can serve: a least-squares refit
    whose survivors stay unchanged (their new rows are columns of the old), without a pull."""
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"hashing.calibration={calibration!r}; choose {' or '.join(CALIBRATIONS)}")
    if calibration == "training":
        comp = getattr(compressor, "compensation", None)
        rep = getattr(compressor, "representative", "keep")
        if comp != "lsq" or rep != "keep":
            raise ConfigError(f"hashing.calibration=training refits on rows recorded by the training forward, which "
                              f"needs compensation=lsq with representative=keep (here compensation={comp}, "
                              f"representative={rep}); set those or use hashing.calibration=passes")
        if pull:
            raise ConfigError("hashing.calibration=training does not serve a pull (hashing.pull.steps > 0): a pulled "
                              "group merges into a new representative; use hashing.calibration=passes")
    return calibration


def build_rehasher(node: Mapping[str, Any], seed: int, instantiate) -> Rehasher | None:
    """The Rehasher of one ``hashing`` config: its own keys (:data:`REHASHER_KNOBS`) split off, the
    rest instantiated as the compressor by ``instantiate(node, **kwargs)``; None for ``hashing=none``."""
    if node is None or node.get("_target_") in (None, "null", "None"):
        return None
    own = {k: node[k] for k in REHASHER_KNOBS if k in node}
    rest = {k: v for k, v in node.items() if k not in REHASHER_KNOBS}
    kwargs = {"seed": seed} if node.get("seed") is None else {}
    return Rehasher(instantiate(rest, **kwargs), **own)
