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

    from hashexp.compress import compress_model
    small, report = compress_model(model, data, method="simhash", keep=0.3)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from hashexp.data import BatchIterator, DataBundle
from hashexp.errors import ConfigError, HashexpError
from hashexp.merge.rehasher import Rehasher
from hashexp.metrics import accuracy, count_flops, count_params

METHODS = ("simhash", "mips", "neuron_merging", "magnitude", "random")


def make_compressor(method: str, keep: float | None, threshold: float | None = None, seed: int = 0,
                    compensation: str | None = None, max_error: float | None = None, **hash_kw):
    """A compressor for one-shot use: ``keep`` is the share of each site kept.

    ``simhash``/``mips``: ``keep`` and/or ``max_error`` (relative error budget per site) decide,
    ``threshold`` is the optional cosine pre-filter (``compensation=lsq``) or the member cosine
    (``weights``). Baselines need ``keep``; ``compensation`` None is each method's own default
    (lsq for simhash, the weight rule for the baselines).
    """
    from hashexp.merge.baselines import MagnitudePruner, NeuronMerging, RandomMerger
    from hashexp.merge.hashed import HashCompressor

    if method not in METHODS:
        raise ConfigError(f"method={method!r}; choose one of {', '.join(METHODS)}")
    comp = {} if compensation is None else {"compensation": compensation}
    if method in ("simhash", "mips"):
        if "scoring" in hash_kw:
            raise ConfigError(f"scoring is a knob of the baselines (magnitude, random, neuron_merging), not of {method}; "
                              "drop --scoring")
        if keep is None and threshold is None and max_error is None:
            raise ConfigError("give --keep (share of neurons kept), --max-error or --threshold")
        if comp.get("compensation", "lsq") != "lsq" and threshold is None:
            threshold = -1.0  # data-free without a threshold: the target decides, most similar first
        return HashCompressor(threshold=threshold, target_ratio=keep, seed=seed, max_error=max_error,
                              transform="mips" if method == "mips" else "auto", min_width=1, **comp, **hash_kw)
    if keep is None:
        raise ConfigError(f"method={method} needs --keep")
    if method == "neuron_merging":
        return NeuronMerging(target_ratio=keep, seed=seed, min_width=1,
                             **({} if threshold is None else {"threshold": threshold}), **comp, **hash_kw)
    cls = MagnitudePruner if method == "magnitude" else RandomMerger
    return cls(target_ratio=keep, seed=seed, min_width=1, **comp, **hash_kw)


def compress_model(model: nn.Module, data: DataBundle, method: str = "simhash", keep: float | None = 0.5,
                   threshold: float | None = None, calib_batches: int = 20, batch_size: int = 256,
                   finetune_epochs: float = 0.0, lr: float = 1e-3, seed: int = 0, compensation: str | None = None,
                   max_error: float | None = None, calib_samples: int | None = None,
                   **hash_kw) -> tuple[nn.Module, dict]:
    """Compress ``model`` in place in one shot; returns it with a report of widths, FLOPs, accuracy.

    ``calib_samples`` training samples (seeded by ``seed``; None: 1024 or the whole split) are
    the calibration set of the least-squares compensation and of the measured errors.
    """
    comp = make_compressor(method, keep, threshold, seed=seed, compensation=compensation, max_error=max_error,
                           **hash_kw)
    rehasher = Rehasher(comp, window=0, calib_samples=calib_samples, bn_recalib_batches=calib_batches)
    before = {"widths": dict(model.widths()), "flops": count_flops(model, data.input_shape),
              "params": count_params(model), "test_acc": accuracy(model, data.x_test, data.y_test)}
    rehasher.attach(model, data, seed, batch_size)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        it = BatchIterator(data.x_train, data.y_train, batch_size, shuffle=True, generator=gen)
        return (xb for _, (xb, _) in zip(range(calib_batches), it))

    rehasher.collect(model, batches())
    t0 = time.perf_counter()
    reports = rehasher.compress(model)
    hash_time = time.perf_counter() - t0
    rehasher.finish(model, batches())
    after_merge_acc = accuracy(model, data.x_test, data.y_test)
    if finetune_epochs > 0:
        from hashexp.train.finetune import finetune

        steps = int(finetune_epochs * len(BatchIterator(data.x_train, data.y_train, batch_size)))
        finetune(model, data, steps, torch.optim.Adam(model.parameters(), lr=lr), batch_size, gen)
    report = {
        "hashing": method, "keep": keep, "threshold": threshold, "finetune_epochs": finetune_epochs,
        "compensation": comp.compensation, "max_error": max_error,
        "before": before,
        "after": {"widths": dict(model.widths()), "flops": count_flops(model, data.input_shape),
                  "params": count_params(model), "test_acc_no_finetune": after_merge_acc,
                  "test_acc": accuracy(model, data.x_test, data.y_test)},
        "hash_time_s": hash_time, "sites": [r.to_dict() for r in reports], "majority_acc": data.majority_acc("test"),
    }
    return model, report


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
                                                            ("scoring", a.scoring)) if v is not None})
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
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parent.parent / "conf" / "dataset" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--dataset {name}: no conf/dataset/{name}.yaml")
    return OmegaConf.load(path)


if __name__ == "__main__":
    sys.exit(main())
