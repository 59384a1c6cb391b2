"""The removal order inside LSH buckets (hashexp/merge/order.py) against the exact order.

Invariants: on planted groups whose Gram is block-diagonal by group, the restricted order keeps
exactly the exact order's survivors (one factorization update per neuron or per block); buckets
never exceed their size and never cut planted near-duplicates apart; the exact cost of a removal
set equals the exact order's accumulated cost; an error budget on a restricted order is met
exactly (the next block would break it); the compressor takes the knobs and rejects bad ones.
"""

from __future__ import annotations

import pytest
import torch

from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.order import (balanced_buckets, cut_by_budget, removal_cost, removal_order,
                                 restricted_removal_order)
from test_lsq import lsq
from test_merge import planted_mlp


def planted_capture(groups: int = 24, members: int = 4, rows: int = 400, out: int = 10, seed: int = 0,
                    consumers: int = 1) -> tuple[cal.SiteCapture, torch.Tensor]:
    """Groups of near-duplicate neurons; the groups' centred activations are mutually orthogonal.

    Member j of group g is a_j * q_g + eps_j * q'_j with orthonormal centred columns q, q', so the
    calibration Gram is exactly block-diagonal by group and the cheapest removals are the
    near-duplicates. Returns the capture and each neuron's group.
    """
    gen = torch.Generator().manual_seed(seed)
    width = groups * members
    z = torch.randn(rows, groups + width, generator=gen, dtype=torch.float64)
    q = torch.linalg.qr(z - z.mean(0)).Q * rows ** 0.5
    group = torch.arange(width) // members
    scale = 0.5 + torch.rand(width, generator=gen, dtype=torch.float64)
    noise = 1e-2 * (0.5 + torch.rand(width, generator=gen, dtype=torch.float64))
    x = (q[:, group] * scale + q[:, groups:] * noise + 1.0).float()
    perm = torch.randperm(width, generator=gen)  # groups are not contiguous in the layer
    x, group = x[:, perm], group[perm]
    cap = cal.SiteCapture()
    for _ in range(consumers):
        w = torch.randn(out, width, generator=gen, dtype=torch.float64)
        cap.inputs.append(x)
        cap.outputs.append((x.double() @ w.T).float())
        cap.weights.append(w)
    return cap, group


def survivors(order: cal.RemovalOrder, width: int) -> set[int]:
    return set(range(width)) - set(order.removed(len(order.blocks)).tolist())


@pytest.mark.parametrize("per_step", [1, 3])
@pytest.mark.parametrize("consumers", [1, 2])
def test_restricted_order_keeps_the_exact_orders_survivors_on_planted_groups(per_step, consumers):
    cap, group = planted_capture(consumers=consumers)
    width, groups = len(group), int(group.max()) + 1
    everyone = torch.ones(width, dtype=torch.bool)
    exact = cal.obs_removal_order(cap, everyone, groups, block_frac=1e-3)
    rest = restricted_removal_order(cap, everyone, groups, block_frac=1e-3, bucket_size=16, per_step=per_step)
    keep = survivors(exact, width)
    assert len(keep) == groups
    assert sorted(group[sorted(keep)].tolist()) == list(range(groups))  # one survivor per planted group
    assert survivors(rest, width) == keep
    # block-diagonal Gram: the bucket costs are the exact costs
    assert rest.cost[-1] == pytest.approx(exact.cost[-1], rel=1e-4)


def test_restricted_order_respects_eligibility_and_floor():
    cap, group = planted_capture()
    width = len(group)
    eligible = torch.ones(width, dtype=torch.bool)
    eligible[:10] = False
    order = restricted_removal_order(cap, eligible, 60, bucket_size=16)
    removed = order.removed(len(order.blocks))
    assert len(removed) == width - 60
    assert len(set(removed.tolist())) == len(removed)
    assert not bool((removed < 10).any())
    assert all(b <= a for a, b in zip(order.cost[1:], order.cost[:-1]))  # cumulative costs never decrease


def test_buckets_are_bounded_deterministic_and_keep_near_duplicates_together():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 50, generator=gen)
    v = base.repeat_interleave(4, 0) + 1e-3 * torch.randn(256, 50, generator=gen)
    v = v / v.norm(dim=1, keepdim=True)
    labels = balanced_buckets(v, 16, seed=3)
    assert int(torch.bincount(labels).max()) <= 16
    assert torch.equal(labels, balanced_buckets(v, 16, seed=3))
    group = torch.arange(256) // 4
    for g in range(64):
        assert len(set(labels[group == g].tolist())) == 1, g
    # random rows: still bounded, and the split keeps both halves sizeable
    r = torch.randn(5000, 32, generator=gen)
    counts = torch.bincount(balanced_buckets(r, 100, seed=0))
    assert int(counts.max()) <= 100 and int(counts.min()) >= 25
    assert torch.equal(balanced_buckets(r[:50], 100), torch.zeros(50, dtype=torch.long))


@pytest.mark.parametrize("rows", [60, 400])  # fewer rows than survivors (kernel form) and more (primal)
def test_removal_cost_equals_the_exact_orders_accumulated_cost(rows):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(rows, 8) @ torch.randn(8, 120) + torch.randn(rows, 120))
    cap = cal.SiteCapture(inputs=[x, x], outputs=[], weights=[torch.randn(7, 120).double(), torch.randn(3, 120).double()])
    exact = cal.obs_removal_order(cap, torch.ones(120, dtype=torch.bool), 40, block_frac=0.05)
    for k in (1, len(exact.blocks) // 2, len(exact.blocks)):
        assert removal_cost(cap, exact.removed(k)) == pytest.approx(exact.cost[k - 1], rel=2e-3)


def test_a_budget_on_the_restricted_order_is_met_exactly():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(300, 16) @ torch.randn(16, 512) + 0.3 * torch.randn(300, 512))
    cap = cal.SiteCapture(inputs=[x], outputs=[], weights=[torch.randn(10, 512).double()])
    everyone = torch.ones(512, dtype=torch.bool)
    full = restricted_removal_order(cap, everyone, 8, bucket_size=64, per_step=4)
    for budget in (0.02, 0.1):
        cut = cut_by_budget(cap, full, budget)
        n = len(cut.blocks)
        assert 0 < n < len(full.blocks)
        assert cut.rel_error(n) <= budget
        assert (removal_cost(cap, cut.removed(n)) / cut.energy) ** 0.5 <= budget
        assert (removal_cost(cap, full.removed(n + 1)) / full.energy) ** 0.5 > budget
        # the exact cut goes at least as far as the (upper-bound) estimate would
        assert n >= sum(c <= budget ** 2 * full.energy for c in full.cost)
    via = removal_order(cap, everyone, 8, 1e-3, 0.1, 0.01, "restricted", bucket_size=64, per_step=4)
    assert len(via.blocks) == len(cut_by_budget(cap, full, 0.1).blocks)


def test_order_auto_switches_at_order_width():
    cap, group = planted_capture()
    everyone = torch.ones(len(group), dtype=torch.bool)
    exact = cal.obs_removal_order(cap, everyone, 50, 1e-3, None, 0.01)
    auto_exact = removal_order(cap, everyone, 50, 1e-3, None, 0.01, "auto", order_width=97, bucket_size=16)
    assert [b.tolist() for b in auto_exact.blocks] == [b.tolist() for b in exact.blocks]
    auto_rest = removal_order(cap, everyone, 50, 1e-3, None, 0.01, "auto", order_width=96, bucket_size=16)
    rest = restricted_removal_order(cap, everyone, 50, bucket_size=16)
    assert [b.tolist() for b in auto_rest.blocks] == [b.tolist() for b in rest.blocks]


def test_compressor_with_restricted_order_merges_planted_copies_exactly():
    m = planted_mlp("relu")
    x = torch.randn(512, 12)
    reps = lsq(candidates="exact", max_error=1e-4, order="restricted", bucket_size=8, per_step=2).compress(
        m, None, None, None, step=0, calib=x)
    assert m.widths() == {"fc1": 35, "fc2": 27}
    assert all(r["error"] < 1e-4 for r in reps), reps


@pytest.mark.parametrize("kw, msg", [({"order": "fast"}, "hashing.order"), ({"bucket_size": 1}, "bucket_size"),
                                     ({"per_step": 0}, "per_step"), ({"order_width": 0}, "order_width")])
def test_bad_order_knobs_are_one_clear_error(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        lsq(**kw)
