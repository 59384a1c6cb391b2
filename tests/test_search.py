"""Automatic search (conf/experiment/search_mlp_optuna.yaml): a real 2-trial Optuna multirun on
synthetic data writes two ordinary run dirs and a Pareto front of (test_acc, flops)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY, run_app

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the search extra: pip install -e .[search]")


def test_objective_values():
    from hashexp.__main__ import objective_values
    from hashexp.errors import ConfigError

    m = {"test_acc": 0.9, "flops": 1200, "widths": {"fc1": 3}}
    assert objective_values(m, None) == 0.9
    assert objective_values(m, ["test_acc", "flops"]) == (0.9, 1200.0)
    with pytest.raises(ConfigError, match="widths"):
        objective_values(m, ["widths"])


@pytest.mark.slow
def test_two_trial_optuna_search_writes_runs_and_a_pareto_front(tmp_path):
    run_app(tmp_path, ["experiment=search_mlp_optuna", *TINY, "trainer.logging.every=100", "hashing.min_width=4",
                       "schedule.start=4", "schedule.every=choice(4,8)",
                       "hashing.calib_samples=choice(128,256)", "hydra.sweeper.n_trials=2",
                       "hydra.sweeper.sampler.population_size=2"], multirun=True)
    (sweep,) = [p.parent for p in (tmp_path / "outputs" / "multirun").rglob("optimization_results.yaml")]
    assert sweep.name.endswith("_search_mlp_optuna")
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert [r.name.split("_")[0] for r in runs] == ["0", "1"]
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    for m in metrics:
        assert m["status"] == "ok" and m["hashing"] == "simhash" and m["tag"] == "search_mlp_optuna"
    front = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert front["name"] == "optuna" and 1 <= len(front["solutions"]) <= 2
    observed = {(m["test_acc"], float(m["flops"])) for m in metrics}
    for s in front["solutions"]:
        assert tuple(s["values"]) in observed  # the front is made of the trials' own (test_acc, flops)
        assert set(s["params"]) == {"hashing.max_error", "hashing.calib_samples", "schedule.every"}

    from hashexp import results as R  # what `make results-table` reads

    found = [r for r in R.collect_runs([str(tmp_path / "outputs")]) if r["status"] == "ok"]
    assert sorted(r["run_dir"] for r in found) == sorted(str(r) for r in runs)
