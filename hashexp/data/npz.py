"""Bring-your-own data: an .npz archive with x_train, y_train, x_test, y_test.

x arrays of shape (N, C, H, W) are images (normalized per channel); any other x with ndim >= 2
is vector data, (N, ...) standardized per feature. Every check names the array and the problem.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError, DataError

from .augment import Augment
from .base import DataBundle, channel_stats, check_seed, normalize_images, standardize, subset_indices

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist; set dataset.path=/path/to/data.npz")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz (zip) archive; write it with numpy.savez(path, x_train=..., ...)")
    try:
        with np.load(path, allow_pickle=False) as z:
            found = sorted(z.files)
            missing = [k for k in KEYS if k not in found]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; expected {list(KEYS)}, found {found}")
            arrays = {}
            for k in KEYS:
                try:
                    arrays[k] = z[k]
                except ValueError as e:  # object arrays need pickle, which we refuse
                    raise DataError(f"{path}: {k} is an object array (needs pickle); store a numeric array") from e
            return arrays
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e


def _check_x(path: Path, key: str, x: np.ndarray) -> None:
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: {key} must be a floating or integer array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{path}: {key} must have ndim >= 2 (samples first), got shape {x.shape}")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise DataError(f"{path}: {key} contains {bad} NaN/inf value(s)")


def _check_y(path: Path, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{path}: {key} must be 1-D (one label per sample), got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{path}: {key} has {len(y)} labels but x_{key[2:]} has {n} samples")
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        # float labels are fine if they are whole numbers (some tools save labels as float)
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{path}: {key} must hold integer class labels, got non-integer floats")
        return y.astype(np.int64)
    raise DataError(f"{path}: {key} must hold integer class labels, got dtype {y.dtype}")


def _resolve_path(path: str | None, root: str | None) -> Path:
    """``dataset.path``, relative to ``root`` when it is relative and a root is given."""
    if path is None or str(path) == "":
        raise ConfigError("dataset.path is required for the npz dataset: dataset.path=/path/to/data.npz")
    p = Path(str(path)).expanduser()
    if root is not None and not p.is_absolute():
        p = Path(root).expanduser() / p
    return p


def _checked_arrays(p: Path, a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Check the four arrays against each other; the labels as int64 (y_train, y_test)."""
    for key in ("x_train", "x_test"):
        _check_x(p, key, a[key])
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(
            f"{p}: x_train per-sample shape {a['x_train'].shape[1:]} != x_test per-sample shape {a['x_test'].shape[1:]}"
        )
    if len(a["x_train"]) == 0:
        raise DataError(f"{p}: x_train is empty")
    return _check_y(p, "y_train", a["y_train"], len(a["x_train"])), _check_y(p, "y_test", a["y_test"], len(a["x_test"]))


def _check_classes(p: Path, y_train: np.ndarray, y_test: np.ndarray, num_classes: Any) -> int:
    """``num_classes`` (None: max label + 1 over both splits), checked against the labels."""
    labels_max = int(max(y_train.max(), y_test.max() if y_test.size else 0))
    if num_classes is None:
        num_classes = labels_max + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"dataset.num_classes must be a positive integer or null, got {num_classes!r}")
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if y.size and y.min() < 0:
            raise DataError(f"{p}: {key} has negative label {int(y.min())}; labels must be 0..num_classes-1")
        if y.size and y.max() >= num_classes:
            raise DataError(
                f"{p}: {key} has label {int(y.max())} >= num_classes={num_classes}; "
                f"raise dataset.num_classes or fix the labels"
            )
    if num_classes < 2:
        raise DataError(f"{p}: only one class present (num_classes={num_classes}); classification needs >= 2")
    return num_classes


def load_npz(
    path: str,
    name: str = "npz",
    root: str | None = None,
    subset_train: int | None = None,
    subset_test: int | None = None,
    seed: int | None = 0,
    num_classes: int | None = None,
    normalize: bool = True,
    augment: Any = None,
) -> DataBundle:
    """Load and validate an .npz dataset.

    Args:
        path: the .npz file; a relative path is taken relative to `root` when root is given.
        num_classes: null means max label + 1 over both splits.
        normalize: standardize with train statistics (per channel for images, per feature otherwise).
        augment: {crop_padding, hflip} or null; only for (N, C, H, W) image data.
    """
    seed = check_seed(seed)
    p = _resolve_path(path, root)
    a = _load_arrays(p)
    y_train, y_test = _checked_arrays(p, a)
    num_classes = _check_classes(p, y_train, y_test, num_classes)

    x_train, x_test = a["x_train"], a["x_test"]
    is_image = x_train.ndim == 4
    aug = Augment.from_config(augment)
    if aug.enabled and not is_image:
        raise ConfigError(f"dataset.augment is set but {p} holds non-image x of shape {x_train.shape}; set it to null")
    meta: dict[str, Any] = {"source": str(p), "seed": seed}
    if is_image:
        if normalize:
            mean, std = channel_stats(x_train)
        else:
            mean, std = np.zeros(x_train.shape[1]), np.ones(x_train.shape[1])
        meta.update(mean=mean.tolist(), std=std.tolist())
    elif normalize:
        x_train, x_test, mean, std = standardize(x_train, x_test)
    i_tr = subset_indices(len(x_train), subset_train, seed, 0, "subset_train")
    i_te = subset_indices(len(x_test), subset_test, seed, 1, "subset_test")
    if i_tr is not None:
        x_train, y_train = x_train[i_tr], y_train[i_tr]
    if i_te is not None:
        x_test, y_test = x_test[i_te], y_test[i_te]
    if is_image:
        xt, xe = normalize_images(x_train, mean, std), normalize_images(x_test, mean, std)
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
        xe = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
    return DataBundle(
        name=name,
        x_train=xt,
        y_train=torch.from_numpy(y_train),
        x_test=xe,
        y_test=torch.from_numpy(y_test),
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        is_image=is_image,
        augment=aug,
        meta=meta,
    ).validate()
