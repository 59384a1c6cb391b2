"""Benchmark: do the merged widths become latency in a deployment runtime? onnxruntime, CPU.

Command (writes benchmarks/bench_deploy.md; 2-5 minutes):

    nice -n 10 .venv/bin/python benchmarks/bench_deploy.py

Cases (Fashion-MNIST inputs, 10 classes), each vanilla vs the widths its hashed run reached, and
those widths rounded up to multiples of 8 (what ``hashing.round_to=8`` ends at):
- headline MLP 784-256-256-10 -> 124-42 (bench_headline.md, seed 0);
- the 2048 preset 784-2048-2048-10 (``experiment=fmnist_mlp2048``) -> 401-389 (bench_mlp_merge.md);
- ResNet-20 (1x28x28) -> the final widths of bench_resnet.md's hashed run (seed 0, 15 epochs).

The models are built at those widths (random init: a dense kernel's time does not depend on the
weight values), exported with ``hashexp.export.export_model`` (ONNX, dynamic batch, checked
against PyTorch with onnxruntime on the way) and run by onnxruntime's CPU provider with one
intra-op thread (five processes share this 2-core machine). Per batch size (1, 32, 256) the
three sessions of a case are timed with ``harness.interleave``: one call each per round, in a
rotated order, so a busy machine slows them alike; each cell is the median over the rounds with
the min and max. "time ratio" = median of the per-round ratios vanilla / merged (side by side);
"share" = time ratio / FLOPs ratio, how much of the FLOP reduction became latency (the goal:
>= 70% at batch >= 32). ``--budget 0.5 --out X`` is a quick check.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import Timings, command_line, interleave, load_average, write_markdown  # noqa: E402  (puts this checkout on sys.path)
from hashexp.export import export_model  # noqa: E402
from hashexp.metrics import count_flops  # noqa: E402
from hashexp.models.mlp import MLP  # noqa: E402
from hashexp.models.resnet import ResNet20  # noqa: E402

HERE = Path(__file__).resolve().parent

BATCHES = (1, 32, 256)
BUDGET_S = 8.0  # seconds per cell for the slowest (vanilla) session, from which the rounds follow
RESNET_FINAL = {"layer1.0.inner": 10, "layer1.1.inner": 9, "layer1.2.inner": 8, "layer2.0.inner": 14,
                "layer2.1.inner": 15, "layer2.2.inner": 16, "layer3.0.inner": 27, "layer3.1.inner": 35,
                "layer3.2.inner": 27, "stream1": 12, "stream2": 21, "stream3": 41}


def round_up(widths: dict[str, int], to: int = 8) -> dict[str, int]:
    """What ``hashing.round_to`` ends a changed site at: the next multiple of ``to``."""
    return {k: -(-w // to) * to for k, w in widths.items()}


def cases() -> dict[str, tuple[tuple[int, ...], dict[str, torch.nn.Module]]]:
    """case -> (input shape, {vanilla, hashed, hashed x8: model})."""
    torch.manual_seed(0)

    def mlp(w1, w2):
        return MLP((1, 28, 28), 10, widths=[w1, w2])

    def mlp_case(full, merged):
        r = round_up({"fc1": merged[0], "fc2": merged[1]})
        return {"vanilla": mlp(*full), "hashed": mlp(*merged), "hashed x8": mlp(r["fc1"], r["fc2"])}

    resnets = {"vanilla": ResNet20((1, 28, 28), 10), "hashed": ResNet20((1, 28, 28), 10, site_widths=RESNET_FINAL),
               "hashed x8": ResNet20((1, 28, 28), 10, site_widths=round_up(RESNET_FINAL))}
    return {"headline MLP 256-256": ((1, 28, 28), mlp_case((256, 256), (124, 42))),
            "2048 preset": ((1, 28, 28), mlp_case((2048, 2048), (401, 389))),
            "ResNet-20": ((1, 28, 28), resnets)}


def session(path: str):
    """An onnxruntime CPU session with one intra-op thread and all graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, x: np.ndarray, rounds: int, warmup: int = 3) -> Timings:
    """``harness.interleave`` over the sessions' calls on ``x``: ``rounds`` timed rounds after ``warmup``."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}

    def call(k: str):
        def fn(r: int) -> None:  # returns None: the harness times the call
            sessions[k].run(None, feeds[k])
        return fn

    return interleave({k: call(k) for k in sessions}, repeats=rounds, warmup=warmup)


def main() -> int:
    """Export every case's models, time them side by side per batch size, write the markdown."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds per cell for vanilla (0.5: a quick check)")
    ap.add_argument("--out", default=str(HERE / "bench_deploy.md"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t_start, load0 = time.perf_counter(), load_average()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (shape, models) in cases().items():
            flops = {k: count_flops(m, shape) for k, m in models.items()}
            widths = {k: dict(m.widths()) for k, m in models.items()}
            sessions, diffs = {}, {}
            for k, m in models.items():
                path = os.path.join(tmp, f"{case}-{k}.onnx".replace(" ", "_"))
                rep = export_model(m.eval(), torch.randn(2, *shape), path, check_input=torch.randn(64, *shape))
                sessions[k], diffs[k] = session(path), rep.max_abs_diff
            for b in BATCHES:
                x = np.random.default_rng(b).standard_normal((b, *shape), dtype=np.float32)
                pilot = interleaved({"vanilla": sessions["vanilla"]}, x, rounds=3, warmup=1)["vanilla"]
                rounds = int(min(400, max(15, a.budget / max(pilot.median, 1e-6))))
                times = interleaved(sessions, x, rounds)
                results.append((case, b, rounds, flops, widths, diffs, times))
                print(case, b, rounds, {k: round(1e3 * t.median, 3) for k, t in times.timings.items()}, flush=True)
    write_md(a.out, results, load0, time.perf_counter() - t_start)
    return 0


def _ms(t: float) -> str:
    return f"{1e3 * t:.3f}" if t < 0.01 else f"{1e3 * t:.2f}" if t < 0.1 else f"{1e3 * t:.1f}"


def _widths(w: dict[str, int]) -> str:
    if len(w) <= 2:
        return "-".join(str(v) for v in w.values())
    return f"{sum(w.values())} channels over {len(w)} sites"


def write_md(out: str, results, load0: float, total: float) -> None:
    """The markdown: per case the networks, the per-batch timings, and the share summary."""
    import onnxruntime as ort

    note = (f"Cores shared with other jobs, onnxruntime {ort.__version__} "
            f"(CPUExecutionProvider, **one intra-op thread**, all graph optimizations); "
            f"load average (1 min) at start / end {load0:.1f} / {load_average():.1f}; total {total / 60:.1f} min. "
            "Models at the widths the hashed runs reached (random init; see the script's docstring), exported with "
            "`hashexp.export.export_model` (every file matched PyTorch within 1e-4 before it was timed). "
            "Cells: median ms over interleaved rounds (harness.interleave) [min, max]; time ratio = median of the "
            "per-round ratios vanilla / merged; share = time ratio / FLOPs ratio.")
    L = []
    seen = set()
    for case, b, rounds, flops, widths, diffs, times in results:
        if case not in seen:
            seen.add(case)
            L += [f"## {case}\n", "| network | widths | FLOPs / sample | FLOPs ratio | export max abs diff |",
                  "|---|---|---:|---:|---:|"]
            for k in flops:
                L.append(f"| {k} | {_widths(widths[k])} | {flops[k] / 1e6:.2f} M | "
                         f"{flops['vanilla'] / flops[k]:.2f}x | {diffs[k]:.1e} |")
            L += ["", "| batch | rounds | vanilla ms | hashed ms | time ratio (share) | hashed x8 ms | "
                  "time ratio (share) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        cells = [f"{b}", f"{rounds}"]
        for k in ("vanilla", "hashed", "hashed x8"):
            cells.append(f"{_ms(times[k].median)} [{_ms(times[k].min)}, {_ms(times[k].max)}]")
            if k != "vanilla":
                ratio = times.ratio("vanilla", k).median
                cells.append(f"**{ratio:.2f}x** ({100 * ratio / (flops['vanilla'] / flops[k]):.0f}%)")
        L.append("| " + " | ".join(cells) + " |")
        if b == BATCHES[-1]:
            L.append("")
    L += ["## How much of the FLOPs cut became latency (goal: >= 70% at batch >= 32)\n",
          "Two readings of one measurement: share of the ratio = (vanilla / hashed time) / (vanilla / hashed "
          "FLOPs); share of the saving = (1 - hashed / vanilla time) / (1 - hashed / vanilla FLOPs).\n",
          "| case | batch 1: ratio, saving | batch 32: ratio, saving | batch 256: ratio, saving |",
          "|---|---:|---:|---:|"]
    for case in dict.fromkeys(r[0] for r in results):
        for k in ("hashed", "hashed x8"):
            parts = []
            for c, b, _, flops, _, _, times in results:
                if c == case:
                    t = times.ratio(k, "vanilla").median
                    f = flops[k] / flops["vanilla"]
                    parts.append(f"{100 * f / t:.0f}%, {100 * (1 - t) / (1 - f):.0f}%")
            L.append(f"| {case}, {k} | " + " | ".join(parts) + " |")
    write_markdown(out, "Deployment latency: vanilla vs hashed widths in onnxruntime (CPU)", L, notes=[note],
                   command="nice -n 10 " + command_line())
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
