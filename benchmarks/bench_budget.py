"""Global vs per-site budget on the headline command (Fashion-MNIST, MLP 256-256, 10 epochs).

    nice -n 10 .venv/bin/python benchmarks/bench_budget.py --out-dir /tmp/bench_budget   # writes bench_budget.md

Per seed, the rows in turn, each run `python -m hashexp hashing=simhash seed=S hashing.budget=B
hashing.max_error=null hashing.target_ratio=R`: per site, R of every width per rehash; global, R
of the sites' layers' multiply-adds per rehash, spent where the error per saved FLOP is
smallest (two global ratios bracket the per-site run's final FLOPs: equal ratios do not give
equal FLOPs). One torch thread per run (the machine is shared). Existing run dirs are reused,
so a rerun only fills what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import ROOT, fmt, run  # noqa: E402

#: row -> (run-dir prefix, budget, overrides); the global ratios bracket the per-site run's FLOPs
ROWS = {
    "site, keep 85% of every width per rehash": ("ratio_site", "site", ["hashing.max_error=null", "hashing.target_ratio=0.85"]),
    "global, keep 83% of the FLOPs per rehash": ("ratio83_global", "global", ["hashing.max_error=null", "hashing.target_ratio=0.83"]),
    "global, keep 81% of the FLOPs per rehash": ("ratio81_global", "global", ["hashing.max_error=null", "hashing.target_ratio=0.81"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "bench_budget")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_budget.md")
    p.add_argument("--no-run", action="store_true", help="only tabulate the runs that exist")
    a = p.parse_args()
    res: dict[str, list[dict]] = {}
    for s in a.seeds:  # interleaved: every row once per seed
        for row, (prefix, budget, over) in ROWS.items():
            d = a.out_dir / f"{prefix}_s{s}"
            if a.no_run and not (d / "metrics.json").exists():
                continue
            m = run(["hashing=simhash", f"seed={s}", f"hashing.budget={budget}", "trainer.num_threads=1", *over], d)
            res.setdefault(row, []).append(m)
    lines = ["# Global vs per-site budget (headline command: Fashion-MNIST, MLP 256-256, 10 epochs)", "",
             "Command: `nice -n 10 .venv/bin/python benchmarks/bench_budget.py`", "",
             "Each row: `python -m hashexp hashing=simhash seed=S hashing.budget=B hashing.max_error=null "
             "hashing.target_ratio=R trainer.num_threads=1` (rehash every epoch). Per site, R is kept of every width; "
             "globally, R of the sites' layers' multiply-adds, spent where the error per saved FLOP is smallest. "
             "Mean ± sd over the seeds listed.", "",
             "| budget | seeds | test acc % | FLOPs/sample | final widths | hash share of wall % |",
             "|---|---|---:|---:|---|---:|"]
    for row, ms in res.items():
        seeds = [m["seed"] for m in ms]
        widths = "; ".join("-".join(str(v) for v in m["widths"].values()) for m in ms)
        lines.append(f"| {row} | {seeds} | {fmt([m['test_acc'] for m in ms], pct=True)} | "
                     f"{fmt([m['flops'] for m in ms], digits=0)} | {widths} | "
                     f"{fmt([100 * m['hash_time_s'] / m['wall_time_s'] for m in ms])} |")
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
