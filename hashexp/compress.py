"""One-shot compression of a trained model: ``python -m hashexp.compress RUN_DIR --keep 0.5``.

Loads a run's model.pt (and, from its .hydra/config.yaml, the dataset it was trained on),
collects activation statistics on a few training batches, draws the calibration set, merges (or
prunes) every site to the requested share of its neurons (or within an error budget), optionally
fine-tunes, evaluates, and writes the compressed model.pt and a JSON report.

The default is the best method measured in benchmarks/bench_oneshot.md: ``simhash`` with
least-squares compensation (LSH on calibration activations proposes, measured error orders the
removals, the consumers are refit). ``neuron_merging`` is Kim et al. 2020 (data-free),
``magnitude`` and ``random`` the classic baselines; ``--compensation lsq`` refits their
consumers too.

Python::

    from hashexp import compress_model
    small, report = compress_model(model, calib_x, keep=0.5)        # any nn.Module, a tensor of inputs
    small, report = compress_model(model, data, hashing="simhash", keep=0.3)   # a DataBundle
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hashexp.data import BatchIterator, DataBundle
from hashexp.errors import ConfigError, HashexpError
from hashexp.merge.rehasher import REHASHER_KNOBS, Rehasher
from hashexp.merge.sites import model_widths
from hashexp.metrics import accuracy, count_flops, count_params

METHODS = ("simhash", "mips", "neuron_merging", "magnitude", "random")


def make_compressor(method: str, keep: float | None, threshold: float | None = None, seed: int = 0,
                    compensation: str | None = None, max_error: float | None = None, **hash_kw):
    """A compressor for one-shot use: ``keep`` is the share of each site kept.

    Its defaults are those of a training run's ``hashing=<method>`` (``conf/hashing/<method>.yaml``,
    read by :func:`~hashexp.utils.conf.group_option`); the Rehasher's own keys (window, calibration
    samples, BatchNorm batches, pull) are left to :func:`compress_model`. The arguments override:
    ``keep`` is ``target_ratio``, ``max_error`` the relative error budget per site (``simhash``/
    ``mips``; None: ``keep`` alone decides), ``threshold`` the optional cosine pre-filter
    (``compensation=lsq``), the member cosine (``weights``) or Neuron Merging's t, and ``hash_kw``
    any other key of the YAML. Baselines need ``keep``.
    """
    from hydra.utils import get_class

    from hashexp.utils.conf import group_option

    if method not in METHODS:
        raise ConfigError(f"method={method!r}; choose one of {', '.join(METHODS)}")
    node = {k: v for k, v in group_option("hashing", method).items() if k not in (*REHASHER_KNOBS, "name")}
    cls = get_class(node.pop("_target_"))
    node.update(seed=seed, target_ratio=keep)
    if compensation is not None:
        node["compensation"] = compensation
    if method in ("simhash", "mips"):
        if "scoring" in hash_kw:
            raise ConfigError(f"scoring is a knob of the baselines (magnitude, random, neuron_merging), not of {method}; "
                              "drop --scoring")
        if keep is None and threshold is None and max_error is None:
            raise ConfigError("give --keep (share of neurons kept), --max-error or --threshold")
        if node["compensation"] != "lsq" and threshold is None:
            threshold = -1.0  # data-free without a threshold: the target decides, most similar first
        node.update(max_error=max_error, threshold=threshold)
    elif keep is None:
        raise ConfigError(f"method={method} needs --keep")
    elif threshold is not None:
        if "threshold" not in node:
            raise ConfigError(f"method={method} has no threshold; drop --threshold")
        node["threshold"] = threshold
    unknown = sorted(set(hash_kw) - set(node))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not keys of conf/hashing/{method}.yaml; choose among "
                          f"{', '.join(sorted(node))}")
    return cls(**{**node, **hash_kw})


_DEFAULT_KEEP = object()


def compress_model(model: nn.Module, calib, hashing: str = "simhash", keep: float | None = _DEFAULT_KEEP,  # type: ignore[assignment]
                   threshold: float | None = None, calib_batches: int = 20, batch_size: int = 256,
                   finetune_epochs: float = 0.0, lr: float = 1e-3, seed: int = 0, compensation: str | None = None,
                   max_error: float | None = None, calib_samples: int | None = None, *, method: str | None = None,
                   example_input: torch.Tensor | None = None, ignore: Sequence[str] = (), inplace: bool = False,
                   test: tuple[torch.Tensor, torch.Tensor] | None = None, **hash_kw) -> tuple[nn.Module, dict]:
    """Compress ``model`` in one shot; returns the compressed model and a report.

    Args:
        model: any ``nn.Module``: its sites are declared (``merge_sites()``) or found by tracing.
        calib: calibration data: a tensor of inputs, an ``(x, y)`` pair, a DataLoader, an iterable
            of batches, or a :class:`~hashexp.data.DataBundle` (its training split; its test split
            gives the report's accuracy).
        hashing: ``simhash`` (default), ``mips``, ``neuron_merging``, ``magnitude`` or ``random``
            (``method`` is an alias).
        keep: share of each site's neurons kept (default 0.5 unless ``max_error`` or ``threshold``
            is given).
        max_error: per-site budget on the consumers' relative pre-activation error.
        calib_samples: calibration samples used (None: 1024, or all of a smaller ``calib``).
        example_input: the input traced to find the sites (None: the first two calibration inputs).
        ignore: site names left at full width.
        inplace: compress ``model`` itself; by default a deep copy is compressed and ``model``
            stays unchanged.
        test: an ``(x, y)`` pair whose accuracy the report gives before and after (default: a
            DataBundle's test split, or the calibration labels when given); ``()`` skips it.

    The report holds widths, FLOPs per sample, parameters (and accuracy) before and after, the
    per-site results, the sites tracing skipped with why, and the time spent.
    """
    from hashexp.api import model_sites_for

    hashing = method or hashing
    if keep is _DEFAULT_KEEP:
        keep = None if (max_error is not None or threshold is not None) else 0.5
    comp = make_compressor(hashing, keep, threshold, seed=seed, compensation=compensation, max_error=max_error,
                           **hash_kw)
    p = next(model.parameters(), None)
    if p is None:
        raise ConfigError(f"{type(model).__name__} has no parameters; nothing to compress")
    gen = torch.Generator().manual_seed(seed)
    data, n_calib, test, batches = _calibration_source(calib, test, p, gen, calib_samples, calib_batches, batch_size)
    test = test or None  # () skips the accuracy
    input_shape = tuple(data.x_train.shape[1:])
    if not inplace:
        model = copy.deepcopy(model)
    example = example_input if example_input is not None else data.x_train[:2]
    found = model_sites_for(model, example, ignore)
    comp.sites = [s.name for s in found.sites]
    _check_rules(comp, found.sites)
    before = _measure(model, input_shape, test)
    rehasher = Rehasher(comp, window=0, calib_samples=n_calib, bn_recalib_batches=calib_batches)
    rehasher.attach(model, data, seed, batch_size)
    rehasher.collect(model, batches())
    t0 = time.perf_counter()
    reports = rehasher.compress(model)
    hash_time = time.perf_counter() - t0
    rehasher.finish(model, batches())
    after = _measure(model, input_shape, test)
    if finetune_epochs > 0:
        if not isinstance(data, DataBundle):
            raise ConfigError("finetune_epochs > 0 needs a DataBundle (calib=data); fine-tune a plain model with "
                              "hashexp.train.finetune")
        from hashexp.train.finetune import finetune

        steps = int(finetune_epochs * len(BatchIterator(data.x_train, data.y_train, batch_size)))
        finetune(model, data, steps, torch.optim.Adam(model.parameters(), lr=lr), batch_size, gen)
    model.eval()
    if test is not None:
        after["test_acc_no_finetune"] = after.pop("test_acc")
        after["test_acc"] = accuracy(model, *test)
    report = {
        "hashing": hashing, "keep": keep, "threshold": threshold, "finetune_epochs": finetune_epochs,
        "compensation": comp.compensation, "max_error": max_error, "before": before, "after": after,
        "hash_time_s": hash_time, "trace_s": found.trace_s, "sites": [r.to_dict() for r in reports],
        "skipped": [_skipped_dict(s) for s in found.skipped],
    }
    if isinstance(data, DataBundle):
        report["majority_acc"] = data.majority_acc("test")
    return model, report


def _calibration_source(calib, test, p: torch.Tensor, gen: torch.Generator, calib_samples: int | None,
                        calib_batches: int, batch_size: int):
    """``(data, n_calib, test, batches)`` of one-shot's ``calib`` argument.

    ``data`` is the DataBundle given or the :func:`~hashexp.api.calibration_data` of anything else
    (on ``p``'s device and dtype); ``test`` defaults to its test split or labelled inputs; ``batches()``
    yields the ``calib_batches`` input batches that collect the statistics and re-estimate BatchNorm.
    """
    from hashexp.api import calibration_data
    from hashexp.merge.calibration import DEFAULT_SAMPLES

    if isinstance(calib, DataBundle):
        data, n_calib = calib, calib_samples
        test = (data.x_test, data.y_test) if test is None else test

        def batches():
            it = BatchIterator(data.x_train, data.y_train, batch_size, shuffle=True, generator=gen)
            return (xb for _, (xb, _) in zip(range(calib_batches), it))
    else:
        data = calibration_data(calib, max_samples=calib_samples or DEFAULT_SAMPLES, dtype=p.dtype, device=p.device)
        n_calib = len(data.x)
        if test is None and data.y is not None:
            test = (data.x, data.y)

        def batches():
            return data.batches(batch_size, calib_batches)
    return data, n_calib, test, batches


def _check_rules(comp, sites) -> None:
    """The data-free weight rule and the mean representative need positively homogeneous sites."""
    rule = "compensation=weights" if comp.compensation == "weights" else (
        "representative=mean" if getattr(comp, "representative", None) == "mean" else None)
    if rule is None:
        return
    bad = [f"{s.name} ({s.activation})" for s in sites if not s.homogeneous]
    if bad:
        raise ConfigError(f"{rule} needs ReLU-like (positively homogeneous) sites, but {', '.join(bad)} are not; "
                          "use compensation=lsq with representative=keep, or ignore=[...] those sites")


def _measure(model: nn.Module, input_shape, test) -> dict:
    out = {"widths": model_widths(model), "flops": count_flops(model, input_shape), "params": count_params(model)}
    if test is not None:
        out["test_acc"] = accuracy(model, *test)
    return out


def _skipped_dict(s) -> dict:
    return {k: getattr(s, k) for k in ("name", "kind", "width", "reason") if hasattr(s, k)}


def load_run(path: str) -> tuple[nn.Module, Any]:
    """model.pt and the run's composed config (for its dataset) from a run dir or a model.pt path."""
    from omegaconf import OmegaConf

    from hashexp.errors import DataError
    from hashexp.models import load_model

    model_pt = os.path.join(path, "model.pt") if os.path.isdir(path) else path
    run_dir = os.path.dirname(os.path.abspath(model_pt))
    cfg_path = os.path.join(run_dir, ".hydra", "config.yaml")
    cfg = OmegaConf.load(cfg_path) if os.path.isfile(cfg_path) else None
    if not os.path.isfile(model_pt):
        raise DataError(f"{model_pt} not found; pass a finished run dir or its model.pt")
    return load_model(model_pt), cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hashexp.compress``; the exit code (2 on a user error)."""
    p = argparse.ArgumentParser(prog="python -m hashexp.compress", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished run dir (with model.pt and .hydra/) or a model.pt")
    p.add_argument("--hashing", "--method", dest="hashing", default="simhash", choices=METHODS,
                   help="the hashing config to compress with (as `hashing=` of a training run; --method is an alias)")
    p.add_argument("--keep", type=float, default=None, help="share of each site's neurons kept, e.g. 0.3")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine pre-filter of candidate pairs (lsq), member cosine (weights), or neuron_merging's t")
    p.add_argument("--compensation", default=None, choices=("lsq", "weights", "none"),
                   help="how consumers absorb the merge (default: lsq for simhash, the weight rule for baselines)")
    p.add_argument("--max-error", type=float, default=None,
                   help="simhash: per-site budget on the consumers' relative pre-activation error")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples (default 1024)")
    p.add_argument("--order", default=None, choices=("exact", "restricted", "auto"),
                   help="simhash: removal order (exact OBS, OBS inside LSH buckets, or auto by width)")
    p.add_argument("--budget", default=None, choices=("site", "global"),
                   help="simhash: site (keep --keep of every site) or global (keep --keep of the sites' FLOPs, "
                        "and one error budget across sites)")
    p.add_argument("--scoring", default=None, choices=("original", "sequential"),
                   help="baselines: score every site on the network before compression (original, the papers' "
                        "default) or each site after its upstream sites were cut (sequential)")
    p.add_argument("--bn-rule", default=None, choices=("paper", "code", "folded"),
                   help="neuron_merging on conv+BN sites: the paper's Conv-BN rule (default), the authors' code's "
                        "terms, or the plain rule on BN-folded rows")
    p.add_argument("--finetune-epochs", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default=None, help="dataset config name when the run has no .hydra/ (e.g. fashion_mnist)")
    p.add_argument("--out", default=None, help="output dir (default: <run>/compressed_<hashing>_<keep>)")
    a = p.parse_args(argv)
    try:
        from hashexp.data import build_dataset

        model, cfg = load_run(a.run)
        if a.dataset is None and cfg is None:
            raise ConfigError(f"{a.run} has no .hydra/config.yaml; pass --dataset NAME")
        ds_cfg = cfg.dataset if a.dataset is None else _dataset_cfg(a.dataset)
        data = build_dataset(ds_cfg, seed=a.seed)
        model, report = compress_model(model, data, a.hashing, a.keep, a.threshold, a.calib_batches,
                                       finetune_epochs=a.finetune_epochs, lr=a.lr, seed=a.seed,
                                       compensation=a.compensation, max_error=a.max_error,
                                       calib_samples=a.calib_samples,
                                       **{k: v for k, v in (("order", a.order), ("budget", a.budget),
                                                            ("scoring", a.scoring), ("bn_rule", a.bn_rule))
                                          if v is not None})
        out = a.out or os.path.join(a.run if os.path.isdir(a.run) else os.path.dirname(a.run),
                                    f"compressed_{a.hashing}_{a.keep if a.keep is not None else a.max_error}")
        os.makedirs(out, exist_ok=True)
        from hashexp.utils.io import write_json_atomic
        from hashexp.models import save_model

        save_model(model, os.path.join(out, "model.pt"))
        write_json_atomic(os.path.join(out, "compress.json"), report)
    except HashexpError as e:
        print(f"hashexp.compress: error: {e}", file=sys.stderr)
        return 2
    b, f = report["before"], report["after"]
    print(f"{a.hashing} keep={a.keep} threshold={a.threshold}: widths {b['widths']} -> {f['widths']}, "
          f"FLOPs {b['flops']} -> {f['flops']} ({b['flops'] / max(f['flops'], 1):.2f}x), "
          f"test acc {b['test_acc']:.4f} -> {f['test_acc']:.4f} (majority {report['majority_acc']:.4f}); wrote {out}")
    return 0


def _dataset_cfg(name: str):
    """``conf/dataset/<name>.yaml`` (unresolved: its ``seed: null`` and interpolations stay for the loader)."""
    from omegaconf import OmegaConf

    from hashexp.utils.conf import group_option

    return OmegaConf.create(group_option("dataset", name, resolve=False))


if __name__ == "__main__":
    sys.exit(main())
