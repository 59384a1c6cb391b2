"""The training loop: fit, step, evaluate. It knows *that* the network is compressed, not *how*.

Per step: forward, backward, optimizer step; every ``trainer.logging.every`` steps a history.csv
row (loss, step time, per-site width, per-layer weight and gradient norm). After every step and at
every epoch end the schedule decides (:meth:`Trainer._maybe_rehash`); when it names sites, the
:class:`~hashexp.merge.rehasher.Rehasher` (which owns the activation statistics, the calibration
set, the pull and BN re-estimation) rewrites them, model and optimizer state together, and
training simply continues on the smaller network. Each epoch ends with an evaluation row and an
atomic checkpoint (hashexp/train/resume.py; optionally also every
``trainer.checkpoint.every_steps`` steps), from which a killed run resumes with the same widths,
optimizer, LR schedule, rehash schedule, Rehasher state, position in the epoch and RNG state, and
ends with exactly the metrics of an uninterrupted run.

Under torchrun (``dist``, see hashexp/distributed.py) each rank trains on its slice of every
global batch of ``batch_size``; rank 0 alone writes history.csv and checkpoints.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hashexp.data import BatchIterator, DataBundle
from hashexp.errors import ConfigError
from hashexp.merge.rehasher import Rehasher
from hashexp.merge.reports import RehashEvent
from hashexp.merge.sites import model_sites, model_widths
from hashexp.metrics import Stopwatch, count_flops, count_params, evaluate
from hashexp.schedules.base import RehashContext
from hashexp.train import checkpoint as ckpt
from hashexp.train.history import History, LoggingSettings
from hashexp.train.resume import Checkpointing

log = logging.getLogger("hashexp")


def resolve_device(device: str) -> torch.device:
    """``trainer.device`` as a torch device (``auto``: CUDA when available); one clear error otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device} but CUDA is not available here; use trainer.device=cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"trainer.device={device!r} is not a device; use cpu, cuda or auto") from None


class Trainer(Checkpointing):
    """Trains a model with optional compression during training.

    Args:
        model: an ``nn.Module`` with merge sites (:func:`hashexp.merge.sites.model_sites`).
        data: the in-memory dataset.
        optimizer: factory ``params -> torch.optim.Optimizer`` (a Hydra partial).
        epochs, batch_size, eval_batch_size: the usual.
        lr_schedule: factory ``optimizer -> LRScheduler`` stepped once per epoch, or None.
        rehasher: the :class:`~hashexp.merge.rehasher.Rehasher` that ``cfg.hashing`` builds
            (it owns the statistics, the calibration set, the pull and BN re-estimation, and calls
            the compressor), or None for vanilla training. A bare compressor is wrapped in a
            Rehasher with its default knobs.
        schedule: a :class:`hashexp.schedules.Schedule`: ``decide(ctx) -> RehashDecision`` names the
            sites to rehash now (and the history rows to log), ``notify(ctx, event)`` after a rehash.
        run_dir: where history.csv and checkpoint.pt go.
        seed: seeds batches, augmentation and the compressor's randomness.
        checkpoint: the group ``trainer.checkpoint``, typed as
            :class:`~hashexp.train.checkpoint.CheckpointSettings` (a mapping or an instance; a bool
            means ``enabled``): ``enabled``, ``every_steps`` (a mid-epoch resume skips the epoch's
            batches already trained on), ``resume`` (the resumed run ends with the same metrics as
            an uninterrupted one).
        logging: the group ``trainer.logging``, typed as
            :class:`~hashexp.train.history.LoggingSettings`: ``every`` (steps between history.csv
            rows) and ``progress`` (auto | bar | log | none).
        bn_recalib_batches: the older spelling of ``hashing.bn_recalib_batches`` (BatchNorm
            re-estimated on this many training batches after each rehash), used when the
            Rehasher does not set it.
        config: the composed, resolved run config (a plain dict). Checkpoints record it; a resume
            refuses a run whose model, data, compressor, schedule, seed, optimizer or batch size
            differ, and records the other changes (``summary()["resumed"]``).
        dist: a :class:`hashexp.distributed.Dist` under torchrun, else None. ``batch_size`` is
            then the global batch, split over the ranks.
    """

    def __init__(self, model: nn.Module, data: DataBundle, optimizer: Callable, epochs: int = 10,
                 batch_size: int = 256, eval_batch_size: int = 4096, lr_schedule: Callable | None = None,
                 rehasher=None, schedule=None, logger=None, run_dir: str = ".", seed: int = 0,
                 device: str = "cpu", num_threads: int | None = None, augment: bool = True,
                 checkpoint: bool | Mapping[str, Any] | ckpt.CheckpointSettings = True,
                 logging: Mapping[str, Any] | LoggingSettings | None = None, bn_recalib_batches: int | None = 0,
                 config: dict[str, Any] | None = None, dist=None) -> None:
        self.checkpointing = ckpt.CheckpointSettings.parse(checkpoint)
        self.logging = LoggingSettings.parse(logging)
        if epochs < 0:
            raise ConfigError(f"trainer.epochs must be >= 0, got {epochs}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"trainer.batch_size and eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
        self.dist = dist
        if dist is not None:
            self.device = dist.local_device(self.device)
        self.model = model.to(self.device)
        self.data = data.to(self.device)
        self.make_optimizer = optimizer
        try:
            self.optimizer = optimizer(self.model.parameters())
        except (TypeError, ValueError) as e:  # e.g. trainer.optimizer.lr=abc
            raise ConfigError(f"trainer.optimizer: {e}; check its values (lr, momentum, weight_decay, ...)") from None
        self._lr_factory = lr_schedule
        self.lr_schedule = lr_schedule(self.optimizer) if lr_schedule is not None else None
        self.epochs, self.batch_size, self.eval_batch_size = int(epochs), int(batch_size), int(eval_batch_size)
        if rehasher is not None and not isinstance(rehasher, Rehasher):
            rehasher = Rehasher(rehasher)
        self.rehasher, self.schedule, self.logger = rehasher, schedule, logger
        self.run_dir, self.seed = run_dir, int(seed)
        self.config = config
        self.resumed: dict[str, Any] | None = None  # {from, changed} after a resume
        self.augment = None
        if augment and data.is_image and getattr(data, "augment", None) is not None:
            self.augment = data.augment
        self.sites = model_sites(self.model)
        if rehasher is not None:
            rehasher.attach(self.model, self.data, self.seed, self.batch_size, dist=dist,
                            bn_recalib_batches=bn_recalib_batches)
        self.timer = Stopwatch()
        self.step = 0
        self.epoch = 0
        self.rehashes = 0
        self.rehash_log: list[RehashEvent] = []
        self.widths_before = model_widths(model, self.sites)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        self.layer_names = [n for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        self.epoch_metrics: dict[str, float] = {}
        # position inside the current epoch, for mid-epoch checkpoints (0: at an epoch boundary)
        self.batch_in_epoch = 0
        self._epoch_gen_state = self.gen.get_state()
        self._pending_losses: list[float] = []  # step losses not yet in a history row
        self._step_times: list[float] = []  # their step times
        self._hist: History | None = None
        self._history_rows: int | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        """Rank 0 (or no DDP): the rank that writes files."""
        return self.dist is None or self.dist.is_main

    def _train_module(self) -> nn.Module:
        return self.dist.wrap(self.model) if self.dist is not None else self.model

    def history_columns(self) -> list[str]:
        """history.csv's header: step fields, per-site widths, errors (and pull distances), per-layer norms, epoch
        metrics, the schedule's own."""
        cols = ["kind", "step", "epoch", "loss", "step_time_s", "lr", "params", "rehash", "hash_time_s"]
        cols += [f"width/{s.name}" for s in self.sites]
        cols += [f"error/{s.name}" for s in self.sites]
        if self.rehasher is not None:
            cols += self.rehasher.history_columns(self.sites)
        cols += [f"wnorm/{n}" for n in self.layer_names] + [f"gnorm/{n}" for n in self.layer_names]
        cols += ["train_loss", "train_acc", "test_loss", "test_acc", "flops"]
        if self.schedule is not None and hasattr(self.schedule, "history_columns"):
            cols += [c for c in self.schedule.history_columns(self.sites) if c not in cols]
        return cols

    def _layer_norms(self) -> dict[str, float]:
        out = {}
        mods = dict(self.model.named_modules())
        for n in self.layer_names:
            w = mods[n].weight
            out[f"wnorm/{n}"] = float(w.detach().norm())
            out[f"gnorm/{n}"] = float(w.grad.detach().norm()) if w.grad is not None else float("nan")
        return out

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) over a split, in eval mode, batched (hashexp.metrics.evaluate)."""
        result = evaluate(self.model, x, y, self.eval_batch_size)
        self.model.train()
        return result

    def _evaluate_splits(self) -> None:
        """``epoch_metrics``: loss and accuracy on the train and test splits (every rank evaluates
        the network rank 0 writes)."""
        if self.dist is not None:
            self.dist.sync_buffers(self.model)
        tr_loss, tr_acc = self.evaluate(self.data.x_train, self.data.y_train)
        te_loss, te_acc = self.evaluate(self.data.x_test, self.data.y_test)
        self.epoch_metrics = {"train_loss": tr_loss, "train_acc": tr_acc, "test_loss": te_loss, "test_acc": te_acc}

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train ``epochs`` epochs (from the checkpoint, when resuming); returns :meth:`summary`."""
        resume_from = self._resume_path()
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._hist = self._open_history(resume_from) if self.is_main else None
        progress = self.logging.progress
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        total_t0 = time.perf_counter()
        self._step_times = []
        self.model.train()
        try:
            while self.epoch < self.epochs:
                self._train_epoch(use_bar)
                self._end_epoch(use_bar)
        finally:
            if self._hist is not None:
                self._hist.close()
            self._hist = None
        self.timer.totals["fit"] = self.timer.totals.get("fit", 0.0) + time.perf_counter() - total_t0
        return self.summary()

    def _open_history(self, resume_from: str | None) -> History:
        """history.csv, cut back to the checkpoint's rows when resuming (carried over from its run dir)."""
        path = os.path.join(self.run_dir, "history.csv")
        if resume_from is None:
            return History(path, self.history_columns())
        source = None
        src_dir = os.path.dirname(os.path.abspath(ckpt.checkpoint_path(resume_from)))
        if src_dir != os.path.abspath(self.run_dir):  # resuming into a new run dir: carry the rows over
            source = os.path.join(src_dir, "history.csv")
        return History(path, self.history_columns(), resume_after_step=self.step, keep_rows=self._history_rows,
                       source=source)

    def _batches(self, skip: int):
        """This epoch's shuffled batches from the ``skip``-th on (this rank's slices under DDP)."""
        if hasattr(self.data, "train_batches"):  # streamed from disk: DataLoader workers, this rank's slices
            return self.data.train_batches(self.batch_size, self.gen, skip, self.dist)
        it = BatchIterator(self.data.x_train, self.data.y_train, self.batch_size, shuffle=True, generator=self.gen)
        if self.dist is not None:
            # augmentation on the whole global batch, then each rank's slice
            aug = (lambda xb: self.augment(xb, self.aug_gen)) if self.augment is not None else None
            return self.dist.shard(it, transform=aug, start=skip)
        return itertools.islice(iter(it), skip, None)

    def _train_epoch(self, use_bar: bool) -> None:
        """One epoch of steps, each followed by a possible rehash, a history row and a checkpoint."""
        n_train = len(self.data.x_train)
        n_batches = math.ceil(n_train / self.batch_size)
        skip = self.batch_in_epoch  # > 0 only right after a mid-epoch resume
        # the generator state this epoch's permutation is drawn from (mid-epoch checkpoints)
        self._epoch_gen_state = self.gen.get_state()
        batches = self._batches(skip)
        bar = None
        if use_bar and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {self.epoch + 1}/{self.epochs}", leave=False)
        net = self._train_module()
        for i, (xb, yb) in enumerate(batches, start=skip):
            t0 = time.perf_counter()
            loss_value = self._train_step(net, xb, yb, min(self.batch_size, n_train - i * self.batch_size))
            self.step += 1
            self.batch_in_epoch = i + 1
            self._step_times.append(time.perf_counter() - t0)
            self._pending_losses.append(float(loss_value))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{self._pending_losses[-1]:.3f}")
            last = self.epoch + 1 == self.epochs and i + 1 == n_batches
            event = self._maybe_rehash(epoch_end=False, final=last)
            if event is not None:
                net = self._train_module()  # the wrapper holds the old parameters
            if self.step % self.logging.every == 0 or event is not None:
                self._log(self._step_row(self._pending_losses, self._step_times, event))
                self._pending_losses, self._step_times = [], []
            k = self.checkpointing.every_steps
            if k is not None and self.step % k == 0 and i + 1 < n_batches:
                self.save_checkpoint()
        if bar is not None:
            bar.close()

    def _train_step(self, net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, n_global: int) -> torch.Tensor:
        """Forward, backward, optimizer step (and the pull's gradient sharing and contraction); the loss."""
        with self.timer("train"):
            if self.rehasher is not None:  # training-row calibration: this rank's place in the global batch
                self.rehasher.before_forward(n_global, self.schedule, self.step + 1)
            if self.dist is None:
                if self.augment is not None:
                    xb = self.augment(xb, self.aug_gen)
                loss = F.cross_entropy(net(xb), yb)
                loss_value = loss.detach()
            else:
                loss, loss_value = self.dist.loss(net, xb, yb, n_global)
            if not torch.isfinite(loss_value):
                raise FloatingPointError(f"loss became {float(loss_value)} at step {self.step}; "
                                         "lower trainer.optimizer.lr or check the data")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.rehasher is not None:
                self.rehasher.after_backward(self.model)
            self.optimizer.step()
            if self.rehasher is not None:
                self.rehasher.after_step(self.model)
        return loss_value

    def _end_epoch(self, use_bar: bool) -> None:
        """LR step, a possible rehash, the evaluation row, a checkpoint."""
        self.batch_in_epoch = 0
        self.epoch += 1
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        event = self._maybe_rehash(epoch_end=True, final=self.epoch == self.epochs)
        with self.timer("eval"):
            row = self._epoch_row(event)
        self._log(row, flush=True)
        if self.is_main and not use_bar and self.logging.progress != "none":
            log.info("epoch %d/%d  step %d  train_loss %.4f  train_acc %.4f  test_acc %.4f  widths %s",
                     self.epoch, self.epochs, self.step, row["train_loss"], row["train_acc"], row["test_acc"],
                     model_widths(self.model))
        self.save_checkpoint()

    def _log(self, row: dict[str, Any], flush: bool = False) -> None:
        """A history.csv row (rank 0) and the logger's copy."""
        if self._hist is not None:
            self._hist.write(row)
            if flush:
                self._hist.flush()
        if self.logger is not None and self.is_main:
            self.logger.log_row(row, step=self.step)

    def _maybe_rehash(self, epoch_end: bool, final: bool) -> RehashEvent | None:
        """Ask the schedule; log its rows; rehash what it names (and, after a step, pulls that are due).

        ``final``: the run's last step or epoch end (a pull then merges at once).
        """
        if self.rehasher is None or self.schedule is None:
            return None
        decision = self.schedule.decide(self._ctx(epoch_end))
        if self._hist is not None:
            for row in decision.rows:
                self._hist.write(row)
        pull_due = not epoch_end and self.rehasher.pull_due(self.step, final)
        if not decision.sites and not pull_due:
            return None
        event = self._rehash(decision.sites, final=final)
        self.schedule.notify(self._ctx(epoch_end), event)
        return event

    def _ctx(self, epoch_end: bool) -> RehashContext:
        return RehashContext(step=self.step, epoch=self.epoch, epoch_end=epoch_end, sites=model_sites(self.model),
                             model=self.model, stats=self.rehasher.stats, rehashes=self.rehashes,
                             steps_per_epoch=math.ceil(len(self.data.x_train) / self.batch_size))

    # ------------------------------------------------------------------ compression
    def _rehash(self, names: list[str], final: bool = False) -> RehashEvent:
        """The Rehasher compresses ``names`` (``final``: the run's last step or epoch end); logged."""
        with self.timer("hash"):
            overrides = self.schedule.site_overrides() if hasattr(self.schedule, "site_overrides") else None
            event = self.rehasher.rehash(self.model, self.optimizer, names, self.step, self.epoch, self.rehashes,
                                         final=final, overrides=overrides)
        self.rehashes += 1
        self.rehash_log.append(event)
        return event

    def _step_row(self, losses, step_times, event) -> dict[str, Any]:
        row: dict[str, Any] = {"kind": "step", "step": self.step, "epoch": self.epoch,
                               "loss": sum(losses) / max(len(losses), 1),
                               "step_time_s": sum(step_times) / max(len(step_times), 1),
                               "lr": self.optimizer.param_groups[0]["lr"], "params": count_params(self.model),
                               "rehash": int(event is not None),
                               "hash_time_s": event.time_s if event is not None else 0.0}
        row.update({f"width/{k}": v for k, v in model_widths(self.model).items()})
        if event is not None:
            row.update({f"error/{k}": v for k, v in event.error.items()})
        if self.rehasher is not None:  # member-to-representative distance of the sites under pull
            row.update(self.rehasher.row(self.model, event))
        row.update(self._layer_norms())
        return row

    def _epoch_row(self, event) -> dict[str, Any]:
        self._evaluate_splits()
        row: dict[str, Any] = {"kind": "epoch", "step": self.step, "epoch": self.epoch,
                               "params": count_params(self.model), "rehash": int(event is not None),
                               "hash_time_s": event.time_s if event is not None else 0.0,
                               "flops": count_flops(self.model, self.data.input_shape),
                               "lr": self.optimizer.param_groups[0]["lr"], **self.epoch_metrics}
        row.update({f"width/{k}": v for k, v in model_widths(self.model).items()})
        if event is not None:
            row.update({f"error/{k}": v for k, v in event.error.items()})
        return row

    def summary(self) -> dict[str, Any]:
        """metrics.json's training part: final metrics, FLOPs, params, widths, times, rehash events (and the resume
        record)."""
        if not self.epoch_metrics:
            self._evaluate_splits()
        t = self.timer.totals
        return {
            **self.epoch_metrics,
            "majority_acc": self.data.majority_acc("test"),
            "flops": count_flops(self.model, self.data.input_shape),
            "params": count_params(self.model),
            "widths": model_widths(self.model),
            "widths_before": dict(self.widths_before),
            "train_time_s": t.get("fit", 0.0) - t.get("eval", 0.0) - t.get("checkpoint", 0.0),
            "eval_time_s": t.get("eval", 0.0),
            "hash_time_s": t.get("hash", 0.0),
            "rehashes": self.rehashes,
            "rehash_events": [e.to_json() for e in self.rehash_log],
            "epochs": self.epoch,
            "steps": self.step,
            **({"resumed": self.resumed} if self.resumed is not None else {}),
        }
