"""``python -m hashexp.results`` (and ``make results-table``): scan, tabulate, plot, print."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hashexp.results.report import markdown_table, problems, problems_section, write_results
from hashexp.results.collect import collect_runs

NO_RUNS_HINT = "run `make run` (or python -m hashexp) first"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hashexp.results``; the exit code."""
    p = argparse.ArgumentParser(prog="python -m hashexp.results",
                                description="Tables and plots from hashexp run dirs: each run next to its vanilla twin.")
    p.add_argument("paths", nargs="*", help="dirs to scan recursively (default: $HASHEXP_OUTPUTS or outputs)")
    p.add_argument("--sweep", help="only this multirun dir ('latest': the newest under the paths)")
    p.add_argument("--since", help="only runs started on or after YYYY-MM-DD")
    p.add_argument("--until", help="only runs started on or before YYYY-MM-DD")
    p.add_argument("--out", help="where results.md/.csv, runs.csv and plots go (default: <first path>/results)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--latency", type=int, nargs="?", const=256, metavar="BATCH",
                   help="measure each run's forward latency from its model.pt at this batch size (default 256), "
                        "all models side by side, and add latency columns")
    a = p.parse_args(argv)
    default_root = os.environ.get("HASHEXP_OUTPUTS", "outputs")
    paths = a.paths or [default_root]
    if not a.paths and a.sweep and a.sweep != "latest" and not os.path.isdir(default_root):
        paths = []  # a sweep dir alone: its vanilla runs are the only twins
    elif not a.paths and not a.sweep and not os.path.isdir(default_root):
        print(f"hashexp.results: no runs yet ({default_root}/ does not exist); {NO_RUNS_HINT}", file=sys.stderr)
        return 0  # nothing to tabulate yet is not a failure: `make results-table` must not fail
    for path in paths:
        if not os.path.isdir(path):
            print(f"hashexp.results: error: {path} is not a directory; pass the outputs dir "
                  f"(e.g. python -m hashexp.results outputs)", file=sys.stderr)
            return 2
    try:
        if a.latency is not None and a.latency < 1:
            raise ValueError(f"--latency must be a batch size >= 1, got {a.latency}")
        runs = collect_runs(paths, sweep=a.sweep, since=a.since, until=a.until, latency_batch=a.latency)
    except (FileNotFoundError, ValueError) as e:
        print(f"hashexp.results: error: {e}", file=sys.stderr)
        return 2
    if not runs:
        where = a.sweep or ", ".join(paths)
        print(f"hashexp.results: no run directories (with .hydra/, metrics.json or status.json) under {where}"
              + (" in that date range" if a.since or a.until else f"; {NO_RUNS_HINT}"), file=sys.stderr)
        return 0  # nothing to tabulate yet is not a failure: `make results-table` must not fail
    out = a.out or os.path.join(paths[0] if paths else a.sweep, "results")
    res = write_results(runs, out, plots=not a.no_plots)
    print(markdown_table(res["rows"]))
    if problems(runs):
        print("Failed / unfinished:\n" + problems_section(runs))
    print(f"wrote results.md, results.csv, runs.csv and {len(res['plots'])} plots to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
