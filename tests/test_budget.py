"""``hashing.budget=global``: one error and FLOPs budget across sites (hashexp/merge/budget.py).

Invariants: the allocation spends at most what it is given and the next block in the merged
order would overspend it; it spends where error per saved FLOP is cheapest and keeps every
site's own order; a per-neuron FLOPs count matches the layers' shapes; in the compressor a
global FLOPs ratio removes exactly the share it is given (to within one block).
"""

from __future__ import annotations

import pytest
import torch

from hashexp.errors import ConfigError
from hashexp.merge.budget import LayerFlops, allocate, layer_flops, neuron_flops, total_flops
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
    assert take == {"a": 1, "b": 1}  # b1 before a1: the same error saves 4x the FLOPs
    assert spent(orders, take) == pytest.approx(0.002) and 0.002 + 0.005 > 0.005
    take = allocate(orders, flops, widths, 0.1, None)  # 0.02: up to b3, a3 would overspend
    assert take == {"a": 2, "b": 3}
    assert spent(orders, take) == pytest.approx(0.019) and 0.019 + 0.003 > 2 * 0.1 ** 2
    assert allocate(orders, flops, widths, 1.0, None) == {"a": 5, "b": 3}


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
    assert min(10 * (ka - 1) + (ka - 1) * kb + 10 * kb, 10 * ka + ka * (kb - 1) + 10 * (kb - 1)) < 150


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
    assert min(flops(w1 - 1, w2), flops(w1, w2 - 1)) < 0.6 * flops(64, 48)  # within one neuron of the ratio
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
