"""Train-time image augmentation on whole batches: random crop with zero padding and random
horizontal flip, vectorized over samples and run on whatever device the batch lives on.

Inputs are already normalized, so zero padding fills with the per-channel train mean (the
"average pixel"), not black; for the small paddings used here the difference does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hashexp.errors import ConfigError


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # draw on the generator's device (CPU by default) so one seeded CPU generator drives GPU batches too
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gdev).to(device, non_blocking=True)


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, (n,), generator=generator, device=gdev).to(device, non_blocking=True)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad (N, C, H, W) by `padding` zeros on each side, then cut an H x W window at a random
    offset per sample (one gather, no loop over samples)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = _randint(2 * padding + 1, n, generator, x.device)
    ox = _randint(2 * padding + 1, n, generator, x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    ni = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[ni, ci, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability p (per-sample mask, torch.where)."""
    mask = _rand((x.shape[0],), generator, x.device) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def augment_batch(
    x: torch.Tensor, crop_padding: int = 0, hflip: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop (zero padding `crop_padding`) then random horizontal flip, on an (N, C, H, W) batch."""
    if x.ndim != 4:
        raise ConfigError(f"augmentation needs (N, C, H, W) image batches, got shape {tuple(x.shape)}")
    if crop_padding:
        x = random_crop(x, int(crop_padding), generator)
    if hflip:
        x = random_hflip(x, generator)
    return x


@dataclass(frozen=True)
class Augment:
    """Config-facing augmentation: `augment(x, generator)`; identity when crop_padding=0 and hflip=false.

    Built from the `dataset.augment` config node ({crop_padding: int, hflip: bool} or null) by
    `Augment.from_config`; every image loader attaches one to its DataBundle as `bundle.augment`.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ConfigError(f"dataset.augment.crop_padding must be an integer >= 0, got {self.crop_padding!r}")
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"dataset.augment.hflip must be true or false, got {self.hflip!r}")

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        return augment_batch(x, self.crop_padding, self.hflip, generator)

    @classmethod
    def from_config(cls, cfg: Any) -> "Augment":
        """None/null -> identity; an Augment passes through; a mapping gives crop_padding and hflip."""
        if cfg is None:
            return cls()
        if isinstance(cfg, Augment):
            return cfg
        if isinstance(cfg, Mapping) or hasattr(cfg, "items"):
            d = dict(cfg.items())
            unknown = set(d) - {"crop_padding", "hflip"}
            if unknown:
                raise ConfigError(
                    f"dataset.augment has unknown keys {sorted(unknown)}; allowed: crop_padding, hflip"
                )
            crop, flip = d.get("crop_padding"), d.get("hflip")
            return cls(crop_padding=0 if crop is None else crop, hflip=False if flip is None else flip)
        raise ConfigError(f"dataset.augment must be a mapping {{crop_padding, hflip}} or null, got {cfg!r}")
