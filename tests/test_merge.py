"""Merge engine invariants: planted duplicates merge with no change in function, optimizer state
follows the parameters, verified groups respect the threshold, impossible requests fail clearly."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from conftest import TINY, read_metrics, run_app, run_dirs
from hashexp.errors import ConfigError
from hashexp.merge.baselines import MagnitudePruner, RandomMerger
from hashexp.merge.cosine import verify_groups
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.surgery import apply_plan, merge_plan
from hashexp.models import build_model
from hashexp.merge.stats import ActivationStats

MLP = {"_target_": "hashexp.models.mlp.MLP"}


def planted_mlp(act="relu", noise=0.0, seed=0, widths=(40, 30), n_in=12):
    """An MLP whose hidden layers hold copies and positive rescalings of some neurons.

    Layer 1: neurons 10..14 are copies of 0..4 scaled by 0.5, 1, 2, 3, 0.25 (5 planted);
    layer 2: neurons 20..22 are copies of 1..3 scaled by 1.5, 1, 4 (3 planted).
    """
    torch.manual_seed(seed)
    m = build_model({**MLP, "widths": list(widths), "activation": act}, (n_in,), 5)
    scales1 = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25])
    scales2 = torch.tensor([1.5, 1.0, 4.0])
    if act != "relu":  # for non-homogeneous activations only exact copies are function-preserving
        scales1, scales2 = torch.ones(5), torch.ones(3)
    with torch.no_grad():
        for layer, src, dst, sc in ((m.layers[0], range(0, 5), range(10, 15), scales1),
                                    (m.layers[1], range(1, 4), range(20, 23), scales2)):
            for s, d, k in zip(src, dst, sc):
                layer.weight[d] = k * layer.weight[s] + noise * torch.randn_like(layer.weight[s])
                layer.bias[d] = k * layer.bias[s] + noise * torch.randn(())
    return m


def hashed(**kw):
    base = dict(threshold=0.9999, bits=8, tables=16, min_width=1, seed=0, compensation="weights")
    base.update(kw)
    return HashCompressor(**base)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_planted_duplicates_merge_exactly(act):
    m = planted_mlp(act)
    x = torch.randn(256, 12)
    y0 = m(x).detach()
    stats = ActivationStats(m.merge_sites(), window=10)
    m(x)  # accumulate activation mass (training mode)
    reports = hashed().compress(m, None, stats, None, step=0)
    assert m.widths() == {"fc1": 35, "fc2": 27}
    assert [(r["site"], r["before"], r["after"]) for r in reports] == [("fc1", 40, 35), ("fc2", 30, 27)]
    assert rel_err(m(x).detach(), y0) < 1e-5


def test_noise_gives_small_error_growing_with_noise():
    x = torch.randn(512, 12)
    errs = []
    for noise in (1e-4, 1e-3, 1e-2):
        m = planted_mlp(noise=noise)
        y0 = m(x).detach()
        # threshold loose enough to accept the noisy copies, strict enough to reject everything else
        hashed(threshold=0.95).compress(m, None, None, None, step=0)
        assert m.widths() == {"fc1": 35, "fc2": 27}, noise
        errs.append(rel_err(m(x).detach(), y0))
    assert errs[0] < errs[1] < errs[2] < 0.05, errs
    assert errs[0] < 1e-3


def test_optimizer_state_follows_parameters_and_adam_step_matches_fresh_model():
    m = planted_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    # re-plant exactly (training moved the copies apart a little)
    ref = planted_mlp()
    with torch.no_grad():
        for l, r in zip(m.layers, ref.layers):
            l.weight.copy_(r.weight)
            l.bias.copy_(r.bias)
    hashed().compress(m, None, None, opt, step=3)
    params = list(m.parameters())
    assert len(opt.state) == len(params)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    for p in params:
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
    # an equivalent freshly built model with the merged weights and merged state steps identically
    fresh = build_model({**MLP, "widths": [35, 27]}, (12,), 5)
    fresh.load_state_dict(m.state_dict())
    fopt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fopt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for model, o in ((m, opt), (fresh, fopt)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        o.step()
    for a, b in zip(m.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_sgd_momentum_state_merged_like_parameters():
    m = planted_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    w0 = m.layers[1].weight.detach().clone()
    buf0 = opt.state[m.layers[1].weight]["momentum_buffer"].clone()
    site = m.merge_sites()[0]
    labels = torch.arange(40)
    labels[10:15] = torch.arange(0, 5)  # group the planted pairs by hand
    labels = torch.unique(labels, return_inverse=True)[1]
    plan = merge_plan(site, labels)
    apply_plan(site, plan, opt)
    # consumer columns and their momentum are combined with the same coefficients
    new_w = m.layers[1].weight.detach()
    new_buf = opt.state[m.layers[1].weight]["momentum_buffer"]
    expect_w = torch.zeros_like(new_w).index_add_(1, labels, w0 * plan.m)
    expect_buf = torch.zeros_like(new_buf).index_add_(1, labels, buf0 * plan.m)
    assert torch.allclose(new_w, expect_w) and torch.allclose(new_buf, expect_buf)


def test_verified_groups_respect_threshold():
    torch.manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(200, 6), dim=1)
    labels = torch.randint(0, 30, (200,))  # deliberately bad groups
    # every member of a multi-member group is within the threshold of its (weighted) representative
    a = torch.rand(200)
    out2 = verify_groups(u, labels, a, threshold=0.8)
    rep2 = torch.nn.functional.normalize(torch.zeros(int(out2.max()) + 1, 6).index_add_(0, out2, a[:, None] * u), dim=1)
    cos = (u * rep2[out2]).sum(1)
    multi2 = torch.bincount(out2)[out2] > 1
    assert bool((cos[multi2] >= 0.8 - 1e-5).all())
    assert int(multi2.sum()) > 0  # something survived


def test_target_width_merges_most_similar_first():
    m = planted_mlp(noise=0.0)
    # target 37 on fc1 needs 3 merges out of the 5 exact duplicate pairs: all chosen merges are exact
    x = torch.randn(128, 12)
    y0 = m(x).detach()
    hashed(threshold=0.0, target_width={"fc1": 37, "fc2": 30}).compress(m, None, None, None, step=0)
    assert m.widths() == {"fc1": 37, "fc2": 30}
    assert rel_err(m(x).detach(), y0) < 1e-5


def test_baselines_hit_the_same_targets():
    for cls in (MagnitudePruner, RandomMerger):
        m = planted_mlp()
        cls(target_ratio=0.5, seed=0).compress(m, None, None, None, step=0)
        assert m.widths() == {"fc1": 20, "fc2": 15}
        assert m(torch.randn(3, 12)).shape == (3, 5)


def test_magnitude_keeps_largest_neurons():
    m = planted_mlp()
    norms = m.merge_sites()[0].neuron_vectors().abs().sum(1)
    keep = torch.topk(norms, 10).indices.sort().values
    w_keep = m.layers[0].weight[keep].detach().clone()
    MagnitudePruner(target_width={"fc1": 10, "fc2": 30}).compress(m, ["fc1"], None, None, step=0)
    assert torch.equal(m.layers[0].weight.detach(), w_keep)


def test_impossible_requests_are_clear_errors():
    with pytest.raises(ConfigError, match=r"threshold must be a cosine in \[-1, 1\]"):
        HashCompressor(threshold=1.5)
    with pytest.raises(ConfigError, match=r"threshold must be a cosine in \[-1, 1\]"):
        HashCompressor(threshold=-2)
    m = planted_mlp()
    with pytest.raises(ConfigError, match="target width 50 for site fc1 is above its current width 40"):
        hashed(target_width=50).compress(m, None, None, None, step=0)
    with pytest.raises(ConfigError, match="target_ratio must be in"):
        RandomMerger(target_ratio=0)
    with pytest.raises(ConfigError, match="needs hashing.target_ratio"):
        MagnitudePruner().compress(planted_mlp(), None, None, None, step=0)


def test_width_plan_makes_baselines_follow_a_hashed_run(tmp_path):
    import json

    (tmp_path / "metrics.json").write_text(json.dumps({"rehash_events": [
        {"after": {"fc1": 30, "fc2": 25}}, {"after": {"fc1": 21, "fc2": 14}}]}))
    m = planted_mlp()
    mp = MagnitudePruner(width_plan=str(tmp_path))
    mp.compress(m, None, None, None, step=0)
    assert m.widths() == {"fc1": 30, "fc2": 25}
    mp.compress(m, None, None, None, step=1)
    assert m.widths() == {"fc1": 21, "fc2": 14}
    mp.compress(m, None, None, None, step=2)  # past the plan: unchanged
    assert m.widths() == {"fc1": 21, "fc2": 14}


@pytest.mark.slow
def test_training_with_rehash_shrinks_and_logs(tmp_path):
    run_app(tmp_path, TINY + ["model.widths=[64,64]", "trainer.epochs=3", "hashing=simhash", "hashing.max_error=0.3",
                              "hashing.target_ratio=0.6", "schedule.unit=step", "schedule.every=10", "schedule.start=5",
                              "schedule.max_rehashes=2", "trainer.logging.every=4"])
    (rd,) = run_dirs(tmp_path)
    m = read_metrics(rd)
    assert m["rehashes"] == 2 and len(m["rehash_events"]) == 2
    assert m["widths_before"] == {"fc1": 64, "fc2": 64}
    assert all(m["widths"][k] < 64 for k in ("fc1", "fc2"))
    vanilla_params = (20 * 64 + 64) + (64 * 64 + 64) + (64 * 2 + 2)
    assert m["params"] < vanilla_params
    assert m["hash_time_s"] > 0
    assert m["test_acc"] > m["majority_acc"]
    rows = list(csv.DictReader((rd / "history.csv").open()))
    rehash_rows = [r for r in rows if r["rehash"] == "1"]
    assert [int(r["step"]) for r in rehash_rows if r["kind"] == "step"] == [5, 15]
    widths = [int(r["width/fc1"]) for r in rows if r["kind"] == "step"]
    assert widths[0] == 64 and widths[-1] == m["widths"]["fc1"]
    assert all(a >= b for a, b in zip(widths, widths[1:]))  # only ever shrinks
    # the measured error of every site at every rehash: in metrics.json and history.csv, within budget
    errs = [e["error"] for e in m["rehash_events"]]
    assert all(set(e) == {"fc1", "fc2"} and all(0 <= v <= 0.3 for v in e.values()) for e in errs), errs
    assert any(v > 0 for e in errs for v in e.values())
    step_rows = [r for r in rehash_rows if r["kind"] == "step"]
    assert [float(r["error/fc1"]) for r in step_rows] == pytest.approx([e["fc1"] for e in errs], rel=1e-4)


def test_baselines_accept_shared_hash_knobs_but_not_unknown_ones():
    mp = MagnitudePruner(target_ratio=0.5, threshold=0.3, bits=4, tables=8)
    assert mp.ignored_knobs == {"threshold": 0.3, "bits": 4, "tables": 8}
    with pytest.raises(TypeError, match="foo"):
        RandomMerger(target_ratio=0.5, foo=1)
