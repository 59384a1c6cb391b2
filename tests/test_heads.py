"""Attention heads as a merge site (hashexp/merge/heads.py, hashexp/merge/discovery/heads.py): found in
the trace, removed whole, absorbed by least squares, rebuilt from widths."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hashexp import compress_model, find_sites
from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.baselines import MagnitudePruner
from hashexp.merge.discovery import shrink_to_widths
from hashexp.merge.discovery.checks import noop_error, plant_duplicate, planted_error
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.heads import head_removal_order
from hashexp.merge.surgery import apply_plan, check_plan, prune_plan
from hashexp.metrics import count_flops
from hashexp.models.vit import ViT

SHAPE = (1, 8, 8)  # patch 4: 4 patches + the class token = 5 tokens


def _vit(seed: int = 0, heads: int = 4, dim: int = 32) -> ViT:
    torch.manual_seed(seed)
    return ViT(SHAPE, 4, dim=dim, depth=2, heads=heads, patch=4)


def _heads(model) -> list:
    return [s for s in find_sites(model, torch.randn(2, *SHAPE)).sites if s.kind == "heads"]


def test_find_sites_reports_each_blocks_heads_with_their_kind():
    m = _vit()
    found = find_sites(m, torch.randn(2, *SHAPE))
    heads = [s for s in found.sites if s.kind == "heads"]
    assert [s.name for s in heads] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    for s, blk in zip(heads, m.blocks):
        assert s.producers[0].module is blk.attn.qkv and s.producers[0].parts == 3
        assert [c.module for c in s.consumers] == [blk.attn.proj]
        assert (s.width, s.group, s.min_width) == (32, 8, 8)
        assert s.restricted and "never averaged" in s.restricted
    assert "blocks.0.attn.qkv  heads" in str(found)


def test_keeping_every_head_is_a_no_op():
    m = _vit()
    x = torch.randn(16, *SHAPE)
    assert noop_error(m, x, _heads(m)) <= 1e-5


def test_planted_duplicate_heads_merge_back_exactly():
    m = _vit(1)
    x = torch.randn(16, *SHAPE)
    errs = [planted_error(m, x, s) for s in _heads(m)]
    assert len(errs) == 2 and max(errs) <= 1e-5
    assert m.blocks[0].attn.qkv.weight.shape == (3 * 24, 32) and m.blocks[0].attn.proj.weight.shape == (32, 24)


def test_the_compressor_removes_the_planted_duplicate_head_and_least_squares_absorbs_it():
    """Head 1 copies head 3's q/k/v rows and takes 40% of its output columns: removing either costs
    nothing, every other head costs a measurable error; one head goes and the output stays."""
    m = _vit(2)
    x = torch.randn(256, *SHAPE)
    site = _heads(m)[0]
    g = site.group
    for a in range(g):
        plant_duplicate(site, 3 * g + a, 1 * g + a, split=0.4)
    m.eval()
    with torch.no_grad():
        y0 = m(x)
    comp = HashCompressor(target_width={site.name: 24}, compensation="lsq", sites=[site.name], ridge=1e-6)
    rep = comp.compress(m, None, None, None, 0, calib=x)
    assert rep[0].before == 32 and rep[0].after == 24
    assert comp.last_stats[site.name]["estimated_error"] < 1e-3
    with torch.no_grad():
        y = m(x)
    assert float((y - y0).norm() / y0.norm()) < 1e-3
    # the other heads are not free: removing head 0 of the planted model costs far more
    m2 = _vit(2)
    s2 = _heads(m2)[0]
    for a in range(g):
        plant_duplicate(s2, 3 * g + a, 1 * g + a, split=0.4)
    cap = cal.capture_site(m2, s2, x)
    order = head_removal_order(cap, g, torch.ones(32, dtype=torch.bool), floor=0, ridge=1e-6)
    first = order.blocks[0] // g
    assert set(first.tolist()) <= {1, 3} and order.rel_error(1) < 1e-3 < order.rel_error(2)


def test_grouped_removal_cost_equals_the_least_squares_refit_error():
    """The first head the order removes, and its cost, match a brute-force refit over every head."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=gen) @ torch.randn(12, 12, generator=gen)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    cap = cal.SiteCapture(inputs=[x], outputs=[x.double() @ w.T], weights=[w])
    order = head_removal_order(cap, 4, torch.ones(12, dtype=torch.bool), floor=4, ridge=1e-9)
    y = x.double() @ w.T
    yc = y - y.mean(0)

    def refit_error(keep: torch.Tensor) -> float:
        xk = x.double()[:, keep]
        xkc, xc = xk - xk.mean(0), x.double() - x.double().mean(0)
        t = torch.linalg.lstsq(xkc, xc).solution
        return float(((xkc @ t @ w.T - yc) ** 2).sum())

    costs = [refit_error(torch.tensor([f for f in range(12) if f // 4 != h])) for h in range(3)]
    assert int(order.blocks[0][0]) // 4 == min(range(3), key=costs.__getitem__)
    assert order.cost[0] == pytest.approx(min(costs), rel=1e-4)
    assert len(order.blocks) == 2 and all(len(b) == 4 for b in order.blocks)


def test_removing_a_head_lowers_flops_by_the_counted_amount():
    """One head of d_h in a block of width d over T tokens: q/k/v rows 2*T*3*d_h*d, scores and
    weighted values 2 * 2*T*T*d_h, output columns 2*T*d_h*d."""
    m = _vit()
    before = count_flops(m, SHAPE)
    site = _heads(m)[0]
    apply_plan(site, prune_plan(site, torch.arange(24)))
    t, d, dh = 5, 32, 8
    assert before - count_flops(m, SHAPE) == 2 * t * 3 * dh * d + 4 * t * t * dh + 2 * t * dh * d


def test_vit_at_half_the_heads_runs_forward_and_backward_and_rebuilds_from_widths():
    m = _vit(3)
    x, y = torch.randn(128, *SHAPE), torch.randint(0, 4, (128,))
    small, rep = compress_model(m, (x, y), keep=0.5)
    w = rep["after"]["widths"]
    assert w["blocks.0.attn.qkv"] == w["blocks.1.attn.qkv"] == 16  # 2 of 4 heads
    assert small.blocks[0].attn.qkv.weight.shape == (48, 32) and small.blocks[0].attn.proj.weight.shape == (32, 16)
    small.train()
    loss = F.cross_entropy(small(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in small.parameters() if p.grad is not None)
    assert small.blocks[1].attn.qkv.weight.grad.shape == (48, 32)
    fresh = _vit(3)
    shrink_to_widths(fresh, w, torch.randn(2, *SHAPE))
    fresh.load_state_dict(small.state_dict())
    small.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), small(x))
    with pytest.raises(ConfigError, match="multiple of 8"):
        shrink_to_widths(_vit(3), {"blocks.0.attn.qkv": 12}, torch.randn(2, *SHAPE))


def test_scratch_vit_with_fewer_heads_has_the_merged_shapes():
    merged = _vit()
    site = _heads(merged)[0]
    apply_plan(site, prune_plan(site, torch.arange(16)))
    scratch = ViT(SHAPE, 4, dim=32, depth=2, heads=2, patch=4, head_dim=8)
    assert scratch.blocks[0].attn.qkv.weight.shape == merged.blocks[0].attn.qkv.weight.shape
    assert scratch.blocks[0].attn.proj.weight.shape == merged.blocks[0].attn.proj.weight.shape


def test_a_plan_that_splits_a_head_is_refused_and_baselines_keep_whole_heads():
    m = _vit()
    site = _heads(m)[0]
    with pytest.raises(ConfigError, match="whole groups"):
        check_plan(site, prune_plan(site, torch.arange(20)))
    mag = MagnitudePruner(target_width={site.name: 16}, sites=[site.name])
    rep = mag.compress(m, None, None, None, 0)
    assert rep[0].after == 16
    with torch.no_grad():  # magnitude kept the two heads with the largest L1 of their q/k/v rows
        m0 = _vit()
        l1 = m0.blocks[0].attn.qkv.weight.abs().reshape(3, 4, 8, 32).sum((0, 2, 3)) + \
            m0.blocks[0].attn.qkv.bias.abs().reshape(3, 4, 8).sum((0, 2))
        top = l1.topk(2).indices.sort().values
        kept = m0.blocks[0].attn.qkv.weight.reshape(3, 4, 8, 32)[:, top].reshape(48, 32)
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, kept)


class _FixedWidthAttention(nn.Module):
    """timm's pattern: fused qkv, but the output is reshaped to the input width and the head count is
    an attribute, so the module cannot run with a head removed."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Tokens(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.attn = attn
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        z = self.embed(x)
        a = self.attn(z)
        a = a[0] if isinstance(a, tuple) else a
        return self.head(a.mean(1))


def test_attention_that_cannot_lose_a_head_is_refused_with_the_reason():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    fixed = find_sites(_Tokens(_FixedWidthAttention()), x)
    assert not [s for s in fixed.sites if s.kind == "heads"]
    why = {s.name: s.reason for s in fixed.skipped if s.kind == "heads"}
    assert "does not run with one head removed" in why["attn.qkv"] and "RuntimeError" in why["attn.qkv"]
    mha = nn.MultiheadAttention(16, 2, batch_first=True)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, z):
            return self.mha(z, z, z, need_weights=False)[0]

    found = find_sites(_Tokens(SelfAttention()), x)
    why = {s.name: s.reason for s in found.skipped if s.kind == "heads"}
    assert "num_heads * head_dim == embed_dim" in why["attn.mha"]
    assert not [s for s in found.sites if s.kind == "heads"]


def test_timm_attention_is_recognized_and_refused():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, num_classes=3,
                          depth=2)
    found = find_sites(m, torch.randn(2, 3, 32, 32))
    why = {s.name: s.reason for s in found.skipped if s.kind == "heads"}
    assert set(why) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert all("does not run with one head removed" in r for r in why.values())
    assert [s.name for s in found.sites if s.name.endswith("fc1")] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    y = m(torch.randn(2, 3, 32, 32))  # weights were put back after the check
    assert y.shape == (2, 3) and copy.deepcopy(m).blocks[0].attn.qkv.weight.shape == (576, 192)


def test_with_the_pull_on_heads_merge_at_once_and_feed_forward_neurons_are_pulled(tmp_path, npz_images):
    """Pulling two heads toward their mean would average q/k across heads: heads are removed at the
    rehash itself, the feed-forward proposals merge ``pull.steps`` later."""
    from conftest import compose, tiny_vit
    from hashexp.app import train_run

    path = npz_images
    run = tiny_vit(path, "trainer.epochs=2", "trainer.batch_size=32", "trainer.num_threads=1",
           "trainer.logging.progress=none", "hashing=simhash", "hashing.max_error=null", "hashing.target_ratio=0.5",
           "hashing.pull.steps=4", "schedule.unit=step", "schedule.every=8", "schedule.start=4",
           "schedule.max_rehashes=1", "seed=0", depth=1)
    m = train_run(compose(run), str(tmp_path / "run"))
    ev = [e for e in m["rehash_events"] if e["after"] != e["before"]]
    first, later = ev[0], ev[1]
    assert first["after"]["blocks.0.attn.qkv"] == 8 and first["after"]["blocks.0.mlp.fc1"] == 64
    assert first["proposed"] == ["blocks.0.mlp.fc1"]
    assert later["step"] == first["step"] + 4 and later["after"]["blocks.0.mlp.fc1"] == 32
    assert m["widths"] == {"blocks.0.attn.qkv": 8, "blocks.0.mlp.fc1": 32}


def test_a_vit_with_heads_removed_exports_to_onnx_and_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    from hashexp.export import export_model

    m = _vit(4)
    site = _heads(m)[1]  # heads 0 and 3 of 4 stay
    apply_plan(site, prune_plan(site, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 24, 25, 26, 27, 28, 29, 30, 31])))
    assert m.blocks[1].attn.proj.weight.shape == (32, 16)
    rep = export_model(m, torch.randn(4, *SHAPE), tmp_path / "vit.onnx")
    assert rep.max_abs_diff <= rep.atol and len(rep.checked_batches) == 2


def test_batch_sites_orders_heads_whole_and_the_feed_forward_widths_batched():
    m = _vit(5)
    x = torch.randn(128, *SHAPE)
    widths = {}
    for batch in (False, True):
        small, rep = compress_model(m, x, keep=0.5, batch_sites=batch)
        widths[batch] = rep["after"]["widths"]
        assert small(x).shape == (128, 4)
    assert {k: v for k, v in widths[True].items() if "qkv" in k} == {k: v for k, v in widths[False].items() if "qkv" in k}
    assert all(v % 8 == 0 and 0 < v < 32 for k, v in widths[True].items() if "qkv" in k)
    assert all(v < 128 for k, v in widths[True].items() if "fc1" in k)
