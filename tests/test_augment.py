"""Vectorized crop and flip: shapes, known shifts, per-sample masks, determinism."""

from __future__ import annotations

import pytest
import torch

from hashexp.data import Augment, augment_batch
from hashexp.data.augment import random_crop, random_hflip
from hashexp.errors import ConfigError


def ramp(n=64, c=2, h=6, w=5):
    # value encodes (row, col) so any shift is readable: 1 + 10 * row + col (never 0, the pad value)
    img = 1 + 10 * torch.arange(h)[:, None] + torch.arange(w)[None, :]
    return img.float().expand(n, c, h, w).clone()


def test_shapes_preserved_and_identity_when_disabled():
    x = ramp()
    g = torch.Generator().manual_seed(0)
    assert augment_batch(x, 3, True, g).shape == x.shape
    assert Augment()(x, g) is x and not Augment().enabled
    assert Augment.from_config(None) == Augment()
    assert Augment.from_config({"crop_padding": 4, "hflip": True}) == Augment(4, True)


def test_crop_shifts_content_by_a_per_sample_offset():
    x = ramp()
    p = 2
    out = random_crop(x, p, torch.Generator().manual_seed(0))
    shifts = set()
    for i in range(len(out)):  # checking only: recover each sample's offset from a non-padded pixel
        inner = out[i, 0][out[i, 0] > 0]
        v = int(inner[0].item()) - 1
        r0, c0 = (out[i, 0] > 0).nonzero()[0].tolist()
        dy, dx = v // 10 - r0, v % 10 - c0  # shift = source coordinate - output coordinate
        assert -p <= dy <= p and -p <= dx <= p
        src = torch.nn.functional.pad(x[i, 0], (p, p, p, p))
        expected = src[p + dy : p + dy + 6, p + dx : p + dx + 5]
        assert torch.equal(out[i, 0], expected) and torch.equal(out[i, 1], expected)  # channels move together
        shifts.add((dy, dx))
    assert len(shifts) > 10  # offsets differ across samples (25 possible)
    assert (out == 0).any()  # zero padding came in


def test_flip_mask_is_per_sample():
    x = ramp(n=200)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # each sample is either wholly flipped or untouched
    assert 70 < flipped.sum().item() < 130


def test_determinism_with_seed():
    x = ramp()
    a = augment_batch(x, 2, True, torch.Generator().manual_seed(5))
    b = augment_batch(x, 2, True, torch.Generator().manual_seed(5))
    c = augment_batch(x, 2, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_errors():
    with pytest.raises(ConfigError, match="crop_padding must be an integer >= 0, got -1"):
        Augment.from_config({"crop_padding": -1})
    with pytest.raises(ConfigError, match=r"unknown keys \['vflip'\]"):
        Augment.from_config({"vflip": True})
    with pytest.raises(ConfigError, match=r"needs \(N, C, H, W\)"):
        augment_batch(torch.zeros(3, 4), 1, False)
