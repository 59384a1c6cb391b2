"""Hashed ResNet-20 on Fashion-MNIST vs vanilla, magnitude pruning and Torch-Pruning.

    .venv/bin/python benchmarks/bench_resnet.py                     # the full run: 3 seeds, 15 epochs, 60k/10k
    .venv/bin/python benchmarks/bench_resnet.py --epochs 1 --subset-train 2048 --subset-test 1024 --seeds 0 \\
        --finetune-epochs 0.5 --threads 1 --overrides schedule.unit=step schedule.start=5 schedule.every=5 \\
        --out-dir /tmp/bench_resnet_smoke --md /tmp/bench_resnet_smoke.md          # smoke check of the script

Part 1, compression while training (``experiment=resnet20_fmnist``, same epochs for all), per seed
and one after the other so they share the machine's state:

- vanilla: ``hashing=none``;
- hashed: the preset (``hashing=simhash``, rehash after epochs 2, 4, 6);
- magnitude: structured L1 pruning of whole channels at the same sites, the same rehash steps and
  exactly the hashed run's widths after each rehash (``hashing.width_plan=<hashed run>``).

Part 2, one-shot compression of the trained vanilla checkpoint of each seed to the hashed run's
final FLOPs, then the same fine-tune for both:

- ours: ``hashexp.compress.compress_model`` merges every site to the hashed run's final widths
  (SimHash candidates, most similar pairs first, activation-weighted representatives, BN
  recalibrated on 20 training batches);
- Torch-Pruning (Fang et al., DepGraph, CVPR 2023): ``tp.pruner.MetaPruner`` with L1 group
  magnitude importance (``tp.importance.GroupMagnitudeImportance(p=1)``), one uniform channel
  ratio for every dependency group (the residual streams are groups, as our stream sites),
  the classifier ignored; the ratio is bisected until the pruned FLOPs match ours, and its BNs are
  recalibrated on the same number of batches.

Both then fine-tune with the same loop: SGD + Nesterov momentum 0.9, weight decay 5e-4, cosine
from ``--finetune-lr`` to 0 over ``--finetune-epochs``, batch 128, the dataset's augmentation.

No wall-time ratio (the runs go one after the other, not side by side); FLOPs are
forward FLOPs per sample (FlopCounterMode).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

from harness import ROOT, fmt, read_metrics, run  # noqa: E402  (benchmarks/ is the script's dir)

PRESET = "experiment=resnet20_fmnist"
# the SimHash-only knobs the preset sets, dropped for the magnitude baseline


# ----------------------------------------------------------------------------------- one-shot
def finetune(model, data, epochs: float, lr: float, batch_size: int, seed: int) -> float:
    """The fine-tune both one-shot methods get; returns its wall time in seconds."""
    import torch

    from hashexp.train.finetune import finetune as run_finetune

    t0 = time.perf_counter()
    steps = int(math.ceil(epochs * math.ceil(len(data.x_train) / batch_size)))
    if steps <= 0:
        return 0.0
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen, aug_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    run_finetune(model, data, steps, opt, batch_size, gen, augment=data.augment, aug_generator=aug_gen,
                 lr_schedule=sched)
    model.eval()
    return time.perf_counter() - t0


def calib_batches(data, n: int, batch_size: int, seed: int):
    import torch

    from hashexp.data import BatchIterator

    it = BatchIterator(data.x_train, data.y_train, batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return (xb for _, (xb, _) in zip(range(n), it))


def tp_prune_to_flops(base, data, target_flops: int, seed: int, iters: int = 24):
    """Torch-Pruning L1 group pruning of a copy of ``base``, ratio bisected to ``target_flops``."""
    import torch
    import torch_pruning as tp

    from hashexp.metrics import count_flops

    def prune(ratio: float):
        m = copy.deepcopy(base)
        imp = tp.importance.GroupMagnitudeImportance(p=1)
        pr = tp.pruner.MetaPruner(m, torch.zeros(1, *data.input_shape), importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[m.fc], global_pruning=False)
        pr.step()
        return m, count_flops(m, data.input_shape)

    t0 = time.perf_counter()
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m, f = prune(mid)
        if best is None or abs(f - target_flops) < abs(best[1] - target_flops):
            best = (m, f, mid)
        if f > target_flops:
            lo = mid
        else:
            hi = mid
        if f == target_flops:
            break
    m, f, ratio = best
    return m, f, ratio, time.perf_counter() - t0


def oneshot(seed: int, van_dir: Path, hashed: dict, a) -> dict:
    """Ours vs Torch-Pruning on the vanilla checkpoint of ``seed``, at the hashed run's final FLOPs."""
    import torch
    from omegaconf import OmegaConf

    from hashexp.compress import compress_model
    from hashexp.metrics import accuracy
    from hashexp.data import build_dataset
    from hashexp.merge.recalibrate import recalibrate_bn
    from hashexp.metrics import count_flops, count_params
    from hashexp.models import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cfg = OmegaConf.load(van_dir / ".hydra" / "config.yaml")
    data = build_dataset(cfg.dataset, seed=seed).to(dev)
    base = load_model(van_dir / "model.pt").to(dev)
    base_acc = accuracy(base, data.x_test, data.y_test)
    out = {"base_acc": base_acc, "base_flops": count_flops(base, data.input_shape),
           "majority": data.majority_acc("test")}

    # ours: merge every site to the hashed run's final widths (the target decides; most similar first)
    torch.manual_seed(seed)
    ours = copy.deepcopy(base)
    ours, rep = compress_model(ours, data, "simhash", keep=None, threshold=-1.0, calib_batches=a.calib_batches,
                               batch_size=128, seed=seed, bits=4, tables=16, target_width=dict(hashed["widths"]))
    o = {"flops": rep["after"]["flops"], "params": rep["after"]["params"], "widths": rep["after"]["widths"],
         "acc_prune": rep["after"]["test_acc"], "prune_s": rep["hash_time_s"]}
    o["ft_s"] = finetune(ours, data, a.finetune_epochs, a.finetune_lr, 128, seed)
    o["acc_ft"] = accuracy(ours, data.x_test, data.y_test)
    out["ours"] = o

    # Torch-Pruning at the FLOPs our one-shot reached (= the hashed run's when every site hit its target)
    torch.manual_seed(seed)
    # Torch-Pruning traces the model with an example input on the CPU; the pruned copy then moves
    tpm, f, ratio, t_prune = tp_prune_to_flops(copy.deepcopy(base).cpu(), data, o["flops"], seed)
    tpm = tpm.to(dev)
    recalibrate_bn(tpm, calib_batches(data, a.calib_batches, 128, seed))
    t = {"flops": f, "params": count_params(tpm), "widths": dict(tpm.widths()), "ratio": ratio,
         "acc_prune": accuracy(tpm, data.x_test, data.y_test), "prune_s": t_prune}
    t["ft_s"] = finetune(tpm, data, a.finetune_epochs, a.finetune_lr, 128, seed)
    t["acc_ft"] = accuracy(tpm, data.x_test, data.y_test)
    out["tp"] = t
    print(f"  one-shot seed {seed}: base {base_acc:.4f}; ours flops {o['flops']:,} acc {o['acc_prune']:.4f} -> "
          f"{o['acc_ft']:.4f}; torch-pruning ratio {ratio:.3f} flops {f:,} acc {t['acc_prune']:.4f} -> "
          f"{t['acc_ft']:.4f}", flush=True)
    return out


# ----------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15, help="training epochs of every run (the preset's 15)")
    ap.add_argument("--subset-train", type=int, default=None, help="train on a seeded subset (default: all 60k)")
    ap.add_argument("--subset-test", type=int, default=None, help="test on a seeded subset (default: all 10k)")
    ap.add_argument("--finetune-epochs", type=float, default=2.0, help="one-shot fine-tune, both methods")
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--calib-batches", type=int, default=20, help="batches for activation statistics and BN recalibration")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per run (default: torch's)")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra overrides for every training run")
    ap.add_argument("--hashed", nargs="*", default=[], help="extra overrides for the hashed run only")
    ap.add_argument("--skip-oneshot", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: every training run (trainer.device) and the one-shot part")
    ap.add_argument("--runs", default="vanilla,hashed,magnitude,oneshot",
                    help="which parts to run for each seed (magnitude and oneshot need hashed and vanilla done); "
                         "the table is written when all four are")
    ap.add_argument("--note", default="", help="a sentence for the table's preamble (how the runs were scheduled)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tabulate the seeds whose runs are all in --out-dir (e.g. seeds run in parallel)")
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_resnet"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    out = Path(a.out_dir)
    base = [PRESET, f"trainer.epochs={a.epochs}"]
    if a.subset_train:
        base.append(f"dataset.subset_train={a.subset_train}")
    if a.subset_test:
        base.append(f"dataset.subset_test={a.subset_test}")
    if a.threads:
        base.append(f"trainer.num_threads={a.threads}")
    if a.device != "cpu":
        base.append(f"trainer.device={a.device}")
    base += a.overrides
    res: dict[str, dict[int, dict]] = {k: {} for k in ("vanilla", "hashed", "magnitude")}
    one: dict[int, dict] = {}
    if a.report_only:
        done = [s for s in a.seeds if all((out / f"seed{s}" / k / "metrics.json").exists() for k in res)
                and (a.skip_oneshot or (out / f"seed{s}" / "oneshot.json").exists())]
        missing = sorted(set(a.seeds) - set(done))
        if not done:
            raise SystemExit(f"--report-only: no seed of {a.seeds} has all its runs under {out}")
        if missing:
            print(f"  --report-only: seeds {missing} are incomplete under {out} and left out of the table", flush=True)
        a.seeds = done
    parts = ("vanilla", "hashed", "magnitude", "oneshot")
    want = set(parts) if a.report_only else set(a.runs.split(","))
    if not want <= set(parts):
        raise SystemExit(f"--runs: unknown part(s) {sorted(want - set(parts))}; choose from {','.join(parts)}")

    def need(sd: Path, name: str) -> dict:
        """A run this part builds on, done earlier (another --runs call) or now."""
        if not (sd / name / "metrics.json").exists():
            raise SystemExit(f"{sd / name} has no metrics.json: run --runs {name} for this seed first")
        return read_metrics(sd / name)

    for seed in a.seeds:
        sd = out / f"seed{seed}"
        if "vanilla" in want:
            res["vanilla"][seed] = run(base + ["hashing=none", f"seed={seed}"], sd / "vanilla")
        if "hashed" in want:
            res["hashed"][seed] = h = run(base + a.hashed + [f"seed={seed}"], sd / "hashed")
            if h["rehashes"] == 0:
                print("  warning: the hashed run never rehashed (fewer epochs than the preset's schedule?); "
                      "pass --overrides schedule.unit=step schedule.start=N schedule.every=N", flush=True)
        if "magnitude" in want:
            need(sd, "hashed")
            res["magnitude"][seed] = run(base + ["hashing=magnitude", f"hashing.width_plan={sd / 'hashed'}",
                                                 "hashing.target_ratio=null", f"seed={seed}"],
                                         sd / "magnitude")
        if "oneshot" in want and not a.skip_oneshot:
            if (sd / "oneshot.json").exists():  # reused like the runs: delete it to redo the one-shot part
                one[seed] = json.loads((sd / "oneshot.json").read_text())
            else:
                need(sd, "vanilla")
                one[seed] = oneshot(seed, sd / "vanilla", need(sd, "hashed"), a)
                (sd / "oneshot.json").write_text(json.dumps(one[seed], indent=2))
    if want != set(parts):
        print(f"--runs {a.runs}: done under {out}; the table needs every part (or --report-only)", flush=True)
        return
    lines = report(a, res, one, setting(out / f"seed{a.seeds[0]}" / "hashed"))
    Path(a.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def setting(hashed_dir: Path) -> str:
    """The hashed run's training and hashing knobs, read from its composed config."""
    from omegaconf import OmegaConf

    c = OmegaConf.load(hashed_dir / ".hydra" / "config.yaml")
    t, h, s = c.trainer, c.hashing, c.schedule
    when = (f"every {s.every} {s.unit}s from {s.unit} {s.start}" + (f", at most {s.max_rehashes} times"
                                                                      if s.max_rehashes is not None else ""))
    return (f"SGD lr {t.optimizer.lr:g} momentum {t.optimizer.momentum:g} (Nesterov), cosine LR, batch "
            f"{t.batch_size}, augmentation {'on' if t.augment else 'off'}; hashed: rehash {when}, "
            f"SimHash {h.bits} bits x {h.tables} tables on {h.candidates}, compensation {h.compensation}, error "
            f"budget {h.max_error} per site and rehash, target {h.target_ratio} of each width per rehash, min width "
            f"{h.min_width}"
            + (f", centripetal pull {h.pull.steps} steps at strength {h.pull.strength:g}"
               if "pull" in h and h.pull.steps else "")
            + f", BN recalibrated on {h.get('bn_recalib_batches', t.get('bn_recalib_batches'))} batches after each rehash")


def report(a, res, one, knobs: str) -> list[str]:
    import torch_pruning as tp

    van, hsh, mag = res["vanilla"], res["hashed"], res["magnitude"]
    seeds = sorted(van)
    import torch

    cmd = ".venv/bin/python benchmarks/bench_resnet.py" + "".join(f" {shlex.quote(x)}" for x in sys.argv[1:])
    if a.device.startswith("cuda") and torch.cuda.is_available():
        machine = f"GPU: {torch.cuda.get_device_name()} (torch {torch.__version__})"
    else:
        machine = f"CPU, torch {torch.__version__}"
    data = (f"Fashion-MNIST ({a.subset_train or 60000} train / {a.subset_test or 10000} test, 28x28), "
            f"ResNet-20, {a.epochs} epochs, seeds {seeds}")
    lines = [
        "# Hashed ResNet-20 vs vanilla, magnitude pruning and Torch-Pruning",
        "",
        f"Command: `{cmd}`",
        "",
        f"{machine}. {data}; `{PRESET}`: {knobs}. Magnitude: L1 pruning of whole channels at the same sites, steps and "
        "widths (`hashing.width_plan=<hashed run>`). "
        + ("" if a.report_only else "Runs of a seed one after the other on one machine. ") +
        "Reductions are per-seed ratios against the vanilla run of the same seed; wall = whole "
        "process (data, training, evaluation, hashing), no wall ratio (the runs are not timed side by side); "
        "hash = time in the compressor plus BN recalibration.",
        "",
        *([f"Extra overrides for every run: `{' '.join(a.overrides)}`.", ""] if a.overrides else []),
        *([a.note, ""] if a.note else []),
        "## Compression while training",
        "",
        "| method | test acc % | Δ vs vanilla pp | majority % | FLOPs/sample | params | FLOPs ↓ | params ↓ | wall s | hash s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in res.items():
        ms = [runs[s] for s in seeds]
        lines.append(
            f"| {name} | {fmt([m['test_acc'] for m in ms], pct=True)} "
            f"| {fmt([100 * (runs[s]['test_acc'] - van[s]['test_acc']) for s in seeds])} "
            f"| {100 * ms[0]['majority_acc']:.1f} | {statistics.mean(m['flops'] for m in ms):,.0f} "
            f"| {statistics.mean(m['params'] for m in ms):,.0f} "
            f"| {fmt([van[s]['flops'] / runs[s]['flops'] for s in seeds])}x "
            f"| {fmt([van[s]['params'] / runs[s]['params'] for s in seeds])}x "
            f"| {fmt([m['wall_time_s'] for m in ms], digits=1)} "
            f"| {fmt([m['hash_time_s'] for m in ms], digits=2)} |")
    red = [van[s]["flops"] / hsh[s]["flops"] for s in seeds]
    d_van = [100 * (hsh[s]["test_acc"] - van[s]["test_acc"]) for s in seeds]
    d_mag = [100 * (hsh[s]["test_acc"] - mag[s]["test_acc"]) for s in seeds]
    lines += [
        "",
        "Goals: hashed >= 2x fewer forward FLOPs than vanilla "
        f"({fmt(red)}x: {'met' if statistics.mean(red) >= 2 else 'not met'}), at most 0.5 pp lower test "
        f"accuracy ({fmt(d_van)} pp: {'met' if statistics.mean(d_van) >= -0.5 else 'not met'}), and above "
        f"magnitude pruning at the same FLOPs ({fmt(d_mag)} pp: {'met' if statistics.mean(d_mag) > 0 else 'not met'}).",
        "",
        f"Hashed run's widths (seed {seeds[0]}): before {hsh[seeds[0]]['widths_before']}; rehashes: " + "; ".join(
            f"step {e['step']} (epoch {e['epoch']}) -> {e['after']}" for e in hsh[seeds[0]]["rehash_events"]),
        "",
    ]
    if one:
        lines += [
            "## One-shot compression of the vanilla checkpoint, then the same fine-tune",
            "",
            f"Each seed's trained vanilla model, compressed once to the hashed run's final widths (ours) or by "
            f"Torch-Pruning {tp.__version__} (L1 group magnitude, uniform ratio bisected to the same FLOPs), "
            f"BN recalibrated on {a.calib_batches} batches, then fine-tuned {a.finetune_epochs:g} epochs with "
            f"SGD + Nesterov, lr {a.finetune_lr:g} cosine to 0, batch 128, augmentation (identical for both). "
            "Compress s: ours = the compressor; Torch-Pruning = its whole ratio search (about 20 prunings).",
            "",
            "| method | FLOPs/sample | FLOPs ↓ | params | acc % after compression | acc % after fine-tune | Δ vs vanilla pp | compress s | fine-tune s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        os_ = sorted(one)
        lines.append(f"| vanilla checkpoint | {statistics.mean(one[s]['base_flops'] for s in os_):,.0f} | 1.00x | "
                     f"{statistics.mean(van[s]['params'] for s in os_):,.0f} | "
                     f"{fmt([one[s]['base_acc'] for s in os_], pct=True)} | | | | |")
        for key, name in (("ours", "hashed merge (ours)"), ("tp", "Torch-Pruning L1")):
            rs = [one[s][key] for s in os_]
            lines.append(
                f"| {name} | {statistics.mean(r['flops'] for r in rs):,.0f} "
                f"| {fmt([one[s]['base_flops'] / one[s][key]['flops'] for s in os_])}x "
                f"| {statistics.mean(r['params'] for r in rs):,.0f} | {fmt([r['acc_prune'] for r in rs], pct=True)} "
                f"| {fmt([r['acc_ft'] for r in rs], pct=True)} "
                f"| {fmt([100 * (one[s][key]['acc_ft'] - one[s]['base_acc']) for s in os_])} "
                f"| {fmt([r['prune_s'] for r in rs])} | {fmt([r['ft_s'] for r in rs], digits=1)} |")
        s0 = os_[0]
        lines += ["", f"Seed {s0}: ours {one[s0]['ours']['widths']}; Torch-Pruning (ratio "
                  f"{one[s0]['tp']['ratio']:.3f}) {one[s0]['tp']['widths']}.", ""]
    return lines


if __name__ == "__main__":
    main()
