"""Helpers the benchmark scripts share: one app run per directory, and mean ± sd formatting."""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))  # hashexp from this checkout

from hashexp.results import read_history, read_metrics  # noqa: E402  (re-exported for the scripts)

__all__ = ["PY", "ROOT", "fmt", "mean_std", "read_history", "read_metrics", "run", "trained_mlp_layers"]


def run(overrides: list[str], run_dir: Path) -> dict:
    """One `python -m hashexp` run into ``run_dir``; reused when its metrics.json exists (a rerun resumes)."""
    if (run_dir / "metrics.json").exists():
        return read_metrics(run_dir)
    cmd = [PY, "-m", "hashexp", *overrides, f"hydra.run.dir={run_dir}", "trainer.logging.progress=log",
           "trainer.checkpoint.enabled=false"]
    print("+", " ".join(shlex.quote(c) for c in cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    m = read_metrics(run_dir)
    print(f"  test_acc {m['test_acc']:.4f} flops {m['flops']:,} widths {m['widths']} wall {m['wall_time_s']:.1f}s "
          f"(process {time.perf_counter() - t0:.1f}s)", flush=True)
    return m


def mean_std(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if len(xs) == 1:
        return xs[0], 0.0
    return statistics.mean(xs), statistics.stdev(xs)


def fmt(xs, pct: bool = False, digits: int = 2) -> str:
    """'mean ± sd' of ``xs`` (as percentages with ``pct``)."""
    m, s = mean_std(xs)
    if pct:
        return f"{100 * m:.2f} ± {100 * s:.2f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def trained_mlp_layers(widths: tuple[int, int] = (2048, 2048), steps: int = 100, seed: int = 0) -> dict:
    """[w; b] rows (torch tensors) of both hidden layers of an MLP 784-w1-w2-10 after ``steps`` Adam
    steps on Fashion-MNIST (batch 256, lr 1e-3): real trained layers for the LSH benchmarks."""
    import torch
    from omegaconf import OmegaConf

    from hashexp.data import build_dataset

    data = build_dataset(OmegaConf.load(ROOT / "conf" / "dataset" / "fashion_mnist.yaml"), seed=seed)
    xtr, ytr = data.x_train.reshape(len(data.x_train), -1).float(), data.y_train.long()
    torch.manual_seed(seed)
    w1, w2 = widths
    net = torch.nn.Sequential(torch.nn.Linear(784, w1), torch.nn.ReLU(), torch.nn.Linear(w1, w2),
                              torch.nn.ReLU(), torch.nn.Linear(w2, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (256,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: torch.cat([m.weight, m.bias[:, None]], 1).detach().contiguous() for n, m in (("fc1", net[0]), ("fc2", net[2]))}
