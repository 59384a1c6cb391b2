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

The baselines score every site on the network before compression, as their papers do
(`hashing.scoring=original`, issue 22). The rows marked `[old: sequential]` are the same
baselines scored site by site after the upstream sites were cut (`scoring=sequential`, hashexp
before issue 22), kept for one release. The row `hashed lsq activations/keep [probe: original
capture]` asks the same question of the hashed compressor: each site is planned on, and its
consumers refit to, the activations of the *original* network (captured on a copy before any
site changes) instead of the already-merged upstream network.

Accuracy is on the full test split; the drop is against the trained model of the same seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from harness import ROOT, fmt, run, write_markdown  # noqa: E402  (benchmarks/ is the script's dir)

REMOVE = (0.5, 0.6, 0.7, 0.8, 0.9)
NM_T = (0.1, 0.3, 0.45, 0.6, 0.8)


def methods(affected: bool = False) -> dict[str, dict]:
    """The table's rows (``affected``: only those issue 22 changes, and the headline hashed row)."""
    out = {}
    for cand, rep in (("activations", "keep"), ("activations", "mean"), ("weights", "keep"), ("exact", "keep")):
        out[f"hashed lsq {cand}/{rep}"] = dict(method="simhash", candidates=cand, representative=rep)
    out["hashed data-free (weights rule)"] = dict(method="simhash", compensation="weights")
    out["neuron_merging t=0.45"] = dict(method="neuron_merging")
    out["magnitude"] = dict(method="magnitude")
    out["magnitude + lsq"] = dict(method="magnitude", compensation="lsq")
    out["random"] = dict(method="random")
    out["random + lsq"] = dict(method="random", compensation="lsq")
    out["hashed lsq activations/keep [probe: original capture]"] = dict(method="simhash", candidates="activations",
                                                                       representative="keep", probe=True)
    for name in ("neuron_merging t=0.45", "magnitude", "magnitude + lsq", "random", "random + lsq"):
        out[f"{name} {OLD}"] = dict(out[name], scoring="sequential")
    if affected:
        out = {k: v for k, v in out.items() if k.startswith(("hashed lsq activations/keep", "neuron_merging", "magnitude",
                                                             "random"))}
    return out


OLD = "[old: sequential]"


@contextmanager
def original_capture():
    """Probe: the hashed compressor plans each site on (and refits its consumers to) the original
    network's activations, captured on a copy made before the first site changes."""
    import hashexp.compress as hc
    from hashexp.merge import compressor as mc
    from hashexp.merge.hashed import HashCompressor

    make, capture = hc.make_compressor, mc.cal.capture_site
    state: dict = {}

    class OriginalCapture(HashCompressor):
        def compress(self, model, *a, **kw):
            state["orig"] = copy.deepcopy(model)
            state["sites"] = {s.name: s for s in state["orig"].merge_sites()}
            try:
                return super().compress(model, *a, **kw)
            finally:
                state.clear()

    def capture_original(model, site, x, seed=0, before_consumer=None):
        if before_consumer is None and state:  # the "before" capture of lsq: from the original copy
            return capture(state["orig"], state["sites"][site.name], x, seed)
        return capture(model, site, x, seed, before_consumer)

    def make_probe(*a, **kw):
        comp = make(*a, **kw)
        comp.__class__ = OriginalCapture
        return comp

    hc.make_compressor, mc.cal.capture_site = make_probe, capture_original
    try:
        yield
    finally:
        hc.make_compressor, mc.cal.capture_site = make, capture


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_oneshot"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--smoke", action="store_true", help="subset data, for checking the script")
    ap.add_argument("--affected", action="store_true",
                    help="only the rows issue 22 changes: the baselines (new and old) and the headline hashed row "
                         "with its original-capture probe")
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
        variants = {**methods(a.affected), **{f"neuron_merging t={t}": dict(method="neuron_merging", threshold=t) for t in NM_T},
                    **{f"neuron_merging t={t} {OLD}": dict(method="neuron_merging", threshold=t, scoring="sequential")
                       for t in NM_T}}
        for name, kw in variants.items():
            for rm in REMOVE:
                key = f"{seed}|{name}|{rm}"
                if key not in done:
                    kw2 = dict(kw)
                    method = kw2.pop("method")
                    probe = kw2.pop("probe", False)
                    t0 = time.perf_counter()
                    with original_capture() if probe else nullcontext():
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
            for tag in ("", f" {OLD}"):
                best = max(res[f"neuron_merging t={t}{tag}"][rm][seed] for t in NM_T)
                res.setdefault(f"neuron_merging, best t per ratio{tag}", {}).setdefault(rm, {})[seed] = best

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
    order = [*methods(a.affected), "neuron_merging, best t per ratio", f"neuron_merging, best t per ratio {OLD}"]
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
        for tag in ("", f" {OLD}"):
            lines.append(f"| {t}{tag} | " + " | ".join(
                f"{100 * statistics.mean(res[f'neuron_merging t={t}{tag}'][rm][s] for s in seeds):.2f}" for rm in REMOVE)
                + " |")
    lines += ["", "Mean time per one-shot compression (both sites, incl. calibration forward; s): "
              + ", ".join(f"{n} {statistics.mean(timing[n]):.2f}" for n in methods(a.affected)), ""]
    print(write_markdown(a.md, "One-shot compression without fine-tuning (MLP 784-300-100-10, Fashion-MNIST)", lines))


if __name__ == "__main__":
    main()
