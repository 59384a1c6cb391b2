"""Export (hashexp/export.py): ONNX files checked with onnxruntime, torch.export programs, the CLI.

Each model family (merged MLP, ResNet-20 at merged widths, a conv + attention block as a traced
model would be) must give onnxruntime outputs within 1e-4 of PyTorch's at several batch sizes;
an export that is not faithful must raise, not warn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="the deploy extra (pip install -e '.[deploy]') is not installed")
pytest.importorskip("onnxscript", reason="the deploy extra (pip install -e '.[deploy]') is not installed")
import onnxruntime as ort  # noqa: E402

from hashexp.errors import ConfigError, ExportError  # noqa: E402
from hashexp.export import export_model, main  # noqa: E402
from tests.conftest import compose  # noqa: E402


def _ort_logits(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _merged_mlp():
    """An MLP merged by the real one-shot compressor (simhash + least squares) on synthetic data."""
    from hashexp.compress import compress_model
    from hashexp.data import build_dataset
    from hashexp.models import build_model

    cfg = compose(["dataset=synthetic", "dataset.n_samples=600", "model.widths=[48,32]"])
    data = build_dataset(cfg.dataset, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model, report = compress_model(model, data, keep=0.5, calib_batches=2, batch_size=64)
    return model, data.x_test[:64], report


class ConvAttentionBlock(nn.Module):
    """A patch-embedding conv, LayerNorm, self-attention and a GELU feed-forward: a ViT block."""

    def __init__(self, dim: int = 24, heads: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.ff(self.norm2(t))
        return self.head(t.mean(1))


def test_merged_mlp_onnx_matches_pytorch_at_its_merged_widths(tmp_path, one_thread):
    model, x, report = _merged_mlp()
    widths = report["after"]["widths"]
    assert all(widths[k] < report["before"]["widths"][k] for k in widths)  # it really merged
    rep = export_model(model, x[:4], tmp_path / "mlp.onnx", check_input=x)
    assert rep.checked_batches == [64, 32] and rep.max_abs_diff <= 1e-4
    # the file holds the merged widths: the first layer's weight initializer is (width_fc1, inputs)
    import onnx

    shapes = {tuple(t.dims) for t in onnx.load(str(tmp_path / "mlp.onnx")).graph.initializer}
    assert (widths["fc1"], model.input_dim) in shapes and (widths["fc2"], widths["fc1"]) in shapes


@pytest.fixture(scope="module")
def resnet20_onnx(tmp_path_factory):
    """ResNet-20 at merged widths with trained-like BatchNorm statistics, exported once."""
    from hashexp.models.resnet import ResNet20

    torch.manual_seed(1)
    widths = {"stream1": 11, "layer1.0.inner": 5, "stream2": 19, "layer2.1.inner": 9, "stream3": 40}
    model = ResNet20(input_shape=(3, 16, 16), num_classes=10, site_widths=widths)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet20.onnx"
    export_model(model, torch.randn(2, 3, 16, 16), path)
    return model, path


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_resnet20_onnx_dynamic_batch(resnet20_onnx, batch):
    model, path = resnet20_onnx
    x = torch.randn(batch, 3, 16, 16)
    got = _ort_logits(path, x)
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_conv_attention_block_onnx_and_pt2(tmp_path, one_thread):
    torch.manual_seed(2)
    model = ConvAttentionBlock()
    x = torch.randn(10, 3, 16, 16)
    rep = export_model(model, x[:1], tmp_path / "block.onnx", check_input=x)  # a batch of 1 still exports dynamic
    assert rep.format == "onnx" and rep.checked_batches == [10, 5]
    got = _ort_logits(tmp_path / "block.onnx", torch.randn(3, 3, 16, 16))
    assert got.shape == (3, 5)
    rep = export_model(model, x, tmp_path / "block.pt2", format="pt2")
    assert model.training  # the caller's model is only read (export works on a copy in eval mode)
    prog = torch.export.load(str(tmp_path / "block.pt2")).module()
    y = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(prog(y), model.eval()(y), atol=1e-5, rtol=0)


class _Drifting(nn.Module):
    """Python state baked in at export time: every call adds its call count, so the file is stale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) + float(self.calls)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_mismatch_is_an_error(tmp_path, fmt):
    with pytest.raises(ExportError, match=r"differs from PyTorch's by .* \(allowed 0.0001\)"):
        export_model(_Drifting(), torch.randn(4, 6), tmp_path / f"drift.{fmt}", format=fmt)


def test_bad_format_and_input_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="choose one of onnx, pt2"):
        export_model(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.x", format="tflite")
    with pytest.raises(ConfigError, match="example_input must be a tensor batch"):
        export_model(nn.Linear(2, 2), [1.0, 2.0], tmp_path / "m.onnx")


def test_cli_exports_a_run_dir_checked_on_its_test_data(tmp_path, one_thread, capsys):
    from omegaconf import OmegaConf

    from hashexp.data import build_dataset
    from hashexp.models import build_model, load_model, save_model

    cfg = compose(["dataset=synthetic", "dataset.n_samples=400", "model.widths=[16,16]"])
    data = build_dataset(cfg.dataset, seed=0)
    model = build_model(cfg.model, data.input_shape, data.num_classes, site_widths={"fc1": 9, "fc2": 5})
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    save_model(model, run / "model.pt")
    assert main([str(run), "--batch", "50"]) == 0
    out = capsys.readouterr().out
    assert "checked at batch [50, 25]" in out and "'fc1': 9" in out
    x = data.x_test[:20]
    with torch.no_grad():
        want = load_model(run / "model.pt").eval()(x).numpy()
    np.testing.assert_allclose(_ort_logits(run / "model.onnx", x), want, atol=1e-4, rtol=0)
    assert main([str(run), "--format", "pt2", "--out", str(tmp_path / "x" / "m.pt2")]) == 0
    assert (tmp_path / "x" / "m.pt2").is_file()
    assert main([str(tmp_path / "nothing")]) == 2
    assert "hashexp.export: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_a_trained_hashed_run_exports_from_the_command_line(tmp_path, capsys):
    """End to end: `python -m hashexp hashing=simhash` on synthetic data, then the export CLI on its run dir."""
    from tests.conftest import TINY, run_app, run_dirs

    run_app(tmp_path, [*TINY, "hashing=simhash", "hashing.max_error=0.5"])
    (run,) = run_dirs(tmp_path)
    widths = json.loads((run / "metrics.json").read_text())["widths"]
    assert widths != {"fc1": 32, "fc2": 32}  # merged
    assert main([str(run)]) == 0
    assert f"'fc1': {widths['fc1']}" in capsys.readouterr().out
    import onnx

    shapes = {tuple(t.dims) for t in onnx.load(str(run / "model.onnx")).graph.initializer}
    assert (widths["fc2"], widths["fc1"]) in shapes


@pytest.mark.slow
def test_a_torchvision_model_exports(tmp_path, one_thread):
    """The traced model families (model=torchvision) export through the same generic path."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=10)
    rep = export_model(model, torch.randn(2, 3, 32, 32), tmp_path / "r18.onnx", check_input=torch.randn(6, 3, 32, 32))
    assert rep.checked_batches == [6, 3] and rep.max_abs_diff <= 1e-4
