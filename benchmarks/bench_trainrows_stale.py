"""Does it matter that training-row calibration plans a downstream site on stale rows?

    nice -n 10 .venv/bin/python benchmarks/bench_trainrows_stale.py --seeds 0 1 2      # the headline MLP
    nice -n 10 .venv/bin/python benchmarks/bench_trainrows_stale.py --seeds 0 --setting resnet20_subset

Each run writes ``benchmarks/bench_trainrows_stale_<setting>.md`` (or ``--out``); the committed
benchmarks/bench_trainrows_stale.md joins the sections of the runs listed at its top.

With ``hashing.calibration=training`` a rehash plans, refits and measures every site on the rows
the training forward recorded before the rehash; a site whose upstream merged earlier in the same
rehash is therefore planned on pre-merge ("stale") rows. A calibration pass would measure it
through the merged upstream ("fresh"). This isolates that one difference: a network is trained
(vanilla, ``--epochs``), the rows of the next K training batches are recorded with the weights
frozen (all rows of a Linear site, as many positions as a pass takes for a conv site), and the
network is compressed once from those rows (stale) and once by calibration passes over exactly
those K batches' samples (fresh), each with the setting's hashing config (``--max-error``). The
table gives, per seed, the widths, FLOPs and test accuracy (no fine-tuning, no BN re-estimation)
of both, and the unmerged network's accuracy.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from harness import ROOT, fmt, write_markdown

SETTINGS = {
    "headline": ["model=mlp", "hashing=simhash"],
    "resnet20_subset": ["model=resnet20", "dataset.subset_train=3000", "dataset.subset_test=1000", "hashing=simhash"],
}


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def one_seed(setting: str, seed: int, epochs: int, batches: int, max_error: float | None,
             fresh_clean: bool = False) -> dict:
    """Train, record K batches, compress from stale rows and from fresh passes; the figures of both."""
    from hashexp.app import _instantiate, build_rehasher
    from hashexp.data import BatchIterator, build_dataset
    from hashexp.merge.sites import model_sites, model_widths
    from hashexp.merge.training_rows import TrainingCapture
    from hashexp.metrics import count_flops, evaluate
    from hashexp.models import build_model
    from hashexp.utils.seeding import seed_everything

    extra = [] if max_error is None else [f"hashing.max_error={max_error}"]
    cfg = _compose([*SETTINGS[setting], f"seed={seed}", f"trainer.epochs={epochs}", "trainer.num_threads=1",
                    "trainer.logging.progress=none", "trainer.checkpoint.enabled=false", *extra])
    seed_everything(seed)
    data = build_dataset(cfg.dataset, seed=seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _instantiate(cfg.trainer, "trainer")(model=model, data=data, rehasher=None, schedule=None,
                                                        logger=None, run_dir=tmp, seed=seed, dist=None)
        trainer.fit()
    model = trainer.model
    bs = int(cfg.trainer.batch_size)
    it = iter(BatchIterator(data.x_train, data.y_train, bs, shuffle=True,
                            generator=torch.Generator().manual_seed(seed + 7)))
    xs, clean = [], []
    for _ in range(batches):
        xb = next(it)[0]
        clean.append(xb)
        xs.append(trainer.augment(xb, trainer.aug_gen) if trainer.augment is not None else xb)
    x = torch.cat(xs)
    x_fresh = torch.cat(clean) if fresh_clean else x  # the passes' samples, with or without the augmentation
    sites = model_sites(model)
    cap = TrainingCapture(sites, batches, samples=len(x), conv_samples=len(x), seed=seed)
    model.train()
    with torch.no_grad():  # the recorded forwards: train mode (BatchNorm on batch statistics), weights frozen
        for xb in xs:
            cap.begin_batch(0, len(xb))
            model(xb)
            cap.end_batch()
    cap.remove()
    out = {"vanilla_acc": evaluate(model, data.x_test, data.y_test)[1], "flops0": count_flops(model, data.input_shape)}
    for name in ("stale", "fresh"):
        m = copy.deepcopy(model)
        comp = build_rehasher(cfg.hashing, seed).compressor
        comp.conv_samples = len(x)  # the fresh pass runs every recorded sample
        if name == "stale":
            rows = cap.gather()
            rows.source, rows.example = None, x[:1]
            rep = comp.compress(m, None, None, None, 0, calib=rows)
        else:
            rep = comp.compress(m, None, None, None, 0, calib=x_fresh)
        out[name] = {"acc": evaluate(m, data.x_test, data.y_test)[1], "flops": count_flops(m, data.input_shape),
                     "width": sum(model_widths(m).values()), "error": max(r["error"] for r in rep)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="headline", choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batches", type=int, default=8, help="K, the recorded training batches")
    p.add_argument("--max-error", type=float, default=None, help="hashing.max_error (default: the model's budget)")
    p.add_argument("--fresh-clean", action="store_true",
                   help="the fresh passes run the samples without augmentation (as the calibration set does)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = [(s, one_seed(a.setting, s, a.epochs, a.batches, a.max_error, a.fresh_clean)) for s in a.seeds]
    body = [f"## {a.setting}: `{' '.join(SETTINGS[a.setting])}`, {a.epochs} epochs vanilla, K = {a.batches} batches, "
            f"max_error {a.max_error if a.max_error is not None else 'the model default'}"
            + (", fresh passes on the samples without augmentation" if a.fresh_clean else ""), "",
            "| seed | vanilla acc % | stale: acc % | stale: width | stale: FLOPs M | fresh: acc % | fresh: width | "
            "fresh: FLOPs M | acc stale - fresh pp |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, r in rows:
        st, fr = r["stale"], r["fresh"]
        body.append(f"| {s} | {100 * r['vanilla_acc']:.2f} | {100 * st['acc']:.2f} | {st['width']} | {st['flops'] / 1e6:.3f} | "
                    f"{100 * fr['acc']:.2f} | {fr['width']} | {fr['flops'] / 1e6:.3f} | {100 * (st['acc'] - fr['acc']):+.2f} |")
    body += ["", f"- stale - fresh accuracy: {fmt([100 * (r['stale']['acc'] - r['fresh']['acc']) for _, r in rows])} pp; "
             f"width stale {fmt([r['stale']['width'] for _, r in rows])}, fresh {fmt([r['fresh']['width'] for _, r in rows])}"]
    out = a.out or ROOT / "benchmarks" / f"bench_trainrows_stale_{a.setting}.md"
    notes = ["Stale: every site planned, refit and measured on the recorded rows (hashing.calibration=training). "
             "Fresh: calibration passes over the same samples, each site measured through the merged upstream "
             "(hashing.calibration=passes). Same trained network, same samples, same compressor; one-shot, no "
             "fine-tuning, no BN re-estimation."]
    print(write_markdown(out, "Training-row calibration: stale rows of downstream sites against fresh passes", body,
                         notes=notes))


if __name__ == "__main__":
    main()
