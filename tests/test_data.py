"""Data layer: real Fashion-MNIST, tiny files in the real formats, synthetic, npz, batching."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hashexp.data import BatchIterator, DataBundle, build_dataset
from hashexp.data import fashion_mnist as fm
from hashexp.data.cifar10 import load_cifar10
from hashexp.data.fashion_mnist import load_fashion_mnist
from hashexp.data.idx import IDX_FILES, read_idx, write_idx
from hashexp.data.mnist import load_mnist
from hashexp.data.npz import load_npz
from hashexp.data.synthetic import load_synthetic, make_classification
from hashexp.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def conf(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def write_mnist_dir(d: Path, n_train=30, n_test=12, gz=False, hw=(28, 28), seed=0) -> dict[str, np.ndarray]:
    """Four IDX files of an MNIST-style dataset in `d`; returns the arrays written."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        ("train", "images"): rng.integers(0, 256, size=(n_train, *hw), dtype=np.uint8),
        ("train", "labels"): (np.arange(n_train) % 10).astype(np.uint8),
        ("test", "images"): rng.integers(0, 256, size=(n_test, *hw), dtype=np.uint8),
        ("test", "labels"): (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, arr in arrays.items():
        write_idx(d / (IDX_FILES[key] + (".gz" if gz else "")), arr)
    return arrays


# ---------------------------------------------------------------- real Fashion-MNIST


@pytest.mark.skipif(not (fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists(), reason="run `make data`")
def test_real_fashion_mnist_from_debian_dir():
    b = build_dataset(conf("fashion_mnist", download=False), seed=0)
    assert b.meta["source"] == str(fm.DEBIAN_DIR)
    assert tuple(b.x_train.shape) == (60000, 1, 28, 28) and tuple(b.x_test.shape) == (10000, 1, 28, 28)
    assert b.input_shape == (1, 28, 28) and b.input_dim == 784 and b.is_image and b.num_classes == 10
    assert b.x_train.dtype == torch.float32 and b.y_train.dtype == torch.int64
    assert abs(b.x_train.mean().item()) < 1e-3 and abs(b.x_train.std().item() - 1) < 1e-3
    assert abs(b.x_test.mean().item()) < 0.05  # test split normalized with train stats: close, not exact
    assert b.class_counts("train").tolist() == [6000] * 10  # Fashion-MNIST is exactly balanced
    assert b.majority_acc("test") == pytest.approx(0.1)
    assert b.augment.crop_padding == 2 and b.augment.hflip


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    for arr in (
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 7], dtype=np.int16),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    ):
        p = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), arr)
        back = read_idx(p)
        assert back.shape == arr.shape and np.array_equal(back, arr)
    if gz:  # really gzipped, not just named so
        assert gzip.open(p).read(2) == b"\x00\x00"


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_tiny_idx_files(tmp_path, gz):
    arrays = write_mnist_dir(tmp_path, gz=gz)
    b = load_fashion_mnist(root=str(tmp_path), download=False)
    assert b.x_train.shape == (30, 1, 28, 28) and b.x_test.shape == (12, 1, 28, 28)
    assert b.y_train.tolist() == arrays[("train", "labels")].tolist()
    raw = arrays[("train", "images")].astype(np.float64)
    expected = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(b.x_train[:, 0].numpy(), expected, atol=1e-5)
    assert b.meta["source"] == str(tmp_path)


def test_idx_corrupt_magic(tmp_path):
    write_mnist_dir(tmp_path)
    p = tmp_path / IDX_FILES[("train", "images")]
    buf = bytearray(p.read_bytes())
    buf[0:4] = b"\x12\x34\x08\x03"
    p.write_bytes(bytes(buf))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: bad IDX magic number 0x12340803"):
        load_fashion_mnist(root=str(tmp_path), download=False)


def test_idx_truncated(tmp_path):
    write_mnist_dir(tmp_path)
    p = tmp_path / IDX_FILES[("test", "images")]
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated IDX file: dims \(12, 28, 28\) need 9408"):
        load_fashion_mnist(root=str(tmp_path), download=False)


def test_idx_truncated_gzip(tmp_path):
    write_mnist_dir(tmp_path, gz=True)
    p = tmp_path / (IDX_FILES[("train", "labels")] + ".gz")
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: not a valid gzip file"):
        load_fashion_mnist(root=str(tmp_path), download=False)


def test_idx_count_mismatch(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES[("train", "labels")], np.zeros(29, dtype=np.uint8))
    with pytest.raises(DataError, match=r"holds 30 images but train-labels-idx1-ubyte holds 29 labels"):
        load_fashion_mnist(root=str(tmp_path), download=False)


def test_idx_label_out_of_range(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES[("test", "labels")], np.full(12, 10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels span \[10, 10\], expected 0..9"):
        load_fashion_mnist(root=str(tmp_path), download=False)


def test_missing_dataset_names_every_fix(tmp_path, monkeypatch):
    # root given but empty: no download allowed -> one message naming all three ways
    with pytest.raises(DataError) as e:
        load_fashion_mnist(root=str(tmp_path), download=False)
    msg = str(e.value)
    assert "Fashion-MNIST not found" in msg and str(tmp_path) in msg and "\n" not in msg
    assert "dataset.root=" in msg and "make data" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "torchvision" in msg and "dataset.download=true" in msg
    assert "missing train-images-idx3-ubyte" in msg

    # download allowed but the network is down: the downloader's failure is reported, nothing else is tried
    import hashexp.data.mnist as mn

    def offline(tv_class, root):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(mn, "_torchvision_download", offline)
    with pytest.raises(DataError, match=r"torchvision download into .* failed: RuntimeError: Error downloading"):
        load_fashion_mnist(root=str(tmp_path))

    # no root and no Debian package: cache dir is tried, same message
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nope")
    monkeypatch.setenv("HASHEXP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"looked in .*nope; .*cache/FashionMNIST/raw.*make data"):
        load_fashion_mnist()


def test_root_with_torchvision_layout_and_download_target(tmp_path, monkeypatch):
    # a root is authoritative; a download goes into it and is then read by our IDX code
    import hashexp.data.mnist as mn

    def fake_download(tv_class, root):
        write_mnist_dir(Path(root) / tv_class / "raw", n_train=20, n_test=10, gz=True)

    monkeypatch.setattr(mn, "_torchvision_download", fake_download)
    b = load_mnist(root=str(tmp_path))
    assert b.name == "mnist" and b.x_train.shape == (20, 1, 28, 28)
    assert b.meta["source"] == str(tmp_path / "MNIST" / "raw")


def test_mnist_torchvision_raw_layout(tmp_path):
    write_mnist_dir(tmp_path / "MNIST" / "raw", n_train=40, n_test=20)
    b = build_dataset(conf("mnist", root=str(tmp_path), download=False, subset_train=25), seed=3)
    assert b.x_train.shape == (25, 1, 28, 28) and b.x_test.shape == (20, 1, 28, 28)
    assert b.augment.crop_padding == 2 and not b.augment.hflip
    # normalization stats come from the full train split, not the subset
    full = load_mnist(root=str(tmp_path), download=False)
    assert b.meta["mean"] == full.meta["mean"]
    # seeded subsets: same seed same subset, other seed other subset
    again = build_dataset(conf("mnist", root=str(tmp_path), download=False, subset_train=25), seed=3)
    other = build_dataset(conf("mnist", root=str(tmp_path), download=False, subset_train=25), seed=4)
    assert torch.equal(b.x_train, again.x_train) and not torch.equal(b.x_train, other.x_train)
    pinned = build_dataset(conf("mnist", root=str(tmp_path), download=False, subset_train=25, seed=3), seed=99)
    assert torch.equal(pinned.x_train, b.x_train)  # dataset.seed wins over the run seed


def test_subset_errors(tmp_path):
    write_mnist_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.subset_train must be a positive integer or null \(all samples\), got -5"):
        load_mnist(root=str(tmp_path), subset_train=-5, download=False)
    with pytest.raises(ConfigError, match=r"dataset.subset_test=13 exceeds the 12 samples available"):
        load_mnist(root=str(tmp_path), subset_test=13, download=False)


# ---------------------------------------------------------------- CIFAR-10


def write_cifar_dir(root: Path, n=8, protocol=2) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[:, :1024] = 10 * i  # channel 0 (red) is constant per batch: a known mean to check
        batch = {b"batch_label": b"x", b"data": data, b"labels": [(k + i) % 10 for k in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return d


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_from_tiny_pickles(tmp_path, protocol):
    write_cifar_dir(tmp_path, protocol=protocol)
    b = build_dataset(conf("cifar10", root=str(tmp_path), download=False))
    assert b.x_train.shape == (40, 3, 32, 32) and b.x_test.shape == (8, 3, 32, 32)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert b.y_train[:8].tolist() == list(range(8)) and b.y_test.tolist() == [(k + 5) % 10 for k in range(8)]
    assert b.meta["mean"][0] == pytest.approx(20.0)  # mean of 0, 10, 20, 30, 40
    assert b.augment.crop_padding == 4 and b.augment.hflip
    assert torch.allclose(b.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_cifar10_bad_pickles(tmp_path):
    d = write_cifar_dir(tmp_path)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"data_batch_3: b'data' must be uint8 of shape \(n, 3072\), got uint8 \(4, 100\)"):
        load_cifar10(root=str(tmp_path), download=False)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, f)
    with pytest.raises(DataError, match=r"data_batch_3: 4 images but b'labels' has shape \(3,\)"):
        load_cifar10(root=str(tmp_path), download=False)
    # a pickle that tries to call something other than numpy's reconstruction is refused
    (d / "data_batch_3").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(DataError, match=r"refusing to load global os.system"):
        load_cifar10(root=str(tmp_path), download=False)
    (d / "test_batch").unlink()
    with pytest.raises(DataError, match=r"CIFAR-10 not found .*missing test_batch.*dataset.root=.*dataset.download=true"):
        load_cifar10(root=str(tmp_path), download=False)


# ---------------------------------------------------------------- synthetic


def test_synthetic_defaults_reproduce_prototype():
    b = build_dataset(conf("synthetic"), seed=0)
    assert b.x_train.shape == (8000, 20) and b.x_test.shape == (2000, 20)
    assert b.input_shape == (20,) and not b.is_image and b.num_classes == 2
    share0 = (b.y_train == 0).float().mean().item()
    assert 0.67 < share0 < 0.71  # 0.7 * 0.95 + 0.05 / 2 = 0.69 after label noise
    assert b.majority_acc("train") == pytest.approx(share0)
    assert torch.allclose(b.x_train.mean(0), torch.zeros(20), atol=1e-5)
    assert torch.allclose(b.x_train.std(0), torch.ones(20), atol=1e-3)
    assert abs(b.x_test.mean().item()) < 0.1


def test_synthetic_structure_and_flips():
    x, y, y_clean = make_classification(n_samples=20000, class_weights=[0.7, 0.3], flip_y=0.05, seed=1)
    assert x.shape == (20000, 20)
    # flip_y re-draws 5% of labels uniformly: half of those land on the other class
    assert (y != y_clean).mean() == pytest.approx(0.05 * 0.5, abs=0.005)
    assert (y_clean == 0).mean() == pytest.approx(0.7, abs=1e-3)
    # redundant columns 10..14 are exact linear combinations of informative columns 0..9
    assert np.linalg.matrix_rank(x[:, :15]) == 10 and np.linalg.matrix_rank(x) == 15
    _, y_all_flipped, y_c = make_classification(n_samples=20000, n_classes=4, flip_y=1.0, seed=2)
    assert (y_all_flipped != y_c).mean() == pytest.approx(0.75, abs=0.02)
    assert np.bincount(y_all_flipped).min() > 4500


def test_synthetic_determinism_by_seed():
    a, b, c = (load_synthetic(seed=s, n_samples=500) for s in (7, 7, 8))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_weights": [0.5, 0.4]}, r"class_weights must sum to 1, got \[0.5, 0.4\]"),
        ({"class_weights": [0.2, 0.3, 0.5]}, r"class_weights has 3 entries but n_classes=2"),
        ({"n_informative": 16}, r"n_informative \(16\) \+ n_redundant \(5\) exceeds n_features \(20\)"),
        ({"n_noise": 3}, r"n_noise=3 but n_features - n_informative - n_redundant = 5"),
        ({"flip_y": 1.5}, r"flip_y must be in \[0.0, 1.0\]"),
        ({"n_informative": 1, "n_redundant": 0}, r"4 clusters need at least 2 informative features"),
        ({"test_fraction": 0.0}, r"leaves 0 test"),
        ({"subset_train": 0}, r"subset_train must be a positive integer"),
        ({"augment": {"hflip": True}}, r"augment must be null for synthetic"),
    ],
)
def test_synthetic_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_synthetic(n_samples=200, **kwargs)


# ---------------------------------------------------------------- npz


def good_arrays(n=40, m=10, shape=(6,)):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(3, 2, size=(n, *shape)).astype(np.float32),
        "y_train": np.arange(n) % 3,
        "x_test": rng.normal(3, 2, size=(m, *shape)).astype(np.float32),
        "y_test": np.arange(m) % 3,
    }


def save_npz(tmp_path, **arrays) -> str:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return str(p)


def test_npz_vectors_and_images(tmp_path):
    b = build_dataset(conf("npz", path=save_npz(tmp_path, **good_arrays())))
    assert b.x_train.shape == (40, 6) and b.num_classes == 3 and not b.is_image
    assert torch.allclose(b.x_train.mean(0), torch.zeros(6), atol=1e-5)
    a = good_arrays(shape=(2, 5, 5))
    a["y_train"] = a["y_train"].astype(np.float64)  # whole-number float labels are accepted
    save_npz(tmp_path, **a)
    # a relative path resolves against root; augment is allowed for image arrays
    b = build_dataset(conf("npz", path="d.npz", root=str(tmp_path), num_classes=5, augment={"crop_padding": 1}))
    assert b.is_image and b.input_shape == (2, 5, 5) and b.num_classes == 5 and b.y_train.dtype == torch.int64
    assert torch.allclose(b.x_train.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    raw = load_npz(save_npz(tmp_path, **good_arrays()), normalize=False)
    assert raw.x_train.mean().item() == pytest.approx(3.0, abs=0.5)


def test_npz_path_required():
    with pytest.raises(ConfigError, match=r"required key\(s\) not set: dataset.path="):
        build_dataset(conf("npz"))


def _mutate(a, **changes):
    a = dict(a)
    for k, v in changes.items():
        if v is None:
            a.pop(k)
        else:
            a[k] = v
    return a


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"y_test": None}, r"missing array\(s\) \['y_test'\]; expected \['x_train', 'y_train', 'x_test', 'y_test'\], found \['x_test', 'x_train', 'y_train'\]"),
        ({"x_train": np.array(["a", "b"])}, r"x_train must be a floating or integer array, got dtype <U1"),
        ({"x_test": np.zeros(10, np.float32)}, r"x_test must have ndim >= 2 \(samples first\), got shape \(10,\)"),
        ({"x_test": np.zeros((10, 7), np.float32)}, r"x_train per-sample shape \(6,\) != x_test per-sample shape \(7,\)"),
        ({"y_train": np.zeros(39, np.int64)}, r"y_train has 39 labels but x_train has 40 samples"),
        ({"y_train": np.full(40, 0.5)}, r"y_train must hold integer class labels, got non-integer floats"),
        ({"y_test": np.array(["a"] * 10)}, r"y_test must hold integer class labels, got dtype <U1"),
        ({"y_test": -np.ones(10, np.int64)}, r"y_test has negative label -1"),
        ({"x_train": np.full((40, 6), np.nan, np.float32)}, r"x_train contains 240 NaN/inf value\(s\)"),
        ({"x_test": np.full((10, 6), np.inf)}, r"x_test contains 60 NaN/inf"),
    ],
)
def test_npz_malformed(tmp_path, changes, message):
    path = save_npz(tmp_path, **_mutate(good_arrays(), **changes))
    with pytest.raises(DataError, match=message):
        load_npz(path)


def test_npz_file_problems(tmp_path):
    with pytest.raises(DataError, match=r"npz file .*nothing.npz does not exist"):
        load_npz(str(tmp_path / "nothing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"junk.npz is not an .npz \(zip\) archive"):
        load_npz(str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match=r"y_train has label 2 >= num_classes=2; raise dataset.num_classes"):
        load_npz(save_npz(tmp_path, **good_arrays()), num_classes=2)
    obj = _mutate(good_arrays(), x_train=np.array([[1, "a"]] * 40, dtype=object))
    with pytest.raises(DataError, match=r"x_train is an object array"):
        load_npz(save_npz(tmp_path, **obj))
    with pytest.raises(ConfigError, match=r"augment is set but .* holds non-image x"):
        load_npz(save_npz(tmp_path, **good_arrays()), augment={"hflip": True})


# ---------------------------------------------------------------- build_dataset, DataBundle


def test_build_dataset_unwraps_errors_and_checks_keys(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found"):  # not Hydra's InstantiationException
        build_dataset(conf("fashion_mnist", root=str(tmp_path), download=False))
    cfg = conf("synthetic")
    cfg.n_sample = 5  # typo'd key
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'n_sample'"):
        build_dataset(cfg)
    with pytest.raises(ConfigError, match=r"no _target_"):
        build_dataset({"name": "x"})


def test_bundle_to_and_majority():
    b = load_synthetic(n_samples=300, seed=0)
    c = b.to("cpu")
    assert isinstance(c, DataBundle) and c.x_train.device.type == "cpu" and c.input_dim == 20
    y = torch.tensor([0, 0, 0, 1])
    d = DataBundle("t", torch.zeros(4, 2), y, torch.zeros(4, 2), y, 2, (2,), False)
    assert d.majority_acc() == 0.75 and d.majority_acc("train") == 0.75
    with pytest.raises(ConfigError, match="split must be"):
        d.majority_acc("val")


# ---------------------------------------------------------------- BatchIterator


def test_batch_iterator_covers_every_sample_once():
    x = torch.arange(103, dtype=torch.float32)[:, None]
    y = torch.arange(103)
    it = BatchIterator(x, y, 10, generator=torch.Generator().manual_seed(0))
    assert len(it) == 11
    for _ in range(2):  # every epoch is a permutation
        seen = torch.cat([yb for _, yb in it])
        assert sorted(seen.tolist()) == list(range(103))
        assert [len(yb) for _, yb in it][-1] == 3
    batches = list(it)
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in batches)  # x and y stay paired
    dl = BatchIterator(x, y, 10, generator=torch.Generator().manual_seed(0), drop_last=True)
    assert len(dl) == 10 and sum(len(yb) for _, yb in dl) == 100
    plain = BatchIterator(x, y, 50, shuffle=False)
    assert torch.equal(torch.cat([yb for _, yb in plain]), y)


def test_batch_iterator_determinism():
    x, y = torch.randn(64, 3), torch.arange(64)

    def order(seed):
        it = BatchIterator(x, y, 8, generator=torch.Generator().manual_seed(seed))
        return [torch.cat([yb for _, yb in it]).tolist() for _ in range(2)]

    a, b, c = order(1), order(1), order(2)
    assert a == b and a != c
    assert a[0] != a[1]  # a new order each epoch
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        BatchIterator(x, y, 0)
    with pytest.raises(ConfigError, match="x has 64 samples but y has 63"):
        BatchIterator(x, y[:-1], 8)


@pytest.mark.parametrize("name", ["synthetic", "mnist", "fashion_mnist", "cifar10", "npz"])
def test_every_dataset_yaml_composes_with_hydra(tmp_path, name):
    from hydra import compose, initialize_config_dir

    write_mnist_dir(tmp_path / "idx", n_train=20, n_test=10)
    write_cifar_dir(tmp_path / "cifar", n=4)
    np.savez(tmp_path / "d.npz", **good_arrays())
    extra = {
        "synthetic": ["dataset.n_samples=300"],
        "mnist": [f"dataset.root={tmp_path / 'idx'}", "dataset.download=false"],
        "fashion_mnist": [f"dataset.root={tmp_path / 'idx'}", "dataset.download=false"],
        "cifar10": [f"dataset.root={tmp_path / 'cifar'}", "dataset.download=false"],
        "npz": [f"dataset.path={tmp_path / 'd.npz'}"],
    }[name]
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose(overrides=[f"+dataset={name}", *extra])
    b = build_dataset(cfg.dataset, seed=1)
    assert b.name == name and b.meta["seed"] == 1 and b.n_train > 0
