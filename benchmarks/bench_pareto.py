"""The honest Pareto front: hashed merging against every simple alternative, budgets 4x to 300x.

    .venv/bin/python benchmarks/bench_pareto.py                         # writes bench_pareto.md + .png
    .venv/bin/python benchmarks/bench_pareto.py --seeds 0 --ratios 0.2  # one seed, one budget (a probe)
    .venv/bin/python benchmarks/bench_pareto.py --ratios 0.0327 0.0117 --methods hashed magnitude random neuron_merging small

Setting: `experiment=pareto_mlp2048` -- Fashion-MNIST 60k/10k, MLP 784-2048-2048-10, Adam, 10
epochs, batch 256; every compressing method follows the same width ramp (`schedule=gradual`: cubic
from the full width at step 100 to `schedule.final_ratio` of it at step 600, a rehash every 100
steps), so every method has the same widths at every step. FLOPs of 784-w-w-10 are
2(784w + w² + 10w): final_ratio 0.4, 0.2, 0.1, 0.0327 and 0.0117 (widths 819, 410, 205, 67, 24)
give about 4x, 12x, 28x, 100x and 300x fewer FLOPs than 2048-2048. Methods:

- ``hashed+pull``: `hashing=simhash hashing.max_error=null hashing.pull.steps=100` (LSH on the
  calibration activations proposes, the error order picks, the proposal is pulled together for
  100 steps, then merged and least squares refits the consumers);
- ``hashed+pull25``: a shorter, stronger pull (`hashing.pull.steps=25 hashing.pull.strength=0.2`),
  at the middle budget only;
- ``hashed``: the same without the pull (the ablation: merge at once);
- ``hashed, weights``: `hashing.compensation=weights hashing.threshold=-1`, the data-free rule, at
  the middle budget only;
- ``small``: the network trained from scratch at the hashed run's final widths (`hashing=none`);
- ``magnitude``, ``random``: `hashing=magnitude|random` on the same ramp (consumers take the weight
  rule), ``neuron_merging``: `hashing=neuron_merging` (Kim et al. 2020); all three score every
  site on the network before the rehash, as their papers do (`hashing.scoring=original`, issue
  22); ``--scoring sequential`` runs them as hashexp did before (rows labelled so);
- ``vanilla``: `hashing=none` at full width.

The table accumulates: each invocation tabulates the runs under ``--out-dir`` it was asked for and
keeps every other row of the previous ``--md`` as it was (its command is listed), so a new
budget or a re-run does not re-train the rest. Runs go ``--jobs`` at a time, one thread each; the
wall-time ratio (vanilla's wall time over the run's, same seed) is shown only for runs trained in
the same invocation as that vanilla run (side by side on the shared machine, noisy), "—" otherwise.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import ROOT, command_line, fmt, mean_std, read_metrics, run, seeds, write_markdown  # noqa: E402
from bench_headline import final_norms  # noqa: E402

BASE = ["experiment=pareto_mlp2048", "trainer.num_threads=1"]
HASHED = ["hashing=simhash", "hashing.max_error=null"]
METHODS = {
    "hashed+pull": HASHED + ["hashing.pull.steps=100"],
    "hashed+pull25": HASHED + ["hashing.pull.steps=25", "hashing.pull.strength=0.2"],
    "hashed": HASHED,
    "hashed, weights": HASHED + ["hashing.compensation=weights", "hashing.threshold=-1"],
    "magnitude": ["hashing=magnitude", "hashing.target_ratio=null"],
    "random": ["hashing=random", "hashing.target_ratio=null"],
    "neuron_merging": ["hashing=neuron_merging", "hashing.target_ratio=null"],
}
# run at the middle budget only
ABLATIONS = ("hashed+pull25", "hashed, weights")
# the baselines issue 22 changed, and the label of their rows scored the old way
AFFECTED = ("magnitude", "random", "neuron_merging")
OLD = "sequential scoring (before issue 22)"
ORDER = ["vanilla", "hashed+pull", "hashed+pull25", "hashed", "hashed, weights", "small", "magnitude", "random",
         "neuron_merging"]
TITLE = "The Pareto front: accuracy vs FLOPs on Fashion-MNIST, MLP 784-2048-2048-10"
HEADER = ["| budget | method | test acc % | Δ vs vanilla pp | FLOPs ↓ | final widths | wall ratio | "
          "train − test pp | Σ‖W‖ | Σ‖∇W‖ |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]


def _dir(method: str) -> str:
    return method.replace("+", "_").replace(", ", "_").replace(" ", "_")


def label(method: str, scoring: str) -> str:
    """The row's method name: an affected baseline run with ``sequential`` scoring says so."""
    return f"{method}, {OLD}" if scoring == "sequential" and method in AFFECTED else method


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds(3))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.2, 0.1, 0.0327, 0.0117])
    ap.add_argument("--methods", nargs="+", default=list(METHODS) + ["small"], choices=list(METHODS) + ["small"])
    ap.add_argument("--scoring", choices=("original", "sequential"), default="original",
                    help="hashing.scoring of magnitude, random and neuron_merging (sequential: as before issue 22)")
    ap.add_argument("--ablation-ratio", type=float, default=0.2,
                    help="the budget of the hashed+pull25 and 'hashed, weights' rows (the middle one)")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished runs under --out-dir, train nothing")
    ap.add_argument("--fresh", action="store_true", help="do not keep the rows of the previous --md")
    ap.add_argument("--note", action="append", default=[], help="a paragraph for the notes (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_pareto"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    return ap.parse_args()


def run_dir(out: Path, ratio: float | None, method: str, seed: int, scoring: str = "original") -> Path:
    """Where one run lives (sequential-scoring baselines in their own folder)."""
    name = _dir(method) + ("_sequential" if scoring == "sequential" and method in AFFECTED else "")
    return out / ("vanilla" if ratio is None else f"r{ratio:g}") / name / f"seed{seed}"


def train_all(a: argparse.Namespace, out: Path) -> dict[tuple[float | None, str], dict[int, dict]]:
    """Train (or, with --report-only, read) the runs asked for: vanilla, the methods, then small."""
    res: dict[tuple[float | None, str], dict[int, dict]] = {}
    batch = time.strftime("%Y%m%dT%H%M%S")

    def job(ratio, method, seed, over):
        scoring = a.scoring if method in AFFECTED else "original"
        d = run_dir(out, ratio, method, seed, scoring)
        if not a.report_only:
            _wait_if_running(d)
        fresh = not (d / "metrics.json").exists()
        if a.report_only and fresh:
            return
        over = over + ([f"hashing.scoring={scoring}"] if method in AFFECTED else [])
        m = read_metrics(d) if a.report_only else run(
            BASE + over + [f"seed={seed}"] + ([] if ratio is None else [f"schedule.final_ratio={ratio}"]), d)
        if fresh and not a.report_only:
            (d / "bench_batch").write_text(batch)  # which invocation trained it (side-by-side wall ratios)
        m["_dir"] = d
        res.setdefault((ratio, label(method, scoring)), {})[seed] = m

    first = [(None, "vanilla", s, ["hashing=none"]) for s in a.seeds]
    for ratio in a.ratios:
        for method in a.methods:
            if method == "small" or (method in ABLATIONS and ratio != a.ablation_ratio):
                continue
            first += [(ratio, method, s, METHODS[method]) for s in a.seeds]
    # seed by seed, vanilla (the longest runs) last: on a loaded machine the compressed runs of
    # every seed come first; small follows (it needs the hashed runs' widths)
    first.sort(key=lambda j: (j[1] == "vanilla", j[2]))
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda j: job(*j), first))
    if "small" in a.methods:
        small = []
        for ratio in a.ratios:
            src = res.get((ratio, "hashed+pull")) or res.get((ratio, "hashed")) or {}
            small += [(ratio, "small", s, ["hashing=none", f"model.widths=[{src[s]['widths']['fc1']},"
                                                           f"{src[s]['widths']['fc2']}]"]) for s in a.seeds if s in src]
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda j: job(*j), small))
    return res


def _wait_if_running(d: Path, quiet_s: float = 300.0) -> None:
    """Wait for a run another process is training into ``d`` (its log written in the last
    ``quiet_s`` seconds, no metrics.json yet), so that two invocations never train one run twice."""
    log = d / "__main__.log"
    while log.exists() and not (d / "metrics.json").exists() and time.time() - log.stat().st_mtime < quiet_s:
        time.sleep(20)


def _batch(d: Path) -> str | None:
    f = d / "bench_batch"
    return f.read_text().strip() if f.exists() else None


def table_rows(res: dict, all_seeds: list[int]) -> dict[tuple[str, str], str]:
    """``{(budget, method): markdown row}`` of the runs in ``res``, Δ paired by seed with vanilla."""
    van = res[(None, "vanilla")]
    rows = {}
    for (ratio, method), r in res.items():
        ss = [s for s in all_seeds if s in r and s in van]
        if not ss or (ratio is None) != (method == "vanilla"):
            continue
        acc = [r[s]["test_acc"] for s in ss]
        d = [100 * (r[s]["test_acc"] - van[s]["test_acc"]) for s in ss]
        red = [van[s]["flops"] / r[s]["flops"] for s in ss]
        side = [s for s in ss if _batch(r[s]["_dir"]) is not None and _batch(r[s]["_dir"]) == _batch(van[s]["_dir"])]
        wall = fmt([van[s]["wall_time_s"] / r[s]["wall_time_s"] for s in side]) if side == ss else "—"
        gap = [100 * (r[s]["train_acc"] - r[s]["test_acc"]) for s in ss]
        norms = [final_norms(r[s]["_dir"]) for s in ss]
        widths = sorted({"-".join(str(v) for v in r[s]["widths"].values()) for s in ss})
        budget = "full" if ratio is None else f"{ratio:g}"
        name = method if ss == all_seeds else f"{method} (seeds {ss})"
        rows[(budget, method)] = (f"| {budget} | {name} | {fmt(acc, pct=True)} | {fmt(d)} | {fmt(red, digits=1)}x | "
                                  f"{', '.join(widths)} | {wall} | {fmt(gap)} | {fmt([n[0] for n in norms], digits=1)} | "
                                  f"{fmt([n[1] for n in norms])} |")
    return rows


def previous(md: Path) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The previous file's rows ``{(budget, method): row}`` and the commands that made them."""
    if not md.exists():
        return {}, []
    rows, cmds, first = {}, [], []
    for line in md.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 10 and cells[0] not in ("budget",) and not cells[0].startswith("---"):
            rows[(cells[0], cells[1].split(" (seeds")[0])] = line
        m = re.match(r"^(Command: |- )`(\.venv/bin/python benchmarks/bench_pareto\.py[^`]*)`", line)
        if m:
            into = first if m.group(1) == "Command: " else cmds
            into += [] if m.group(2) in into else [m.group(2)]
    return rows, cmds or first  # the list, oldest first; a file without one: its command


def _rank(key: tuple[str, str]) -> tuple:
    """Row order: full, then budgets from the largest; methods in ORDER, a sequential row after its own."""
    budget, method = key
    base = method.split(", " + OLD)[0]
    return (budget != "full", -float(budget) if budget != "full" else 0.0,
            ORDER.index(base) if base in ORDER else len(ORDER), method != base)


def _mean_sd(cell: str) -> tuple[float, float]:
    m, s = cell.rstrip("x").split(" ± ")
    return float(m), float(s)


def points(rows: dict[tuple[str, str], str]) -> dict[str, list[tuple[float, float, float]]]:
    """``{method: [(FLOPs reduction, mean Δ pp, sd Δ pp)]}`` from the table's rows (all budgets)."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for (budget, method), line in rows.items():
        if budget == "full":
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        (md, sd), (red, _) = _mean_sd(cells[3]), _mean_sd(cells[4])
        out.setdefault(method, []).append((red, md, sd))
    return out


def main() -> None:
    a = parse_args()
    out, md = Path(a.out_dir), Path(a.md)
    kept, cmds = ({}, []) if a.fresh else previous(md)
    res = train_all(a, out)
    if (None, "vanilla") not in res:
        raise SystemExit(f"no vanilla runs under {out}: run without --report-only first")
    new = table_rows(res, a.seeds)
    rows = {**kept, **new}
    here = command_line()
    cmds = [c for c in cmds if c != here] + [here]
    body = [*HEADER, *(rows[k] for k in sorted(rows, key=_rank))]
    van = res[(None, "vanilla")]
    body += ["", f"Vanilla: {fmt([v['test_acc'] for v in van.values()], pct=True)}% "
             f"(seeds {sorted(van)}; majority class {100 * next(iter(van.values()))['majority_acc']:.1f}%)."]
    png = md.with_suffix(".png")
    plot(points(rows), png)
    body += ["", f"![accuracy change vs FLOPs reduction]({png.name})"]
    notes = [
        "Every compressing run is `python -m hashexp experiment=pareto_mlp2048 <method> schedule.final_ratio=R "
        "seed=S`: the same cubic width ramp (steps 100-600, a rehash every 100 steps), so all methods have the same "
        "widths at every step; small is trained from scratch at the hashed run's final widths. Δ is paired by seed "
        "against vanilla (`hashing=none`, seeds 0-2). magnitude, random and neuron_merging score every site on the "
        "network before the rehash, as their papers do (`hashing.scoring=original`, the default since issue 22); "
        f"rows labelled `{OLD}` are the same baselines scored site by site after the upstream sites were cut, "
        "kept for one release. The wall ratio is vanilla's wall time over the run's, same seed, only for runs trained "
        "in the same invocation as that vanilla run (2 runs at a time, one thread each, shared 2-core machine); "
        "\"—\": not trained side by side. train − test: accuracy gap in pp; Σ‖W‖, Σ‖∇W‖: sums over layers of the "
        "weight and gradient norms in the last logged step.",
        "", "The table accumulates; the invocations whose rows it holds, oldest first (the first one before issue "
        "22, when the baselines scored sequentially):", *(f"- `{c}`" for c in cmds),
        *(x for n in a.note for x in ("", n))]
    text = write_markdown(md, TITLE, body, command=here, notes=notes)
    print(text)


def plot(points: dict[str, list[tuple[float, float, float]]], path: Path) -> None:
    """Accuracy change (pp) vs FLOPs reduction, log x, error bars over seeds, one entry per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shown = sorted((m for m in points if points[m]), key=lambda m: _rank(("0", m)))
    for i, method in enumerate(shown):
        pts = sorted(points[method])
        shift = 1.0 + 0.02 * (i - (len(shown) - 1) / 2)  # side by side at each budget (log x)
        old = OLD in method
        ax.errorbar([p[0] * shift for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="x" if old else "o", capsize=3, label=method.replace(OLD, "sequential"),
                    linestyle=(":" if old else "-") if len(pts) > 1 else "none", alpha=0.6 if old else 1.0)
    ax.axhline(0.0, color="k", lw=0.8, ls="--", label="vanilla")
    ax.set_xscale("log")
    ticks = sorted({round(p[0]) for pts in points.values() for p in pts})
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("FLOPs reduction vs vanilla (x, log scale)")
    ax.set_ylabel("test accuracy change vs vanilla (pp)")
    ax.set_title("Fashion-MNIST, MLP 784-2048-2048, 10 epochs (mean ± sd over seeds)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
