"""One-shot compression of a trained model, from the command line and from Python."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY, run_app, run_dirs
from hashexp.compress import compress_model, main
from hashexp.data.synthetic import load_synthetic
from hashexp.errors import ConfigError
from hashexp.models import build_model, load_model


@pytest.mark.slow
def test_cli_compresses_a_finished_run_to_a_share_of_neurons(tmp_path):
    run_app(tmp_path, TINY + ["model.widths=[40,20]", "trainer.epochs=2"])
    (rd,) = run_dirs(tmp_path)
    out = tmp_path / "small"
    proc = subprocess.run([sys.executable, "-m", "hashexp.compress", str(rd), "--keep", "0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "compress.json").read_text())
    assert rep["before"]["widths"] == {"fc1": 40, "fc2": 20}
    assert rep["after"]["widths"] == {"fc1": 20, "fc2": 10}
    assert rep["after"]["flops"] == 2 * (20 * 20 + 20 * 10 + 10 * 2)
    assert rep["after"]["test_acc"] > rep["majority_acc"] - 0.05
    small = load_model(out / "model.pt")
    assert small.widths() == {"fc1": 20, "fc2": 10}
    assert "FLOPs" in proc.stdout and "->" in proc.stdout


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--keep", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hashexp.compress: error:") and "not found" in err


def _trained_mlp():
    data = load_synthetic(n_samples=2000, seed=0)
    torch.manual_seed(0)
    model = build_model({"_target_": "hashexp.models.mlp.MLP", "widths": [64, 64]}, data.input_shape, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    return model, data


@pytest.mark.parametrize("method", ["simhash", "magnitude", "random"])
def test_api_hits_keep_ratio(method):
    model, data = _trained_mlp()
    small, rep = compress_model(model, data, method=method, keep=0.5, finetune_epochs=1, seed=0)
    assert small.widths() == {"fc1": 32, "fc2": 32}
    assert rep["after"]["params"] < rep["before"]["params"] / 2
    assert rep["before"]["test_acc"] > 0.9
    assert rep["after"]["test_acc"] >= rep["after"]["test_acc_no_finetune"] - 0.02
    assert rep["after"]["test_acc"] > 0.6


def test_hashed_one_shot_keeps_more_accuracy_than_magnitude_and_random():
    accs = {}
    for method in ("simhash", "magnitude", "random"):
        model, data = _trained_mlp()
        _, rep = compress_model(model, data, method=method, keep=0.5, seed=0)
        accs[method] = rep["after"]["test_acc"]
    # measured: simhash 0.83, magnitude 0.63, random 0.62 (synthetic, seed 0, no fine-tune)
    assert accs["simhash"] > accs["magnitude"] + 0.1 and accs["simhash"] > accs["random"] + 0.1, accs


def test_api_needs_keep_or_threshold():
    data = load_synthetic(n_samples=200, seed=0)
    model = build_model({"_target_": "hashexp.models.mlp.MLP", "widths": [8]}, data.input_shape, data.num_classes)
    with pytest.raises(ConfigError, match="give --keep"):
        compress_model(model, data, keep=None, threshold=None)
    with pytest.raises(ConfigError, match="method='bogus'"):
        compress_model(model, data, method="bogus")


def test_finetune_takes_exactly_its_steps_and_learns():
    import torch

    from hashexp.data import build_dataset
    from hashexp.models.mlp import MLP
    from hashexp.train.finetune import finetune
    from omegaconf import OmegaConf

    data = build_dataset(OmegaConf.create({"_target_": "hashexp.data.synthetic.load_synthetic", "n_samples": 600}), seed=0)
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes, widths=(32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = {"n": 0}
    real_step = opt.step

    def counting_step(*a, **kw):
        calls["n"] += 1
        return real_step(*a, **kw)

    opt.step = counting_step
    from hashexp.metrics import accuracy

    before = accuracy(model, data.x_test, data.y_test)
    finetune(model, data, 25, opt, 64, torch.Generator().manual_seed(0))  # 25 steps: more than one epoch of 8
    assert calls["n"] == 25 and model.training
    assert accuracy(model, data.x_test, data.y_test) > before + 0.1


def test_api_global_budget_keeps_the_flops_share_and_restricted_order_runs():
    model, data = _trained_mlp()
    n_in, n_out = data.input_shape[0], data.num_classes

    def flops(w):
        return n_in * w["fc1"] + w["fc1"] * w["fc2"] + w["fc2"] * n_out

    small, rep = compress_model(model, data, method="simhash", keep=0.5, seed=0, budget="global", order="restricted",
                                bucket_size=16)
    w = small.widths()
    full = flops({"fc1": 64, "fc2": 64})
    assert 0.5 * full <= flops(w) < 0.5 * full + max(n_in + w["fc2"], w["fc1"] + n_out)  # within one neuron
    assert w["fc1"] != w["fc2"]  # the ratio is global: the sites differ
    assert rep["after"]["test_acc"] > 0.6


@pytest.mark.parametrize("option", ["simhash", "mips", "learnable", "magnitude", "random", "neuron_merging", "none"])
def test_one_shot_reads_the_hashing_group_as_hydra_composes_it(option):
    """group_option (no Hydra run) == Hydra's composition of `hashing=<option>`, every key."""
    from conftest import compose
    from omegaconf import OmegaConf

    from hashexp.utils.conf import group_option

    hydra_node = OmegaConf.to_container(compose([f"hashing={option}", "model.merge_budget=0.02",
                                                 "trainer.bn_recalib_batches=0"]).hashing, resolve=True)
    assert group_option("hashing", option) == hydra_node


def test_one_shot_compressor_takes_the_training_defaults():
    """make_compressor's knobs are conf/hashing's values; only its arguments override them."""
    from hashexp.compress import make_compressor
    from hashexp.utils.conf import group_option

    yaml = group_option("hashing", "simhash")
    comp = make_compressor("simhash", 0.4, seed=3)
    assert (comp.bits, comp.tables, comp.min_width, comp.ridge, comp.block_frac) == (
        yaml["bits"], yaml["tables"], yaml["min_width"], yaml["ridge"], yaml["block_frac"])
    assert (comp.target_ratio, comp.max_error, comp.seed) == (0.4, None, 3)  # one-shot: keep decides
    assert make_compressor("simhash", None, max_error=0.05, bits=10).bits == 10
    assert make_compressor("mips", 0.5).transform == "mips"
    nm = make_compressor("neuron_merging", 0.5)
    assert (nm.threshold, nm.compensation, nm.scoring) == (0.45, "weights", "original")
    assert make_compressor("neuron_merging", 0.5, threshold=0.3).threshold == 0.3
    with pytest.raises(ConfigError, match="bitz: not keys of conf/hashing/simhash.yaml"):
        make_compressor("simhash", 0.5, bitz=4)
    with pytest.raises(ConfigError, match="magnitude has no threshold"):
        make_compressor("magnitude", 0.5, threshold=0.3)


def test_group_option_errors(tmp_path, monkeypatch):
    from hashexp.utils import conf

    with pytest.raises(ConfigError, match="no conf/hashing/bogus.yaml; choose one of .*simhash"):
        conf.group_option("hashing", "bogus")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.yaml").write_text("defaults:\n  - b\n  - _self_\nx: 1\n")
    (tmp_path / "g" / "b.yaml").write_text("defaults:\n  - a\nx: 2\ny: 3\n")
    (tmp_path / "g" / "c.yaml").write_text("defaults:\n  - /model: mlp\nx: 1\n")
    (tmp_path / "g" / "d.yaml").write_text("defaults:\n  - _self_\n  - e\nx: 1\ny: 1\n")
    (tmp_path / "g" / "e.yaml").write_text("y: 2\n")
    monkeypatch.setattr(conf, "CONF_DIR", tmp_path)
    with pytest.raises(ConfigError, match="loops through"):
        conf.group_option("g", "a")
    with pytest.raises(ConfigError, match="names another group"):
        conf.group_option("g", "c")
    assert conf.group_option("g", "d") == {"x": 1, "y": 2}  # merged in the defaults list's order
