"""Range checks of config values, with the one-line ConfigError messages the rest of hashexp uses.

``name`` is the full key as the user writes it (``hashing.threshold``); ``nullable`` admits None
and says so in the message (``... or null``).
"""

from __future__ import annotations

import numbers
from typing import Any

from hashexp.errors import ConfigError


def _or_null(nullable: bool) -> str:
    return " or null" if nullable else ""


def check_cosine(name: str, value: Any, *, nullable: bool = False, note: str = "") -> float | None:
    """A cosine in [-1, 1]; ``note`` goes before ", got" (e.g. " for neuron_merging")."""
    if value is None and nullable:
        return None
    if value is None or not (-1.0 <= float(value) <= 1.0):
        raise ConfigError(f"{name} must be a cosine in [-1, 1]{_or_null(nullable)}{note}, got {value}")
    return float(value)


def check_fraction(name: str, value: Any, *, nullable: bool = False) -> float | None:
    """A share in (0, 1] (a target ratio: keep this much)."""
    if value is None and nullable:
        return None
    if value is None or not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1]{_or_null(nullable)}, got {value}")
    return float(value)


def check_bits(name: str, value: Any) -> int:
    """Bits of one SimHash code: an integer in 1..64 (codes are packed into one uint64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 64:
        raise ConfigError(f"{name} must be an integer in 1..64 (codes are uint64), got {value!r}")
    return int(value)


def check_at_least(name: str, value: Any, low: int = 1, *, nullable: bool = False) -> int | None:
    """An integer >= low (converted with int(), as the config gives it)."""
    if value is None and nullable:
        return None
    if value is None or int(value) < low:
        raise ConfigError(f"{name} must be >= {low}{_or_null(nullable)}, got {value}")
    return int(value)
