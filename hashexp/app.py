"""One run: compose the objects from the config, train, write the run directory.

A run directory holds .hydra/ (written by Hydra), history.csv, metrics.json (atomic),
model.pt and checkpoint.pt. A run that fails writes status.json with the error instead of
metrics.json, so tables list it as failed and a multirun carries on with the other jobs.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hashexp.data import build_dataset
from hashexp.errors import ConfigError, HashexpError
from hashexp.merge.rehasher import Rehasher
from hashexp.merge.rehasher import build_rehasher as build_rehasher_from
from hashexp.metrics import peak_rss_mb
from hashexp.models import build_model, save_model
from hashexp.utils.io import write_json_atomic
from hashexp.utils.knobs import check_knob_types
from hashexp.utils.seeding import seed_everything

log = logging.getLogger("hashexp")


def build_rehasher(cfg_hashing: DictConfig | None, seed: int) -> Rehasher | None:
    """The :class:`~hashexp.merge.rehasher.Rehasher` of ``cfg.hashing`` (its own keys split off,
    the rest the compressor), or None for vanilla training (``hashing=none``)."""
    if cfg_hashing is None:
        return None
    node = OmegaConf.to_container(cfg_hashing, resolve=True) if isinstance(cfg_hashing, DictConfig) else cfg_hashing
    return build_rehasher_from(node, seed, lambda rest, **kw: _instantiate(OmegaConf.create(rest), "hashing", **kw))


# Groups whose `name` is a label for configs, run records and tables only: their classes do not take it.
_LABEL_ONLY = ("trainer", "schedule", "logger")


def _instantiate(node: DictConfig, group: str, **kwargs):
    from hydra.errors import InstantiationException

    if group in _LABEL_ONLY and "name" in node:  # resolved where it sits (interpolations), then unlabelled
        node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, HashexpError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise ConfigError(f"{group}: {cause}") from None
        raise ConfigError(f"{group}: {str(e).splitlines()[0]}") from e


def group_choices() -> dict[str, str]:
    """The config group choices of this Hydra job (``{group: option}``, Hydra's own left out)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    except Exception:
        return {}


def run_dir_of_hydra() -> str:
    """This Hydra job's output dir (the working directory outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:
        return os.getcwd()


def train_run(cfg: DictConfig, run_dir: str | None = None, dist=None) -> dict[str, Any]:
    """Train one configuration and write its run directory; returns metrics.json's content."""
    t_start = time.perf_counter()
    run_dir = run_dir or run_dir_of_hydra()
    is_main = dist is None or dist.is_main
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
    check_knob_types(cfg)  # a bad-typed knob: one line naming it, before any data is read
    seed = int(cfg.seed)
    seed_everything(seed)
    data = build_dataset(cfg.dataset, seed=seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    rehasher = build_rehasher(cfg.hashing, seed)
    schedule = _instantiate(cfg.schedule, "schedule") if rehasher is not None else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # the resolved config holds _target_ keys: pass it after instantiation so it stays data
    logger = _instantiate(cfg.logger, "logger", _partial_=True)(run_dir=run_dir, run_config=resolved) if is_main else None
    factory = _instantiate(cfg.trainer, "trainer")
    trainer = factory(model=model, data=data, rehasher=rehasher, schedule=schedule, logger=logger,
                      run_dir=run_dir, seed=seed, config=resolved, dist=dist)
    summary = trainer.fit()
    metrics = {
        "status": "ok",
        **summary,
        "wall_time_s": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
        "seed": seed,
        "tag": cfg.get("tag", ""),
        "groups": group_choices(),
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "hashing": cfg.hashing.name,
        "schedule": cfg.schedule.name,
        "world_size": dist.world_size if dist is not None else 1,
    }
    if is_main:
        save_model(trainer.model, os.path.join(run_dir, "model.pt"))
        write_json_atomic(os.path.join(run_dir, "metrics.json"), metrics)
        stale = os.path.join(run_dir, "status.json")
        if os.path.exists(stale):
            os.remove(stale)
        if logger is not None:
            logger.log_summary(metrics)
            logger.finish()
        log.info("test_acc %.4f (majority %.4f)  flops %d  params %d  widths %s  wall %.1fs  -> %s",
                 metrics["test_acc"], metrics["majority_acc"], metrics["flops"], metrics["params"],
                 metrics["widths"], metrics["wall_time_s"], run_dir)
    return metrics


def record_failure(run_dir: str, err: BaseException) -> None:
    """status.json for a failed run (metrics.json of earlier runs is never touched)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "status.json"),
                          {"status": "failed", "error": f"{type(err).__name__}: {err}",
                           "traceback": "".join(traceback.format_exception(err))[-4000:],
                           "groups": group_choices()})
    except OSError:
        pass
