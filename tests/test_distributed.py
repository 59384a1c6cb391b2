"""Data-parallel training: torchrun with 2 gloo ranks on CPU matches a single-process run.

The end-to-end test launches ``torchrun --standalone --nproc_per_node=2 -m hashexp`` on a tiny
synthetic problem with hashed rehashing during training (mid-epoch and with a last global batch
of one sample, so one rank trains on an empty slice) next to a single-process run with the same
global batch and seed, and compares the two run dirs. The unit tests check the slicing of global
batches and the Hydra overrides of ranks > 0 without a process group.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hashexp.distributed import Dist, rank_argv

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

# 1217 train samples, global batch 64: 19 full batches (32 per rank) and a last batch of one sample.
DDP_RUN = ["dataset=synthetic", "dataset.n_samples=1600", "dataset.subset_train=1217", "model.widths=[32,32]",
           "trainer.epochs=3", "trainer.batch_size=64", "trainer.logging.progress=log", "trainer.logging.every=5",
           "hashing=simhash", "hashing.max_error=0.5", "hashing.target_ratio=0.8", "schedule.unit=step",
           "schedule.every=15", "schedule.start=5", "seed=3"]


def _fake_dist(rank: int, world_size: int) -> Dist:
    d = object.__new__(Dist)
    d.rank, d.world_size, d.local_rank = rank, world_size, rank
    return d


def test_shards_partition_every_global_batch_including_a_short_last_one():
    from hashexp.data import BatchIterator

    x = torch.arange(21, dtype=torch.float32)[:, None]
    y = torch.arange(21)
    ws = 3
    per_rank = []
    for r in range(ws):
        it = BatchIterator(x, y, 10, shuffle=True, generator=torch.Generator().manual_seed(5))
        per_rank.append(list(_fake_dist(r, ws).shard(it)))
    glob = list(BatchIterator(x, y, 10, shuffle=True, generator=torch.Generator().manual_seed(5)))
    assert [len(b) for b, _ in glob] == [10, 10, 1]
    for i, (xb, yb) in enumerate(glob):
        parts = [per_rank[r][i] for r in range(ws)]
        assert torch.equal(torch.cat([p[1] for p in parts]), yb)
        assert torch.equal(torch.cat([p[0] for p in parts]), xb)
    # the one-sample batch: rank 0 gets nothing, rank 2 the sample (sizes differ by at most one)
    assert [len(per_rank[r][2][1]) for r in range(ws)] == [0, 0, 1]
    assert [len(per_rank[r][0][1]) for r in range(ws)] == [3, 3, 4]


def test_shard_transforms_the_global_batch_and_skips_without_transforming():
    from hashexp.data import BatchIterator

    x = torch.arange(16, dtype=torch.float32)[:, None]
    y = torch.arange(16)
    seen = []

    def transform(xb):
        seen.append(len(xb))
        return xb * 10

    it = BatchIterator(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    out = list(_fake_dist(1, 2).shard(it, transform=transform, start=2))
    glob = list(BatchIterator(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert seen == [4, 4]  # skipped batches are not augmented: the augmentation RNG stays in step
    assert [torch.equal(o[1], g[1][2:]) for o, g in zip(out, glob[2:])] == [True, True]
    assert torch.equal(out[0][0], glob[2][0][2:] * 10)
    # the fast path (no transform) gathers the same rows
    it = BatchIterator(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    fast = list(_fake_dist(1, 2).shard(it, start=2))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(fast, out))


def test_rank_argv_replaces_the_run_dir_and_silences_hydra():
    argv = ["dataset=synthetic", "hydra.run.dir=/x/y", "++hydra.output_subdir=.hydra", "seed=1"]
    out = rank_argv(argv, "/tmp/r1")
    assert out == ["dataset=synthetic", "seed=1", "hydra.run.dir=/tmp/r1", "hydra.output_subdir=null",
                   "hydra/job_logging=stdout"]


def _env(tmp_path: Path) -> dict[str, str]:
    scratch = tmp_path / "tmpdir"
    scratch.mkdir(exist_ok=True)
    return dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", TMPDIR=str(scratch), PYTHONPATH=str(ROOT))


def _history(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _ddp_and_single(tmp_path: Path, run: list[str]) -> tuple[dict, dict]:
    """Run ``run`` on two torchrun ranks and in one process (run dirs ``ddp``/``single`` under
    ``tmp_path``); both must succeed. Returns their metrics.json."""
    env = _env(tmp_path)
    ddp = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2",
                          "-m", "hashexp", *run, f"hydra.run.dir={tmp_path / 'ddp'}"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-4000:]
    single = subprocess.run([sys.executable, "-m", "hashexp", *run, f"hydra.run.dir={tmp_path / 'single'}"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    return (json.loads((tmp_path / "ddp" / "metrics.json").read_text()),
            json.loads((tmp_path / "single" / "metrics.json").read_text()))


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_torchrun_two_ranks_match_single_process(tmp_path):
    env = _env(tmp_path)
    # the DDP run uses Hydra's default (timestamped) run dir: rank 1 must not add a second one
    ddp = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2",
                            "-m", "hashexp", *DDP_RUN],
                           cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([sys.executable, "-m", "hashexp", *DDP_RUN, f"hydra.run.dir={tmp_path / 'single'}"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    out, _ = ddp.communicate(timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    assert ddp.returncode == 0, out[-4000:]

    runs = sorted(p.parent for p in (tmp_path / "outputs").rglob("metrics.json"))
    assert len(runs) == 1, runs  # one metrics.json: only rank 0 writes
    run = runs[0]
    assert [p for p in (tmp_path / "outputs").rglob("*") if p.is_dir() and p.name != ".hydra"
            and p != run and p not in run.parents] == []  # no run dir of rank 1
    assert list((tmp_path / "tmpdir").glob("hashexp-rank*")) == []  # its temporary Hydra dir is gone
    assert {".hydra", "__main__.log", "checkpoint.pt", "history.csv", "metrics.json", "model.pt"} <= \
        {p.name for p in run.iterdir()}

    m_ddp = json.loads((run / "metrics.json").read_text())
    m_one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert m_ddp["world_size"] == 2 and m_one["world_size"] == 1
    assert m_ddp["rehashes"] == m_one["rehashes"] == 4
    assert m_ddp["widths"] == m_one["widths"] and m_ddp["widths"] != m_ddp["widths_before"]
    assert [e["after"] for e in m_ddp["rehash_events"]] == [e["after"] for e in m_one["rehash_events"]]
    assert m_ddp["steps"] == m_one["steps"] == 3 * 20
    assert m_ddp["test_acc"] == pytest.approx(m_one["test_acc"], abs=1e-3)
    assert m_ddp["train_acc"] == pytest.approx(m_one["train_acc"], abs=1e-3)
    assert m_ddp["train_loss"] == pytest.approx(m_one["train_loss"], rel=1e-3)
    assert m_ddp["test_loss"] == pytest.approx(m_one["test_loss"], rel=1e-3)

    # the logged step losses are the global-batch means, as in the single process
    h_ddp, h_one = _history(run / "history.csv"), _history(tmp_path / "single" / "history.csv")
    assert [(r["kind"], r["step"]) for r in h_ddp] == [(r["kind"], r["step"]) for r in h_one]
    for a, b in zip(h_ddp, h_one):
        if a["kind"] == "step":
            assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-3)
            assert a["width/fc1"] == b["width/fc1"] and a["width/fc2"] == b["width/fc2"]

    # the checkpoint holds each rank's activation statistics
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["stats"]) == 2
    assert ck["stats"][0]["fc1"].shape[1] == m_ddp["widths"]["fc1"]
    assert not torch.equal(ck["stats"][0]["fc1"], ck["stats"][1]["fc1"])


PULL_DDP_RUN = ["dataset=synthetic", "dataset.n_samples=1600", "dataset.subset_train=1217", "model.widths=[32,32]",
                "trainer.epochs=2", "trainer.batch_size=64", "trainer.logging.progress=log", "trainer.logging.every=2",
                "hashing=simhash", "hashing.max_error=null", "hashing.pull.steps=6", "hashing.pull.strength=0.3",
                "schedule=gradual", "schedule.start=4", "schedule.end=28", "schedule.every=8",
                "schedule.final_ratio=0.5", "seed=5"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_torchrun_two_ranks_pull_the_same_groups_and_merge_like_one_process(tmp_path):
    m_ddp, m_one = _ddp_and_single(tmp_path, PULL_DDP_RUN)
    assert m_ddp["world_size"] == 2

    def events(m):
        return [(e["step"], e["after"], e.get("proposed"), e.get("proposed_width")) for e in m["rehash_events"]]

    # the same proposals (12 -> 20 -> 28 ramp points) and merges 6 steps later, as in one process
    assert events(m_ddp) == events(m_one)
    merged = [e for e in m_ddp["rehash_events"] if e["sites"]]
    assert [e["step"] for e in merged] == [18, 26, 34] and m_ddp["widths"] == {"fc1": 16, "fc2": 16}
    for a, b in zip(merged, [e for e in m_one["rehash_events"] if e["sites"]]):
        for site in ("fc1", "fc2"):
            assert a["pull_distance"][site] == pytest.approx(b["pull_distance"][site], rel=1e-3, abs=1e-6)
    # both ranks hold one network: rank 0's checkpoint evaluates like the single process
    assert m_ddp["test_acc"] == pytest.approx(m_one["test_acc"], abs=2e-3)
    # the history's distance column matches step by step
    h_ddp, h_one = _history(tmp_path / "ddp" / "history.csv"), _history(tmp_path / "single" / "history.csv")
    d_ddp = [(r["step"], r["pull/fc1"]) for r in h_ddp if r["kind"] == "step" and r["pull/fc1"]]
    d_one = [(r["step"], r["pull/fc1"]) for r in h_one if r["kind"] == "step" and r["pull/fc1"]]
    assert [s for s, _ in d_ddp] == [s for s, _ in d_one] and len(d_ddp) > 5
    for (_, a), (_, b) in zip(d_ddp, d_one):
        assert float(a) == pytest.approx(float(b), rel=1e-3, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_torchrun_two_ranks_record_training_rows_and_merge_like_one_process(tmp_path):
    """hashing.calibration=training: each rank records its slice of the chosen rows of every global
    batch (the last one: one sample, an empty slice for rank 0); rank 0 plans on the ranks' rows
    joined in rank order, which are the single process's rows, so both merge alike."""
    run = [*DDP_RUN, "hashing.calibration=training", "hashing.calib_batches=4", "hashing.calib_samples=96"]
    m_ddp, m_one = _ddp_and_single(tmp_path, run)
    assert m_ddp["world_size"] == 2 and m_ddp["rehashes"] == m_one["rehashes"] == 4
    assert [e["after"] for e in m_ddp["rehash_events"]] == [e["after"] for e in m_one["rehash_events"]]
    assert m_ddp["widths"] != m_ddp["widths_before"]
    for a, b in zip(m_ddp["rehash_events"], m_one["rehash_events"]):
        for site, err in b["error"].items():
            assert a["error"][site] == pytest.approx(err, rel=1e-3, abs=1e-5)
    assert m_ddp["test_acc"] == pytest.approx(m_one["test_acc"], abs=1e-3)
    # the checkpoint holds each rank's rows: 24 of each 64-sample global batch, 12 on each rank
    ck = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    one = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert len(ck["rows"]) == 2 and len(one["rows"]) == 1
    r0, r1, r = (c["rows"]["fc1"][0] for c in (ck["rows"][0], ck["rows"][1], one["rows"][0]))
    assert r0["ids"].tolist() == r1["ids"].tolist() == r["ids"].tolist() and len(r["ids"]) == 4
    assert (r0["lens"] + r1["lens"]).tolist() == r["lens"].tolist()
    joined = torch.cat([torch.cat([a, b]) for a, b in zip(r0["x"].split(r0["lens"].tolist()),
                                                        r1["x"].split(r1["lens"].tolist()))])
    assert joined.shape == r["x"].shape and torch.allclose(joined, r["x"], atol=1e-3)
