"""dataset=imagefolder (hashexp/data/imagefolder.py): images streamed from a generated folder of PNGs.

Asserts: the transforms' values, batches independent of the number of workers, every sample once
per epoch, a mid-epoch resume equal to the uninterrupted run, DDP slices that add up to the
one-process batches, the calibration set equal across builds (ranks), and the two bad inputs (a
corrupt image, an empty class folder) as one clear error each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hashexp.data import build_dataset
from hashexp.errors import DataError
from tests.conftest import Killed, compose, die_at_checkpoint, run_app

CLASSES, N_TRAIN, N_VAL = 3, 14, 4  # per class


def make_folder(root: Path, seed: int = 0) -> Path:
    """root/{train,val}/class{c}/*.png: 20x24 RGB images whose channel c is bright (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for c in range(CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 90, (20, 24, 3)).astype(np.uint8)
                a[..., c] += 150
                Image.fromarray(a).save(d / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imagefolder"))


def _cfg(folder: Path, *extra: str):
    return compose(["dataset=imagefolder", f"dataset.root={folder}", "dataset.resize=null", "dataset.crop=16",
                    "dataset.num_workers=0", "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]", *extra])


def _data(folder: Path, *extra: str):
    return build_dataset(_cfg(folder, *extra).dataset, seed=0)


def _epoch(data, seed: int, skip: int = 0, dist=None, batch: int = 8):
    return list(data.train_batches(batch, torch.Generator().manual_seed(seed), skip, dist))


def test_loads_lists_and_transforms_with_the_stated_statistics(folder):
    from PIL import Image

    data = _data(folder)
    assert (data.n_train, data.n_test, data.num_classes) == (CLASSES * N_TRAIN, CLASSES * N_VAL, CLASSES)
    assert data.input_shape == (3, 16, 16) and data.meta["classes"] == ["class0", "class1", "class2"]
    assert data.y_train.tolist() == sorted(data.y_train.tolist()) and data.majority_acc("test") == pytest.approx(1 / 3)
    # the evaluation transform: centre 16x16 crop of the 20x24 image, (x/255 - 0.5) / 0.25
    raw = np.asarray(Image.open(folder / "val" / "class1" / "img00.png"), dtype=np.float32)
    want = (torch.from_numpy(raw[2:18, 4:20]).permute(2, 0, 1) / 255 - 0.5) / 0.25
    torch.testing.assert_close(data.x_test[torch.tensor([N_VAL])][0], want)
    assert data.x_test[0:3].shape == (3, 3, 16, 16) and torch.equal(data.x_test[N_VAL], want)


def test_resize_and_grayscale(folder):
    data = _data(folder, "dataset.resize=10", "dataset.crop=8", "dataset.channels=1", "dataset.mean=[0.5]",
                 "dataset.std=[0.5]")
    x = data.x_train[torch.arange(3)]
    assert x.shape == (3, 1, 8, 8) and data.input_shape == (1, 8, 8)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_an_epoch_is_a_seeded_permutation_with_random_crops_independent_of_workers(folder):
    data = _data(folder)
    a = _epoch(data, 3)
    assert [len(y) for _, y in a] == [8] * 5 + [2]
    assert sorted(torch.cat([y for _, y in a]).tolist()) == data.y_train.tolist()  # each sample once
    workers = _data(folder, "dataset.num_workers=2")
    b = _epoch(workers, 3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = _epoch(data, 4)  # another generator state: another order, other crops
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))
    # training crops and flips come from each position's seed: random across seeds, fixed for one seed
    crops = [data.train_files[(0, s)][0] for s in range(8)]
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 2
    assert torch.equal(data.train_files[(0, 3)][0], crops[3])


def test_skip_resumes_the_same_epoch_without_reading_the_skipped_batches(folder, monkeypatch):
    data = _data(folder)
    full = _epoch(data, 7)
    reads = []
    real = data.train_files.transform.__class__.__call__
    monkeypatch.setattr(type(data.train_files.transform), "__call__",
                        lambda self, path, seed=None: reads.append(path) or real(self, path, seed))
    tail = _epoch(data, 7, skip=4)
    assert len(tail) == 2 and len(reads) == CLASSES * N_TRAIN - 4 * 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail))


class _FakeDist:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def bounds(self, n: int) -> tuple[int, int]:
        return (self.rank * n) // self.world_size, ((self.rank + 1) * n) // self.world_size


def test_ddp_ranks_read_disjoint_slices_that_add_up_to_the_one_process_batches(folder):
    data = _data(folder)
    one = _epoch(data, 5, batch=9)
    ranks = [_epoch(data, 5, dist=_FakeDist(r, 2), batch=9) for r in range(2)]
    assert [len(y) for _, y in ranks[0]] == [4, 4, 4, 4, 3] and [len(y) for _, y in ranks[1]] == [5, 5, 5, 5, 3]
    for i, (xb, yb) in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), xb)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), yb)
    # a last global batch of one sample: rank 0's slice is empty but still a step (DDP all-reduce)
    tail = [_epoch(data, 5, dist=_FakeDist(r, 2), batch=41) for r in range(2)]
    assert [len(y) for _, y in tail[0]] == [20, 0] and [len(y) for _, y in tail[1]] == [21, 1]
    assert tail[0][1][0].shape == (0, 3, 16, 16)


def test_the_calibration_set_is_the_same_on_every_rank_and_build(folder):
    from hashexp.merge.calibration import calibration_index

    a, b = _data(folder), _data(folder, "dataset.num_workers=1")  # two ranks build their own bundle
    idx = calibration_index(a.n_train, 16, seed=0)
    assert torch.equal(idx, calibration_index(b.n_train, 16, seed=0))
    torch.testing.assert_close(a.x_train[idx], b.x_train[idx], rtol=0, atol=0)


def test_a_corrupt_image_is_one_error_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "class2" / "img05.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = _data(root, "dataset.num_workers=2")
    with pytest.raises(DataError) as err:
        _epoch(data, 0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"image file {bad} cannot be read") and "replace or delete it" in msg
    proc = run_app(tmp_path / "app", ["dataset=imagefolder", f"dataset.root={root}", "dataset.resize=null",
                                      "dataset.crop=16", "dataset.num_workers=2", "trainer.epochs=1"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"hashexp: error: image file {bad} cannot be read")


def test_an_empty_class_folder_and_a_missing_root_are_clear_errors(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "train" / "class9").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/class9 has no image files"):
        _data(root)
    with pytest.raises(DataError, match=r"dataset.root=.* is not a directory; point it at the folder holding train/"):
        _data(tmp_path / "nowhere")
    from hashexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.eval_train_samples must be a positive integer or null"):
        _data(make_folder(tmp_path / "ok"), "dataset.eval_train_samples=0")
    (root / "train" / "class9" / "x.png").write_bytes(b"")
    (root / "val" / "other").mkdir()
    with pytest.raises(DataError, match=r"class folders \['other'\] that the training split lacks"):
        _data(root)


def test_train_evaluation_uses_the_seeded_sample(folder):
    from hashexp.metrics import evaluate

    data = _data(folder, "dataset.eval_train_samples=10")
    calls = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, CLASSES))
    model.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    loss, acc = evaluate(model, data.x_train, data.y_train, batch_size=4)
    assert calls == [4, 4, 2] and 0.0 <= acc <= 1.0 and loss > 0


def _history(run: Path) -> list[dict[str, str]]:
    """history.csv rows without the wall-clock columns."""
    import csv

    with (run / "history.csv").open() as f:
        return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in csv.DictReader(f)]


MID = ["model.widths=[24,16]", "trainer.epochs=2", "trainer.batch_size=8", "trainer.logging.progress=none",
       "trainer.logging.every=2", "trainer.num_threads=1", "trainer.checkpoint.every_steps=2", "hashing=simhash",
       "hashing.max_error=0.5", "hashing.target_ratio=0.8", "schedule.unit=step", "schedule.every=3",
       "schedule.start=2", "seed=1"]


@pytest.mark.slow
def test_a_kill_mid_epoch_resumes_to_the_uninterrupted_run(folder, tmp_path, monkeypatch):
    from hashexp.app import train_run

    ref = train_run(_cfg(folder, *MID), str(tmp_path / "full"))
    die_at_checkpoint(monkeypatch, 2)  # killed right after the checkpoint at step 4 (batch 4 of 6, epoch 1)
    with pytest.raises(Killed):
        train_run(_cfg(folder, *MID), str(tmp_path / "killed"))
    monkeypatch.undo()
    ck = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (4, 0, 4)
    out = train_run(_cfg(folder, *MID, "trainer.checkpoint.resume=auto"), str(tmp_path / "killed"))
    assert ref["rehashes"] >= 2 and out["rehashes"] == ref["rehashes"] and out["widths"] == ref["widths"]
    for k in ("train_loss", "test_loss", "test_acc", "train_acc"):
        assert out[k] == ref[k], k
    assert _history(tmp_path / "full") == _history(tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["resumed"]["from"].endswith("checkpoint.pt")


@pytest.mark.slow
def test_torchrun_two_ranks_stream_their_slices_and_match_one_process(folder, tmp_path):
    """torchrun, 2 gloo ranks on CPU, each with its own loader workers: the same rehashes and
    widths as one process, metrics equal within float reduction order."""
    import os
    import subprocess
    import sys
    import tempfile

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    root = Path(__file__).resolve().parents[1]
    # a short TMPDIR: DataLoader workers bind AF_UNIX sockets under it (108-byte path limit)
    scratch = tempfile.mkdtemp(prefix="hx", dir="/tmp")
    env = dict(os.environ, HASHEXP_OUTPUTS=str(tmp_path / "outputs"), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TMPDIR=scratch, PYTHONPATH=str(root))
    args = ["dataset=imagefolder", f"dataset.root={folder}", "dataset.resize=null", "dataset.crop=16",
            "dataset.num_workers=1", *[a for a in MID if "checkpoint" not in a], "trainer.batch_size=10"]
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2", "-m",
                          "hashexp", *args, f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "hashexp", *args, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert a["world_size"] == 2 and b["world_size"] == 1 and a["steps"] == b["steps"] == 2 * 5
    assert a["rehashes"] == b["rehashes"] >= 2 and a["widths"] == b["widths"] != a["widths_before"]
    for k in ("train_loss", "test_loss"):
        assert a[k] == pytest.approx(b[k], rel=1e-3), k
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-6)
