"""Sweep presets: every grid point of every W&B sweep file and of every Hydra multirun preset
(conf/experiment/sweep_*.yaml) composes, a W&B sweep and its Hydra twin configure the same runs,
and a real multirun with one failing job ends with the good run tabulated and the bad one listed."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEPS = ROOT / "sweeps"
WANDB_FILES = sorted(SWEEPS.glob("wandb_*.yaml"))
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("sweep_*.yaml"))
WANDB_COMMAND = ["${env}", "${interpreter}", "-m", "${program}", "${args_no_hyphens}"]
# keys that differ on purpose between a W&B sweep and its Hydra twin
TWIN_DIFF = {"tag", "logger", "trainer.device"}


@pytest.fixture(scope="module")
def compose():
    """compose(overrides) -> config with hydra node; one Hydra context and a cache for the module."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    cache: dict[tuple, object] = {}

    def run(overrides):
        key = tuple(sorted(overrides))
        if key not in cache:
            cache[key] = hcompose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        return cache[key]

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield run


def grid(axes: list[tuple[str, list]]) -> list[list[tuple[str, object]]]:
    """The grid points to compose: the full product of every axis but the seed (values of one key
    can depend on another's, e.g. hashing.threshold on hashing), each seed once (a seed is a seed)."""
    other = [(k, vs) for k, vs in axes if k != "seed"]
    seeds = [vs for k, vs in axes if k == "seed"]
    points = [list(zip([k for k, _ in other], combo)) for combo in itertools.product(*[vs for _, vs in other])]
    if seeds:
        points = [p + [("seed", seeds[0][0])] for p in points]
        points += [points[0][:-1] + [("seed", v)] for v in seeds[0][1:]]
    return points


def one_at_a_time(axes: list[tuple[str, list]]) -> list[list[tuple[str, object]]]:
    """Each value of each axis once, the other axes at their first value."""
    first = [(k, vs[0]) for k, vs in axes]
    points = [first]
    for i, (k, vs) in enumerate(axes):
        points += [first[:i] + [(k, v)] + first[i + 1:] for v in vs[1:]]
    return points


def wandb_axes(spec: dict) -> list[tuple[str, list]]:
    return [(name, p["values"] if "values" in p else [p["value"]]) for name, p in spec["parameters"].items()]


def wandb_grid(spec: dict) -> list[dict]:
    """The W&B grid sweep's runs (see grid()) as {param: value}."""
    return [dict(point) for point in grid(wandb_axes(spec))]


def wandb_size(spec: dict) -> int:
    n = 1
    for p in spec["parameters"].values():
        n *= len(p.get("values", [None]))
    return n


def wandb_args(params: dict) -> list[str]:
    """The argv W&B's agent builds for ${args_no_hyphens} (with W&B's own function when present)."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

        return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]
    except ImportError:  # pragma: no cover - wandb is a dependency; same rule as its agent
        return [f"{k}={v}" for k, v in params.items()]


def hydra_axes(params: dict) -> list[tuple[str, list[str]]]:
    """A Hydra basic-sweeper params block as (key, [value strings]) axes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [(o.get_key_element(), list(o.sweep_string_iterator()) if o.is_sweep_override()
             else [o.get_value_element_as_str()]) for o in parsed]


def hydra_grid(params: dict) -> list[list[str]]:
    return [[f"{k}={v}" for k, v in point] for point in grid(hydra_axes(params))]


def hydra_size(params: dict) -> int:
    n = 1
    for _, vs in hydra_axes(params):
        n *= len(vs)
    return n


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("hydra", None)
    return c


def _flat(c: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in c.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _drop(c: dict, keys: set[str]) -> dict:
    c = json.loads(json.dumps(c))
    for k in keys:
        node, parts = c, k.split(".")
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    return c


def test_there_are_sweeps():
    assert len(WANDB_FILES) >= 4 and len(PRESETS) >= 4
    assert {"sweep_quick", "sweep_mlp_fmnist"} <= set(PRESETS)


@pytest.mark.parametrize("path", WANDB_FILES, ids=lambda p: p.stem)
def test_wandb_sweep_file_every_grid_point_composes(path, compose):
    spec = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("# wandb sweep sweeps/" + path.name)
    assert spec["program"] == "hashexp" and spec["command"] == WANDB_COMMAND and spec["method"] == "grid"
    assert spec["metric"]["name"] == "test_acc"
    points = wandb_grid(spec)
    hashings = set()
    for params in points:
        cfg = compose(wandb_args(params))
        assert cfg.logger.name == "wandb" and cfg.logger.mode == "online" and cfg.tag == path.stem
        for key, val in params.items():  # every value landed where it was meant to
            if key in ("experiment", "hashing", "dataset", "model", "logger", "schedule", "trainer"):
                continue
            from omegaconf import OmegaConf

            assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"] == val, key
        if "hashing" in params:
            assert cfg.hashing.name == params["hashing"]
            hashings.add(params["hashing"])
        if "dataset" in params:
            assert cfg.dataset.name == params["dataset"]
        if "model" in params:
            assert cfg.model.name == params["model"]
    assert len(points) == len({json.dumps(p, sort_keys=True) for p in points})
    assert wandb_size(spec) >= len(points)


@pytest.mark.parametrize("path", WANDB_FILES, ids=lambda p: p.stem)
def test_wandb_sweep_and_its_hydra_twin_configure_the_same_runs(path, compose):
    spec = yaml.safe_load(path.read_text())
    exp = spec["parameters"]["experiment"]["value"]
    assert f"experiment={exp}" in path.read_text().splitlines()[2]
    preset = compose([f"experiment={exp}"])
    params_h = dict(preset.hydra.sweeper.params)
    assert wandb_size(spec) == hydra_size(params_h), f"{path.name} and experiment={exp} differ in size"
    swept_w = {k for k, p in spec["parameters"].items() if "values" in p}
    assert swept_w == {k for k, _ in hydra_axes(params_h)}, f"{path.name} and experiment={exp} sweep other keys"
    for params in map(dict, one_at_a_time(wandb_axes(spec))):
        swept = {k: v for k, v in params.items() if k in swept_w}
        a = _drop(_plain(compose(wandb_args(params))), TWIN_DIFF)
        b = _drop(_plain(compose([f"experiment={exp}", *wandb_args(swept)])), TWIN_DIFF)
        diff = sorted(k for k in set(_flat(a)) | set(_flat(b)) if _flat(a).get(k) != _flat(b).get(k))
        assert not diff, f"{path.name} {swept}: differs from experiment={exp} in {diff}"


@pytest.mark.parametrize("path", WANDB_FILES, ids=lambda p: p.stem)
def test_wandb_sweep_grid_equals_its_hydra_preset_params(path, compose):
    """One source of truth: the W&B file sweeps exactly the keys and values (in order) of its
    Hydra preset's hydra.sweeper.params, so its grid is the preset's multirun, run for run."""
    spec = yaml.safe_load(path.read_text())
    exp = spec["parameters"]["experiment"]["value"]
    axes_h = hydra_axes(dict(compose([f"experiment={exp}"]).hydra.sweeper.params))
    swept_w = {k: p["values"] for k, p in spec["parameters"].items() if "values" in p}
    # each W&B value as the agent passes it, parsed back by Hydra's override grammar
    axes_w = []
    for k, xs in swept_w.items():
        vals = []
        for x in xs:
            ((key, [v]),) = hydra_axes(dict([wandb_args({k: x})[0].split("=", 1)]))
            assert key == k
            vals.append(v)
        axes_w.append((k, vals))
    assert dict(axes_w) == dict(axes_h), f"{path.name} and experiment={exp} sweep different grids"
    assert {tuple(p) for p in grid(axes_w)} == {tuple(p) for p in grid(axes_h)}


@pytest.mark.parametrize("name", PRESETS)
def test_hydra_sweep_preset_every_job_composes(name, compose):
    text = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert text[0] == "# @package _global_"
    assert text[1].startswith(f"# python -m hashexp -m experiment={name}")
    base = compose([f"experiment={name}"])
    assert base.tag, f"{name} sets no tag"
    assert name in base.hydra.sweep.dir
    params = dict(base.hydra.sweeper.params or {})
    assert params, f"{name} sweeps nothing"
    jobs = hydra_grid(params)
    assert len(jobs) >= 2
    for job in jobs:
        cfg = compose([f"experiment={name}", *job])
        for ov in job:
            key, val = ov.split("=", 1)
            if key in ("hashing", "dataset", "model"):
                assert cfg[key].name == val, ov
        assert cfg.trainer.epochs >= 1
        if cfg.hashing.name != "none":  # compressors get a target or a threshold
            h = cfg.hashing
            assert h.get("target_ratio") or h.get("target_width") or h.get("width_plan") or h.get("threshold")


def test_matched_baselines_script_is_valid_bash():
    script = SWEEPS / "matched_baselines.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.slow
def test_multirun_with_a_failing_job(tmp_path):
    """2 jobs: npz data that exists and a path that does not. The bad job writes status.json, the
    multirun carries on, and the table lists it as failed next to the tabulated good run."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    good = tmp_path / "data" / "good.npz"
    good.parent.mkdir()
    np.savez(good, x_train=x[:500], y_train=y[:500], x_test=x[500:], y_test=y[500:])
    missing = tmp_path / "data" / "missing.npz"
    env = dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hashexp", "-m", "dataset=npz", f"dataset.path={good},{missing}",
           "dataset.subset_train=300", "model.widths=[32,32]", "trainer.epochs=1", "trainer.batch_size=64",
           "trainer.logging.progress=none", "tag=failing_sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = [p.parent for p in (tmp_path / "outputs").rglob("multirun.yaml")]
    ok_dir, bad_dir = sweep / "0_npz_mlp_none_s0", sweep / "1_npz_mlp_none_s0"
    m = json.loads((ok_dir / "metrics.json").read_text())
    assert m["status"] == "ok" and m["dataset"] == "npz" and m["widths"] == {"fc1": 32, "fc2": 32}
    assert not (bad_dir / "metrics.json").exists()
    st = json.loads((bad_dir / "status.json").read_text())
    assert st["status"] == "failed" and "missing.npz" in st["error"]

    from hashexp import results as R

    runs = R.collect_runs([str(tmp_path / "outputs")])
    by = {Path(r["run_dir"]).name: r for r in runs}
    assert by[ok_dir.name]["status"] == "ok" and by[bad_dir.name]["status"] == "failed"
    assert by[ok_dir.name]["sweep_dir"] == str(sweep)
    assert f"dataset.path={good}" in by[ok_dir.name]["overrides"]
    rows = R.summarize(runs)
    assert len(rows) == 1 and rows[0]["n"] == 1 and rows[0]["tag"] == "failing_sweep"
    assert rows[0]["test_acc_mean"] == pytest.approx(m["test_acc"]) and rows[0]["flops_reduction_mean"] == 1.0
    out = tmp_path / "tables"
    assert R.main([str(tmp_path / "outputs"), "--sweep", "latest", "--out", str(out), "--no-plots"]) == 0
    md = (out / "results.md").read_text()
    assert "| npz | mlp | **none** |" in md
    failed_part = md.split("## Failed / unfinished")[1]
    assert "**failed**" in failed_part and bad_dir.name in failed_part and "missing.npz" in failed_part
    assert ok_dir.name not in failed_part
