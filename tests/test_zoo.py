"""The ViT and the torchvision/timm adapters of the model zoo, and what the Python API accepts as
calibration data (hashexp.api): shapes, adaptations and one clear error for each bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose
from hashexp.api import calibration_data
from hashexp.errors import ConfigError, DataError
from hashexp.models.adapters import Resized, timm_model, torchvision_model
from hashexp.models.vit import ViT


def test_vit_shapes_and_token_count():
    torch.manual_seed(0)
    m = ViT((1, 28, 28), 10, dim=32, depth=2, heads=4, patch=7)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert m.pos_embed.shape == (1, 16 + 1, 32)  # 4x4 patches and the class token
    assert [b.mlp.fc1.out_features for b in m.blocks] == [128, 128]
    mean = ViT((3, 32, 32), 5, dim=32, depth=1, heads=2, patch=4, pool="mean", mlp_ratio=2)
    assert mean.cls_token is None and mean.pos_embed.shape == (1, 64, 32)
    assert mean.blocks[0].mlp.fc1.out_features == 64
    assert mean(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_vit_attention_matches_a_reference_computation():
    torch.manual_seed(0)
    att = ViT((1, 8, 8), 2, dim=8, depth=1, heads=2, patch=4).blocks[0].attn
    x = torch.randn(2, 5, 8)
    q, k, v = att.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., s])
    ref = att.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(att(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, match", [({"patch": 5}, "does not divide"), ({"dim": 30, "heads": 4}, "multiple"),
                                       ({"pool": "max"}, "pool"), ({"depth": 0}, "depth")])
def test_vit_bad_config_is_one_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        ViT((1, 28, 28), 10, **kw)
    with pytest.raises(ConfigError, match="image inputs"):
        ViT((784,), 10)


def test_torchvision_adapter_takes_the_datasets_channels_and_classes():
    torch.manual_seed(0)
    m = torchvision_model((1, 28, 28), 7, "resnet18")
    assert m.conv1.in_channels == 1 and m.conv1.out_channels == 64 and m.conv1.stride == (2, 2)
    assert m.fc.out_features == 7
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    small = torchvision_model((3, 32, 32), 10, "resnet18", small_stem=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    same = torchvision_model((3, 32, 32), 10, "resnet18")
    assert same.conv1.kernel_size == (7, 7)  # 3 channels and no small_stem: the stem is left alone


def test_torchvision_adapter_upsamples_below_min_size():
    torch.manual_seed(0)
    m = torchvision_model((1, 28, 28), 10, "mobilenet_v3_small", min_size=64)
    assert isinstance(m, Resized) and m.min_size == 64
    seen = {}
    m.net.features[0][0].register_forward_pre_hook(lambda mod, i: seen.update(hw=tuple(i[0].shape[-2:])))
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen["hw"] == (64, 64)
    assert not isinstance(torchvision_model((1, 64, 64), 10, "mobilenet_v3_small", min_size=64), Resized)


def test_torchvision_adapter_errors():
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        torchvision_model((1, 28, 28), 10, "resnet19")
    with pytest.raises(ConfigError, match="image inputs"):
        torchvision_model((784,), 10, "resnet18")
    with pytest.raises(ConfigError, match="refused model.kwargs"):
        torchvision_model((3, 32, 32), 10, "resnet18", kwargs={"no_such_arg": 1})


def test_timm_adapter_takes_channels_and_classes():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm_model((1, 28, 28), 6, "resnet18")
    assert m.conv1.in_channels == 1 and m.fc.out_features == 6
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 6)
    with pytest.raises(ConfigError, match="not a timm model"):
        timm_model((1, 28, 28), 10, "no_such_model_xyz")


@pytest.mark.parametrize("name, arch", [("vit", None), ("torchvision", "resnet18"), ("timm", "resnet18")])
def test_model_configs_compose(name, arch):
    over = [f"model={name}"] + ([f"model.arch={arch}"] if arch else [])
    cfg = compose(over)
    assert cfg.model.name == (name if arch is None else ("tv_" if name == "torchvision" else "timm_") + arch)
    assert cfg.hashing.name == "none"


# ------------------------------------------------------------------ calibration data in every form
def test_calibration_data_accepts_every_form():
    x, y = torch.randn(10, 3, 4, 4), torch.arange(10)
    a = calibration_data(x)
    assert a.x is x and a.y is None and a.input_shape == (3, 4, 4)
    b = calibration_data((x, y))
    assert torch.equal(b.x, x) and torch.equal(b.y, y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    c = calibration_data(loader)
    assert torch.equal(c.x, x) and torch.equal(c.y, y)
    d = calibration_data([x[:3], x[3:]], max_samples=5)  # a list of bare batches, cut at max_samples
    assert torch.equal(d.x, x[:5]) and d.y is None
    e = calibration_data(((x[i:i + 2], y[i:i + 2]) for i in range(0, 10, 2)), max_samples=4)
    assert torch.equal(e.x, x[:4]) and torch.equal(e.y, y[:4])  # a generator, stopped once 4 are in
    f = calibration_data(x.double(), dtype=torch.float32)
    assert f.x.dtype == torch.float32
    assert [len(b) for b in a.batches(4)] == [4, 4, 2] and [len(b) for b in a.batches(4, limit=2)] == [4, 4]


@pytest.mark.parametrize("bad, match", [
    (None, "calib is None"),
    ("images/", "not calibration data"),
    ([], "no batches"),
    ([{"image": torch.zeros(2, 3)}], "dicts"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], "differ in shape"),
    (torch.zeros(5), "must be a batch"),
    ([[1, 2]], "must be a tensor"),
])
def test_calibration_data_errors(bad, match):
    with pytest.raises(DataError, match=match):
        calibration_data(bad)
