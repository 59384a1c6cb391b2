"""Fine-tuning: a fixed number of optimizer steps over shuffled epochs of the training split.

One loop for what one-shot compression (hashexp.compress) and the benchmarks fine-tune after a
merge; training proper (with rehashes, history and checkpoints) is the Trainer's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hashexp.data import BatchIterator, DataBundle


def finetune(model: nn.Module, data: DataBundle, steps: int, optimizer: torch.optim.Optimizer, batch_size: int,
             generator: torch.Generator, augment: Callable | None = None, aug_generator: torch.Generator | None = None,
             lr_schedule=None) -> None:
    """Train ``model`` (left in train mode) for ``steps`` optimizer steps on cross-entropy.

    Batches are drawn by ``generator`` epoch after epoch; ``augment(xb, aug_generator)`` transforms
    each batch when given; ``lr_schedule`` (if any) steps after every optimizer step.
    """
    model.train()
    done = 0
    while done < steps:
        for xb, yb in BatchIterator(data.x_train, data.y_train, batch_size, shuffle=True, generator=generator):
            if augment is not None:
                xb = augment(xb, aug_generator)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            if lr_schedule is not None:
                lr_schedule.step()
            done += 1
            if done >= steps:
                return
