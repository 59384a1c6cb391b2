"""logger=wandb end to end, offline (no network, no account): a 2-job multirun where each job writes
its own offline W&B run -- config, history rows and summary -- and finishes it before the next
job starts. The .wandb file is read back with a small reader of its record log."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

TINY = ["dataset=synthetic", "dataset.n_samples=1000", "model.widths=[32,32]", "trainer.epochs=1",
        "trainer.batch_size=64", "trainer.logging.every=3", "trainer.logging.progress=none"]


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: 7-byte file header, 32 KiB
    blocks, records of crc32 | length u16 | type u8 | payload, split as FULL or FIRST..LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST: a complete record
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _items(update) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}


def read_offline_run(run_dir: Path) -> dict:
    dirs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 1, f"expected one offline run under {run_dir}/wandb, found {dirs}"
    (f,) = list(dirs[0].glob("run-*.wandb"))
    out = {"config": {}, "history": [], "summary": {}, "exit": None, "run_id": None, "name": None}
    for rec in wandb_records(f):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"], out["name"] = rec.run.run_id, rec.run.display_name
            out["config"].update(_items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "history":
            out["history"].append(_items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


@pytest.mark.slow
def test_wandb_offline_multirun_writes_and_finishes_each_run(tmp_path):
    env = dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_DIR=str(tmp_path / "wandb"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "hashexp", "-m", *TINY, "logger=wandb", "seed=0,1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").rglob("metrics.json"))
    assert len(run_dirs) == 2
    ids = set()
    for rd in run_dirs:
        m = json.loads((rd / "metrics.json").read_text())
        w = read_offline_run(rd)
        assert w["exit"] == 0, f"{rd}: the W&B run was not finished"
        ids.add(w["run_id"])
        assert w["name"] == rd.name
        # config: the resolved Hydra config
        assert w["config"]["seed"] == m["seed"]
        assert w["config"]["dataset"]["name"] == "synthetic" and w["config"]["model"]["widths"] == [32, 32]
        assert w["config"]["logger"]["name"] == "wandb"
        # history: the step rows (every 3 steps) and the epoch row of history.csv
        steps = [h for h in w["history"] if "loss" in h]
        epochs = [h for h in w["history"] if "test_acc" in h]
        n_steps = m["steps"]
        assert len(steps) == n_steps // 3 and len(epochs) == 1
        assert all(h["width/fc1"] == 32 and h["step_time_s"] > 0 for h in steps)
        assert epochs[0]["test_acc"] == pytest.approx(m["test_acc"])
        # summary: metrics.json's scalars and the final widths
        s = w["summary"]
        assert s["test_acc"] == pytest.approx(m["test_acc"]) and s["majority_acc"] == pytest.approx(m["majority_acc"])
        assert s["flops"] == m["flops"] and s["seed"] == m["seed"] and s["status"] == "ok"
        assert s["final_width/fc1"] == 32
    assert len(ids) == 2, "both jobs logged into the same W&B run"
    assert {json.loads((rd / "metrics.json").read_text())["seed"] for rd in run_dirs} == {0, 1}
