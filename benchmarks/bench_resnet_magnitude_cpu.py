"""bench_resnet's magnitude row again, with the papers' scoring, for seed 0 on a CPU.

    .venv/bin/python benchmarks/bench_resnet_magnitude_cpu.py      # ~1.5 h on a shared 2-core CPU

benchmarks/bench_resnet.md's magnitude row was made on a GPU with the old sequential scoring (each
site scored after its upstream sites were cut). This re-runs it as the papers define it
(``hashing.scoring=original``) for seed 0: ResNet-20, ``experiment=resnet20_fmnist`` (15 epochs),
L1 pruning of whole channels at the same rehash steps to exactly the widths the hashed GPU run of
seed 0 reached (``hashing.width_plan``). That run's directory is not on this machine, so its widths,
as bench_resnet.md lists them, are in benchmarks/plans/resnet20_fmnist_seed0_widths.json, a
metrics.json holding only ``rehash_events`` (what the width plan reads). While the run is unfinished
the md says how far it got (its last finished epoch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import ROOT, command_line, read_history, read_metrics, run, write_markdown  # noqa: E402

PLAN = ROOT / "benchmarks" / "plans" / "resnet20_fmnist_seed0_widths.json"
#: bench_resnet.md (GPU, torch 2.11.0+cu130, 15 epochs, seeds 0 1 2): mean ± sd test accuracy %, FLOPs/sample, params
GPU_ROWS = (("vanilla", "93.99 ± 0.05", "62,043,904", "272,186"),
            ("hashed", "93.40 ± 0.09", "22,009,981", "86,132"),
            ("magnitude, old sequential scoring", "93.26 ± 0.08", "22,009,981", "86,132"))


def overrides(seed: int, threads: int) -> list[str]:
    """The magnitude run of bench_resnet, scored as the papers do, following the plan's widths."""
    return ["experiment=resnet20_fmnist", "trainer.epochs=15", f"trainer.num_threads={threads}", "hashing=magnitude",
            "hashing.scoring=original", f"hashing.width_plan={PLAN.relative_to(ROOT)}", "hashing.target_ratio=null",
            f"seed={seed}"]


def body(run_dir: Path) -> list[str]:
    """The GPU rows, then the CPU row (or how far the CPU run got)."""
    plan = [e["after"] for e in json.loads(PLAN.read_text())["rehash_events"]]
    lines = ["## GPU rows being replaced (benchmarks/bench_resnet.md, seeds 0 1 2)", "",
             "| method | test acc % | FLOPs/sample | params |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {a} | {f} | {p} |" for m, a, f, p in GPU_ROWS]
    lines += ["", "## Magnitude with the papers' scoring (`hashing.scoring=original`), seed 0, CPU", ""]
    if (run_dir / "metrics.json").exists():
        m = read_metrics(run_dir)
        reached = [{k: int(v) for k, v in e["after"].items()} for e in m.get("rehash_events", [])]
        lines += ["| method | test acc % | FLOPs/sample | params | wall s |", "|---|---:|---:|---:|---:|",
                  f"| magnitude, papers' scoring (seed 0, CPU) | {100 * m['test_acc']:.2f} | {m['flops']:,} | "
                  f"{m['params']:,} | {m['wall_time_s']:.0f} |", "",
                  f"Widths after each rehash equal the plan's: {reached == plan}. Final widths: {m['widths']}.", "",
                  f"Against the GPU means: {100 * m['test_acc'] - 93.40:+.2f} pp vs hashed, "
                  f"{100 * m['test_acc'] - 93.26:+.2f} pp vs the old sequential magnitude row. One seed, on another "
                  "device and torch version than the rows it sits next to, so an indication rather than a paired "
                  "result: whether bench_resnet's goal 'hashed above magnitude at the same FLOPs' still holds needs "
                  "hashed and magnitude (scoring=original) of the same seeds on one device."]
    else:
        hist = read_history(run_dir)
        epochs = [r for r in hist if r.get("kind") == "epoch" and "test_acc" in r]
        cut = [{k[len("width/"):]: int(v) for k, v in r.items() if k.startswith("width/")}
               for r in hist if r.get("rehash", 0) > 0]
        last = epochs[-1] if epochs else None
        lines += ["Not finished when this file was written: " + (
            f"{len(epochs)} of 15 epochs done, test accuracy after epoch {int(last['epoch'])}: "
            f"{100 * last['test_acc']:.2f} % at {int(last['flops']):,} FLOPs/sample." if last else "no epoch done yet."),
            "", f"Rehashes done: {len(cut)} of {len(plan)}; widths equal the plan's: {cut == plan[:len(cut)]}.",
            "", "| epoch | test acc % | FLOPs/sample |", "|---:|---:|---:|"]
        lines += [f"| {int(r['epoch'])} | {100 * r['test_acc']:.2f} | {int(r['flops']):,} |" for r in epochs]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "mag_cpu"))
    ap.add_argument("--report-only", action="store_true", help="write the md from what the run has so far")
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    a = ap.parse_args()
    run_dir = Path(a.out_dir) / f"seed{a.seed}"
    if not a.report_only:
        run(overrides(a.seed, a.threads), run_dir)
    notes = [__doc__.split("\n\n", 2)[2].strip(), "", "Run command: `.venv/bin/python -m hashexp "
             + " ".join(overrides(a.seed, a.threads)) + "` (plus `hydra.run.dir=... trainer.logging.progress=log "
             "trainer.checkpoint.enabled=false`, as benchmarks/harness.py runs it)."]
    text = write_markdown(a.md, "ResNet-20 magnitude row with the papers' scoring (seed 0, CPU)", body(run_dir),
                          command=command_line([x for x in sys.argv if x != "--report-only"]), notes=notes)
    print(text)


if __name__ == "__main__":
    main()
