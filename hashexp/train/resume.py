"""What the Trainer saves and restores: checkpoint.pt of a running fit, and the resume from one.

:class:`Checkpointing` is the Trainer's checkpoint half (a mixin, so that train/loop.py keeps fit,
step and evaluate): the state it writes (:meth:`Checkpointing.checkpoint_state`), the atomic save
(rank 0, after gathering every rank's activation statistics), and the resume, which checks that
the checkpoint belongs to this experiment (:func:`hashexp.train.checkpoint.check_config`), rebuilds
the model at its merged widths and restores optimizer, schedules, the Rehasher, position and
every RNG stream, so that the resumed run ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os

import torch

from hashexp.errors import ConfigError
from hashexp.merge.reports import RehashEvent
from hashexp.merge.sites import model_sites, model_widths
from hashexp.train import checkpoint as ckpt

log = logging.getLogger("hashexp")


class Checkpointing:
    """The Trainer's checkpoint and resume methods (they read and set the Trainer's attributes)."""

    def _resume_path(self) -> str | None:
        resume = self.checkpointing.resume
        if not resume:
            return None
        if resume != "auto":
            return resume
        path = os.path.join(self.run_dir, "checkpoint.pt")
        return path if os.path.exists(path) else None

    def checkpoint_state(self, stats: list[dict[str, torch.Tensor]] | None = None,
                         rows: list[dict] | None = None) -> ckpt.CheckpointState:
        """Everything a resume needs to continue exactly: weights at their merged widths,
        optimizer, LR schedule, rehash schedule, compressor, activation statistics and recorded
        calibration rows (one entry per rank, ``stats``, ``rows``), the position in the epoch, pending step losses, every RNG and the
        run config."""
        from hashexp.models import model_payload

        # mid-epoch: the state the epoch's permutation was drawn from, to draw it again
        gen_state = self._epoch_gen_state if self.batch_in_epoch else self.gen.get_state()
        own = self.rehasher.state_dict() if self.rehasher is not None else {}
        return ckpt.CheckpointState(
            model=model_payload(self.model),
            optimizer=self.optimizer.state_dict(),
            lr_schedule=self.lr_schedule.state_dict() if self.lr_schedule is not None else None,
            schedule=self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
            compressor=own.get("compressor"),
            step=self.step, epoch=self.epoch, rehashes=self.rehashes,
            batch_in_epoch=self.batch_in_epoch, batch_size=self.batch_size, n_train=len(self.data.x_train),
            pending_losses=[float(v) for v in self._pending_losses],
            history_rows=self._history_rows,
            stats=stats if stats is not None else [own.get("stats", {})],
            world_size=self.dist.world_size if self.dist is not None else 1,
            rehash_log=[e.to_dict() for e in self.rehash_log], widths_before=self.widths_before,
            calib_index=own.get("calib_index"),
            pull=own.get("pull"),
            rows=rows if rows is not None else ([own["rows"]] if own.get("rows") is not None else None),
            times=dict(self.timer.totals),
            rng=ckpt.capture_rng(gen_state, self.aug_gen, self.device),
            config=self.config,
        )

    def save_checkpoint(self) -> None:
        """Atomic checkpoint.pt (temp file, fsync, rename): a kill mid-write keeps the previous one.

        Under DDP every rank must call this (the activation statistics are gathered); rank 0 writes.
        """
        if not self.checkpointing.enabled:
            return
        with self.timer("checkpoint"):
            stats = rows = None
            if self.dist is not None:
                own = self.rehasher.state_dict() if self.rehasher else {}
                stats = self.dist.all_gather_object(own.get("stats", {}))
                if own.get("rows") is not None:
                    rows = self.dist.all_gather_object(own["rows"])
            if not self.is_main:
                return
            if self._hist is not None:
                self._hist.flush()
                self._history_rows = self._hist.rows
            ckpt.save(self.checkpoint_state(stats, rows), self.run_dir)

    def load_checkpoint(self, path: str) -> None:
        """Continue from the checkpoint at ``path`` (a file or a run dir), after checking it fits this run."""
        from hashexp.models import build_model

        path = ckpt.checkpoint_path(path)
        ck = ckpt.load(path)
        self._check_resume(path, ck)
        spec = ck.model
        model = build_model({"_target_": spec["target"], **spec["kwargs"]}, spec["input_shape"], spec["num_classes"],
                            site_widths=spec["widths"])
        model.load_state_dict(spec["state_dict"])
        self.model = model.to(self.device)
        self.sites = model_sites(self.model)
        if self.rehasher is not None:
            self.rehasher.watch(self.model)
            self.rehasher.load_state_dict({"compressor": ck.compressor, "calib_index": ck.calib_index,
                                           "pull": ck.pull, "stats": self._rank_stats(ck.stats),
                                           "rows": self._rank_rows(ck.rows)}, self.device)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.optimizer.load_state_dict(ck.optimizer)
        if ck.lr_schedule is not None and self._lr_factory is not None:
            self.lr_schedule = self._lr_factory(self.optimizer)
            self.lr_schedule.load_state_dict(ck.lr_schedule)
        if self.schedule is not None and ck.schedule is not None:
            self.schedule.load_state_dict(ck.schedule)
        self.step, self.epoch, self.rehashes = ck.step, ck.epoch, ck.rehashes
        self.batch_in_epoch = int(ck.batch_in_epoch)
        if self.batch_in_epoch and (ck.batch_size, ck.n_train) != (self.batch_size, len(self.data.x_train)):
            raise ConfigError(f"{path} was written {self.batch_in_epoch} batches into an epoch with batch_size="
                              f"{ck.batch_size} on {ck.n_train} training samples; resume it with the "
                              f"same trainer.batch_size and dataset (here {self.batch_size}, {len(self.data.x_train)})")
        self._pending_losses = [float(v) for v in ck.pending_losses]
        self._history_rows = ck.history_rows
        self.rehash_log = [RehashEvent.from_dict(e) for e in ck.rehash_log]
        self.widths_before = ck.widths_before
        self.timer.totals.update(ck.times)
        ckpt.restore_rng(ck.rng, self.gen, self.aug_gen, self.device)
        self._epoch_gen_state = ck.rng["gen"]
        log.info("resumed from %s at epoch %d (step %d, batch %d of the epoch), widths %s", path, self.epoch,
                 self.step, self.batch_in_epoch, model_widths(self.model))

    def _check_resume(self, path: str, ck: ckpt.CheckpointState) -> None:
        """Refuse a checkpoint made for another experiment; remember what this run changed."""
        adopted = self._adopt_predated_knobs(path, ck)
        changed = None
        if ck.config is not None and self.config is not None:
            changed = ckpt.check_config(path, ck.config, self.config)
        ckpt.check_model_spec(path, ck.model, getattr(self.model, "_hashexp_spec", None))
        self.resumed = {"from": path, "changed": changed, **({"adopted": adopted} if adopted else {})}

    def _adopt_predated_knobs(self, path: str, ck: ckpt.CheckpointState) -> dict[str, list]:
        """A checkpoint from before a knob existed (:data:`~hashexp.train.checkpoint.ADDED_KNOBS`)
        continues with the behaviour it was started with: the knob takes the old value in this
        run's config and compressor, and the log says so. Returns ``{key: [this run's, adopted]}``."""
        comp = getattr(self.rehasher, "compressor", None)
        present = {f"hashing.{k}" for k in vars(comp)} if comp is not None else set()
        own = self.rehasher.own_knobs() if self.rehasher is not None else {}
        present |= {f"hashing.{k}" for k in own}
        adopted = {}
        for key, value in ckpt.predated_knobs(ck.config, self.config, present).items():
            attr = key.split(".", 1)[1]
            if not key.startswith("hashing.") or comp is None:
                continue
            if attr in own:  # a knob of the Rehasher (its recorder is rebuilt with the model below)
                before = own[attr]
                self.rehasher.adopt(attr, value)
            elif hasattr(comp, attr):
                before = getattr(comp, attr)
                setattr(comp, attr, value)
            else:
                continue
            for cfg in (self.config, ck.config):  # both as the run has been computing
                if cfg is not None:
                    ckpt.set_dotted(cfg, key, value)
            if before == value:  # the run computes as it was started: nothing to say
                continue
            adopted[key] = [before, value]
            log.warning("%s predates %s: resuming with %s=%s, the behaviour the run was started with "
                        "(this run's config had %s)", path, key, key, value, before)
        return adopted

    def _rank_rows(self, saved: list[dict] | None) -> dict | None:
        """This rank's recorded calibration rows; with another world size, rank 0 takes them all."""
        if not saved:
            return None
        from hashexp.merge.training_rows import TrainingCapture

        rank, ws = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        return saved[rank] if len(saved) == ws else TrainingCapture.merged_state(saved, rank)

    def _rank_stats(self, saved: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor] | None:
        """This rank's activation statistics; with another world size, rank 0 takes their sum."""
        if not saved:
            return None
        rank, ws = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        if len(saved) == ws:
            mine = saved[rank]
        elif rank == 0:
            mine = {k: sum(s[k] for s in saved) for k in saved[0]}
        else:
            mine = {k: torch.zeros_like(v) for k, v in saved[0].items()}
        return mine

