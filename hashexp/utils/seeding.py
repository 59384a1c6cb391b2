"""Seeds: the global RNGs of a run, and the seeds of its independent sub-streams.

Every sub-stream (a site's SimHash projections, a rehash's random merge, the calibration
draw, BatchNorm re-estimation batches) derives its seed from the run seed with
:func:`derive_seed`, a fixed linear mix whose constants (primes) each caller keeps, so the
integers, and hence the runs, stay what they were when each formula was written inline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

# Multipliers of the linear seed mixes, named by the part they scale (primes, so that distinct
# parts rarely land on one seed). Their values are fixed: changing one changes every run.
#: scales the run seed in mixes of several parts
SEED_MIX = 1_000_003
#: scales the run seed against a site index (``seed * SITE_MIX + site``) and a rehash count
SITE_MIX = 1009
#: scales an event: a rehash count, a round of merging, a site among several parts
EVENT_MIX = 7919
#: scales a version: a hasher re-created after its fan-in changed
VERSION_MIX = 104_729


def derive_seed(seed: int, *parts: int, scale: int = 1, weights: Sequence[int] = (), offset: int = 0,
                modulus: int | None = None) -> int:
    """``(seed * scale + sum(part * weight) + offset) % modulus`` (no reduction when modulus is None).

    Args:
        seed: the base seed (usually the run seed).
        parts: what tells the sub-streams apart (site index, rehash count, step, ...).
        scale: multiplier of ``seed``.
        weights: one multiplier per part.
        offset: added last.
        modulus: reduce into [0, modulus) (Python's ``%``), e.g. 2**62 or 2**63 for torch generators.
    """
    if len(weights) != len(parts):
        raise ValueError(f"derive_seed: {len(parts)} parts but {len(weights)} weights")
    s = int(seed) * int(scale) + sum(int(p) * int(w) for p, w in zip(parts, weights)) + int(offset)
    return s % int(modulus) if modulus is not None else s


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
