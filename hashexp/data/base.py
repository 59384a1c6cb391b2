"""DataBundle: a whole dataset held as in-memory tensors, plus the helpers every source shares.

Every loader in hashexp.data returns one DataBundle. Images are float32 (N, C, H, W) normalized
per channel with train-split statistics; vectors are float32 (N, D) standardized per feature.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError, DataError

from .augment import Augment


@dataclass
class DataBundle:
    """Train and test splits of one dataset, as tensors on one device.

    Attributes:
        name: dataset name, as in conf/dataset/<name>.yaml.
        x_train, x_test: float32 inputs, (N, C, H, W) for images, (N, D) for vectors.
        y_train, y_test: int64 class labels, shape (N,).
        num_classes: number of classes; labels lie in [0, num_classes).
        input_shape: per-sample shape, e.g. (1, 28, 28) or (20,).
        is_image: True for (N, C, H, W) inputs.
        augment: train-time augmentation for this dataset (identity unless configured).
        meta: provenance and normalization stats (source path, mean, std, subset sizes).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    is_image: bool
    augment: Augment = field(default_factory=Augment)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        """Features per sample (the product of ``input_shape``)."""
        return math.prod(self.input_shape)

    @property
    def n_train(self) -> int:
        """Training samples."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Test samples."""
        return int(self.y_test.shape[0])

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")

    def majority_acc(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent class of `split` (the baseline to beat)."""
        _, y = self._split(split)
        if y.numel() == 0:
            return float("nan")
        counts = torch.bincount(y.detach().cpu(), minlength=self.num_classes)
        return float(counts.max().item() / y.numel())

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """Samples per class of a split (``train`` or ``test``)."""
        _, y = self._split(split)
        return torch.bincount(y.detach().cpu(), minlength=self.num_classes)

    def to(self, device: torch.device | str) -> "DataBundle":
        """A copy with all four tensors on `device` (no copy if already there)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            meta=dict(self.meta),
        )

    def validate(self) -> "DataBundle":
        """Check the invariants the rest of hashexp relies on; raise DataError naming the broken one."""
        n = self.name
        for split in ("train", "test"):
            x, y = self._split(split)
            if x.dtype != torch.float32:
                raise DataError(f"dataset {n}: x_{split} must be float32, got {x.dtype}")
            if y.dtype != torch.int64:
                raise DataError(f"dataset {n}: y_{split} must be int64, got {y.dtype}")
            if y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"dataset {n}: x_{split} has {x.shape[0]} samples but y_{split} has shape {tuple(y.shape)}"
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise DataError(
                    f"dataset {n}: x_{split} per-sample shape {tuple(x.shape[1:])} != input_shape {self.input_shape}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataError(
                    f"dataset {n}: y_{split} labels span [{int(y.min())}, {int(y.max())}], "
                    f"outside [0, {self.num_classes})"
                )
        if self.n_train == 0:
            raise DataError(f"dataset {n}: the training split is empty")
        if self.is_image != (len(self.input_shape) == 3):
            raise DataError(f"dataset {n}: is_image={self.is_image} but input_shape={self.input_shape}")
        if self.augment.enabled and not self.is_image:
            raise ConfigError(f"dataset {n}: augment is set but the inputs are not images; set dataset.augment=null")
        return self

    def __repr__(self) -> str:
        return (
            f"DataBundle({self.name}: train {tuple(self.x_train.shape)}, test {tuple(self.x_test.shape)}, "
            f"{self.num_classes} classes, device {self.x_train.device}, augment {self.augment})"
        )


# ---------------------------------------------------------------------------- shared helpers


def default_cache_dir() -> Path:
    """Where torchvision downloads go when dataset.root is null ($HASHEXP_CACHE or ~/.cache/hashexp)."""
    env = os.environ.get("HASHEXP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hashexp"


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as `Type: message` on one line (torchvision puts the cause on later lines)."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_seed(seed: Any) -> int:
    """Seed knob: null means 0 (build_dataset fills in the run seed before it gets here)."""
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"dataset.seed must be a non-negative integer or null, got {seed!r}")
    return int(seed)


def check_subset(value: Any, key: str) -> int | None:
    """``dataset.subset_train/subset_test``: a positive integer, or None for all samples."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"dataset.{key} must be a positive integer or null (all samples), got {value!r}")
    return int(value)


def subset_indices(n: int, size: int | None, seed: int, stream: int, key: str) -> np.ndarray | None:
    """Seeded random subset of range(n), kept in original order; None means take everything.

    `stream` separates the train and test draws so that changing one size leaves the other subset as is.
    """
    size = check_subset(size, key)
    if size is None:
        return None
    if size > n:
        raise ConfigError(f"dataset.{key}={size} exceeds the {n} samples available; lower it or set it to null")
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n, size=size, replace=False))


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of (N, C, H, W) data, accumulated in float64 over chunks of samples
    so that a 60000-image uint8 set never needs a full float copy."""
    n, c = x.shape[0], x.shape[1]
    per_sample = max(1, math.prod(x.shape[1:]))
    step = max(1, (1 << 22) // per_sample)
    s1 = np.zeros(c)
    s2 = np.zeros(c)
    for start in range(0, n, step):  # chunks of ~4M values, not samples
        chunk = x[start : start + step].astype(np.float64)
        s1 += chunk.sum(axis=(0, 2, 3))
        s2 += np.einsum("nchw,nchw->c", chunk, chunk)
    count = n * x.shape[2] * x.shape[3]
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
    std[std < 1e-12] = 1.0  # a constant channel carries no information: centre it, do not blow it up
    return mean, std


def normalize_images(
    x: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> torch.Tensor:
    """(N, C, H, W) array of any numeric dtype -> float32 tensor, (x - mean) / std per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # one copy; IDX buffers are read-only
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.sub_(m).div_(s)


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature standardization (axis 0) with train statistics; constant features are only centred."""
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std = np.where(std < 1e-12, 1.0, std)
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
        mean,
        std,
    )


def image_bundle(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    subset_train: int | None,
    subset_test: int | None,
    seed: Any,
    augment: Any,
    source: str,
) -> DataBundle:
    """Subset, normalize and wrap raw (N, C, H, W) image arrays (any numeric dtype) into a DataBundle.

    Normalization stats come from the full training split, before subsetting, so a quick run on
    subset_train=1000 sees inputs on the same scale as the full run.
    """
    seed = check_seed(seed)
    aug = Augment.from_config(augment)
    mean, std = channel_stats(x_train)
    i_tr = subset_indices(len(x_train), subset_train, seed, 0, "subset_train")
    i_te = subset_indices(len(x_test), subset_test, seed, 1, "subset_test")
    if i_tr is not None:
        x_train, y_train = x_train[i_tr], y_train[i_tr]
    if i_te is not None:
        x_test, y_test = x_test[i_te], y_test[i_te]
    bundle = DataBundle(
        name=name,
        x_train=normalize_images(x_train, mean, std),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=normalize_images(x_test, mean, std),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        is_image=True,
        augment=aug,
        meta={"source": source, "mean": mean.tolist(), "std": std.tolist(), "seed": seed},
    )
    return bundle.validate()


#: what an image source reads: (x_train, y_train, x_test, y_test, source), images (N, C, H, W) of any numeric dtype
RawImages = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]

_IMAGE_LOADER_ARGS = """

    Args:
        name: dataset name carried by the bundle.
        root: {root}
        subset_train, subset_test: null for all samples, or the size of a seeded random subset.
        seed: seed of the subsets.
        augment: {{crop_padding, hflip}} or null; attached to the bundle for the trainer.
        download: allow torchvision to download when no local copy is found.
    """


def image_loader(default_name: str, read: Callable[[str | None, bool], RawImages], doc: str,
                 root_doc: str, num_classes: int = 10) -> Callable[..., DataBundle]:
    """The loader of an image dataset (the ``_target_`` of its conf/dataset yaml): one signature for all.

    ``read(root, download)`` finds and parses the files; the loader subsets, normalizes with the
    train statistics and wraps them (:func:`image_bundle`).
    """

    def load(name: str = default_name, root: str | None = None, subset_train: int | None = None,
             subset_test: int | None = None, seed: int | None = 0, augment: Any = None,
             download: bool = True) -> DataBundle:
        x_train, y_train, x_test, y_test, source = read(root, download)
        return image_bundle(name, x_train, y_train, x_test, y_test, num_classes, subset_train=subset_train,
                            subset_test=subset_test, seed=seed, augment=augment, source=source)

    load.__name__ = load.__qualname__ = f"load_{default_name}"
    load.__module__ = read.__module__
    load.__doc__ = doc + _IMAGE_LOADER_ARGS.format(root=root_doc)
    return load
