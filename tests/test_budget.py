"""``hashing.budget=global``: one error and FLOPs budget across sites (hashexp/merge/budget.py).

Invariants: the allocation spends at most what it is given and every site's next block would
overspend it; it spends where error per saved FLOP is cheapest and keeps every
site's own order; a per-neuron FLOPs count matches the layers' shapes; in the compressor a
global FLOPs ratio removes exactly the share it is given (to within one block). During training
(a Trainer rehashing every epoch) the same holds at every rehash: a FLOPs ratio removes its share
of the FLOPs before that rehash, an error budget is spent up to the block that would overspend it
and the run removes exactly the blocks taken, and ``flops_plan`` reaches the followed run's FLOPs
at every rehash, cut across the sites differently.
"""

from __future__ import annotations

import json

import pytest
import torch

from hashexp.errors import ConfigError
from hashexp.merge.budget import LayerFlops, allocate, layer_flops, neuron_flops, site_weights, spent_error, total_flops
from hashexp.merge.sites import model_sites
from hashexp.merge.calibration import RemovalOrder
from hashexp.models import build_model
from test_lsq import lsq
from test_merge import MLP


def order(costs: list[float], sizes: list[int], energy: float = 1.0) -> RemovalOrder:
    blocks, start = [], 0
    for s in sizes:
        blocks.append(torch.arange(start, start + s))
        start += s
    return RemovalOrder(blocks=blocks, cost=costs, energy=energy)


def spent(orders, take):
    return sum(orders[n].cost[k - 1] / orders[n].energy for n, k in take.items() if k)


def test_allocation_spends_the_error_budget_cheapest_per_flop_first():
    # relative error steps: a 0.001, 0.002, 0.003, 0.004, 0.010 (10 FLOPs a block);
    # b 0.001, 0.005, 0.010 (40 FLOPs a block). Per FLOP the merged order is
    # b1 a1 b2 a2 b3 a3 a4 a5 with cumulative 0.001 0.002 0.007 0.009 0.019 0.022 0.026 0.036
    orders = {"a": order([0.001, 0.003, 0.006, 0.010, 0.020], [10] * 5),
              "b": order([0.002, 0.012, 0.032], [10] * 3, energy=2.0)}
    flops, widths = {"a": 1.0, "b": 4.0}, {"a": 100, "b": 100}
    take = allocate(orders, flops, widths, 0.05, None)  # 2 * 0.05^2 = 0.005
    # b1 before a1 (the same error saves 4x the FLOPs); b2 would overspend (0.007) and ends b,
    # a2 still fits (0.004), a3 would overspend (0.007) and ends a
    assert take == {"a": 2, "b": 1}
    assert spent(orders, take) == pytest.approx(0.004) and 0.004 + 0.005 > 0.005 and 0.004 + 0.003 > 0.005
    take = allocate(orders, flops, widths, 0.1, None)  # 0.02: up to b3, a3 would overspend
    assert take == {"a": 2, "b": 3}
    assert spent(orders, take) == pytest.approx(0.019) and 0.019 + 0.003 > 2 * 0.1 ** 2
    assert allocate(orders, flops, widths, 1.0, None) == {"a": 5, "b": 3}


def test_consumer_weights_count_a_sites_error_once_per_consumer_layer():
    # the orders of the test above; b's error counts 3 times: b1 .003 (per FLOP 7.5e-5) goes first,
    # then a1 a2 a3 (.009), b2 (.024) would overspend (1 + 3) * 0.05^2 = .01 and ends b, a4 (.013) ends a
    orders = {"a": order([0.001, 0.003, 0.006, 0.010, 0.020], [10] * 5),
              "b": order([0.002, 0.012, 0.032], [10] * 3, energy=2.0)}
    flops, widths = {"a": 1.0, "b": 4.0}, {"a": 100, "b": 100}
    take = allocate(orders, flops, widths, 0.05, None, weights={"a": 1.0, "b": 3.0})
    assert take == {"a": 3, "b": 1}
    assert spent_error(orders, take, {"a": 1.0, "b": 3.0}) == pytest.approx(0.009)
    assert allocate(orders, flops, widths, 0.05, None, weights={"a": 1.0, "b": 1.0}) == \
        allocate(orders, flops, widths, 0.05, None) == {"a": 2, "b": 1}


def test_site_weights_are_the_consumer_layers_of_each_site():
    m = build_model({"_target_": "hashexp.models.resnet.ResNet20"}, (1, 28, 28), 10)
    w = site_weights(model_sites(m), "consumers")
    # stream1 feeds the three layer1 blocks and layer2.0's conv and shortcut; stream3 two blocks and the head
    assert w["stream1"] == 5 and w["stream2"] == 4 and w["stream3"] == 3
    assert all(w[n] == 1 for n in w if n.endswith("inner")) and len(w) == 12
    assert site_weights(model_sites(m), "none") is None
    with pytest.raises(ConfigError, match="hashing.global_weight"):
        lsq(budget="global", global_weight="fanout")


def test_allocation_spends_exactly_the_flops_ratio():
    orders = {"a": order([0.01 * (i + 1) for i in range(10)], [5] * 10),
              "b": order([0.001 * (i + 1) for i in range(10)], [5] * 10)}
    flops, widths = {"a": 3.0, "b": 1.0}, {"a": 60, "b": 60}
    total = 60 * 3.0 + 60 * 1.0
    take = allocate(orders, flops, widths, None, 0.7)
    removed = sum(5 * k * flops[n] for n, k in take.items())
    assert removed <= 0.3 * total
    # the next block of either site would remove more than 30% of the FLOPs
    assert all(removed + 5 * flops[n] > 0.3 * total for n in take if take[n] < 10)
    # b's errors per FLOP are cheaper: all of b goes first (50 FLOPs), then one block of a (65 <= 72)
    assert take == {"a": 1, "b": 10}


def test_layer_and_neuron_flops_match_layer_shapes():
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [24, 16]}, (12,), 5)
    layers = layer_flops(m, m.merge_sites(), torch.randn(4, 12))
    assert sorted((lf.flops, lf.out_site, lf.in_site) for lf in layers) == sorted(
        [(12 * 24, "fc1", None), (24 * 16, "fc2", "fc1"), (16 * 5, None, "fc2")])
    assert neuron_flops(layers, {"fc1": 24, "fc2": 16}) == {"fc1": 12 + 16, "fc2": 24 + 5}
    kept = total_flops(layers, {"fc1": 24, "fc2": 16}, {"fc1": torch.tensor([24, 12]), "fc2": torch.tensor([16, 8])})
    assert kept.tolist() == [12 * 24 + 24 * 16 + 16 * 5, 12 * 12 + 12 * 8 + 8 * 5]


def test_allocation_with_layers_counts_the_shared_layer_exactly():
    # two sites of width 10 in a chain: in (100 FLOPs) -> fc1 -> mid (100) -> fc2 -> out (100)
    layers = [LayerFlops(100.0, "a", None), LayerFlops(100.0, "b", "a"), LayerFlops(100.0, None, "b")]
    widths = {"a": 10, "b": 10}
    orders = {n: order([1e-3 * (i + 1) for i in range(9)], [1] * 9) for n in widths}
    take = allocate(orders, neuron_flops(layers, widths), widths, None, 0.5, layers)
    ka, kb = 10 - take["a"], 10 - take["b"]
    kept = 10 * ka + ka * kb + 10 * kb
    assert kept >= 150  # the true FLOPs, with the mid layer shrinking in both widths
    assert max(10 * (ka - 1) + (ka - 1) * kb + 10 * kb, 10 * ka + ka * (kb - 1) + 10 * (kb - 1)) < 150


def test_global_ratio_in_the_compressor_removes_the_share_it_is_given():
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [64, 48]}, (12,), 5)
    x = torch.randn(512, 12)

    def flops(w1, w2):
        return 12 * w1 + w1 * w2 + w2 * 5

    comp = lsq(candidates="exact", max_error=None, target_ratio=0.6, budget="global", block_frac=1 / 64)
    comp.compress(m, None, None, None, step=0, calib=x)
    w1, w2 = m.widths()["fc1"], m.widths()["fc2"]
    assert flops(w1, w2) >= 0.6 * flops(64, 48)
    assert max(flops(w1 - 1, w2), flops(w1, w2 - 1)) < 0.6 * flops(64, 48)  # one more neuron of either site breaks it
    assert comp.last_budget["flops_per_neuron"] == {"fc1": 12 + 48, "fc2": 64 + 5}


def test_global_error_budget_in_the_compressor_stays_within_what_it_is_given():
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [64, 48]}, (12,), 5)
    x = torch.randn(512, 12)
    comp = lsq(candidates="exact", max_error=0.05, budget="global")
    reps = comp.compress(m, None, None, None, step=0, calib=x)
    assert sum(r.after < r.before for r in reps) >= 1
    # measured errors (fc2 is measured through the merged fc1) spend about the global budget
    assert sum(r.error ** 2 for r in reps) <= 2 * 0.05 ** 2 * 1.5


def test_bad_budget_is_one_clear_error():
    with pytest.raises(ConfigError, match="hashing.budget"):
        lsq(budget="everywhere")
    m = build_model({**MLP, "widths": [16, 16]}, (12,), 5)
    with pytest.raises(ConfigError, match="budget=global"):
        lsq(compensation="weights", budget="global", target_ratio=0.5).compress(m, None, None, None, step=0)


# ------------------------------------------------------------------------------ during training
IN, OUT = 20, 2  # synthetic data: 20 features, 2 classes (hashexp.data.synthetic defaults)


def mlp_flops(w: dict[str, int]) -> int:
    """Multiply-adds per sample of the MLP IN-fc1-fc2-OUT."""
    return IN * w["fc1"] + w["fc1"] * w["fc2"] + w["fc2"] * OUT


def train_recording(tmp_path, monkeypatch, comp, epochs: int = 3, widths=(48, 40)):
    """Train a small MLP on synthetic data, rehashing at every epoch end with ``comp``; returns the
    trainer (its summary in ``tmp_path/metrics.json``) and, per rehash, what :func:`allocate` was given and
    what it took."""
    import hashexp.merge.hashed as hashed
    from hashexp.data.synthetic import load_synthetic
    from hashexp.schedules import FixedSchedule
    from hashexp.train import Trainer

    calls = []

    def recording(orders, flops, widths, max_error, keep_flops, layers=None, weights=None):
        take = allocate(orders, flops, widths, max_error, keep_flops, layers, weights)
        calls.append({"orders": orders, "widths": dict(widths), "max_error": max_error, "keep": keep_flops,
                      "layers": layers, "weights": weights, "take": take})
        return take

    monkeypatch.setattr(hashed, "allocate", recording)
    torch.manual_seed(0)
    data = load_synthetic(n_samples=1200, seed=0)
    assert data.input_shape == (IN,) and data.num_classes == OUT
    model = build_model({**MLP, "widths": list(widths)}, data.input_shape, data.num_classes)
    t = Trainer(model, data, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), epochs=epochs, batch_size=64,
                rehasher=comp, schedule=FixedSchedule(unit="epoch", every=1), run_dir=str(tmp_path), seed=0,
                checkpoint=False, logging={"every": 1000, "progress": "none"})
    summary = t.fit()
    (tmp_path / "metrics.json").write_text(json.dumps(summary))  # what the app writes (a flops_plan reads it)
    return t, calls


def test_global_flops_ratio_during_training_removes_its_share_at_every_rehash(tmp_path, monkeypatch, one_thread):
    comp = lsq(candidates="exact", max_error=None, target_ratio=0.8, budget="global", block_frac=1 / 64, min_width=4)
    t, calls = train_recording(tmp_path, monkeypatch, comp)
    events = t.rehash_log
    assert len(events) == 3 == len(calls)
    for e in events:
        before, after = mlp_flops(e.before), mlp_flops(e.after)
        assert after >= 0.8 * before  # never more than the share it is given
        # and within one neuron of it: removing one more neuron of any site above its floor would break it
        assert all(mlp_flops({**e.after, n: w - 1}) < 0.8 * before for n, w in e.after.items() if w > 4)
    final = dict(events[-1].after)
    assert mlp_flops(final) < 0.8 ** 2 * mlp_flops({"fc1": 48, "fc2": 40})  # all three rehashes removed their share
    assert t.model.widths() == final
    # the count the run reports (FlopCounterMode: 2 FLOPs per multiply-add) agrees
    assert json.loads((tmp_path / "metrics.json").read_text())["flops"] == 2 * mlp_flops(final)


def test_global_error_budget_during_training_spends_what_it_is_given(tmp_path, monkeypatch, one_thread):
    comp = lsq(candidates="exact", max_error=0.1, budget="global", block_frac=1 / 64, min_width=4)
    t, calls = train_recording(tmp_path, monkeypatch, comp)
    budget = 2 * 0.1 ** 2
    assert len(calls) == 3
    removed = 0
    for call, e in zip(calls, t.rehash_log):
        orders, take = call["orders"], call["take"]
        spent = sum(orders[n].rel_error(k) ** 2 for n, k in take.items())
        assert spent <= budget * (1 + 1e-9)
        # exhausted: the next block of every site would overspend (or the site is at its floor)
        nxt = [spent - orders[n].rel_error(k) ** 2 + orders[n].rel_error(k + 1) ** 2
               for n, k in take.items() if k < len(orders[n].blocks)]
        assert all(v > budget for v in nxt)
        # the removals the run made are exactly the blocks taken
        for n, k in take.items():
            assert e.before[n] - e.after[n] == len(orders[n].removed(k))
            removed += e.before[n] - e.after[n]
        # the measured errors (fc2 through the merged fc1) spend about the estimate
        assert sum(v ** 2 for v in e.error.values()) <= 1.5 * budget
    assert removed > 0


def test_flops_plan_reaches_the_followed_runs_flops_at_every_rehash(tmp_path, monkeypatch, one_thread):
    site = lsq(candidates="exact", max_error=0.08, block_frac=1 / 64, min_width=4)
    ts, _ = train_recording(tmp_path / "site", monkeypatch, site)
    followed = [mlp_flops(e.after) for e in ts.rehash_log]
    assert followed[-1] < mlp_flops({"fc1": 48, "fc2": 40})
    glob = lsq(candidates="exact", max_error=None, budget="global", block_frac=1 / 64, min_width=4,
               flops_plan=str(tmp_path / "site"))
    tg, calls = train_recording(tmp_path / "global", monkeypatch, glob)
    assert [c["max_error"] for c in calls] == [None] * 3
    for f, e in zip(followed, tg.rehash_log):
        # at least the per-site run's FLOPs, and within one neuron of them (of any site above its floor)
        assert mlp_flops(e.after) >= f
        assert all(mlp_flops({**e.after, n: w - 1}) < f for n, w in e.after.items() if w > 4)
    # the same FLOPs, spent elsewhere: the global run cuts the sites differently
    assert [e.after for e in tg.rehash_log] != [e.after for e in ts.rehash_log]


def test_flops_plan_past_its_end_removes_nothing_and_bad_use_is_one_clear_error(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"rehash_events": [{"after": {"fc1": 40, "fc2": 40}}]}))
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [64, 48]}, (12,), 5)
    x = torch.randn(512, 12)
    comp = lsq(candidates="exact", max_error=None, budget="global", flops_plan=str(tmp_path), block_frac=1 / 64)
    comp.compress(m, None, None, None, step=0, calib=x)
    w = m.widths()
    target = 12 * 40 + 40 * 40 + 40 * 5
    assert 12 * w["fc1"] + w["fc1"] * w["fc2"] + w["fc2"] * 5 >= target
    assert comp.last_budget["keep_flops"] == pytest.approx(target / (12 * 64 + 64 * 48 + 48 * 5))
    comp.compress(m, None, None, None, step=1, calib=x)  # past the plan: unchanged
    assert m.widths() == w and comp.last_budget["keep_flops"] == 1.0
    with pytest.raises(ConfigError, match="needs hashing.budget=global"):
        lsq(flops_plan=str(tmp_path))
    with pytest.raises(ConfigError, match="set hashing.target_ratio=null"):
        lsq(budget="global", target_ratio=0.5, flops_plan=str(tmp_path))
    with pytest.raises(Exception, match="file not found"):
        lsq(budget="global", flops_plan=str(tmp_path / "nowhere"))
