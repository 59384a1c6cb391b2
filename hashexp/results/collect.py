"""All runs under some paths, paired and labelled: :func:`collect_runs`.

It sits above the three steps it chains: loading (:mod:`hashexp.results.runs`), pairing with
vanilla twins (:mod:`hashexp.results.pairing`) and labelling variants
(:mod:`hashexp.results.summary`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence

from hashexp.results.pairing import pair
from hashexp.results.runs import RunRecord, find_run_dirs, latest_sweep, load_run, measure_latencies
from hashexp.results.summary import label, mark_superseded


def _parse_date(s: str | None, end: bool = False) -> dt.datetime | None:
    if s is None:
        return None
    try:
        d = dt.datetime.strptime(s, "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"date {s!r} is not YYYY-MM-DD") from None
    return d + dt.timedelta(days=1) - dt.timedelta(microseconds=1) if end else d


def collect_runs(paths: Sequence[str], sweep: str | None = None, since: str | None = None,
                 until: str | None = None, latency_batch: int | None = None,
                 latency_repeats: int = 20) -> list[RunRecord]:
    """All runs under ``paths`` (ok, failed and unfinished), finished ones paired with vanilla.

    Args:
        paths: directories to scan recursively (run dirs, multirun dirs or whole output trees).
        sweep: keep only the runs of this multirun dir ("latest": the newest one under paths);
            vanilla twins are still looked up in all of ``paths``.
        since, until: keep runs started on or after / on or before this date (YYYY-MM-DD), taken
            from the run dir's name, else its mtime.
        latency_batch: measure every finished run's forward latency (``latency_ms``) at this batch
            size from its model.pt, all models side by side in this process (see
            :func:`measure_latencies`); None: only where metrics.json already has ``latency_ms``.
        latency_repeats: timed rounds for that measurement.
    Returns:
        one :class:`RunRecord` per run, with hashing_label and variant set and, where a vanilla twin
        exists, vanilla_dir, flops_reduction, params_reduction, wall_speedup, train_speedup,
        acc_delta and (with latencies) latency_speedup.
    """
    paths = list(paths)
    if sweep == "latest":
        sweep = latest_sweep(paths)
        if sweep is None:
            raise FileNotFoundError(f"no multirun dir (with multirun.yaml) under {', '.join(paths)}")
    if sweep is not None:
        if not os.path.isdir(sweep):
            raise FileNotFoundError(f"--sweep {sweep}: no such directory")
        sweep = os.path.abspath(sweep)
        paths = paths + [sweep]
    runs = [load_run(d) for d in find_run_dirs(paths)]
    if latency_batch is not None:
        measure_latencies(runs, int(latency_batch), repeats=latency_repeats)
    pair(runs)
    label(runs)
    lo, hi = _parse_date(since), _parse_date(until, end=True)
    keep = []
    for r in runs:
        if sweep is not None and not (r.run_dir + os.sep).startswith(sweep + os.sep):
            continue
        if lo is not None and r.date < lo:
            continue
        if hi is not None and r.date > hi:
            continue
        keep.append(r)
    mark_superseded(keep)
    return keep
