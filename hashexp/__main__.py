"""Entry point: ``python -m hashexp [overrides]`` (one run) or ``python -m hashexp -m ...`` (many).

Data-parallel: ``torchrun --standalone --nproc_per_node=N -m hashexp [overrides]`` (see
hashexp/distributed.py). Ranks > 0 get Hydra overrides that keep them out of outputs/ (no
.hydra/, no log file, a temporary run dir removed at exit) and use rank 0's run dir.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from hashexp.utils.conf import CONF_DIR

log = logging.getLogger("hashexp")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    """One run. Returns test_acc, or with ``objective: [key, ...]`` (a search preset) those
    metrics.json values as a tuple: what a Hydra sweeper (Optuna, multi-objective) optimizes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from hashexp.app import record_failure, run_dir_of_hydra, train_run
    from hashexp.errors import ConfigError, HashexpError

    run_dir = run_dir_of_hydra()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    dist = None
    try:
        from hashexp.distributed import from_env

        dist = from_env(cfg)
        if dist is not None:
            if multirun:
                raise ConfigError("a Hydra multirun (-m) under torchrun is not supported; launch one torchrun per run")
            run_dir = dist.broadcast_object(run_dir)  # rank 0's run dir: checkpoints, resume=auto
        metrics = train_run(cfg, run_dir, dist=dist)
        return objective_values(metrics, cfg.get("objective"))
    except HashexpError as e:
        record_failure(run_dir, e)
        if multirun:  # the other jobs go on; the table lists this one as failed
            log.error("job failed: %s", e)
            return None
        print(f"hashexp: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        record_failure(run_dir, e)
        if multirun:
            log.exception("job failed")
            return None
        raise
    finally:
        if dist is not None:
            dist.close()


def objective_values(metrics: dict, objective) -> float | tuple[float, ...]:
    """What the task returns to the sweeper: test_acc, or the ``objective`` keys' values as a tuple."""
    if objective is None:
        return float(metrics["test_acc"])
    from hashexp.errors import ConfigError

    keys = [objective] if isinstance(objective, str) else list(objective)
    missing = [k for k in keys if not isinstance(metrics.get(k), (int, float))]
    if missing:
        raise ConfigError(f"objective: {missing} are not numeric keys of metrics.json (e.g. test_acc, flops, params)")
    return tuple(float(metrics[k]) for k in keys)


def _rank_setup() -> str | None:
    """For a torchrun rank > 0: rewrite Hydra's overrides (see distributed.rank_argv); returns its temp dir."""
    from hashexp.distributed import rank_argv, rank_from_env, world_size_from_env

    if world_size_from_env() <= 1 or rank_from_env() == 0 or any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        return None
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f"hashexp-rank{rank_from_env()}-")
    sys.argv[1:] = rank_argv(sys.argv[1:], tmp)
    return tmp


if __name__ == "__main__":
    _tmp = _rank_setup()
    try:
        main()
    finally:
        if _tmp is not None:
            import shutil

            shutil.rmtree(_tmp, ignore_errors=True)
