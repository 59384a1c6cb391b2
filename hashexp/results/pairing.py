"""Every finished run next to its vanilla twin, and the ratios against it.

A compressed run's twin is the vanilla run (hashing=none) with the same dataset, model, initial
widths, epochs, seed and world size, and the same model/dataset/trainer config where
.hydra/config.yaml says so; among several, one from the same multirun (speed claims are ratios
measured side by side), then the closest in time. A tagged vanilla run is compared with the
widest vanilla run of its tag that differs from it only in the widths: a small network trained
from scratch against the full one (the widest against itself).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from hashexp.results.vocab import PAIR_IGNORE, VANILLA, WIDTH_KEYS, is_noise, num

if TYPE_CHECKING:
    from hashexp.results.runs import RunRecord


def _widths_key(w: Any) -> str:
    return json.dumps(w or {}, sort_keys=True)


def pair_signature(config: dict[str, Any], drop_widths: bool = False) -> str | None:
    """Model, data and optimizer settings a vanilla twin must share (None: no .hydra/config.yaml)."""
    if not config:
        return None
    sig = {k: v for k, v in config.items()
           if k.split(".")[0] in ("model", "dataset", "trainer")
           and not is_noise(k) and not k.startswith(PAIR_IGNORE)
           and not (drop_widths and k in WIDTH_KEYS)}
    return json.dumps(sig, sort_keys=True, default=str)


def ratio(a: Any, b: Any) -> float | None:
    """a / b for two positive finite numbers, else None."""
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return None
    if b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _tag_key(r: RunRecord) -> tuple:
    return (r.dataset, r.model, r.epochs, r.seed, r.world_size, r.tag)


def pair(runs: list[RunRecord]) -> None:
    """Set pair_key, the pair signatures, vanilla_dir and the ratios on every finished run that
    has a twin (see the module docstring for which run that is)."""
    ok = [r for r in runs if r.status == "ok"]
    for r in ok:
        r.pair_key = (r.dataset, r.model, _widths_key(r.get("widths_before")), r.epochs, r.seed, r.world_size)
        r.pair_signature = pair_signature(r.config)
        r.pair_signature_no_widths = pair_signature(r.config, drop_widths=True)
    pool: dict[tuple, list[RunRecord]] = defaultdict(list)
    by_tag: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in ok:
        if r.hashing == VANILLA:
            pool[r.pair_key].append(r)
            if r.tag:
                by_tag[_tag_key(r)].append(r)
    for r in ok:
        if r.hashing == VANILLA and r.tag:
            sig = r.pair_signature_no_widths
            cands = [v for v in by_tag[_tag_key(r)]
                     if sig is None or v.pair_signature_no_widths is None or v.pair_signature_no_widths == sig]
            v = max(cands, key=lambda v: (num(v.get("flops")), v is r, v.sweep_dir == r.sweep_dir,
                                          -abs(v.mtime - r.mtime)))
        else:
            sig = r.pair_signature
            cands = [v for v in pool.get(r.pair_key, [])
                     if sig is None or v.pair_signature is None or v.pair_signature == sig]
            if not cands:
                continue
            v = min(cands, key=lambda v: (v is not r, v.sweep_dir is None or v.sweep_dir != r.sweep_dir,
                                          os.path.dirname(v.run_dir) != os.path.dirname(r.run_dir),
                                          abs(v.mtime - r.mtime)))
        r.vanilla_dir = v.run_dir
        r.flops_reduction = ratio(v.get("flops"), r.get("flops"))
        r.params_reduction = ratio(v.get("params"), r.get("params"))
        r.wall_speedup = ratio(v.get("wall_time_s"), r.get("wall_time_s"))
        r.train_speedup = ratio(v.get("train_time_s"), r.get("train_time_s"))
        r.latency_speedup = ratio(v.latency_ms, r.latency_ms)
        try:
            r.acc_delta = float(r["test_acc"]) - float(v["test_acc"])
        except (KeyError, TypeError, ValueError):
            r.acc_delta = None
