"""Width plans: a finished run's widths rehash by rehash, for a baseline to follow exactly."""

from __future__ import annotations

import json
import os

from hashexp.errors import DataError


def load_width_plan(path: str) -> list[dict[str, int]]:
    """Widths after each rehash of a finished run, from its metrics.json (or its run dir); for a run
    with the centripetal pull, the widths each rehash proposed (so a baseline reaches them at the
    same decisions, without the pull's delay)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise DataError(f"hashing.width_plan={path}: file not found; pass a hashed run's metrics.json or run dir")
    try:
        with open(path) as f:
            m = json.load(f)
        events = m["rehash_events"]
        if any("proposed" in e for e in events):
            # a pulled run: its k-th decision proposed these widths (merged `pull.steps` later)
            return [{k: int(v) for k, v in e["proposed_width"].items()} for e in events if "proposed" in e]
        return [{k: int(v) for k, v in e["after"].items()} for e in events]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"hashing.width_plan={path}: not a hashexp metrics.json with rehash_events ({e})") from None
