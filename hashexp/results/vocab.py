"""The words every part of hashexp.results shares: the vanilla label, which config keys say
nothing about what was trained, number helpers and the colour of each method.

This module is the bottom of the package: it imports nothing from it.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

VANILLA = "none"  # the hashing choice of an uncompressed run

# Directories that never hold run dirs (and can be large).
SKIP_DIRS = {".hydra", ".submitit", "wandb", "__pycache__", ".git"}
# Config keys that say nothing about what was trained: ignored in variants and in pairing.
NOISE_KEYS = ("seed", "tag", "logger.", "experiment.", "trainer.logging.", "trainer.checkpoint.",
              "trainer.progress", "trainer.checkpoint",
              "trainer.resume", "trainer.log_every", "trainer.eval_batch_size", "dataset.root",
              "dataset.download", "hashing.n_threads")
# Trainer keys that only act on compressed runs: a vanilla twin may differ in them.
PAIR_IGNORE = ("trainer.bn_recalib_batches", "hashing.bn_recalib_batches")
# Model keys that set the initial widths (the small-network-from-scratch baseline varies them).
WIDTH_KEYS = ("model.widths", "model.width_mult")

# One colour per method in every plot of a report; methods not named here take the next spare one.
METHOD_COLORS = {VANILLA: "black", "simhash": "tab:blue", "mips": "tab:purple", "magnitude": "tab:green",
                 "random": "tab:red", "learnable": "tab:orange", "scratch": "tab:brown"}
SPARE_COLORS = ["tab:cyan", "tab:olive", "tab:pink", "tab:gray", "gold", "navy"]


def is_noise(key: str) -> bool:
    """Whether a config key only watches or places a run (not a variant of it)."""
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in NOISE_KEYS)


def num(x: Any) -> float:
    """x as a float for sorting; -inf where it is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("-inf")


def stats(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std of the finite numbers among ``values`` (std None for fewer than two)."""
    xs = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            xs.append(f)
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt_value(v: Any) -> str:
    """A config value as it appears in a variant name (``hashing.threshold=0.8``)."""
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    if v is None:
        return "null"
    return str(v)


def contender_colors(contenders: list[str]) -> dict[str, str]:
    """A colour for each contender name (a method, or a tag such as ``scratch``): the fixed one
    where :data:`METHOD_COLORS` names its base method, else a spare colour in name order, so one
    report colours a method alike in all its plots."""
    out: dict[str, str] = {}
    spare = 0
    for c in sorted(set(contenders)):
        base = c.split("/")[0]
        if base in METHOD_COLORS:
            out[c] = METHOD_COLORS[base]
        else:
            out[c] = SPARE_COLORS[spare % len(SPARE_COLORS)]
            spare += 1
    return out
