"""Training: the loop (loop.py), checkpoints (checkpoint.py), history.csv (history.py) and the
typed records the loop keeps (records.py).

``hashexp.train.Trainer`` is the ``_target_`` of conf/trainer/*.yaml.
"""

from hashexp.merge.stats import ActivationStats
from hashexp.train.history import History
from hashexp.train.loop import Trainer, resolve_device
from hashexp.train.records import RehashEvent

__all__ = ["ActivationStats", "History", "RehashEvent", "Trainer", "resolve_device"]
