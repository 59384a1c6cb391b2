"""ResNet-20 compressed end to end: the app trains and rehashes it, and one-shot compression shrinks it.

The data is a small learnable image set written to an .npz (512 train / 256 test 1x16x16 images,
10 classes: a fixed random template per class plus noise, shifted by the augmentation), so the
tests need no download and stay fast on 2 cores. The app run uses the experiment preset
``resnet20_fmnist`` with only the data and the clock made small, so the preset itself is what
is tested: SGD with momentum, augmentation, hashed channel merging on stream and block-internal
sites, BN recalibration after every rehash.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CONF, compose, read_metrics, run_app, run_dirs
from hashexp.app import build_rehasher
from hashexp.compress import compress_model
from hashexp.metrics import accuracy
from hashexp.data import BatchIterator
from hashexp.data.npz import load_npz
from hashexp.merge.baselines import MagnitudePruner
from hashexp.merge.hashed import HashCompressor
from hashexp.metrics import count_flops
from hashexp.models import build_model, load_model

SHAPE = (1, 16, 16)


def write_images(path: Path, n_train: int = 512, n_test: int = 256, seed: int = 0) -> Path:
    """Class templates (smoothed noise) plus pixel noise: learnable in a few steps, not trivial."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((10, *SHAPE)).astype(np.float32)
    # 3x3 box blur so the templates have spatial structure convolutions can pick up
    tp = np.pad(t, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="wrap")
    t = sum(tp[:, :, i:i + 16, j:j + 16] for i in range(3) for j in range(3)) / 3.0

    def draw(n):
        y = rng.integers(0, 10, n)
        x = t[y] + 0.8 * rng.standard_normal((n, *SHAPE)).astype(np.float32)
        return x.astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "images.npz")


def test_preset_composes_with_its_command():
    lines = (CONF / "experiment" / "resnet20_fmnist.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# python -m hashexp experiment=resnet20_fmnist")
    cfg = compose(["experiment=resnet20_fmnist"])
    assert cfg.model.name == "resnet20" and cfg.dataset.name == "fashion_mnist"
    assert cfg.trainer.name == "sgd" and cfg.trainer.augment is True and cfg.trainer.optimizer.momentum > 0
    assert 10 <= cfg.trainer.bn_recalib_batches <= 50 and cfg.hashing.bn_recalib_batches == cfg.trainer.bn_recalib_batches
    assert cfg.hashing.name == "simhash" and cfg.hashing.min_width >= 4
    assert cfg.schedule.max_rehashes >= 1
    assert isinstance(build_rehasher(cfg.hashing, 0).compressor, HashCompressor)
    # the baselines the preset's comment names compose and build (they accept and ignore the hash knobs)
    assert build_rehasher(compose(["experiment=resnet20_fmnist", "hashing=none"]).hashing, 0) is None
    c = compose(["experiment=resnet20_fmnist", "hashing=magnitude", "hashing.width_plan=null"])
    mp = build_rehasher(c.hashing, 0).compressor
    assert isinstance(mp, MagnitudePruner) and c.model.name == "resnet20" and mp.ignored_knobs == {"bits": 4, "tables": 16}


@pytest.mark.slow
def test_resnet20_trains_and_rehashes_via_app(tmp_path, images):
    """Three short epochs with three step rehashes: channels and FLOPs go down, training goes on."""
    run_app(tmp_path, [
        "experiment=resnet20_fmnist", "dataset=npz", f"dataset.path={images}",
        "dataset.augment={crop_padding:2,hflip:false}",
        "trainer.epochs=3", "trainer.batch_size=64", "trainer.logging.every=2", "trainer.logging.progress=log",
        "trainer.bn_recalib_batches=4", "trainer.optimizer.lr=0.05",
        "schedule.unit=step", "schedule.start=6", "schedule.every=4", "schedule.max_rehashes=3",
        # a few steps from its random init: let the per-rehash target decide (a loose error budget;
        # the cheapest channels by measured error still go first)
        "hashing.max_error=0.5",
    ])
    (rd,) = run_dirs(tmp_path)
    m = read_metrics(rd)
    assert m["model"] == "resnet20" and m["hashing"] == "simhash"
    assert m["rehashes"] == 3 and [e["step"] for e in m["rehash_events"]] == [6, 10, 14]
    before, after = m["widths_before"], m["widths"]
    assert before["stream1"] == 16 and before["stream3"] == 64 and before["layer2.1.inner"] == 32
    assert set(after) == set(before) and all(after[k] <= before[k] for k in before)
    assert all(after[k] >= 4 for k in after)  # the preset's min_width
    # a 0.75 target per rehash (the preset's), streams included
    shrunk = [k for k in before if after[k] < before[k]]
    assert len(shrunk) >= 6 and any(k.startswith("stream") for k in shrunk)
    assert after["stream3"] <= 64 * 0.75 and after["layer2.0.inner"] <= 32 * 0.75
    rows = list(csv.DictReader((rd / "history.csv").open()))
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(epochs) == 3 and int(float(epochs[-1]["flops"])) == m["flops"]
    assert m["flops"] < 0.8 * _flops_at(before)
    assert m["params"] < sum(p.numel() for p in _model(before).parameters())
    assert all(math.isfinite(float(r["loss"])) for r in steps)
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["test_loss"])
    # it keeps learning through the merges (train-mode loss; this early, at this LR, BN running
    # averages lag the weights, so eval accuracy is far below train-mode accuracy, yet above majority)
    losses = [float(r["loss"]) for r in steps]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.4
    assert m["test_acc"] > m["majority_acc"]
    # history.csv: a width column per site, changing at the rehash rows, never growing
    for k in shrunk:
        ws = [int(r[f"width/{k}"]) for r in steps]
        assert ws[0] == before[k] and ws[-1] == after[k]
        assert all(a >= b for a, b in zip(ws, ws[1:]))
    assert [int(r["step"]) for r in steps if r["rehash"] == "1"] == [6, 10, 14]
    assert all(float(r["hash_time_s"]) > 0 for r in steps if r["rehash"] == "1")
    # SGD momentum carried through the surgery: the optimizer still holds one momentum buffer per
    # parameter, each remapped to the merged shape (unit-level values: test_merge.py)
    ck = torch.load(rd / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = _model(ck["model"]["widths"])
    model.load_state_dict(ck["model"]["state_dict"])
    params = list(model.parameters())
    state = ck["optimizer"]["state"]
    assert len(ck["optimizer"]["param_groups"][0]["params"]) == len(params)
    assert len(state) == len(params)
    for i, p in enumerate(params):
        buf = state[i]["momentum_buffer"]
        assert buf.shape == p.shape and torch.isfinite(buf).all()
    assert all(float(state[i]["momentum_buffer"].abs().sum()) > 0 for i in range(len(params)))
    # model.pt rebuilds the merged network at its widths
    merged = load_model(rd / "model.pt")
    assert merged.widths() == after and count_flops(merged, SHAPE) == m["flops"]


def _model(widths=None):
    cfg = {"_target_": "hashexp.models.resnet.ResNet20", "name": "resnet20", "width_mult": 1.0}
    return build_model(cfg, SHAPE, 10, site_widths=widths)


def _flops_at(widths) -> int:
    return count_flops(_model(widths), SHAPE)


@pytest.mark.slow
def test_one_shot_compress_resnet20_keep_half(images, one_thread):
    """compress_model at keep=0.5 on a briefly trained ResNet-20: FLOPs drop ~4x, the model still works."""
    torch.manual_seed(0)
    data = load_npz(str(images), seed=0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for xb, yb in BatchIterator(data.x_train, data.y_train, 64, shuffle=True, generator=gen):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    before_w, flops0 = dict(model.widths()), count_flops(model, SHAPE)
    model, rep = compress_model(model, data, "simhash", keep=0.5, calib_batches=4, batch_size=64, seed=0,
                                bits=4, tables=16)
    after_w = model.widths()
    assert rep["before"]["flops"] == flops0 and rep["after"]["flops"] == count_flops(model, SHAPE)
    # every site at half its width (keep=0.5 of 16/32/64 is exact; LSH found enough candidates)
    assert after_w == {k: v // 2 for k, v in before_w.items()}
    assert rep["after"]["flops"] < 0.3 * flops0  # both sides of most convs halve: ~4x
    assert rep["after"]["params"] < 0.3 * rep["before"]["params"]
    # BN recalibrated: each BN's running statistics are those of its input on training data now
    # (the merged network's, not averages of the pre-merge channels')
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.num_features == bn.running_mean.numel() == bn.weight.numel() for bn in bns)
    seen = {}
    hooks = [bn.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, inp[0])) for bn in bns]
    model.eval()
    with torch.no_grad():
        model(data.x_train[:256])
    for h in hooks:
        h.remove()
    for bn in bns:
        x = seen[bn]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        sd = bn.running_var.sqrt()
        assert float(((mean - bn.running_mean).abs() / sd).max()) < 0.3
        assert 0.6 < float((var / bn.running_var).min()) and float((var / bn.running_var).max()) < 1.6
    model.eval()
    with torch.no_grad():
        out = model(data.x_test[:32])
    assert out.shape == (32, 10) and torch.isfinite(out).all()
    acc = accuracy(model, data.x_test, data.y_test)
    assert acc == pytest.approx(rep["after"]["test_acc"], abs=0.02)
    assert rep["majority_acc"] == pytest.approx(data.majority_acc("test"))
    # the merged model trains on (shapes consistent everywhere)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    loss = F.cross_entropy(model(data.x_train[:64]), data.y_train[:64])
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert math.isfinite(float(loss.detach()))
