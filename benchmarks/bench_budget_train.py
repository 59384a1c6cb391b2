"""Global vs per-site budget during training, at equal FLOPs (issue 19, item 6).

    nice -n 10 .venv/bin/python benchmarks/bench_budget_train.py --seeds 0 1 2   # writes bench_budget_train.md

Two settings, each run as its command with ``trainer.num_threads=1`` (the machine is shared):

- headline: ``python -m hashexp model=mlp hashing=simhash seed=S`` (Fashion-MNIST, MLP 256-256,
  10 epochs, a rehash every epoch, per-site error budget 0.02);
- resnet20: ``python -m hashexp model=resnet20 dataset.subset_train=3000 dataset.subset_test=1000
  trainer.epochs=3 hashing=simhash seed=S`` (per-site error budget 0.1).

Per seed, the per-site run (``hashing.budget=site``, the default) goes first; the global run of
the same seed then follows its FLOPs rehash by rehash: ``hashing.budget=global
hashing.max_error=null hashing.flops_plan=<the per-site run> hashing.global_weight=none``. At every rehash the global run
keeps the multiply-adds the per-site run had after the same rehash (to within one block, never
fewer), spent across the sites cheapest error per saved FLOP first (hashexp/merge/budget.py), so
the two runs train at the same FLOPs at every epoch and differ only in where they cut. With
``--error-rows`` a third row per setting runs ``hashing.budget=global`` at the per-site run's
total error (``n_sites * max_error^2`` per rehash, the model's default ``max_error``,
``global_weight=none``), whatever FLOPs that reaches; with ``--weighted-rows`` (ResNet-20 only: an MLP's sites have one consumer
each) the global run at equal FLOPs counts a site's error once per consumer layer
(``hashing.global_weight=consumers``, the default of ``budget=global``); ``--vanilla`` adds ``hashing=none``. Existing run dirs are
reused, so a rerun only fills what is missing.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from harness import ROOT, command_line, fmt, mean_std, run, write_markdown  # noqa: E402

SETTINGS = {
    "headline": ["model=mlp", "hashing=simhash"],
    "resnet20": ["model=resnet20", "dataset.subset_train=3000", "dataset.subset_test=1000", "trainer.epochs=3",
                 "hashing=simhash"],
}
TITLES = {"headline": "headline: Fashion-MNIST, MLP 256-256, 10 epochs, per-site max_error 0.02",
          "resnet20": "ResNet-20, Fashion-MNIST subset 3000/1000, 3 epochs, per-site max_error 0.1"}


#: settings whose sites have more than one consumer layer (residual streams): the consumer-weighted
#: global row differs from the plain one only there (an MLP's sites have one consumer each)
WEIGHTED = ("resnet20",)


def runs_of(setting: str, seed: int, out: Path, extra: tuple[str, ...] = ()) -> dict[str, dict]:
    """The per-site run of ``seed`` and the global run at its FLOPs, then the ``extra`` rows:
    ``error`` (global at the per-site run's total error), ``weighted`` (global at equal FLOPs with
    ``global_weight=consumers``), ``vanilla`` (``hashing=none``)."""
    base = [*SETTINGS[setting], f"seed={seed}", "trainer.num_threads=1"]
    site_dir = out / f"{setting}_site_s{seed}"
    at_flops = ["hashing.budget=global", "hashing.max_error=null", f"hashing.flops_plan={site_dir}"]
    got = {"site": run([*base, "hashing.budget=site"], site_dir)}
    got["global"] = run([*base, *at_flops, "hashing.global_weight=none"], out / f"{setting}_global_flops_s{seed}")
    if "weighted" in extra and setting in WEIGHTED:
        got["global, consumer-weighted"] = run([*base, *at_flops, "hashing.global_weight=consumers"],
                                               out / f"{setting}_global_weighted_s{seed}")
    if "error" in extra:
        got["global, equal error"] = run([*base, "hashing.budget=global", "hashing.global_weight=none"],
                                         out / f"{setting}_global_error_s{seed}")
    if "vanilla" in extra:
        got["vanilla"] = run([*[o for o in base if o != "hashing=simhash"], "hashing=none"],
                             out / f"{setting}_vanilla_s{seed}")
    return got


def share(m: dict) -> float:
    """Hash + calibration + surgery share of the run's wall time, in percent."""
    return 100 * m["hash_time_s"] / m["wall_time_s"]


def table(setting: str, res: dict[int, dict[str, dict]]) -> list[str]:
    """One markdown table of a setting: a row per budget, mean ± sd over seeds, Δ paired by seed."""
    seeds = sorted(res)
    rows = list(res[seeds[0]])
    lines = [f"## {TITLES[setting]}", "",
             "| budget | FLOPs/sample | FLOPs vs per-site (min–max) | test acc % | Δ acc vs per-site pp | "
             "majority acc % | merge share of wall % | final widths (seed " + str(seeds[0]) + ") |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        ms = [res[s][row] for s in seeds]
        ratio = [res[s][row]["flops"] / res[s]["site"]["flops"] for s in seeds]
        delta = [100 * (res[s][row]["test_acc"] - res[s]["site"]["test_acc"]) for s in seeds]
        widths = ", ".join(f"{k} {v}" for k, v in ms[0]["widths"].items())
        lines.append(f"| {row} | {fmt([m['flops'] for m in ms], digits=0)} | "
                     f"{statistics.mean(ratio):.3f} ({min(ratio):.3f}–{max(ratio):.3f}) | "
                     f"{fmt([m['test_acc'] for m in ms], pct=True)} | {fmt(delta)} | "
                     f"{fmt([m['majority_acc'] for m in ms], pct=True)} | {fmt([share(m) for m in ms])} | {widths} |")
    lines.append("")
    per_seed = "; ".join(f"s{s}: " + ", ".join(f"{row} {100 * res[s][row]['test_acc']:.2f}" for row in rows)
                         for s in seeds)
    lines += [f"Per seed test acc %: {per_seed}.", ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--error-rows", action="store_true", help="also global at the per-site run's total error")
    p.add_argument("--weighted-rows", action="store_true",
                   help="also global at equal FLOPs with hashing.global_weight=consumers (residual settings)")
    p.add_argument("--vanilla", action="store_true", help="also the vanilla run (hashing=none) of each seed")
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "bench_budget_train")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_budget_train.md")
    a = p.parse_args()
    extra = tuple(x for x, on in (("weighted", a.weighted_rows), ("error", a.error_rows), ("vanilla", a.vanilla))
                  if on)
    body = []
    # the equal-FLOPs pairs of every setting first, the other rows after them
    for setting in a.settings:
        for s in a.seeds:
            runs_of(setting, s, a.out_dir)
    for setting in a.settings:
        res = {s: runs_of(setting, s, a.out_dir, extra) for s in a.seeds}
        body += table(setting, res)
        d = [100 * (res[s]["global"]["test_acc"] - res[s]["site"]["test_acc"]) for s in a.seeds]
        m, sd = mean_std(d)
        print(f"{setting}: global - site at equal FLOPs {m:+.2f} ± {sd:.2f} pp", flush=True)
    notes = ["Per seed, the per-site run (`hashing.budget=site`, the default) and the global run that follows its "
             "FLOPs rehash by rehash (`hashing.budget=global hashing.max_error=null hashing.flops_plan=<per-site run "
             "dir> hashing.global_weight=none`; the consumer-weighted row: `hashing.global_weight=consumers`); all with "
             "`trainer.num_threads=1`. Δ is paired by seed (global minus per-site), mean ± sd over "
             f"seeds {a.seeds}. Merge share: hash + calibration + surgery time over wall time of the same run "
             "(a share, not a time across runs)."]
    write_markdown(a.out, "Global vs per-site budget during training, at equal FLOPs", body,
                   command=command_line(prefix="nice -n 10 .venv/bin/python"), notes=notes)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
