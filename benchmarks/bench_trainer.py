"""Trainer overhead: one epoch of hashexp's Trainer vs a bare PyTorch loop on the same tensors.

    .venv/bin/python benchmarks/bench_trainer.py            # writes benchmarks/bench_trainer.md

Fashion-MNIST, MLP 784-256-256-10, batch 256, Adam. Both contenders train the same model from
the same initial weights on the same in-memory tensors; they alternate, several rounds, and the
ratio is taken per round (side by side, so machine noise hits both). Goal: overhead < 1.3x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hashexp.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from hashexp.models import build_model  # noqa: E402
from hashexp.train import Trainer  # noqa: E402

MLP = {"_target_": "hashexp.models.mlp.MLP", "widths": [256, 256]}


def bare_epoch(model, x, y, batch, seed):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        idx = perm[i:i + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def trainer_epoch(model, data, batch, seed, run_dir):
    tr = Trainer(model, data, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), epochs=1, batch_size=batch,
                 run_dir=run_dir, seed=seed, progress="none", checkpoint=False)
    tr.fit()
    return tr.timer.get("fit") - tr.timer.get("eval")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    a = ap.parse_args()
    data = load_fashion_mnist(augment=None)
    x, y = data.x_train, data.y_train
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up both paths once (allocator, kernels)
        torch.manual_seed(0)
        bare_epoch(build_model(MLP, data.input_shape, data.num_classes), x[:4096], y[:4096], a.batch, 0)
        trainer_epoch(build_model(MLP, data.input_shape, data.num_classes), data, a.batch, 0, tmp)
        for r in range(a.rounds):
            torch.manual_seed(r)
            m1 = build_model(MLP, data.input_shape, data.num_classes)
            m2 = build_model(MLP, data.input_shape, data.num_classes)
            m2.load_state_dict(m1.state_dict())
            order = [("bare", m1), ("trainer", m2)] if r % 2 == 0 else [("trainer", m2), ("bare", m1)]
            t = {}
            for name, m in order:
                t[name] = bare_epoch(m, x, y, a.batch, r) if name == "bare" else trainer_epoch(m, data, a.batch, r, tmp)
            rows.append((r, t["bare"], t["trainer"], t["trainer"] / t["bare"]))
    ratios = [row[3] for row in rows]
    med = statistics.median(ratios)
    lines = [
        "# Trainer overhead vs a bare PyTorch loop",
        "",
        "Command: `.venv/bin/python benchmarks/bench_trainer.py`",
        "",
        f"Fashion-MNIST train split (60,000), MLP 784-256-256-10, batch {a.batch}, Adam, one epoch each, "
        f"{a.rounds} alternating rounds, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Trainer time excludes its end-of-epoch evaluation (the bare loop does none); it includes "
        "history.csv rows with per-layer weight and gradient norms every 20 steps.",
        "",
        "| round | bare loop (s) | hashexp Trainer (s) | ratio |",
        "|---:|---:|---:|---:|",
        *[f"| {r} | {b:.2f} | {t:.2f} | {q:.3f} |" for r, b, t, q in rows],
        "",
        f"**Median ratio: {med:.3f}x** (goal < 1.3x; min {min(ratios):.3f}, max {max(ratios):.3f}).",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
