"""The honest Pareto front: hashed merging against every simple alternative at three budgets.

    .venv/bin/python benchmarks/bench_pareto.py                         # writes bench_pareto.md + .png
    .venv/bin/python benchmarks/bench_pareto.py --seeds 0 --ratios 0.2  # one seed, one budget (a probe)

Setting: `experiment=pareto_mlp2048` -- Fashion-MNIST 60k/10k, MLP 784-2048-2048-10, Adam, 10
epochs, batch 256; every compressing method follows the same width ramp (`schedule=gradual`: cubic
from the full width at step 100 to `schedule.final_ratio` of it at step 600, a rehash every 100
steps), so every method has the same widths at every step. Budgets: final_ratio 0.4, 0.2 and 0.1
(about 4x, 12x and 30x fewer FLOPs). Methods:

- ``hashed+pull``: `hashing=simhash hashing.max_error=null hashing.pull.steps=100` (LSH on the
  calibration activations proposes, the error order picks, the proposal is pulled together for
  100 steps, then merged and least squares refits the consumers);
- ``hashed+pull25``: a shorter, stronger pull (`hashing.pull.steps=25 hashing.pull.strength=0.2`), tried
  after the first full run showed the 100-step pull losing; at the middle budget only;
- ``hashed``: the same without the pull (the ablation: merge at once);
- ``hashed, weights``: `hashing.compensation=weights hashing.threshold=-1`, the data-free rule
  (LSH on the weights proposes, cosine groups down to the ramp's width, consumers take the weight
  rule): the ablation of calibration and least squares, at the middle budget only;
- ``small``: the network trained from scratch at the hashed run's final widths (`hashing=none`);
- ``magnitude``, ``random``: `hashing=magnitude|random` on the same ramp (their rule: consumers take
  the weight rule);
- ``neuron_merging``: `hashing=neuron_merging` (Kim et al. 2020) on the same ramp;
- ``vanilla``: `hashing=none` at full width.

Runs go ``--jobs`` at a time, each on one thread; the wall-time ratio is vanilla's wall time over
the run's, same seed, measured in this one benchmark on a shared machine (noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import ROOT, fmt, mean_std, run  # noqa: E402  (benchmarks/ is the script's dir)
from bench_headline import final_norms  # noqa: E402

BASE = ["experiment=pareto_mlp2048", "trainer.num_threads=1"]
HASHED = ["hashing=simhash", "hashing.max_error=null"]
METHODS = {
    "hashed+pull": HASHED + ["hashing.pull.steps=100"],
    "hashed+pull25": HASHED + ["hashing.pull.steps=25", "hashing.pull.strength=0.2"],
    "hashed": HASHED,
    "hashed, weights": HASHED + ["hashing.compensation=weights", "hashing.threshold=-1"],
    "magnitude": ["hashing=magnitude", "hashing.target_ratio=null"],
    "random": ["hashing=random", "hashing.target_ratio=null"],
    "neuron_merging": ["hashing=neuron_merging", "hashing.target_ratio=null"],
}
# run at the middle budget only
ABLATIONS = ("hashed+pull25", "hashed, weights", "neuron_merging")
ORDER = ["vanilla", "hashed+pull", "hashed+pull25", "hashed", "hashed, weights", "small", "magnitude", "random", "neuron_merging"]


def _dir(method: str) -> str:
    return method.replace("+", "_").replace(", ", "_")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.2, 0.1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS) + ["small"], choices=list(METHODS) + ["small"])
    ap.add_argument("--ablation-ratio", type=float, default=0.2,
                    help="the budget of the 'hashed, weights' and neuron_merging rows (the middle one)")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished runs under --out-dir, train nothing")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_pareto"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    a = ap.parse_args()
    out = Path(a.out_dir)
    res: dict[tuple[float | None, str], dict[int, dict]] = {}

    def job(ratio, method, seed, over):
        d = out / ("vanilla" if ratio is None else f"r{ratio:g}") / _dir(method) / f"seed{seed}"
        if a.report_only:
            if (d / "metrics.json").exists():
                m = json.loads((d / "metrics.json").read_text())
                m["_dir"] = d
                res.setdefault((ratio, method), {})[seed] = m
            return
        m = run(BASE + over + [f"seed={seed}"] + ([] if ratio is None else [f"schedule.final_ratio={ratio}"]), d)
        m["_dir"] = d
        res.setdefault((ratio, method), {})[seed] = m

    first = [(None, "vanilla", s, ["hashing=none"]) for s in a.seeds]
    for ratio in a.ratios:
        for method in a.methods:
            if method == "small" or (method in ABLATIONS and ratio != a.ablation_ratio):
                continue
            first += [(ratio, method, s, METHODS[method]) for s in a.seeds]
    # vanilla and the hashed runs first (small needs their widths), then seed by seed
    first.sort(key=lambda j: (j[1] not in ("vanilla", "hashed+pull"), j[2]))
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda j: job(*j), first))
    if "small" in a.methods:
        small = []
        for ratio in a.ratios:
            src = res.get((ratio, "hashed+pull")) or res.get((ratio, "hashed"))
            for s in a.seeds:
                if s not in (src or {}):
                    continue
                w = src[s]["widths"]
                small.append((ratio, "small", s, ["hashing=none", f"model.widths=[{w['fc1']},{w['fc2']}]"]))
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda j: job(*j), small))

    van = res[(None, "vanilla")]
    seeds = [s for s in a.seeds if s in van]
    lines = ["# The Pareto front: accuracy vs FLOPs on Fashion-MNIST, MLP 784-2048-2048-10", "",
             "Command: `.venv/bin/python benchmarks/bench_pareto.py` "
             f"(seeds {seeds}, budgets final_ratio {a.ratios}, {a.jobs} runs at a time, one thread each). "
             "Every compressing run is `python -m hashexp experiment=pareto_mlp2048 <method> "
             "schedule.final_ratio=R seed=S`: the same cubic width ramp (steps 100-600, a rehash every 100 steps), "
             "so all methods have the same widths at every step; small is trained from scratch at the hashed "
             "run's final widths. Δ is paired by seed against vanilla (`hashing=none`). The wall ratio is "
             "vanilla's wall time over the run's (same seed, measured side by side in this benchmark, "
             "shared 2-core machine). train − test: accuracy gap in pp; Σ‖W‖, Σ‖∇W‖: sums over layers of "
             "the weight and gradient norms in the last logged step.", "",
             "| budget | method | test acc % | Δ vs vanilla pp | FLOPs ↓ | final widths | wall ratio | "
             "train − test pp | Σ‖W‖ | Σ‖∇W‖ |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    points: dict[str, list[tuple[float, float, float]]] = {}
    for ratio in [None] + list(a.ratios):
        for method in ORDER:
            r = res.get((ratio, method))
            if not r or (ratio is None) != (method == "vanilla"):
                continue
            ss = [s for s in a.seeds if s in r and s in van]  # --report-only: the finished seeds
            acc = [r[s]["test_acc"] for s in ss]
            d = [100 * (r[s]["test_acc"] - van[s]["test_acc"]) for s in ss]
            red = [van[s]["flops"] / r[s]["flops"] for s in ss]
            wall = [van[s]["wall_time_s"] / r[s]["wall_time_s"] for s in ss]
            gap = [100 * (r[s]["train_acc"] - r[s]["test_acc"]) for s in ss]
            norms = [final_norms(r[s]["_dir"]) for s in ss]
            widths = sorted({"-".join(str(v) for v in r[s]["widths"].values()) for s in ss})
            budget = "full" if ratio is None else f"{ratio:g}"
            if ss != a.seeds:
                method = f"{method} (seeds {ss})"
            lines.append(f"| {budget} | {method} | {fmt(acc, pct=True)} | {fmt(d)} | {fmt(red, digits=1)}x | "
                         f"{', '.join(widths)} | {fmt(wall)} | {fmt(gap)} | {fmt([n[0] for n in norms], digits=1)} | "
                         f"{fmt([n[1] for n in norms])} |")
            if ratio is not None:
                md, sd = mean_std(d)
                points.setdefault(method.split(" (seeds")[0], []).append((statistics.mean(red), md, sd))
    lines += ["", f"Vanilla: {fmt([v['test_acc'] for v in van.values()], pct=True)}% "
              f"(majority class {100 * van[seeds[0]]['majority_acc']:.1f}%)."]
    png = Path(a.md).with_suffix(".png")
    plot(points, png)
    lines += ["", f"![accuracy change vs FLOPs reduction]({png.name})", ""]
    Path(a.md).write_text("\n".join(lines))
    print("\n".join(lines))


def plot(points: dict[str, list[tuple[float, float, float]]], path: Path) -> None:
    """Accuracy change (pp) vs FLOPs reduction, log x, error bars over seeds, one entry per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    shown = [m for m in ORDER if points.get(m)]
    for i, method in enumerate(shown):
        pts = sorted(points[method])
        shift = 1.0 + 0.025 * (i - (len(shown) - 1) / 2)  # side by side at each budget (log x)
        ax.errorbar([p[0] * shift for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=method, linestyle="-" if len(pts) > 1 else "none")
    ax.axhline(0.0, color="k", lw=0.8, ls="--", label="vanilla")
    ax.set_xscale("log")
    ticks = sorted({round(p[0], 1) for pts in points.values() for p in pts})
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("FLOPs reduction vs vanilla (x, log scale)")
    ax.set_ylabel("test accuracy change vs vanilla (pp)")
    ax.set_title("Fashion-MNIST, MLP 784-2048-2048, 10 epochs (mean ± sd, 3 seeds)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
