"""Function-preserving merging: calibration, least-squares compensation, error budget, Neuron Merging.

Invariants: planted duplicates, rescalings and dead neurons go at (almost) zero error; neurons
that are exact linear combinations of others on an identity site are absorbed to float
precision; the measured error never exceeds the budget and a larger budget never leaves a wider
network; conv consumers take the same channel map at every kernel position.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.rehasher import Rehasher
from hashexp.merge.baselines import MagnitudePruner, NeuronMerging, neuron_merging_coefficients
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.sites import Consumer, HasMergeSites, MergeSite, Producer
from hashexp.models import build_model
from test_merge import MLP, planted_mlp, rel_err


def lsq(**kw):
    base = dict(bits=6, tables=16, min_width=1, seed=0, compensation="lsq", ridge=1e-8)
    base.update(kw)
    return HashCompressor(**base)


@pytest.mark.parametrize("candidates", ["activations", "weights", "exact"])
def test_planted_duplicates_and_rescalings_go_exactly_with_lsq(candidates):
    m = planted_mlp("relu")
    x = torch.randn(512, 12)
    y0 = m(x).detach()
    reps = lsq(candidates=candidates, max_error=1e-4).compress(m, None, None, None, step=0, calib=x)
    # exactly the 5 + 3 planted copies are redundant; nothing else fits a 1e-4 budget
    assert m.widths() == {"fc1": 35, "fc2": 27}
    assert all(r["error"] < 1e-4 for r in reps), reps
    assert rel_err(m(x).detach(), y0) < 1e-4
    # on samples the fit never saw, too: the copies are exact, not fitted
    x2 = torch.randn(256, 12)
    m0 = planted_mlp("relu")
    assert rel_err(m(x2).detach(), m0(x2).detach()) < 1e-4


def test_mean_representatives_with_lsq_are_exact_on_duplicates():
    m = planted_mlp("relu")
    x = torch.randn(512, 12)
    y0 = m(x).detach()
    lsq(candidates="exact", max_error=1e-4, representative="mean").compress(m, None, None, None, step=0, calib=x)
    assert m.widths() == {"fc1": 35, "fc2": 27}
    assert rel_err(m(x).detach(), y0) < 1e-4


def test_dead_neurons_are_removed_at_zero_error():
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [24, 16]}, (12,), 5)
    dead = [3, 7, 8, 20]
    with torch.no_grad():
        m.layers[0].bias[dead] = -1e3  # never fires on these inputs
    x = torch.randn(512, 12)
    y0 = m(x).detach()
    comp = lsq(candidates="exact", max_error=1e-4, ridge=1e-3)
    reps = comp.compress(m, ["fc1"], None, None, step=0, calib=x)
    assert m.widths()["fc1"] == 20 and reps[0]["error"] < 1e-6
    assert rel_err(m(x).detach(), y0) < 1e-6
    assert float(m.layers[0].bias.detach().min()) > -1e3  # the dead ones are the ones that went


class LinearSite(nn.Module, HasMergeSites):
    """x -> Linear(16, 20) -> identity -> Linear(20, 5); neurons 15..19 are combinations of 0..14."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.tap = nn.Linear(16, 20), nn.Linear(20, 5), nn.Identity()
        with torch.no_grad():
            base_w, base_b = torch.randn(15, 16, generator=g), torch.randn(15, generator=g)
            mix = torch.randn(5, 15, generator=g)
            self.fc1.weight.copy_(torch.cat([base_w, mix @ base_w]))
            self.fc1.bias.copy_(torch.cat([base_b, mix @ base_b]))

    def forward(self, x):
        return self.fc2(self.tap(self.fc1(x)))

    def merge_sites(self):
        return [MergeSite("h", [Producer(self.fc1)], [Consumer(self.fc2)], activation="identity", tap=self.tap)]


def test_linear_combinations_on_an_identity_site_are_absorbed_to_float_precision():
    import copy

    m = LinearSite()
    m2, m3 = copy.deepcopy(m), copy.deepcopy(m)
    x = torch.randn(400, 16, dtype=torch.float32)
    y0 = m(x).detach()
    reps = lsq(candidates="exact", target_width=15, ridge=1e-12).compress(m, None, None, None, step=0, calib=x)
    assert m.widths() == {"h": 15}
    assert reps[0]["error"] < 1e-5
    assert rel_err(m(x).detach(), y0) < 1e-5
    # magnitude keeps the largest rows; with lsq its survivors absorb the rest exactly as well,
    # because any 15 of these neurons that span the site reproduce it
    MagnitudePruner(target_width=15, compensation="lsq", ridge=1e-12).compress(m2, None, None, None, step=0, calib=x)
    assert rel_err(m2(x).detach(), y0) < 1e-5
    # and without compensation the same pruning is far off
    MagnitudePruner(target_width=15, compensation="weights").compress(m3, None, None, None, step=0)
    assert rel_err(m3(x).detach(), y0) > 0.05


def _trained_mlp(widths=(64, 48)):
    from hashexp.data.synthetic import load_synthetic

    data = load_synthetic(n_samples=1500, seed=0)
    torch.manual_seed(0)
    model = build_model({**MLP, "widths": list(widths)}, data.input_shape, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    return model, data


def test_budget_holds_and_a_larger_budget_never_gives_a_wider_network():
    import copy

    base, data = _trained_mlp()
    calib = data.x_train[:512]
    widths = []
    for budget in (0.01, 0.03, 0.1, 0.3):
        m = copy.deepcopy(base)
        reps = lsq(candidates="exact", max_error=budget, ridge=1e-3).compress(m, None, None, None, step=0, calib=calib)
        assert all(r["error"] <= budget + 1e-6 for r in reps), (budget, reps)
        widths.append(m.widths())
    for a, b in zip(widths, widths[1:]):
        assert all(b[k] <= a[k] for k in a), widths
    assert widths[-1]["fc1"] < widths[0]["fc1"] and widths[-1]["fc2"] < widths[0]["fc2"], widths
    assert widths[-1]["fc1"] <= 48 and widths[-1]["fc2"] <= 36, widths


def test_lsq_beats_the_weight_rule_at_the_same_width():
    import copy

    base, data = _trained_mlp()
    calib, x = data.x_train[:512], data.x_test
    y0 = base(x).detach()
    errs = {}
    for comp in ("lsq", "weights"):
        m = copy.deepcopy(base)
        MagnitudePruner(target_ratio=0.5, compensation=comp).compress(m, None, None, None, step=0, calib=calib)
        errs[comp] = rel_err(m(x).detach(), y0)
    # measured on unseen samples: lsq 0.30, weights (pruning without compensation) 0.60
    assert errs["lsq"] < 0.6 * errs["weights"], errs


def test_optimizer_state_follows_the_least_squares_map():
    m = planted_mlp("relu")
    x = torch.randn(512, 12)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    nn.functional.cross_entropy(m(x[:64]), torch.randint(0, 5, (64,))).backward()
    opt.step()
    lsq(candidates="exact", max_error=1e-3, ridge=1e-6).compress(m, None, None, opt, step=1, calib=x)
    params = list(m.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    for p in params:
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert bool((st["exp_avg_sq"] >= 0).all())


def test_conv_consumers_take_the_channel_map_at_every_kernel_position():
    from hashexp.models.resnet import ResNet20

    torch.manual_seed(0)
    m = ResNet20((3, 12, 12), 10, site_widths=None)
    m.eval()
    site = next(s for s in m.merge_sites() if s.name == "layer1.0.inner")
    with torch.no_grad():  # channel 5 of the inner width becomes a 2x copy of channel 2 (BN folded alike)
        conv, bn = site.producers[0].module, site.producers[0].norm
        conv.weight[5] = conv.weight[2]
        bn.running_mean[5], bn.running_var[5] = bn.running_mean[2], bn.running_var[2]
        bn.weight[5], bn.bias[5] = 2 * bn.weight[2], 2 * bn.bias[2]
    x = torch.randn(64, 3, 12, 12)
    y0 = m(x).detach()
    reps = lsq(candidates="exact", target_width=15, ridge=1e-10).compress(m, ["layer1.0.inner"], None, None,
                                                                          step=0, calib=x)
    assert m.widths()["layer1.0.inner"] == 15 and reps[0]["error"] < 1e-4
    assert rel_err(m(x).detach(), y0) < 1e-4


def test_lsq_on_every_resnet_site_keeps_outputs_close():
    from hashexp.models.resnet import ResNet20

    torch.manual_seed(0)
    m = build_model({"_target_": "hashexp.models.resnet.ResNet20"}, (3, 12, 12), 10)
    m.eval()
    x = torch.randn(96, 3, 12, 12)
    reps = lsq(candidates="activations", max_error=0.05, ridge=1e-3).compress(m, None, None, None, step=0, calib=x)
    assert len(reps) == len(m.merge_sites())
    assert all(r["error"] <= 0.05 + 1e-6 for r in reps), reps
    assert sum(m.widths().values()) < sum(ResNet20((3, 12, 12), 10).widths().values())


def test_neuron_merging_coefficients_follow_the_paper_rule_by_hand():
    # 4 neurons in 2-d ([w; b] rows); keep 2 by L1 norm: rows 0 (|3|+|1|=4) and 2 (|0|+|-5|=5)
    p = torch.tensor([[3.0, 1.0],     # kept
                      [1.5, 0.6],     # cos to row 0 = (4.5+0.6)/(sqrt(10)*sqrt(2.61)) = 0.998 -> fold, scale |p1|/|p0|
                      [0.0, -5.0],    # kept
                      [-1.0, 0.2]])   # best cosine: to row 2, -1 / (5 * 1.0198) = -0.196 < t -> dropped
    labels, m, survivor = neuron_merging_coefficients(p, keep=2, threshold=0.45)
    assert survivor.tolist() == [True, False, True, False]
    assert labels.tolist() == [0, 0, 1, -1]
    n0, n1 = (3.0**2 + 1.0**2) ** 0.5, (1.5**2 + 0.6**2) ** 0.5
    assert m.tolist() == pytest.approx([1.0, n1 / n0, 1.0, 0.0])
    # with t = -0.5 row 3 folds into row 2 (cosine -0.196; to row 0 it is (-3 + 0.2) / (sqrt(10) sqrt(1.04)) = -0.868)
    labels_lo, m_lo, _ = neuron_merging_coefficients(p, keep=2, threshold=-0.5)
    cos32 = float((p[3] @ p[2]) / (p[3].norm() * p[2].norm()))
    assert cos32 > -0.5 and labels_lo[3] == 1 and m_lo[3] == pytest.approx(float(p[3].norm() / p[2].norm()))


def test_neuron_merging_is_exact_on_planted_rescalings_in_an_mlp():
    m = planted_mlp("relu")
    x = torch.randn(256, 12)
    with torch.no_grad():  # copies at a tenth of their originals: the smallest L1 norms of their layers
        for layer, dst, src in ((m.layers[0], range(10, 15), range(0, 5)), (m.layers[1], range(20, 23), range(1, 4))):
            for d, s in zip(dst, src):
                layer.weight[d] = 0.1 * layer.weight[s]
                layer.bias[d] = 0.1 * layer.bias[s]
    y0 = m(x).detach()
    NeuronMerging(target_width={"fc1": 35, "fc2": 27}, threshold=0.99).compress(m, None, None, None, step=0)
    assert m.widths() == {"fc1": 35, "fc2": 27}
    assert rel_err(m(x).detach(), y0) < 1e-5


def test_bad_input_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"max_error must be a relative error in \(0, 1\]"):
        HashCompressor(max_error=1.5)
    with pytest.raises(ConfigError, match=r"max_error must be a relative error in \(0, 1\]"):
        HashCompressor(max_error=0.0)
    with pytest.raises(ConfigError, match="calib_samples must be >= 1"):
        Rehasher(HashCompressor(), calib_samples=0)
    with pytest.raises(ConfigError, match="calib_samples=500 exceeds the 300 training samples"):
        cal.calibration_index(300, 500, seed=0)
    with pytest.raises(ConfigError, match="compensation='bogus'"):
        HashCompressor(compensation="bogus")
    with pytest.raises(ConfigError, match="candidates='bogus'"):
        HashCompressor(candidates="bogus")
    m = planted_mlp("tanh")
    with pytest.raises(ConfigError, match="representative=keep with compensation=weights .* needs a ReLU-like"):
        HashCompressor(compensation="weights", representative="keep").compress(m, None, None, None, step=0)
    with pytest.raises(ConfigError, match="neuron_merging folds neurons by a positive scale"):
        NeuronMerging(target_ratio=0.5).compress(m, None, None, None, step=0)
    with pytest.raises(ConfigError, match="compensation=lsq needs calibration inputs"):
        HashCompressor().compress(planted_mlp(), None, None, None, step=0)
    assert m.widths() == {"fc1": 40, "fc2": 30}  # nothing was touched


def test_calibration_index_is_a_function_of_split_size_count_and_seed():
    a = cal.calibration_index(1000, 100, seed=3)
    assert torch.equal(a, cal.calibration_index(1000, 100, seed=3))
    assert not torch.equal(a, cal.calibration_index(1000, 100, seed=4))
    assert len(a) == 100 and len(set(a.tolist())) == 100 and int(a.max()) < 1000


def test_a_constant_channel_goes_into_the_next_batchnorm_of_a_bias_free_conv():
    """Removing a channel that is constant needs only an intercept; conv2 has no bias, so the
    intercept moves bn2's running mean, and the eval output stays close (the channel map cannot
    model conv2's zero padding, so border positions keep an error)."""
    import copy

    torch.manual_seed(0)
    m = build_model({"_target_": "hashexp.models.resnet.ResNet20"}, (3, 28, 28), 10)
    m.eval()
    blk = m.layer1[0]
    with torch.no_grad():  # inner channel 7: zero filter, positive BN shift -> relu(bias) everywhere
        blk.conv1.weight[7] = 0.0
        blk.bn1.bias[7] = 1.5
    pruned = copy.deepcopy(m)
    x = torch.randn(128, 3, 28, 28)
    y0 = m(x).detach()
    mean0 = blk.bn2.running_mean.clone()
    reps = lsq(candidates="exact", target_width=15, ridge=1e-6).compress(m, ["layer1.0.inner"], None, None,
                                                                         step=0, calib=x)
    assert m.widths()["layer1.0.inner"] == 15
    assert not torch.allclose(blk.bn2.running_mean, mean0)
    # the same channel pruned without compensation: the constant is simply lost
    from hashexp.merge.surgery import apply_plan, prune_plan

    site = next(s for s in pruned.merge_sites() if s.name == "layer1.0.inner")
    keep = torch.ones(16, dtype=torch.bool)
    keep[7] = False
    apply_plan(site, prune_plan(site, keep))
    err_lsq, err_plain = rel_err(m(x).detach(), y0), rel_err(pruned(x).detach(), y0)
    # measured: consumer error 0.25 (all of it at the borders), network output 0.015 vs 0.215 pruned
    assert reps[0]["error"] < 0.3 and err_lsq < 0.3 * err_plain, (reps, err_lsq, err_plain)


@pytest.mark.parametrize("rule", ["folded", "paper"])
def test_neuron_merging_folds_a_rescaled_conv_bn_channel_exactly(rule):
    """Conv+BN sites. ``folded``: the BN-folded filter of channel 5 is 0.1x channel 2's, so it has the
    smallest L1 norm, is pruned, and folds into channel 2 with m = 0.1. ``paper`` (the Conv-BN rule):
    channel 5's raw kernel is 0.1x channel 2's (the smallest raw L1) and its BN leaves no bias
    (B = 0), so it folds into channel 2 with the scale S. Either way the eval output is unchanged."""
    torch.manual_seed(0)
    m = build_model({"_target_": "hashexp.models.resnet.ResNet20"}, (3, 12, 12), 10)
    m.eval()
    conv, bn = m.layer1[0].conv1, m.layer1[0].bn1
    with torch.no_grad():
        if rule == "folded":
            conv.weight[5] = conv.weight[2]
            bn.running_mean[5], bn.running_var[5] = bn.running_mean[2], bn.running_var[2]
            bn.weight[5], bn.bias[5] = 0.1 * bn.weight[2], 0.1 * bn.bias[2]
        else:
            bn.running_mean.copy_(torch.randn(16) * 0.3)
            bn.running_var.copy_(torch.rand(16) + 0.5)
            bn.weight.copy_(torch.rand(16) + 0.5)
            conv.weight[5] = 0.1 * conv.weight[2]
            sig = (bn.running_var + bn.eps).sqrt()
            scale = 0.1 * bn.weight[5] * sig[2] / (bn.weight[2] * sig[5])
            bn.bias[5] = scale * bn.bias[2] - bn.weight[5] / sig[5] * (0.1 * bn.running_mean[2] - bn.running_mean[5])
    x = torch.randn(32, 3, 12, 12)
    y0 = m(x).detach()
    NeuronMerging(target_width=15, threshold=0.99, bn_rule=rule).compress(m, ["layer1.0.inner"], None, None, step=0)
    assert m.widths()["layer1.0.inner"] == 15
    assert rel_err(m(x).detach(), y0) < 1e-5


def test_learnable_hash_proposes_candidates_for_lsq():
    from hashexp.merge.learned import LearnableHashCompressor

    m = planted_mlp("relu")
    x = torch.randn(512, 12)
    y0 = m(x).detach()
    comp = LearnableHashCompressor(bits=4, tables=8, min_width=1, seed=0, updates=5, max_error=1e-4, ridge=1e-8)
    reps = comp.compress(m, None, None, None, step=0, calib=x)
    assert m.widths() == {"fc1": 35, "fc2": 27} and all(r["error"] < 1e-4 for r in reps)
    assert rel_err(m(x).detach(), y0) < 1e-4


def test_the_default_budget_is_the_models():
    from conftest import compose

    assert compose(["hashing=simhash"]).hashing.max_error == 0.02
    assert compose(["model=resnet20", "hashing=simhash"]).hashing.max_error == 0.1
    assert compose(["model=resnet20", "hashing=simhash", "hashing.max_error=0.3"]).hashing.max_error == 0.3
    assert compose(["model=resnet18", "hashing=learnable"]).hashing.max_error == 0.1
    m = build_model(compose(["model=resnet20"]).model, (3, 12, 12), 10)
    assert "merge_budget" not in m._hashexp_spec["kwargs"]


def test_round_to_gives_multiples_never_more_than_n_minus_1_above_the_budget_width():
    import copy

    base, data = _trained_mlp(widths=(64, 50))
    calib = data.x_train[:512]
    for budget in (0.05, 0.2):
        free, rounded = copy.deepcopy(base), copy.deepcopy(base)
        lsq(candidates="exact", max_error=budget, ridge=1e-3).compress(free, None, None, None, step=0, calib=calib)
        reps = lsq(candidates="exact", max_error=budget, ridge=1e-3, round_to=8).compress(
            rounded, None, None, None, step=0, calib=calib)
        for k in ("fc1", "fc2"):
            w, f = rounded.widths()[k], free.widths()[k]
            assert w % 8 == 0 or w == base.widths()[k], (k, w)
            assert f <= w <= f + 7, (k, f, w)
        assert all(r["error"] <= budget + 1e-6 for r in reps)
    # targets round up as well: 0.3 of 50 is 15 -> 16
    m = copy.deepcopy(base)
    MagnitudePruner(target_ratio=0.3, round_to=8).compress(m, None, None, None, step=0)
    assert m.widths() == {"fc1": 24, "fc2": 16}
    with pytest.raises(ConfigError, match="round_to must be an integer >= 1"):
        MagnitudePruner(target_ratio=0.3, round_to=0)


def test_candidates_auto_lists_all_pairs_below_the_crossover_and_hashes_above():
    m = planted_mlp("relu")
    x = torch.randn(512, 12)
    comp = lsq(candidates="auto", auto_width=35, max_error=1e-4)
    comp.compress(m, ["fc1"], None, None, step=0, calib=x)  # 40 neurons: at or above 35 -> hash
    assert comp.last_candidates == "activations"
    comp.compress(m, ["fc2"], None, None, step=0, calib=x)  # 30 neurons: below -> all pairs
    assert comp.last_candidates == "exact"
    assert m.widths() == {"fc1": 35, "fc2": 27}
    from hashexp.lsh.params import crossover_width

    assert HashCompressor(candidates="auto").crossover(256) == crossover_width(0.9, dim=256)
