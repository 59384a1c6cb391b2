"""Global vs per-site budget on the headline command (Fashion-MNIST, MLP 256-256, 10 epochs).

    nice -n 10 .venv/bin/python benchmarks/bench_budget.py --out-dir /tmp/bench_budget   # writes bench_budget.md

Per seed, interleaved (site, global, site, global, ...), each run `python -m hashexp hashing=simhash
seed=S hashing.budget=B` plus, for the equal-ratio rows, `hashing.max_error=null
hashing.target_ratio=0.85` (per site: keep 85% of every width per rehash; global: keep 85% of the
sites' summed neuron FLOPs per rehash, spent where the error per saved FLOP is smallest), and
for the equal-error rows the default per-site error budget (max_error 0.02; global: 2 x 0.02^2
summed over both sites). One torch thread per run (the machine is shared). Existing run dirs are
reused, so a rerun only fills what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import ROOT, fmt, run  # noqa: E402

MODES = {"ratio": ["hashing.max_error=null", "hashing.target_ratio=0.85"], "err": []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "bench_budget")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_budget.md")
    p.add_argument("--no-run", action="store_true", help="only tabulate the runs that exist")
    a = p.parse_args()
    res: dict[tuple[str, str], list[dict]] = {}
    for mode in a.modes:
        for s in a.seeds:
            for b in ("site", "global"):
                d = a.out_dir / f"{mode}_{b}_s{s}"
                if a.no_run and not (d / "metrics.json").exists():
                    continue
                m = run(["hashing=simhash", f"seed={s}", f"hashing.budget={b}", "trainer.num_threads=1",
                         *MODES[mode]], d)
                res.setdefault((mode, b), []).append(m)
    lines = ["# Global vs per-site budget (headline command: Fashion-MNIST, MLP 256-256, 10 epochs)", "",
             "Command: `nice -n 10 .venv/bin/python benchmarks/bench_budget.py`", "",
             "ratio: `hashing.max_error=null hashing.target_ratio=0.85` (site: 85% of every width per rehash; "
             "global: 85% of the summed neuron FLOPs per rehash). err: the default error budget "
             "(site: 0.02 per site; global: 2 x 0.02^2 summed). Mean ± sd over the seeds listed.", "",
             "| setting | budget | seeds | test acc % | FLOPs/sample | final widths | hash share of wall % |",
             "|---|---|---|---:|---:|---|---:|"]
    for (mode, b), ms in sorted(res.items()):
        seeds = [m["seed"] for m in ms]
        widths = "; ".join("-".join(str(v) for v in m["widths"].values()) for m in ms)
        lines.append(f"| {mode} | {b} | {seeds} | {fmt([m['test_acc'] for m in ms], pct=True)} | "
                     f"{fmt([m['flops'] for m in ms], digits=0)} | {widths} | "
                     f"{fmt([100 * m['hash_time_s'] / m['wall_time_s'] for m in ms])} |")
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
