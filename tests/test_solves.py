"""The merge's numerics (hashexp/merge/solves.py and the paths that use it) against float64 and the
unoptimized forms.

Invariants: float32 is chosen only where the ridge bounds the conditioning, and a float32 refit
reproduces the consumer's outputs as well as the float64 one (relative error equal to 1e-3 of
itself); a failed float32 factorization is redone in float64; the exact removal cost agrees across
precisions and across its four forms (kernel/primal, through Z or through A_S = W_S^T W_S); the
output energy read from the captured outputs equals |X_c W^T|^2 and is refused where the outputs
do not pair with the inputs; the bucketed order that stops once its prefix is settled gives the
same order and costs as the full run; a pruning map applied by gather + addmm, in float32,
equals the float64 product.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hashexp.merge import calibration as cal
from hashexp.merge import greedy, order
from hashexp.merge.order import removal_cost, restricted_removal_order
from hashexp.merge.solves import MIN_FLOAT32, consumer_energy, solve_dtype, spd_solve
from hashexp.merge.surgery import _dense_map, refit_consumer


def _features(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """ReLU features of a random low-rank-plus-noise layer: correlated, some nearly dead."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, width // 4, generator=g) @ torch.randn(width // 4, width, generator=g)
    return torch.relu(z + 0.3 * torch.randn(rows, width, generator=g) - 0.5)


def _capture(rows: int, width: int, out: int, seed: int = 0) -> cal.SiteCapture:
    x = _features(rows, width, seed)
    w = torch.randn(out, width, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return cal.SiteCapture(inputs=[x], outputs=[(x.double() @ w.T + 0.5).float()], weights=[w])


def test_float32_only_where_the_ridge_bounds_the_conditioning():
    assert solve_dtype(MIN_FLOAT32 - 1, 1e-3) == torch.float64  # small: float64, exact cases stay exact
    assert solve_dtype(1178, 1e-3) == torch.float32  # bound 1.18e6: 0.07 of float32's reach
    assert solve_dtype(2095, 1e-3) == torch.float32
    assert solve_dtype(2200, 1e-3) == torch.float64  # bound * unit roundoff past 1/8
    assert solve_dtype(1178, 1e-5) == torch.float64
    assert solve_dtype(1178, 0.0) == torch.float64


def test_float32_refit_reproduces_the_outputs_as_well_as_float64():
    x = _features(700, 600)
    w = torch.randn(50, 600, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.zeros(600, dtype=torch.bool)
    keep[torch.randperm(600, generator=torch.Generator().manual_seed(4))[:340]] = True
    kept = keep.nonzero().flatten()
    prior = torch.zeros(340, 600, dtype=torch.float64)
    prior[torch.arange(340), kept] = 1.0
    y_old = x.double() @ w.T
    errs = {}
    for dt in (torch.float64, torch.float32, None):
        t, c = cal.lsq_map(x, x[:, kept], 1e-3, prior, same=kept, dtype=dt)
        assert t.dtype == torch.float64 and torch.equal(t[:, kept], torch.eye(340, dtype=torch.float64))
        errs[dt] = cal.relative_error(y_old, x[:, kept].double() @ (w @ t.T).T + w @ c)
    assert 0.01 < errs[torch.float64] < 0.9  # a real refit, not a trivial one
    assert errs[torch.float32] == pytest.approx(errs[torch.float64], rel=1e-3)
    assert errs[None] == errs[torch.float32]  # 340 survivors at ridge 1e-3: auto picks float32


def test_a_failed_float32_factorization_is_redone_in_float64_then_lu():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # symmetric, indefinite: Cholesky fails in any precision
    rhs = torch.tensor([[1.0], [0.0]])
    sol = spd_solve(a, rhs)
    assert sol.dtype == torch.float32
    assert torch.allclose(a @ sol, rhs, atol=1e-6)
    spd = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    assert torch.allclose(spd @ spd_solve(spd, rhs), rhs, atol=1e-6)


@pytest.mark.parametrize("rows,width,out,removed", [
    (300, 600, 500, 200),  # kernel form (rows < survivors), wide consumer: through A_S
    (300, 600, 10, 200),   # kernel form, narrow consumer: through Z
    (900, 500, 400, 150),  # primal form, wide consumer
    (900, 500, 10, 150),   # primal form, narrow consumer
])
def test_removal_cost_agrees_across_precisions_and_forms(rows, width, out, removed):
    cap = _capture(rows, width, out)
    gone = torch.randperm(width, generator=torch.Generator().manual_seed(5))[:removed]
    ref = removal_cost(cap, gone, 1e-3, dtype=torch.float64)
    assert removal_cost(cap, gone, 1e-3, dtype=torch.float32) == pytest.approx(ref, rel=1e-3)
    # the form through A_S against the one through Z (a consumer of out rows as out one-row consumers)
    ws = cap.weights[0]
    parts = cal.SiteCapture(inputs=[cap.inputs[0]] * 2, outputs=[], weights=[ws[: out // 2], ws[out // 2:]])
    assert removal_cost(parts, gone, 1e-3, dtype=torch.float64) == pytest.approx(ref, rel=1e-9)
    # and the exact order's own accumulated cost, removing the same neurons one block at a time
    eligible = torch.zeros(width, dtype=torch.bool)
    eligible[gone] = True
    exact = cal.obs_removal_order(cap, eligible, width - removed, 1e-3, None, 0.05)
    assert removal_cost(cap, exact.removed(len(exact.blocks))) == pytest.approx(exact.cost[-1], rel=2e-3)


def test_output_energy_from_the_captured_outputs_only_where_they_pair():
    cap = _capture(400, 120, 30)
    x, w, y = cap.inputs[0], cap.weights[0], cap.outputs[0]
    xc = x.double() - x.double().mean(0)
    ref = float(((xc @ w.T) ** 2).sum())
    assert consumer_energy(x, w, y) == pytest.approx(ref, rel=1e-6)
    shuffled = y[torch.randperm(400, generator=torch.Generator().manual_seed(0))]  # rows sampled apart
    off = y.double() * 1.01  # outputs taken under other weights
    for bad in (shuffled, y[:, :20], off.float(), None):
        assert consumer_energy(x, w, bad) == pytest.approx(ref, rel=1e-5)  # refused: recomputed from x and w
    assert float(((off - off.mean(0)) ** 2).sum()) > 1.01 * ref  # (what reading them would have given)
    assert consumer_energy(x, w, None, cal.centred_gram(x)) == pytest.approx(ref, rel=1e-9)  # tr(W G W^T)


def test_order_energy_uses_the_outputs_and_equals_the_recomputed_one(monkeypatch):
    cap = _capture(300, 256, 64)
    eligible = torch.ones(256, dtype=torch.bool)
    with_outputs = restricted_removal_order(cap, eligible, 128, bucket_size=64)
    bare = cal.SiteCapture(inputs=cap.inputs, outputs=[], weights=cap.weights)
    without = restricted_removal_order(bare, eligible, 128, bucket_size=64)
    assert with_outputs.energy == pytest.approx(without.energy, rel=1e-6)
    exact = cal.obs_removal_order(cap, eligible, 128, 1e-3, None, 0.05)
    assert exact.energy == pytest.approx(without.energy, rel=1e-6)


@pytest.mark.parametrize("floor", [300, 150, 40])
def test_the_bucketed_order_that_stops_when_settled_equals_the_full_run(monkeypatch, floor):
    cap = _capture(500, 384, 40, seed=2)
    eligible = torch.rand(384, generator=torch.Generator().manual_seed(1)) < 0.9
    steps = []
    orig_pick = greedy.pick_block

    def counted(*a, **k):
        steps.append(1)
        return orig_pick(*a, **k)

    monkeypatch.setattr(greedy, "pick_block", counted)
    early = restricted_removal_order(cap, eligible, floor, bucket_size=64, per_step=4)
    n_early = len(steps)
    full_steps = order.greedy_steps
    monkeypatch.setattr(order, "greedy_steps", lambda *a, room=None, **k: full_steps(*a, **k))
    steps.clear()
    full = restricted_removal_order(cap, eligible, floor, bucket_size=64, per_step=4)
    assert [b.tolist() for b in early.blocks] == [b.tolist() for b in full.blocks]
    assert early.cost == full.cost and early.energy == full.energy
    if floor == 300:  # a short prefix: settled long before the buckets run dry
        assert n_early < len(steps)


def test_a_pruning_map_in_float32_equals_the_float64_product():
    g = torch.Generator().manual_seed(0)
    n, kept = 50, torch.tensor([0, 3, 4, 9, 17, 20, 33, 41, 49])
    tmap = torch.zeros(len(kept), n, dtype=torch.float64)
    tmap[torch.arange(len(kept)), kept] = 1.0
    gone = torch.ones(n, dtype=torch.bool)
    gone[kept] = False
    tmap[:, gone] = torch.randn(len(kept), int(gone.sum()), generator=g, dtype=torch.float64)
    w = torch.randn(7, n, generator=g)
    ref = w.double() @ tmap.T
    assert torch.allclose(_dense_map(w.double(), tmap), ref, atol=1e-12)
    assert torch.allclose(_dense_map(w, tmap).double(), ref, rtol=1e-5, atol=1e-5)
    # through the consumer refit, Adam moments included (second moments by the squared map)
    lin = nn.Linear(n, 7)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(4, n, generator=g)).sum().backward()
    opt.step()
    w1 = lin.weight.detach().double().clone()
    sq = opt.state[lin.weight]["exp_avg_sq"].double().clone()
    refit_consumer(lin, tmap, None, opt)
    assert lin.weight.dtype == torch.float32 and lin.in_features == len(kept)
    assert torch.allclose(lin.weight.detach().double(), w1 @ tmap.T, rtol=1e-5, atol=1e-6)
    assert torch.allclose(opt.state[lin.weight]["exp_avg_sq"].double(), sq @ (tmap * tmap).T, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("rows,width,out", [(300, 600, 500), (300, 600, 10), (900, 500, 400), (900, 500, 10)])
def test_the_refit_takes_the_map_the_exact_cost_offered_and_only_that_one(monkeypatch, rows, width, out):
    from hashexp.merge import solves

    cap = _capture(rows, width, out, seed=7)
    x, w = cap.inputs[0], cap.weights[0]
    keep = torch.zeros(width, dtype=torch.bool)
    keep[torch.randperm(width, generator=torch.Generator().manual_seed(8))[: width * 3 // 5]] = True
    kept, gone = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    prior = torch.zeros(len(kept), width, dtype=torch.float64)
    prior[torch.arange(len(kept)), kept] = 1.0
    solved = []
    orig = cal.spd_solve
    monkeypatch.setattr(cal, "spd_solve", lambda a, b: solved.append(1) or orig(a, b))
    t_ref, c_ref = cal.lsq_map(x, x[:, kept], 1e-3, prior, same=kept)
    assert len(solved) == 1
    cost = removal_cost(cap, gone, 1e-3, offer=True)
    assert cost == pytest.approx(removal_cost(cap, gone, 1e-3), rel=1e-6)
    t, c = cal.lsq_map(x, x[:, kept], 1e-3, prior, same=kept)
    assert len(solved) == 1 and not solves._OFFERS  # taken, not solved again
    y_old = x.double() @ w.T
    err = lambda t, c: cal.relative_error(y_old, x[:, kept].double() @ (w @ t.T).T + w @ c)
    assert err(t, c) == pytest.approx(err(t_ref, c_ref), rel=1e-3)
    assert torch.equal(t[:, kept], torch.eye(len(kept), dtype=torch.float64))
    # no offer for other survivors, another ridge, or rows changed in place
    for other in ((gone[1:], 1e-3, None), (gone, 1e-2, None), (gone, 1e-3, "changed")):
        removal_cost(cap, other[0], other[1], offer=True)
        if other[2] == "changed":
            x.add_(0.0)  # bumps the tensor's version
        cal.lsq_map(x, x[:, kept], 1e-3, prior, same=kept)
    assert len(solved) == 4
    solves._OFFERS.clear()
