"""The CUDA paths of the framework: surgery, training with rehashes and one-shot compression on a GPU.

Skipped where torch sees no CUDA device (CI has none); run them on a GPU machine with
``pytest -m gpu tests``. The CuPy fingerprint kernel has its own GPU tests in test_lsh.py.
Every test here checks the GPU against the CPU path or against exact expectations, not just
that it runs.
"""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, read_metrics, run_app, run_dirs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def no_tf32():
    """Full-precision float32 convolutions and matmuls on the GPU, so CPU and GPU agree to rounding.

    With TF32 (cuDNN's default for convolutions) one backward pass already puts the stem's
    weight gradient about 1e-2 relative away from the CPU's, which has nothing to do with merging.
    """
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_planted_resnet_merge_on_cuda_matches_cpu(no_tf32):
    """Planted duplicate channels merge on the GPU exactly as on the CPU, optimizer state included."""
    from test_resnet import SMALL, _planted_resnet20, labels_from_pairs, rel_err, sites_by_name, state_shapes_ok

    from hashexp.merge.surgery import apply_plan, merge_plan

    planted, plan = _planted_resnet20(2.5)
    x = torch.randn(8, *SMALL, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(4))
    results = {}
    for dev in ("cpu", "cuda"):
        model = copy.deepcopy(planted).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: a step fills momentum only
        model.train()
        F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            ref = model(x.to(dev))
        gen = torch.Generator().manual_seed(2)
        for name, pairs in plan.items():
            site = sites_by_name(model)[name]
            mass = (0.1 + torch.rand(site.width, generator=gen)).to(dev)
            apply_plan(site, merge_plan(site, labels_from_pairs(site.width, pairs), mass), optimizer=opt)
        with torch.no_grad():
            out = model(x.to(dev))
        assert rel_err(out, ref) < 1e-4
        state_shapes_ok(model, opt)
        assert all(p.device.type == dev for p in model.parameters())
        assert all(st["momentum_buffer"].device.type == dev for st in opt.state.values())
        results[dev] = (model, opt)
    (mc, oc), (mg, og) = results["cpu"], results["cuda"]
    assert mc.widths() == mg.widths()
    for (n, pc), pg in zip(mc.named_parameters(), mg.parameters()):
        assert torch.allclose(pc, pg.cpu(), rtol=1e-4, atol=1e-5), n
        assert torch.allclose(oc.state[pc]["momentum_buffer"], og.state[pg]["momentum_buffer"].cpu(),
                              rtol=1e-3, atol=1e-5), n


def test_resnet20_preset_trains_and_rehashes_on_cuda(tmp_path):
    """The ResNet preset on the GPU: same rehash steps as on the CPU, channels go down, it keeps learning."""
    from test_resnet_train import write_images

    images = write_images(tmp_path / "images.npz")
    run_app(tmp_path, [
        "experiment=resnet20_fmnist", "dataset=npz", f"dataset.path={images}", "trainer.device=cuda",
        "dataset.augment={crop_padding:2,hflip:false}", "trainer.epochs=3", "trainer.batch_size=64",
        "trainer.logging.every=2", "trainer.logging.progress=log", "trainer.bn_recalib_batches=4", "trainer.optimizer.lr=0.05",
        "schedule.unit=step", "schedule.start=6", "schedule.every=4", "schedule.max_rehashes=3", "hashing.max_error=0.5",
    ])
    (rd,) = run_dirs(tmp_path)
    m = read_metrics(rd)
    assert m["status"] == "ok" and m["rehashes"] == 3 and [e["step"] for e in m["rehash_events"]] == [6, 10, 14]
    before, after = m["widths_before"], m["widths"]
    assert all(after[k] <= before[k] for k in before) and after["stream3"] <= 48 and after["layer2.0.inner"] <= 24
    steps = [r for r in csv.DictReader((rd / "history.csv").open()) if r["kind"] == "step"]
    losses = [float(r["loss"]) for r in steps]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.4
    assert m["test_acc"] > m["majority_acc"]
    ck = torch.load(rd / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["model"]["widths"] == after


@pytest.mark.parametrize("hashing,schedule", [("learnable", "fixed"), ("simhash", "drift")])
def test_mlp_schedules_and_learnable_hash_on_cuda(tmp_path, hashing, schedule):
    """Issue-5 strategies on the GPU: the learnable hash trains and merges; drift checks log and fire."""
    run_app(tmp_path, TINY + ["trainer.device=cuda", "trainer.epochs=2", f"hashing={hashing}", f"schedule={schedule}",
                              "schedule.unit=step", "schedule.start=5", "schedule.every=10", "hashing.max_error=0.5",
                              "hashing.target_ratio=0.7", "schedule.max_rehashes=2"]
            + (["hashing.updates=10"] if hashing == "learnable" else
               ["schedule.check_every=5", "schedule.min_interval=5", "schedule.flip_threshold=0.0"]))
    (rd,) = run_dirs(tmp_path)
    m = read_metrics(rd)
    assert m["status"] == "ok" and m["rehashes"] == 2
    assert m["widths"]["fc1"] < 32 and m["widths"]["fc2"] < 32 and m["hash_time_s"] > 0
    assert m["test_acc"] > m["majority_acc"]
    if schedule == "drift":
        drift = [r for r in csv.DictReader((rd / "history.csv").open()) if r["kind"] == "drift"]
        assert {r["drift/site"] for r in drift} == {"fc1", "fc2"}
        assert any(r["drift/rehashed"] == "1" for r in drift)


def test_one_shot_compress_on_cuda_matches_cpu_widths(tmp_path):
    """compress_model on the GPU picks the same groups as on the CPU (hashing runs on CPU copies)."""
    from test_resnet_train import _model, write_images

    from hashexp.compress import compress_model
    from hashexp.data.npz import load_npz

    data = load_npz(str(write_images(tmp_path / "images.npz")), seed=0)
    torch.manual_seed(0)
    base = _model()
    reports = {}
    for dev in ("cpu", "cuda"):
        model = copy.deepcopy(base).to(dev)
        model, rep = compress_model(model, data.to(dev), "simhash", keep=0.5, threshold=-1.0, calib_batches=2,
                                    batch_size=64, seed=0, bits=4, tables=16)
        assert all(p.device.type == dev for p in model.parameters())
        reports[dev] = rep
    assert reports["cuda"]["after"]["widths"] == reports["cpu"]["after"]["widths"]
    assert reports["cuda"]["after"]["flops"] == reports["cpu"]["after"]["flops"] < 0.5 * reports["cpu"]["before"]["flops"]
    assert abs(reports["cuda"]["after"]["test_acc"] - reports["cpu"]["after"]["test_acc"]) <= 0.02
