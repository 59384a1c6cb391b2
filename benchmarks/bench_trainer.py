"""Trainer overhead: one epoch of hashexp's Trainer vs a bare PyTorch loop on the same tensors.

    .venv/bin/python benchmarks/bench_trainer.py            # writes benchmarks/bench_trainer.md

Fashion-MNIST, MLP 784-256-256-10, batch 256, Adam. Both contenders train the same model from
the same initial weights on the same in-memory tensors; they alternate, several rounds
(benchmarks/harness.py), and the ratio is taken per round (side by side, so machine noise hits
both). Goal: overhead < 1.3x. ``--rounds 1 --subset 4096`` is the quick check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import interleave, write_markdown  # noqa: E402  (puts this checkout on sys.path)
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
                 run_dir=run_dir, seed=seed, logging={"progress": "none"}, checkpoint=False)
    tr.fit()
    return tr.timer.get("fit") - tr.timer.get("eval")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--subset", type=int, default=None, help="train on the first N samples only (a quick check)")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    a = ap.parse_args()
    data = load_fashion_mnist(augment=None, subset_train=a.subset)
    x, y = data.x_train, data.y_train
    models: dict[int, tuple] = {}

    def pair(r: int) -> tuple:  # both contenders start round r from the same initial weights
        if r not in models:
            torch.manual_seed(max(r, 0))
            m1 = build_model(MLP, data.input_shape, data.num_classes)
            m2 = build_model(MLP, data.input_shape, data.num_classes)
            m2.load_state_dict(m1.state_dict())
            models[r] = (m1, m2)
        return models[r]

    with tempfile.TemporaryDirectory() as tmp:
        t = interleave({"bare": lambda r: bare_epoch(pair(r)[0], x, y, a.batch, max(r, 0)),
                        "trainer": lambda r: trainer_epoch(pair(r)[1], data, a.batch, max(r, 0), tmp)},
                       repeats=a.rounds, warmup=1)
    ratio = t.ratio("trainer", "bare")
    body = [
        f"Fashion-MNIST train split ({len(x):,}), MLP 784-256-256-10, batch {a.batch}, Adam, one epoch each, "
        f"{a.rounds} interleaved rounds after one warm-up round (benchmarks/harness.py), {t.load_note()}. "
        "Trainer time excludes its end-of-epoch evaluation (the bare loop does none); it includes "
        "history.csv rows with per-layer weight and gradient norms every 20 steps.",
        "",
        "| round | bare loop (s) | hashexp Trainer (s) | ratio |",
        "|---:|---:|---:|---:|",
        *[f"| {r} | {b:.2f} | {tr:.2f} | {q:.3f} |"
          for r, (b, tr, q) in enumerate(zip(t["bare"].times, t["trainer"].times, ratio.times))],
        "",
        f"**Median ratio: {ratio.median:.3f}x** (goal < 1.3x; min {ratio.min:.3f}, max {ratio.max:.3f}).",
    ]
    print(write_markdown(a.out, "Trainer overhead vs a bare PyTorch loop", body))


if __name__ == "__main__":
    main()
