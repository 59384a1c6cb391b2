"""Runs -> groups -> one summary row each: mean ± std over seeds.

A group is (dataset, model, hashing, tag, variant): the hashing name (plus the
schedule when several are in play); the variant names the config keys that differ inside a
method, e.g. ``hashing.threshold=0.8``. Of several finished runs of one group and seed the newest
counts; the others are marked superseded.
"""

from __future__ import annotations

import re
import shlex
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hashexp.results.vocab import VANILLA, fmt_value, num, stats

if TYPE_CHECKING:
    from hashexp.results.runs import RunRecord

# The per-run numbers a summary row averages over seeds (<name>_mean, <name>_std).
AGG = ["test_acc", "train_acc", "majority_acc", "acc_delta", "flops", "params", "flops_reduction",
       "params_reduction", "latency_ms", "latency_speedup", "wall_speedup", "train_speedup", "wall_time_s",
       "train_time_s", "hash_time_s", "rehashes", "peak_rss_mb"]


def label(runs: list[RunRecord]) -> None:
    """Set hashing_label (hashing name, + schedule when several are in play) and variant on every run."""
    schedules = {r.schedule for r in runs if r.hashing != VANILLA}
    for r in runs:
        m = str(r.hashing)
        if len(schedules) > 1 and m != VANILLA:
            m = f"{m}/{r.schedule}"
        r.hashing_label = m
    buckets: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        r.variant = ""
        if r.status == "ok":  # a failed run's partial config must not make variants of the others
            buckets[(r.dataset, r.model, r.hashing_label, r.tag)].append(r)
    for members in buckets.values():
        keys: set[str] = set()
        for r in members:
            keys |= set(r.variant_config)
        differing = sorted(k for k in keys
                           if len({fmt_value(r.variant_config.get(k, "<unset>")) for r in members}) > 1)
        for r in members:
            r.variant = " ".join(f"{k}={fmt_value(r.variant_config.get(k))}" for k in differing)


def group_key(r: RunRecord) -> tuple:
    """The runs one summary row averages over seeds: dataset, model, hashing, tag, variant."""
    return (r.dataset, r.model, r.hashing_label, r.tag, r.variant)


def mark_superseded(runs: list[RunRecord]) -> None:
    """Several finished runs of one group and seed: the newest counts, the others are superseded."""
    by: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        if r.status == "ok":
            by[(group_key(r), r.seed)].append(r)
    for members in by.values():
        members.sort(key=lambda r: r.mtime)
        for r in members[:-1]:
            r.superseded = True


def row_order(key: tuple, flops: float | None) -> tuple:
    """Vanilla first, then methods by name; inside a method and tag, the largest network first."""
    dataset, model, method, tag, variant = key
    return (dataset, model, (method != VANILLA, method), tag, -(flops or 0.0), variant)


def finished_groups(runs: Sequence[RunRecord]) -> dict[tuple, list[RunRecord]]:
    """The finished, not superseded runs by group key, in table order."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        if r.status == "ok" and not r.superseded:
            groups[group_key(r)].append(r)
    order = sorted(groups, key=lambda k: row_order(k, stats([r.get("flops") for r in groups[k]])[0]))
    return {k: groups[k] for k in order}


def summarize(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per (dataset, model, hashing, tag, variant): mean and std over seeds.

    Each row has dataset, model, hashing, tag, variant, n (runs), seeds, n_paired (runs with a
    vanilla twin), <metric>_mean and <metric>_std for test_acc, train_acc, majority_acc,
    acc_delta, flops, params, flops_reduction, params_reduction, latency_ms, latency_speedup,
    wall_speedup, train_speedup,
    wall_time_s, train_time_s, hash_time_s, rehashes, peak_rss_mb; widths (final, mean per
    site), widths_before and command (reruns the row as one multirun).
    """
    rows = []
    for key, group in finished_groups(runs).items():
        members = sorted(group, key=lambda r: (num(r.seed), str(r.seed), r.run_dir))
        row: dict[str, Any] = dict(zip(("dataset", "model", "hashing", "tag", "variant"), key))
        row["n"] = len(members)
        row["seeds"] = " ".join(str(r.seed) for r in members)
        row["n_paired"] = sum(1 for r in members if r.vanilla_dir)
        for m in AGG:
            row[f"{m}_mean"], row[f"{m}_std"] = stats([r.get(m) for r in members])
        row["widths"] = _mean_widths([r.get("widths") for r in members])
        row["widths_before"] = _mean_widths([r.get("widths_before") for r in members])
        row["command"] = _group_command(members)
        rows.append(row)
    return rows


def _mean_widths(ws: list[Any]) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for w in ws:
        for k, v in (w or {}).items():
            acc[k].append(float(v))
    return {k: statistics.fmean(v) for k, v in acc.items()}


def _group_command(members: list[RunRecord]) -> str:
    """The command that reproduces a row: one multirun over its seeds when its runs differ only
    in the seed, else the runs' own commands one after another."""
    if not any(r.overrides for r in members):
        return ""
    strip = [[o for o in r.overrides if not re.match(r"^[+~]*seed=", o)] for r in members]
    if any(sorted(s) != sorted(strip[0]) for s in strip[1:]):  # e.g. a width plan per seed
        return " ; ".join(r.command for r in members)
    seeds = ",".join(str(r.seed) for r in members)
    return "python -m hashexp -m " + " ".join(shlex.quote(o) for o in strip[0] + [f"seed={seeds}"])
