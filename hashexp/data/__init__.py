"""Data layer: every source yields a DataBundle of in-memory tensors (imagefolder: streamed).

Sources (one module each, one conf/dataset/<name>.yaml each): fashion_mnist, mnist, cifar10
(image files in their original formats), synthetic (make_classification-style generator),
npz (bring your own arrays) and imagefolder (root/train/<class>/*, streamed from disk by
DataLoader workers: data beyond RAM). BatchIterator batches by indexing; augment.py holds the
vectorized train-time image augmentation.
"""

from __future__ import annotations

from typing import Any

from hashexp.errors import ConfigError, HashexpError

from .augment import Augment, augment_batch
from .base import DataBundle
from .batches import BatchIterator

__all__ = ["Augment", "BatchIterator", "DataBundle", "augment_batch", "build_dataset"]


def build_dataset(cfg_dataset: Any, seed: int | None = None, **overrides: Any) -> DataBundle:
    """Instantiate a conf/dataset node into a validated DataBundle.

    `seed` (the run seed) is used when the node's own `seed` is null or absent, so
    dataset.seed=<n> pins the data (subsets, synthetic draw) independently of the run seed.
    Errors raised by the loader come out as the original DataError/ConfigError, not wrapped.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if cfg_dataset is None:
        raise ConfigError("no dataset configured: pick one with dataset=<name> (see conf/dataset/)")
    if isinstance(cfg_dataset, DictConfig):
        node = cfg_dataset
    elif isinstance(cfg_dataset, dict):
        node = OmegaConf.create(cfg_dataset)
    else:
        raise ConfigError(f"dataset config must be a mapping with _target_, got {type(cfg_dataset).__name__}")
    if "_target_" not in node:
        raise ConfigError("dataset config has no _target_; use one of conf/dataset/*.yaml")
    missing = sorted(k for k in OmegaConf.missing_keys(node) if k not in overrides)
    if missing:
        raise ConfigError(
            f"dataset {node.get('name', '?')}: required key(s) not set: "
            + ", ".join(f"dataset.{k}=..." for k in missing)
        )
    kwargs = dict(overrides)
    if seed is not None and node.get("seed") is None:
        kwargs["seed"] = seed
    try:
        bundle = instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, HashexpError):
            raise cause from None
        if isinstance(cause, TypeError):  # e.g. an unknown key added with +dataset.foo=...
            raise ConfigError(f"dataset {node.get('name', '?')}: {cause}") from None
        raise ConfigError(f"dataset {node.get('name', '?')}: {str(e).splitlines()[0]}") from e
    if not isinstance(bundle, DataBundle):
        raise ConfigError(f"dataset _target_ {node._target_} returned {type(bundle).__name__}, not a DataBundle")
    return bundle.validate()
