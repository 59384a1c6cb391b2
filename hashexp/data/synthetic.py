"""Seeded synthetic classification data in the manner of sklearn's make_classification
(Guyon 2003, the NIPS feature-selection challenge generator), without depending on sklearn.

Each class owns n_clusters_per_class Gaussian clusters centred on distinct vertices of a
hypercube of side 2*class_sep in the informative subspace, each cluster sheared by its own
random matrix. Redundant features are random linear combinations of the informative ones
(so a hashed layer sees exactly-collinear inputs), the rest is pure noise. A fraction flip_y
of labels is then re-drawn uniformly at random (so about flip_y * (1 - 1/n_classes) of labels
actually change). Columns stay in the order [informative | redundant | noise].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError

from .base import DataBundle, check_seed, standardize, subset_indices


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"dataset.{key} must be an integer >= {low}, got {value!r}")
    return int(value)


def _float(key: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"dataset.{key} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and v > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"dataset.{key} must be in {rng}, got {value!r}")
    return v


def _class_weights(weights: Sequence[float] | None, n_classes: int) -> np.ndarray:
    if weights is None:
        return np.full(n_classes, 1.0 / n_classes)
    try:
        w = np.asarray(list(weights), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"dataset.class_weights must be a list of numbers, got {weights!r}") from e
    if w.ndim != 1 or len(w) != n_classes:
        raise ConfigError(
            f"dataset.class_weights has {w.size} entries but n_classes={n_classes}; give one weight per class"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"dataset.class_weights must be non-negative, got {list(weights)}")
    if abs(w.sum() - 1.0) > 1e-3:
        raise ConfigError(f"dataset.class_weights must sum to 1, got {list(weights)} (sum {w.sum():.4g})")
    return w / w.sum()


def _hypercube_vertices(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct vertices of {0,1}^dim."""
    if dim <= 30:
        codes = rng.choice(2**dim, size=n, replace=False)
        return ((codes[:, None] >> np.arange(dim)) & 1).astype(np.float64)
    while True:  # 2^dim >> n: a collision is astronomically rare, but check anyway
        bits = rng.integers(0, 2, size=(n, dim))
        if len(np.unique(bits, axis=0)) == n:
            return bits.astype(np.float64)


def make_classification(
    n_samples: int = 10_000,
    n_features: int = 20,
    n_informative: int = 10,
    n_redundant: int = 5,
    n_classes: int = 2,
    n_clusters_per_class: int = 2,
    class_weights: Sequence[float] | None = None,
    flip_y: float = 0.05,
    class_sep: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (X float64 (n, n_features), y int64 after label noise, y_clean int64 before it), rows shuffled."""
    n_samples = _int("n_samples", n_samples, 2)
    n_features = _int("n_features", n_features, 1)
    n_informative = _int("n_informative", n_informative, 1)
    n_redundant = _int("n_redundant", n_redundant, 0)
    n_classes = _int("n_classes", n_classes, 2)
    n_clusters_per_class = _int("n_clusters_per_class", n_clusters_per_class, 1)
    flip_y = _float("flip_y", flip_y, 0.0, 1.0)
    class_sep = _float("class_sep", class_sep, 0.0)
    if n_informative + n_redundant > n_features:
        raise ConfigError(
            f"dataset: n_informative ({n_informative}) + n_redundant ({n_redundant}) exceeds n_features ({n_features})"
        )
    n_clusters = n_classes * n_clusters_per_class
    if n_informative < 63 and 2**n_informative < n_clusters:
        raise ConfigError(
            f"dataset: n_classes * n_clusters_per_class = {n_clusters} clusters need at least "
            f"{math.ceil(math.log2(n_clusters))} informative features (hypercube vertices), got {n_informative}"
        )
    weights = _class_weights(class_weights, n_classes)
    rng = np.random.default_rng(seed)

    # samples per cluster: cluster k belongs to class k % n_classes; leftovers go round-robin
    sizes = (n_samples * weights[np.arange(n_clusters) % n_classes] / n_clusters_per_class).astype(np.int64)
    sizes[: n_samples - sizes.sum()] += 1
    y_clean = np.repeat(np.arange(n_clusters) % n_classes, sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    centroids = _hypercube_vertices(n_clusters, n_informative, rng) * (2 * class_sep) - class_sep
    x_inf = rng.standard_normal((n_samples, n_informative))
    shear = rng.uniform(-1.0, 1.0, size=(n_clusters, n_informative, n_informative))
    for k in range(n_clusters):  # one matmul per cluster (a handful), not per sample
        s = slice(bounds[k], bounds[k + 1])
        x_inf[s] = x_inf[s] @ shear[k] + centroids[k]
    x_red = x_inf @ rng.uniform(-1.0, 1.0, size=(n_informative, n_redundant))
    x_noise = rng.standard_normal((n_samples, n_features - n_informative - n_redundant))
    x = np.hstack([x_inf, x_red, x_noise])

    y = y_clean.copy()
    flip = rng.random(n_samples) < flip_y
    y[flip] = rng.integers(0, n_classes, size=int(flip.sum()))

    perm = rng.permutation(n_samples)
    return x[perm], y[perm].astype(np.int64), y_clean[perm].astype(np.int64)


def load_synthetic(
    name: str = "synthetic",
    root: str | None = None,
    subset_train: int | None = None,
    subset_test: int | None = None,
    seed: int | None = 0,
    n_samples: int = 10_000,
    n_features: int = 20,
    n_informative: int = 10,
    n_redundant: int = 5,
    n_noise: int | None = None,
    n_classes: int = 2,
    n_clusters_per_class: int = 2,
    class_weights: Sequence[float] | None = (0.7, 0.3),
    flip_y: float = 0.05,
    class_sep: float = 1.0,
    test_fraction: float = 0.2,
    augment: Any = None,
) -> DataBundle:
    """Synthetic vectors (N, n_features), standardized with train statistics.

    Defaults reproduce the original prototype: 10,000 samples, 20 features (10 informative,
    5 redundant, 5 noise), 2 classes weighted 0.7/0.3, 5% label noise, 20% held out for test.

    Args:
        root: unused (accepted so every dataset config has the same common keys).
        n_noise: null means the rest (n_features - n_informative - n_redundant); if given it must match.
        test_fraction: share of the n_samples held out as the test split, in (0, 1).
        augment: must be null (augmentation is for images).
        Others as in make_classification.
    """
    seed = check_seed(seed)
    if augment is not None:
        raise ConfigError("dataset.augment must be null for synthetic vector data")
    if n_noise is not None:
        rest = n_features - n_informative - n_redundant
        if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise != rest:
            raise ConfigError(
                f"dataset.n_noise={n_noise!r} but n_features - n_informative - n_redundant = {rest}; "
                f"set n_noise=null or change n_features"
            )
    test_fraction = _float("test_fraction", test_fraction, 0.0, 1.0)
    x, y, y_clean = make_classification(
        n_samples, n_features, n_informative, n_redundant, n_classes, n_clusters_per_class,
        class_weights, flip_y, class_sep, seed,
    )
    n_test = int(round(n_samples * test_fraction))
    if not 0 < n_test < n_samples:
        raise ConfigError(
            f"dataset.test_fraction={test_fraction} leaves {n_test} test and {n_samples - n_test} train samples; "
            f"both must be non-empty"
        )
    n_train = n_samples - n_test  # rows are already shuffled: the split is a slice
    x_train, x_test, mean, std = standardize(x[:n_train], x[n_train:])
    y_train, y_test = y[:n_train], y[n_train:]
    i_tr = subset_indices(n_train, subset_train, seed, 0, "subset_train")
    i_te = subset_indices(n_test, subset_test, seed, 1, "subset_test")
    if i_tr is not None:
        x_train, y_train = x_train[i_tr], y_train[i_tr]
    if i_te is not None:
        x_test, y_test = x_test[i_te], y_test[i_te]
    return DataBundle(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test)),
        num_classes=int(n_classes),
        input_shape=(int(n_features),),
        is_image=False,
        meta={
            "source": "synthetic",
            "seed": seed,
            "label_noise_train": float((y[:n_train] != y_clean[:n_train]).mean()),
            "columns": {"informative": n_informative, "redundant": n_redundant,
                        "noise": n_features - n_informative - n_redundant},
        },
    ).validate()
