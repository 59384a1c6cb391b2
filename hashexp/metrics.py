"""FLOPs, parameters, accuracy, timers and memory: the numbers every results table is made of.

FLOPs are forward FLOPs per sample as counted by ``torch.utils.flop_counter.FlopCounterMode``
(a multiply-add counts 2, as in the analytic 2 * in * out of a Linear layer).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Scaled dot-product attention on the CPU: q k^T and the weighted values (torch counts the
    CUDA kernels only, so a CPU count would miss a ViT's attention matmuls)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


#: kernels FlopCounterMode has no formula for
_EXTRA_FLOPS = {getattr(torch.ops.aten, name): _sdpa_cpu_flops
                for name in ("_scaled_dot_product_flash_attention_for_cpu",) if hasattr(torch.ops.aten, name)}


def count_flops(model: nn.Module, input_shape, batch: int = 2) -> int:
    """Forward FLOPs per sample of ``model`` on inputs of per-sample shape ``input_shape`` (attention's
    q k^T and weighted values included, on the CPU too)."""
    p = next(model.parameters())
    x = torch.zeros((batch, *input_shape), dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as fc:
            model(x)
    finally:
        model.train(was_training)
    return int(fc.get_total_flops() // batch)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)`` in batches of ``batch_size``.

    Puts the model in eval mode and leaves it there (callers that keep training call ``train()``).
    """
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    if hasattr(x, "eval_batches"):  # images streamed from disk (hashexp.data.imagefolder): loader workers
        batches = x.eval_batches(y, batch_size)
    else:
        batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    for xb, yb in batches:
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
        n += len(yb)
    n = max(n, 1)
    return loss_sum / n, correct / n


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Test accuracy alone: ``evaluate(...)[1]``."""
    return evaluate(model, x, y, batch_size)[1]


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``."""
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
        """Seconds accumulated under ``name`` (0 if never timed)."""
        return self.totals.get(name, 0.0)


# ---------------------------------------------------------------------------- measured latency


def _latency_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, optimizer) -> None:
    if optimizer is None:  # forward only, as at inference
        with torch.no_grad():
            model(x)
        return
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _latency_setup(model: nn.Module, input_shape, batch_size: int, mode: str, seed: int):
    import copy

    if mode not in ("forward", "train"):
        raise ValueError(f"measure_latency: mode must be forward or train, got {mode!r}")
    if int(batch_size) < 1:
        raise ValueError(f"measure_latency: batch_size must be >= 1, got {batch_size}")
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((int(batch_size), *input_shape), generator=g).to(device=p.device, dtype=p.dtype)
    if mode == "forward":
        m = model
        m_was_training = m.training
        m.eval()
        return m, x, None, None, m_was_training
    m = copy.deepcopy(model)  # a training step changes the weights: never the caller's
    m.train()
    with torch.no_grad():
        n_out = m(x[:1]).shape[1]
    y = torch.randint(0, n_out, (int(batch_size),), generator=g).to(p.device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    return m, x, y, opt, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_latency(models: dict[str, nn.Module], input_shape, batch_size: int = 256, mode: str = "forward",
                    repeats: int = 20, warmup: int = 3, seed: int = 0) -> dict[str, dict[str, float]]:
    """Measured time of one forward pass (``mode="forward"``, eval mode, no grad) or one training
    step (``"train"``: forward, cross-entropy, backward, Adam step, on a copy of the model) of
    each model, side by side: the models take turns, one call each per round, so that a busy
    machine slows them alike.

    Args:
        models: name -> model (all take inputs of per-sample shape ``input_shape``).
        batch_size: samples per call.
        repeats: timed rounds (after ``warmup`` untimed ones).

    Returns:
        name -> ``{"median_ms", "min_ms", "p90_ms", "batch_size", "per_sample_us"}``.
    """
    import statistics

    setups = {k: _latency_setup(m, input_shape, batch_size, mode, seed) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        for r in range(int(warmup) + int(repeats)):
            for k, (m, x, y, opt, _) in setups.items():
                dev = x.device
                _sync(dev)
                t0 = time.perf_counter()
                _latency_step(m, x, y, opt)
                _sync(dev)
                if r >= warmup:
                    times[k].append(time.perf_counter() - t0)
    finally:
        for m, _, _, _, was_training in setups.values():
            if was_training is not None:
                m.train(was_training)
    out = {}
    for k, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        out[k] = {"median_ms": 1e3 * med, "min_ms": 1e3 * ts[0], "p90_ms": 1e3 * ts[int(0.9 * (len(ts) - 1))],
                  "batch_size": int(batch_size), "per_sample_us": 1e6 * med / int(batch_size)}
    return out


def measure_latency(model: nn.Module, input_shape, batch_size: int = 256, mode: str = "forward",
                    repeats: int = 20, warmup: int = 3, seed: int = 0) -> dict[str, float]:
    """Measured latency of one model: :func:`compare_latency` with a single contender.

    Speed claims compare models measured side by side; use :func:`compare_latency` for that.
    """
    return compare_latency({"model": model}, input_shape, batch_size, mode, repeats, warmup, seed)["model"]
