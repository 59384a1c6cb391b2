"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747): 60k/10k 28x28 grayscale clothing images in
10 classes, a drop-in for MNIST that a linear model does not solve. Read from its four IDX files.

Source order: dataset.root if given; else Debian's dataset-fashion-mnist package
(/usr/share/datasets/fashion-mnist, `make data`); else torchvision's downloader into
~/.cache/hashexp. Nothing is cached beyond what torchvision itself writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import DataBundle
from .mnist import load_idx_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def load_fashion_mnist(
    name: str = "fashion_mnist",
    root: str | None = None,
    subset_train: int | None = None,
    subset_test: int | None = None,
    seed: int | None = 0,
    augment: Any = None,
    download: bool = True,
) -> DataBundle:
    """Fashion-MNIST as a DataBundle of (N, 1, 28, 28) images normalized with the train mean/std.

    Args:
        name: dataset name carried by the bundle.
        root: directory with the four IDX files (raw or .gz; plain or root/FashionMNIST/raw).
            If given, it is the only place looked in (downloads go there too).
        subset_train, subset_test: null for all samples, or the size of a seeded random subset.
        seed: seed of the subsets.
        augment: {crop_padding, hflip} or null; attached to the bundle for the trainer.
        download: allow torchvision to download when no local copy is found.
    """
    return load_idx_dataset(
        name=name,
        pretty="Fashion-MNIST",
        tv_class="FashionMNIST",
        root=root,
        download=download,
        subset_train=subset_train,
        subset_test=subset_test,
        seed=seed,
        augment=augment,
        system_dir=DEBIAN_DIR,
        system_fix=f"run `make data` (apt-get install dataset-fashion-mnist, which fills {DEBIAN_DIR})",
    )
