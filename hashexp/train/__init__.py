"""Training: the loop (loop.py), checkpoints (checkpoint.py), history.csv (history.py) and the
one-shot fine-tune loop (finetune.py).

``hashexp.train.Trainer`` is the ``_target_`` of conf/trainer/*.yaml.
"""

from hashexp.train.history import History
from hashexp.train.loop import Trainer, resolve_device

__all__ = ["History", "Trainer", "resolve_device"]
