"""Share of wall time spent hashing + calibrating + merging, before and after a change, side by side.

    git worktree add /tmp/hashexp_before <commit> && cp clsh/*.so /tmp/hashexp_before/clsh/
    nice -n 10 .venv/bin/python benchmarks/bench_merge_share.py --baseline-root /tmp/hashexp_before \\
        --seeds 0 1 2 --out-dir /tmp/bench_merge_share         # writes benchmarks/bench_merge_share.md

Settings (one thread each, no checkpoint):

- ``fmnist_mlp2048``: `python -m hashexp experiment=fmnist_mlp2048 hashing=simhash seed=S` (goal <= 3%);
- ``headline``: `python -m hashexp model=mlp hashing=simhash seed=S` (goal <= 3%);
- ``resnet20_subset``: `python -m hashexp model=resnet20 dataset.subset_train=3000
  dataset.subset_test=1000 trainer.epochs=3 hashing=simhash seed=S` (bench_headline's ResNet-20
  row; goal <= 5%).

For each setting and seed the two checkouts (``--baseline-root``: the code before; this checkout:
after) run *at the same time*, one process each, so they see the same machine load; the share
is a ratio inside one run (metrics.json ``hash_time_s / wall_time_s``). Every run goes through
benchmarks/profile_rehash.py, which splits the rehash time by phase (calibration passes, refit
passes, least squares, candidates, order, surgery, BN). Existing run dirs are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from harness import PY, ROOT, fmt, load_average, read_metrics, write_markdown

SETTINGS = {
    "fmnist_mlp2048": ["experiment=fmnist_mlp2048", "hashing=simhash"],
    "headline": ["model=mlp", "hashing=simhash"],
    "resnet20_subset": ["model=resnet20", "dataset.subset_train=3000", "dataset.subset_test=1000",
                        "trainer.epochs=3", "hashing=simhash"],
}
GOALS = {"fmnist_mlp2048": 3.0, "headline": 3.0, "resnet20_subset": 5.0}
PHASES = ("calib", "refit_pass", "lsq", "candidates", "order", "surgery", "bn", "capture")


def _launch(root: Path, setting: str, seed: int, run_dir: Path, extra: list[str]) -> subprocess.Popen | None:
    if (run_dir / "metrics.json").exists() and (run_dir / "phases.json").exists():
        return None
    cmd = [PY, str(ROOT / "benchmarks" / "profile_rehash.py"), "--root", str(root), "--json",
           str(run_dir / "phases.json"), "--", *SETTINGS[setting], *extra, f"seed={seed}", "trainer.num_threads=1",
           "trainer.checkpoint.enabled=false", "trainer.logging.progress=none", f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=open(run_dir / "stderr.txt", "w"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-root", type=Path, default=None,
                   help="a checkout of the code before the change (omitted: only this checkout and its variants)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "bench_merge_share")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_merge_share.md")
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("SETTING", "OVERRIDES"),
                   help="a third contender of SETTING: this checkout with these overrides (space-separated)")
    p.add_argument("--note", default="", help="a line about the machine's state, for the result file")
    a = p.parse_args()
    roots = {"after": (ROOT, [])}
    if a.baseline_root is not None:
        roots = {"before": (a.baseline_root.resolve(), []), **roots}
    extra = {setting: {f"after, {ov}": (ROOT, ov.split())} for setting, ov in a.variant}
    rows: dict[str, list] = {s: [] for s in a.settings}
    loads = []
    for setting in a.settings:
        contenders = {**roots, **extra.get(setting, {})}
        for seed in a.seeds:
            dirs = {v: a.out_dir / setting / f"s{seed}_{v.replace(', ', '_').replace('=', '')}" for v in contenders}
            l0 = load_average()
            procs = [(v, _launch(contenders[v][0], setting, seed, dirs[v], contenders[v][1])) for v in contenders]
            for v, pr in procs:
                if pr is not None and pr.wait() != 0:
                    raise SystemExit(f"run failed ({v}, {setting}, seed {seed}): see {dirs[v] / 'stderr.txt'}")
            if any(pr is not None for _, pr in procs):
                loads.append((l0, load_average()))
            for v, d in dirs.items():
                rows[setting].append((seed, v, read_metrics(d), json.loads((d / "phases.json").read_text())))
            _write(a, rows, loads)
    print(f"wrote {a.out}")


def _write(a, rows: dict[str, list], loads: list) -> None:
    """The result file from the pairs run so far."""
    body = []
    for setting, rs in rows.items():
        body += [f"## {setting}: `python -m hashexp {' '.join(SETTINGS[setting])} seed=S` (goal <= {GOALS[setting]:g}%)", "",
                 "| seed | code | hash s | wall s | share % | share + capture % | test acc % | final widths | "
                 + " | ".join(f"{ph} s" for ph in PHASES) + " |",
                 "|---:|---|---:|---:|---:|---:|---:|---|" + "---:|" * len(PHASES)]
        for seed, v, m, ph in rs:
            widths = m["widths"]
            w = "-".join(str(x) for x in widths.values()) if len(widths) <= 3 else f"{sum(widths.values())} channels"
            body.append(f"| {seed} | {v} | {m['hash_time_s']:.2f} | {m['wall_time_s']:.1f} | "
                        f"{100 * m['hash_time_s'] / m['wall_time_s']:.2f} | "
                        f"{100 * (m['hash_time_s'] + ph.get('capture', 0.0)) / m['wall_time_s']:.2f} | {100 * m['test_acc']:.2f} | {w} | "
                        + " | ".join(f"{ph.get(k, 0.0):.2f}" for k in PHASES) + " |")
        body.append("")
        for v in dict.fromkeys(vv for _, vv, _, _ in rs):
            ms = [m for _, vv, m, _ in rs if vv == v]
            share = [100 * m["hash_time_s"] / m["wall_time_s"] for m in ms]
            with_capture = [100 * (m["hash_time_s"] + ph.get("capture", 0.0)) / m["wall_time_s"]
                            for _, vv, m, ph in rs if vv == v]
            met = "met" if max(with_capture) <= GOALS[setting] else "not met"
            body.append(f"- {v}: share {fmt(share)} %, with the capture {fmt(with_capture)} % (max "
                        f"{max(with_capture):.2f}: goal {met}), test acc "
                        f"{fmt([m['test_acc'] for m in ms], pct=True)} %, FLOPs {fmt([m['flops'] / 1e6 for m in ms])} M, "
                        f"seeds {sorted({s for s, vv, *_ in rs if vv == v})}")
            ref = {seed: m for seed, vv, m, _ in rs if vv == "after"}
            ratio = [m["wall_time_s"] / ref[seed]["wall_time_s"] for seed, vv, m, _ in rs if vv == v and seed in ref]
            if v != "after" and ratio:  # both ran at the same time: a side-by-side ratio
                body.append(f"  - wall time / after's of the same seed: {fmt(ratio, digits=3)}")
        body.append("")
    who = f"Before: `{a.baseline_root}`; after: this checkout." if a.baseline_root is not None else \
        "After: this checkout (no baseline checkout); the variants: this checkout with their overrides."
    notes = [f"{who} The runs of a seed ran at the same time, one torch "
             "thread each (capture = the training-forward row recording of hashing.calibration=training, part of "
             "the training time, not of hash s). Share = metrics.json hash_time_s / wall_time_s (calibration passes, candidates, order, "
             "least squares, surgery and BN re-estimation of every rehash). Phase columns from "
             "benchmarks/profile_rehash.py (refit pass = the refit forward minus the solves; it also measures "
             "the next site after the change)."]
    if loads:
        notes.append("Load average (1 min) at the start / end of each pair: "
                     + ", ".join(f"{x:.1f}/{y:.1f}" for x, y in loads) + ".")
    if a.note:
        notes.append(a.note)
    write_markdown(a.out, "Share of wall time in hashing + calibration + merging, before and after", body, notes=notes)


if __name__ == "__main__":
    main()
