"""Loggers: where a run reports besides its own files.

The run dir always gets history.csv, metrics.json and model.pt; a logger adds a remote view.
``LocalLogger`` (``logger=csv``) adds nothing: the local files are the record. ``WandbLogger``
logs the resolved config, every history row and the final summary; offline by default.
"""

from __future__ import annotations

import os
from typing import Any


class LocalLogger:
    """Local files only (written by the trainer and the app)."""

    def __init__(self, run_dir: str = ".", run_config: dict | None = None, **_: Any) -> None:
        self.run_dir = run_dir

    def log_row(self, row: dict[str, Any], step: int) -> None:
        """One history row (the trainer already wrote it to history.csv)."""

    def log_summary(self, metrics: dict[str, Any]) -> None:
        """The final metrics (the app already wrote metrics.json)."""

    def finish(self) -> None:
        """End of the run: nothing to close."""


class WandbLogger(LocalLogger):
    """Weights & Biases run: config, history, summary. ``finish()`` after each job."""

    def __init__(self, run_dir: str = ".", run_config: dict | None = None, project: str = "hashexp",
                 entity: str | None = None, mode: str = "offline", group: str | None = None,
                 tags: list[str] | None = None, dir: str | None = None, **_: Any) -> None:
        super().__init__(run_dir)
        import wandb

        from hashexp.errors import ConfigError

        mode = os.environ.get("WANDB_MODE", mode)
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.mode={mode!r}; choose offline, online or disabled")
        self.run = wandb.init(project=project, entity=entity, mode=mode, group=group, tags=list(tags or []),
                              dir=dir or run_dir, config=run_config, name=os.path.basename(os.path.normpath(run_dir)),
                              reinit="finish_previous")

    def log_row(self, row: dict[str, Any], step: int) -> None:
        """One history row's numbers at ``step``."""
        clean = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        self.run.log(clean, step=step)

    def log_summary(self, metrics: dict[str, Any]) -> None:
        """The final metrics (and each site's final width) as the run summary."""
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        for k, v in (metrics.get("widths") or {}).items():
            flat[f"final_width/{k}"] = v
        self.run.summary.update(flat)

    def finish(self) -> None:
        """Close the W&B run (after each job of a multirun)."""
        self.run.finish()
