"""The Rehasher owns compression during training: one ``hashing`` config splits into its knobs and
the compressor's; its state round-trips; one-shot and training share its steps."""

from __future__ import annotations

import pytest
import torch

from conftest import compose

from hashexp.app import build_rehasher
from hashexp.data.synthetic import load_synthetic
from hashexp.errors import ConfigError
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.rehasher import REHASHER_KNOBS, Rehasher
from hashexp.models import build_model

MLP = {"_target_": "hashexp.models.mlp.MLP", "widths": [32, 32]}


def test_hashing_config_splits_into_rehasher_and_compressor_knobs():
    cfg = compose(["hashing=simhash", "hashing.window=7", "hashing.calib_samples=64", "hashing.pull.steps=5",
                   "hashing.bn_recalib_batches=3", "hashing.max_error=0.3"])
    r = build_rehasher(cfg.hashing, seed=11)
    assert (r.window, r.calib_samples, r.bn_recalib_batches) == (7, 64, 3)
    assert r.pull is not None and r.pull_config.steps == 5
    assert isinstance(r.compressor, HashCompressor) and r.compressor.max_error == 0.3 and r.compressor.seed == 11
    for knob in REHASHER_KNOBS:  # the compressor no longer takes them
        assert not hasattr(r.compressor, knob), knob
    with pytest.raises(TypeError):
        HashCompressor(window=5)
    assert build_rehasher(compose(["hashing=none"]).hashing, seed=0) is None


@pytest.mark.parametrize("kw, match", [
    ({"window": -1}, "hashing.window must be >= 0"),
    ({"calib_samples": 0}, "hashing.calib_samples must be >= 1"),
    ({"bn_recalib_batches": -2}, "hashing.bn_recalib_batches must be >= 0"),
    ({"pull": {"steps": -1}}, "hashing.pull.steps must be >= 0"),
])
def test_bad_rehasher_knobs_are_one_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        Rehasher(HashCompressor(), **kw)


def test_state_round_trips_and_attach_draws_the_same_calibration_set():
    torch.manual_seed(0)
    data = load_synthetic(n_samples=600, seed=0)
    model = build_model(MLP, data.input_shape, data.num_classes)
    a = Rehasher(HashCompressor(max_error=0.5), window=4, calib_samples=100)
    a.attach(model, data, seed=3, batch_size=50)
    assert a.calibration().shape == (100, *data.input_shape)
    model.train()
    for i in range(6):
        model(data.x_train[i * 50:(i + 1) * 50])
    mass = a.stats.mass("fc1")
    assert mass is not None and len(a.stats.buffers["fc1"]) == 4  # the window keeps the last 4 batches
    event = a.rehash(model, None, ["fc1"], step=6, epoch=0, rehashes=0)
    assert event.sites == ["fc1"] and event.before["fc1"] == 32 and event.after["fc1"] == model.widths()["fc1"]
    assert event.after["fc1"] < 32 and 0 < event.error["fc1"] <= 0.5
    assert len(a.stats.buffers["fc1"]) == 0  # the merged site's statistics start over
    state = a.state_dict()
    b = Rehasher(HashCompressor(max_error=0.5), window=4, calib_samples=100)
    b.attach(model, data, seed=3, batch_size=50)
    assert torch.equal(b.calib_index, a.calib_index)
    b.load_state_dict(state)
    assert b.compressor.calls == a.compressor.calls == 1
    assert {k: v.shape for k, v in b.stats.state_dict().items()} == {k: v.shape for k, v in state["stats"].items()}


def test_a_checkpoint_naming_a_moved_compressor_class_still_resumes():
    from hashexp.train.checkpoint import config_changes

    new = {"hashing": {"_target_": "hashexp.merge.hashed.HashCompressor", "max_error": 0.1}, "seed": 0}
    old = {"hashing": {"_target_": "hashexp.merge.compressor.HashCompressor", "max_error": 0.1}, "seed": 0}
    assert config_changes(old, new) == ({}, {})
    other = {"hashing": {"_target_": "hashexp.merge.compressor.MagnitudePruner", "max_error": 0.1}, "seed": 0}
    refused, _ = config_changes(other, new)
    assert refused == {"hashing._target_": ["hashexp.merge.baselines.MagnitudePruner",
                                            "hashexp.merge.hashed.HashCompressor"]}
    old_schedule = {"schedule": {"_target_": "hashexp.schedule.DriftSchedule"}}
    assert config_changes(old_schedule, {"schedule": {"_target_": "hashexp.schedules.drift.DriftSchedule"}}) == ({}, {})
