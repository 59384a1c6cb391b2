"""One-shot compression of a ViT's feed-forward widths without fine-tuning: hashed vs the baselines.

    nice -n 10 .venv/bin/python benchmarks/bench_vit_oneshot.py            # writes bench_vit_oneshot.md
    nice -n 10 .venv/bin/python benchmarks/bench_vit_oneshot.py --smoke    # quick check of the script

A small ViT (conf/model/vit.yaml: 7x7 patches, 4 pre-norm blocks of width 64, 4 heads, MLP 256, GELU)
is trained by hashexp on Fashion-MNIST (`python -m hashexp model=vit hashing=none ...`, the vanilla
run of bench_vit_train.py). Its sites are found by tracing: the four feed-forward widths
(``blocks.{i}.mlp.fc1``). Each method then removes 50/70/90% of every feed-forward width, with no
fine-tuning, at 3 compression seeds (the seed draws the calibration samples; one trained network):

- hashed: ``compress_model(model, data, hashing="simhash", keep=K)`` (LSH on calibration activations
  proposes, the measured error orders removals, least squares refits fc2);
- magnitude + lsq, random + lsq: the same least-squares refit after choosing survivors by L1 norm or
  at random; magnitude alone (no refit);
- Torch-Pruning: its MagnitudePruner (group L1 importance over fc1 rows and fc2 columns, DepGraph) at
  the same widths, no refit (deterministic: one value per ratio).

Accuracy is on the full test split; the drop is against the trained network.

``--sites heads`` (writes bench_vit_oneshot_heads.md) removes 1, 2 or 3 of the 4 attention heads of
every block instead (the feed-forward widths stay; ``ignore=`` them): hashed (per-head candidates,
the grouped error order, least squares refits the output projection), magnitude + lsq (L1 of a
head's q/k/v rows), random heads + lsq, magnitude alone. Torch-Pruning is not run on heads (its
head pruning needs the model's attention modules registered by hand). ``--sites ffn`` (the default)
leaves the heads out (``ignore=``) so that only feed-forward neurons go.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from harness import ROOT, fmt, machine_line, run  # noqa: E402  (benchmarks/ is the script's dir)

REMOVE = (0.5, 0.7, 0.9)
REMOVE_HEADS = (0.25, 0.5, 0.75)  # 1, 2, 3 of 4 heads
METHODS = {
    "hashed (simhash, lsq)": dict(method="simhash"),
    "magnitude + lsq": dict(method="magnitude", compensation="lsq"),
    "random + lsq": dict(method="random", compensation="lsq"),
    "magnitude (L1, no refit)": dict(method="magnitude", compensation="none"),
}
TP = "Torch-Pruning MagnitudePruner (L1)"


def vit_run_args(subset: int, epochs: int, seed: int = 0) -> list[str]:
    """The vanilla ViT run shared with bench_vit_train.py."""
    return ["model=vit", "hashing=none", f"dataset.subset_train={subset}", f"trainer.epochs={epochs}",
            "trainer.num_threads=1", f"seed={seed}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--subset", type=int, default=20000, help="training samples of the ViT run")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_vit"))
    ap.add_argument("--md", default=None, help="output (default: bench_vit_oneshot.md, _heads.md with --sites heads)")
    ap.add_argument("--sites", choices=("ffn", "heads"), default="ffn",
                    help="which sites lose neurons (the others stay)")
    ap.add_argument("--smoke", action="store_true", help="tiny training run, for checking the script")
    ap.add_argument("--trained-seeds", action="store_true",
                    help="seed s compresses the ViT trained with seed s (one trained network per seed) instead of "
                         "compressing the seed-0 ViT with compression seed s")
    a = ap.parse_args()

    import torch

    from _tp import tp_prune
    from hashexp.compress import compress_model, load_run
    from hashexp.data import build_dataset
    from hashexp.merge.sites import model_widths
    from hashexp.metrics import accuracy

    torch.set_num_threads(1)  # one thread: the shared machine is oversubscribed, more threads only spin
    out = Path(a.out_dir)
    if a.smoke:
        a.subset, a.epochs, out = 1024, 1, out / "smoke"
    nets: dict[int, tuple] = {}

    def trained_net(seed: int) -> tuple:
        """(model, data, metrics) of the vanilla ViT trained with ``seed`` (trained once, then reused)."""
        if seed not in nets:
            run_metrics = run(vit_run_args(a.subset, a.epochs, seed), out / f"vanilla_s{seed}")
            net, net_cfg = load_run(str(out / f"vanilla_s{seed}"))
            nets[seed] = (net, build_dataset(net_cfg.dataset, seed=seed), run_metrics)
        return nets[seed]

    model0, data, m = trained_net(0)
    trained, majority = m["test_acc"], data.majority_acc("test")
    tag = "t" if a.trained_seeds else ""
    base_accs: list[float] = []
    heads = a.sites == "heads"
    removes = REMOVE_HEADS if heads else REMOVE
    a.md = a.md or str(Path(__file__).with_name("bench_vit_oneshot" + ("_heads" if heads else "")
                                                + ("_trained" if a.trained_seeds else "") + ".md"))
    full = {n: w for n, w in model_widths(model0).items() if n.endswith("attn.qkv") == heads}
    ignore = [n for n in model_widths(model0) if n not in full]
    cache = out / ("oneshot_heads.json" if heads else "oneshot.json")
    done = json.loads(cache.read_text()) if cache.exists() else {}
    res: dict[str, dict[float, list[float]]] = {}
    timing: dict[str, list[float]] = {}
    for rm in removes:
        keep = round(1 - rm, 2)
        for seed in a.seeds:
            net, net_data, net_m = trained_net(seed) if a.trained_seeds else (model0, data, m)
            if rm == removes[0]:
                base_accs.append(net_m["test_acc"])
            for name, kw in METHODS.items():
                key = f"{tag}{seed}|{name}|{rm}"
                if key not in done:
                    kw2 = dict(kw)
                    t0 = time.perf_counter()
                    _, rep = compress_model(net, net_data, kw2.pop("method"), keep=keep, seed=seed, ignore=ignore,
                                            **kw2)
                    done[key] = {"acc": rep["after"]["test_acc"], "time_s": time.perf_counter() - t0,
                                 "widths": rep["after"]["widths"], "flops": rep["after"]["flops"]}
                    print(f"seed {seed} {name:28s} remove {rm:.0%}: {100 * done[key]['acc']:.2f}% "
                          f"widths {done[key]['widths']} ({done[key]['time_s']:.2f}s)", flush=True)
                    cache.write_text(json.dumps(done, indent=1))
                res.setdefault(name, {}).setdefault(rm, []).append(net_m["test_acc"] - done[key]["acc"])
                timing.setdefault(name, []).append(done[key]["time_s"])
        if heads:
            continue
        for seed in (a.seeds if a.trained_seeds else a.seeds[:1]):
            net, net_data, net_m = trained_net(seed) if a.trained_seeds else (model0, data, m)
            widths = {n: w for n, w in done[f"{tag}{seed}|hashed (simhash, lsq)|{rm}"]["widths"].items() if n in full}
            key = f"tp|{tag}{seed if a.trained_seeds else ''}|{rm}" if a.trained_seeds else f"tp|{rm}"
            if key not in done:
                small = tp_prune(net, net_data.x_train[:2], {n: 1 - widths[n] / full[n] for n in widths})
                got = {n: int(small.get_submodule(n).weight.shape[0]) for n in widths}
                assert got == widths, (got, widths)
                done[key] = {"acc": accuracy(small, net_data.x_test, net_data.y_test), "widths": got}
                cache.write_text(json.dumps(done, indent=1))
            drops = res.setdefault(TP, {}).setdefault(rm, [])
            drops.extend([net_m["test_acc"] - done[key]["acc"]] * (1 if a.trained_seeds else len(a.seeds)))

    order = [*METHODS] if heads else [*METHODS, TP]
    lines = [
        f"# One-shot ViT {'attention-head' if heads else 'feed-forward'} compression without fine-tuning "
        "(Fashion-MNIST)",
        "",
        "Command: `nice -n 10 .venv/bin/python benchmarks/bench_vit_oneshot.py"
        + (" --sites heads" if heads else "") + (" --trained-seeds" if a.trained_seeds else "") + "`"
        + (" `--smoke`" if a.smoke else ""),
        "",
        f"Machine: {machine_line()}.",
        "",
        (f"One ViT per seed (`conf/model/vit.yaml`: patch 7, dim 64, depth 4, heads 4, MLP 256, GELU) trained by "
         f"`python -m hashexp {' '.join(vit_run_args(a.subset, a.epochs, 'S'))}` (Adam 1e-3, batch 256) for S in "
         f"{a.seeds}: test accuracy {', '.join(f'{100 * x:.2f}' for x in base_accs)}% (majority class "
         f"{100 * majority:.1f}%)" if a.trained_seeds else
         f"One ViT (`conf/model/vit.yaml`: patch 7, dim 64, depth 4, heads 4, MLP 256, GELU) trained by "
         f"`python -m hashexp {' '.join(vit_run_args(a.subset, a.epochs))}` (Adam 1e-3, batch 256): test accuracy "
         f"{100 * trained:.2f}% (majority class {100 * majority:.1f}%)")
        + ". Sites found by tracing: "
        f"{', '.join(f'{n} ({w})' for n, w in full.items())}"
        + (" (4 heads of 16 each; the feed-forward widths stay)" if heads else " (the heads stay)")
        + ". Each method removes the given share of every such width in one shot with no fine-tuning; the full "
        "test split is evaluated. "
        + ("Seed S compresses the ViT trained with seed S (calibration samples: 1024 training samples drawn with "
           "S); the drop is against that ViT's own accuracy."
           if a.trained_seeds else
           f"Seeds {a.seeds} are compression seeds (calibration samples: 1024 training samples drawn with the seed) "
           "on one trained network" + ("." if heads else "; Torch-Pruning is deterministic (one value, shown with "
                                             "sd 0).")),
        "",
        "## Test accuracy drop (pp, mean ± sd over " + ("trained networks" if a.trained_seeds else
                                                        "compression seeds") + "; lower is better)",
        "",
        "| method | " + " | ".join(f"-{int(100 * r)}%" for r in removes) + " |",
        "|---|" + "---:|" * len(removes),
    ]
    best = {rm: min(order, key=lambda n: statistics.mean(res[n][rm])) for rm in removes}
    for name in order:
        cells = []
        for rm in removes:
            c = fmt(res[name][rm], pct=True)
            cells.append(f"**{c}**" if best[rm] == name else c)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "FLOPs per sample after compression (all methods reach the same widths): "
              + ", ".join(f"-{int(100 * rm)}%: {done[f'{tag}{a.seeds[0]}|hashed (simhash, lsq)|{rm}']['flops']:,}"
                          for rm in removes) + f" (trained: {m['flops']:,}).",
              "", "Mean wall time per one-shot compression (4 sites, incl. tracing, calibration and the test-split "
              "evaluations; s; on a shared, oversubscribed 2-core machine, so indicative only): "
              + ", ".join(f"{n} {statistics.mean(timing[n]):.2f}" for n in METHODS), ""]
    Path(a.md).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
