"""history.csv: one row per logged step, rehash, schedule measurement and epoch."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hashexp.errors import ConfigError
from hashexp.utils.io import atomic_write

PROGRESS = ("auto", "bar", "log", "none")


@dataclass(frozen=True)
class LoggingSettings:
    """``trainer.logging``: ``every`` (steps between history.csv rows) and ``progress`` (``auto``:
    a tqdm bar when interactive, else log lines; ``bar``; ``log``; ``none``)."""

    every: int = 20
    progress: str = "auto"

    @classmethod
    def parse(cls, value: Mapping[str, Any] | LoggingSettings | None) -> LoggingSettings:
        """From the config group (a mapping) or an instance (None: the defaults); checked."""
        if isinstance(value, LoggingSettings):
            return value
        value = value or {}
        unknown = sorted(set(value) - {"every", "progress"})
        if unknown:
            raise ConfigError(f"trainer.logging: unknown key(s) {unknown}; known: every, progress")
        every, progress = value.get("every", 20), value.get("progress", "auto")
        if int(every) < 1:
            raise ConfigError(f"trainer.logging.every must be >= 1, got {every}")
        if progress not in PROGRESS:
            raise ConfigError(f"trainer.logging.progress={progress!r}; choose auto, bar, log or none")
        return cls(every=int(every), progress=progress)


class History:
    """history.csv with a fixed header; rows are dicts, missing fields stay empty.

    On resume the file restarts from the rows the checkpoint had seen: ``keep_rows`` data rows
    (or, for checkpoints that did not record it, the rows up to ``resume_after_step``), read
    from ``source`` (the checkpoint's run dir, when resuming into a new one) or ``path``.
    """

    def __init__(self, path: str, columns: list[str], resume_after_step: int | None = None,
                 keep_rows: int | None = None, source: str | None = None) -> None:
        self.path = path
        self.columns = columns
        self.rows = 0
        src = source if source is not None and os.path.exists(source) else path
        if (resume_after_step is not None or keep_rows is not None) and os.path.exists(src):
            self._truncate(src, resume_after_step, keep_rows)
            self.f = open(path, "a", newline="")
            self.w = csv.DictWriter(self.f, fieldnames=columns, extrasaction="ignore")
        else:
            self.f = open(path, "w", newline="")
            self.w = csv.DictWriter(self.f, fieldnames=columns, extrasaction="ignore")
            self.w.writeheader()
        self.rows_since_flush = 0

    def _truncate(self, src: str, step: int | None, keep_rows: int | None) -> None:
        # Rows written after the checkpoint belong to the killed attempt: drop them.
        with open(src, newline="") as f:
            rows = list(csv.DictReader(f))
        if keep_rows is not None:
            rows = rows[:keep_rows]
        else:
            rows = [r for r in rows if r.get("step") and int(float(r["step"])) <= step]
        with atomic_write(self.path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.rows = len(rows)

    def write(self, row: dict[str, Any]) -> None:
        """One row (missing columns stay empty)."""
        self.w.writerow({k: _fmt(v) for k, v in row.items()})
        self.rows += 1
        self.rows_since_flush += 1
        if self.rows_since_flush >= 20:
            self.flush()

    def flush(self) -> None:
        """Flush to disk (epoch ends, checkpoints)."""
        self.f.flush()
        self.rows_since_flush = 0

    def close(self) -> None:
        """Close the file."""
        self.f.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
