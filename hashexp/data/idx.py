"""IDX files (the MNIST / Fashion-MNIST format), raw or gzipped, read with one np.frombuffer.

Format: 2 zero bytes, a dtype code, the number of dimensions d, then d big-endian uint32 sizes,
then the data in C order, big-endian. See http://yann.lecun.com/exdb/mnist/.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from hashexp.errors import DataError

# IDX dtype codes -> big-endian numpy dtypes
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# the four files of an MNIST-style dataset: (split, kind) -> file stem
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); delete it and fetch the dataset again") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def parse_idx(buf: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Decode an IDX buffer into an array of its native shape (no copy of the data)."""
    if len(buf) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(buf)} bytes, the header alone needs 4")
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{buf[:4].hex()} (expected 0x0000TTDD with type TT in "
            f"{{08,09,0b,0c,0d,0e}} and DD >= 1 dimensions); the file is not IDX or is corrupt"
        )
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{path}: truncated IDX file: header needs {header} bytes, file has {len(buf)}")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(buf) - header
    if found < expected:
        raise DataError(
            f"{path}: truncated IDX file: dims {dims} need {expected} data bytes, found {found}; "
            f"delete it and fetch the dataset again"
        )
    if found > expected:
        raise DataError(f"{path}: IDX file has {found - expected} unexpected trailing bytes after dims {dims}")
    return np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(dims)


def read_idx(path: Path | str) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in .gz)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), path)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `directory`; the raw file wins (no decompression)."""
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def find_idx_dir(candidates: list[Path]) -> Path | None:
    """First directory among `candidates` that holds all four IDX files."""
    for d in candidates:
        if d.is_dir() and all(find_idx_file(d, stem) for stem in IDX_FILES.values()):
            return d
    return None


def load_idx_dir(directory: Path, image_dims: int = 3) -> dict[str, np.ndarray]:
    """Read the four files of an MNIST-style directory and check they fit together.

    Returns {"x_train", "y_train", "x_test", "y_test"}; images as (N, 1, H, W) uint8, labels int64.
    """
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        ip = find_idx_file(directory, IDX_FILES[(split, "images")])
        lp = find_idx_file(directory, IDX_FILES[(split, "labels")])
        if ip is None or lp is None:
            missing = IDX_FILES[(split, "images" if ip is None else "labels")]
            raise DataError(f"{directory}: missing {missing}[.gz]")
        images, labels = read_idx(ip), read_idx(lp)
        if images.ndim != image_dims:
            raise DataError(f"{ip}: expected {image_dims} dimensions (count, rows, cols), got dims {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{lp}: expected 1 dimension (count), got dims {labels.shape}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{ip.name} holds {images.shape[0]} images but {lp.name} holds {labels.shape[0]} labels "
                f"(in {directory}); the files do not belong together"
            )
        if labels.dtype.kind not in "iu":
            raise DataError(f"{lp}: labels must be integers, got IDX type {labels.dtype}")
        out[f"x_{split}"] = images[:, None]  # add the channel axis: (N, 1, H, W)
        out[f"y_{split}"] = labels.astype(np.int64)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise DataError(
            f"{directory}: train images are {out['x_train'].shape[2:]} but test images are {out['x_test'].shape[2:]}"
        )
    return out


def write_idx(path: Path | str, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzipped if the name ends in .gz); used by tests and tools."""
    path = Path(path)
    arr = np.asarray(array)
    code = next(
        (c for c, dt in IDX_DTYPES.items() if dt.kind == arr.dtype.kind and dt.itemsize == arr.dtype.itemsize),
        None,
    )
    if code is None:
        raise DataError(f"write_idx: dtype {arr.dtype} has no IDX type code")
    be = arr.astype(IDX_DTYPES[code], copy=False)
    data = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + be.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path
