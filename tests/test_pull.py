"""Centripetal pull: proposals are pulled together, then merged nearly exactly; the pull survives
resume and is configured with one clear error on bad values."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import compose, killed_run

from hashexp.errors import ConfigError
from hashexp.merge.compressor import proposal_groups
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.pull import Pull, PullConfig
from hashexp.merge.rehasher import Rehasher
from hashexp.models.mlp import MLP

# in-process runs: 1024 train samples, batch 32 (32 steps an epoch); proposals every 20 steps,
# each pulled for 12 steps; a checkpoint every 7 steps
PULL_RUN = ["dataset=synthetic", "dataset.n_samples=1280", "model.widths=[48,48]", "trainer.epochs=3",
            "trainer.batch_size=32", "trainer.logging.progress=none", "trainer.logging.every=2", "trainer.num_threads=1",
            "hashing=simhash", "hashing.max_error=null", "hashing.pull.steps=12", "hashing.pull.strength=0.3",
            "schedule=gradual", "schedule.start=10", "schedule.end=70", "schedule.every=20",
            "schedule.final_ratio=0.5", "trainer.checkpoint.every_steps=7", "seed=4"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted(seed: int = 0, noise: float = 0.05):
    """MLP 12-16-8-3 whose fc1 neurons 8..15 are copies of 0..7 plus relative noise ``noise``."""
    torch.manual_seed(seed)
    model = MLP(12, 3, widths=(16, 8))
    fc1 = model.merge_sites()[0].producers[0].module
    with torch.no_grad():
        fc1.weight[8:] = fc1.weight[:8] * (1 + noise * torch.randn(8, 12))
        fc1.bias[8:] = fc1.bias[:8] * (1 + noise * torch.randn(8))
    groups = torch.cat([torch.arange(8), torch.arange(8)])
    keep = torch.arange(16) < 8
    return model, groups, keep


def _train(model, steps: int, pull: Pull | None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(256, 12, generator=g), torch.randint(0, 3, (256,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if pull is not None:
            pull.average_grads(model.merge_sites())
        opt.step()
        if pull is not None:
            pull.contract(model.merge_sites())
    return opt


def _merge_error(model, opt, fixed) -> float:
    x = torch.randn(512, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = model(x)
    comp = HashCompressor(compensation="lsq", seed=0, min_width=1)
    rep = comp.compress(model, ["fc1"], None, opt, step=0, calib=x, fixed={"fc1": fixed})
    with torch.no_grad():
        after = model(x)
    assert rep[0]["before"] == 16 and rep[0]["after"] == 8 and model.widths()["fc1"] == 8
    return float((after - before).norm() / before.norm())


def test_pull_turns_planted_near_duplicates_into_exact_ones_and_the_merge_is_then_exact():
    model, groups, keep = _planted()
    pull = Pull(PullConfig(steps=60, strength=0.2))
    pull.start("fc1", groups, keep, step=0)
    site = model.merge_sites()[0]
    d0 = pull.distance(site)
    assert 0.02 < d0 < 0.2  # 5% relative noise on each member
    opt = _train(model, 60, pull)
    d1 = pull.distance(site)
    assert d1 < 1e-5 * d0 / 1e-3  # (1 - 0.2)^60 ~ 1.5e-6 of the start, plus float noise
    assert d1 < 1e-4
    w = site.producers[0].module.weight
    assert torch.allclose(w[8:], w[:8], atol=1e-5)  # members equal their survivors
    assert pull.due(59) == [] and pull.due(60) == ["fc1"]
    assert _merge_error(model, opt, pull.pop("fc1")) < 1e-5
    assert not pull.active

    # the same merge without the pull: the members stayed apart and the merge is lossy
    model, groups, keep = _planted()
    opt = _train(model, 60, None)
    assert _merge_error(model, opt, {"groups": groups, "keep": keep}) > 1e-3


def test_gradients_are_shared_within_a_group_and_untouched_outside():
    model, groups, keep = _planted()
    pull = Pull(PullConfig(steps=5, strength=0.5, average_grads=True))
    pull.start("fc1", groups, keep, step=0)
    x = torch.randn(32, 12)
    model(x).square().sum().backward()
    fc1, fc2 = model.merge_sites()[0].producers[0].module, model.merge_sites()[1].producers[0].module
    g_before = fc1.weight.grad.clone()
    g2 = fc2.weight.grad.clone()
    pull.average_grads(model.merge_sites())
    mean = (g_before[:8] + g_before[8:]) / 2
    assert torch.allclose(fc1.weight.grad[:8], mean) and torch.allclose(fc1.weight.grad[8:], mean)
    assert torch.equal(fc2.weight.grad, g2)  # a site not under pull keeps its gradients
    # contraction: each member moves `strength` of the way to its group mean
    w = fc1.weight.detach().clone()
    pull.contract(model.merge_sites())
    target = w + 0.5 * (torch.cat([(w[:8] + w[8:]) / 2] * 2) - w)
    assert torch.allclose(fc1.weight, target, atol=1e-6)


def test_proposal_groups_send_each_dropped_neuron_to_its_most_correlated_survivor():
    from hashexp.merge import calibration as cal

    model, _, _ = _planted(noise=0.01)
    x = torch.randn(400, 12, generator=torch.Generator().manual_seed(3))
    site = model.merge_sites()[0]
    comp = HashCompressor(compensation="lsq", seed=0, min_width=1, target_width=8, candidates="exact")
    props = comp.propose(model, ["fc1"], None, step=0, calib=x)
    assert model.widths()["fc1"] == 16  # nothing merged yet
    p = props["fc1"]
    assert int(p["keep"].sum()) == 8 and p["groups"].max() == 7
    # each planted pair ends in one group, with one survivor
    assert all(p["groups"][i] == p["groups"][i + 8] for i in range(8))
    assert torch.equal(torch.bincount(p["groups"][p["keep"]]), torch.ones(8, dtype=torch.long))
    cap = cal.capture_site(model, site, x, 0)
    plan = comp.plan_site(site, 0, None, cap)
    assert torch.equal(proposal_groups(plan, cap)["keep"], p["keep"])


@pytest.mark.parametrize("bad, match", [
    ({"steps": -1}, "steps must be >= 0"),
    ({"steps": 10, "strength": 0}, r"strength must be in \(0, 1\]"),
    ({"steps": 10, "strength": "x"}, "numbers"),
    ({"step": 10}, "unknown key"),
    (5, "must be a mapping"),
])
def test_bad_pull_values_are_one_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        Rehasher(HashCompressor(), pull=bad)


def _events(m: dict) -> list[tuple]:
    return [(e["step"], e["after"], e.get("proposed"), e.get("proposed_width")) for e in m["rehash_events"]]


def test_training_with_pull_proposes_then_merges_steps_later(tmp_path):
    from hashexp.app import train_run

    m = train_run(compose(PULL_RUN), str(tmp_path / "run"))
    ev = m["rehash_events"]
    proposals = {e["step"]: e["proposed_width"] for e in ev if e.get("proposed")}
    merges = [e for e in ev if e["sites"]]
    # gradual ramp: proposals at 10 (nothing: the target is the full width), 30, 50, 70
    assert sorted(proposals) == [30, 50, 70]
    # each proposal merges 12 steps later, to exactly the proposed widths, nearly exactly
    assert [e["step"] for e in merges] == [42, 62, 82]
    for e in merges:
        assert e["after"] == proposals[e["step"] - 12]
        # 12 steps at strength 0.3: members sit at 0.7^12 ~ 1.4% of their first distance
        assert max(e["pull_distance"].values()) < 0.02
    assert m["widths"] == {"fc1": 24, "fc2": 24}  # final_ratio 0.5 of 48
    # the same run merging at once: the same widths, 10x larger measured errors at every merge
    now = train_run(compose([*PULL_RUN, "hashing.pull.steps=0"]), str(tmp_path / "at_once"))
    at_once = [e for e in now["rehash_events"] if e["after"] != e["before"]]
    assert [e["step"] for e in at_once] == [30, 50, 70] and now["widths"] == m["widths"]
    for pulled, direct in zip(merges, at_once):
        assert pulled["after"] == direct["after"]
        for site in ("fc1", "fc2"):
            assert pulled["error"][site] < direct["error"][site] / 10
    # history: the member-to-representative distance shrinks during each pull
    rows = [r for r in csv.DictReader((tmp_path / "run" / "history.csv").open()) if r["kind"] == "step"]
    d = {int(r["step"]): float(r["pull/fc1"]) for r in rows if r["pull/fc1"]}
    assert d[32] > 10 * d[40] > 0
    assert not any(r["pull/fc1"] for r in rows if 44 <= int(r["step"]) < 50)  # idle between pulls


def test_resume_mid_pull_ends_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    from hashexp.app import train_run

    ref = train_run(compose(PULL_RUN), str(tmp_path / "full"))
    # killed right after the 6th checkpoint: step 35 (after 7, 14, 21, 28 and the epoch end at 32), mid-pull
    ck = killed_run(monkeypatch, compose(PULL_RUN), tmp_path / "killed", 6)
    assert ck["step"] == 35 and set(ck["pull"]) == {"fc1", "fc2"} and ck["pull"]["fc1"]["end"] == 42

    out = train_run(compose([*PULL_RUN, f"trainer.checkpoint.resume={tmp_path / 'killed'}"]), str(tmp_path / "resumed"))
    for k in ("test_acc", "train_acc", "test_loss", "train_loss", "widths", "rehashes", "steps", "flops"):
        assert out[k] == ref[k], k
    assert _events(out) == _events(ref)
    strip = lambda p: [{k: v for k, v in r.items() if not k.endswith("time_s")}  # noqa: E731
                       for r in csv.DictReader(p.open())]
    assert strip(tmp_path / "full" / "history.csv") == strip(tmp_path / "resumed" / "history.csv")
    json.dumps(out)  # plain JSON


def test_a_pulled_run_is_a_width_plan_of_its_proposals(tmp_path):
    from hashexp.app import train_run

    m = train_run(compose(PULL_RUN), str(tmp_path / "run"))
    plan_run = [*PULL_RUN[:8], "hashing=magnitude", "hashing.target_ratio=null", f"hashing.width_plan={tmp_path / 'run'}",
                "schedule=gradual", "schedule.start=10", "schedule.end=70", "schedule.every=20", "seed=4"]
    b = train_run(compose(plan_run), str(tmp_path / "magnitude"))
    proposals = [e["proposed_width"] for e in m["rehash_events"] if "proposed" in e]
    assert [e["after"] for e in b["rehash_events"]][1:] == proposals[1:]  # the first proposal is empty (full width)
    assert b["widths"] == m["widths"]


def test_site_overrides_set_one_sites_knobs_and_a_schedules_values_win():
    model, _, _ = _planted(noise=0.01)
    x = torch.randn(400, 12, generator=torch.Generator().manual_seed(3))
    comp = HashCompressor(compensation="lsq", seed=0, min_width=1, max_error=1e-9,
                          site_overrides={"fc1": {"target_width": 12, "max_error": None}})
    rep = comp.compress(model, None, None, None, step=0, calib=x)
    assert [(r.site, r.before, r.after) for r in rep] == [("fc1", 16, 12), ("fc2", 8, 8)]
    # a schedule's per-site value wins over hashing.site_overrides
    comp.compress(model, None, None, None, step=1, calib=x, overrides={"fc1": {"target_width": 10}})
    assert model.widths() == {"fc1": 10, "fc2": 8}
    with pytest.raises(ConfigError, match=r"not sites of this model"):
        HashCompressor(site_overrides={"fc9": {"target_width": 4}}).compress(model, None, None, None, 0, calib=x)
    with pytest.raises(ConfigError, match=r"not knobs"):
        HashCompressor(site_overrides={"fc1": {"speed": 4}}).compress(model, None, None, None, 0, calib=x)
    with pytest.raises(ConfigError, match=r"must map site names"):
        HashCompressor(site_overrides={"fc1": 4})
