"""Mini-batches of in-memory tensors by indexing with a seeded permutation per epoch.

No Dataset/DataLoader: a batch is one gather on the tensors' own device, which for data that
fits in memory is far cheaper than collating per-sample items.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hashexp.errors import ConfigError


class BatchIterator:
    """Iterate (x_batch, y_batch) over one epoch per `iter()`.

    Args:
        x, y: tensors with the same first dimension, on any (the same) device.
        batch_size: samples per batch (>= 1); the last batch may be smaller unless drop_last.
        shuffle: draw a fresh permutation each epoch from `generator`; else keep the order.
        generator: seeded torch.Generator (CPU or the data's device). The permutation is drawn on
            the generator's device and moved to the data, so the order depends only on the
            generator state, not on where the data lives. None: a private generator seeded 0.
        drop_last: skip the final incomplete batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"BatchIterator: x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.device != y.device:
            raise ConfigError(f"BatchIterator: x is on {x.device} but y is on {y.device}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        # never touch the global RNG: identical runs must see identical batches
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @property
    def num_samples(self) -> int:
        """Samples the iterator draws from."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self) -> torch.Tensor:
        """Index order of the next epoch, on the data's device (advances the generator if shuffling)."""
        n = self.num_samples
        if not self.shuffle:
            return torch.arange(n, device=self.x.device)
        perm = torch.randperm(n, generator=self.generator, device=self.generator.device)
        return perm.to(self.x.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.order()
        n, b = self.num_samples, self.batch_size
        if not self.shuffle:
            # contiguous slices are views: no gather needed
            for i in range(len(self)):
                yield self.x[i * b : (i + 1) * b], self.y[i * b : (i + 1) * b]
            return
        for i in range(len(self)):
            j = idx[i * b : min((i + 1) * b, n)]
            yield self.x[j], self.y[j]
