"""Merge-cost scaling: one-shot merge of a trained layer pair at width 512 ... 16k.

    nice -n 10 .venv/bin/python benchmarks/bench_merge_cost.py --repeats 2   # writes bench_merge_cost.md
    .venv/bin/python benchmarks/bench_merge_cost.py --widths 512 1024 --repeats 1 --smoke   # quick check

The layer pair is fc1 -> fc2 of an MLP 784-W-2048-10 *synthesized* from a trained one: hashexp's
trainer trains 784-2048-2048-10 on Fashion-MNIST for 3 epochs (``experiment=fmnist_mlp2048
trainer.epochs=3 hashing=none``; cached under ``--cache``), and the W-wide fc1 resamples its
trained neurons (:func:`layer_pair`: below 2048 a random subset, from 2048 on noisy copies;
training a 16k-wide layer was out of reach on the shared 2-core machine). The site fc1 (W
neurons; consumer fc2, 2048 outputs) is merged in one shot to ``--keep`` of its width
by ``HashCompressor`` (least squares on 1024 calibration samples, ``candidates=exact`` so every
neuron is eligible and only the removal order differs), with no fine-tuning:

- ``exact``: the structured OBS order over the whole width, blocks of 1% (the reference);
- ``exact 1/neuron``: the same order with one factorization update per neuron (the per-neuron
  greedy that ``blocked`` reproduces);
- ``exact 5%``: the same order with blocks of 5% (5x fewer factorization updates, but each block
  chosen by the scores before it, so other decisions);
- ``blocked``: ``order=blocked`` (hashexp/merge/greedy.py): the per-neuron greedy decisions of
  the exact order, one factorization update per 8 removals, on the model's device;
- ``restricted``: the OBS order inside LSH buckets (hashexp/merge/order.py), bucket_size 128,
  8 neurons per bucket per factorization update.

Each merge runs in a fresh process (so its peak RSS is its own): ``order s`` is the removal
order alone, ``merge s`` the whole one-shot merge (capture, order, least-squares refit, surgery);
peak memory is the process's peak RSS minus its RSS just before the merge. Methods are
interleaved within each repeat; times are median [min, max] over repeats. The accuracy drop is
against the exact order at the same width (the merge is deterministic, so repeats agree).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "exact": dict(order="exact", block_frac=0.01),
    "exact 1/neuron": dict(order="exact", block_frac=1e-9),
    "exact 5%": dict(order="exact", block_frac=0.05),
    "blocked": dict(order="blocked", per_step=8, block_frac=0.01),
    "restricted": dict(order="restricted", bucket_size=128, per_step=8),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _data():
    from omegaconf import OmegaConf

    from hashexp.data import build_dataset

    return build_dataset(OmegaConf.load(ROOT / "conf" / "dataset" / "fashion_mnist.yaml"), seed=0)


def base_model(cache: Path):
    """The trained MLP 784-2048-2048-10 (hashexp's trainer, hashing=none, 3 epochs, seed 0; cached)."""
    from harness import run

    from hashexp.models import load_model

    run_dir = cache / "mlp2048_e3"
    run(["experiment=fmnist_mlp2048", "trainer.epochs=3", "hashing=none", "seed=0", "trainer.num_threads=1"], run_dir)
    return load_model(run_dir / "model.pt")


def layer_pair(width: int, cache: Path, noise: float = 0.1):
    """An MLP 784-width-2048-10 whose fc1 is resampled from the trained 2048-wide fc1.

    Neuron i is trained neuron j(i) (a seeded permutation, cycled when width > 2048) plus Gaussian
    noise of ``noise`` times the row's RMS entry on its weights and bias (the first copy of each
    trained neuron is exact); fc2's column of j is shared among its copies, scaled by 2048 / width
    so the pre-activation keeps its size. Below 2048 this drops trained neurons, so the network is
    worse than the trained one (the table prints its accuracy); from 2048 on it computes nearly
    the trained function with width / 2048 noisy copies of every neuron.
    """
    import torch

    from hashexp.models import build_model

    base = base_model(cache)
    gen = torch.Generator().manual_seed(width)
    n0 = base.layers[0].out_features
    src = torch.randperm(n0, generator=gen).repeat(-(-width // n0))[:width]
    first = torch.arange(width) < n0
    model = build_model({"_target_": "hashexp.models.mlp.MLP", "widths": [width, base.layers[1].out_features]},
                        (784,), 10)
    with torch.no_grad():
        w, b = base.layers[0].weight[src], base.layers[0].bias[src]
        rms = torch.cat([w, b[:, None]], 1).pow(2).mean(1).sqrt()
        eps = noise * rms * (~first).float()
        model.layers[0].weight.copy_(w + eps[:, None] * torch.randn(w.shape, generator=gen))
        model.layers[0].bias.copy_(b + eps * torch.randn(b.shape, generator=gen))
        model.layers[1].weight.copy_(base.layers[1].weight[:, src] * (n0 / width))
        model.layers[1].bias.copy_(base.layers[1].bias)
        model.layers[2].load_state_dict(base.layers[2].state_dict())
    return model


def child(width: int, method: str, keep: float, cache: Path) -> dict:
    """One merge in this process; returns its measurements."""
    import resource

    import torch

    from hashexp.merge import calibration as cal
    from hashexp.merge import hashed as comp_mod
    from hashexp.metrics import accuracy

    torch.set_num_threads(1)  # a shared machine: two threads under oversubscription are 10-40x slower
    model = layer_pair(width, cache)
    data = _data()
    calib = data.x_train[cal.calibration_index(len(data.x_train), 1024, 0)]
    acc_before = accuracy(model, data.x_test, data.y_test)
    order_time = []
    inner = comp_mod.removal_order

    def timed(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        order_time.append(time.perf_counter() - t)
        return out

    comp_mod.removal_order = timed
    comp = comp_mod.HashCompressor(target_ratio=keep, min_width=1, seed=0, candidates="exact", sites=["fc1"],
                                   max_error=None, **METHODS[method])
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    reps = comp.compress(model, None, None, None, 0, calib=calib)
    merge_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"width": width, "method": method, "order_s": sum(order_time), "merge_s": merge_s,
            "peak_mb": peak - rss0, "acc_before": acc_before, "acc": accuracy(model, data.x_test, data.y_test),
            "after": reps[0].after, "error": reps[0].error, "threads": torch.get_num_threads()}


def run_child(width: int, method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(width), method, "--keep", str(args.keep), "--cache", str(args.cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exponent(rows: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(time) on log(width)."""
    xs = [math.log(w) for w, _ in rows]
    ys = [math.log(t) for _, t in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--exact-max", type=int, default=4096, help="skip exact/blocked above this width (too slow)")
    p.add_argument("--repeats-large", type=int, default=1, help="repeats from --large-from on")
    p.add_argument("--large-from", type=int, default=4096, help="width from which --repeats-large applies")
    p.add_argument("--resume", action="store_true", help="keep the widths already in <cache>/results.json")
    p.add_argument("--cache", type=Path, default=Path("/tmp/hashexp_bench_merge_cost"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_merge_cost.md")
    p.add_argument("--smoke", action="store_true", help="do not write the markdown")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--child", nargs=2, metavar=("WIDTH", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.keep, args.cache)))
        return
    done = args.cache / "results.json"
    results: list[dict] = json.loads(done.read_text()) if args.resume and done.exists() else []
    for w in args.widths:
        if any(r["width"] == w for r in results):
            continue
        base_model(args.cache)
        methods = [m for m in args.methods if m == "restricted" or w <= args.exact_max]
        reps = args.repeats if w < args.large_from else args.repeats_large
        for r in range(reps):
            for m in methods:  # interleaved: every method once per repeat
                res = run_child(w, m, args)
                results.append(res)
                print(f"width {w} {m} repeat {r}: order {res['order_s']:.2f}s merge {res['merge_s']:.2f}s "
                      f"peak +{res['peak_mb']:.0f} MB acc {100 * res['acc']:.2f}% (before {100 * res['acc_before']:.2f}%)"
                      f" error {res['error']:.4f}", flush=True)
        (args.cache / "results.json").write_text(json.dumps(results))
    if not args.smoke:
        args.out.write_text(report(results, args))
        print(f"wrote {args.out}")


def _med(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def report(results: list[dict], args) -> str:
    by = {}
    for r in results:
        by.setdefault((r["width"], r["method"]), []).append(r)
    widths = sorted({r["width"] for r in results})
    from harness import command_line

    cmd = "nice -n 10 " + command_line()
    lines = [
        "# Merge-cost scaling: exact vs blocked vs LSH-restricted removal order", "",
        f"Command: `{cmd}`", "",
        f"MLP 784-W-2048-10 synthesized from a trained 784-2048-2048-10 (3 epochs, Fashion-MNIST; fc1 resampled: "
        "a random subset below W=2048, noisy copies (10% RMS noise) of the trained neurons from 2048 on; see "
        "`layer_pair`); site fc1 "
        f"(W neurons, consumer fc2 with 2048 outputs) merged in one shot to keep {args.keep:.0%} of its width "
        "(least squares on 1024 calibration samples, candidates=exact, no fine-tuning). Each merge in a fresh "
        "process, methods interleaved per repeat; times median [min, max] over repeats "
        f"({args.repeats} below {args.large_from}, {args.repeats_large} from {args.large_from}), one torch thread per merge, on a shared 2-core machine. "
        f"exact and blocked are skipped above width {args.exact_max} (their width^3 cost). "
        "Speed columns are ratios of medians measured side by side in the same run.", "",
        "| width | method | order s | merge s | exact/method order time | peak MB | test acc % (before) | Δ acc vs exact pp | refit error |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in widths:
        ex = by.get((w, "exact"))
        for m in METHODS:
            rs = by.get((w, m))
            if not rs:
                continue
            o = [r["order_s"] for r in rs]
            ratio = f"{statistics.median([r['order_s'] for r in ex]) / statistics.median(o):.2f}x" if ex else "—"
            d = f"{100 * (rs[0]['acc'] - ex[0]['acc']):+.2f}" if ex else "—"
            lines.append(f"| {w} | {m} | {_med(o)} | {_med([r['merge_s'] for r in rs])} | {ratio} | "
                         f"{statistics.median([r['peak_mb'] for r in rs]):.0f} | {100 * rs[0]['acc']:.2f} "
                         f"({100 * rs[0]['acc_before']:.2f}) | {d} | {rs[0]['error']:.4f} |")
    lines += ["", "## Exponent of order time vs width (least-squares slope of log time on log width, widths >= 1024)", ""]
    for m in METHODS:
        pts = [(w, statistics.median([r["order_s"] for r in by[(w, m)]])) for w in widths if (w, m) in by and w >= 1024]
        if len(pts) >= 2:
            lines.append(f"- {m}: time ~ width^{exponent(pts):.2f} (widths {pts[0][0]}-{pts[-1][0]})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
