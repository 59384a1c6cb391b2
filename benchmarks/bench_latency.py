"""Benchmark: do fewer FLOPs become time? Merged vs vanilla MLPs, forward and training step, CPU.

Command (writes benchmarks/bench_latency.md; about 6 minutes; ``--batches 1 32 --budget 0.05 --out X`` is a
quick check):

    taskset -c 1 .venv/bin/python benchmarks/bench_latency.py

Networks (hashexp.models.MLP, ReLU, Fashion-MNIST input 784, 10 classes):
- vanilla 784-2048-2048-10, the fmnist_mlp2048 preset;
- merged to 4x fewer FLOPs: 870-870 (what a rehash schedule reaches after one or two merges);
- merged to 12.3x fewer FLOPs: 401-389, the final widths of the hashed runs in
  benchmarks/bench_mlp_merge.md;
- the same two, widths rounded to multiples of 8 (872-872, 400-392), to see whether alignment
  matters here (``hashing.round_to``).

Each cell is ``hashexp.metrics.compare_latency``: all four networks take turns, one call each
per round (a busy machine slows them alike), median over the rounds; ``forward`` = eval-mode
forward without autograd, ``train`` = forward + cross-entropy + backward + Adam step. Batch
sizes 1, 32, 256, 1024. One thread (taskset -c 1, torch.set_num_threads(1)): another process
benchmarks on the other core of this 2-core machine. "time ratio" = vanilla time / merged time;
"of FLOPs ratio" = time ratio / FLOPs ratio, the share of the FLOP reduction that became time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from harness import command_line, load_average, write_markdown  # noqa: E402  (puts this checkout on sys.path)
from hashexp.metrics import compare_latency, count_flops  # noqa: E402
from hashexp.models.mlp import MLP  # noqa: E402

HERE = Path(__file__).resolve().parent
NETS = {"vanilla": (2048, 2048), "4x": (870, 870), "4x, x8": (872, 872), "12x": (401, 389), "12x, x8": (400, 392)}
BATCHES = (1, 32, 256, 1024)
BUDGET_S = 8.0  # time per cell for the slowest network (vanilla), from which the rounds follow


def build() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {k: MLP((784,), 10, widths=w) for k, w in NETS.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds per cell for vanilla (0.05: a quick check)")
    ap.add_argument("--out", default=str(HERE / "bench_latency.md"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load0 = load_average()
    models = build()
    flops = {k: count_flops(m, (784,)) for k, m in models.items()}
    cells = []
    for mode in ("forward", "train"):
        for b in a.batches:
            pilot = compare_latency({"vanilla": models["vanilla"]}, (784,), b, mode, repeats=3, warmup=1)
            per = pilot["vanilla"]["median_ms"] / 1e3
            repeats = int(min(300, max(7, a.budget / max(per, 1e-6))))
            res = compare_latency(models, (784,), b, mode, repeats=repeats, warmup=3)
            cells.append((mode, b, repeats, res))
            print(mode, b, repeats, {k: round(v["median_ms"], 3) for k, v in res.items()}, flush=True)
    write_md(a.out, flops, cells, load0, time.perf_counter() - t_start)
    return 0


def write_md(out, flops, cells, load0, total) -> None:
    van = flops["vanilla"]
    note = ("**One thread** (taskset -c 1, torch.set_num_threads(1): another process benchmarks on the other core); "
            f"load average (1 min) at start / end {load0:.1f} / {load_average():.1f}; total {total / 60:.1f} min. "
            "See the script's docstring for the networks and the method.")
    L = ["| network | widths | FLOPs / sample | FLOPs ratio |", "|---|---|---:|---:|"]
    for k, w in NETS.items():
        L.append(f"| {k} | 784-{w[0]}-{w[1]}-10 | {flops[k] / 1e6:.2f} M | {van / flops[k]:.2f}x |")
    L.append("")
    for mode in ("forward", "train"):
        L.append(f"## {'Forward (eval, no autograd)' if mode == 'forward' else 'Training step (forward, loss, backward, Adam)'}\n")
        L.append("| batch | rounds | vanilla ms | " + " | ".join(f"{k} ms | {k} time ratio (of FLOPs ratio)" for k in NETS if k != "vanilla") + " |")
        L.append("|---:|---:|---:|" + "---:|---:|" * (len(NETS) - 1))
        for m, b, reps, res in cells:
            if m != mode:
                continue
            v = res["vanilla"]["median_ms"]
            parts = [f"{b:,}", f"{reps}", f"{v:.3f}" if v < 10 else f"{v:.1f}"]
            for k in NETS:
                if k == "vanilla":
                    continue
                t = res[k]["median_ms"]
                ratio = v / t
                parts += [f"{t:.3f}" if t < 10 else f"{t:.1f}", f"**{ratio:.2f}x** ({100 * ratio / (van / flops[k]):.0f}%)"]
            L.append("| " + " | ".join(parts) + " |")
        L.append("")
    L.append("## Where fewer FLOPs become time\n")
    for mode in ("forward", "train"):
        for k in ("4x", "12x"):
            shares = [(b, res["vanilla"]["median_ms"] / res[k]["median_ms"] / (van / flops[k]))
                      for m, b, _, res in cells if m == mode]
            L.append(f"- {mode}, {k} fewer FLOPs: " + ", ".join(f"batch {b}: {100 * s:.0f}%" for b, s in shares)
                     + " of the FLOP reduction became time.")
    write_markdown(out, "Latency: merged vs vanilla MLPs on the CPU, side by side", L, notes=[note],
                   command="taskset -c 1 " + command_line())
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
