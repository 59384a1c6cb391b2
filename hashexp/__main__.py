"""Entry point: ``python -m hashexp [overrides]`` (one run) or ``python -m hashexp -m ...`` (many)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("hashexp")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from hashexp.app import record_failure, run_dir_of_hydra, train_run
    from hashexp.errors import HashexpError

    run_dir = run_dir_of_hydra()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    dist = None
    try:
        from hashexp.distributed import from_env

        dist = from_env(cfg)
        metrics = train_run(cfg, run_dir, dist=dist)
        return float(metrics["test_acc"])
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


if __name__ == "__main__":
    main()
