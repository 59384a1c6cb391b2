"""checkpoint.pt: everything a resume needs to continue exactly, written atomically, checked on load.

On disk a checkpoint is a dict of plain values and tensors (``format: hashexp.checkpoint/1``,
loadable with ``torch.load(weights_only=True)``); :class:`CheckpointState` is its typed view.
Since the composed run config is recorded (``config``), a resume compares it with its own and
refuses changes that would make the continued run another experiment (:func:`config_changes`);
older checkpoints without it fall back to comparing the model spec.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError, DataError
from hashexp.utils.dicts import flatten
from hashexp.utils.io import torch_save_atomic

FORMAT = "hashexp.checkpoint/1"

# On resume, a difference in these config keys (and anything under them) is refused ...
REFUSED = ("model", "dataset", "hashing", "schedule", "seed", "trainer.optimizer", "trainer.batch_size")
# ... except these, which change how a run is watched or where it runs, not what it computes.
# (``trainer.checkpoint`` covers every ``trainer.checkpoint*`` key.) Other changes are allowed.
ALLOWED = ("trainer.epochs", "trainer.logging", "trainer.resume", "trainer.progress", "trainer.log_every", "trainer.checkpoint",
           "trainer.num_threads", "trainer.device", "logger", "tag", "dataset.root", "dataset.download",
           "hashing.n_threads", "hydra")


@dataclass(frozen=True)
class CheckpointSettings:
    """``trainer.checkpoint``: ``enabled`` (checkpoint.pt at every epoch end), ``every_steps`` (also
    every N optimizer steps inside an epoch; None: epoch ends only), ``resume`` (a run dir or
    checkpoint.pt to continue from, ``auto``: this run dir's own checkpoint if any, None: start)."""

    enabled: bool = True
    every_steps: int | None = None
    resume: str | None = None

    @classmethod
    def parse(cls, value: Any) -> CheckpointSettings:
        """From the config group (a mapping), a bool (``enabled``) or an instance; checked."""
        if isinstance(value, CheckpointSettings):
            return value
        if value is None or isinstance(value, bool):
            return cls(enabled=value is not False)
        unknown = sorted(set(value) - {"enabled", "every_steps", "resume"})
        if unknown:
            raise ConfigError(f"trainer.checkpoint: unknown key(s) {unknown}; known: enabled, every_steps, resume")
        every = value.get("every_steps")
        if every is not None and int(every) < 1:
            raise ConfigError(f"trainer.checkpoint.every_steps must be >= 1 or null, got {every}")
        return cls(enabled=bool(value.get("enabled", True)), every_steps=int(every) if every else None,
                   resume=value.get("resume"))


@dataclass
class CheckpointState:
    """The typed checkpoint: trainer position, model, optimizer, schedules, statistics and RNG.

    Fields with defaults are absent from older checkpoints.
    """

    model: dict[str, Any]  # hashexp.models.model_payload: spec, widths, state_dict
    optimizer: dict[str, Any]
    lr_schedule: dict[str, Any] | None
    schedule: dict[str, Any] | None
    compressor: dict[str, Any] | None
    step: int
    epoch: int
    rehashes: int
    rehash_log: list[dict[str, Any]]  # RehashEvent.to_dict() of each rehash so far
    widths_before: dict[str, int]
    times: dict[str, float]
    rng: dict[str, Any]  # capture_rng()
    format: str = FORMAT
    batch_in_epoch: int = 0  # > 0: written inside an epoch, after this many of its batches
    batch_size: int | None = None
    n_train: int | None = None
    pending_losses: list[float] = field(default_factory=list)  # step losses not yet in a history row
    history_rows: int | None = None  # history.csv data rows at the time of the checkpoint
    stats: list[dict[str, torch.Tensor]] | None = None  # activation statistics, one entry per rank
    world_size: int = 1
    calib_index: torch.Tensor | None = None
    pull: dict[str, Any] | None = None
    rows: list[dict[str, Any]] | None = None  # hashing.calibration=training: recorded rows, one entry per rank
    config: dict[str, Any] | None = None  # the composed, resolved run config

    _ORDER = ("format", "model", "optimizer", "lr_schedule", "schedule", "compressor", "step", "epoch", "rehashes",
              "batch_in_epoch", "batch_size", "n_train", "pending_losses", "history_rows", "stats", "world_size",
              "rehash_log", "widths_before", "calib_index", "pull", "rows", "times", "rng", "config")

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (plain values and tensors, in a fixed order)."""
        return {k: getattr(self, k) for k in self._ORDER}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointState:
        """From the on-disk dict (keys of newer checkpoints this code does not know are dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def checkpoint_path(path: str) -> str:
    """``path`` itself, or the checkpoint.pt inside it when it is a run dir."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def save(state: CheckpointState, run_dir: str) -> None:
    """Atomic checkpoint.pt in ``run_dir`` (temp file, fsync, rename): a kill mid-write keeps the previous one."""
    torch_save_atomic(state.to_dict(), os.path.join(run_dir, "checkpoint.pt"))


def load(path: str) -> CheckpointState:
    """The checkpoint at ``path`` (a file or a run dir); one clear error when it is missing or unreadable."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise DataError(f"trainer.checkpoint.resume={path}: no checkpoint there; point it at a run dir that has checkpoint.pt")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}); "
                        f"delete it (and resume from an earlier copy) or start over") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise DataError(f"{path} is not a hashexp checkpoint")
    return CheckpointState.from_dict(ck)


def check_model_spec(path: str, spec: dict[str, Any], mine: dict[str, Any] | None) -> None:
    """Refuse a checkpoint of another model or input shape (checkpoints without a recorded config)."""
    if mine is None:
        return
    def kw(s):  # an older model.pt records the MLP's `name` label too
        return {k: v for k, v in s["kwargs"].items() if k != "name"}

    ck_cfg = (spec["target"], kw(spec), list(spec["input_shape"]), int(spec["num_classes"]))
    my_cfg = (mine["target"], kw(mine), list(mine["input_shape"]), int(mine["num_classes"]))
    if ck_cfg != my_cfg:
        raise ConfigError(f"trainer.checkpoint.resume={path}: the checkpoint holds {spec['target'].rsplit('.', 1)[-1]}"
                          f"({spec['kwargs']}) for inputs {list(spec['input_shape'])} and "
                          f"{spec['num_classes']} classes, but this run builds "
                          f"{mine['target'].rsplit('.', 1)[-1]}({mine['kwargs']}) for inputs "
                          f"{list(mine['input_shape'])} and {mine['num_classes']} classes; resume with the "
                          "checkpoint's model and dataset settings")


# ------------------------------------------------------------------------------ config
_UNSET = "<unset>"


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") or (p == "trainer.checkpoint" and key.startswith(p))
               for p in prefixes)


#: ``_target_`` classes that moved: an older checkpoint's config names them by their old home
MOVED_TARGETS = {
    **{f"hashexp.merge.compressor.{c}": f"hashexp.merge.{m}.{c}" for m, c in (
        ("hashed", "HashCompressor"), ("baselines", "MagnitudePruner"), ("baselines", "RandomMerger"),
        ("baselines", "NeuronMerging"))},
    **{f"hashexp.schedule.{c}": f"hashexp.schedules.{m}.{c}" for m, c in (
        ("fixed", "FixedSchedule"), ("per_layer", "PerLayerSchedule"), ("gradual", "GradualSchedule"),
        ("drift", "DriftSchedule"))},
    "hashexp.merge.learnable.LearnableHashCompressor": "hashexp.merge.learned.LearnableHashCompressor",
}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """(refused, allowed) differences between two resolved run configs: ``{dotted key: [old, new]}``
    (a moved ``_target_`` counts as its new home, :data:`MOVED_TARGETS`)."""
    a, b = flatten(old), flatten(new)
    a = {k: MOVED_TARGETS.get(v, v) if k.endswith("_target_") and isinstance(v, str) else v for k, v in a.items()}
    refused, allowed = {}, {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _UNSET), b.get(k, _UNSET)
        if va == vb or (va is _UNSET and vb is None) or (vb is _UNSET and va is None):
            continue  # a knob added (or dropped) with a null default changes nothing
        if _under(k, REFUSED) and not _under(k, ALLOWED):
            refused[k] = [va, vb]
        else:
            allowed[k] = [va, vb]
    return refused, allowed


#: knobs added after checkpoints were first written whose default changed what a run computes:
#: ``{dotted key: the value a run started before the key existed ran with}``. A resume of such a
#: checkpoint adopts that value (:func:`predated_knobs`), so it continues as it was started.
ADDED_KNOBS: dict[str, Any] = {
    "hashing.scoring": "sequential",  # issue 22: the baselines scored site by site before it
    "hashing.calibration": "passes",  # issue 19: calibration passes at every rehash before training rows existed
    "hashing.calib_batches": 8,  # (its window; unused with passes)
}


def predated_knobs(old: dict[str, Any] | None, new: dict[str, Any] | None,
                   present: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """``{key: value}`` of the :data:`ADDED_KNOBS` that a checkpoint's config ``old`` predates.

    A knob counts when ``old`` lacks it and this run has it: in its config ``new``, or, for a
    Trainer built without one, among ``present`` (the dotted keys its components have). ``old``
    None (a checkpoint from before configs were recorded) predates every added knob.
    """
    a = flatten(old) if old is not None else {}
    b = set(flatten(new)) if new is not None else set(present)
    return {k: v for k, v in ADDED_KNOBS.items() if k not in a and k in b}


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """``cfg["a"]["b"] = value`` for ``key="a.b"`` (missing nested dicts are made)."""
    *head, last = key.split(".")
    for part in head:
        cfg = cfg.setdefault(part, {})
    cfg[last] = value


def check_config(path: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """The allowed changes from the checkpoint's config to this run's; ConfigError naming any refused one."""
    refused, allowed = config_changes(old, new)
    if refused:
        was = ", ".join(f"{k}={v[0]}" for k, v in refused.items())
        now = ", ".join(f"{k}={v[1]}" for k, v in refused.items())
        raise ConfigError(f"trainer.checkpoint.resume={path}: the checkpoint was made with {was}, this run has {now}; "
                          "resume with the checkpoint's settings or start a new run")
    return allowed


# ------------------------------------------------------------------------------ RNG
def capture_rng(gen_state: torch.Tensor, aug_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The five RNG streams: the batch generator's state ``gen_state``, augmentation, torch, Python,
    numpy (and CUDA's on a GPU)."""
    rng: dict[str, Any] = {
        "gen": gen_state, "aug": aug_gen.get_state(), "torch": torch.get_rng_state(),
        "python": random.getstate(), "numpy": _numpy_rng_state(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, Any], gen: torch.Generator, aug_gen: torch.Generator, device: torch.device) -> None:
    """Set the five RNG streams (and CUDA's) back to what :func:`capture_rng` saw."""
    gen.set_state(rng["gen"])
    aug_gen.set_state(rng["aug"])
    torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate(_as_tuple(rng["python"]))
    if "numpy" in rng:
        _set_numpy_rng_state(rng["numpy"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _set_numpy_rng_state(st: dict[str, Any]) -> None:
    np.random.set_state(("MT19937", st["keys"].numpy().astype(np.uint32), int(st["pos"]), int(st["has_gauss"]),
                         float(st["gauss"])))


def _as_tuple(obj):
    return tuple(_as_tuple(v) for v in obj) if isinstance(obj, (list, tuple)) else obj

