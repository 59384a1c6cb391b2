"""Third-party cross-check: hashexp's `magnitude` baseline against Torch-Pruning's L1 pruning.

    .venv/bin/python benchmarks/bench_torch_pruning.py            # writes bench_torch_pruning.md
    .venv/bin/python benchmarks/bench_torch_pruning.py --smoke    # quick check of the script

Torch-Pruning (Fang et al., CVPR 2023; the `bench` extra) builds its dependency graph, scores each
group, chooses the per-layer widths and cuts; hashexp's `magnitude` (Li et al. 2017) with
`compensation=none` does the same through its own sites and surgery. Both run with no fine-tuning
and no BatchNorm re-estimation, on

- LeNet-300-100 trained by hashexp on Fashion-MNIST, the networks of bench_oneshot
  (`python -m hashexp model.widths=[300,100] trainer.epochs=15 seed=S`);
- ResNet-20 on Fashion-MNIST, briefly trained in the script (seed 0, 60 Adam steps of batch 128, lr 1e-3:
  a real but short training; the CPU this ran on was shared by five workers); the
  block-internal widths (conv1 -> conv2 of each block, the layers Li et al. and Kim et al. prune in
  ResNets) are cut, the three residual streams stay.

Torch-Pruning runs with two importances: its stock `MagnitudeImportance(p=1, group_reduction="first",
normalizer=None)` (Li et al.'s L1 of the root layer's kernel, no bias) and a 10-line importance
that sums |w| and |b| of every producer's output rows (Kim et al.'s [w; b], which is what hashexp
scores). Widths: Torch-Pruning keeps int(w * (1 - ratio)) (a floor of a float product), hashexp
round(w * keep); the width-matched Torch-Pruning runs give each layer the ratio that hits hashexp's
width, so the two prune the same number of neurons and only the choice of neurons can differ.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from harness import ROOT, run  # noqa: E402  (benchmarks/ is the script's dir)

KEEP = (0.5, 0.4, 0.3, 0.2, 0.1)
#: ResNet-20 is evaluated on the first N_TEST test samples (a shared 2-core CPU)
N_TEST = 2000


def producer_rows_l1(group):
    """Torch-Pruning importance: L1 of [w; b] summed over every layer whose *output* channels the group cuts."""
    import torch
    import torch_pruning as tp

    imp = torch.zeros(len(group[0].idxs))
    for i, (dep, idxs) in enumerate(group):
        if dep.pruning_fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
            layer = dep.layer
            local = layer.weight.data[idxs].flatten(1).abs().sum(1)
            if layer.bias is not None:
                local = local + layer.bias.data[idxs].abs()
            imp.scatter_add_(0, torch.as_tensor(group[i].root_idxs), local.float())
    return imp


def tp_prune(model, example, layers, ratios, importance):
    """Cut ``layers``' output channels with Torch-Pruning (local scopes, one ratio per layer)."""
    import torch
    import torch_pruning as tp

    ignored = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m not in layers]
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=False,
                                  pruning_ratio_dict=dict(zip(layers, ratios)), ignored_layers=ignored)
    pruner.step()
    return model


def hx_prune(model, keep, sites, scoring="original"):
    from hashexp.merge.baselines import MagnitudePruner

    MagnitudePruner(target_ratio=keep, compensation="none", min_width=1, sites=sites, scoring=scoring).compress(
        model, None, None, None, step=0)
    return model


def compare(model0, data, layers_of, sites, keep, acc):
    """One row: widths and accuracy of hashexp (original, sequential) and Torch-Pruning (stock, matched)."""
    import torch
    import torch_pruning as tp

    example = data.x_train[:2]
    hx = hx_prune(copy.deepcopy(model0), keep, sites)
    old = hx_prune(copy.deepcopy(model0), keep, sites, scoring="sequential")
    widths = [hx.widths()[s] for s in sites]
    full = [model0.widths()[s] for s in sites]
    out = {"keep": keep, "hx_widths": widths, "hx": acc(hx), "old": acc(old)}
    stock = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    m = copy.deepcopy(model0)
    tp_prune(m, example, layers_of(m), [1 - keep] * len(sites), stock)
    out["tp_widths"] = [m.widths()[s] for s in sites]
    out["tp_stock_ratio"] = acc(m)
    matched = [(w - k) / w - 1e-9 for w, k in zip(full, widths)]
    for name, imp in (("tp_first", stock), ("tp_wb", producer_rows_l1)):
        m = copy.deepcopy(model0)
        tp_prune(m, example, layers_of(m), matched, imp)
        assert [m.widths()[s] for s in sites] == widths, (name, m.widths(), widths)
        out[name] = acc(m)
        out[name + "_diff"] = max(float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")
                                  for a, b in zip(m.state_dict().values(), hx.state_dict().values()))
    return out


def brief_resnet20(data, steps: int, seed: int = 0):
    """ResNet-20 after ``steps`` Adam steps (batch 128, lr 1e-3) on the training split, in eval mode."""
    import torch

    from hashexp.models import build_model

    torch.manual_seed(seed)
    model = build_model({"_target_": "hashexp.models.resnet.ResNet20"}, data.input_shape, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data.x_train), (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def table(title: str, rows: list[dict], note: str) -> list[str]:
    lines = [f"## {title}", "", note, "",
             "| keep | hashexp widths | TP widths (ratio 1 - keep) | hashexp magnitude | hashexp old sequential "
             "| TP stock L1, ratio 1 - keep | TP stock L1 (first layer, no bias), matched widths | max abs diff of all tensors "
             "| TP [w; b] L1, matched widths | max abs diff of all tensors |",
             "|---:|---|---|---:|---:|---:|---:|:---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['keep']} | {r['hx_widths']} | {r['tp_widths']} | {100 * r['hx']:.2f} | {100 * r['old']:.2f} "
                     f"| {100 * r['tp_stock_ratio']:.2f} | {100 * r['tp_first']:.2f} | {r['tp_first_diff']:.1e} "
                     f"| {100 * r['tp_wb']:.2f} | {r['tp_wb_diff']:.1e} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--smoke", action="store_true", help="tiny training runs, for checking the script")
    a = ap.parse_args()

    import torch
    import torch_pruning as tp

    from hashexp.compress import load_run
    from hashexp.data import build_dataset
    from hashexp.metrics import accuracy

    torch.set_num_threads(2)
    out = ROOT / "outputs" / ("bench_tp_smoke" if a.smoke else "bench_oneshot")
    sub = ["dataset.subset_train=4096", "dataset.subset_test=1024"] if a.smoke else []
    lines = ["# Torch-Pruning cross-check of the magnitude baseline (no fine-tuning)", "",
             "Command: `.venv/bin/python benchmarks/bench_torch_pruning.py`" + (" `--smoke`" if a.smoke else ""),
             "", f"Torch-Pruning {tp.__version__}. " + __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(), ""]
    mlp_rows = []
    for seed in a.seeds:
        rd = out / f"seed{seed}"
        run(["model.widths=[300,100]", f"trainer.epochs={2 if a.smoke else 15}", "hashing=none", f"seed={seed}", *sub], rd)
        model0, cfg = load_run(str(rd))
        data = build_dataset(cfg.dataset, seed=seed)
        acc = lambda m: accuracy(m.eval(), data.x_test, data.y_test)  # noqa: E731
        for keep in KEEP:
            r = compare(model0, data, lambda m: list(m.layers[:2]), ["fc1", "fc2"], keep, acc)
            r["seed"] = seed
            mlp_rows.append(r)
            print(f"mlp seed {seed} keep {keep}: {r}", flush=True)
    for seed in a.seeds:
        lines += table(f"LeNet-300-100, seed {seed} (test accuracy %, trained {100 * accuracy(load_run(str(out / f'seed{seed}'))[0].eval(), data.x_test, data.y_test):.2f})",
                       [r for r in mlp_rows if r["seed"] == seed], "fc1 and fc2 cut at once, per-layer ratio.")
    model0 = brief_resnet20(data, steps=5 if a.smoke else 60)
    acc = lambda m: accuracy(m.eval(), data.x_test[:N_TEST], data.y_test[:N_TEST])  # noqa: E731
    inner = [s.name for s in model0.merge_sites() if s.name.endswith(".inner")]

    def block_conv1(m):
        return [b.conv1 for stage in m.stages for b in stage]

    res_rows = []
    for keep in KEEP:
        r = compare(model0, data, block_conv1, inner, keep, acc)
        res_rows.append(r)
        print(f"resnet20 keep {keep}: {r}", flush=True)
    lines += table(f"ResNet-20, block-internal widths (accuracy % on the first {N_TEST} test samples, briefly trained: {100 * acc(model0):.2f}, seed 0)",
                   res_rows, "The 9 block-internal sites (16/32/64 wide) cut at once; widths listed per site in "
                   "forward order.")
    Path(a.md).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
