"""MNIST (LeCun et al. 1998): 60k/10k handwritten digits, 28x28 grayscale, read from IDX files.

Also home of the source resolution shared with Fashion-MNIST (same four IDX files):
dataset.root if given (plain or torchvision's <Class>/raw layout), else a system directory
(Debian's dataset-fashion-mnist), else torchvision's downloader into the cache directory.
"""

from __future__ import annotations

from pathlib import Path

from hashexp.errors import DataError

from .base import RawImages, default_cache_dir, image_loader, one_line
from .idx import IDX_FILES, find_idx_dir, find_idx_file, load_idx_dir


def _torchvision_download(tv_class: str, root: Path) -> None:
    """Let torchvision fetch and unpack the IDX files into root/<tv_class>/raw; we parse them ourselves."""
    import torchvision.datasets as tvd  # imported lazily: only the download path needs it

    root.mkdir(parents=True, exist_ok=True)
    getattr(tvd, tv_class)(root=str(root), train=True, download=True)


def _missing_files(directory: Path) -> list[str]:
    return [stem for stem in IDX_FILES.values() if find_idx_file(directory, stem) is None]


def resolve_idx_source(
    *,
    pretty: str,
    tv_class: str,
    root: str | Path | None,
    download: bool,
    system_dir: Path | None = None,
    system_fix: str | None = None,
) -> Path:
    """Directory holding the four IDX files of an MNIST-style dataset, or one DataError naming every fix.

    A given root is authoritative: we never fall back from it to other data, only download into it.
    """
    looked: list[str] = []
    download_error = ""
    if root is not None:
        root = Path(root).expanduser()
        candidates = [root, root / tv_class / "raw"]
        found = find_idx_dir(candidates)
        if found is not None:
            return found
        looked += [f"{c} (missing {', '.join(_missing_files(c)) if c.is_dir() else 'directory'})" for c in candidates]
        cache = root
    else:
        if system_dir is not None:
            found = find_idx_dir([system_dir])
            if found is not None:
                return found
            looked.append(str(system_dir))
        cache = default_cache_dir()
        found = find_idx_dir([cache / tv_class / "raw"])
        if found is not None:
            return found
        looked.append(str(cache / tv_class / "raw"))
    if download:
        try:
            _torchvision_download(tv_class, cache)
        except Exception as e:  # any network/filesystem failure becomes part of the one-line message
            download_error = f"torchvision download into {cache} failed: {one_line(e)}"
        else:
            found = find_idx_dir([cache / tv_class / "raw"])
            if found is not None:
                return found
            download_error = f"torchvision download into {cache} left no IDX files in {cache / tv_class / 'raw'}"
    else:
        download_error = "dataset.download=false, so torchvision was not asked to download"
    fixes = [
        "set dataset.root=/path/to/dir holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
    ]
    if system_fix:
        fixes.append(system_fix)
    fixes.append(f"allow internet access with dataset.download=true so torchvision downloads it into {cache}")
    fix_text = "; ".join(f"({i}) {f}" for i, f in enumerate(fixes, 1))
    raise DataError(f"{pretty} not found (looked in {'; '.join(looked)}; {download_error}). Fix: {fix_text}")


def read_idx_dataset(
    *,
    pretty: str,
    tv_class: str,
    root: str | Path | None,
    download: bool,
    system_dir: Path | None = None,
    system_fix: str | None = None,
    num_classes: int = 10,
) -> RawImages:
    """The four IDX arrays of an MNIST-style dataset (labels checked) and the directory they came from."""
    directory = resolve_idx_source(
        pretty=pretty, tv_class=tv_class, root=root, download=download, system_dir=system_dir, system_fix=system_fix
    )
    arrays = load_idx_dir(directory)
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            stem = IDX_FILES[(split, "labels")]
            raise DataError(
                f"{directory / stem}: labels span [{y.min()}, {y.max()}], expected 0..{num_classes - 1} for {pretty}"
            )
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], str(directory)


def read_mnist(root: str | None, download: bool) -> RawImages:
    """MNIST's IDX files from ``root`` or the system dataset dir (downloaded when asked)."""
    return read_idx_dataset(pretty="MNIST", tv_class="MNIST", root=root, download=download)


load_mnist = image_loader(
    "mnist", read_mnist,
    "MNIST from IDX files in `root` (plain or root/MNIST/raw), else torchvision's downloader.",
    "directory with the IDX files; downloads go here too. null: ~/.cache/hashexp.")
