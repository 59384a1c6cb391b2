"""Schedules: per-layer clocks and knobs reach the compressor; the drift schedule rehashes what
moved or grew redundant and leaves frozen sites alone; both checkpoint and compose."""

from __future__ import annotations

import csv
import io
from types import SimpleNamespace

import pytest
import torch

from conftest import compose
from hashexp.data.synthetic import load_synthetic
from hashexp.errors import ConfigError
from hashexp.merge.hashed import HashCompressor
from hashexp.models import build_model
from hashexp.schedules import DriftSchedule, FixedSchedule, GradualSchedule, PerLayerSchedule, RehashContext
from hashexp.merge.reports import RehashEvent
from hashexp.train import Trainer

MLP = {"_target_": "hashexp.models.mlp.MLP"}
SPE = 15  # steps per epoch: 960 training samples / batch 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one intra-op thread


def fake_run(schedule, steps: int, steps_per_epoch: int, names=("fc1", "fc2")) -> dict[str, list]:
    """Drive decide/notify as the trainer does; returns each site's rehash steps ('eK' at epoch ends)."""
    sites = [SimpleNamespace(name=n) for n in names]
    got: dict[str, list] = {n: [] for n in names}
    for step in range(1, steps + 1):
        for end in (False, True) if step % steps_per_epoch == 0 else (False,):
            ctx = RehashContext(step=step, epoch=step // steps_per_epoch if end else (step - 1) // steps_per_epoch,
                                epoch_end=end, sites=sites)
            due = schedule.decide(ctx).sites
            if due:
                schedule.notify(ctx, RehashEvent(step=step, sites=due))
            for n in due:
                got[n].append(f"e{ctx.epoch}" if end else step)
    return got


def tiny_trainer(tmp_path, compressor, schedule, epochs=3, widths=(32, 32), seed=0, lr=1e-3):
    torch.manual_seed(seed)
    data = load_synthetic(n_samples=1200, seed=seed)
    model = build_model({**MLP, "widths": list(widths)}, data.input_shape, data.num_classes)
    return Trainer(model, data, optimizer=lambda p: torch.optim.Adam(p, lr=lr), epochs=epochs, batch_size=64,
                   rehasher=compressor, schedule=schedule, run_dir=str(tmp_path), seed=seed,
                   checkpoint=False, logging={"every": 1000, "progress": "none"})


def steps_of(trainer) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in trainer.rehash_log:
        for s in e.sites:
            out.setdefault(s, []).append(e.step)
    return out


# ------------------------------------------------------------------------------ fixed / per-layer
def test_fixed_schedule_unchanged():
    got = fake_run(FixedSchedule(unit="step", every=10, start=5, max_rehashes=3), 60, SPE)
    assert got == {"fc1": [5, 15, 25], "fc2": [5, 15, 25]}


def test_per_layer_sites_keep_their_own_clocks():
    s = PerLayerSchedule(unit="step", every=10, start=5, sites={
        "fc1": {"start": 3, "every": 7, "stop": 30},
        "fc2": {"unit": "epoch", "every": 2, "start": 1, "max_rehashes": 2}})
    got = fake_run(s, 90, SPE)
    assert got == {"fc1": [3, 10, 17, 24], "fc2": ["e1", "e3"]}
    assert s.per_site == {"fc1": 4, "fc2": 2} and s.count == 6


def test_per_layer_unlisted_sites_take_defaults_and_can_be_disabled():
    got = fake_run(PerLayerSchedule(unit="step", every=20, start=10, sites={"fc2": {"enabled": False}}), 60, SPE)
    assert got == {"fc1": [10, 30, 50], "fc2": []}


def test_per_layer_unknown_site_is_one_clear_error():
    s = PerLayerSchedule(unit="step", sites={"fc9": {"every": 3}})
    with pytest.raises(ConfigError, match=r"unknown site\(s\) \['fc9'\].*\['fc1', 'fc2'\]"):
        fake_run(s, 2, SPE)
    with pytest.raises(ConfigError, match="unknown key"):
        PerLayerSchedule(sites={"fc1": {"evry": 3}})
    with pytest.raises(ConfigError, match="target_ratio"):
        PerLayerSchedule(sites={"fc1": {"target_ratio": 1.5}})


def test_per_layer_overrides_reach_the_compressor(tmp_path):
    # fc1: everything is mergeable (threshold -1), halve at steps 5 and 15 -> 32 -> 16 -> 8;
    # fc2: only near-copies merge (threshold 0.999, none in a trained random layer) -> stays 32
    #      at steps 8, 23, 38; then a target_width site is checked with a third layer.
    sched = PerLayerSchedule(unit="step", every=10, start=5, sites={
        "fc1": {"threshold": -1.0, "target_ratio": 0.5, "max_rehashes": 2},
        "fc2": {"start": 8, "every": 15, "threshold": 0.999, "target_ratio": 0.5}})
    comp = HashCompressor(threshold=0.5, bits=4, tables=16, min_width=1, seed=0, compensation="weights")
    tr = tiny_trainer(tmp_path, comp, sched, epochs=3)
    tr.fit()
    assert steps_of(tr) == {"fc1": [5, 15], "fc2": [8, 23, 38]}
    assert tr.model.widths() == {"fc1": 8, "fc2": 32}
    assert sched.site_overrides() == {"fc1": {"threshold": -1.0, "target_ratio": 0.5},
                                      "fc2": {"threshold": 0.999, "target_ratio": 0.5}}
    assert comp.threshold == 0.5 and comp.target_ratio is None  # overrides are per call, then restored


def test_per_layer_target_width_per_site(tmp_path):
    sched = PerLayerSchedule(unit="step", every=100, start=4, threshold=-1.0,
                             sites={"fc1": {"target_width": 20}, "fc2": {"target_width": 11}})
    tr = tiny_trainer(tmp_path, HashCompressor(bits=4, tables=16, min_width=1, seed=0), sched, epochs=1)
    tr.fit()
    assert steps_of(tr) == {"fc1": [4], "fc2": [4]}
    assert tr.model.widths() == {"fc1": 20, "fc2": 11}


def test_schedule_configs_compose_and_instantiate():
    from hashexp.app import _instantiate

    def instantiate(node):  # as the app does: `name` is the config's label, not a constructor argument
        return _instantiate(node, "schedule")

    cfg = compose(["schedule=per_layer", "schedule.unit=step",
                   "schedule.sites={fc1:{start:100,every:200,threshold:0.8,target_ratio:0.6},fc2:{every:50}}"])
    s = instantiate(cfg.schedule)
    assert isinstance(s, PerLayerSchedule)
    assert s.site_settings("fc1") == {"unit": "step", "every": 200, "start": 100, "stop": None, "max_rehashes": None,
                             "threshold": 0.8, "target_ratio": 0.6, "target_width": None, "enabled": True}
    assert s.site_settings("fc2")["every"] == 50 and s.site_settings("fc2")["start"] == 1
    cfg = compose(["schedule=drift", "schedule.every=30", "schedule.start=7", "schedule.max_rehashes=3",
                   "hashing=simhash", "hashing.threshold=0.85"])
    d = instantiate(cfg.schedule)
    assert isinstance(d, DriftSchedule)
    assert (d.check_every, d.start, d.max_rehashes, d.threshold) == (30, 7, 3, 0.85)  # check_every follows every
    for sched in ("drift", "per_layer"):  # presets that set schedule.unit/start/every compose with both
        exp = compose(["experiment=fmnist_mlp2048", f"schedule={sched}", "hashing=learnable"])
        s = instantiate(exp.schedule)
        assert s.name == sched and (s.check_every if sched == "drift" else s.site_settings("fc1")["every"]) == exp.schedule.every
    assert instantiate(compose(["schedule=drift", "schedule.check_every=7"]).schedule).check_every == 7
    for name in ("per_layer", "drift"):
        text = (compose.__globals__["CONF"] / "schedule" / f"{name}.yaml").read_text().splitlines()[0]
        assert text.startswith("# ") and "python -m hashexp" in text and f"schedule={name}" in text


# ------------------------------------------------------------------------------ drift
def test_drift_metrics_on_planted_changes():
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [64, 48]}, (30,), 4)
    site = m.merge_sites()[0]
    d = DriftSchedule(check_every=1, threshold=0.95, sample=64, bits=64)
    assert d.measure(site, 0, step=1) == (0.0, 0.0)  # first look: reference codes, random layer: no partners
    with torch.no_grad():
        m.layers[0].weight[:16] *= -1  # sign flip: every bit of these 16 neurons flips
        m.layers[0].bias[:16] *= -1
    flip, partner = d.measure(site, 0, step=2)
    assert flip == pytest.approx(16 / 64)
    with torch.no_grad():  # neurons 32..47 become rescaled copies of 0..15: 32 of 64 have a partner
        m.layers[0].weight[32:48] = 2.5 * m.layers[0].weight[:16]
        m.layers[0].bias[32:48] = 2.5 * m.layers[0].bias[:16]
    assert d.measure(site, 0, step=3)[1] == pytest.approx(32 / 64)
    # a sample smaller than the width estimates the same fraction
    d2 = DriftSchedule(check_every=1, threshold=0.95, sample=40)
    est = [d2.measure(site, 0, step=s)[1] for s in range(20)]
    assert abs(sum(est) / len(est) - 0.5) < 0.06


class Duplicating(DriftSchedule):
    """Drift schedule that, at ``at``, turns half of fc2's neurons into copies of the other half."""

    def __init__(self, at: int, **kw):
        super().__init__(**kw)
        self.at = at

    def decide(self, ctx):
        if ctx.step == self.at and not ctx.epoch_end:
            fc = ctx.model.layers[1]
            with torch.no_grad():
                h = fc.weight.shape[0] // 2
                fc.weight[h:2 * h] = fc.weight[:h] * 1.5
                fc.bias[h:2 * h] = fc.bias[:h] * 1.5
        return super().decide(ctx)


def test_drift_leaves_frozen_site_alone_and_catches_duplicates(tmp_path):
    sched = Duplicating(at=52, check_every=5, start=5, flip_threshold=0.3, partner_threshold=0.2,
                        min_interval=10, threshold=0.9)
    tr = tiny_trainer(tmp_path, HashCompressor(threshold=0.9, bits=6, tables=16, min_width=1, seed=0), sched,
                      epochs=6)
    tr.model.layers[0].weight.requires_grad_(False)  # fc1 frozen: no gradient, no Adam update
    tr.model.layers[0].bias.requires_grad_(False)
    tr.fit()
    # the next check at or after the duplication (step 52) is step 55; fc1 is never touched
    assert steps_of(tr) == {"fc2": [55]}
    assert tr.model.widths()["fc1"] == 32 and tr.model.widths()["fc2"] <= 32 - 16
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for col in ("drift/site", "drift/bit_flip", "drift/partner_frac", "drift/rehashed", "drift/metric_s"):
        assert col in rows[0]
    drift = [r for r in rows if r["kind"] == "drift"]
    n_checks = len(range(5, 6 * SPE + 1, 5))
    assert len(drift) == 2 * n_checks
    fc1 = [r for r in drift if r["drift/site"] == "fc1"]
    assert len(fc1) == n_checks and all(float(r["drift/bit_flip"]) == 0.0 for r in fc1)
    assert all(r["drift/rehashed"] == "0" for r in fc1)
    fired = [(int(r["step"]), r["drift/site"]) for r in drift if r["drift/rehashed"] == "1"]
    assert fired == [(55, "fc2")]
    at55 = next(r for r in drift if r["step"] == "55" and r["drift/site"] == "fc2")
    assert float(at55["drift/partner_frac"]) >= 0.9
    assert sched.metric_calls == n_checks and sched.metric_time_s > 0


def test_drift_min_interval_start_stop_and_max_rehashes():
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [16]}, (8,), 3)
    with torch.no_grad():
        m.layers[0].weight[8:] = m.layers[0].weight[:8]  # every neuron has a partner, forever
        m.layers[0].bias[8:] = m.layers[0].bias[:8]
    d = DriftSchedule(check_every=2, start=4, stop=40, min_interval=10, max_rehashes=3, partner_threshold=0.5)
    fired = []
    for step in range(1, 60):
        ctx = RehashContext(step=step, epoch=0, epoch_end=False, sites=m.merge_sites(), model=m)
        if d.decide(ctx):
            d.notify(ctx, RehashEvent(step=step, sites=["fc1"]))  # (no surgery: the copies stay)
            fired.append(step)
    assert fired == [4, 14, 24]
    assert d.decide(RehashContext(step=0, epoch=1, epoch_end=True, sites=m.merge_sites(), model=m)).sites == []


def test_drift_state_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(0)
    m = build_model({**MLP, "widths": [24, 24]}, (10,), 3)
    d = DriftSchedule(check_every=1, flip_threshold=0.5)
    ctx = RehashContext(step=1, epoch=0, epoch_end=False, sites=m.merge_sites(), model=m)
    d.decide(ctx)
    d.notify(ctx, RehashEvent(step=1, sites=["fc2"]))
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    e = DriftSchedule(check_every=1, flip_threshold=0.5)
    e.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        m.layers[1].weight.add_(0.3 * torch.randn_like(m.layers[1].weight))
    s = m.merge_sites()
    assert e.measure(s[1], 1, 2) == d.measure(s[1], 1, 2)
    assert e.last_rehash == {"fc2": 1} and e.per_site == {"fc2": 1}


def test_drift_bad_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="unit must be step"):
        DriftSchedule(check_every=5, unit="epoch")
    with pytest.raises(ConfigError, match="flip_threshold"):
        DriftSchedule(check_every=5, flip_threshold=2)
    d = DriftSchedule(check_every=5, sites=["fc7"])
    m = build_model({**MLP, "widths": [8]}, (4,), 2)
    with pytest.raises(ConfigError, match=r"\['fc7'\].*\['fc1'\]"):
        d.decide(RehashContext(step=5, epoch=0, epoch_end=False, sites=m.merge_sites(), model=m))


@pytest.mark.slow
def test_per_layer_and_drift_run_in_the_app(tmp_path):
    from conftest import TINY, read_metrics, run_app, run_dirs

    run_app(tmp_path, TINY + ["hashing=simhash", "hashing.threshold=0.3", "hashing.target_ratio=0.8",
                              "schedule=per_layer,drift", "schedule.unit=step", "schedule.start=5", "schedule.every=5",
                              "schedule.max_rehashes=2"], multirun=True)
    runs = {read_metrics(r)["schedule"]: r for r in run_dirs(tmp_path)}
    assert set(runs) == {"per_layer", "drift"}
    assert read_metrics(runs["per_layer"])["rehashes"] == 2  # both sites at steps 5 and 10, then max_rehashes
    with open(runs["drift"] / "history.csv", newline="") as f:
        drift = [r for r in csv.DictReader(f) if r["kind"] == "drift"]
    assert [r["step"] for r in drift[:4]] == ["5", "5", "10", "10"]
    assert {r["drift/site"] for r in drift} == {"fc1", "fc2"}
    assert all(0.0 <= float(r["drift/bit_flip"]) <= 1.0 and 0.0 <= float(r["drift/partner_frac"]) <= 1.0 for r in drift)


# ------------------------------------------------------------------------------ gradual
def test_gradual_targets_are_reached_at_the_scheduled_steps(tmp_path):
    """Cubic ramp 32 -> 8 over steps 5..45 every 10: targets 32, 22, 15, 10, 8 (hand-computed)."""
    from hashexp.merge.baselines import MagnitudePruner

    sched = GradualSchedule(start=5, end=45, every=10, final_ratio=0.25)
    # w(t) = 8 + 24 (1 - p)^3, p = (t - 5) / 40: t=5 -> 32, 15 -> 8 + 24 * 0.421875 = 18.125 -> 18,
    # 25 -> 8 + 24 * 0.125 = 11, 35 -> 8 + 24 * 0.015625 = 8.375 -> 8, 45 -> 8
    tr = tiny_trainer(tmp_path, MagnitudePruner(target_ratio=None, min_width=1), sched, epochs=3)
    tr.fit()
    assert steps_of(tr)["fc1"] == [5, 15, 25, 35, 45]
    assert [e.after["fc1"] for e in tr.rehash_log] == [32, 18, 11, 8, 8]
    assert [e.after["fc2"] for e in tr.rehash_log] == [32, 18, 11, 8, 8]
    lin = GradualSchedule(start=0, end=100, every=50, final_width={"fc1": 10}, shape="linear")
    lin.initial = {"fc1": 50}
    assert [lin.target("fc1", t) for t in (0, 50, 100, 150)] == [50, 30, 10, 10]
    with pytest.raises(ConfigError, match="0 <= start < end"):
        GradualSchedule(start=10, end=10)
    with pytest.raises(ConfigError, match="shape='quadratic'"):
        GradualSchedule(shape="quadratic")


def test_stability_trigger_fires_on_converging_neurons_not_on_frozen_random_weights():
    """Neurons that move toward targets for 6 steps and then stop: the trigger fires at the first
    check after they stop (step 7); a frozen random layer never drifts, so it never fires."""
    torch.manual_seed(0)
    moving = build_model({**MLP, "widths": [32]}, (10,), 3)
    frozen = build_model({**MLP, "widths": [32]}, (10,), 3)
    w0, b0 = moving.layers[0].weight.detach().clone(), moving.layers[0].bias.detach().clone()
    target_w, target_b = torch.randn_like(w0), torch.randn_like(b0)
    fired: dict[str, list[int]] = {"moving": [], "frozen": []}
    for name, model in (("moving", moving), ("frozen", frozen)):
        d = DriftSchedule(check_every=1, flip_threshold=None, partner_threshold=None, stable_threshold=0.0,
                          stable_min_drift=0.05, min_interval=0)
        for step in range(1, 13):
            if name == "moving":
                a = min(step, 6) / 6
                with torch.no_grad():
                    model.layers[0].weight.copy_((1 - a) * w0 + a * target_w)
                    model.layers[0].bias.copy_((1 - a) * b0 + a * target_b)
            ctx = RehashContext(step=step, epoch=0, epoch_end=False, sites=model.merge_sites(), model=model)
            if d.decide(ctx):
                d.notify(ctx, RehashEvent(step=step, sites=["fc1"]))
                fired[name].append(step)
    assert fired == {"moving": [7], "frozen": []}
    # its state (the previous check's flips) survives a checkpoint
    e = DriftSchedule(check_every=1, stable_threshold=0.0)
    e.load_state_dict(d.state_dict())
    assert e.last == d.last
    with pytest.raises(ConfigError, match="stable_threshold"):
        DriftSchedule(check_every=1, stable_threshold=1.5)
