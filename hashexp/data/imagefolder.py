"""Image folders streamed from disk: ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet's layout).

For data beyond RAM. Only the file list and the labels are held in memory; images are decoded,
resized, cropped, flipped and normalized per batch by DataLoader workers, with pinned memory.
The small in-memory datasets (fashion_mnist, cifar10, npz ...) stay the fast path.

Reproducible by construction, whatever the number of workers or ranks:
- an epoch's order is a permutation drawn from the trainer's generator, as for in-memory data,
  plus one seed per position that drives that sample's random crop and flip (in the worker);
- under torchrun each rank loads only its slice of every global batch (``Dist.bounds``): the
  ranks together see exactly the batches of a one-process run (torch's DistributedSampler
  would shard the epoch instead and pad it, so results would depend on the world size);
- a mid-epoch resume redraws the epoch from the generator state in the checkpoint and skips the
  batches already trained on without reading them (the sampler state is that generator state
  and the batch position, both in checkpoint.pt);
- the calibration set and BatchNorm re-estimation index ``x_train`` (a :class:`LazyImages`):
  those samples load with the deterministic evaluation transform (resize, centre crop), the
  same on every rank.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError, DataError, HashexpError

from .base import DataBundle, check_seed, check_subset, subset_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageTransform:
    """Decode -> resize (shorter side) -> crop -> flip -> [0, 1] -> normalize, on one image.

    ``train``: a random crop and a random horizontal flip (if ``hflip``) drawn from the
    sample's own seed; otherwise the centre crop, no flip (evaluation, calibration).
    """

    channels: int
    resize: int | None
    crop: int
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool = False

    def __call__(self, path: str, seed: int | None = None) -> torch.Tensor:
        """The (C, crop, crop) float32 input for the image at ``path``."""
        # plain torch ops: DataLoader workers import nothing new (a torchvision.transforms import
        # in each forked worker cost seconds per loader)
        x = read_image(path, self.channels).to(torch.float32)
        if self.resize is not None:
            h, w = x.shape[-2:]
            scale = self.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            if size != (h, w):
                x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                                                    antialias=True)[0]
        h, w = x.shape[-2:]
        if h < self.crop or w < self.crop:  # a small image: zero-pad to the crop
            x = torch.nn.functional.pad(x, (0, max(0, self.crop - w), 0, max(0, self.crop - h)))
            h, w = x.shape[-2:]
        if self.train:
            g = torch.Generator().manual_seed(int(seed or 0))
            top = int(torch.randint(h - self.crop + 1, (1,), generator=g))
            left = int(torch.randint(w - self.crop + 1, (1,), generator=g))
            flip = self.hflip and bool(torch.rand(1, generator=g) < 0.5)
        else:
            top, left, flip = (h - self.crop) // 2, (w - self.crop) // 2, False
        x = x[:, top:top + self.crop, left:left + self.crop]
        if flip:
            x = x.flip(-1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return x.div_(255.0).sub_(mean).div_(std).contiguous()


def read_image(path: str, channels: int) -> torch.Tensor:
    """(C, H, W) uint8 of the file; a file PIL cannot decode is a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image file {path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())}); "
                        "replace or delete it") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """One split as (path, label) pairs; an item is a sample index, or (index, seed) in training."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: ImageTransform) -> None:
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        return self.transform(self.paths[i], seed), int(self.labels[i])


class LazyImages:
    """Stands in for an ``x`` tensor of a split: ``len``, ``shape``, ``device`` and indexing by an
    index tensor or a slice load those images (evaluation transform) in this process.

    ``hashexp.metrics.evaluate`` uses :meth:`eval_batches` instead (DataLoader workers).
    """

    def __init__(self, files: ImageFiles, input_shape: tuple[int, ...], loader_kw: dict[str, Any],
                 device: torch.device | str = "cpu", eval_index: np.ndarray | None = None) -> None:
        self.files, self.input_shape, self.loader_kw = files, tuple(input_shape), dict(loader_kw)
        self.device = torch.device(device)
        self.eval_index = eval_index  # evaluate on these samples only (None: all)
        self.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        """(n_files, *input_shape): the shape the decoded tensor would have."""
        return torch.Size((len(self.files), *self.input_shape))

    def __len__(self) -> int:
        return len(self.files)

    def to(self, device: torch.device | str) -> "LazyImages":
        """The same images, delivered on ``device``."""
        return LazyImages(self.files, self.input_shape, self.loader_kw, device, self.eval_index)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):  # one sample, as a tensor's x[i]
            return self.files[int(index)][0].to(self.device)
        if isinstance(index, slice):
            idx = range(len(self.files))[index]
        else:
            idx = torch.as_tensor(index).reshape(-1).cpu().tolist()
        if not idx:
            return torch.empty((0, *self.input_shape), device=self.device)
        return torch.stack([self.files[i][0] for i in idx]).to(self.device)

    def eval_batches(self, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches in file order through DataLoader workers (over ``eval_index`` if set)."""
        items = list(range(len(self.files))) if self.eval_index is None else self.eval_index.tolist()
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        yield from _load(self.files, batches, self.input_shape, self.loader_kw, self.device)


@dataclass
class StreamedImages(DataBundle):
    """A DataBundle whose images stay on disk: ``x_train``/``x_test`` are :class:`LazyImages`,
    labels are tensors; :meth:`train_batches` streams an epoch through DataLoader workers
    (``train_files``: the training split with the random training transform)."""

    train_files: ImageFiles | None = field(default=None, repr=False)

    def train_batches(self, batch_size: int, generator: torch.Generator, skip: int = 0,
                      dist=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's shuffled batches from the ``skip``-th on (this rank's slice under ``dist``).

        Draws the permutation and the per-position augmentation seeds from ``generator`` (its
        state before the call is what a mid-epoch checkpoint records).
        """
        n = self.n_train
        order = torch.randperm(n, generator=generator)
        seeds = torch.randint(0, 2**62, (n,), generator=generator)
        batches = []
        for i in range(skip, -(-n // batch_size)):
            j, s = order[i * batch_size:(i + 1) * batch_size], seeds[i * batch_size:(i + 1) * batch_size]
            if dist is not None:
                lo, hi = dist.bounds(len(j))
                j, s = j[lo:hi], s[lo:hi]
            batches.append(list(zip(j.tolist(), s.tolist())))
        yield from _load(self.train_files, batches, self.input_shape, self.x_train.loader_kw, self.x_train.device)

    def to(self, device: torch.device | str) -> "StreamedImages":
        """A copy whose tensors (and lazy image lists) live on ``device``."""
        return dataclasses.replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                                   x_test=self.x_test.to(device), y_test=self.y_test.to(device), meta=dict(self.meta))

    def validate(self) -> "StreamedImages":
        """Itself; raises DataError when the training split is empty."""
        if self.n_train == 0:
            raise DataError(f"dataset {self.name}: the training split is empty")
        return self

    def __repr__(self) -> str:
        return (f"StreamedImages({self.name}: train {self.n_train}, val {self.n_test} files, "
                f"{self.num_classes} classes, input {self.input_shape})")


def _load(files: ImageFiles, batches: list[list], shape: tuple[int, ...], loader_kw: dict[str, Any],
          device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of items through a DataLoader, in order; a worker's DataError comes out as one line.

    An empty batch (a rank's slice of a global batch smaller than the world size) is yielded as
    empty tensors of per-sample ``shape``: that rank still runs its step, so DDP's all-reduce completes.
    """
    full = [b for b in batches if b]
    it = iter(torch.utils.data.DataLoader(files, batch_sampler=full, **loader_kw)) if full else iter(())
    try:
        for b in batches:
            if not b:
                yield torch.empty((0, *shape), device=device), torch.empty(0, dtype=torch.int64, device=device)
                continue
            try:
                xb, yb = next(it)
            except HashexpError as e:  # re-raised from a worker with its traceback in the message
                raise type(e)(_last_line(str(e))) from None
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    finally:
        # stop the workers now: left to the iterator's finalizer after an error or an early
        # exit, their shutdown waits out two 5 s status timeouts
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _last_line(msg: str) -> str:
    line = msg.strip().splitlines()[-1] if msg.strip() else msg
    return line.split(": ", 1)[1] if line.startswith(("hashexp.errors.", "DataError:", "ConfigError:")) else line


def scan_split(root: str, split: str, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, paths, labels) of ``root/split/<class>/*``; an empty class folder is a DataError."""
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        raise DataError(f"image folder {base} does not exist; dataset.root must hold {split}/<class>/<image files>")
    found = sorted(e.name for e in os.scandir(base) if e.is_dir())
    if not found:
        raise DataError(f"image folder {base} has no class folders; expected {base}/<class>/<image files>")
    if classes is not None:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{base} has class folders {extra[:5]} that the training split lacks; "
                            "both splits need the same classes")
    classes = classes or found
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(base, cls)
        if not os.path.isdir(folder):
            continue  # a class missing from the validation split
        files = sorted(e.path for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"class folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS[:3])} ...); "
                            "add images or remove the folder")
        paths += files
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def load_imagefolder(root: str, name: str = "imagefolder", train_dir: str = "train", val_dir: str = "val",
                     channels: int = 3, resize: int | None = 256, crop: int = 224, hflip: bool = True,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     num_workers: int = 4, pin_memory: bool = True, eval_train_samples: int | None = 10000,
                     subset_train: int | None = None, subset_test: int | None = None, seed: int | None = 0,
                     augment: Any = None) -> StreamedImages:
    """The ``dataset=imagefolder`` source: file lists of both splits, transforms, loader settings.

    Args:
        root: folder holding ``train_dir/<class>/*`` and ``val_dir/<class>/*``.
        name: the dataset's label.
        train_dir, val_dir: the split folders under ``root``; the classes are the train folder's.
        channels: 3 (RGB) or 1 (grayscale); every image is converted.
        resize: shorter side resized to this before cropping (null: as stored).
        crop: side of the square input: a random crop in training, the centre crop otherwise.
        hflip: random horizontal flips in training.
        mean, std: per-channel normalization statistics (``channels`` values each; default ImageNet's).
        num_workers: DataLoader worker processes (0: load in the training process).
        pin_memory: page-locked host batches (faster copies to a GPU).
        eval_train_samples: train accuracy and loss of each epoch on this many seeded train
            samples (null: all; a full pass over ImageNet's train split per epoch is hours).
        subset_train, subset_test: seeded random subsets (quick runs).
        seed: seeds the subsets and the train-evaluation sample.
        augment: must stay null: the transforms above replace the in-memory augmentation.
    """
    if augment is not None:
        raise ConfigError("dataset.augment must be null for imagefolder; use dataset.crop, dataset.resize, dataset.hflip")
    if channels not in (1, 3):
        raise ConfigError(f"dataset.channels must be 1 or 3, got {channels!r}")
    for key, v in (("crop", crop), ("resize", resize), ("num_workers", num_workers)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "num_workers" else 1)):
            raise ConfigError(f"dataset.{key} must be a positive integer, got {v!r}")
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise ConfigError(f"dataset.mean and dataset.std need {channels} values each (std > 0), got {list(mean)}, {list(std)}")
    if root is None or not os.path.isdir(root):
        raise DataError(f"dataset.root={root!r} is not a directory; point it at the folder holding "
                        f"{train_dir}/ and {val_dir}/")
    seed = check_seed(seed)
    classes, tr_paths, tr_labels = scan_split(root, train_dir)
    _, te_paths, te_labels = scan_split(root, val_dir, classes)
    picks = [subset_indices(len(tr_paths), subset_train, seed, 0, "subset_train"),
             subset_indices(len(te_paths), subset_test, seed, 1, "subset_test")]
    if picks[0] is not None:
        tr_paths, tr_labels = [tr_paths[i] for i in picks[0]], tr_labels[picks[0]]
    if picks[1] is not None:
        te_paths, te_labels = [te_paths[i] for i in picks[1]], te_labels[picks[1]]
    kw = dict(channels=channels, resize=resize, crop=crop, hflip=bool(hflip), mean=tuple(map(float, mean)),
              std=tuple(map(float, std)))
    train_files = ImageFiles(tr_paths, tr_labels, ImageTransform(**kw, train=True))
    loader_kw = {"num_workers": int(num_workers), "pin_memory": bool(pin_memory) and torch.cuda.is_available(),
                 **({"persistent_workers": False, "prefetch_factor": 2} if num_workers else {})}
    shape = (channels, crop, crop)
    check_subset(eval_train_samples, "eval_train_samples")
    eval_index = None
    if eval_train_samples is not None and eval_train_samples < len(tr_paths):
        eval_index = subset_indices(len(tr_paths), eval_train_samples, seed, 2, "eval_train_samples")
    x_train = LazyImages(ImageFiles(tr_paths, tr_labels, ImageTransform(**kw)), shape, loader_kw, eval_index=eval_index)
    x_test = LazyImages(ImageFiles(te_paths, te_labels, ImageTransform(**kw)), shape, loader_kw)
    return StreamedImages(name=name, x_train=x_train, y_train=torch.from_numpy(tr_labels), x_test=x_test,
                          y_test=torch.from_numpy(te_labels), num_classes=len(classes), input_shape=shape,
                          is_image=True, augment=None,
                          meta={"source": os.path.abspath(root), "classes": classes, "mean": list(kw["mean"]),
                                "std": list(kw["std"]), "seed": seed, "streamed": True},
                          train_files=train_files)


__all__ = ["ImageFiles", "ImageTransform", "LazyImages", "StreamedImages", "load_imagefolder", "scan_split"]
