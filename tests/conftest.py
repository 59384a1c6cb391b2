"""Shared fixtures: config composition and subprocess runs of the app in tmp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny, fast defaults for end-to-end runs on synthetic data.
TINY = ["dataset=synthetic", "dataset.n_samples=1200", "model.widths=[32,32]", "trainer.epochs=1",
        "trainer.batch_size=64", "trainer.logging.progress=log", "trainer.logging.every=5"]


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: in-process problems here are tiny, and the suite's
    workers share 2 cores, where more threads only oversubscribe them."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def compose(overrides: list[str] | None = None):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)


def run_app(tmp_path: Path, overrides: list[str], multirun: bool = False, check: bool = True,
            cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m hashexp` in a subprocess with outputs under tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    # PYTHONPATH: this checkout's hashexp, also where the venv holds another checkout's editable install
    env = dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "hashexp", *(["-m"] if multirun else []), *overrides]
    proc = subprocess.run(cmd, cwd=str(cwd or tmp_path), env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"hashexp failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "outputs").rglob("metrics.json"))


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


def tiny_vit(path, *extra: str, depth: int = 2) -> list[str]:
    """Overrides of a ViT small enough for a test (dim 16, 2 heads, patch 4) on the npz images at ``path``."""
    return ["dataset=npz", f"dataset.path={path}", "model=vit", "model.dim=16", f"model.depth={depth}",
            "model.heads=2", "model.patch=4", *extra]


class Killed(BaseException):
    """Stands for SIGKILL inside the test process (not an Exception: nothing may catch it)."""


def die_at_checkpoint(monkeypatch, n: int, torn_bytes: int | None = None):
    """Make the ``n``-th checkpoint write of the process raise :class:`Killed`.

    With ``torn_bytes`` the temp file is cut to that many bytes (a kill mid-write: checkpoint.pt
    keeps the previous state); without, the write completes and is renamed into place first (a
    kill right after a checkpoint). Returns the real ``torch.save`` to restore afterwards.
    """
    import torch

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **kw):
        if str(f).endswith("checkpoint.pt.tmp"):
            calls["n"] += 1
            if calls["n"] == n:
                real_save(obj, f, *a, **kw)
                if torn_bytes is not None:
                    Path(f).write_bytes(Path(f).read_bytes()[:torn_bytes])
                else:
                    Path(f).replace(Path(f).with_suffix(""))
                raise Killed()
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    return real_save


def killed_run(monkeypatch, cfg, run_dir, n: int, torn_bytes: int | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` until its ``n``-th checkpoint write kills it
    (:func:`die_at_checkpoint`), restore ``torch.save`` and return the checkpoint.pt left behind."""
    import torch

    from hashexp.app import train_run

    real_save = die_at_checkpoint(monkeypatch, n, torn_bytes=torn_bytes)
    with pytest.raises(Killed):
        train_run(cfg, str(run_dir))
    monkeypatch.setattr(torch, "save", real_save)
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


def images(n: int = 256, shape=(1, 8, 8), classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent blobs: a per-class mean image plus noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + 0.5 * torch.randn(n, *shape, generator=g), y


@pytest.fixture
def npz_images(tmp_path):
    """An .npz of 384 class-blob images (1x8x8, 4 classes): 320 to train, 64 to test."""
    x, y = images(384)
    path = tmp_path / "img.npz"
    np.savez(path, x_train=x[:320].numpy(), y_train=y[:320].numpy(), x_test=x[320:].numpy(), y_test=y[320:].numpy())
    return path
