"""CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32 colour images in 10 classes, read from the
python-pickle batches (cifar-10-batches-py/data_batch_1..5, test_batch) as torchvision downloads them.

The pickles are read with an unpickler that admits only the numpy array machinery, so a
tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from hashexp.errors import DataError

from .base import RawImages, default_cache_dir, image_loader, one_line

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER = "cifar-10-batches-py"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# what a CIFAR pickle may reference: numpy's array reconstruction, under numpy 1 and 2 names
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes pickled by python 3 at protocol < 3
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (images (n, 3, 32, 32) uint8, labels (n,) int64), validated."""
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    except Exception as e:  # truncated or foreign pickles raise a zoo of types
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict with b'data' and b'labels', got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: missing key(s) {[k for k in ('data', 'labels') if k not in d]} (found {sorted(d)})")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
    try:
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: b'labels' is not a list of integers ({e})") from e
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but b'labels' has shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels span [{labels.min()}, {labels.max()}], expected 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _find_dir(candidates: list[Path]) -> Path | None:
    for d in candidates:
        if all((d / f).is_file() for f in (*TRAIN_BATCHES, TEST_BATCH)):
            return d
    return None


def resolve_cifar_dir(root: str | Path | None, download: bool) -> Path:
    """Directory with the six batch files, or one DataError naming every fix."""
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    candidates = [base, base / FOLDER]
    found = _find_dir(candidates)
    if found is not None:
        return found
    if download:
        try:
            import torchvision.datasets as tvd

            base.mkdir(parents=True, exist_ok=True)
            tvd.CIFAR10(root=str(base), train=True, download=True)
        except Exception as e:
            why = f"torchvision download into {base} failed: {one_line(e)}"
        else:
            found = _find_dir(candidates)
            if found is not None:
                return found
            why = f"torchvision download left no batches in {base / FOLDER}"
    else:
        why = "dataset.download=false, so torchvision was not asked to download"
    missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH) if not (base / FOLDER / f).is_file()]
    raise DataError(
        f"CIFAR-10 not found (looked in {base} and {base / FOLDER}, missing {', '.join(missing)}; {why}). "
        f"Fix: (1) set dataset.root=/path/to/dir holding {FOLDER}/ (data_batch_1..5, test_batch); "
        f"(2) allow internet access with dataset.download=true so torchvision downloads it into {base}"
    )


def read_cifar10(root: str | None, download: bool) -> RawImages:
    """The five train batches (concatenated), the test batch and the directory they came from."""
    directory = resolve_cifar_dir(root, download)
    parts = [read_batch(directory / f) for f in TRAIN_BATCHES]
    x_test, y_test = read_batch(directory / TEST_BATCH)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test,
            str(directory))


load_cifar10 = image_loader(
    "cifar10", read_cifar10,
    "CIFAR-10 as (N, 3, 32, 32) float32 images normalized per channel with the train mean/std.",
    "directory holding cifar-10-batches-py/ (or the batch files themselves); downloads\n"
    "            go here too. null: ~/.cache/hashexp.")
