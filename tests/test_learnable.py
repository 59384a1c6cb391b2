"""Learnable hash: training raises recall of mergeable pairs at no loss of precision on planted
clusters, survives a checkpoint, follows fan-in changes, and runs end to end in the app."""

from __future__ import annotations

import io
import math

import pytest
import torch

from conftest import read_metrics, run_app, run_dirs
from hashexp.errors import ConfigError
from hashexp.lsh import SimHash
from hashexp.lsh.learnable import LearnableSimHash, collision_pr, mine_pairs
from hashexp.merge.learned import LearnableHashCompressor
from hashexp.models import build_model
from hashexp.merge.stats import ActivationStats

K, L, THRESHOLD = 10, 4, 0.8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one intra-op thread


def planted_clusters(n_clusters=20, members=10, dim=64, seed=0):
    """Random unit centres; members = centre + noise of norm 0.22..0.42 (cosine ~0.8-0.95 within)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n_clusters, dim, generator=g)
    c = c / c.norm(dim=1, keepdim=True)
    noise = torch.randn(n_clusters, members, dim, generator=g)
    noise = noise / noise.norm(dim=2, keepdim=True)
    scale = 0.22 + 0.2 * torch.rand(n_clusters, members, 1, generator=g)
    x = (c[:, None] + scale * noise).reshape(-1, dim)
    return x * (0.5 + torch.rand(len(x), 1, generator=g))  # norms differ; SimHash ignores them


def test_planted_clusters_are_what_the_test_claims():
    x = planted_clusters()
    u = x / x.norm(dim=1, keepdim=True)
    cos = u @ u.T
    same = torch.arange(200)[:, None] // 10 == torch.arange(200)[None] // 10
    off = ~torch.eye(200, dtype=torch.bool)
    within = cos[same & off]
    assert 0.75 < float(within.min()) and float(within.max()) < 0.97
    assert float(cos[~same].max()) < 0.6


def test_learnable_starts_as_simhash_and_projections_are_a_parameter():
    h, s = LearnableSimHash(64, K, L, seed=3), SimHash(64, K, L, seed=3)
    assert isinstance(h.projections, torch.nn.Parameter) and h.projections.requires_grad
    assert torch.equal(h.projections.detach(), s.projections.detach().float())
    x = planted_clusters()
    assert (h.fingerprint(x) == s.fingerprint(x)).all()


def test_training_raises_recall_at_equal_or_better_precision():
    x = planted_clusters()
    u = x / x.norm(dim=1, keepdim=True)
    gains = []
    for seed in range(3):
        h = LearnableSimHash(64, K, L, seed=seed)
        p0, r0 = collision_pr(x, h, THRESHOLD)
        pos, neg = mine_pairs(u @ u.T, THRESHOLD, 0.6, 2048, 4096, generator=torch.Generator().manual_seed(seed))
        assert len(pos) == 900  # every within-cluster pair (20 * 45) is a positive
        assert len(neg) == 4096
        rec = h.fit(x, pos, neg, updates=40, lr=0.02, temperature=2.0)
        p1, r1 = collision_pr(x, h, THRESHOLD)
        assert rec["loss_after"] < 0.1 * rec["loss_before"]
        assert p1 >= p0, (seed, p0, p1)  # at equal or better precision ...
        assert r1 >= r0 + 0.25, (seed, r0, r1)  # ... recall rises from ~0.6-0.7 to ~1
        gains.append(r1 - r0)
    assert sum(gains) / len(gains) > 0.3


def test_collision_pr_matches_brute_force():
    x = planted_clusters(n_clusters=8, members=6, dim=32, seed=1)
    h = SimHash(32, 4, 3, seed=0)
    p, r = collision_pr(x, h, THRESHOLD)
    codes = torch.as_tensor(h.fingerprint(x).astype("int64"))
    collide = (codes[:, None, :] == codes[None, :, :]).any(-1)
    u = x / x.norm(dim=1, keepdim=True)
    true = (u @ u.T) >= THRESHOLD
    upper = torch.triu(torch.ones_like(true), diagonal=1)
    tp = int((collide & true & upper).sum())
    assert p == pytest.approx(tp / int((collide & upper).sum()))
    assert r == pytest.approx(tp / int((true & upper).sum()))


def test_compressor_keeps_hash_per_site_recreates_on_fanin_change_and_checkpoints():
    torch.manual_seed(0)
    m = build_model({"_target_": "hashexp.models.mlp.MLP", "widths": [40, 30]}, (12,), 5)
    with torch.no_grad():  # planted near-copies so there are positives to learn from
        m.layers[0].weight[20:30] = 1.5 * m.layers[0].weight[:10] + 0.01 * torch.randn(10, 12)
        m.layers[0].bias[20:30] = 1.5 * m.layers[0].bias[:10]
    comp = LearnableHashCompressor(threshold=0.95, bits=6, tables=8, min_width=1, seed=0, updates=20, lr=0.01,
                                   compensation="weights", stop_recall=None)  # all 20 steps: trained counts them
    stats = ActivationStats(m.merge_sites(), window=10)
    m(torch.randn(64, 12))
    comp.compress(m, ["fc2"], stats, None, step=0)
    h2 = comp.hashers["fc2"]
    assert h2.dim == 41 and m.widths() == {"fc1": 40, "fc2": 30}
    comp.compress(m, ["fc1"], stats, None, step=1)
    h1 = comp.hashers["fc1"]
    assert h1.dim == 13 and m.widths()["fc1"] == 30  # the 10 planted near-copies merged
    assert comp.train_log[-1]["positives"] == 10 and comp.trained == {"fc1": 20}
    comp.compress(m, None, None, None, step=2)
    assert comp.hashers["fc1"] is h1 and comp.created["fc1"] == 1  # same fan-in: the same, persistent hash
    # fc1's merge shrank fc2's fan-in 41 -> 31: a fresh hash for the new dimension
    assert comp.hashers["fc2"] is not h2 and comp.hashers["fc2"].dim == 31 and comp.created["fc2"] == 2
    buf = io.BytesIO()
    torch.save(comp.state_dict(), buf)
    buf.seek(0)
    other = LearnableHashCompressor(threshold=0.95, bits=6, tables=8, min_width=1, seed=0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.calls == 3 and other.created == comp.created and other.trained == comp.trained
    for n in ("fc1", "fc2"):
        assert torch.equal(other.hashers[n].projections.detach(), comp.hashers[n].projections.detach())
    with pytest.raises(ConfigError, match="positives"):
        LearnableHashCompressor(positives="gradient")
    with pytest.raises(ConfigError, match="stop_recall"):
        LearnableHashCompressor(stop_recall=0.0)


def test_activation_positives_fall_back_to_cosine_without_batches():
    torch.manual_seed(0)
    m = build_model({"_target_": "hashexp.models.mlp.MLP", "widths": [16]}, (6,), 3)
    comp = LearnableHashCompressor(positives="activation", threshold=0.5, bits=4, tables=4, updates=2, seed=0,
                                   compensation="weights")
    stats = ActivationStats(m.merge_sites(), window=10)
    comp.compress(m, None, stats, None, step=0)
    assert comp.train_log[-1]["similarity"] == "cosine"
    for _ in range(5):
        m(torch.randn(32, 6))
    comp.compress(m, None, stats, None, step=1)
    assert comp.train_log[-1]["similarity"] == "activation"


@pytest.mark.slow
def test_learnable_runs_end_to_end_in_the_app(tmp_path):
    run_app(tmp_path, ["dataset=synthetic", "dataset.n_samples=1200", "model.widths=[32,32]", "trainer.epochs=2",
                       "trainer.batch_size=64", "trainer.logging.progress=log", "hashing=learnable", "schedule.unit=step", "schedule.every=10",
                       "schedule.start=5", "hashing.target_ratio=0.7", "hashing.updates=10",
                       "hashing.threshold=0.3", "hashing.compensation=weights"])  # loose enough that a 32-wide layer of 20-d data has partners
    (run,) = run_dirs(tmp_path)
    m = read_metrics(run)
    assert m["status"] == "ok" and m["hashing"] == "learnable" and m["rehashes"] >= 2
    assert m["widths"]["fc1"] < 32 and m["widths"]["fc2"] < 32 and m["hash_time_s"] > 0
    assert math.isfinite(m["test_acc"]) and m["test_acc"] > m["majority_acc"] - 0.05
