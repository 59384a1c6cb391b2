"""Any model through one Python API and through the trainer: sites found by tracing, compressed
in one shot or while training, checkpointed, resumed and rebuilt from model.pt."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose, images, killed_run, tiny_vit
from hashexp import compress_model, find_sites
from hashexp.errors import ConfigError
from hashexp.merge.sites import model_widths
from hashexp.metrics import count_flops
from hashexp.models import build_model, load_model, save_model


def _vit_cfg(**kw):
    return {"_target_": "hashexp.models.vit.ViT", "dim": 16, "depth": 2, "heads": 2, "patch": 4, **kw}


class GeluMLP(nn.Module):
    """Linear -> GELU -> Linear -> GELU -> Linear: two GELU sites."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.out(F.gelu(self.fc2(F.gelu(self.fc1(x.flatten(1))))))


def test_compress_model_takes_a_plain_module_and_a_bare_tensor_and_leaves_it_unchanged():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 4))
    x, y = images(200)
    before = copy.deepcopy(m.state_dict())
    small, rep = compress_model(m, x, keep=0.5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the original is untouched
    assert small is not m
    assert rep["before"]["widths"] == {"1": 40, "3": 30}  # named by their producers' module paths
    assert rep["after"]["widths"] == {"1": 20, "3": 15}
    assert rep["after"]["flops"] == 2 * (64 * 20 + 20 * 15 + 15 * 4)
    assert count_flops(m, (1, 8, 8)) / count_flops(small, (1, 8, 8)) > 1.9
    assert "test_acc" not in rep["after"]  # no labels given
    # labels given: accuracy before/after on them
    _, rep2 = compress_model(m, (x, y), keep=0.5)
    assert 0.0 <= rep2["after"]["test_acc"] <= 1.0 and "test_acc" in rep2["before"]
    same, _ = compress_model(m, x, keep=0.5, inplace=True)
    assert same is m and model_widths(m) == rep["after"]["widths"]


def test_compress_model_accepts_a_dataloader_and_ignore_keeps_a_site():
    torch.manual_seed(0)
    m = GeluMLP()
    x, y = images(200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    names = [s.name for s in find_sites(m, x[:2]).sites]
    assert names == ["fc1", "fc2"]
    small, rep = compress_model(m, loader, keep=0.5, ignore=["fc2"])
    assert rep["after"]["widths"] == {"fc1": 24}  # an ignored site is no site: it keeps its width
    assert small.fc2.out_features == 32 and small.fc2.in_features == 24
    assert [r["site"] for r in rep["sites"]] == ["fc1"]
    assert small(x).shape == (200, 4)


def test_compress_model_errors_are_one_clear_message_each():
    torch.manual_seed(0)
    x = images(64)[0]

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, 2)

        def forward(self, z):
            return self.fc2(torch.relu(self.fc1(z.reshape(len(z), 63))))  # the failing line

    with pytest.raises(ConfigError, match=r"cannot trace Broken: at .*test_anymodel.py:\d+ \(return self.fc2.*"
                                          r"declare the sites"):
        compress_model(Broken(), x, keep=0.5)
    with pytest.raises(ConfigError, match="no mergeable site"):
        compress_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), x, keep=0.5)
    with pytest.raises(ConfigError, match=r"ignore names \['fc9'\], which match no site of GeluMLP; its sites are"):
        compress_model(GeluMLP(), x, keep=0.5, ignore=["fc9"])
    with pytest.raises(ConfigError, match=r"compensation=weights needs ReLU-like .* fc1 \(gelu\)"):
        compress_model(GeluMLP(), x, keep=0.5, compensation="weights")
    with pytest.raises(ConfigError, match=r"representative=mean needs ReLU-like"):
        compress_model(GeluMLP(), x, keep=0.5, representative="mean")


def test_vit_heads_and_ffn_sites_are_found_and_the_rest_refused():
    torch.manual_seed(0)
    m = build_model(_vit_cfg(), (1, 8, 8), 4)
    found = find_sites(m, torch.randn(2, 1, 8, 8))
    assert [(s.name, s.kind) for s in found.sites] == [
        ("blocks.0.attn.qkv", "heads"), ("blocks.0.mlp.fc1", "plain"), ("blocks.1.attn.qkv", "heads"),
        ("blocks.1.mlp.fc1", "plain")]
    ffn = [s for s in found.sites if s.kind == "plain"]
    assert all(s.width == 64 and s.activation == "gelu" for s in ffn)
    heads = [s for s in found.sites if s.kind == "heads"]  # 2 heads of 8: 16 features, lost 8 at a time
    assert all(s.width == 16 and s.group == 8 and s.producers[0].parts == 3 for s in heads)
    assert found.skipped  # the LayerNorm-ed residual stream, each with a reason
    assert all(s.reason for s in found.skipped)
    assert {s.name for s in found.skipped}.isdisjoint({s.name for s in found.sites})


def test_merged_vit_round_trips_through_model_pt(tmp_path):
    torch.manual_seed(0)
    x, y = images(256)
    m = build_model(_vit_cfg(), (1, 8, 8), 4)
    small, rep = compress_model(m, (x, y), keep=0.25, inplace=True)
    w = rep["after"]["widths"]  # FFN 64 -> 16; heads 16 features -> 4, rounded up to one head of 8
    assert w == {"blocks.0.attn.qkv": 8, "blocks.0.mlp.fc1": 16, "blocks.1.attn.qkv": 8, "blocks.1.mlp.fc1": 16}
    save_model(small, tmp_path / "model.pt")
    back = load_model(tmp_path / "model.pt")
    assert model_widths(back) == rep["after"]["widths"]
    small.eval()
    back.eval()
    torch.testing.assert_close(back(x), small(x))


def test_vit_trains_merges_checkpoints_and_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch, npz_images):
    from hashexp.app import train_run

    run = tiny_vit(npz_images, "trainer.epochs=3", "trainer.batch_size=32", "trainer.num_threads=1",
           "trainer.logging.progress=none", "trainer.logging.every=3", "hashing=simhash", "hashing.max_error=null",
           "hashing.target_ratio=0.8", "schedule.unit=step", "schedule.every=8", "schedule.start=4",
           "trainer.checkpoint.every_steps=7", "seed=3")
    ref = train_run(compose(run), str(tmp_path / "full"))
    assert ref["rehashes"] >= 3 and all(w < 64 for w in ref["widths"].values())
    assert set(ref["widths"]) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"}
    killed_run(monkeypatch, compose(run), tmp_path / "killed", 3)
    out = train_run(compose([*run, f"trainer.checkpoint.resume={tmp_path / 'killed'}"]), str(tmp_path / "resumed"))
    for k in ("test_acc", "train_loss", "widths", "widths_before", "rehashes", "steps", "flops", "params"):
        assert out[k] == ref[k], k
    back = load_model(tmp_path / "full" / "model.pt")
    assert model_widths(back) == ref["widths"]


def test_torchvision_model_trains_and_compresses_through_the_app(tmp_path, npz_images):
    from hashexp.app import train_run

    run = ["dataset=npz", f"dataset.path={npz_images}", "model=torchvision", "model.arch=resnet18", "model.small_stem=true",
           "trainer.epochs=1", "trainer.batch_size=64", "trainer.num_threads=1", "trainer.logging.progress=none",
           "hashing=simhash", "hashing.max_error=null", "hashing.target_ratio=0.5", "schedule.unit=step",
           "schedule.every=3", "schedule.start=3", "schedule.max_rehashes=1", "seed=0"]
    out = train_run(compose(run), str(tmp_path / "tv"))
    full = build_model(compose(run).model, (1, 8, 8), 4)
    assert out["rehashes"] == 1 and out["flops"] < 0.6 * count_flops(full, (1, 8, 8))
    assert sum(out["widths"].values()) < sum(out["widths_before"].values())
    back = load_model(tmp_path / "tv" / "model.pt")
    assert model_widths(back) == out["widths"]


@pytest.mark.slow
def test_torchrun_two_ranks_train_a_vit_like_one_process(tmp_path, npz_images):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    root = Path(__file__).resolve().parents[1]
    run = tiny_vit(npz_images, "trainer.epochs=2", "trainer.batch_size=64", "trainer.logging.progress=log",
           "hashing=simhash", "hashing.max_error=null", "hashing.target_ratio=0.75", "schedule.unit=step",
           "schedule.every=3", "schedule.start=2", "seed=1")
    env = dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=str(root), TMPDIR=str(tmp_path))
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "hashexp", *run,
                          f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-4000:]
    one = subprocess.run([sys.executable, "-m", "hashexp", *run, f"hydra.run.dir={tmp_path / 'one'}"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    b = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert a["world_size"] == 2 and a["rehashes"] == b["rehashes"] >= 2
    assert a["widths"] == b["widths"] != a["widths_before"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_compress_cli_compresses_a_trained_vit_run(tmp_path, npz_images):
    from hashexp.app import train_run
    from hashexp.compress import main

    run = tiny_vit(npz_images, "trainer.epochs=1", "trainer.num_threads=1", "trainer.logging.progress=none", "seed=0")
    from omegaconf import OmegaConf

    cfg = compose(run)
    train_run(cfg, str(tmp_path / "run"))
    (tmp_path / "run" / ".hydra").mkdir()  # what the Hydra app writes: the CLI reads the dataset from it
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")
    assert main([str(tmp_path / "run"), "--keep", "0.5", "--out", str(tmp_path / "small")]) == 0
    small = load_model(tmp_path / "small" / "model.pt")
    assert model_widths(small) == {"blocks.0.attn.qkv": 8, "blocks.0.mlp.fc1": 32, "blocks.1.attn.qkv": 8,
                                   "blocks.1.mlp.fc1": 32}


def test_timm_model_compresses_through_the_api():
    pytest.importorskip("timm")
    from hashexp.models.adapters import timm_model

    torch.manual_seed(0)
    m = timm_model((1, 16, 16), 4, "resnet18")
    x = torch.randn(32, 1, 16, 16)
    small, rep = compress_model(m, x, keep=0.5)
    assert len(rep["sites"]) >= 9  # streams and block-internal widths of timm's ResNet-18
    assert rep["after"]["flops"] < 0.4 * rep["before"]["flops"]
    assert small(x).shape == (32, 4)


def test_activation_mass_of_a_token_site_is_per_neuron():
    from hashexp.merge.stats import ActivationStats

    torch.manual_seed(0)
    m = build_model(_vit_cfg(), (1, 8, 8), 4)
    sites = find_sites(m, torch.randn(2, 1, 8, 8)).sites
    stats = ActivationStats(sites, window=0)
    m.train()
    x = torch.randn(3, 1, 8, 8)
    m(x)
    mlp = m.blocks[0].mlp
    tokens = m.blocks[0].norm2  # the FFN's input: recompute its activations by hand
    seen = {}
    h = tokens.register_forward_hook(lambda mod, i, o: seen.update(z=o))
    m(x)
    h.remove()
    expect = F.gelu(mlp.fc1(seen["z"])).abs().sum(dim=(0, 1))
    torch.testing.assert_close(stats.mass("blocks.0.mlp.fc1") / 2, expect, rtol=1e-5, atol=1e-5)


def test_a_model_that_declares_its_sites_keeps_them_and_ignore_can_leave_all_out():
    from hashexp.models.mlp import MLP

    torch.manual_seed(0)
    m = MLP((1, 8, 8), 4, widths=(24, 16))
    x = images(64)[0]
    small, rep = compress_model(m, x, keep=0.5, ignore=["fc2"])
    assert rep["after"]["widths"] == {"fc1": 12, "fc2": 16}
    with pytest.raises(ConfigError, match="no mergeable site left"):
        compress_model(m, x, keep=0.5, ignore=["fc1", "fc2"])
