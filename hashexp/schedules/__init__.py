"""When to rehash which site: one module per policy, their shared types in :mod:`.base`.

* :class:`FixedSchedule` (fixed.py): every site on one clock.
* :class:`PerLayerSchedule` (per_layer.py): each site on its own clock, with its own threshold
  and target.
* :class:`DriftSchedule` (drift.py): a site is rehashed when its SimHash bits have drifted or
  enough of its neurons have a mergeable partner, measured cheaply every few steps.
* :class:`GradualSchedule` (gradual.py): every site's target width ramps from its full width to
  a final one between a start and an end step (Zhu & Gupta 2017).

conf/schedule/*.yaml name these classes by their module (``hashexp.schedules.fixed.FixedSchedule``).
"""

from hashexp.schedules.base import RehashContext, RehashDecision, Schedule
from hashexp.schedules.drift import DriftSchedule
from hashexp.schedules.fixed import FixedSchedule
from hashexp.schedules.gradual import GradualSchedule
from hashexp.schedules.per_layer import PerLayerSchedule

__all__ = ["DriftSchedule", "FixedSchedule", "GradualSchedule", "PerLayerSchedule", "RehashContext",
           "RehashDecision", "Schedule"]
