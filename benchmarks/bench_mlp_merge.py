"""Hashed merging vs the alternatives on Fashion-MNIST (MLP 784-2048-2048-10, 10 epochs, batch 256).

    .venv/bin/python benchmarks/bench_mlp_merge.py                 # 3 seeds, writes bench_mlp_merge.md
    .venv/bin/python benchmarks/bench_mlp_merge.py --seeds 0 --epochs 1 --smoke   # quick check

Per seed, in one sweep directory and one after the other (so they share the machine's state):
vanilla (hashing=none), hashed (hashing=simhash), magnitude and random pruning/merging that follow
the hashed run's widths rehash by rehash (hashing.width_plan=<hashed run>), and a small network
trained from scratch at the hashed run's final widths. Each is `python -m hashexp
experiment=fmnist_mlp2048 ...`; the exact overrides are printed in the table's notes.
No wall-time ratio: the runs go one after the other, not side by side.

Then one-shot: a 784-300-100-10 MLP trained once (10 epochs) is compressed without fine-tuning
to keep 50/40/30/20% of its hidden neurons, by hashed merging and by magnitude pruning.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from harness import ROOT, fmt, run, write_markdown  # noqa: E402  (benchmarks/ is the script's dir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_mlp_merge"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--hashed", nargs="*", default=[], help="extra overrides for the hashed run")
    ap.add_argument("--smoke", action="store_true", help="tiny subset, for checking the script")
    ap.add_argument("--skip-oneshot", action="store_true")
    a = ap.parse_args()
    out = Path(a.out_dir)
    base = ["experiment=fmnist_mlp2048", f"trainer.epochs={a.epochs}"]
    if a.smoke:
        base += ["dataset.subset_train=4096", "dataset.subset_test=1024"]
    hashed_over = ["hashing=simhash", *a.hashed]
    res: dict[str, dict[int, dict]] = {k: {} for k in ("vanilla", "hashed", "magnitude", "random", "small")}
    for seed in a.seeds:
        sd = out / f"seed{seed}"
        res["vanilla"][seed] = run(base + ["hashing=none", f"seed={seed}"], sd / "vanilla")
        res["hashed"][seed] = h = run(base + hashed_over + [f"seed={seed}"], sd / "hashed")
        plan = sd / "hashed" / "metrics.json"
        for name in ("magnitude", "random"):
            res[name][seed] = run(base + [f"hashing={name}", f"hashing.width_plan={plan}", "hashing.target_ratio=null",
                                          f"seed={seed}"], sd / name)
        widths = ",".join(str(h["widths"][k]) for k in sorted(h["widths"]))
        res["small"][seed] = run(base + ["experiment=small_from_scratch", f"model.widths=[{widths}]", f"seed={seed}"],
                                 sd / "small")
    van = res["vanilla"]
    lines = [
        f"Fashion-MNIST (60k/10k), MLP 784-2048-2048-10, {a.epochs} epochs, batch 256, Adam 1e-3, seeds {a.seeds}; "
        "all runs of a seed one after the other in one sweep. Reductions are per-seed ratios "
        "against the vanilla run of the same seed (wall = whole process: data, training, evaluation, hashing; "
        "no wall ratio: the runs are not timed side by side).",
        "",
        "| method | test acc % | majority % | final widths | params | FLOPs/sample | params ↓ | FLOPs ↓ | wall s | hash % of wall | peak RSS MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in res.items():
        seeds = sorted(runs)
        ms = [runs[s] for s in seeds]
        widths = sorted({"-".join(str(m["widths"][k]) for k in sorted(m["widths"])) for m in ms})
        lines.append(
            f"| {name} | {fmt([m['test_acc'] for m in ms], pct=True)} | {100 * ms[0]['majority_acc']:.1f} | {', '.join(widths)} "
            f"| {statistics.mean(m['params'] for m in ms):,.0f} | {statistics.mean(m['flops'] for m in ms):,.0f} "
            f"| {fmt([van[s]['params'] / runs[s]['params'] for s in seeds], digits=1)}x "
            f"| {fmt([van[s]['flops'] / runs[s]['flops'] for s in seeds], digits=1)}x "
            f"| {fmt([m['wall_time_s'] for m in ms], digits=1)} "
            f"| {fmt([100 * m['hash_time_s'] / m['wall_time_s'] for m in ms], digits=2)} "
            f"| {statistics.mean(m['peak_rss_mb'] for m in ms):,.0f} |")
    h0 = res["hashed"][a.seeds[0]]
    lines += ["", "Hashed run's rehashes (seed %d): " % a.seeds[0] + "; ".join(
        f"step {e['step']}: {e['before']} -> {e['after']}" for e in h0["rehash_events"]), ""]
    if not a.skip_oneshot:
        lines += oneshot(a, out)
    write_markdown(a.md, "Hashed merging vs vanilla, magnitude, random and small-from-scratch", lines)
    print("\n".join(lines))


def oneshot(a, out: Path) -> list[str]:
    import torch

    sys.path.insert(0, str(ROOT))
    from hashexp.compress import compress_model
    from hashexp.data import build_dataset
    from hashexp.models import load_model

    over = ["dataset=fashion_mnist", "model.widths=[300,100]", f"trainer.epochs={a.epochs}", "hashing=none",
            "seed=0"]
    if a.smoke:
        over += ["dataset.subset_train=4096", "dataset.subset_test=1024"]
    rd = out / "oneshot_base"
    m = run(over, rd)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(rd / ".hydra" / "config.yaml")
    data = build_dataset(cfg.dataset, seed=0)
    rows = ["## One-shot compression, no fine-tuning", "",
            f"784-300-100-10 MLP trained {a.epochs} epochs (test acc {100 * m['test_acc']:.2f}%, majority "
            f"{100 * m['majority_acc']:.1f}%), then every hidden layer compressed in one shot to keep a share of its "
            "neurons (activation statistics from 20 training batches). Hashed: SimHash candidates, most similar "
            "verified pairs merged first; magnitude: L1 structured pruning; random: random groups merged.", "",
            "| keep | widths | FLOPs ↓ | hashed acc % | magnitude acc % | random acc % |", "|---:|---|---:|---:|---:|---:|"]
    for keep in (0.5, 0.4, 0.3, 0.2):
        accs, info = {}, None
        for method in ("simhash", "magnitude", "random"):
            torch.manual_seed(0)
            model = load_model(rd / "model.pt")
            _, rep = compress_model(model, data, method=method, keep=keep, seed=0)
            accs[method] = rep["after"]["test_acc"]
            info = rep
        w = info["after"]["widths"]
        rows.append(f"| {keep:.0%} | {w['fc1']}-{w['fc2']} | {info['before']['flops'] / info['after']['flops']:.2f}x "
                    f"| {100 * accs['simhash']:.2f} | {100 * accs['magnitude']:.2f} | {100 * accs['random']:.2f} |")
    return rows + [""]


if __name__ == "__main__":
    main()
