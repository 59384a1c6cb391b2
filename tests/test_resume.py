"""Checkpoint and resume: a killed run continues to exactly the metrics of an uninterrupted one.

Hashed rehashing runs during training in every test, so the checkpoint must carry the merged
widths, the optimizer state, the schedule and compressor state, the RNG streams and the
activation statistics that weigh the next representatives; equality is exact on CPU.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import compose, killed_run

ROOT = Path(__file__).resolve().parents[1]

# 1280 train samples in batches of 16: 80 steps per epoch, 6 epochs; rehash every 40 steps.
KILL_RUN = ["dataset=synthetic", "dataset.n_samples=1600", "model.widths=[48,48]", "trainer.epochs=6",
            "trainer.batch_size=16", "trainer.logging.progress=log", "trainer.logging.every=10", "trainer.num_threads=1",
            "hashing=simhash", "hashing.max_error=0.5", "hashing.target_ratio=0.85", "hashing.window=30",
            "schedule.unit=step", "schedule.every=40", "schedule.start=20", "schedule.max_rehashes=6", "seed=1"]

# in-process runs: 1024 train samples, batch 32 (32 steps per epoch), a checkpoint every 11 steps
MID_RUN = ["dataset=synthetic", "dataset.n_samples=1280", "model.widths=[48,48]", "trainer.epochs=4",
           "trainer.batch_size=32", "trainer.logging.progress=none", "trainer.logging.every=3", "trainer.num_threads=1",
           "hashing=simhash",
           "hashing.max_error=0.5", "hashing.representative=mean", "hashing.target_ratio=0.8", "hashing.window=20",
           "schedule.unit=step",
           "schedule.every=25", "schedule.start=10", "trainer.checkpoint.every_steps=11", "seed=2"]

SAME = ["test_acc", "train_acc", "test_loss", "train_loss", "widths", "widths_before", "rehashes", "steps",
        "epochs", "flops", "params"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """In-process runs set one intra-op thread (as the subprocesses get): undo it afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _app(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hashexp", *args]


def _history(path: Path) -> list[dict[str, str]]:
    """history.csv rows without the wall-clock columns."""
    with path.open() as f:
        return [{k: v for k, v in r.items() if not k.endswith("time_s") and not k.endswith("metric_s")}
                for r in csv.DictReader(f)]


def _assert_same_run(a: dict, b: dict) -> None:
    for k in SAME:
        assert a[k] == b[k], k
    assert [(e["step"], e["after"]) for e in a["rehash_events"]] == [(e["step"], e["after"]) for e in b["rehash_events"]]


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not there yet
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = _env(tmp_path)
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run trains alongside the one that gets killed
    ref = subprocess.Popen(_app([*KILL_RUN, f"hydra.run.dir={full}"]), cwd=str(tmp_path), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_app([*KILL_RUN, f"hydra.run.dir={killed}"]), cwd=str(tmp_path), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while _checkpoint_epoch(killed / "checkpoint.pt") < 1:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    ck = torch.load(killed / "checkpoint.pt", weights_only=True)
    # killed mid-training at an epoch boundary: 1280 train samples / batch 16 = 80 steps an epoch,
    # rehashes at steps 20, 60, 100, ... (at most 6), each keeping 0.85 of every width
    assert ck["epoch"] < 6 and ck["step"] == 80 * ck["epoch"]
    assert ck["rehashes"] == min(6, len(range(20, ck["step"] + 1, 40)))
    assert all(w < 48 for w in ck["model"]["widths"].values()), ck["model"]["widths"]
    assert any(len(v) for v in ck["stats"][0].values())  # activation statistics travel with it

    # resume in its own run dir: history.csv is cut back to the checkpoint and continued
    res = subprocess.run(_app([*KILL_RUN, "trainer.checkpoint.resume=auto", f"hydra.run.dir={killed}"]), cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (killed / "__main__.log").read_text()
    _, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-3000:]

    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    _assert_same_run(a, b)
    assert b["rehashes"] == 6 and b["widths"] != b["widths_before"]
    assert _history(full / "history.csv") == _history(killed / "history.csv")


def test_kill_during_mid_epoch_checkpoint_write_resumes_exactly_into_a_new_dir(tmp_path, monkeypatch):
    from hashexp.app import train_run
    from hashexp.train import Trainer

    ref = train_run(compose(MID_RUN), str(tmp_path / "full"))

    # second attempt: "killed" while writing its 7th checkpoint (step 66, epoch 3): half a file
    killed_run(monkeypatch, compose(MID_RUN), tmp_path / "killed", 7, torn_bytes=2000)

    killed = tmp_path / "killed"
    assert (killed / "checkpoint.pt.tmp").stat().st_size == 2000  # the torn write
    ck = torch.load(killed / "checkpoint.pt", weights_only=True)  # the previous checkpoint is intact
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (55, 1, 23)
    assert ck["history_rows"] < len(_history(killed / "history.csv"))  # the attempt logged past it
    assert len(ck["stats"][0]["fc1"]) > 0 and len(ck["pending_losses"]) == 1  # step 55, last row at 54

    # resume from that run dir into a new one: the history rows up to the checkpoint come along
    out = train_run(compose([*MID_RUN, f"trainer.checkpoint.resume={killed}"]), str(tmp_path / "resumed"))
    _assert_same_run(ref, out)
    assert ref["rehashes"] == 5
    assert _history(tmp_path / "full" / "history.csv") == _history(tmp_path / "resumed" / "history.csv")

    # a mid-epoch position means nothing with another batch size: refused, not guessed
    from hashexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"made with trainer.batch_size=32, this run has trainer.batch_size=16"):
        train_run(compose([*MID_RUN, "trainer.batch_size=16", f"trainer.checkpoint.resume={killed}"]), str(tmp_path / "bs"))
    # (a checkpoint without a recorded config, from before it was recorded, is refused by its position)
    old = torch.load(killed / "checkpoint.pt", weights_only=True)
    old.pop("config")
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="same trainer.batch_size"):
        train_run(compose([*MID_RUN, "trainer.batch_size=16", f"trainer.checkpoint.resume={tmp_path / 'old'}"]), str(tmp_path / "bs"))

    # the activation statistics in the checkpoint matter: without them the next merge differs
    monkeypatch.setattr(Trainer, "_rank_stats", lambda self, saved: None)
    lossy = train_run(compose([*MID_RUN, f"trainer.checkpoint.resume={killed}"]), str(tmp_path / "lossy"))
    assert lossy["train_loss"] != ref["train_loss"]


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    from hashexp.app import train_run
    from hashexp.errors import DataError

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(DataError, match="no checkpoint there"):
        train_run(compose([*MID_RUN, f"trainer.checkpoint.resume={tmp_path / 'nowhere'}"]), str(tmp_path / "x"))
    # resume=auto never silently starts over from a checkpoint it cannot read
    res = subprocess.run(_app([*MID_RUN, "trainer.checkpoint.resume=auto", f"hydra.run.dir={run}"]), cwd=str(tmp_path),
                         env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hashexp: error: checkpoint") and "unreadable" in lines[0], res.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert not (run / "metrics.json").exists()


def test_resume_refuses_another_model_or_input_size_and_bad_optimizer_values_are_one_error(tmp_path):
    from hashexp.app import train_run
    from hashexp.errors import ConfigError

    train_run(compose([*MID_RUN, "trainer.epochs=1"]), str(tmp_path / "a"))
    ck = tmp_path / "a"
    # the checkpoint records the run's config: a change of model, data, compressor, schedule, seed,
    # optimizer or batch size is named, key by key, with both values
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint.resume=.*checkpoint.pt: the checkpoint was made with "
                                          r"model.widths=\[48, 48\], this run has model.widths=\[64, 64\]; resume "
                                          r"with the checkpoint's settings or start a new run$"):
        train_run(compose([*MID_RUN, "model.widths=[64,64]", f"trainer.checkpoint.resume={ck}"]), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"made with dataset.n_features=20, hashing.max_error=0.5, seed=2, this run "
                                          r"has dataset.n_features=16, hashing.max_error=0.3, seed=3;"):
        train_run(compose([*MID_RUN, "dataset.n_features=16", "hashing.max_error=0.3", "seed=3",
                           f"trainer.checkpoint.resume={ck}"]), str(tmp_path / "c"))
    assert not (tmp_path / "b" / "metrics.json").exists() and (ck / "metrics.json").exists()
    # a checkpoint without a recorded config (older format): the model spec is still compared
    old = torch.load(ck / "checkpoint.pt", weights_only=True)
    old.pop("config")
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"the checkpoint holds MLP\(.*'widths': \[48, 48\].*this run builds "
                                          r"MLP\(.*'widths': \[64, 64\]"):
        train_run(compose([*MID_RUN, "model.widths=[64,64]", f"trainer.checkpoint.resume={tmp_path / 'old'}"]), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"for inputs \[20\] .* for inputs \[16\]"):
        train_run(compose([*MID_RUN, "dataset.n_features=16", f"trainer.checkpoint.resume={tmp_path / 'old'}"]), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"^trainer.optimizer.lr=.abc. has the wrong type: expected a number$"):
        train_run(compose([*MID_RUN, "trainer.optimizer.lr=abc"]), str(tmp_path / "d"))


def _trainer(overrides: list[str], run_dir: Path):
    """A Trainer built as hashexp.app.train_run builds it, without fitting."""
    from hashexp.app import _instantiate, build_rehasher
    from hashexp.data import build_dataset
    from hashexp.models import build_model
    from hashexp.utils.seeding import seed_everything

    cfg = compose(overrides)
    seed = int(cfg.seed)
    seed_everything(seed)
    data = build_dataset(cfg.dataset, seed=seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    rehasher = build_rehasher(cfg.hashing, seed)
    schedule = _instantiate(cfg.schedule, "schedule")
    run_dir.mkdir(parents=True, exist_ok=True)
    return _instantiate(cfg.trainer, "trainer")(model=model, data=data, rehasher=rehasher, schedule=schedule,
                                                 logger=None, run_dir=str(run_dir), seed=seed, dist=None)


def test_checkpoint_round_trip_in_process(tmp_path):
    """save_checkpoint, then load_checkpoint into a fresh Trainer: same weights (at the merged
    widths), optimizer state, step, schedule and compressor state, and every RNG stream."""
    import random

    import numpy as np

    run = [*MID_RUN, "trainer.epochs=1"]
    a = _trainer(run, tmp_path / "a")
    a.fit()
    assert a.rehashes >= 1 and a.model.widths() != {"fc1": 48, "fc2": 48}  # merged: widths must travel
    a.save_checkpoint()
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), a.gen.get_state(),
           a.aug_gen.get_state())

    b = _trainer(run, tmp_path / "b")  # consumes the global RNGs again (model init)
    assert b.model.widths() == {"fc1": 48, "fc2": 48}
    b.load_checkpoint(str(tmp_path / "a"))

    assert b.model.widths() == a.model.widths()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (i, k)
    assert (b.step, b.epoch, b.rehashes, b.batch_in_epoch) == (a.step, a.epoch, a.rehashes, a.batch_in_epoch)
    assert b.schedule.state_dict() == a.schedule.state_dict()
    assert json.dumps(b.rehasher.compressor.state_dict(), sort_keys=True, default=str) == \
        json.dumps(a.rehasher.compressor.state_dict(), sort_keys=True, default=str)
    assert b.rehash_log == a.rehash_log and b.widths_before == a.widths_before
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert torch.equal(b.gen.get_state(), rng[3]) and torch.equal(b.aug_gen.get_state(), rng[4])


def test_resume_with_more_epochs_is_allowed_and_recorded(tmp_path):
    from hashexp.app import train_run

    train_run(compose([*MID_RUN, "trainer.epochs=1"]), str(tmp_path / "a"))
    out = train_run(compose([*MID_RUN, "trainer.epochs=2", "trainer.logging.every=5", f"trainer.checkpoint.resume={tmp_path / 'a'}"]),
                    str(tmp_path / "b"))
    assert out["epochs"] == 2 and out["steps"] == 64
    assert out["resumed"] == {"from": str(tmp_path / "a" / "checkpoint.pt"),
                              "changed": {"trainer.checkpoint.resume": [None, str(tmp_path / "a")],
                                          "trainer.epochs": [1, 2], "trainer.logging.every": [3, 5]}}
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["resumed"] == out["resumed"]
    assert "resumed" not in json.loads((tmp_path / "a" / "metrics.json").read_text())


def test_config_changes_ignore_a_knob_added_with_a_null_default():
    from hashexp.train.checkpoint import config_changes

    old = {"hashing": {"max_error": 0.02}, "trainer": {"epochs": 1}}
    new = {"hashing": {"max_error": 0.02, "site_overrides": None}, "trainer": {"epochs": 2}}
    assert config_changes(old, new) == ({}, {"trainer.epochs": [1, 2]})
    refused, _ = config_changes(old, {"hashing": {"max_error": 0.02, "site_overrides": {"fc1": {"target_width": 8}}}})
    assert list(refused) == ["hashing.site_overrides.fc1.target_width"]


# a baseline run as MID_RUN's: checkpoints every 11 steps, a rehash at steps 10, 35, 60, 85, 110
BASELINE_RUN = [o for o in MID_RUN if not o.startswith(("hashing", "seed"))] + [
    "hashing=magnitude", "hashing.target_ratio=0.8", "hashing.window=20", "seed=3"]


def test_a_baseline_checkpoint_from_before_scoring_resumes_sequential_as_it_was_started(tmp_path, monkeypatch, caplog):
    from hashexp.app import train_run

    seq = train_run(compose([*BASELINE_RUN, "hashing.scoring=sequential"]), str(tmp_path / "seq"))
    orig = train_run(compose(BASELINE_RUN), str(tmp_path / "orig"))  # the default, original
    assert orig["train_loss"] != seq["train_loss"]  # the two scorings differ in this run

    # an old run: killed right after its 3rd checkpoint (step 32, an epoch end; rehashes at 35.. still to come),
    # its recorded config without the scoring key, as code before issue 22 wrote it
    ck = killed_run(monkeypatch, compose([*BASELINE_RUN, "hashing.scoring=sequential"]), tmp_path / "old", 3)
    assert ck["step"] == 32 and ck["rehashes"] == 1
    del ck["config"]["hashing"]["scoring"]
    torch.save(ck, tmp_path / "old" / "checkpoint.pt")

    # resumed with today's default (original): it continues sequential and ends as the sequential run
    with caplog.at_level("WARNING", logger="hashexp"):
        out = train_run(compose([*BASELINE_RUN, f"trainer.checkpoint.resume={tmp_path / 'old'}"]), str(tmp_path / "res"))
    _assert_same_run(seq, out)
    assert out["train_loss"] == seq["train_loss"]
    assert out["resumed"]["adopted"] == {"hashing.scoring": ["original", "sequential"]}
    assert "hashing.scoring" not in out["resumed"]["changed"]
    assert "predates hashing.scoring: resuming with hashing.scoring=sequential" in caplog.text
    # its own checkpoint now records the behaviour, and a checkpoint that has the key is taken as it is
    assert torch.load(tmp_path / "res" / "checkpoint.pt", weights_only=True)["config"]["hashing"]["scoring"] == "sequential"
    from hashexp.errors import ConfigError

    with pytest.raises(ConfigError, match="made with hashing.scoring=sequential, this run has hashing.scoring=original"):
        train_run(compose([*BASELINE_RUN, f"trainer.checkpoint.resume={tmp_path / 'res'}"]), str(tmp_path / "res2"))


def test_predated_knobs_only_for_a_config_without_the_key():
    from hashexp.train.checkpoint import predated_knobs

    new = {"hashing": {"scoring": "original", "target_ratio": 0.5}}
    assert predated_knobs({"hashing": {"target_ratio": 0.5}}, new) == {"hashing.scoring": "sequential"}
    assert predated_knobs({"hashing": {"scoring": "original"}}, new) == {}
    assert predated_knobs({"hashing": {"threshold": 0.9}}, {"hashing": {"threshold": 0.9}}) == {}  # hashed: no such knob
    assert predated_knobs(None, None, present={"hashing.scoring"}) == {"hashing.scoring": "sequential"}
