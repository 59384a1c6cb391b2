"""The Hydra app end to end: every config option composes, runs write what they promise,
runs are deterministic, and user mistakes end in one clear line."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import CONF, TINY, compose, read_metrics, run_app, run_dirs

GROUPS = ["dataset", "model", "hashing", "schedule", "trainer", "logger", "experiment"]
METRIC_KEYS = {"test_acc", "train_acc", "majority_acc", "flops", "params", "widths", "wall_time_s",
               "train_time_s", "hash_time_s", "epochs", "seed", "groups", "rehashes", "peak_rss_mb"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _has_optuna_sweeper() -> bool:
    import importlib.util

    return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    opts = options(group)
    assert opts, f"conf/{group} has no options"
    for opt in opts:
        if opt.startswith("search_") and not _has_optuna_sweeper():
            continue  # needs the search extra (make test installs it)
        cfg = compose([f"{group}={opt}"])
        if group == "experiment":  # presets are global packages: they set keys of the other groups
            assert cfg.tag and cfg.dataset.name and cfg.model.name
        else:
            assert cfg[group] is not None
            assert cfg[group].name, f"{group}/{opt} has no name"
            assert "_target_" in cfg[group], f"{group}/{opt} has no _target_"


def test_experiment_presets_start_with_their_command():
    for p in (CONF / "experiment").glob("*.yaml"):
        # line 1 may be Hydra's package directive, which must come first; then the command
        first = next(line for line in p.read_text().splitlines() if not line.startswith("# @package"))
        assert first.startswith("# ") and "python -m hashexp" in first, f"{p.name} must start with its command"


def test_required_groups_present():
    for g in ("dataset", "model", "hashing", "schedule", "trainer", "logger"):
        assert {"none"} <= set(options("hashing"))
        assert options(g)
    assert {"synthetic", "fashion_mnist", "mnist", "cifar10", "npz"} <= set(options("dataset"))
    assert {"csv", "wandb"} <= set(options("logger"))


@pytest.mark.slow
def test_end_to_end_run_writes_run_dir(tmp_path):
    run_app(tmp_path, TINY)
    (rd,) = run_dirs(tmp_path)
    m = read_metrics(rd)
    assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
    assert m["status"] == "ok" and m["hash_time_s"] == 0.0 and m["epochs"] == 1
    assert m["groups"]["dataset"] == "synthetic" and m["groups"]["hashing"] == "none"
    # 20 inputs -> 32 -> 32 -> 2 classes
    assert m["flops"] == 2 * (20 * 32 + 32 * 32 + 32 * 2)
    assert m["params"] == (20 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    assert m["widths"] == {"fc1": 32, "fc2": 32}
    assert 0.5 < m["majority_acc"] < 0.9 and m["test_acc"] > m["majority_acc"]
    assert (rd / ".hydra" / "config.yaml").exists()
    rows = list(csv.DictReader((rd / "history.csv").open()))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"step", "epoch"}
    step_row = next(r for r in rows if r["kind"] == "step")
    for col in ("loss", "step_time_s", "width/fc1", "wnorm/layers.0", "gnorm/layers.2"):
        assert step_row[col] != "", col
    epoch_row = next(r for r in rows if r["kind"] == "epoch")
    assert float(epoch_row["test_acc"]) == pytest.approx(m["test_acc"], abs=1e-4)
    from hashexp.models import load_model

    payload = torch.load(rd / "model.pt", weights_only=True)
    assert payload["widths"] == {"fc1": 32, "fc2": 32}
    model = load_model(rd / "model.pt")
    assert model(torch.zeros(3, 20)).shape == (3, 2)


@pytest.mark.slow
def test_runs_from_any_working_directory(tmp_path):
    elsewhere = tmp_path / "somewhere" / "deep"
    elsewhere.mkdir(parents=True)
    run_app(tmp_path, TINY + ["seed=3", "model.widths=[16,8]"], cwd=elsewhere)
    (rd,) = run_dirs(tmp_path)
    m = read_metrics(rd)
    assert m["seed"] == 3 and m["widths"] == {"fc1": 16, "fc2": 8}


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_app(a, TINY + ["seed=5"])
    run_app(b, TINY + ["seed=5"])
    ma, mb = read_metrics(run_dirs(a)[0]), read_metrics(run_dirs(b)[0])
    for k in ("test_acc", "train_acc", "test_loss", "train_loss", "flops", "params"):
        assert ma[k] == mb[k], k
    c = tmp_path / "c"
    run_app(c, TINY + ["seed=6"])
    assert read_metrics(run_dirs(c)[0])["train_loss"] != ma["train_loss"]


@pytest.mark.slow
def test_multirun_over_seeds(tmp_path):
    run_app(tmp_path, TINY + ["seed=0,1"], multirun=True)
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and all("multirun" in str(d) for d in dirs)
    assert sorted(read_metrics(d)["seed"] for d in dirs) == [0, 1]


@pytest.mark.slow
def test_unknown_group_option_is_one_clear_error(tmp_path):
    proc = run_app(tmp_path, TINY + ["model=transformer"], check=False)
    assert proc.returncode != 0
    assert "Could not find 'model/transformer'" in proc.stderr
    assert "Available options in 'model'" in proc.stderr


@pytest.mark.slow
def test_bad_value_is_one_clear_error(tmp_path):
    proc = run_app(tmp_path, TINY + ["model.activation=swishy"], check=False)
    assert proc.returncode == 2
    assert "hashexp: error: model.activation='swishy' is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_malformed_npz_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, x_train=np.zeros((4, 3), np.float32), y_train=np.zeros(4, np.int64))
    proc = run_app(tmp_path, ["dataset=npz", f"dataset.path={bad}", "trainer.epochs=1"], check=False)
    assert proc.returncode == 2
    assert "x_test" in proc.stderr and "hashexp: error:" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the failed run is recorded as such, not as a finished run
    assert not list((tmp_path / "outputs").rglob("metrics.json"))
    assert list((tmp_path / "outputs").rglob("status.json"))


@pytest.mark.slow
def test_missing_dataset_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_app(tmp_path, ["dataset=fashion_mnist", f"dataset.root={empty}", "trainer.epochs=1"], check=False)
    assert proc.returncode == 2
    assert "hashexp: error:" in proc.stderr and str(empty) in proc.stderr
    assert "Traceback" not in proc.stderr
