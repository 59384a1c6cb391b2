"""Rehash schedules and hash families: fixed vs per-layer vs drift, SimHash vs learnable.

    nice -n 10 .venv/bin/python benchmarks/bench_schedules.py                 # quick preset: bench_schedules.md
    nice -n 10 .venv/bin/python benchmarks/bench_schedules.py --preset full   # the 2048 setting, ~90 min of runs
    .venv/bin/python benchmarks/bench_schedules.py --preset smoke             # proves it runs

Presets (``PRESETS``): ``full`` is experiment=fmnist_mlp2048 as shipped (Fashion-MNIST, MLP
784-2048-2048-10, 10 epochs, batch 256, Adam, the preset's hashing target, at most 3 rehashes per
site; 30 runs of about 2.5 minutes each on this machine); ``quick`` (the default, the committed
table) is the same preset on MLP 784-512-512-10, 3 epochs on 15,000 training images, with the
schedule steps scaled to its ~176 steps; ``smoke`` is one seed on a subset. Seeds from
``harness.seeds``. Contenders, each with hashing=simhash and hashing=learnable:

* fixed: every site every E steps from ``start``, for E in a small grid; the best E (mean test
  accuracy) is the fixed baseline;
* per_layer: fc1 early and often, fc2 later and half as often;
* drift: a check every few steps from ``start``, rehash on bit-flip >= 0.15 or partner fraction
  >= 0.05, at least ``min_interval`` steps apart.

Every run is the app itself (``python -m hashexp -m ...``, one multirun per contender); the
table is read from each run's metrics.json and history.csv only. Reported: final test accuracy
(next to the majority-class accuracy), final FLOPs and parameters, rehash events, hash time and
the drift metric's own cost as a share of training time (both measured inside one run; times of
separate runs are not divided by each other). Separately, in process: collision precision/recall
of SimHash vs the learnable hash at equal K, L on the real sites of the same network at a few
steps, against the exact pairs with cosine >= threshold and the top-k most similar pairs.

Goals: drift within 0.3 pp of the best fixed schedule's accuracy at equal or smaller final
FLOPs with at most half as many rehashes; learnable hashing gives higher recall at equal
precision than SimHash and no worse final accuracy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import PY, ROOT, command_line, read_history, read_metrics, seeds, write_markdown  # noqa: E402

PRESETS = {
    "full": {
        "seeds": 3, "common": ["experiment=fmnist_mlp2048"], "fixed_every": [100, 300, 900], "start": 100,
        "per_layer": "{fc1:{start:100,every:200},fc2:{start:200,every:400}}",
        "drift": ["schedule.check_every=50", "schedule.min_interval=100"], "pr_steps": [100, 235, 1175],
    },
    "quick": {
        "seeds": 3, "common": ["experiment=fmnist_mlp2048", "model.widths=[512,512]", "trainer.epochs=3",
                               "dataset.subset_train=15000", "trainer.num_threads=1"],
        "fixed_every": [15, 30, 60], "start": 20, "per_layer": "{fc1:{start:20,every:30},fc2:{start:35,every:60}}",
        "drift": ["schedule.check_every=10", "schedule.min_interval=20"], "pr_steps": [20, 60, 140],
    },
    "smoke": {
        "seeds": 1, "common": ["experiment=fmnist_mlp2048", "trainer.epochs=1", "dataset.subset_train=4096",
                               "dataset.subset_test=2000", "model.widths=[512,512]", "trainer.num_threads=1"],
        "fixed_every": [4, 8], "start": 4, "per_layer": "{fc1:{start:4,every:4},fc2:{start:6,every:8}}",
        "drift": ["schedule.check_every=4", "schedule.min_interval=4", "schedule.flip_threshold=0.03"],
        "pr_steps": [4, 16],
    },
}
HASHINGS = ["simhash", "learnable"]
NEAR_DUP = 0.7  # near-duplicate cosine where hashing.threshold is null (the weight rule's default)


def contenders(p: dict) -> dict[str, list[str]]:
    """name -> overrides (besides hashing and seed)."""
    out = {}
    for e in p["fixed_every"]:
        out[f"fixed_e{e}"] = ["schedule=fixed", "schedule.unit=step", f"schedule.start={p['start']}",
                              f"schedule.every={e}"]
    out["per_layer"] = ["schedule=per_layer", "schedule.unit=step", f"schedule.sites={p['per_layer']}"]
    out["drift"] = ["schedule=drift", f"schedule.start={p['start']}", *p["drift"]]
    return out


# ------------------------------------------------------------------------------ running
def run_multirun(name: str, overrides: list[str], p: dict, out: Path, log) -> float:
    env = dict(os.environ, HASHEXP_OUTPUTS=str(out / name), WANDB_MODE="disabled")
    cmd = [PY, "-m", "hashexp", "-m", *p["common"], f"hashing={','.join(HASHINGS)}",
           f"seed={','.join(map(str, seeds(p['seeds'])))}", f"tag=bench_schedules/{name}", "trainer.logging.progress=none",
           "trainer.checkpoint.enabled=false", *overrides]
    log(f"$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log(proc.stdout[-2000:] + proc.stderr[-2000:])
        raise SystemExit(f"multirun {name} failed ({proc.returncode})")
    return wall


def collect(out: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        for st in sorted((out / name).rglob(".hydra")):
            run = st.parent
            mpath = run / "metrics.json"
            if not mpath.exists():
                status = json.loads((run / "status.json").read_text()) if (run / "status.json").exists() else {}
                rows.append({"contender": name, "status": "failed", "error": status.get("error", "?"), "run": str(run)})
                continue
            m = read_metrics(run)
            m["contender"], m["run"] = name, str(run)
            # rehash events are steps with any rehash; site rehashes count each layer rehashed
            m["site_rehashes"] = sum(len(e.get("sites") or []) for e in m.get("rehash_events", []))
            m.update(drift_cost(run, m))
            rows.append(m)
    return rows


def drift_cost(run: Path, m: dict) -> dict:
    """Drift metric seconds (history.csv drift rows) relative to the training time around them."""
    drift = [r for r in read_history(run) if r["kind"] == "drift" and "drift/metric_s" in r]
    if not drift:  # not a drift schedule (or no history.csv)
        return {}
    metric = sum(r["drift/metric_s"] for r in drift)
    checks = len({r["step"] for r in drift})
    train = m["train_time_s"] - m["hash_time_s"] - metric
    return {"drift_metric_s": metric, "drift_checks": checks,
            "drift_metric_pct": 100.0 * metric / train if train > 0 else float("nan")}


# ------------------------------------------------------------------------------ collision P/R
def collision_study(p: dict, log) -> list[dict]:
    """SimHash vs learnable hash at equal K, L on the real sites of the benchmark network."""
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from hashexp.app import build_rehasher
    from hashexp.data import BatchIterator, build_dataset
    from hashexp.models import build_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*p["common"], "hashing=learnable", "seed=0"])
    torch.manual_seed(0)
    data = build_dataset(cfg.dataset, seed=0)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    comp = build_rehasher(cfg.hashing, 0).compressor
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg.trainer.optimizer.lr))
    steps = sorted(p["pr_steps"])
    out, step = [], 0
    gen = torch.Generator().manual_seed(0)
    while step < steps[-1]:
        for xb, yb in BatchIterator(data.x_train, data.y_train, int(cfg.trainer.batch_size), shuffle=True, generator=gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step in steps:
                for index, site in enumerate(model.merge_sites()):
                    out.append(pr_site(comp, site, index, step, log))
            if step >= steps[-1]:
                break
    return out


def pr_site(comp, site, index: int, step: int, log) -> dict:
    """P/R of SimHash and of the learnable hash (same initial projections) on one site, at two
    definitions of the pairs to find: cosine >= hashing.threshold (near-duplicates; NEAR_DUP when it
    is null, the member cosine the weight rule defaults to), and the
    max_pos most similar pairs (what a target width merges first; also what the hash trains on)."""
    import torch

    from hashexp.lsh import SimHash
    from hashexp.lsh.learnable import LearnableSimHash, collision_pr

    x = comp.hash_vectors(site).detach().cpu()
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    iu = torch.triu_indices(len(u), len(u), 1)
    pc = (u @ u.T)[iu[0], iu[1]]
    k = min(comp.max_pos, len(pc))
    top_cut = float(torch.topk(pc, k).values[-1])
    seed = 1000 + index
    sim = SimHash(x.shape[1], comp.bits, comp.tables, seed=seed)
    lh = LearnableSimHash(x.shape[1], comp.bits, comp.tables, seed=seed)
    t0 = time.perf_counter()
    rec = comp.train_hasher(site, index, lh, x)
    t_train = time.perf_counter() - t0
    dup = NEAR_DUP if comp.threshold is None else comp.threshold
    r = {"step": step, "site": site.name, "width": x.shape[0], "near_dup_pairs": int((pc >= dup).sum()),
         "top_k": k, "top_cut": top_cut, "positives": rec["positives"], "train_s": t_train}
    for tag, thr in (("dup", dup), ("top", top_cut)):
        r[f"{tag}_simhash"] = collision_pr(x, sim, thr, comp.min_tables)
        r[f"{tag}_learnable"] = collision_pr(x, lh, thr, comp.min_tables)
    log(f"  P/R step {step} {site.name}: near-dup ({r['near_dup_pairs']} pairs) simhash %.3f/%.3f learnable %.3f/%.3f; "
        f"top-{k} (cos >= {top_cut:.3f}) simhash %.3f/%.3f learnable %.3f/%.3f"
        % (*r["dup_simhash"], *r["dup_learnable"], *r["top_simhash"], *r["top_learnable"]))
    return r


# ------------------------------------------------------------------------------ table
def _ms(vals: list[float], fmt: str) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def summarize(rows: list[dict]) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["contender"], r["hashing"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        mean = lambda key: statistics.mean(r[key] for r in rs)  # noqa: E731
        out[k] = {"rows": rs, "n": len(rs), "acc": mean("test_acc"), "flops": mean("flops"),
                  "params": mean("params"), "rehashes": mean("rehashes"),
                  "site_rehashes": mean("site_rehashes"), "wall": mean("wall_time_s")}
    return out


def _same_runs(a: list[dict], b: list[dict]) -> bool:
    """Two contenders' runs ended alike seed by seed (widths and test accuracy)."""
    key = lambda rs: sorted((r["seed"], r["test_acc"], json.dumps(r["widths"], sort_keys=True)) for r in rs)  # noqa: E731
    return key(a) == key(b)


def render(rows, pr, args, p, names) -> list[str]:
    """The markdown body: the runs' table, the goals, the collision study."""
    S = summarize(rows)
    L = [*(["**SMOKE: 1 seed, 1 epoch, subset; not a result.**", ""] if args.preset == "smoke" else []),
         f"Preset `{args.preset}`: overrides common to all runs `{' '.join(p['common'])}`; seeds "
         f"{seeds(p['seeds'])}; {len(rows)} runs, {sum(r.get('train_time_s', 0.0) for r in rows) / 60:.0f} min of "
         f"training in all{' (table re-read from them with --reuse)' if args.reuse else ''}.", "",
         "Mean ± sd over seeds. Accuracy is final test accuracy (majority-class accuracy of the split next to it). "
         "train s = the training loop with its rehashes (hash s) and drift checks, absolute seconds of runs made one "
         "after another on a shared machine (compare within this table only; no ratio is taken between runs). "
         "Drift metric % = drift-check seconds (history.csv drift/metric_s) / (train - hash - check seconds), "
         "measured inside each run.",
         "", "| contender | hashing | runs | test acc | majority | final MFLOPs | params | rehash steps | site rehashes "
         "| train s | hash s | drift metric % |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for h in HASHINGS:
            s = S.get((name, h))
            if s is None:
                L.append(f"| {name} | {h} | 0 | failed | | | | | | | | |")
                continue
            rs = s["rows"]
            L.append(f"| {name} | {h} | {s['n']} | {_ms([r['test_acc'] * 100 for r in rs], '.2f')} | "
                     f"{_ms([r['majority_acc'] * 100 for r in rs], '.1f')} | {_ms([r['flops'] / 1e6 for r in rs], '.3f')} | "
                     f"{_ms([r['params'] for r in rs], '.0f')} | {_ms([r['rehashes'] for r in rs], '.1f')} | "
                     f"{_ms([r['site_rehashes'] for r in rs], '.1f')} | {_ms([r['train_time_s'] for r in rs], '.1f')} | "
                     f"{_ms([r['hash_time_s'] for r in rs], '.2f')} | "
                     f"{_ms([r.get('drift_metric_pct') for r in rs], '.3f')} |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        L += ["", "Failed runs:"] + [f"- {r['contender']} {r['run']}: {r.get('error')}" for r in failed]
    fixed = [n for n in names if n.startswith("fixed_")]
    L += ["", "## Goals", ""]
    for h in HASHINGS:
        cands = [(S[(n, h)]["acc"], n) for n in fixed if (n, h) in S]
        if not cands or ("drift", h) not in S:
            L.append(f"- {h}: not enough runs to compare")
            continue
        best = S[(max(cands)[1], h)]
        d = S[("drift", h)]
        dacc = (d["acc"] - best["acc"]) * 100
        ok = dacc >= -0.3 and d["flops"] <= best["flops"] and d["site_rehashes"] <= 0.5 * best["site_rehashes"]
        L.append(f"- {h}: best fixed = {max(cands)[1]} ({best['acc'] * 100:.2f}%, {best['flops'] / 1e6:.3f} MFLOPs, "
                 f"{best['site_rehashes']:.1f} site rehashes in {best['rehashes']:.1f} steps); drift "
                 f"{d['acc'] * 100:.2f}% (Δ {dacc:+.2f} pp), FLOPs ×{d['flops'] / best['flops']:.3f}, site rehashes "
                 f"×{d['site_rehashes'] / max(best['site_rehashes'], 1e-9):.2f} ({d['site_rehashes']:.1f} in "
                 f"{d['rehashes']:.1f} steps) -> drift goal (Δ ≥ -0.3 pp, FLOPs ≤, site rehashes ≤ ½): "
                 f"**{'met' if ok else 'not met'}**")
    both = [n for n in names if (n, "learnable") in S and (n, "simhash") in S]
    diffs = {n: (S[(n, "learnable")]["acc"] - S[(n, "simhash")]["acc"]) * 100 for n in both}
    if diffs:
        L.append("- learnable − simhash final accuracy per contender (pp): "
                 + ", ".join(f"{n} {d:+.2f}" for n, d in diffs.items())
                 + f" -> no worse on average: **{'met' if statistics.mean(diffs.values()) >= 0 else 'not met'}**")
        if all(_same_runs(S[(n, "simhash")]["rows"], S[(n, "learnable")]["rows"]) for n in both):
            L.append("- The hash family changed no run here: per seed, both hashings end at the same widths and the "
                     "same test accuracy in every contender (only hash s differs). With compensation=lsq the hash "
                     "only marks which neurons may go (those in any candidate pair); the error-ordered plan picks "
                     "among them, and when every neuron collides with some other in one of the tables (likely at "
                     "these widths with 16 tables of 6 bits), the hash has nothing left to decide.")
    if pr:
        L += ["", "## Collision precision / recall at equal K, L (real sites, seed 0)", "",
              "The network of the first contender trained (Adam, batch 256, no rehash) for `step` steps; per site, "
              "SimHash and the learnable hash start from the same projections (hashing=learnable's K, L, min_tables) "
              "and the learnable one is trained with the hashing=learnable settings. P/R of the pairs sharing a "
              "bucket in >= min_tables tables, against two sets of pairs to find: near-duplicates (cosine >= "
              f"hashing.threshold, {NEAR_DUP} where it is null) and the top-k most similar pairs (k = "
              "hashing.max_pos: what a target width merges first, and what the hash is trained on). P/R on a set with no pairs is reported as '-'.", "",
              "| step | site | width | near-dup pairs | top-k cos >= | SimHash P/R near-dup | learnable P/R near-dup "
              "| SimHash P/R top-k | learnable P/R top-k | train s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda pr_, ok=True: f"{pr_[0]:.3f} / {pr_[1]:.3f}" if ok else "-"  # noqa: E731
        for r in pr:
            nd = r["near_dup_pairs"] > 0
            L.append(f"| {r['step']} | {r['site']} | {r['width']} | {r['near_dup_pairs']} | {r['top_cut']:.3f} | "
                     f"{f(r['dup_simhash'], nd)} | {f(r['dup_learnable'], nd)} | {f(r['top_simhash'])} | "
                     f"{f(r['top_learnable'])} | {r['train_s']:.2f} |")
        step0 = min(r["step"] for r in pr)
        first = [r for r in pr if r["step"] == step0]
        ok = all(r["top_learnable"][1] >= r["top_simhash"][1] and r["top_learnable"][0] >= r["top_simhash"][0] - 0.01
                 for r in first)
        L.append("")
        L.append(f"Goal (learnable recall ≥ SimHash recall at precision no lower, top-k pairs, first rehash step "
                 f"{step0}, all sites): **{'met' if ok else 'not met'}**")
        live = [r for r in first if r["near_dup_pairs"] > 0]
        if live:
            ok = all(r["dup_learnable"][1] >= r["dup_simhash"][1] and r["dup_learnable"][0] >= r["dup_simhash"][0] - 0.01
                     for r in live)
            L.append(f"Same on near-duplicates (sites with any): **{'met' if ok else 'not met'}**")
        else:
            L.append("Near-duplicates: none at the first rehash step, not measurable there.")
    return L


def main() -> None:
    """Run (or re-read) the contenders, the collision study, and write the markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--outputs", default=None, help="run directories go here (default outputs/bench_schedules_<preset>/<time>)")
    ap.add_argument("--reuse", action="store_true", help="only re-read --outputs and rewrite the table")
    ap.add_argument("--only", default=None, help="comma-separated contenders to run (default: all)")
    ap.add_argument("--no-pr", action="store_true", help="skip the collision precision/recall study")
    ap.add_argument("--md", default=None, help="markdown output (default benchmarks/bench_schedules.md; "
                    "bench_schedules_<preset>.md for the other presets)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # the collision study; the runs set trainer.num_threads
    p = PRESETS[a.preset]
    out = Path(a.outputs or ROOT / "outputs" / f"bench_schedules_{a.preset}" / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    md = Path(a.md or Path(__file__).with_name("bench_schedules.md" if a.preset == "quick" else f"bench_schedules_{a.preset}.md"))
    allc = contenders(p)
    names = [n for n in allc if a.only is None or n in a.only.split(",")]
    log = lambda s: print(s, flush=True)  # noqa: E731
    if not a.reuse:
        out.mkdir(parents=True, exist_ok=True)
        for n in names:
            w = run_multirun(n, allc[n], p, out, log)
            log(f"  {n}: {w:.0f}s")
    rows = collect(out, names)
    pr = [] if a.no_pr else collision_study(p, log)
    (out / "bench_schedules.json").write_text(json.dumps({"runs": rows, "pr": pr}, indent=1, default=str))
    cmd = command_line([arg for arg in sys.argv if arg != "--reuse"])  # what made the runs (a --reuse only re-reads)
    print(write_markdown(md, "Rehash schedules and hash families", render(rows, pr, a, p, names), command=cmd))
    print(f"-> {md}")


if __name__ == "__main__":
    main()
