"""Launchers: a real 2-job multirun through submitit's local executor, and the sbatch script the
Slurm launcher would submit (partition, GPUs, time limit from conf/hydra/launcher/slurm.yaml and
overrides), captured instead of submitted since there is no Slurm here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["dataset=synthetic", "dataset.n_samples=1000", "model.widths=[32,32]", "trainer.epochs=1",
        "trainer.batch_size=64", "trainer.logging.progress=none"]

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="disabled",
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.mark.slow
def test_submitit_local_multirun_runs_both_jobs(tmp_path):
    cmd = [sys.executable, "-m", "hashexp", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
           *TINY, "seed=0,1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = sorted((tmp_path / "outputs").rglob("metrics.json"))
    assert len(metrics) == 2, metrics
    seeds = set()
    for p in metrics:
        m = json.loads(p.read_text())
        assert m["status"] == "ok" and m["epochs"] == 1 and m["widths"] == {"fc1": 32, "fc2": 32}
        assert m["groups"]["dataset"] == "synthetic"
        seeds.add(m["seed"])
    assert seeds == {0, 1}
    sweep = metrics[0].parent.parent
    assert (sweep / "multirun.yaml").exists()
    assert any((sweep / ".submitit").rglob("*_result.pkl")), "jobs did not go through submitit"
    # the results scan skips .submitit/ and finds exactly the two runs
    from hashexp.results import collect_runs

    runs = collect_runs([str(tmp_path / "outputs")])
    assert sorted(r["status"] for r in runs) == ["ok", "ok"]


def _compose_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_defaults_and_overrides():
    cfg = _compose_hydra(["hydra/launcher=slurm"])
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher")
    assert la.gpus_per_node == 1 and la.tasks_per_node == 1 and la.timeout_min == 240 and la.partition is None
    cfg = _compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                          "hydra.launcher.timeout_min=30"])
    la = cfg.hydra.launcher
    assert (la.partition, la.gpus_per_node, la.timeout_min) == ("gpu", 2, 30)
    # the plugin's own config still works, and its keys are the ones slurm.yaml sets
    plain = _compose_hydra(["hydra/launcher=submitit_slurm"]).hydra.launcher
    assert set(la) == set(plain)


def test_slurm_launcher_writes_the_sbatch_script_it_would_submit(tmp_path, monkeypatch):
    """Run the launcher's real launch() up to sbatch: the array job script has our settings."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    sweep_dir = tmp_path / "sweep"
    cfg = _compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                          "hydra.launcher.timeout_min=30", "hydra.launcher.mem_gb=16", f"hydra.sweep.dir={sweep_dir}",
                          "hydra.job.name=hashexp", *TINY])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    captured = {}

    class Submitted(Exception):
        pass

    def fake_submit(self, command):
        captured["sbatch"] = self._make_submission_file_text(command, "uid")
        raise Submitted

    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun found"
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "_submit_command", fake_submit)
    state = Singleton.get_state()
    try:
        with pytest.raises(Submitted):
            launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    finally:
        Singleton.set_state(state)
    text = captured["sbatch"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=30",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=16GB",
                 "#SBATCH --array=0-1%2",  # 2 jobs, at most min(2, array_parallelism) at once
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=hashexp"):
        assert line in text, f"{line!r} not in\n{text}"
    assert str(sweep_dir / ".submitit") in text
    assert OmegaConf.select(cfg, "hydra.launcher.setup") is None
