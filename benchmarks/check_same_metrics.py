"""Two runs computed the same thing: metrics.json and history.csv equal but for timings.

    python benchmarks/check_same_metrics.py RUN_A RUN_B [RUN_A2 RUN_B2 ...] [--ignore KEY ...]

Compares every pair of run dirs: metrics.json (recursively, rehash_events included) and
history.csv (header and every cell), ignoring keys and columns that measure time or memory
(ending in ``time_s``, ``metric_s`` or ``_mb``) and the metrics keys named by ``--ignore``
(top level, e.g. ``resumed``). Prints one line per pair; exits 1 when any pair differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

TIMING_SUFFIXES = ("time_s", "metric_s", "_mb")


def _timing(key: str) -> bool:
    return key.endswith(TIMING_SUFFIXES)


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if _timing(k):
                continue
            if k not in a or k not in b:
                out.append(f"{path}{k}: only in {'B' if k not in a else 'A'}")
            else:
                _diff(a[k], b[k], f"{path}{k}.", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path[:-1]}: {len(a)} vs {len(b)} entries")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}{i}.", out)
    elif a != b:
        out.append(f"{path[:-1]}: {a!r} != {b!r}")


def compare(run_a: Path, run_b: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """The differences between two run dirs (empty: the same run)."""
    out: list[str] = []
    ma = json.loads((run_a / "metrics.json").read_text())
    mb = json.loads((run_b / "metrics.json").read_text())
    for k in ignore:
        ma.pop(k, None)
        mb.pop(k, None)
    _diff(ma, mb, "metrics.", out)
    with open(run_a / "history.csv", newline="") as f:
        ha = list(csv.reader(f))
    with open(run_b / "history.csv", newline="") as f:
        hb = list(csv.reader(f))
    if not ha or not hb or ha[0] != hb[0]:
        out.append("history.csv: headers differ")
        return out
    keep = [i for i, c in enumerate(ha[0]) if not _timing(c)]
    if len(ha) != len(hb):
        out.append(f"history.csv: {len(ha) - 1} vs {len(hb) - 1} rows")
    for n, (ra, rb) in enumerate(zip(ha[1:], hb[1:]), start=1):
        bad = [ha[0][i] for i in keep if ra[i] != rb[i]]
        if bad:
            out.append(f"history.csv row {n}: {', '.join(bad[:5])}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="pairs of run dirs: A B [A2 B2 ...]")
    ap.add_argument("--ignore", nargs="*", default=[], help="top-level metrics.json keys to leave out")
    args = ap.parse_args(argv)
    if len(args.runs) % 2:
        ap.error("give run dirs in pairs")
    bad = 0
    for a, b in zip(args.runs[::2], args.runs[1::2]):
        diffs = compare(a, b, tuple(args.ignore))
        rows = sum(1 for _ in open(a / "history.csv")) - 1
        print(f"{'SAME' if not diffs else 'DIFFERENT'}  {a}  {b}  ({rows} history rows)")
        for d in diffs[:20]:
            print("   ", d)
        bad += bool(diffs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
