"""The baselines against reference implementations written here from their papers' equations.

- Li et al. (ICLR 2017), structured L1 pruning: every hidden layer's neurons are ranked by the L1
  norm of their own [w; b] (a conv filter: the sum of its absolute kernel weights; a BatchNorm is
  not part of the score) on the *original* network; the top k stay and all layers are cut at once.
- Kim et al. (NeurIPS 2020), Neuron Merging: the same selection; each pruned neuron i joins the
  survivor j of largest cosine between their [w; b] rows when that cosine reaches t, with the norm
  ratio |p_i| / |p_j|: the scaling matrix Z (n x k) has Z[kept_j, j] = 1 and Z[i, j] = |p_i| / |p_j|.
  Selection, cosines and norms come from each layer's original rows; Z_l multiplies the next
  layer's columns, which already carry Z_{l-1} (W'_{l+1} = (W_{l+1} Z_l)[kept_{l+1}]).

The references are a few lines of numpy each, run on a small MLP trained in the test and on a
conv+BN net; hashexp must give the same kept indices, the same Z and the same outputs to 1e-6.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.baselines import MagnitudePruner, NeuronMerging
from hashexp.merge.sites import Consumer, HasMergeSites, MergeSite, Producer
from hashexp.models.mlp import MLP


# ----------------------------------------------------------------------------- references (numpy)
def ref_keep(rows: np.ndarray, k: int) -> np.ndarray:
    """Li et al.: indices of the k largest L1 norms of the rows, in index order."""
    return np.sort(np.argsort(-np.abs(rows).sum(1), kind="stable")[:k])


def ref_scaling(rows: np.ndarray, keep: np.ndarray, t: float) -> np.ndarray:
    """Kim et al.: Z (n, k), 1 for survivors, |p_i| / |p_j| to the most cosine-similar survivor j if cos >= t."""
    norm = np.linalg.norm(rows, axis=1)
    cos = (rows / norm[:, None]) @ (rows[keep] / norm[keep][:, None]).T
    z = np.zeros((len(rows), len(keep)))
    for i in range(len(rows)):  # the paper's loop, kept literal: this is the reference
        if i in keep:
            z[i, np.flatnonzero(keep == i)[0]] = 1.0
        elif cos[i].max() >= t:
            j = int(cos[i].argmax())
            z[i, j] = norm[i] / norm[keep[j]]
    return z


def ref_mlp(ws: list[np.ndarray], bs: list[np.ndarray], ks: list[int], t: float | None, sequential: bool = False):
    """The pruned (t None) or merged MLP of the papers; ``sequential`` scores each layer after the
    previous one was cut (the old hashexp behaviour). Returns new weights, biases, kept indices, Zs."""
    ws, bs = [w.copy() for w in ws], [b.copy() for b in bs]
    keeps, zs = [], []
    z_prev = None
    for l, k in enumerate(ks):
        w_in = ws[l] if z_prev is None else ws[l] @ z_prev  # columns already folded by the layer before
        rows = np.hstack([w_in if sequential else ws[l], bs[l][:, None]])
        keep = ref_keep(rows, k)
        z = np.eye(len(rows))[:, keep] if t is None else ref_scaling(rows, keep, t)
        keeps.append(keep)
        zs.append(z)
        ws[l], bs[l] = w_in[keep], bs[l][keep]
        z_prev = z
    ws[-1] = ws[-1] @ z_prev
    return ws, bs, keeps, zs


def mlp_forward(ws, bs, x: np.ndarray) -> np.ndarray:
    h = x
    for l, (w, b) in enumerate(zip(ws, bs)):
        h = h @ w.T + b
        if l < len(ws) - 1:
            h = np.maximum(h, 0.0)
    return h


# ----------------------------------------------------------------------------- helpers
def trained_mlp(seed: int = 0) -> tuple[MLP, torch.Tensor]:
    """A fresh copy of the trained MLP of :func:`_trained_mlp` and its inputs."""
    import copy

    m, x = _trained_mlp(seed)
    return copy.deepcopy(m), x


@functools.lru_cache(maxsize=None)
def _trained_mlp(seed: int) -> tuple[MLP, torch.Tensor]:
    """A 20-48-32-5 ReLU MLP trained for 300 Adam steps on Gaussian blobs (a few seconds)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 20, generator=g) * 2.0
    y = torch.randint(0, 5, (2000,), generator=g)
    x = centres[y] + torch.randn(2000, 20, generator=g)
    torch.manual_seed(seed)
    m = MLP(20, 5, widths=(48, 32))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for step in range(300):
        idx = torch.randint(0, 2000, (128,), generator=g)
        loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert (m(x).argmax(1) == y).float().mean() > 0.9  # it learned: the weights are not random
    return m, x


def mlp_arrays(m: MLP) -> tuple[list[np.ndarray], list[np.ndarray]]:
    lin = [l for l in m.layers]
    return ([l.weight.detach().double().numpy() for l in lin], [l.bias.detach().double().numpy() for l in lin])


def recorded_plans(comp) -> dict:
    """Wrap ``comp.plan_site`` so the plans it makes are kept by site name."""
    plans = {}
    inner = comp.plan_site

    def spy(site, *a, **kw):
        plans[site.name] = inner(site, *a, **kw)
        return plans[site.name]

    comp.plan_site = spy
    return plans


def assert_same_outputs(out: np.ndarray, ref: np.ndarray) -> None:
    """Equal to 1e-6 of the output scale (the compressed weights are float32, the reference float64)."""
    np.testing.assert_allclose(out, ref, atol=1e-6 * np.abs(ref).max(), rtol=0)


def as_double(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The compressed model's output computed in float64 (its float32 weights as they are), so the
    comparison with the float64 reference measures the method, not float32 rounding."""
    import copy

    return copy.deepcopy(model).double()(x.double()).detach().numpy()


def plan_z(plan) -> np.ndarray:
    """hashexp's plan as the paper's scaling matrix Z (n, k): Z[i, labels_i] = m_i."""
    lab, m = plan.labels.cpu().numpy(), plan.m.detach().double().cpu().numpy()
    z = np.zeros((len(lab), plan.new_width))
    on = lab >= 0
    z[np.flatnonzero(on), lab[on]] = m[on]
    return z


# ----------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("keep", [0.5, 0.3, 0.2])
def test_magnitude_is_li_et_al_on_a_trained_mlp(keep):
    m, x = trained_mlp()
    ws, bs = mlp_arrays(m)
    ks = [int(round(48 * keep)), int(round(32 * keep))]
    rws, rbs, keeps, _ = ref_mlp(ws, bs, ks, None)
    plans = recorded_plans(comp := MagnitudePruner(target_ratio=keep, compensation="none", min_width=1))
    comp.compress(m, None, None, None, step=0)
    assert m.widths() == {"fc1": ks[0], "fc2": ks[1]}
    for name, kp in zip(("fc1", "fc2"), keeps):
        assert np.array_equal(np.flatnonzero(plans[name].labels.cpu().numpy() >= 0), kp)
    for l, (rw, rb) in enumerate(zip(rws, rbs)):
        np.testing.assert_allclose(m.layers[l].weight.detach().double().numpy(), rw, atol=1e-6)
        np.testing.assert_allclose(m.layers[l].bias.detach().double().numpy(), rb, atol=1e-6)
    out = as_double(m, x)
    assert_same_outputs(out, mlp_forward(rws, rbs, x.double().numpy()))


def test_sequential_scoring_is_the_old_behaviour_and_differs_on_a_trained_mlp():
    """``scoring=sequential`` ranks fc2 on its already-cut columns: the reference with that rule
    agrees, and on this trained MLP it keeps other fc2 neurons than the paper's ranking."""
    m, x = trained_mlp()
    ws, bs = mlp_arrays(m)
    ks = [10, 6]
    _, _, keeps_orig, _ = ref_mlp(ws, bs, ks, None)
    rws, rbs, keeps_seq, _ = ref_mlp(ws, bs, ks, None, sequential=True)
    plans = recorded_plans(comp := MagnitudePruner(target_width={"fc1": 10, "fc2": 6}, scoring="sequential",
                                                   compensation="none"))
    comp.compress(m, None, None, None, step=0)
    assert np.array_equal(np.flatnonzero(plans["fc2"].labels.cpu().numpy() >= 0), keeps_seq[1])
    assert_same_outputs(as_double(m, x), mlp_forward(rws, rbs, x.double().numpy()))
    assert not np.array_equal(keeps_orig[1], keeps_seq[1])


@pytest.mark.parametrize("keep,t", [(0.5, 0.1), (0.3, 0.45), (0.2, 0.0)])
def test_neuron_merging_is_kim_et_al_on_a_trained_mlp(keep, t):
    m, x = trained_mlp()
    ws, bs = mlp_arrays(m)
    ks = [int(round(48 * keep)), int(round(32 * keep))]
    rws, rbs, keeps, zs = ref_mlp(ws, bs, ks, t)
    assert all((z > 0).sum() > k for z, k in zip(zs, ks))  # some pruned neurons really merge
    plans = recorded_plans(comp := NeuronMerging(target_ratio=keep, threshold=t, min_width=1))
    comp.compress(m, None, None, None, step=0)
    for name, kp, z in zip(("fc1", "fc2"), keeps, zs):
        assert np.array_equal(np.flatnonzero(plans[name].r.cpu().numpy() > 0), kp)
        np.testing.assert_allclose(plan_z(plans[name]), z, atol=1e-6, rtol=0)
    for l, (rw, rb) in enumerate(zip(rws, rbs)):
        np.testing.assert_allclose(m.layers[l].weight.detach().double().numpy(), rw, atol=1e-6)
    out = as_double(m, x)
    assert_same_outputs(out, mlp_forward(rws, rbs, x.double().numpy()))


def test_scoring_is_validated():
    with pytest.raises(ConfigError, match=r"^hashing.scoring='first'; choose original .* or sequential"):
        MagnitudePruner(target_ratio=0.5, scoring="first")


# ----------------------------------------------------------------------------- conv + BN
class ConvBNNet(nn.Module, HasMergeSites):
    """conv(3->8)-BN-ReLU -> conv(8->12)-BN-ReLU -> global average pool -> Linear(12->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))

    def merge_sites(self) -> list[MergeSite]:
        return [MergeSite("c1", [Producer(self.conv1, self.bn1)], [Consumer(self.conv2)], tap=self.act1),
                MergeSite("c2", [Producer(self.conv2, self.bn2)], [Consumer(self.fc)], tap=self.act2)]


def conv_bn_net() -> ConvBNNet:
    torch.manual_seed(1)
    net = ConvBNNet()
    with torch.no_grad():  # BN statistics and affines far from the identity, so folding matters
        for bn in (net.bn1, net.bn2):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n) * 0.3)
            bn.running_var.copy_(torch.rand(n) * 2 + 0.2)
            bn.weight.copy_(torch.rand(n) * 1.5 + 0.1)
            bn.weight[1] *= -1.0  # one negative gamma: no positive rescaling into or out of channel 1
            bn.bias.copy_(torch.randn(n) * 0.2)
    return net.eval()


def bn_np(bn) -> tuple[np.ndarray, np.ndarray]:
    """Eval BatchNorm as y = c x + d."""
    c = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.double().numpy() + bn.eps)
    return c, bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * c


def ref_conv_bn_scaling(k: np.ndarray, bn, keep: np.ndarray, t: float, lam: float, rule: str = "paper") -> np.ndarray:
    """Kim et al.'s Conv-BN rule, Z (n, k), from the equations (hashexp/merge/neuron_merging.py's docstring).

    Channel i after BN: gamma_i (W_i * x - mu_i) / sigma_i + beta_i. For pruned n and kept m with
    s = |W_n| / |W_m|: BN_n = S BN_m + B, S = s gamma_n sigma_m / (gamma_m sigma_n),
    B = beta_n - S beta_m + gamma_n / sigma_n (s mu_m - mu_n), sigma = sqrt(var + eps); n joins the
    m minimizing lam (1 - cos) + (1 - lam) * minmax(|B| / S) over the m with S > 0, with Z = S, if
    cos >= t. ``rule="code"``: the authors' code's terms (sigma = var, pruned and kept swapped in S
    and B, no sign check).
    """
    w = k.reshape(len(k), -1)
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    mu, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    sigma = np.sqrt(var + bn.eps) if rule == "paper" else var
    norm = np.linalg.norm(w, axis=1)
    z = np.zeros((len(w), len(keep)))
    for n in range(len(w)):  # literal loops: this is the reference
        if n in keep:
            z[n, np.flatnonzero(keep == n)[0]] = 1.0
            continue
        cos, scale, dist = [], [], []
        for m in keep:
            s = norm[n] / norm[m]
            if rule == "paper":
                S = s * gamma[n] * sigma[m] / (gamma[m] * sigma[n])
                B = beta[n] - S * beta[m] + gamma[n] / sigma[n] * (s * mu[m] - mu[n])
            else:
                S = s * gamma[m] * sigma[n] / (gamma[n] * sigma[m])
                B = gamma[m] / sigma[m] * (s * (mu[n] - sigma[n] * beta[n] / gamma[n]) - mu[m]) + beta[m]
            cos.append(w[n] @ w[m] / (norm[n] * norm[m]))
            scale.append(S)
            dist.append(abs(B) / S if (S > 0 or rule == "code") else np.nan)
        dist = np.array(dist)
        ok = ~np.isnan(dist)
        if not ok.any():  # no survivor is a positive rescaling: n is dropped
            continue
        lo, hi = dist[ok].min(), dist[ok].max()
        d_hat = (dist - lo) / (hi - lo) if hi > lo else np.zeros_like(dist)
        score = np.where(ok, lam * (1 - np.array(cos)) + (1 - lam) * d_hat, np.inf)
        j = int(np.argmin(score))
        if cos[j] >= t:
            z[n, j] = scale[j]
    return z


def ref_conv_net(net: ConvBNNet, ks: list[int], t: float | None, rule: str = "folded", lam: float = 0.85):
    """The cut (t None: Li et al., raw kernels) or merged conv net as arrays: conv kernels, BN (c, d)
    per kept channel, fc; plus kept indices and Zs. Merged: Neuron Merging's Conv-BN rule (``paper``,
    ``code``: selection by raw-kernel L1) or the plain rule on BN-folded filters (``folded``)."""
    k1, k2 = net.conv1.weight.detach().double().numpy(), net.conv2.weight.detach().double().numpy()
    (c1, d1), (c2, d2) = bn_np(net.bn1), bn_np(net.bn2)
    fc_w, fc_b = net.fc.weight.detach().double().numpy(), net.fc.bias.detach().double().numpy()
    if t is None or rule != "folded":  # Li et al.: the sum of |kernel| of each filter; a bias-free conv adds b = 0
        rows = [k1.reshape(8, -1), k2.reshape(12, -1)]
    else:  # BN folded: filter c * K, bias d
        rows = [np.hstack([c1[:, None] * k1.reshape(8, -1), d1[:, None]]),
                np.hstack([c2[:, None] * k2.reshape(12, -1), d2[:, None]])]
    keeps = [ref_keep(r, k) for r, k in zip(rows, ks)]
    if t is None:
        zs = [np.eye(len(r))[:, kp] for r, kp in zip(rows, keeps)]
    elif rule == "folded":
        zs = [ref_scaling(r, kp, t) for r, kp in zip(rows, keeps)]
    else:
        zs = [ref_conv_bn_scaling(k, bn, kp, t, lam, rule) for k, bn, kp in zip((k1, k2), (net.bn1, net.bn2), keeps)]
    k2_in = np.einsum("oihw,ij->ojhw", k2, zs[0])  # Z_1 folds into conv2's input channels
    return dict(k1=k1[keeps[0]], bn1=(c1[keeps[0]], d1[keeps[0]]), k2=k2_in[keeps[1]],
                bn2=(c2[keeps[1]], d2[keeps[1]]), fc_w=fc_w @ zs[1], fc_b=fc_b, keeps=keeps, zs=zs)


def conv_forward(r: dict, x: torch.Tensor) -> np.ndarray:
    t = {k: torch.as_tensor(v) for k, v in r.items() if k in ("k1", "k2", "fc_w", "fc_b")}
    h = nn.functional.conv2d(x.double(), t["k1"], padding=1)
    h = torch.relu(h * torch.as_tensor(r["bn1"][0])[:, None, None] + torch.as_tensor(r["bn1"][1])[:, None, None])
    h = nn.functional.conv2d(h, t["k2"], padding=1)
    h = torch.relu(h * torch.as_tensor(r["bn2"][0])[:, None, None] + torch.as_tensor(r["bn2"][1])[:, None, None])
    return (h.mean((2, 3)) @ t["fc_w"].T + t["fc_b"]).numpy()


@pytest.mark.parametrize("method,rule,t", [("magnitude", None, None), ("neuron_merging", "folded", 0.1),
                                           ("neuron_merging", "paper", 0.1), ("neuron_merging", "paper", -0.2),
                                           ("neuron_merging", "code", 0.1)])
def test_baselines_match_the_references_on_a_conv_bn_net(method, rule, t):
    """Same kept indices, the same Z and the same outputs to 1e-6 as the numpy references: Li et al.,
    Neuron Merging's Conv-BN rule (the paper's equations, and the authors' code's terms) and its plain
    rule on BN-folded filters."""
    net = conv_bn_net()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = ref_conv_net(net, [3, 5], t, rule or "folded", lam=0.7)
    if t is not None:
        assert (ref["zs"][0][~np.isin(np.arange(8), ref["keeps"][0])] != 0).sum() >= 2  # pruned channels really merge
    comp = MagnitudePruner(target_width={"c1": 3, "c2": 5}, compensation="none") if t is None else \
        NeuronMerging(target_width={"c1": 3, "c2": 5}, threshold=t, bn_rule=rule, bn_lambda=0.7)
    plans = recorded_plans(comp)
    comp.compress(net, None, None, None, step=0)
    for name, kp, z in zip(("c1", "c2"), ref["keeps"], ref["zs"]):
        np.testing.assert_allclose(plan_z(plans[name]), z, atol=1e-6, rtol=0)
        assert np.array_equal(np.flatnonzero(plans[name].r.cpu().numpy() > 0), kp)
    assert_same_outputs(as_double(net, x), conv_forward(ref, x))


def test_the_conv_bn_rules_differ_on_this_net():
    """The paper's Conv-BN rule, the authors' code's terms and the plain rule on folded filters are
    three different scaling matrices here (so the test above tells them apart)."""
    net = conv_bn_net()
    zs = {rule: ref_conv_net(net, [3, 5], 0.1, rule, lam=0.7)["zs"][0] for rule in ("paper", "code", "folded")}
    assert not np.allclose(zs["paper"], zs["code"], atol=1e-3)
    assert not np.allclose(zs["paper"], zs["folded"], atol=1e-3)
    assert (zs["code"] < 0).any() and not (zs["paper"] < 0).any()  # a negative gamma: the paper's S > 0 check


def planted_conv_bn_net() -> ConvBNNet:
    """conv1's channels 5-7 are 0.1x copies of channels 0-2 (the smallest L1 norms), their BN set so
    that BN_n = S BN_m exactly (B = 0): merging them into 0-2 changes nothing."""
    net = conv_bn_net()
    bn = net.bn1
    with torch.no_grad():
        bn.weight.abs_()
        for n, m in zip((5, 6, 7), (0, 1, 2)):
            net.conv1.weight[n] = 0.1 * net.conv1.weight[m]
            sig = (bn.running_var + bn.eps).sqrt()
            s, g = 0.1, bn.weight
            scale = s * g[n] * sig[m] / (g[m] * sig[n])
            bn.bias[n] = scale * bn.bias[m] - g[n] / sig[n] * (s * bn.running_mean[m] - bn.running_mean[n])
    return net


@pytest.mark.parametrize("rule,exact", [("paper", True), ("code", False)])
def test_conv_bn_rule_is_exact_on_planted_rescaled_channels(rule, exact):
    """Kim et al.'s merge condition: a pruned filter that is a positive rescaling of a survivor after
    its BN merges with no change in function. The paper's equations get it exactly; the authors'
    code's terms (sigma = var, roles swapped) pair the same channels with the wrong scale."""
    net = planted_conv_bn_net()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y0 = as_double(net, x)
    plans = recorded_plans(comp := NeuronMerging(target_width={"c1": 5, "c2": 12}, threshold=0.99, bn_rule=rule))
    comp.compress(net, None, None, None, step=0)
    assert plans["c1"].labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    err = np.abs(as_double(net, x) - y0).max() / np.abs(y0).max()
    assert (err < 1e-6) if exact else (err > 1e-3), err


def test_conv_bn_rule_with_no_merge_is_magnitude_pruning():
    """With t above every cosine nothing merges: the Conv-BN rule then cuts exactly the channels Li
    et al. cut (raw-kernel L1), so the network equals magnitude pruning's, tensor for tensor."""
    nets = [conv_bn_net(), conv_bn_net()]
    NeuronMerging(target_width={"c1": 3, "c2": 5}, threshold=1.0, bn_rule="paper").compress(nets[0], None, None, None, step=0)
    MagnitudePruner(target_width={"c1": 3, "c2": 5}, compensation="none").compress(nets[1], None, None, None, step=0)
    a, b = nets[0].state_dict(), nets[1].state_dict()
    assert a.keys() == b.keys() and a["conv1.weight"].shape[0] == 3
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conv_bn_knobs_are_validated():
    with pytest.raises(ConfigError, match=r"^hashing.bn_rule='bn'; choose paper .*, code .* or folded"):
        NeuronMerging(target_ratio=0.5, bn_rule="bn")
    with pytest.raises(ConfigError, match=r"^hashing.bn_lambda must be in \[0, 1\]"):
        NeuronMerging(target_ratio=0.5, bn_lambda=1.5)
    from hashexp.compress import make_compressor

    assert make_compressor("neuron_merging", 0.5, bn_rule="code").bn_rule == "code"
    assert make_compressor("neuron_merging", 0.5).bn_rule == "paper"  # conf/hashing/neuron_merging.yaml's default
    with pytest.raises(ConfigError, match=r"^bn_rule: not keys of conf/hashing/magnitude.yaml"):
        make_compressor("magnitude", 0.5, bn_rule="paper")
