"""Atomic file writes: temp file, fsync, rename, fsync of the directory.

A reader (or a resumed run after a kill) sees the old file or the new one, never half of one.
Every file hashexp writes whole (metrics.json, status.json, compress.json, model.pt,
checkpoint.pt, a truncated history.csv) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
import torch


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kw: Any) -> Iterator[IO]:
    """Open ``path + ".tmp"`` for writing; on a clean exit fsync it and rename it over ``path``.

    ``mode`` is "w" (text, ``open_kw`` e.g. ``newline=""``) or "wb". On an exception the
    target is untouched (the temp file stays, as after a kill; the next write replaces it).
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, mode, **open_kw) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    _commit(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented, sorted keys; tensors and numpy scalars as numbers, anything else as str)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into ``path + ".tmp"``, fsync, rename (model.pt, checkpoint.pt)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    _commit(tmp, path)


def _commit(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(o: Any) -> Any:
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
