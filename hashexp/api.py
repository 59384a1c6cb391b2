"""What the Python API accepts: calibration data in any common form, and a model's sites.

``hashexp.compress_model(model, calib, ...)`` takes a plain ``nn.Module`` and calibration data as
a tensor of inputs, an ``(x, y)`` pair, a DataLoader or any iterable of batches (tensors or
``(x, y, ...)`` tuples), or a :class:`hashexp.data.DataBundle`. This module turns those into
tensors and finds the model's sites (declared by the model, or by tracing it), each mistake a
user can make ending in one :class:`hashexp.errors.ConfigError` or ``DataError`` that says how to
fix it.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hashexp.errors import ConfigError, DataError, HashexpError
from hashexp.merge.sites import MergeSite


@dataclass
class CalibData:
    """Calibration inputs ``x`` (N, ...) and, when the caller gave them, labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor | None = None

    @property
    def x_train(self) -> torch.Tensor:
        """The inputs, under the name a :class:`~hashexp.data.DataBundle` gives its training split
        (the Rehasher draws its calibration set from it)."""
        return self.x

    @property
    def y_train(self) -> torch.Tensor | None:
        """The labels, if any (a DataBundle's spelling)."""
        return self.y

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape."""
        return tuple(self.x.shape[1:])

    def batches(self, batch_size: int, limit: int | None = None) -> Iterable[torch.Tensor]:
        """Consecutive input batches of at most ``batch_size`` samples (at most ``limit`` of them)."""
        n = len(self.x)
        starts = range(0, n, batch_size)
        for k, i in enumerate(starts):
            if limit is not None and k >= limit:
                return
            yield self.x[i:i + batch_size]


def _as_tensor(v, what: str) -> torch.Tensor:
    if torch.is_tensor(v):
        return v
    try:
        import numpy as np

        if isinstance(v, np.ndarray):
            return torch.from_numpy(v)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise DataError(f"calibration {what} must be a tensor, got {type(v).__name__}; pass calib=x (a tensor of "
                    "inputs), an (x, y) pair, a DataLoader or an iterable of batches")


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("calibration batch is empty; each batch must be a tensor or an (x, y, ...) tuple")
        x = _as_tensor(batch[0], "inputs")
        y = _as_tensor(batch[1], "labels") if len(batch) > 1 and batch[1] is not None else None
        return x, y
    if isinstance(batch, dict):
        raise DataError("calibration batches are dicts; pass tensors or (x, y) tuples (e.g. map the loader "
                        "with a generator: ((b['image'], b['label']) for b in loader))")
    return _as_tensor(batch, "batch"), None


def calibration_data(calib, max_samples: int | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> CalibData:
    """Calibration data from a tensor, an ``(x, y)`` pair, a DataLoader or an iterable of batches.

    Batches are read until ``max_samples`` inputs are collected (None: all of them), then
    concatenated; inputs are cast to the model's float ``dtype`` and moved to its ``device``.
    """
    if calib is None:
        raise DataError("calib is None; pass calibration inputs: a tensor of a few hundred inputs, an (x, y) pair, "
                        "a DataLoader or an iterable of batches")
    if torch.is_tensor(calib) or _is_array(calib):
        x, y = _as_tensor(calib, "inputs"), None
    elif isinstance(calib, tuple) and len(calib) == 2 and all(torch.is_tensor(v) or _is_array(v) for v in calib) \
            and len(calib[0]) == len(calib[1]) and _as_tensor(calib[1], "labels").dim() == 1:
        x, y = _as_tensor(calib[0], "inputs"), _as_tensor(calib[1], "labels")
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes, dict)):
        xs, ys, n = [], [], 0
        for batch in calib:
            xb, yb = _split_batch(batch)
            xs.append(xb)
            ys.append(yb)
            n += len(xb)
            if max_samples is not None and n >= max_samples:
                break
        if not xs:
            raise DataError("the calibration iterable yielded no batches; pass a non-empty DataLoader or list")
        try:
            x = torch.cat(xs)
        except RuntimeError as e:
            raise DataError(f"calibration batches differ in shape and cannot be concatenated: {e}") from None
        y = torch.cat(ys) if all(v is not None for v in ys) else None
    else:
        raise DataError(f"calib of type {type(calib).__name__} is not calibration data; pass a tensor of inputs, "
                        "an (x, y) pair, a DataLoader or an iterable of batches")
    if x.dim() < 2 or len(x) == 0:
        raise DataError(f"calibration inputs must be a batch (N, ...) with N >= 1, got shape {tuple(x.shape)}")
    if max_samples is not None:
        x, y = x[:max_samples], (None if y is None else y[:max_samples])
    if x.is_floating_point() or dtype is not None:
        x = x.to(dtype=dtype or x.dtype)
    if device is not None:
        x, y = x.to(device), (None if y is None else y.to(device))
    return CalibData(x, y)


def _is_array(v) -> bool:
    return type(v).__module__ == "numpy" and type(v).__name__ == "ndarray"


@dataclass
class FoundSites:
    """The sites compress_model works on: ``sites`` (after ``ignore``), what tracing skipped, its time."""

    sites: list[MergeSite]
    skipped: list = field(default_factory=list)
    trace_s: float = 0.0
    declared: bool = False


def model_sites_for(model: nn.Module, example: torch.Tensor, ignore: Sequence[str] = ()) -> FoundSites:
    """The model's declared sites, or those found by tracing it on ``example``; ``ignore`` left out.

    Raises ConfigError for an ``ignore`` name that matches no site, a model whose forward fails
    while tracing (naming the failing line and the way out: declare the sites) and a model with no
    site left to merge (with every skipped site and why).
    """
    ignore = list(ignore or ())
    declared = getattr(model, "merge_sites", None)
    if callable(declared):
        sites = declared()
        _check_ignore(model, ignore, [s.name for s in sites])
        sites = [s for s in sites if s.name not in ignore]
        if not sites:
            raise ConfigError(f"{type(model).__name__} has no mergeable site left after ignore={ignore}; "
                              "nothing to compress")
        return FoundSites(sites, declared=True)
    from hashexp.merge.discovery import find_sites

    try:
        found = find_sites(model, example, ignore=ignore)
    except HashexpError as e:
        if e.__cause__ is None or isinstance(e.__cause__, HashexpError):
            raise  # the tracer's own refusal (e.g. an ignore name that matches nothing) says it all
        raise _untraceable(model, e.__cause__) from None
    except Exception as e:  # the model's own forward (or an op the tracer cannot run) failed
        raise _untraceable(model, e) from None
    if not found.sites:
        why = "; ".join(f"{s.name}: {s.reason}" for s in found.skipped) or "no Linear/Conv feeds another Linear/Conv"
        raise ConfigError(f"{type(model).__name__} has no mergeable site ({why}); nothing to compress. Declare "
                          "the sites with a merge_sites() method if the tracer refuses one wrongly")
    return FoundSites(list(found.sites), list(found.skipped), float(getattr(found, "trace_s", 0.0)))


def _untraceable(model: nn.Module, e: BaseException) -> ConfigError:
    return ConfigError(f"cannot trace {type(model).__name__}: {_failing_line(e)}: {type(e).__name__}: {e}. Fix the "
                       "forward or pass an example_input it accepts, or declare the sites: give the model a "
                       "merge_sites() method returning hashexp.merge.sites.MergeSite objects")


def _check_ignore(model: nn.Module, ignore: Sequence[str], names: Sequence[str]) -> None:
    unknown = [n for n in ignore if n not in names]
    if unknown:
        raise ConfigError(f"ignore names {unknown}, which match no site of {type(model).__name__}; "
                          f"its sites are {list(names)}")


def _failing_line(e: BaseException) -> str:
    """'file:line (code)' of the innermost frame outside torch and hashexp, else the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__))  # hashexp/ (this module's folder)
    skip = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, package + os.sep)
    user = [f for f in frames if not os.path.abspath(f.filename).startswith(skip)]
    f = (user or frames or [None])[-1]
    if f is None:
        return "in the model's forward"
    return f"at {f.filename}:{f.lineno} ({(f.line or '').strip()})"
