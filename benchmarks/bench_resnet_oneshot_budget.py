"""ResNet-20 one-shot: per-site vs global budget at equal FLOPs, and the stage loop vs batched orders.

    nice -n 10 .venv/bin/python benchmarks/bench_resnet_oneshot_budget.py --seeds 0 1 2   # writes bench_resnet_oneshot_budget.md

Per seed, a vanilla ResNet-20 trained by hashexp's trainer on a seeded Fashion-MNIST subset
(``experiment=resnet20_fmnist hashing=none trainer.epochs=E dataset.subset_train=N
dataset.subset_test=M``; cached under ``--cache``) is compressed once, with no fine-tuning, by
``HashCompressor`` (``compensation=lsq``, candidates=exact, the blocked order, max_error=null),
then its BatchNorm statistics are re-estimated on 20 training batches and its test accuracy is
measured:

- budget=site: every site keeps ``--keep`` of its width;
- budget=global: one FLOPs ratio across all sites, bisected (``--bisect`` steps) until the
  network's FLOPs match the per-site network's (equal FLOPs, not equal ratios); one row per
  ``--global-weight`` (``hashing.global_weight``: ``none``, or ``consumers``: a site's error counts
  once per consumer layer).

Timing (``--timing-rounds``): the same per-site compress with ``hashing.batch_sites=false``
(one order per site, a Python loop) and ``true`` (the orders of a stage's equal-shaped sites in
one batched call), interleaved by benchmarks/harness.py; the removal-order time alone and the
whole compress are reported as medians and per-round ratios. One torch thread.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from harness import ROOT, command_line, fmt, interleave, run, write_markdown

from hashexp.merge import calibration as cal
from hashexp.merge import greedy
from hashexp.merge import hashed as hashed_mod
from hashexp.merge.recalibrate import recalibrate_bn
from hashexp.metrics import accuracy, count_flops
from hashexp.models import load_model

BASE = dict(min_width=4, seed=0, candidates="exact", compensation="lsq", max_error=None, order="blocked",
            per_step=4, block_frac=0.02, bits=4, tables=16)


def trained(seed: int, a) -> tuple[torch.nn.Module, object]:
    d = a.cache / f"r20_s{seed}"
    run(["experiment=resnet20_fmnist", "hashing=none", f"seed={seed}", f"trainer.epochs={a.epochs}",
         f"dataset.subset_train={a.subset_train}", f"dataset.subset_test={a.subset_test}", "trainer.num_threads=1"], d)
    from omegaconf import OmegaConf

    from hashexp.data import build_dataset

    cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
    return load_model(d / "model.pt"), build_dataset(cfg.dataset, seed=seed)


def compress(model, data, **kw) -> dict:
    """Compress a copy one-shot, recalibrate BN, measure; returns the numbers and the model."""
    m = copy.deepcopy(model)
    calib = data.x_train[cal.calibration_index(len(data.x_train), 1024, 0)]
    comp = hashed_mod.HashCompressor(**{**BASE, **kw})
    t0 = time.perf_counter()
    comp.compress(m, None, None, None, 0, calib=calib)
    dt = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.x_train), generator=gen)[:20 * 128]
    recalibrate_bn(m, [data.x_train[idx[i:i + 128]] for i in range(0, len(idx), 128)])
    return {"acc": accuracy(m, data.x_test, data.y_test), "flops": count_flops(m, data.input_shape),
            "widths": m.widths(), "s": dt, "model": m}


def equal_flops_global(model, data, target: int, steps: int, weight: str = "none") -> dict:
    """budget=global with the FLOPs ratio bisected until the network's FLOPs reach ``target``."""
    lo, hi, best = 0.0, 1.0, None
    for _ in range(steps):
        r = (lo + hi) / 2
        res = compress(model, data, budget="global", target_ratio=r, global_weight=weight)
        res["ratio"] = r
        if best is None or abs(res["flops"] - target) < abs(best["flops"] - target):
            best = res
        if res["flops"] > target:
            hi = r
        else:
            lo = r
    return best


def stage_timing(model, data, rounds: int) -> tuple[list[str], dict]:
    """Per-site compress, batch_sites off vs on, interleaved: order time and whole compress."""
    order_s: dict[str, list[float]] = {"loop": [], "batched": []}
    accs = {}
    inner = greedy.greedy_steps

    def contender(name: str, batch: bool):
        def fn(r: int) -> float:
            spent = []

            def timed(*args, **kw):
                t = time.perf_counter()
                out = inner(*args, **kw)
                spent.append(time.perf_counter() - t)
                return out

            greedy.greedy_steps = timed
            try:
                res = compress(model, data, target_ratio=0.75, batch_sites=batch)
            finally:
                greedy.greedy_steps = inner
            if r >= 0:
                order_s[name].append(sum(spent))
            accs[name] = res["acc"]
            return res["s"]
        return fn

    t = interleave({"loop": contender("loop", False), "batched": contender("batched", True)}, repeats=rounds)
    ratio = [x / y for x, y in zip(order_s["loop"], order_s["batched"])]
    extra = {"loop": ("", ""), "batched": (f"{statistics.median(ratio):.2f}x", f"{t.ratio('loop', 'batched').median:.2f}x")}
    lines = ["| sites' orders | greedy order s | compress s | loop/batched order | loop/batched compress | test acc % |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in ("loop", "batched"):
        med = statistics.median(order_s[n])
        lines.append(f"| {n} | {med:.3f} ({min(order_s[n]):.3f}–{max(order_s[n]):.3f}) | {t[n].fmt(digits=2)} | "
                     f"{extra[n][0]} | {extra[n][1]} | {100 * accs[n]:.2f} |")
    return lines, {"load": t.load_note()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--subset-train", type=int, default=4096)
    p.add_argument("--subset-test", type=int, default=2000)
    p.add_argument("--bisect", type=int, default=6)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--global-weight", nargs="+", default=["none"], choices=["none", "consumers"])
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "bench_resnet_oneshot_budget")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_resnet_oneshot_budget.md")
    a = p.parse_args()
    torch.set_num_threads(1)
    names = {w: "global" if w == "none" else f"global, {w}" for w in a.global_weight}
    rows: dict[float, dict[str, list]] = {k: {"site": [], **{n: [] for n in names.values()}, "base": []} for k in a.keep}
    timing = None
    for s in a.seeds:
        model, data = trained(s, a)
        base_acc, base_flops = accuracy(model, data.x_test, data.y_test), count_flops(model, data.input_shape)
        for k in a.keep:
            site = compress(model, data, budget="site", target_ratio=k)
            rows[k]["site"].append(site)
            rows[k]["base"].append((base_acc, base_flops))
            for w, name in names.items():
                glob = equal_flops_global(model, data, site["flops"], a.bisect, w)
                print(f"seed {s} keep {k}: site {100 * site['acc']:.2f}% {site['flops']:,} | {name} "
                      f"r={glob['ratio']:.3f} {100 * glob['acc']:.2f}% {glob['flops']:,} | vanilla {100 * base_acc:.2f}%",
                      flush=True)
                rows[k][name].append(glob)
        if timing is None and a.timing_rounds:
            timing = stage_timing(model, data, a.timing_rounds)
    body = ["## Per-site vs global budget at equal FLOPs (one shot, BN recalibrated, no fine-tuning)", "",
            "| per-site keep | budget | FLOPs/sample | FLOPs vs per-site | test acc % | Δ vs per-site pp | vanilla acc % |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for k in a.keep:
        site, base = rows[k]["site"], rows[k]["base"]
        for name in ("site", *names.values()):
            rs = rows[k][name]
            d = [100 * (g["acc"] - q["acc"]) for g, q in zip(rs, site)]
            body.append(f"| {k} | {name} | {statistics.mean(r['flops'] for r in rs):,.0f} | "
                        f"{statistics.mean(r['flops'] / q['flops'] for r, q in zip(rs, site)):.3f} | "
                        f"{fmt([r['acc'] for r in rs], pct=True)} | {fmt(d)} | {fmt([b[0] for b in base], pct=True)} |")
    body += ["", "Widths (first seed): " + "; ".join(
        f"keep {k} site {rows[k]['site'][0]['widths']}, " + ", ".join(
            f"{n} (ratio {rows[k][n][0]['ratio']:.3f}) {rows[k][n][0]['widths']}" for n in names.values())
        for k in a.keep)]
    notes = [f"ResNet-20 trained {a.epochs} epochs on {a.subset_train} Fashion-MNIST samples (test on {a.subset_test}), "
             f"seeds {a.seeds}; one shot with the blocked order (per_step 4), candidates=exact, 1024 calibration "
             f"samples (256 through convs), BN recalibrated on 20 batches of 128. Vanilla FLOPs "
             f"{rows[a.keep[0]]['base'][0][1]:,}. sd over seeds."]
    if timing is not None:
        body += ["", f"## Stage loop vs batched orders (seed {a.seeds[0]}, keep 0.75 per site, {a.timing_rounds} "
                 f"interleaved rounds, medians (min–max); {timing[1]['load']})", "", *timing[0]]
    write_markdown(a.out, "ResNet-20 one-shot: per-site vs global budget, stage loop vs batched orders", body,
                   command="nice -n 10 " + command_line(), notes=notes)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
