"""Neuron Merging's Conv-BN rule vs its plain rule, magnitude and hashed merging, one-shot on ResNet-20.

    .venv/bin/python benchmarks/bench_nm_bn.py --runs outputs/nmbn_resnet/seed0 outputs/nmbn_resnet/seed1 ...
    .venv/bin/python benchmarks/bench_nm_bn.py --smoke     # quick check of the script (an untrained net)

Each run dir holds a ResNet-20 trained by hashexp on Fashion-MNIST (``python -m hashexp
experiment=resnet20_fmnist hashing=none trainer.epochs=3 dataset.subset_train=20000 seed=S``). Its 9
block-internal widths (conv1 -> bn1 -> ReLU -> conv2 of every block: the sites Kim et al. prune in
ResNets; the residual streams stay) are cut in one shot to ``keep`` of their width, with no
fine-tuning, by

- ``neuron_merging`` with the paper's Conv-BN rule (``bn_rule=paper``), with the authors' code's
  terms (``bn_rule=code``) and with the plain rule on BN-folded filters (``bn_rule=folded``), all at
  the authors' ResNet setting t = 0.1, lambda = 0.85;
- ``magnitude`` (Li et al. 2017, ``compensation=none``: the pruned network Neuron Merging starts from);
- hashed merging (``simhash``, least squares on 1024 calibration samples: it uses data, the others do not).

Accuracy on the first ``--n-test`` test samples, as compressed (BN statistics untouched: the
data-free setting of the paper) and after re-estimating BN statistics on 20 training batches.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from harness import ROOT, command_line, fmt, write_markdown  # noqa: E402  (benchmarks/ is the script's dir)

KEEP = (0.7, 0.5, 0.3)
METHODS = {  # label -> (method, knobs)
    "NM Conv-BN rule (paper's equations)": ("neuron_merging", {"bn_rule": "paper"}),
    "NM Conv-BN rule (authors' code's terms)": ("neuron_merging", {"bn_rule": "code"}),
    "NM plain rule (BN-folded filters)": ("neuron_merging", {"bn_rule": "folded"}),
    "magnitude (L1, no compensation)": ("magnitude", {"compensation": "none"}),
    "hashed (simhash, lsq, 1024 samples)": ("simhash", {}),
}


def batches(data, n: int, batch_size: int, seed: int):
    """``n`` shuffled training batches (inputs only) for BN re-estimation."""
    import torch

    from hashexp.data import BatchIterator

    it = BatchIterator(data.x_train, data.y_train, batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return [xb for _, (xb, _) in zip(range(n), it)]


def one_run(model0, data, seed: int, keep_ratios, n_test: int, threshold: float, lam: float,
            comp_seeds=(0,)) -> dict:
    """Accuracies (as cut, and after BN re-estimation) of every method at every keep ratio: one value
    for the data-free methods (deterministic), one per compression seed for the hashed one."""
    import torch

    from hashexp.compress import make_compressor
    from hashexp.merge.recalibrate import recalibrate_bn
    from hashexp.metrics import accuracy

    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    inner = [s.name for s in model0.merge_sites() if s.name.endswith(".inner")]
    bn_batches = batches(data, 20, 128, seed)
    out = {"base": accuracy(model0, x_test, y_test), "rows": {}}
    for label, (method, knobs) in METHODS.items():
        for keep in keep_ratios:
            kw = dict(knobs, min_width=1)  # every method cuts to exactly round(keep x width)
            if method == "neuron_merging":
                kw.update(bn_lambda=lam)
            row = out["rows"][(label, keep)] = {"acc": [], "acc_bn": []}
            for cs in comp_seeds if method == "simhash" else comp_seeds[:1]:
                comp = make_compressor(method, keep, seed=cs, threshold=threshold if method == "neuron_merging" else None,
                                       **kw)
                comp.sites = inner
                calib = data.x_train[torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(cs))[:1024]]
                m = copy.deepcopy(model0).eval()
                comp.compress(m, None, None, None, step=0, calib=calib if method == "simhash" else None)
                row["widths"] = [m.widths()[n] for n in inner]
                row["acc"].append(accuracy(m, x_test, y_test))
                recalibrate_bn(m, bn_batches)
                m.eval()
                row["acc_bn"].append(accuracy(m, x_test, y_test))
                print(f"  seed {seed}/{cs} {label} keep {keep}: {row['acc'][-1]:.4f} (BN re-estimated "
                      f"{row['acc_bn'][-1]:.4f}) widths {row['widths']}", flush=True)
    return out


def cached(path: Path, key: dict, compute) -> dict:
    """``compute()``'s result, kept in ``path`` and reused while the settings ``key`` are the same
    (a later call adds trained seeds without redoing the earlier ones)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return {"base": saved["base"], "rows": {(lab, keep): row for lab, keep, row in saved["rows"]}}
    out = compute()
    path.write_text(json.dumps({"key": key, "base": out["base"],
                                "rows": [[lab, keep, row] for (lab, keep), row in out["rows"].items()]}))
    return out


def report(results: dict[int, dict], keep_ratios, n_test: int, threshold: float, lam: float, comp_seeds) -> list[str]:
    """The markdown tables: mean ± sd per method and keep ratio."""
    seeds = sorted(results)
    base = [results[s]["base"] for s in seeds]
    lines = [f"Trained ResNet-20s (seeds {seeds}): {fmt(base, pct=True)} % on the first {n_test} test samples. "
             f"Neuron Merging at t = {threshold}, lambda = {lam}. Mean ± sd over the trained seeds (the data-free "
             f"methods are deterministic) and, for the hashed row, compression seeds {list(comp_seeds)}; "
             "'as cut' leaves BN statistics as they were (the paper's data-free setting), 'BN re-estimated' "
             "recomputes them on 20 training batches of 128.", ""]
    first = results[seeds[0]]["rows"]
    for keep in keep_ratios:
        lines += [f"### keep {keep} of each block-internal width (widths {first[(next(iter(METHODS)), keep)]['widths']})", "",
                  "| method | acc % as cut | Δ vs trained pp | acc % BN re-estimated |", "|---|---:|---:|---:|"]
        for label in METHODS:
            acc = [a for s in seeds for a in results[s]["rows"][(label, keep)]["acc"]]
            bn = [a for s in seeds for a in results[s]["rows"][(label, keep)]["acc_bn"]]
            drop = [100 * (a - results[s]["base"]) for s in seeds for a in results[s]["rows"][(label, keep)]["acc"]]
            lines.append(f"| {label} | {fmt(acc, pct=True)} | {fmt(drop)} | {fmt(bn, pct=True)} |")
        lines.append("")
    paper = next(iter(METHODS))
    lines += ["### The paper's Conv-BN rule minus each other data-free method, paired by trained seed (pp)", "",
              "| keep | vs | as cut | BN re-estimated |", "|---:|---|---:|---:|"]
    for keep in keep_ratios:
        for label in list(METHODS)[1:4]:
            diff = {k: [100 * (results[s]["rows"][(paper, keep)][k][0] - results[s]["rows"][(label, keep)][k][0])
                        for s in seeds] for k in ("acc", "acc_bn")}
            lines.append(f"| {keep} | {label} | {fmt(diff['acc'])} | {fmt(diff['acc_bn'])} |")
    lines.append("")
    return lines


def argv_without_note() -> list[str]:
    """sys.argv less ``--note TEXT`` (the paragraph is in the md itself)."""
    argv = list(sys.argv)
    if "--note" in argv:
        i = argv.index("--note")
        del argv[i:i + 2]
    return argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=[], help="run dirs of trained ResNet-20s (model.pt, .hydra/)")
    ap.add_argument("--keep", type=float, nargs="+", default=list(KEEP))
    ap.add_argument("--n-test", type=int, default=2000, help="test samples evaluated (a shared 2-core CPU)")
    ap.add_argument("--threshold", type=float, default=0.1, help="Neuron Merging's t (the authors' ResNet setting)")
    ap.add_argument("--lam", type=float, default=0.85, help="the Conv-BN rule's lambda (the authors' ResNet setting)")
    ap.add_argument("--comp-seeds", type=int, nargs="+", default=[0, 1, 2], help="compression seeds of the hashed row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="a paragraph after the tables (how to read them)")
    ap.add_argument("--smoke", action="store_true", help="an untrained ResNet-20 on 256 test samples, nothing written")
    ap.add_argument("--md", default=str(Path(__file__).with_name("bench_nm_bn.md")))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from omegaconf import OmegaConf

    from hashexp.data import build_dataset
    from hashexp.models import build_model, load_model

    torch.set_num_threads(a.threads)
    results = {}
    if a.smoke:
        data = build_dataset(OmegaConf.load(ROOT / "conf" / "dataset" / "fashion_mnist.yaml"), seed=0)
        torch.manual_seed(0)
        model = build_model({"_target_": "hashexp.models.resnet.ResNet20"}, data.input_shape, data.num_classes)
        results[0] = one_run(model.eval(), data, 0, a.keep[:1], 256, a.threshold, a.lam, a.comp_seeds[:2])
        print("\n".join(report(results, a.keep[:1], 256, a.threshold, a.lam, a.comp_seeds[:2])))
        return
    for run_dir in map(Path, a.runs):
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        data = build_dataset(cfg.dataset, seed=int(cfg.seed))
        model = load_model(run_dir / "model.pt").eval()
        results[int(cfg.seed)] = cached(run_dir / "bench_nm_bn.json", vars(a) | {"runs": None, "md": None, "note": None},
                                        lambda: one_run(model, data, int(cfg.seed), a.keep, a.n_test, a.threshold,
                                                        a.lam, a.comp_seeds))
    body = report(results, a.keep, a.n_test, a.threshold, a.lam, a.comp_seeds) + ([a.note] if a.note else [])
    write_markdown(a.md, "Neuron Merging's Conv-BN rule on ResNet-20 (one-shot, no fine-tuning)", body,
                   command=command_line(argv_without_note()) + (" --note '...'" if a.note else ""),
                   notes=[__doc__.split("\n\n", 2)[2].strip()])
    print("\n".join(body))


if __name__ == "__main__":
    main()
