"""Blocked, batched removal orders (hashexp/merge/greedy.py).

Invariants: a block of ``per_step`` greedy removals with one factorization update makes the same
decisions as one update per neuron (the same order, survivors and costs; the same merged weights
to 1e-6 through the compressor); the order batched over the sites of a stage equals the loop
over sites; the batched least-squares refit equals the per-site one; on CUDA the batched order
equals the CPU one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hashexp.merge import calibration as cal
from hashexp.merge.greedy import batched_lsq_map, blocked_removal_order, stage_removal_orders
from hashexp.merge.order import removal_cost
from test_lsq import lsq
from test_merge import planted_mlp
from test_order import planted_capture, survivors


def random_capture(width: int = 48, rows: int = 300, seed: int = 0, consumers: int = 1, out: int = 7
                   ) -> cal.SiteCapture:
    """Correlated ReLU features (no planted structure): greedy decisions depend on every update."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(rows, 10, generator=gen) @ torch.randn(10, width, generator=gen)
                   + 0.5 * torch.randn(rows, width, generator=gen))
    ws = [torch.randn(out, width, generator=gen, dtype=torch.float64) for _ in range(consumers)]
    return cal.SiteCapture(inputs=[x] * consumers, outputs=[], weights=ws)


def flat(order: cal.RemovalOrder) -> list[int]:
    return order.removed(len(order.blocks)).tolist()


@pytest.mark.parametrize("per_step", [3, 8])
@pytest.mark.parametrize("consumers", [1, 2])
def test_blocked_order_makes_the_per_neuron_decisions(per_step, consumers):
    cap = random_capture(consumers=consumers)
    everyone = torch.ones(48, dtype=torch.bool)
    one = blocked_removal_order(cap, everyone, 12, block_frac=1e-3, per_step=1)
    blk = blocked_removal_order(cap, everyone, 12, block_frac=1e-3, per_step=per_step)
    assert len(flat(one)) == 36
    assert flat(one) == flat(cal.obs_removal_order(cap, everyone, 12, block_frac=1e-3))  # one update per neuron
    assert flat(blk) == flat(one)  # same neurons in the same order
    assert blk.cost == pytest.approx(one.cost, rel=1e-4)
    # the costs are exact: they match the exact cost of removing each prefix at once
    for k in (5, 20, 36):
        assert blk.cost[k - 1] == pytest.approx(removal_cost(cap, blk.removed(k)), rel=1e-3)


def test_blocked_order_keeps_the_exact_orders_survivors_on_planted_groups():
    cap, group = planted_capture(consumers=2)
    width, groups = len(group), int(group.max()) + 1
    everyone = torch.ones(width, dtype=torch.bool)
    exact = cal.obs_removal_order(cap, everyone, groups, block_frac=1e-3)  # one neuron per update
    blk = blocked_removal_order(cap, everyone, groups, block_frac=1e-3, per_step=8)
    assert survivors(blk, width) == survivors(exact, width)
    assert sorted(group[sorted(survivors(blk, width))].tolist()) == list(range(groups))
    assert blk.cost[-1] == pytest.approx(exact.cost[-1], rel=1e-4)


def test_blocked_order_stops_at_floor_eligibility_and_budget():
    cap = random_capture(width=40)
    eligible = torch.arange(40) % 4 != 0  # 30 candidates
    order = blocked_removal_order(cap, eligible, 15, per_step=4, block_frac=0.05)
    gone = flat(order)
    assert len(gone) == 25 and not any(i % 4 == 0 for i in gone)
    cut = blocked_removal_order(cap, eligible, 0, max_error=0.1, per_step=4, block_frac=0.05)
    n = len(cut.blocks)
    assert 0 < n < 15
    assert cut.rel_error(n - 1) <= 0.1 < cut.rel_error(n)  # the block that passes the budget is the last
    full = blocked_removal_order(cap, eligible, 0, per_step=4, block_frac=0.05)
    assert flat(cut) == flat(full)[:len(flat(cut))]  # the budget only says where to stop


def test_compressor_blocked_order_gives_the_per_neuron_weights():
    x = torch.randn(512, 12, generator=torch.Generator().manual_seed(1))
    states = {}
    for per_step in (1, 8):
        m = planted_mlp("relu", noise=0.05)
        lsq(candidates="exact", max_error=None, target_ratio=0.5, order="blocked", per_step=per_step,
            block_frac=0.02).compress(m, None, None, None, step=0, calib=x)
        states[per_step] = copy.deepcopy(m.state_dict())
    assert m.widths() == {"fc1": 20, "fc2": 15}
    for k, v in states[1].items():
        assert v.shape == states[8][k].shape, k
        assert torch.allclose(v, states[8][k], atol=1e-6, rtol=0), k


def test_stage_batch_equals_the_loop_over_sites():
    caps = [random_capture(seed=s, consumers=2) for s in range(3)] + [random_capture(width=40, seed=9)]
    eligibles = [torch.ones(48, dtype=torch.bool), torch.arange(48) % 3 != 0, torch.ones(48, dtype=torch.bool),
                 torch.ones(40, dtype=torch.bool)]
    floors = [10, 20, 30, 5]
    for max_error in (None, 0.15):
        batch = stage_removal_orders(caps, eligibles, floors, max_error=max_error, block_frac=0.05, per_step=4)
        for cap, el, fl, got in zip(caps, eligibles, floors, batch):
            alone = blocked_removal_order(cap, el, fl, max_error=max_error, block_frac=0.05, per_step=4)
            assert [b.tolist() for b in got.blocks] == [b.tolist() for b in alone.blocks]
            assert got.cost == pytest.approx(alone.cost, rel=1e-5)
            assert got.energy == pytest.approx(alone.energy, rel=1e-9)


def test_batched_lsq_equals_the_per_site_refit():
    gen = torch.Generator().manual_seed(0)
    x_old = torch.randn(3, 200, 24, generator=gen)
    x_new = x_old[:, :, :16] + 0.1 * torch.randn(3, 200, 16, generator=gen)
    prior = torch.randn(3, 16, 24, generator=gen, dtype=torch.float64)
    t, c = batched_lsq_map(x_old, x_new, 1e-3, prior)
    for s in range(3):
        ts, cs = cal.lsq_map(x_old[s], x_new[s], 1e-3, prior[s])
        assert torch.allclose(t[s], ts, atol=1e-9) and torch.allclose(c[s], cs, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage_orders_on_cuda_match_cpu():
    flags = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        caps = [random_capture(seed=s, consumers=2) for s in range(3)]
        everyone = [torch.ones(48, dtype=torch.bool)] * 3
        cpu = stage_removal_orders(caps, everyone, [12] * 3, block_frac=0.05, per_step=4)
        gpu = stage_removal_orders(caps, everyone, [12] * 3, block_frac=0.05, per_step=4, device="cuda")
        for a, b in zip(cpu, gpu):
            assert [x.tolist() for x in a.blocks] == [x.tolist() for x in b.blocks]
            assert b.cost == pytest.approx(a.cost, rel=1e-4)
        t, _ = batched_lsq_map(caps[0].inputs[0][None].cuda(), caps[0].inputs[0][None, :, :20].cuda())
        assert t.is_cuda
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flags


def test_batch_sites_orders_a_resnet_stage_in_one_call(monkeypatch):
    from hashexp.merge import greedy
    from hashexp.models.resnet import ResNet20

    calls = []
    inner = greedy.greedy_steps

    def spy(hs, gs, alive, *a, **kw):
        calls.append(alive.shape[0])
        return inner(hs, gs, alive, *a, **kw)

    monkeypatch.setattr(greedy, "greedy_steps", spy)
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    kept = {}
    for batch in (False, True):
        torch.manual_seed(0)
        m = ResNet20((3, 12, 12), 10).eval()
        comp = lsq(candidates="exact", max_error=None, target_ratio=0.75, order="blocked", per_step=4,
                   batch_sites=batch, min_width=4, ridge=1e-3)
        reps = comp.compress(m, None, None, None, step=0, calib=x)
        kept[batch] = {r.site: r.after for r in reps}
        if batch:
            assert sorted(calls) == [1, 1, 1, 3, 3, 3]  # 3 streams alone, each stage's 3 inner sites together
        calls.clear()
    # the ratio fixes every width, whichever way the orders were computed
    assert kept[True] == kept[False]
    assert kept[True]["layer3.0.inner"] == 48 and kept[True]["stream1"] == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compressor_blocked_order_on_cuda_matches_cpu():
    x = torch.randn(512, 12, generator=torch.Generator().manual_seed(1))
    widths, outs = {}, {}
    for dev in ("cpu", "cuda"):
        m = planted_mlp("relu", noise=0.05).to(dev)
        lsq(candidates="exact", max_error=None, target_ratio=0.5, order="blocked", per_step=8, batch_sites=True,
            block_frac=0.02).compress(m, None, None, None, step=0, calib=x.to(dev))
        widths[dev], outs[dev] = m.widths(), m(x.to(dev)).detach().cpu()
    assert widths["cuda"] == widths["cpu"]
    assert torch.allclose(outs["cuda"], outs["cpu"], atol=1e-4, rtol=1e-4)
