"""Sites found by tracing (hashexp.merge.discovery): the hand-declared sites as oracle, hand-built
blocks with planted values, refusals with reasons, and the merge path on discovered sites."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.discovery import find_sites, shrink_to_widths
from hashexp.merge.discovery.checks import compress_half, noop_error, planted_error, rel
from hashexp.merge.sites import Consumer, MergeSite, Producer, model_sites
from hashexp.models.mlp import MLP
from hashexp.models.resnet import ResNet18, ResNet20, ResNet56


# ------------------------------------------------------------------ the oracle: sites as once declared by hand
def hand_mlp(m: MLP) -> list[MergeSite]:
    return [MergeSite(name=f"fc{i + 1}", producers=[Producer(m.layers[i])], consumers=[Consumer(m.layers[i + 1])],
                      activation=m.activation, tap=m.acts[i]) for i in range(len(m.acts))]


def hand_resnet(m) -> list[MergeSite]:
    stages = m.stages
    sites = []
    for k, stage in enumerate(stages):
        blocks = list(stage)
        if k == 0:
            producers, readers = [Producer(m.conv1, m.bn1)], blocks
        else:
            producers, readers = [Producer(blocks[0].shortcut[0], blocks[0].shortcut[1])], blocks[1:]
        producers += [Producer(b.conv2, b.bn2) for b in blocks]
        consumers = [Consumer(b.conv1) for b in readers]
        if k + 1 < len(stages):
            nxt = stages[k + 1][0]
            consumers += [Consumer(nxt.conv1), Consumer(nxt.shortcut[0])]
        else:
            consumers.append(Consumer(m.fc))
        sites.append(MergeSite(name=f"stream{k + 1}", producers=producers, consumers=consumers, activation="relu",
                               tap=m.stream_acts[k]))
        for b, blk in enumerate(blocks):
            sites.append(MergeSite(name=f"layer{k + 1}.{b}.inner", producers=[Producer(blk.conv1, blk.bn1)],
                                   consumers=[Consumer(blk.conv2)], activation="relu", tap=blk.act1))
    return sites


def _key(s: MergeSite):
    return (s.name, [(p.module, p.norm) for p in s.producers], [c.module for c in s.consumers],
            [(c.before, c.after, c.block) for c in s.consumers], s.members, s.tap, s.activation, s.width, s.gated)


@pytest.mark.parametrize("make,hand", [
    (lambda: MLP((1, 8, 8), 10, (32, 16)), hand_mlp),
    (lambda: MLP((20,), 5, (12, 9, 7), activation="gelu"), hand_mlp),
    (lambda: MLP((20,), 5, (12,), activation="tanh", bias=False), hand_mlp),
    (lambda: ResNet20((3, 16, 16), 10), hand_resnet),
    (lambda: ResNet56((3, 16, 16), 10, width_mult=0.5), hand_resnet),
    (lambda: ResNet18((3, 16, 16), 10, width_mult=0.25), hand_resnet),
])
def test_discovered_equals_hand_declared(make, hand):
    m = make()
    found = model_sites(m)
    assert [_key(s) for s in found] == [_key(s) for s in hand(m)]
    assert all(s.kind in ("plain", "stream") for s in found)


def test_merged_model_keeps_its_sites_and_rebuilds():
    m = ResNet20((3, 16, 16), 10)
    widths = {"stream1": 9, "layer1.0.inner": 5, "stream3": 40}
    shrink_to_widths(m, widths)
    assert {k: m.widths()[k] for k in widths} == widths
    fresh = ResNet20((3, 16, 16), 10, site_widths=m.widths())
    fresh.load_state_dict(m.state_dict())
    assert [s.name for s in model_sites(fresh)] == [s.name for s in model_sites(m)]


# ------------------------------------------------------------------ hand-built blocks
class ConcatBlock(nn.Module):
    """a (3 ch) and b (5 ch) read the input; c reads cat([relu(a), relu(b)]) after one BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 5, 1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], 1)
        h = self.c(torch.relu(self.bn(h)))
        return self.head(torch.flatten(torch.relu(h), 1))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def test_concat_block_offsets_members_and_blocks():
    torch.manual_seed(0)
    m = ConcatBlock()
    _randomize_bn(m)
    x = torch.randn(2, 2, 4, 4)
    found = find_sites(m, x)
    by = {s.name: s for s in found.sites}
    assert list(by) == ["a", "b", "c"]
    a, b, c = by["a"], by["b"], by["c"]
    # a sits at offset 0 of c's input (b's 5 channels after it), b at offset 3; one BN over both
    assert (a.consumers[0].offset, b.consumers[0].offset) == (0, 3)
    assert [mm.module for mm in a.members] == [m.bn] and b.members[0].offset == 3
    assert a.kind == "concat" and a.restricted and not c.restricted
    # c is read by the head through a flatten: channel k is features 16k .. 16k+15
    assert c.consumers[0].block == 16 and c.consumers[0].module is m.head
    assert found.skipped[0].name == "head" and "model output" in found.skipped[0].reason
    y0 = m(x)
    shrink_to_widths(m, {"a": 2})  # b's offset follows a's live width
    assert b.consumers[0].offset == 2 and m.bn.num_features == 7 and m.c.in_channels == 7
    assert m(x).shape == y0.shape


@pytest.mark.parametrize("site", ["a", "b", "c"])
def test_concat_block_planted_duplicate_merges_exactly(site):
    torch.manual_seed(0)
    m = ConcatBlock()
    _randomize_bn(m)
    x = torch.randn(3, 2, 4, 4)
    s = {s.name: s for s in find_sites(m, x).sites}[site]
    w = s.width
    assert planted_error(m, x, s) < 1e-5
    assert s.width == w - 1


class SEBlock(nn.Module):
    """pw conv + BN + ReLU, squeeze-excitation gate, pw conv (torchvision's SqueezeExcitation layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.conv2(h * s).mean((2, 3))


def test_squeeze_excitation_gate_joins_the_site():
    torch.manual_seed(0)
    m = SEBlock()
    _randomize_bn(m)
    x = torch.randn(2, 3, 5, 5)
    found = find_sites(m, x)
    by = {s.name: s for s in found.sites}
    main = by["conv1"]
    assert [(p.module, p.norm) for p in main.producers] == [(m.conv1, m.bn1), (m.fc2, None)]
    assert [c.module for c in main.consumers] == [m.fc1, m.conv2]
    assert main.gated and "gated" in main.kind and main.activation == "mixed" and main.tap is None
    assert [c.module for c in by["fc1"].consumers] == [m.fc2]
    assert planted_error(m, x, main) < 1e-5
    # folding two different neurons into a mixed one is refused on a gated site, with the reason
    from hashexp.merge.surgery import apply_plan, check_plan, merge_plan

    plan = merge_plan(by["fc1"], torch.tensor([0, 0]))
    check_plan(by["fc1"], plan)  # a plain site accepts it
    with pytest.raises(ConfigError, match="gate multiplies"):
        check_plan(main, merge_plan(main, torch.arange(main.width) // 2, representative="mean"))
    with pytest.raises(ConfigError, match="gate multiplies"):
        from hashexp.merge.hashed import HashCompressor

        HashCompressor(compensation="weights", target_ratio=0.5, threshold=-1.0, sites=["conv1"]).compress(
            m, None, None, None, 0)
    assert apply_plan is not None


class DepthwiseSeparable(nn.Module):
    """MobileNetV2 inverted residual without the residual: expand, depthwise, project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = nn.functional.relu6(self.bn2(self.dw(h)))
        return self.project(h).flatten(1)


def test_depthwise_conv_joins_the_site_and_loses_the_same_channels():
    torch.manual_seed(0)
    m = DepthwiseSeparable()
    _randomize_bn(m)
    x = torch.randn(2, 4, 6, 6)
    found = find_sites(m, x)
    assert [s.name for s in found.sites] == ["expand"]
    s = found.sites[0]
    assert [mm.module for mm in s.members] == [m.dw, m.bn2] and s.activation == "relu6"
    assert s.producers[0].norm is m.bn1 and [c.module for c in s.consumers] == [m.project]
    assert "depthwise" in s.kind
    shrink_to_widths(m, {"expand": 5})
    assert (m.dw.in_channels, m.dw.out_channels, m.dw.groups, tuple(m.dw.weight.shape)) == (5, 5, 5, (5, 1, 3, 3))
    assert m.bn2.num_features == 5 and m.project.in_channels == 5
    assert m(x).shape == (2, 4 * 36)
    m2 = DepthwiseSeparable()
    _randomize_bn(m2)
    s2 = find_sites(m2, x).sites[0]
    assert planted_error(m2, x, s2) < 1e-5


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on patch embeddings (ViT style)."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        return self.head(h[:, 0])


def test_transformer_ffn_is_a_site_and_its_stream_is_refused():
    torch.manual_seed(0)
    m = TransformerBlock()
    x = torch.randn(2, 5, 12)
    found = find_sites(m, x)
    assert [s.name for s in found.sites] == ["fc1"]
    ffn = found.sites[0]
    assert ffn.activation == "gelu" and ffn.tap is m.act and not ffn.homogeneous
    assert [c.module for c in ffn.consumers] == [m.fc2]
    skipped = {s.name: s.reason for s in found.skipped}
    assert "LayerNorm at ln1 normalizes over the channel axis" in skipped["embed"]
    assert "MultiheadAttention" in skipped["embed"]
    # the FFN merges: planted duplicates exactly, half of it by least squares on tokens
    m2 = copy.deepcopy(m)
    assert planted_error(m2, x, model_sites_of(m2, x)[0]) < 1e-5
    y0 = m(x)
    compress_half(m, torch.randn(16, 5, 12), sites=["fc1"])
    assert m.fc1.out_features == 16 and m.fc2.in_features == 16
    assert rel(m(x), y0) < 1.0


def model_sites_of(m, x):
    return find_sites(m, x).sites


# ------------------------------------------------------------------ refusals, each with its reason
class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.a(x)
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)  # channel shuffle
        return self.b(h).mean((2, 3))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.g(torch.relu(self.a(x))))).mean((2, 3))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.shared(torch.relu(self.shared(torch.relu(self.a(x))))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.c.weight = self.b.weight
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.b(self.gn(self.a(x)))
        return self.c(torch.cumsum(h, 1)).mean((2, 3))


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.rnn = nn.GRU(6, 5, batch_first=True)
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, t):
        h = self.rnn(self.emb(t))[0]
        return self.b(torch.relu(self.a(h))).softmax(-1)


@pytest.mark.parametrize("model,x,expected", [
    (Shuffle, torch.randn(2, 3, 4, 4), {"a": "view at <model> reshapes (2, 8, 4, 4) -> (2, 2, 4, 4, 4)"}),
    (Grouped, torch.randn(2, 3, 4, 4), {"a": "grouped conv g (groups=2)", "g": "grouped conv g (groups=2)"}),
    (Twice, torch.randn(2, 4), {"a": "module shared is called 2 times", "shared": "module shared is called 2 times"}),
    (Tied, torch.randn(2, 4), {"a": "module b shares (ties) its weights", "c": "module c shares (ties) its weights"}),
    (Norms, torch.randn(2, 3, 4, 4), {"a": "GroupNorm at gn normalizes across channels",
                                      "b": "unknown op cumsum at <model> on the channels"}),
    (Seq, torch.randint(0, 10, (2, 5)), {"b": "softmax at <model> normalizes over the channels"}),
])
def test_refusals_name_the_op_and_the_module(model, x, expected):
    torch.manual_seed(0)
    found = find_sites(model(), x)
    skipped = {s.name: s.reason for s in found.skipped}
    for name, reason in expected.items():
        assert reason in skipped[name], (name, skipped)
    assert not set(expected) & {s.name for s in found.sites}


def test_rnn_and_embedding_outputs_stay_whole_and_the_head_after_them_merges():
    found = find_sites(Seq(), torch.randint(0, 10, (2, 5)))
    assert [s.name for s in found.sites] == ["a"]
    skipped = {s.name: s.reason for s in found.skipped}
    assert "an embedding table" in skipped["emb"] and "an RNN" in skipped["rnn"]


def test_verification_by_number_refuses_a_wrong_claim():
    from hashexp.merge.discovery.verify import verify_sites

    torch.manual_seed(0)
    m = Shuffle()
    x = torch.randn(2, 3, 4, 4)
    wrong = MergeSite("a", [Producer(m.a)], [Consumer(m.b)], activation="identity")  # the shuffle moves channels
    failed = verify_sites(m, x, [wrong])
    assert "changed input entries" in failed["a"] and "consumer b" in failed["a"]
    good = find_sites(ConcatBlock(), torch.randn(2, 2, 4, 4)).sites
    assert verify_sites(ConcatBlock(), torch.randn(2, 2, 4, 4), []) == {}
    assert len(good) == 3


def test_ignore_leaves_sites_whole_and_unknown_names_are_an_error():
    m = ConcatBlock()
    found = find_sites(m, torch.randn(2, 2, 4, 4), ignore=["b"])
    assert [s.name for s in found.sites] == ["a", "c"]
    assert {s.name: s.reason for s in found.skipped}["b"] == "ignored by the caller"
    with pytest.raises(ConfigError, match="match no site"):
        find_sites(m, torch.randn(2, 2, 4, 4), ignore=["nope"])


# ------------------------------------------------------------------ torchvision: random init, no downloads
def _tv_size(name: str) -> int:
    if name.startswith(("vit", "maxvit")):
        return 224
    if name.startswith("inception"):
        return 96
    if name.startswith(("swin", "convnext", "alexnet", "googlenet")):
        return 64
    return 32


def check_torchvision(name: str, all_sites: bool) -> None:
    """Find sites (or refuse with reasons); no-op, planted duplicates, keep=0.5 on some or all sites;
    then another batch size (and resolution for convnets), train mode + backward, rebuild + load."""
    torchvision = pytest.importorskip("torchvision")
    from hashexp.metrics import count_flops

    torch.manual_seed(0)
    s = _tv_size(name)
    kw = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    build = lambda: torchvision.models.get_model(name, num_classes=10, **kw).eval()  # noqa: E731
    m = build()
    x = torch.randn(2, 3, s, s)
    m0_state = copy.deepcopy(m.state_dict())
    with torch.no_grad():
        m0_out = m(x)
    found = find_sites(m, x)
    assert found.sites or found.skipped
    assert all(sk.reason for sk in found.skipped)
    if not found.sites:
        return
    picks = found.sites if all_sites else list({id(t): t for t in (found.sites[0], found.sites[len(found.sites) // 2],
                                                                     found.sites[-1])}.values())
    names = [t.name for t in picks]
    m0 = copy.deepcopy(m)
    assert noop_error(m0, x, find_sites(m0, x, verify=False).sites) <= 1e-5
    for n in names:
        mp = copy.deepcopy(m)
        site = {t.name: t for t in find_sites(mp, x, verify=False).sites}[n]
        assert planted_error(mp, x, site) < 1e-4, n
    flops0 = count_flops(m, (3, s, s))
    before = {t.name: t.width for t in found.sites}
    compress_half(m, torch.randn(8, 3, s, s), sites=names, candidates="exact")
    widths = {t.name: t.width for t in find_sites(m, x, verify=False).sites}
    for n in names:
        assert widths[n] == max(1, round(before[n] * 0.5)), n
    assert count_flops(m, (3, s, s)) < flops0
    s2 = s if name.startswith(("vit", "maxvit")) else s + 16
    m.train()
    out = m(torch.randn(3, 3, s2, s2))
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.sum().backward()
    m.eval()
    fresh = build()
    shrink_to_widths(fresh, widths, x)
    fresh.load_state_dict(m.state_dict())  # every shape matches the merged model's
    plain = build()
    plain.load_state_dict(m0_state)
    if rel(plain(x), m0_out) < 1e-5:  # torchvision's Swin does not reproduce itself from its state dict alone
        assert rel(fresh(x), m(x)) < 1e-5


#: one model per family; the quick ones run in the default suite, the rest are marked slow
FAMILIES_FAST = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
                 "shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5"]
#: (alexnet, inception_v3, regnet_y, maxvit are in the `sweep` and in benchmarks/bench_anymodel.md)
FAMILIES_SLOW = ["googlenet", "densenet121", "vgg11_bn", "resnext50_32x4d", "convnext_tiny", "swin_t",
                 "wide_resnet50_2", "vit_b_32"]


@pytest.mark.parametrize("name", FAMILIES_FAST)
def test_torchvision_family(name):
    check_torchvision(name, all_sites=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES_SLOW)
def test_torchvision_family_slow(name):
    check_torchvision(name, all_sites=False)


def _num_params(name: str) -> int:
    torchvision = pytest.importorskip("torchvision")
    return int(torchvision.models.get_model_weights(name).DEFAULT.meta.get("num_params", 0))


def _all_torchvision() -> list[str]:
    try:
        import torchvision
    except ImportError:  # pragma: no cover
        return []
    return torchvision.models.list_models(module=torchvision.models)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("name", _all_torchvision())
def test_every_torchvision_classifier(name):
    limit = float(os.environ.get("HASHEXP_SWEEP_MAX_PARAMS", "100e6"))  # "inf": every model, memory permitting
    if _num_params(name) > limit:
        pytest.skip(f"{name}: {_num_params(name) / 1e6:.0f}M parameters, over HASHEXP_SWEEP_MAX_PARAMS={limit:g}")
    check_torchvision(name, all_sites=False)


# ------------------------------------------------------------------ activation mass, example inputs
def test_site_without_a_tap_measures_mass_on_its_first_consumer_input():
    from hashexp.merge.stats import ActivationStats

    torch.manual_seed(0)
    m = SEBlock()
    x = torch.randn(4, 3, 5, 5)
    site = {s.name: s for s in find_sites(m, x).sites}["conv1"]
    assert site.tap is None
    stats = ActivationStats([site], window=0)
    m.train()
    m(x)
    h = torch.relu(m.bn1(m.conv1(x)))
    assert torch.allclose(stats.mass("conv1"), h.mean((2, 3)).abs().sum(0), rtol=1e-5)  # fc1 reads pooled h
    stats.remove()


def test_model_sites_needs_an_example_for_a_plain_module_and_caches_the_trace():
    m = ConcatBlock()
    with pytest.raises(ConfigError, match="no example input"):
        model_sites(m)
    found = find_sites(m, torch.randn(2, 2, 4, 4))
    assert model_sites(m) is found.sites  # cached on the model
    m.c = nn.Conv2d(8, 4, 3, padding=1)  # a replaced module: traced again
    assert model_sites(m) is not found.sites and model_sites(m)[2].producers[0].module is m.c


def test_a_deep_copy_keeps_its_traced_sites_pointing_at_its_own_modules():
    m = ConcatBlock()
    find_sites(m, torch.randn(2, 2, 4, 4))
    c = copy.deepcopy(m)
    sites = model_sites(c)
    assert sites is c._hashexp_discovery.sites and sites[0].producers[0].module is c.a
    assert model_sites(m)[0].producers[0].module is m.a


class DataDependent(nn.Module):
    """Python control flow on values (common in timm/HF code): symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[0] > 1 and float(x.abs().max()) < 1e6:  # shape and value checks: fx cannot branch on them
            x = x * 2.0
        return self.b(torch.relu(self.a(x)))


def test_executing_tracer_follows_data_dependent_python_where_fx_stops():
    m = DataDependent()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(m)
    found = find_sites(m, torch.randn(2, 4))
    assert [s.name for s in found.sites] == ["a"] and found.sites[0].activation == "relu"
    # a branch on the site's own values is a read of every channel: refused, not guessed
    skipped = {s.name: s.reason for s in find_sites(Branchy(), torch.randn(2, 4)).skipped}
    assert "mean at <model> reduces over every axis" in skipped["a"]


class Branchy(DataDependent):
    def forward(self, x):
        h = torch.relu(self.a(x))
        if float(h.mean()) > -1.0:
            h = h * 2.0
        return self.b(h)


class AuxHead(nn.Module):
    """An auxiliary classifier that runs only in training mode (as GoogLeNet's)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.aux = nn.Linear(6, 2)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        out = self.b(self.drop(h))
        return (out, self.aux(h)) if self.training else out


def test_training_only_branches_are_traced_and_the_model_keeps_its_mode_and_state():
    m = AuxHead().eval()
    x = torch.randn(2, 4)
    y0 = m(x)
    rng = torch.get_rng_state()
    found = find_sites(m, x)
    assert [c.module for c in found.sites[0].consumers] == [m.b, m.aux]  # the aux head reads site a too
    assert not any(mm.training for mm in m.modules())  # left in eval mode, as it was
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(m(x), y0)
    m.train()
    find_sites(m, x)
    assert all(mm.training for mm in m.modules())


class StreamBlock(nn.Module):
    """MobileNetV3's first block: a depthwise conv and a 1x1 projection that writes back into the
    stream it read, so the projection is both a consumer and a producer of one site."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.proj(torch.relu(self.dw(h)))
        return self.fc(torch.relu(self.head(h)).mean((2, 3)))


def test_a_consumer_that_writes_back_into_its_own_stream_merges_planted_duplicates_exactly():
    from hashexp.merge.discovery.checks import compress_half, plant_duplicate

    torch.manual_seed(0)
    m = StreamBlock()
    x = torch.randn(32, 3, 6, 6)
    site = {s.name: s for s in find_sites(m, x[:2]).sites}["stem"]
    assert {id(p.module) for p in site.producers} == {id(m.stem), id(m.proj)}
    assert {id(c.module) for c in site.consumers} == {id(m.proj), id(m.head)}
    for i in range(4):
        plant_duplicate(site, i, i + 4)
    m.eval()
    with torch.no_grad():
        y = m(x)
    reports = compress_half(m, x, sites=["stem"], candidates="exact")
    assert [(r.site, r.before, r.after) for r in reports] == [("stem", 8, 4)]
    assert reports[0].error < 1e-3  # ridge only; the projection's old outputs are compared on the surviving channels
    assert m.proj.weight.shape == (4, 4, 1, 1) and m.dw.weight.shape[0] == 4
    with torch.no_grad():
        assert rel(m(x), y) < 1e-3
