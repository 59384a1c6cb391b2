"""Export a (merged) model for deployment, checked against the runtime that will run it.

``python -m hashexp.export RUN_DIR [--format onnx|pt2] [--out PATH]`` writes the run's model.pt at
its merged widths, with a dynamic batch dimension, and runs the written file on a batch of the
run's own test data: ONNX through onnxruntime (CPU), ``pt2`` (a ``torch.export`` program,
``torch.export.load``-able without hashexp) through PyTorch. Its outputs must equal the PyTorch
model's within ``--atol`` (1e-4) at two batch sizes; a mismatch is an error
(:class:`hashexp.errors.ExportError`), never a warning.

Python (any ``nn.Module``; hashexp's models, traced torchvision/timm models alike)::

    from hashexp.export import export_model      # also: from hashexp import export_model
    report = export_model(model, example_input, "model.onnx")

The module is ``hashexp.export`` and the function ``export_model``: a function named ``export``
would shadow the module as an attribute of the ``hashexp`` package.
onnx, onnxruntime and onnxscript (torch's ONNX exporter) are the ``deploy`` extra:
``pip install -e ".[deploy]"`` (``make test`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hashexp.errors import ConfigError, ExportError, HashexpError

FORMATS = ("onnx", "pt2")
DEFAULT_ATOL = 1e-4


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how it was checked.

    Attributes:
        path: the written file.
        format: ``onnx`` or ``pt2``.
        bytes: its size.
        checked_batches: the batch sizes the file was run at (the dynamic batch dimension).
        max_abs_diff: the largest |runtime - PyTorch| over every output element checked.
        atol: the tolerance it had to stay within.
    """

    path: str
    format: str
    bytes: int
    checked_batches: list[int] = field(default_factory=list)
    max_abs_diff: float = 0.0
    atol: float = DEFAULT_ATOL

    def to_dict(self) -> dict:
        """A JSON-ready copy."""
        return asdict(self)


def export_model(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, format: str = "onnx",
                 check_input: torch.Tensor | None = None, atol: float = DEFAULT_ATOL) -> ExportReport:
    """Write ``model`` (in eval mode, on the CPU) to ``path`` with a dynamic batch size, then check it.

    Args:
        model: any ``nn.Module`` taking one tensor; it is copied, never changed.
        example_input: one input batch, ``(N, ...)``; only its shape and dtype shape the export.
        path: the file to write (``.onnx`` or ``.pt2`` by convention).
        format: ``onnx`` (checked with onnxruntime) or ``pt2`` (``torch.export``, checked by loading it).
        check_input: the batch the file is checked on (e.g. the run's test data); default
            ``example_input``. The file runs on it and on its first half (another batch size).
        atol: largest allowed absolute difference between the runtime's outputs and PyTorch's.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ConfigError: unknown format, a bad input.
        ExportError: the exporter failed, or the written file's outputs differ from PyTorch's.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not supported; choose one of {', '.join(FORMATS)}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 1 or example_input.shape[0] < 1:
        raise ConfigError("example_input must be a tensor batch of shape (N, ...) with N >= 1")
    net = copy.deepcopy(model).cpu().eval()
    x = example_input.detach().cpu()
    if x.shape[0] == 1:  # a batch of one would be specialized to a fixed size by torch.export
        x = x.repeat(2, *([1] * (x.ndim - 1)))
    check = (check_input if check_input is not None else example_input).detach().cpu()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    batch = torch.export.Dim("batch")
    try:
        with torch.no_grad(), _quiet():
            if format == "onnx":
                torch.onnx.export(net, (x,), path, dynamo=True, dynamic_shapes=({0: batch},),
                                  input_names=["input"], output_names=None, verbose=False)
            else:
                torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), path)
    except HashexpError:
        raise
    except ImportError as e:
        raise ConfigError(f"ONNX export needs onnx and onnxscript ({e}); install them with "
                          "pip install -e \".[deploy]\"") from None
    except Exception as e:
        raise ExportError(f"exporting {type(model).__name__} to {format} failed: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    run = _onnx_runner(path) if format == "onnx" else _pt2_runner(path)
    report = ExportReport(path=path, format=format, bytes=os.path.getsize(path), atol=float(atol))
    for xb in _check_batches(check):
        with torch.no_grad():
            want = _flat_outputs(net(xb))
        got = run(xb)
        if len(got) != len(want):
            raise ExportError(f"{path}: the {format} file returns {len(got)} outputs, PyTorch {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            if tuple(g.shape) != tuple(w.shape):
                raise ExportError(f"{path}: output {i} has shape {tuple(g.shape)} at batch {len(xb)}, "
                                  f"PyTorch's {tuple(w.shape)}")
            diff = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
            report.max_abs_diff = max(report.max_abs_diff, diff)
            if not diff <= atol:  # also catches NaN
                raise ExportError(f"{path}: {format} output {i} differs from PyTorch's by {diff:.3g} at batch "
                                  f"{len(xb)} (allowed {atol:g}); the file is not a faithful export")
        report.checked_batches.append(int(len(xb)))
    return report


def _check_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """The check batch and its first half: two batch sizes exercise the dynamic dimension."""
    return [x] if len(x) < 2 else [x, x[: len(x) // 2]]


def _flat_outputs(out) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors (a tensor, a tuple/list or a dict of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_outputs(v)]
    raise ExportError(f"cannot check a model output of type {type(out).__name__}; return tensors")


def _onnx_runner(path: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("checking an ONNX export needs onnxruntime; pip install -e \".[deploy]\"") from None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda xb: [torch.from_numpy(o) for o in sess.run(None, {name: xb.numpy()})]


def _pt2_runner(path: str):
    prog = torch.export.load(path).module()

    def run(xb: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _flat_outputs(prog(xb))

    return run


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints (stdout) and its warnings; errors still raise."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def check_inputs_of_run(cfg, n: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` test inputs of the dataset a run was trained on (its composed config)."""
    from hashexp.data import build_dataset

    if cfg is None or "dataset" not in cfg:
        raise ConfigError("the run has no .hydra/config.yaml with a dataset; pass --dataset NAME")
    data = build_dataset(cfg.dataset, seed=int(cfg.get("seed", seed) or seed))
    if len(data.x_test) == 0:
        raise ConfigError(f"dataset {data.name} has an empty test split; nothing to check the export on")
    return data.x_test[:n]


def main(argv: list[str] | None = None) -> int:
    """``python -m hashexp.export``: export a run's model.pt and check it; exit 2 on any user error."""
    p = argparse.ArgumentParser(prog="python -m hashexp.export", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished run dir (with model.pt and .hydra/) or a model.pt")
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="onnx (checked with onnxruntime) or pt2 (a torch.export program)")
    p.add_argument("--out", default=None, help="the file to write (default: <run>/model.<format>)")
    p.add_argument("--batch", type=int, default=256, help="test samples the file is checked on (default 256)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="allowed |runtime - PyTorch| (default 1e-4)")
    p.add_argument("--dataset", default=None, help="dataset config name when the run has no .hydra/")
    a = p.parse_args(argv)
    try:
        from hashexp.compress import _dataset_cfg, load_run

        if a.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {a.batch}")
        model, cfg = load_run(a.run)
        if a.dataset is not None:
            from omegaconf import OmegaConf

            cfg = OmegaConf.create({"dataset": _dataset_cfg(a.dataset), "seed": 0})
        x = check_inputs_of_run(cfg, a.batch)
        run_dir = a.run if os.path.isdir(a.run) else os.path.dirname(os.path.abspath(a.run))
        out = a.out or os.path.join(run_dir, f"model.{a.format}")
        report = export_model(model, x[:2], out, format=a.format, check_input=x, atol=a.atol)
    except HashexpError as e:
        print(f"hashexp.export: error: {e}", file=sys.stderr)
        return 2
    widths = dict(model.widths()) if hasattr(model, "widths") else {}
    print(f"wrote {report.path} ({report.format}, {report.bytes / 1e6:.2f} MB, widths {widths}, dynamic batch); "
          f"checked at batch {report.checked_batches}: max |diff| {report.max_abs_diff:.2e} <= {report.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
