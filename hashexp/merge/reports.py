"""What a rehash did: one :class:`SiteReport` per site, one :class:`RehashEvent` per rehash
(metrics.json ``rehash_events``, checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# optional fields, present in the JSON only when set (the centripetal pull's), in this order
_OPTIONAL = ("merge_only", "pull_distance", "proposed", "proposed_width")


@dataclass
class SiteReport:
    """What one rehash did to one site: its width before and after, the step, and the measured
    relative error of its consumers' pre-activation on the calibration set (0 without one).

    Indexable like the dicts of older checkpoints (``report["site"]``)."""

    site: str
    before: int
    after: int
    step: int
    error: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.__dataclass_fields__

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict (checkpoints, compress.json)."""
        return asdict(self)


@dataclass
class RehashEvent:
    """One rehash: when, the widths before and after, its cost, the sites it merged and their errors.

    Args:
        step, epoch: the trainer's position when it ran.
        before, after: ``{site: width}`` around it.
        time_s: seconds spent (hashing, calibration, surgery, BN recalibration).
        sites: the sites the compressor merged.
        reports: the compressor's per-site report dicts (checkpointed, not in metrics.json).
        error: ``{site: measured relative error}`` of the merged sites.
        merge_only: with the pull: True when this rehash only merged pulls that were due.
        pull_distance: with the pull: ``{site: member-to-representative distance}`` at the merge.
        proposed, proposed_width: with the pull: the sites whose groups were proposed (pulled
            from now on) and the width each proposal keeps.
    """

    step: int
    epoch: int = 0
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    time_s: float = 0.0
    sites: list[str] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)  # SiteReport (or its dict, from a checkpoint)
    error: dict[str, float] = field(default_factory=dict)
    merge_only: bool | None = None
    pull_distance: dict[str, float | None] | None = None
    proposed: list[str] | None = None
    proposed_width: dict[str, int] | None = None

    def to_dict(self, reports: bool = True) -> dict[str, Any]:
        """The event as a plain dict (the keys of older checkpoints; ``reports=False``: metrics.json's)."""
        d: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "before": self.before, "after": self.after,
                             "time_s": self.time_s, "sites": self.sites}
        if reports:  # SiteReports as plain dicts (checkpoints load with weights_only)
            d["reports"] = [r.to_dict() if hasattr(r, "to_dict") else r for r in self.reports]
        d["error"] = self.error
        d.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        return plain(d)

    def to_json(self) -> dict[str, Any]:
        """metrics.json's ``rehash_events`` entry: every field but the reports."""
        return self.to_dict(reports=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RehashEvent:
        """An event from :meth:`to_dict` (a checkpoint's ``rehash_log``)."""
        reports = [SiteReport(**r) if isinstance(r, dict) else r for r in d.get("reports", [])]
        return cls(**{**d, "reports": reports})


def plain(obj):
    """Turn tensors/numpy scalars into plain Python for JSON and weights-only checkpoints."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except Exception:
            return obj
    return obj
