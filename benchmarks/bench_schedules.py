"""Rehash schedules and hash families: fixed vs per-layer vs drift, SimHash vs learnable.

    .venv/bin/python benchmarks/bench_schedules.py            # full: writes benchmarks/bench_schedules.md
    .venv/bin/python benchmarks/bench_schedules.py --smoke    # 1 seed, 1 epoch, data subset: proves it runs

Setting: experiment=fmnist_mlp2048 (Fashion-MNIST, MLP 784-2048-2048-10, 10 epochs, batch 256,
Adam; the preset's hashing target and threshold; at most 3 rehashes per site), 3 seeds.
Contenders, each with hashing=simhash and hashing=learnable:

* fixed: every site every E steps from step 100, for E in a small grid (100, 300, 900); the
  best E (mean test accuracy) is the fixed baseline;
* per_layer: fc1 from step 100 every 200, fc2 from step 200 every 400;
* drift: from step 100 a check every 50 steps, rehash on bit-flip >= 0.15 or partner
  fraction >= 0.05, at least 100 steps apart.

Every run is the app itself (``python -m hashexp -m ...``, one multirun per contender); the
table is read from each run's metrics.json and history.csv only. Reported: final test accuracy
(next to the majority-class accuracy), final FLOPs and parameters, rehash events, wall time,
hash time, and the drift metric's own cost as a share of training time. Separately, in
process: collision precision/recall of SimHash vs the learnable hash at equal K, L on the real
sites of the same network at its first rehash (and later points), against the exact pairs
with cosine >= threshold.

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
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hashexp.results import read_history, read_metrics  # noqa: E402

FULL = {
    "seeds": [0, 1, 2],
    "common": ["experiment=fmnist_mlp2048"],
    "fixed_every": [100, 300, 900],
    "start": 100,
    "per_layer": "{fc1:{start:100,every:200},fc2:{start:200,every:400}}",
    "drift": ["schedule.check_every=50", "schedule.min_interval=100"],
    "pr_steps": [100, 235, 1175],
}
SMOKE = {
    "seeds": [0],
    "common": ["experiment=fmnist_mlp2048", "trainer.epochs=1", "dataset.subset_train=4096",
               "dataset.subset_test=2000", "model.widths=[512,512]"],
    "fixed_every": [4, 8],
    "start": 4,
    "per_layer": "{fc1:{start:4,every:4},fc2:{start:6,every:8}}",
    "drift": ["schedule.check_every=4", "schedule.min_interval=4", "schedule.flip_threshold=0.03"],
    "pr_steps": [4, 16],
}
HASHINGS = ["simhash", "learnable"]


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
    cmd = [sys.executable, "-m", "hashexp", "-m", *p["common"], f"hashing={','.join(HASHINGS)}",
           f"seed={','.join(map(str, p['seeds']))}", f"tag=bench_schedules/{name}", "trainer.logging.progress=none",
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
    definitions of the pairs to find: cosine >= hashing.threshold (near-duplicates), and the
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
    r = {"step": step, "site": site.name, "width": x.shape[0], "near_dup_pairs": int((pc >= comp.threshold).sum()),
         "top_k": k, "top_cut": top_cut, "positives": rec["positives"], "train_s": t_train}
    for tag, thr in (("dup", comp.threshold), ("top", top_cut)):
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


def render(rows, pr, args, p, names, cmd_line, elapsed) -> str:
    S = summarize(rows)
    L = [f"# Rehash schedules and hash families{' (SMOKE: 1 seed, 1 epoch, subset; not a result)' if args.smoke else ''}",
         "", f"Command: `{cmd_line}`", "",
         f"{dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
         f"torch {__import__('torch').__version__}; {len(rows)} runs, "
         f"{sum(r.get('wall_time_s', 0.0) for r in rows) / 60:.0f} min of runs in all"
         f"{' (table re-read from them with --reuse)' if args.reuse else ''}. "
         f"Overrides common to all runs: `{' '.join(p['common'])}`; seeds {p['seeds']}.", "",
         "Mean ± sd over seeds. Accuracy is final test accuracy (majority-class accuracy of the split next to it). "
         "Times are absolute seconds of sequential runs on one machine: compare them within this table only; wall "
         "includes start-up and data loading (paid mostly by the first job of each multirun), train = the training "
         "loop with its rehashes (hash s) and drift checks. Drift metric % = drift-check seconds (history.csv "
         "drift/metric_s) / (train - hash - check seconds).",
         "", "| contender | hashing | runs | test acc | majority | final MFLOPs | params | rehash steps | site rehashes | wall s | train s | hash s | drift metric % |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for h in HASHINGS:
            s = S.get((name, h))
            if s is None:
                L.append(f"| {name} | {h} | 0 | failed | | | | | | | | | |")
                continue
            rs = s["rows"]
            L.append(f"| {name} | {h} | {s['n']} | {_ms([r['test_acc'] * 100 for r in rs], '.2f')} | "
                     f"{_ms([r['majority_acc'] * 100 for r in rs], '.1f')} | {_ms([r['flops'] / 1e6 for r in rs], '.3f')} | "
                     f"{_ms([r['params'] for r in rs], '.0f')} | {_ms([r['rehashes'] for r in rs], '.1f')} | "
                     f"{_ms([r['site_rehashes'] for r in rs], '.1f')} | "
                     f"{_ms([r['wall_time_s'] for r in rs], '.1f')} | {_ms([r['train_time_s'] for r in rs], '.1f')} | "
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
    if pr:
        L += ["", "## Collision precision / recall at equal K, L (real sites, seed 0)", "",
              "The network of the first contender trained (Adam, batch 256, no rehash) for `step` steps; per site, "
              "SimHash and the learnable hash start from the same projections (hashing=learnable's K, L, min_tables) "
              "and the learnable one is trained with the hashing=learnable settings. P/R of the pairs sharing a "
              "bucket in >= min_tables tables, against two sets of pairs to find: near-duplicates (cosine >= "
              "hashing.threshold) and the top-k most similar pairs (k = hashing.max_pos: what a target width merges "
              "first, and what the hash is trained on). P/R on a set with no pairs is reported as '-'.", "",
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
    L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, subset, MLP 512: proves the script runs")
    ap.add_argument("--outputs", default=None, help="run directories go here (default outputs/bench_schedules[_smoke]/<time>)")
    ap.add_argument("--reuse", action="store_true", help="only re-read --outputs and rewrite the table")
    ap.add_argument("--only", default=None, help="comma-separated contenders to run (default: all)")
    ap.add_argument("--no-pr", action="store_true", help="skip the collision precision/recall study")
    ap.add_argument("--md", default=None, help="markdown output (default benchmarks/bench_schedules[_smoke].md)")
    a = ap.parse_args()
    p = SMOKE if a.smoke else FULL
    suffix = "_smoke" if a.smoke else ""
    out = Path(a.outputs or ROOT / "outputs" / f"bench_schedules{suffix}" / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    md = Path(a.md or Path(__file__).with_name(f"bench_schedules{suffix}.md"))
    allc = contenders(p)
    names = [n for n in allc if a.only is None or n in a.only.split(",")]
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if not a.reuse:
        out.mkdir(parents=True, exist_ok=True)
        for n in names:
            w = run_multirun(n, allc[n], p, out, log)
            log(f"  {n}: {w:.0f}s")
    rows = collect(out, names)
    pr = [] if a.no_pr else collision_study(p, log)
    cmd_line = ".venv/bin/python benchmarks/bench_schedules.py" + (" --smoke" if a.smoke else "")
    text = render(rows, pr, a, p, names, cmd_line, time.perf_counter() - t0)
    md.write_text(text)
    (out / "bench_schedules.json").write_text(json.dumps({"runs": rows, "pr": pr}, indent=1, default=str))
    print(text)
    print(f"-> {md}")


if __name__ == "__main__":
    main()
