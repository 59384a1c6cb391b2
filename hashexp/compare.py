"""The main job (``make run``): vanilla vs hashed MLP on Fashion-MNIST, then the table.

    python -m hashexp.compare [extra overrides...]

Runs ``python -m hashexp -m experiment=quick_compare hashing=none,simhash`` into
outputs/multirun/compare_<time>/, then the honest third contender: the same network trained from
scratch at the hashed run's final widths (``hashing=none model.widths=[...]``). Prints FLOPs,
parameters, accuracy (next to the majority-class accuracy) and wall-clock speedup of each
against vanilla.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Entry point: the comparison table of a sweep dir (see the module docstring); the exit code."""
    extra = list(sys.argv[1:] if argv is None else argv)
    outputs = os.environ.get("HASHEXP_OUTPUTS", "outputs")
    sweep_dir = os.path.join(outputs, "multirun", time.strftime("compare_%Y-%m-%d_%H-%M-%S"))
    cmd = [sys.executable, "-m", "hashexp", "-m", "experiment=quick_compare", "hashing=none,simhash",
           f"hydra.sweep.dir={sweep_dir}", *extra]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"hashexp.compare: the multirun exited with status {rc}; partial results below", file=sys.stderr)
    from hashexp.results import collect_runs, markdown_table, summarize

    hashed = [r for r in collect_runs([sweep_dir]) if r.get("hashing") == "simhash" and r.get("status") == "ok"]
    if hashed:
        widths = ",".join(str(w) for w in hashed[0]["widths"].values())
        small = [sys.executable, "-m", "hashexp", "experiment=quick_compare", "hashing=none", *extra,
                 f"model.widths=[{widths}]", f"hydra.run.dir={os.path.join(sweep_dir, 'small_from_scratch')}"]
        print("+", " ".join(small), flush=True)
        rc = subprocess.call(small) or rc
    runs = collect_runs([sweep_dir])
    print()
    print(markdown_table(summarize(runs)))
    print(f"\nrun dirs under {sweep_dir}; `make results-table` tabulates everything under {outputs}/")
    return rc


if __name__ == "__main__":
    sys.exit(main())
