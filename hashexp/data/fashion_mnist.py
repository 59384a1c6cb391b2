"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747): 60k/10k 28x28 grayscale clothing images in
10 classes, a drop-in for MNIST that a linear model does not solve. Read from its four IDX files.

Source order: dataset.root if given; else Debian's dataset-fashion-mnist package
(/usr/share/datasets/fashion-mnist, `make data`); else torchvision's downloader into
~/.cache/hashexp. Nothing is cached beyond what torchvision itself writes.
"""

from __future__ import annotations

from pathlib import Path

from .base import RawImages, image_loader
from .mnist import read_idx_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_fashion_mnist(root: str | None, download: bool) -> RawImages:
    """Fashion-MNIST's IDX files from ``root`` or the system dataset dir (downloaded when asked)."""
    return read_idx_dataset(
        pretty="Fashion-MNIST",
        tv_class="FashionMNIST",
        root=root,
        download=download,
        system_dir=DEBIAN_DIR,
        system_fix=f"run `make data` (apt-get install dataset-fashion-mnist, which fills {DEBIAN_DIR})",
    )


load_fashion_mnist = image_loader(
    "fashion_mnist", read_fashion_mnist,
    "Fashion-MNIST as a DataBundle of (N, 1, 28, 28) images normalized with the train mean/std.",
    "directory with the four IDX files (raw or .gz; plain or root/FashionMNIST/raw).\n"
    "            If given, it is the only place looked in (downloads go there too).")
