"""FLOPs, parameters, timers and memory: the numbers every results table is made of.

FLOPs are forward FLOPs per sample as counted by ``torch.utils.flop_counter.FlopCounterMode``
(a multiply-add counts 2, as in the analytic 2 * in * out of a Linear layer).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_shape, batch: int = 2) -> int:
    """Forward FLOPs per sample of ``model`` on inputs of per-sample shape ``input_shape``."""
    p = next(model.parameters())
    x = torch.zeros((batch, *input_shape), dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    return int(fc.get_total_flops() // batch)


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def peak_rss_mb() -> float:
    """Peak resident set size of this process (and finished children) in MiB."""
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(ru) / 1024.0  # Linux reports KiB
    except Exception:  # pragma: no cover - non-Unix
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20


class Stopwatch:
    """Accumulates wall time per named phase: ``with sw("hash"): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def get(self, name: str) -> float:
        return self.totals.get(name, 0.0)
