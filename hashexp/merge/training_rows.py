"""Calibration from the training forward: the rows a calibration pass would capture, recorded on
the last K training batches (``hashing.calibration=training``).

A calibration pass (:func:`hashexp.merge.calibration.capture_sites`) forwards fixed samples
through the network at every rehash. Training already computes the same activations on every
step, so :class:`TrainingCapture` hooks each consumer of each site and keeps, in a ring buffer of
the last ``batches`` training batches, a seeded subsample of exactly the rows a pass would take
for that consumer: its input features on the site's channels (:func:`~hashexp.merge.site.site_input`;
every sample of a plain Linear input, sampled positions of a conv or token input). At most about
as many rows as a pass captures are kept per consumer (``calib_samples`` rows, or
``MAX_CONV_ROWS`` positions of ``conv_samples`` samples): ``ceil(rows / batches)`` per batch, so
memory is bounded whatever the run length.

A ring buffer, filled only where a rehash can use it: the trainer asks the schedule whether a
rehash may come within the next K steps (:meth:`hashexp.schedules.base.Schedule.rehash_within`;
a clock such as ``schedule=fixed`` knows, the drift schedule does not and every batch is
recorded). The buffer then holds exactly the rows an always-recording ring buffer would hold at
each rehash, and recording costs K batches per rehash instead of every step (recording every
step cost more than the passes it saves on the headline MLP: 4.8 s of capture against 0.5 s of
passes).

At a rehash :meth:`TrainingCapture.gather` returns :class:`RecordedRows`, which the compressor
uses in place of calibration inputs (:class:`~hashexp.merge.calibration.SiteCapture` from rows,
no forward pass). What the rows are, and are not:

- they come from training batches (augmented, BatchNorm in train mode) and from the weights of
  the last ``batches`` steps, not from the current network in eval mode;
- a site whose upstream merged earlier in the same rehash is planned and refit on its recorded
  (pre-merge) rows: they are the only rows available without a pass. The upstream merge kept its
  consumers' pre-activation within the error budget, so the rows move by about that much;
- the refit needs the new rows of the merged site: with a pruning plan (``compensation=lsq``,
  ``representative=keep``) they are the survivors' columns of the recorded rows, exactly; a plan
  that creates new representatives cannot be refit without a pass and is refused;
- the measured error is the relative change of the consumers' tap-wise pre-activation
  (one output per output channel and kernel tap) on the recorded rows (:func:`rows_error`).

DDP: the rows are chosen by position in the *global* batch (seeded by the batch counter, the
site and the consumer), each rank keeps the chosen positions of its slice, and ``gather`` joins
the ranks' rows per batch in rank order: the rows of a single-process run with the same global
batches. Resume: the buffers and the batch counter are checkpoint state (one entry per rank).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.calibration import DEFAULT_SAMPLES, MAX_CONV_ROWS, SiteCapture, weight_matrix
from hashexp.merge.plans import MergePlan, survivor_index
from hashexp.merge.site import MergeSite, site_input
from hashexp.merge.surgery import refit_consumer
from hashexp.utils.seeding import EVENT_MIX, derive_seed

__all__ = ["CALIBRATIONS", "RecordedRows", "TrainingCapture", "check_keeps_survivors", "example_input", "refit_on_rows",
           "rows_error"]

#: ``hashing.calibration``: calibration passes at every rehash, or rows recorded by the training forward
CALIBRATIONS = ("passes", "training")


class TrainingCapture:
    """Ring buffers of calibration rows recorded by training forwards (see the module docstring).

    Args:
        sites: the model's merge sites (hooks go on their consumers).
        batches: K, the training batches kept.
        samples: calibration samples a pass runs for a site of Linear consumers (its rows).
        conv_samples: samples a pass runs for a site with conv consumers (their positions give the rows,
            at most ``MAX_CONV_ROWS``).
        seed: seeds the row choice (with the batch counter, the site and the consumer).
    """

    def __init__(self, sites: list[MergeSite], batches: int, samples: int, conv_samples: int, seed: int) -> None:
        self.batches, self.samples, self.conv_samples, self.seed = int(batches), int(samples), int(conv_samples), int(seed)
        self.sites = {s.name: s for s in sites}
        self.index = {s.name: i for i, s in enumerate(sites)}
        # per site, per consumer: deque of (batch id, rows (r, width)) of this rank
        self.buffers: dict[str, list[deque]] = {s.name: [deque(maxlen=self.batches) for _ in s.consumers]
                                                 for s in sites}
        self.batch = 0  # training forwards seen (the same on every rank and across resume)
        self.lo, self.n_global = 0, None  # this rank's slice of the current global batch
        self.armed = False  # between begin_batch and end_batch: only the training forward is recorded
        self.gen = torch.Generator()
        self.active = True
        self.handles = []  # hooked only while a recorded batch runs: the other steps pay nothing

    def begin_batch(self, lo: int, n_global: int, record: bool = True) -> None:
        """The next training forward sees rows [lo, lo + local) of a global batch of ``n_global``
        (``record``: keep its rows; False for a batch no rehash can use)."""
        self.batch += 1
        self.lo, self.n_global = int(lo), int(n_global)
        self.armed = bool(record)
        if not self.armed:
            return
        # one generator per batch, drawn in forward order (the same on every rank and after a resume)
        self.gen = torch.Generator().manual_seed(derive_seed(self.seed, self.batch, scale=EVENT_MIX, weights=(131,)))
        if not self.handles:
            for s in self.sites.values():
                for k, c in enumerate(s.consumers):
                    self.handles.append(c.module.register_forward_pre_hook(
                        lambda m, i, s=s, k=k: self.record(s.name, k, m, i[0])))

    def end_batch(self) -> None:
        """The training forward is over: unhooked, so other forwards (evaluation, BN re-estimation,
        latency, a copy of the model) record nothing and cost nothing."""
        self.armed = False
        self.remove()

    def budget(self, name: str, x: torch.Tensor) -> int:
        """Rows a calibration pass would capture for a consumer of site ``name`` with input ``x``."""
        site = self.sites[name]
        conv = any(isinstance(c.module, torch.nn.modules.conv._ConvNd) for c in site.consumers)
        n = min(self.conv_samples, self.samples) if conv else self.samples
        return n if x.dim() == 2 else min(n * math.prod(x.shape[2:]), MAX_CONV_ROWS)

    @torch.no_grad()
    def record(self, name: str, k: int, module: torch.nn.Module, inp: Any) -> None:
        """Forward pre-hook of consumer ``k`` of site ``name``: keep this batch's chosen rows."""
        if not (self.armed and self.active and module.training and torch.is_tensor(inp)):
            return
        site = self.sites[name]
        x = site_input(site.consumers[k], inp, site.width).detach()
        n_local, per = x.shape[0], (math.prod(x.shape[2:]) if x.dim() > 2 else 1)
        total = self.n_global * per
        want = math.ceil(self.budget(name, x) / self.batches)
        if want < total:  # global positions, sorted: joined in rank order they are the single process's
            sel = (torch.randperm(total, generator=self.gen)[:want] if per == 1
                   else torch.randint(0, total, (want,), generator=self.gen)).sort().values
            if n_local != self.n_global:  # this rank's slice of the global batch
                lo = self.lo * per
                sel = sel[(sel >= lo) & (sel < lo + n_local * per)] - lo
        elif n_local * per == total:
            sel = None
        else:
            sel = torch.arange(n_local * per)
        if per == 1:
            rows = x.clone() if sel is None else x.index_select(0, sel.to(x.device))
        else:
            xf = x.flatten(2)
            if sel is None:
                sel = torch.arange(total)
            sel = sel.to(x.device)
            rows = xf[sel // per, :, sel % per]
        self.buffers[name][k].append((self.batch, rows.float() if rows.dtype != torch.float32 else rows))

    def project(self, name: str, index: torch.Tensor) -> None:
        """Site ``name`` kept the old channels ``index`` (a pruning merge): its rows keep those columns."""
        for buf in self.buffers.get(name, []):
            for j, (b, rows) in enumerate(buf):
                buf[j] = (b, rows[:, index.to(rows.device)])

    def local_state(self) -> dict[str, Any]:
        """This rank's buffers: ``{batch, rows: {site: [{ids, lens, x} per consumer]}}`` (CPU tensors)."""
        out = {}
        for name, bufs in self.buffers.items():
            out[name] = [{"ids": torch.tensor([b for b, _ in buf], dtype=torch.long),
                          "lens": torch.tensor([len(r) for _, r in buf], dtype=torch.long),
                          "x": torch.cat([r.cpu() for _, r in buf]) if buf else torch.zeros(0)} for buf in bufs]
        return {"batch": self.batch, "rows": out}

    def load_local_state(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        """Continue from :meth:`local_state` (this rank's buffers) on ``device``."""
        self.batch = int(state["batch"])
        for name, cons in state["rows"].items():
            for buf, entry in zip(self.buffers.get(name, []), cons):
                buf.clear()
                parts = entry["x"].split(entry["lens"].tolist()) if len(entry["lens"]) else []
                for b, rows in zip(entry["ids"].tolist(), parts):
                    buf.append((int(b), rows.to(device)))

    def gather(self, dist=None) -> RecordedRows:
        """Every rank's rows joined per batch in rank order (rank 0 gets them; a collective under DDP)."""
        states = [self.local_state()] if dist is None else dist.all_gather_object(self.local_state())
        rows: dict[str, list[torch.Tensor | None]] = {}
        for name, site in self.sites.items():
            rows[name] = []
            for k in range(len(site.consumers)):
                _, parts = _join(states, name, k)
                rows[name].append(torch.cat(parts) if parts else None)
        return RecordedRows(rows, self)

    @staticmethod
    def merged_state(saved: list[dict[str, Any]], rank: int) -> dict[str, Any]:
        """This rank's buffers from a checkpoint of another world size: rank 0 takes every rank's rows
        (joined per batch in rank order), the others none; a later :meth:`gather` gives the same rows."""
        if rank != 0:
            return {"batch": saved[0]["batch"], "rows": {}}
        out = {}
        for name, cons in saved[0]["rows"].items():
            out[name] = []
            for k in range(len(cons)):
                ids, parts = _join(saved, name, k)
                out[name].append({"ids": torch.tensor(ids, dtype=torch.long),
                                  "lens": torch.tensor([len(p) for p in parts], dtype=torch.long),
                                  "x": torch.cat(parts) if parts else torch.zeros(0)})
        return {"batch": saved[0]["batch"], "rows": out}

    def remove(self) -> None:
        """Unhook from the model."""
        for h in self.handles:
            h.remove()
        self.handles = []


def _join(states: list[dict[str, Any]], name: str, k: int) -> tuple[list[int], list[torch.Tensor]]:
    """Batch ids (ascending) and each batch's rows joined over ``states`` (ranks, in rank order)."""
    batches: dict[int, list[torch.Tensor]] = {}
    for st in states:
        cons = st["rows"].get(name)
        if not cons:
            continue
        e = cons[k]
        if len(e["lens"]):
            for b, part in zip(e["ids"].tolist(), e["x"].split(e["lens"].tolist())):
                batches.setdefault(b, []).append(part)
    ids = sorted(batches)
    return ids, [torch.cat(batches[b]) for b in ids]


class RecordedRows:
    """The rows of one rehash (all ranks', on rank 0): what the compressor measures instead of a pass.

    Attributes:
        rows: ``{site: [(rows, width) float32 CPU per consumer, or None before any batch]}``.
        source: the :class:`TrainingCapture` whose buffers follow each merge (:meth:`after_merge`).
    """

    def __init__(self, rows: dict[str, list[torch.Tensor | None]], source: TrainingCapture | None = None,
                 example: torch.Tensor | None = None) -> None:
        self.rows, self.source, self.example = rows, source, example

    def has(self, site: MergeSite) -> bool:
        """Whether every consumer of ``site`` has recorded rows."""
        r = self.rows.get(site.name)
        return r is not None and all(x is not None and len(x) > 0 for x in r)

    def capture(self, site: MergeSite) -> SiteCapture:
        """The site's :class:`SiteCapture` from its recorded rows and the consumers' current weights
        (``outputs`` stay empty: :func:`rows_error` measures from rows and weights)."""
        if not self.has(site):
            raise RuntimeError(f"site {site.name}: no training rows recorded since the start (or its last change); "
                               "hashing.calibration=training needs at least one training step before a rehash")
        xs = [x.cpu() for x in self.rows[site.name]]
        return SiteCapture(inputs=xs, outputs=[], weights=[weight_matrix(c, site.width).cpu() for c in site.consumers])

    def after_merge(self, site: MergeSite, index: torch.Tensor) -> None:
        """Site ``site`` kept the old channels ``index``: these rows and the ring buffers follow."""
        if self.rows.get(site.name) is not None:
            self.rows[site.name] = [None if x is None else x[:, index.cpu()] for x in self.rows[site.name]]
        if self.source is not None:
            self.source.project(site.name, index)


def example_input(calib: torch.Tensor | RecordedRows) -> torch.Tensor:
    """One input of the calibration source (the FLOPs count's forward)."""
    if isinstance(calib, RecordedRows):
        if calib.example is None:
            raise RuntimeError("recorded rows without an example input")
        return calib.example
    return calib


def rows_error(old: SiteCapture, new_weights: list[torch.Tensor], index: torch.Tensor) -> float:
    """Relative change of the consumers' centred tap-wise pre-activation on recorded rows.

    Old outputs X W_old^T, new ones X[:, index] W_new^T (X the recorded rows, centred; ``index``
    the kept channels; one output per output channel and kernel tap): |Y_new - Y_old| / |Y_old|
    over all consumers. Two products of the rows (float32, norms summed in float64), as cheap as
    comparing a pass's recorded outputs; no Gram of the old width. A consumer that lost output
    channels itself (it writes into the site) is compared on the kept ones.
    """
    num = den = 0.0
    for x, w_old, w_new in zip(old.inputs, old.weights, new_weights):
        xc = x.float() - x.float().mean(0)
        if w_old.shape[0] != w_new.shape[0]:
            taps = w_new.shape[0] // len(index)
            w_old = w_old[(index[:, None] * taps + torch.arange(taps)).flatten()]
        y_old = xc @ w_old.float().T
        d = xc[:, index] @ w_new.float().T - y_old
        num += float(d.double().square().sum())
        den += float(y_old.double().square().sum())
    return (num / max(den, 1e-30)) ** 0.5


def check_keeps_survivors(plan: MergePlan, method: str, site: str) -> None:
    """Recorded rows serve a pruning plan only (each kept neuron its own group, unchanged: its new rows
    are its old ones); one clear error for a plan that creates new representatives."""
    keep = plan.labels >= 0
    if not (bool(keep.sum() == plan.new_width) and bool((plan.r[keep] == 1).all()) and bool((plan.m[keep] == 1).all())):
        raise ConfigError(f"hashing.calibration=training: {method} merged site {site} into new representatives, whose "
                          "rows only a calibration pass can measure; use hashing.calibration=passes (or a method "
                          "that keeps its survivors: representative=keep)")


def refit_on_rows(site: MergeSite, plan: MergePlan, cap: SiteCapture, ridge: float, optimizer,
                  norm_of: Mapping[int, Any]) -> dict[str, Any]:
    """The least-squares refit of a pruned site's consumers on recorded rows, with no pass.

    The kept neurons' new rows are columns of the old rows, so each consumer is refit as the
    compressor's pass-based refit does (:func:`~hashexp.merge.calibration.lsq_map` with ``same``:
    only the removed neurons are solved) and the error is measured on the same rows
    (:func:`rows_error`). Returns ``{maps: [(T, c)], error, next: {}}`` as the compressor's refit.
    """
    same = survivor_index(plan)
    prior = torch.zeros(plan.new_width, len(plan.labels), dtype=torch.float64)
    prior[torch.arange(plan.new_width), same] = 1.0
    maps = []
    for k, cons in enumerate(site.consumers):
        old = cap.inputs[k]
        t, c = cal.lsq_map(old, old[:, same], ridge, prior, same=same)
        dev = cons.module.weight.device
        refit_consumer(cons, t.to(dev), c.to(dev), optimizer, norm_of.get(id(cons.module)))
        maps.append((t, c))
    new_weights = [weight_matrix(c, site.width).cpu() for c in site.consumers]
    return {"maps": maps, "error": rows_error(cap, new_weights, same), "next": {}}


def default_samples(calib_samples: int | None, n_train: int) -> int:
    """Rows of a Linear site: ``calib_samples``, or 1024 (the whole split if smaller)."""
    return int(calib_samples) if calib_samples else min(DEFAULT_SAMPLES, n_train)
