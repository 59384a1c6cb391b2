"""hashexp.utils: seed derivation equal to the formulas it replaced, range checks, atomic writes."""

import json
import os

import pytest
import torch

from hashexp.errors import ConfigError
from hashexp.utils.checks import check_at_least, check_cosine, check_fraction
from hashexp.utils.io import atomic_write, torch_save_atomic, write_json_atomic
from hashexp.utils.seeding import EVENT_MIX, SEED_MIX, SITE_MIX, VERSION_MIX, derive_seed

SEEDS = [0, 1, 7, 12345, 2**31 - 1, 2**40 + 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("a", [0, 1, 5, 63])
@pytest.mark.parametrize("b", [0, 2, 17, 1000])
def test_derive_seed_equals_the_inline_formulas_it_replaced(seed, a, b):
    # schedule.DriftSchedule reference hashes, merge.learned hashers
    assert derive_seed(seed, a, b, scale=SEED_MIX, weights=(EVENT_MIX, VERSION_MIX), modulus=2**62) == \
        (seed * 1_000_003 + a * 7919 + b * 104_729) % (2**62)
    # schedule.DriftSchedule partner sample (a = step, b = site index)
    assert derive_seed(seed, a, b, scale=SEED_MIX, weights=(31, 1), modulus=2**62) == \
        (seed * 1_000_003 + a * 31 + b) % (2**62)
    # compressor: per-site calibration capture seed
    assert derive_seed(seed, a, scale=SITE_MIX, weights=(1,)) == seed * 1009 + a
    # compressor: random merger generator (a = calls, b = index)
    assert derive_seed(seed, a, b, scale=SEED_MIX, weights=(SITE_MIX, 1), modulus=2**63) == \
        (seed * 1_000_003 + a * 1009 + b) % (2**63)
    # compressor: candidate index of round b
    assert derive_seed(a, b, weights=(EVENT_MIX,)) == a + 7919 * b
    # calibration: sample draw, and per-consumer position generators
    assert derive_seed(seed, scale=2_654_435_761, offset=97, modulus=2**63) == (seed * 2_654_435_761 + 97) % (2**63)
    assert derive_seed(seed, a, b, scale=EVENT_MIX, weights=(31, 1)) == seed * 7919 + 31 * a + b
    # trainer: BatchNorm re-estimation batches after rehash a
    assert derive_seed(seed, a + 1, weights=(EVENT_MIX,)) == seed + 7919 * (a + 1)


def test_derive_seed_needs_one_weight_per_part():
    with pytest.raises(ValueError, match="2 parts but 1 weights"):
        derive_seed(0, 1, 2, weights=(3,))


def test_checks_keep_the_messages():
    assert check_cosine("hashing.threshold", 0.5) == 0.5
    assert check_cosine("hashing.threshold", None, nullable=True) is None
    with pytest.raises(ConfigError, match=r"^hashing.threshold must be a cosine in \[-1, 1\] or null, got 1.5$"):
        check_cosine("hashing.threshold", 1.5, nullable=True)
    with pytest.raises(ConfigError, match=r"^hashing.threshold must be a cosine in \[-1, 1\] for neuron_merging, got None$"):
        check_cosine("hashing.threshold", None, note=" for neuron_merging")
    assert check_fraction("schedule.final_ratio", 1) == 1.0
    with pytest.raises(ConfigError, match=r"^schedule.final_ratio must be in \(0, 1\], got 0$"):
        check_fraction("schedule.final_ratio", 0)
    with pytest.raises(ConfigError, match=r"^x.target_ratio must be in \(0, 1\] or null, got 2$"):
        check_fraction("x.target_ratio", 2, nullable=True)
    assert check_at_least("hashing.auto_width", "3", 1) == 3
    with pytest.raises(ConfigError, match=r"^hashing.calib_samples must be >= 1 or null, got 0$"):
        check_at_least("hashing.calib_samples", 0, 1, nullable=True)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "m.json"
    write_json_atomic(p, {"b": torch.tensor([1, 2]), "a": 1})
    assert json.loads(p.read_text()) == {"a": 1, "b": [1, 2]}
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert json.loads(p.read_text()) == {"a": 1, "b": [1, 2]}  # untouched
    assert os.path.exists(str(p) + ".tmp")  # what a kill leaves; the next write replaces it
    write_json_atomic(p, [])
    assert json.loads(p.read_text()) == [] and not os.path.exists(str(p) + ".tmp")
    torch_save_atomic({"w": torch.ones(3)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.ones(3))
