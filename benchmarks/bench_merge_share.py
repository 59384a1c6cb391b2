"""Share of wall time spent hashing + calibrating + merging, exact vs LSH-restricted order.

    nice -n 10 .venv/bin/python benchmarks/bench_merge_share.py --out-dir /tmp/bench_merge_share   # writes bench_merge_share.md

Per seed, the variants of `python -m hashexp experiment=fmnist_mlp2048 hashing=simhash seed=S
trainer.num_threads=1 hashing.order=...` run *at the same time* (one process each, so they see
the same machine load: a side-by-side measurement), and the table gives each run's
metrics.json ``hash_time_s / wall_time_s`` (hash + calibration + refit + surgery of every
rehash), test accuracy and final widths. Existing run dirs are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from harness import PY, ROOT, fmt  # noqa: E402

VARIANTS = {"exact": ["hashing.order=exact"],
            "auto (restricted from 2048)": ["hashing.order=auto", "hashing.order_width=2048"],
            "auto (restricted from 1024)": ["hashing.order=auto", "hashing.order_width=1024"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "bench_merge_share")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_merge_share.md")
    a = p.parse_args()
    rows = []
    for s in a.seeds:
        procs, dirs = [], {}
        for v in a.variants:
            d = a.out_dir / f"s{s}_{v.split()[0]}_{VARIANTS[v][-1].split('=')[-1]}"
            dirs[v] = d
            if (d / "metrics.json").exists():
                continue
            cmd = [PY, "-m", "hashexp", "experiment=fmnist_mlp2048", "hashing=simhash", f"seed={s}",
                   "trainer.num_threads=1", "trainer.checkpoint.enabled=false", "trainer.logging.progress=log",
                   f"hydra.run.dir={d}", *VARIANTS[v]]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for pr in procs:
            if pr.wait() != 0:
                raise SystemExit(f"a run failed: {pr.args}")
        for v, d in dirs.items():
            m = json.loads((d / "metrics.json").read_text())
            rows.append((s, v, m))
    lines = ["# Share of wall time in hashing + calibration + merging (experiment=fmnist_mlp2048)", "",
             "Command: `nice -n 10 .venv/bin/python benchmarks/bench_merge_share.py`", "",
             "Variants of one seed run at the same time (same load), one torch thread each, on a shared 2-core "
             "machine. Share = metrics.json hash_time_s / wall_time_s.", "",
             "| seed | order | hash s | wall s | share % | test acc % | final widths | FLOPs |",
             "|---:|---|---:|---:|---:|---:|---|---:|"]
    for s, v, m in rows:
        lines.append(f"| {s} | {v} | {m['hash_time_s']:.1f} | {m['wall_time_s']:.1f} | "
                     f"{100 * m['hash_time_s'] / m['wall_time_s']:.2f} | {100 * m['test_acc']:.2f} | "
                     f"{'-'.join(str(x) for x in m['widths'].values())} | {m['flops']:,} |")
    if len(a.seeds) > 1:
        for v in a.variants:
            ms = [m for _, vv, m in rows if vv == v]
            lines.append(f"| mean | {v} | | | {fmt([100 * m['hash_time_s'] / m['wall_time_s'] for m in ms])} | "
                         f"{fmt([m['test_acc'] for m in ms], pct=True)} | | |")
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
