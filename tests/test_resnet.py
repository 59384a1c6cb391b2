"""ResNets with merge sites: shapes, FLOPs, exact merges through BN and residual streams, training.

Invariants (DESIGN.md): planted duplicates merge with unchanged eval outputs, FLOPs equal the
analytic count before and after a merge, optimizer state shapes equal parameter shapes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from hashexp.errors import ConfigError
from hashexp.merge.recalibrate import recalibrate_bn
from hashexp.merge.surgery import apply_plan, merge_plan
from hashexp.metrics import count_flops
from hashexp.models import build_model, load_model, save_model
from hashexp.models.resnet import ResNet18, ResNet20, ResNet56

CONF = Path(__file__).resolve().parents[1] / "conf"
# Nominal (width, blocks, stride) per stage, written out here independently of the model code.
ARCHS = {
    "resnet20": (ResNet20, [(16, 3, 1), (32, 3, 2), (64, 3, 2)]),
    "resnet56": (ResNet56, [(16, 9, 1), (32, 9, 2), (64, 9, 2)]),
    "resnet18": (ResNet18, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]),
}
SMALL = (3, 16, 16)


def analytic_flops(stages, widths: dict[str, int], input_shape, num_classes: int) -> int:
    """Forward FLOPs per sample: 2*Cin*Cout*k*k*Hout*Wout per conv, 2*in*out for the Linear.

    BatchNorm, ReLU, the residual add and the average pool are not counted: FlopCounterMode
    counts only matmul/conv-like aten ops (and no bias adds), and the project counts FLOPs with it.
    """
    c, h, w = input_shape
    s = widths["stream1"]
    total = 2 * c * s * 9 * h * w  # stem, 3x3 stride 1 pad 1
    for k, (_, blocks, stride) in enumerate(stages):
        out = widths[f"stream{k + 1}"]
        for b in range(blocks):
            st = stride if b == 0 else 1
            h, w = (h - 1) // st + 1, (w - 1) // st + 1  # 3x3 pad 1 and 1x1 pad 0 agree
            mid = widths[f"layer{k + 1}.{b}.inner"]
            total += 2 * s * mid * 9 * h * w + 2 * mid * out * 9 * h * w
            if k > 0 and b == 0:
                total += 2 * s * out * h * w  # option-B projection
            s = out
    return total + 2 * s * num_classes


def randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial eval-mode BNs (some negative gammas), so folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                sign = torch.where(torch.rand(n, generator=gen) < 0.15, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + torch.rand(n, generator=gen)))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))


def plant(site, pairs, ratio: float) -> None:
    """Make channel j = ratio * channel i in every producer of ``site`` (BN-folded filter and bias)."""
    with torch.no_grad():
        for p in site.producers:
            conv, bn = p.module, p.norm
            for i, j in pairs:
                conv.weight[j] = conv.weight[i]
                bn.running_mean[j] = bn.running_mean[i]
                bn.running_var[j] = bn.running_var[i]
                bn.weight[j] = ratio * bn.weight[i]
                bn.bias[j] = ratio * bn.bias[i]


def labels_from_pairs(width: int, pairs) -> torch.Tensor:
    parent = torch.arange(width)
    for i, j in pairs:
        parent[j] = parent[i]
    return torch.unique(parent, return_inverse=True)[1]


def sites_by_name(model):
    return {s.name: s for s in model.merge_sites()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def state_shapes_ok(model, opt) -> None:
    params = {id(p) for p in model.parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) in params, "optimizer holds a parameter the model no longer has"
    for p, st in opt.state.items():
        for key, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.shape == p.shape, (key, tuple(v.shape), tuple(p.shape))


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sites_structure(arch):
    cls, stages = ARCHS[arch]
    model = cls(SMALL, 10)
    names = [s.name for s in model.merge_sites()]
    expected = {}
    for k, (width, blocks, _) in enumerate(stages):
        expected[f"stream{k + 1}"] = width
        expected.update({f"layer{k + 1}.{b}.inner": width for b in range(blocks)})
    assert names == list(expected)
    assert model.widths() == expected
    s = sites_by_name(model)
    last = len(stages)
    # stream1: stem + every block's conv2 produce; every stage-1 conv1 and stage 2's block 0 read it
    assert len(s["stream1"].producers) == 1 + stages[0][1]
    assert s["stream1"].producers[0].module is model.conv1
    assert len(s["stream1"].consumers) == stages[0][1] + 2
    # later streams: the projection opens them; the last one is read by the classifier
    assert s["stream2"].producers[0].module is model.layer2[0].shortcut[0]
    assert s[f"stream{last}"].consumers[-1].module is model.fc
    assert s["layer2.1.inner"].tap is model.layer2[1].act1
    # one shared post-add ReLU per stream: the hook fires once per stream state
    calls = []
    h = s["stream2"].tap.register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *SMALL))
    h.remove()
    assert out.shape == (2, 10)
    assert calls == [stages[1][0]] * stages[1][1]


def test_rejects_bad_widths_and_inputs():
    with pytest.raises(ConfigError, match="unknown sites"):
        ResNet20(SMALL, 10, site_widths={"stream9": 3})
    with pytest.raises(ConfigError, match="positive"):
        ResNet20(SMALL, 10, site_widths={"stream1": 0})
    with pytest.raises(ConfigError, match=r"\(C, H, W\)"):
        ResNet20((784,), 10)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)])
def test_flops_match_analytic(arch, input_shape):
    cls, stages = ARCHS[arch]
    model = cls(input_shape, 10)
    assert count_flops(model, input_shape) == analytic_flops(stages, model.widths(), input_shape, 10)


def test_flops_match_analytic_custom_widths_and_width_mult():
    _, stages = ARCHS["resnet20"]
    widths = {"stream1": 5, "stream2": 7, "layer2.1.inner": 3, "layer3.2.inner": 11}
    model = ResNet20((1, 28, 28), 7, site_widths=widths, width_mult=0.5)
    assert model.widths()["stream3"] == 32 and model.widths()["layer1.0.inner"] == 8
    assert {k: model.widths()[k] for k in widths} == widths
    assert count_flops(model, (1, 28, 28)) == analytic_flops(stages, model.widths(), (1, 28, 28), 7)


def _planted_resnet20(ratio: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResNet20(SMALL, 10)
    randomize_bn(model, gen)
    s = sites_by_name(model)
    plan = {"stream1": [(0, 5), (3, 9)], "stream2": [(1, 2), (4, 30), (7, 8)], "stream3": [(10, 60)],
            "layer1.1.inner": [(2, 12)], "layer2.0.inner": [(0, 31), (6, 17)], "layer3.2.inner": [(40, 41)]}
    for name, pairs in plan.items():
        # internal sites take a ratio of their own: ReLU sits right after bn1
        plant(s[name], pairs, ratio if name.startswith("stream") else 0.5)
    return model, plan


@pytest.mark.parametrize("ratio,opt_name", [(1.0, "sgd"), (2.5, "adam"), (2.5, "sgd"), (0.4, "adam")])
def test_planted_merge_preserves_function_flops_and_optimizer(ratio, opt_name):
    """Planted duplicates (ratio 1 and != 1) in stream and internal sites merge exactly."""
    _, stages = ARCHS["resnet20"]
    torch.manual_seed(1)
    x = torch.randn(8, *SMALL)
    model = ResNet20(SMALL, 10)
    opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    # one real step so the optimizer has state to remap (built and stepped before the merge)
    F.cross_entropy(model(x), torch.randint(0, 10, (8,))).backward()
    opt.step()
    opt.zero_grad()

    planted, plan = _planted_resnet20(ratio)
    model.load_state_dict(planted.state_dict())  # same parameter objects, planted values
    model.eval()
    with torch.no_grad():
        ref = model(x)
    widths0, flops0 = model.widths(), count_flops(model, SMALL)

    gen = torch.Generator().manual_seed(2)
    for name, pairs in plan.items():
        site = sites_by_name(model)[name]
        mass = 0.1 + torch.rand(site.width, generator=gen)  # arbitrary positive activation mass
        apply_plan(site, merge_plan(site, labels_from_pairs(site.width, pairs), mass), optimizer=opt)

    widths1 = model.widths()
    assert widths1 == {k: v - len(plan.get(k, [])) for k, v in widths0.items()}
    with torch.no_grad():
        out = model(x)
    assert rel_err(out, ref) < 1e-4
    flops1 = count_flops(model, SMALL)
    assert flops1 == analytic_flops(stages, widths1, SMALL, 10)
    assert flops0 - flops1 == analytic_flops(stages, widths0, SMALL, 10) - analytic_flops(stages, widths1, SMALL, 10)
    assert flops1 < flops0

    state_shapes_ok(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    loss = F.cross_entropy(model(x), torch.randint(0, 10, (8,)))
    loss.backward()
    opt.step()
    state_shapes_ok(model, opt)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_stream_ratio_must_hold_in_every_producer():
    """The identity path carries the stream's ratio: planting a ratio in only some producers is
    not a duplicate, and merging it changes the function (this is what the site's concatenated
    neuron vector detects: the cosine of the two channels drops below 1)."""
    torch.manual_seed(0)
    model = ResNet20(SMALL, 10)
    randomize_bn(model, torch.Generator().manual_seed(0))
    site = sites_by_name(model)["stream2"]
    plant(site, [(1, 2)], 2.0)
    with torch.no_grad():
        site.producers[-1].norm.weight[2] *= 1.5  # last block's conv2 disagrees on the ratio
    v = F.normalize(site.neuron_vectors(), dim=1)
    assert float(v[1] @ v[2]) < 0.999
    model.eval()
    x = torch.randn(4, *SMALL)
    with torch.no_grad():
        ref = model(x)
        apply_plan(site, merge_plan(site, labels_from_pairs(site.width, [(1, 2)])))
        assert rel_err(model(x), ref) > 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_config_builds_model(arch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+model={arch}", "model.width_mult=0.25"])
    assert cfg.model.name == arch
    model = build_model(cfg.model, (1, 28, 28), 10)
    assert isinstance(model, ARCHS[arch][0])
    assert model.widths()["stream1"] == ARCHS[arch][1][0][0] // 4


def test_save_load_merged_resnet(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=["+model=resnet20"]).model
    torch.manual_seed(0)
    model = build_model(cfg, SMALL, 10)
    randomize_bn(model, torch.Generator().manual_seed(0))
    s = sites_by_name(model)
    for name, pairs in {"stream2": [(0, 1), (2, 3)], "layer1.2.inner": [(4, 5)], "stream3": [(7, 8)]}.items():
        site = s[name]
        apply_plan(site, merge_plan(site, labels_from_pairs(site.width, pairs)))
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.widths() == model.widths()
    assert loaded.widths()["stream2"] == 30 and loaded.widths()["layer1.2.inner"] == 15
    model.eval(), loaded.eval()
    x = torch.randn(4, *SMALL)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_recalibrate_bn_cumulative_average_and_modes():
    torch.manual_seed(0)
    model = ResNet20(SMALL, 10)
    batches = [torch.randn(16, *SMALL) for _ in range(3)]
    # the expected stats of the stem BN: mean over batches of per-batch mean / unbiased var
    with torch.no_grad():
        z = [model.conv1(b) for b in batches]
    mean = torch.stack([t.mean((0, 2, 3)) for t in z]).mean(0)
    var = torch.stack([t.transpose(0, 1).flatten(1).var(1, unbiased=True) for t in z]).mean(0)
    other = model.layer3[2].bn2
    other.running_mean.fill_(7.0)
    model.eval()
    weights = [p.detach().clone() for p in model.parameters()]
    assert recalibrate_bn(model, batches) == 48
    assert torch.allclose(model.bn1.running_mean, mean, atol=1e-5)
    assert torch.allclose(model.bn1.running_var, var, rtol=1e-4)
    assert not other.running_mean.eq(7.0).any()
    assert not model.training and not any(m.training for m in model.modules())
    assert all(bn.momentum == 0.1 for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))

    # only the BNs of chosen sites (the others keep eval mode); (x, y) tuples accepted; train mode restored
    with torch.no_grad():
        mean = torch.stack([model.layer1[0].conv1(model.stream_acts[0](model.bn1(model.conv1(b)))).mean((0, 2, 3))
                            for b in batches]).mean(0)
    other.running_mean.fill_(7.0)
    model.train()
    recalibrate_bn(model, [(b, None) for b in batches], sites=["layer1.0.inner"])
    assert other.running_mean.eq(7.0).all()
    assert torch.allclose(model.layer1[0].bn1.running_mean, mean, atol=1e-5)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    assert other.running_mean.eq(7.0).all()


def greedy_groups(vectors: torch.Tensor, n_merge: int) -> torch.Tensor:
    """Labels that merge the ``n_merge`` most cosine-similar disjoint pairs (a stand-in compressor)."""
    u = F.normalize(vectors, dim=1)
    cos = (u @ u.T).numpy()
    iu, ju = np.triu_indices(len(cos), k=1)
    used, pairs = set(), []
    for t in np.argsort(-cos[iu, ju], kind="stable"):
        i, j = int(iu[t]), int(ju[t])
        if i not in used and j not in used:
            used |= {i, j}
            pairs.append((i, j))
            if len(pairs) == n_merge:
                break
    return labels_from_pairs(len(cos), pairs)


def test_train_merge_recalibrate_train():
    """Train a few SGD steps, merge ~25% of every site, recalibrate BN, keep training."""
    torch.manual_seed(0)
    shape = (1, 16, 16)
    x = torch.randn(256, *shape)
    y = torch.randint(0, 10, (256,))
    model = ResNet20(shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def steps(n):
        model.train()
        losses = []
        for t in range(n):
            idx = torch.randint(0, 256, (64,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    assert all(np.isfinite(steps(6)))
    widths0, flops0 = model.widths(), count_flops(model, shape)

    # activation mass through the sites' taps (a stream's shared ReLU fires once per block)
    sites = model.merge_sites()
    mass = {s.name: torch.zeros(s.width) for s in sites}
    def tap_hook(name):
        def hook(module, inputs, out):
            mass[name].add_(out.detach().abs().sum((0, 2, 3)))  # returns None: output unchanged
        return hook

    hooks = [s.tap.register_forward_hook(tap_hook(s.name)) for s in sites]
    model.eval()
    with torch.no_grad():
        model(x[:128])
    for h in hooks:
        h.remove()
    assert all(float(m.min()) >= 0 and float(m.sum()) > 0 for m in mass.values())

    for site in sites:
        labels = greedy_groups(site.neuron_vectors(), site.width // 4)
        apply_plan(site, merge_plan(site, labels, mass[site.name]), optimizer=opt)
    assert model.widths() == {k: v - v // 4 for k, v in widths0.items()}
    assert count_flops(model, shape) < 0.7 * flops0
    state_shapes_ok(model, opt)

    model.train()
    recalibrate_bn(model, [x[i:i + 64] for i in range(0, 256, 64)])
    assert model.training and all(m.training for m in model.modules())
    losses = steps(6)
    assert all(np.isfinite(losses))
    state_shapes_ok(model, opt)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:32])).all()


def test_deepcopy_keeps_shared_stream_taps():
    model = ResNet20(SMALL, 10)
    clone = copy.deepcopy(model)
    assert clone.layer1[2].act_out is clone.stream_acts[0]
    assert clone.layer3[0].act_out is clone.stream_acts[2] is not model.stream_acts[2]
