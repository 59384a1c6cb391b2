"""The headline command against vanilla, as a user runs it, on three settings and three seeds.

    .venv/bin/python benchmarks/bench_headline.py                  # writes bench_headline.md
    .venv/bin/python benchmarks/bench_headline.py --settings fmnist --seeds 0   # one setting, one seed

Settings (each row: `python -m hashexp <setting> hashing=simhash seed=S` vs `... hashing=none`,
and a small network trained from scratch at the hashed run's final widths, `model.widths=[...]`):

- ``fmnist``: `model=mlp` on Fashion-MNIST 60k/10k, the defaults (MLP 256-256, Adam, 10 epochs,
  a rehash after every epoch);
- ``fmnist2000``: the same with `dataset.subset_train=2000` (a small dataset: 79 steps of
  training between the first and last rehash);
- ``resnet20``: `model=resnet20` on a Fashion-MNIST subset (3000 train, 1000 test), 3 epochs,
  the default trainer.

Goals (issue "function-preserving merging"): fmnist within 0.5 pp of vanilla at >= 2x fewer
FLOPs; fmnist2000 within 1 pp with no site at min_width; resnet20 within 1 pp at fewer FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from harness import ROOT, fmt, read_history, run, write_markdown  # noqa: E402  (benchmarks/ is the script's dir)

SETTINGS = {
    "fmnist": ["model=mlp"],
    "fmnist2000": ["model=mlp", "dataset.subset_train=2000"],
    "resnet20": ["model=resnet20", "dataset.subset_train=3000", "dataset.subset_test=1000", "trainer.epochs=3"],
}
TITLES = {
    "fmnist": "Fashion-MNIST, MLP 256-256, 10 epochs",
    "fmnist2000": "Fashion-MNIST, 2000 training samples, MLP 256-256, 10 epochs",
    "resnet20": "Fashion-MNIST 3000/1000, ResNet-20, 3 epochs (Adam)",
}


def final_norms(run_dir: Path) -> tuple[float, float]:
    """Sum over layers of the weight norm and of the gradient norm in the last step row of history.csv."""
    last = [r for r in read_history(run_dir) if r["kind"] == "step"][-1]
    w = sum(v for k, v in last.items() if k.startswith("wnorm/"))
    g = sum(v for k, v in last.items() if k.startswith("gnorm/"))
    return w, g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--resnet-seeds", type=int, nargs="+", default=None,
                    help="seeds of the resnet20 setting (default: --seeds); it is the slow one on a CPU")
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_headline"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--hashed", nargs="*", default=[], help="extra overrides for the hashed runs")
    a = ap.parse_args()
    out = Path(a.out_dir)
    lines = ["Each hashed row is `python -m hashexp <setting> hashing=simhash seed=S` with no other override (the "
             "default compressor: LSH on calibration activations proposes, the measured error orders the removals, "
             "the model's per-site error budget stops them (MLP 2%, ResNet-20 10% of the consumers' pre-activation "
             "per rehash), least squares refits the consumers); vanilla is "
             "`hashing=none`; small is the same network trained from scratch at the hashed run's final widths. "
             f"Seeds {a.seeds} (resnet20: {a.resnet_seeds or a.seeds}). No wall-time ratio: the runs go one after "
             "the other, not side by side (benchmarks/harness.py times side by side). The regularization columns: train minus test accuracy, and the "
             "sums over layers of the weight and gradient norms in the last logged step (history.csv).", ""]
    for name in a.settings:
        over = SETTINGS[name]
        res: dict[str, dict[int, dict]] = {"vanilla": {}, "hashed": {}, "small": {}}
        seeds = a.resnet_seeds if name == "resnet20" and a.resnet_seeds else a.seeds
        for seed in seeds:
            sd = out / name / f"seed{seed}"
            res["vanilla"][seed] = run(over + ["hashing=none", f"seed={seed}"], sd / "vanilla")
            res["hashed"][seed] = h = run(over + ["hashing=simhash", *a.hashed, f"seed={seed}"], sd / "hashed")
            if name.startswith("fmnist"):
                widths = ",".join(str(h["widths"][k]) for k in sorted(h["widths"]))
                res["small"][seed] = run(over + ["hashing=none", f"model.widths=[{widths}]", f"seed={seed}"],
                                         sd / "small")
        van, hsh = res["vanilla"], res["hashed"]
        mins = {k: 8 for k in hsh[seeds[0]]["widths"]}
        lines += [f"## {TITLES[name]}", "",
                  "| run | test acc % | Δ vs vanilla pp | FLOPs/sample | FLOPs ↓ | final widths (per seed) | "
                  "train − test pp | Σ‖W‖ | Σ‖∇W‖ |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for kind in ("vanilla", "hashed", "small"):
            if not res[kind]:
                continue
            r = res[kind]
            acc = [r[s]["test_acc"] for s in seeds]
            d = [r[s]["test_acc"] - van[s]["test_acc"] for s in seeds]
            fl = [r[s]["flops"] for s in seeds]
            red = [van[s]["flops"] / r[s]["flops"] for s in seeds]
            widths = "; ".join("-".join(str(v) for v in r[s]["widths"].values()) for s in seeds) \
                if len(r[seeds[0]]["widths"]) <= 3 else f"{sum(r[seeds[0]]['widths'].values())} channels (seed {seeds[0]})"
            gap = [100 * (r[s]["train_acc"] - r[s]["test_acc"]) for s in seeds]
            norms = [final_norms(out / name / f"seed{s}" / kind) for s in seeds]
            lines.append(f"| {kind} | {fmt(acc, pct=True)} | {fmt([100 * x for x in d])} | "
                         f"{statistics.mean(fl) / 1e6:.3f} M | {fmt(red)}x | {widths} | {fmt(gap)} | "
                         f"{fmt([n[0] for n in norms], digits=1)} | {fmt([n[1] for n in norms])} |")
        at_min = [s for s in seeds for k, v in hsh[s]["widths"].items() if v <= mins[k]]
        errs = [max(e["error"].values()) for s in seeds for e in hsh[s]["rehash_events"] if e.get("error")]
        hash_share = [hsh[s]["hash_time_s"] / hsh[s]["wall_time_s"] for s in seeds]
        per_seed = ", ".join(f"{100 * (hsh[s]['test_acc'] - van[s]['test_acc']):+.2f}" for s in seeds)
        lines += ["", f"Per seed Δ pp: {per_seed}; "
                  f"sites at min_width (8): {len(at_min)}; largest measured per-rehash site error "
                  f"{max(errs) if errs else 0:.4f} (estimated within budget; measured after the refit); hash + calibration + surgery {100 * statistics.mean(hash_share):.1f}% "
                  f"of the hashed run's wall time; majority class {100 * van[seeds[0]]['majority_acc']:.1f}%.", ""]
    print(write_markdown(a.md, "The headline command vs vanilla", lines))


if __name__ == "__main__":
    main()
