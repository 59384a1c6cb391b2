"""One-shot compression without fine-tuning: hashed merging vs Neuron Merging, magnitude and random.

    .venv/bin/python benchmarks/bench_oneshot.py                 # 3 seeds, writes bench_oneshot.md
    .venv/bin/python benchmarks/bench_oneshot.py --seeds 0 --smoke   # quick check of the script

Per seed, a 784-300-100-10 MLP is trained by hashexp on Fashion-MNIST (`python -m hashexp
model.widths=[300,100] trainer.epochs=15 seed=S`), then compressed in one shot, with no
fine-tuning, to keep 50/40/30/20/10% of each hidden layer's neurons (i.e. remove 50-90%):

- hashed (`hashexp.compress --method simhash`, least-squares compensation on 1024 calibration
  samples): candidates activations (keep and mean representatives), weights, and exact (all
  pairs: the ablation that shows what hashing changed);
- hashed data-free (`--compensation weights`, the first version's cosine rule);
- neuron_merging (Kim et al. 2020, data-free) at its default t = 0.45, and the best of
  t in {0.1, 0.3, 0.45, 0.6, 0.8} chosen per seed and ratio on the test set (an upper bound);
- magnitude (L1), magnitude + lsq, random, random + lsq.

Accuracy is on the full test split; the drop is against the trained model of the same seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from harness import ROOT, fmt, run, write_markdown  # noqa: E402  (benchmarks/ is the script's dir)

REMOVE = (0.5, 0.6, 0.7, 0.8, 0.9)
NM_T = (0.1, 0.3, 0.45, 0.6, 0.8)


def methods() -> dict[str, dict]:
    out = {}
    for cand, rep in (("activations", "keep"), ("activations", "mean"), ("weights", "keep"), ("exact", "keep")):
        out[f"hashed lsq {cand}/{rep}"] = dict(method="simhash", candidates=cand, representative=rep)
    out["hashed data-free (weights rule)"] = dict(method="simhash", compensation="weights")
    out["neuron_merging t=0.45"] = dict(method="neuron_merging")
    out["magnitude"] = dict(method="magnitude")
    out["magnitude + lsq"] = dict(method="magnitude", compensation="lsq")
    out["random"] = dict(method="random")
    out["random + lsq"] = dict(method="random", compensation="lsq")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_oneshot"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--smoke", action="store_true", help="subset data, for checking the script")
    a = ap.parse_args()

    import torch

    from hashexp.compress import compress_model, load_run
    from hashexp.data import build_dataset

    torch.set_num_threads(2)
    out = Path(a.out_dir)
    base = ["model.widths=[300,100]", f"trainer.epochs={a.epochs}"]
    if a.smoke:
        base += ["dataset.subset_train=4096", "dataset.subset_test=1024"]
    res: dict[str, dict[float, dict[int, float]]] = {}
    trained: dict[int, float] = {}
    majority = 0.0
    timing: dict[str, list[float]] = {}
    cache = out / "results.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    for seed in a.seeds:
        rd = out / f"seed{seed}"
        m = run(base + ["hashing=none", f"seed={seed}"], rd)
        trained[seed] = m["test_acc"]
        model0, cfg = load_run(str(rd))
        data = build_dataset(cfg.dataset, seed=seed)
        majority = data.majority_acc("test")
        variants = {**methods(), **{f"neuron_merging t={t}": dict(method="neuron_merging", threshold=t) for t in NM_T}}
        for name, kw in variants.items():
            for rm in REMOVE:
                key = f"{seed}|{name}|{rm}"
                if key not in done:
                    kw2 = dict(kw)
                    method = kw2.pop("method")
                    t0 = time.perf_counter()
                    _, rep = compress_model(copy.deepcopy(model0), data, method=method, keep=round(1 - rm, 2),
                                            seed=seed, **kw2)
                    done[key] = {"acc": rep["after"]["test_acc"], "time_s": time.perf_counter() - t0,
                                 "widths": rep["after"]["widths"]}
                    print(f"seed {seed} {name:34s} remove {rm:.0%}: {100 * done[key]['acc']:.2f}% "
                          f"widths {done[key]['widths']} ({done[key]['time_s']:.2f}s)", flush=True)
                    cache.write_text(json.dumps(done, indent=1))
                res.setdefault(name, {}).setdefault(rm, {})[seed] = done[key]["acc"]
                timing.setdefault(name, []).append(done[key]["time_s"])
        # Neuron Merging's best threshold per ratio (chosen on the test split: an upper bound for it)
        for rm in REMOVE:
            best = max(res[f"neuron_merging t={t}"][rm][seed] for t in NM_T)
            res.setdefault("neuron_merging, best t per ratio", {}).setdefault(rm, {})[seed] = best

    seeds = a.seeds
    lines = [
        f"Each seed's network is trained by `python -m hashexp model.widths=[300,100] trainer.epochs={a.epochs} "
        f"seed=S` (Adam 1e-3, batch 256); trained test accuracy {fmt([trained[s] for s in seeds], pct=True)}% "
        f"(seeds {seeds}; majority class {100 * majority:.1f}%). Each method removes the given share of *each* "
        "hidden layer's neurons (`python -m hashexp.compress RUN --keep K --method ...`), then the full test split "
        "is evaluated with no fine-tuning. Least-squares compensation (lsq) uses 1024 calibration samples drawn "
        "from the training split with the seed, ridge 1e-3.",
        "",
        "## Test accuracy drop (pp, mean ± sd over seeds; lower is better)",
        "",
        "| method | " + " | ".join(f"-{int(100 * r)}%" for r in REMOVE) + " |",
        "|---|" + "---:|" * len(REMOVE),
    ]
    order = [*methods(), "neuron_merging, best t per ratio"]
    best = {rm: min(order, key=lambda n: statistics.mean(trained[s] - res[n][rm][s] for s in seeds)) for rm in REMOVE}
    for name in order:
        cells = []
        for rm in REMOVE:
            drops = [trained[s] - res[name][rm][s] for s in seeds]
            c = fmt(drops, pct=True)
            cells.append(f"**{c}**" if best[rm] == name else c)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Test accuracy (%, per seed)", "",
              "| method | remove | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
              "|---|---:|" + "---:|" * (len(seeds) + 1)]
    for name in order:
        for rm in REMOVE:
            accs = [res[name][rm][s] for s in seeds]
            lines.append(f"| {name} | {int(100 * rm)}% | " + " | ".join(f"{100 * x:.2f}" for x in accs)
                         + f" | {fmt(accs, pct=True)} |")
    lines += ["", "Neuron Merging per threshold (mean accuracy %):", "",
              "| t | " + " | ".join(f"-{int(100 * r)}%" for r in REMOVE) + " |", "|---|" + "---:|" * len(REMOVE)]
    for t in NM_T:
        lines.append(f"| {t} | " + " | ".join(f"{100 * statistics.mean(res[f'neuron_merging t={t}'][rm][s] for s in seeds):.2f}"
                                            for rm in REMOVE) + " |")
    lines += ["", "Mean time per one-shot compression (both sites, incl. calibration forward; s): "
              + ", ".join(f"{n} {statistics.mean(timing[n]):.2f}" for n in methods()), ""]
    print(write_markdown(a.md, "One-shot compression without fine-tuning (MLP 784-300-100-10, Fashion-MNIST)", lines))


if __name__ == "__main__":
    main()
