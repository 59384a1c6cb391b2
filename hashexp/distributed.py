"""Data-parallel training with torchrun (placeholder filled by the DDP work: single process)."""

from __future__ import annotations


def from_env(cfg=None):
    """A process-group handle when launched by torchrun (WORLD_SIZE > 1), else None."""
    return None
