"""Benchmark: LSH vs exact all-pairs candidate generation for one merge site, 1e2 to 1e6 neurons.

    nice -n 10 .venv/bin/python benchmarks/bench_crossover.py        # writes bench_crossover.md (~10 min, 4 GB)
    .venv/bin/python benchmarks/bench_crossover.py --widths 100,1000 --thresholds 0.9 --no-real --out /tmp/x.md

Question: from which width on is hashing cheaper than computing every pair's cosine? Both
contenders return the pairs (i < j) whose cosine is >= the threshold (0.9, the goal's, and 0.7):

- **exact**: blocked all-pairs Gram matrix of the unit vectors, tiles of 1024 x 8192 of the
  upper triangle (never N x N), ``>= threshold`` per tile. At 1e6 neurons the full run would
  take hours: 24 tiles at random places are timed and the time per pair is extrapolated to
  N(N-1)/2 pairs; at 1e5 both the full run and the extrapolation are reported.
- **lsh**: SimHash fingerprints (row chunks) -> clsh tables -> candidate pairs (>= 1 shared
  bucket) -> exact cosine of each candidate -> pairs >= threshold. K and L from
  ``hashexp.lsh.params.choose_bits_tables(threshold, N, recall=0.95, dim=d)``. Beyond 2e7
  bucket entries (N x L) the tables are streamed in groups, so only one group's codes, tables
  and candidates are in memory.

Per width, one fresh process (its peak RSS is that width's alone): the two contenders timed in
the same rounds in a rotated order (benchmarks/harness.py ``interleave``; the ratio is the
median per-round ratio), peak memory above the phase's start (``harness.PeakRSS``), recall
(found true pairs / true pairs) and precision (true pairs / candidates, before verification).

Data (seed 0), d = 256: synthetic, 10% of the neurons in planted clusters of 4 (member =
a c + sqrt(1 - a^2) n around a unit centre c, a uniform in [0.98 sqrt t, min(0.995, sqrt t +
0.05)] so pair cosines straddle the threshold t), the rest random Gaussian directions (which
never reach 0.7 in 256 dimensions; the exact contender confirms the true set up to 1e5). Real:
the hidden layers ([w; b] rows) of an MLP 784-2048-1024-10 after 300 Adam steps on
Fashion-MNIST (``harness.trained_mlp_layers``), measured at the cosine of each layer's 100th and
1000th most similar pair, with the layer's mean pairwise cosine as ``background_cos``.
Everything runs on one thread (torch and clsh).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness import PeakRSS, interleave, load_average, trained_mlp_layers, write_markdown  # noqa: E402

import clsh
from hashexp.lsh import SimHash
from hashexp.lsh.params import choose_bits_tables, collision_probability, crossover_width, expected_background_pairs
from hashexp.utils.seeding import SITE_MIX, derive_seed

RECALL = 0.95
TILE_R, TILE_C = 1024, 8192
REAL_TOP = (100, 1000)  # real layers: thresholds at the 100th and 1000th most similar pair
FP_CHUNK = 16384
PAIR_CHUNK = 1 << 16
GROUP_ITEMS = 20_000_000  # bucket entries (neurons x tables) per streamed group of tables: 20 tables at 1e6


# ----------------------------------------------------------------- data


def planted(n: int, d: int, seed: int, frac: float = 0.1, cluster: int = 4,
            threshold: float = 0.9) -> tuple[torch.Tensor, np.ndarray]:
    """(n, d) float32 vectors with planted clusters, and the true pairs (P, 2), sorted i < j.

    Cluster members sit at random rows; see the module docstring for the construction. The
    member-to-centre cosines a are uniform in [0.98 sqrt(t), min(0.995, sqrt(t) + 0.05)] for
    threshold t ([0.93, 0.995] at 0.9), so pair cosines ~a_i a_j straddle t."""
    g = torch.Generator().manual_seed(seed)
    n_cl = int(n * frac) // cluster
    members = torch.randperm(n, generator=g)[: n_cl * cluster].view(n_cl, cluster)
    cl_of = torch.full((n,), -1, dtype=torch.long)
    cl_of[members.flatten()] = torch.arange(n_cl).repeat_interleave(cluster)
    a = torch.empty(n).uniform_(0.98 * math.sqrt(threshold), min(0.995, math.sqrt(threshold) + 0.05), generator=g)
    centres = torch.randn(max(n_cl, 1), d, generator=g)
    centres /= centres.norm(dim=1, keepdim=True)
    x = torch.empty(n, d)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        z = torch.randn(e - s, d, generator=g)
        c = cl_of[s:e]
        m = c >= 0
        if m.any():
            nz = z[m] / z[m].norm(dim=1, keepdim=True)
            am = a[s:e][m, None]
            z[m] = am * centres[c[m]] + (1 - am * am).sqrt() * nz
        x[s:e] = z
    # true pairs: exact cosines within each cluster
    if n_cl == 0:
        return x, np.zeros((0, 2), np.int64)
    u = x[members]  # (n_cl, cluster, d)
    u = u / u.norm(dim=2, keepdim=True)
    cos = u @ u.transpose(1, 2)
    iu, ju = torch.triu_indices(cluster, cluster, 1)
    cc = cos[:, iu, ju]
    pi, pj = members[:, iu], members[:, ju]
    keep = cc >= threshold
    i, j = torch.minimum(pi, pj)[keep], torch.maximum(pi, pj)[keep]
    pairs = torch.stack([i, j], 1).numpy()
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return x, pairs[order]


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------- contenders


def exact_pairs(u: torch.Tensor, t: float, rows: int | None = None) -> np.ndarray:
    """Pairs i < j with u_i . u_j >= t, by tiles of the upper triangle of the Gram matrix.

    ``rows``: only the first ``rows`` rows (for timing a part at 1e6)."""
    n = u.shape[0]
    out = []
    last = n if rows is None else min(n, rows)
    # one tile buffer and one mask buffer for the whole run: fresh 32 MB tiles per step would
    # fragment the heap (glibc serves them from brk once its mmap threshold has grown) and RSS
    # would climb with every tile row
    gbuf = torch.empty(TILE_R * TILE_C)
    mbuf = torch.empty(TILE_R * TILE_C, dtype=torch.bool)
    for i0 in range(0, last, TILE_R):
        i1 = min(n, i0 + TILE_R)
        a = u[i0:i1]
        for j0 in range(i0, n, TILE_C):
            j1 = min(n, j0 + TILE_C)
            g = gbuf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            torch.mm(a, u[j0:j1].T, out=g)
            mask = mbuf[: g.numel()].view(g.shape)
            torch.ge(g, t, out=mask)
            nz = mask.nonzero()
            if j0 == i0:  # the diagonal tile: keep j > i only (few pairs pass; filter them, not the tile)
                nz = nz[nz[:, 1] > nz[:, 0]]
            if len(nz):
                nz[:, 0] += i0
                nz[:, 1] += j0
                out.append(nz)
    if not out:
        return np.zeros((0, 2), np.int64)
    p = torch.cat(out).numpy()
    return p[np.lexsort((p[:, 1], p[:, 0]))]


def exact_tiles_time(u: torch.Tensor, t: float, n_tiles: int = 24) -> float:
    """Seconds for all N(N-1)/2 pairs, extrapolated from ``n_tiles`` full tiles at random
    places above the diagonal (min of 2 timings per tile, summed, scaled by the pair count)."""
    n = u.shape[0]
    g = torch.Generator().manual_seed(1)
    secs, done = 0.0, 0
    for _ in range(n_tiles):
        i0 = int(torch.randint(0, (n - TILE_R - TILE_C) // TILE_R, (1,), generator=g)) * TILE_R
        j0 = i0 + TILE_R + int(torch.randint(0, max(1, (n - i0 - TILE_R - TILE_C)), (1,), generator=g))
        a, b = u[i0:i0 + TILE_R], u[j0:j0 + TILE_C]
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            nz = ((a @ b.T) >= t).nonzero()
            best = min(best, time.perf_counter() - t0)
        del nz
        secs += best
        done += TILE_R * TILE_C
    return secs / done * n * (n - 1) / 2


def lsh_pairs(u: torch.Tensor, t: float, K: int, L: int, seed: int = 0) -> tuple[np.ndarray, int, dict]:
    """(verified pairs, candidate count, phase times) of SimHash + clsh + exact verification of
    the unit rows ``u`` (SimHash ignores norms, so hashing u gives x's codes).

    Streamed in groups of tables (at most GROUP_ITEMS bucket entries each): fingerprint the
    group, build its tables, list and verify its candidates, keep the verified pairs; the
    union over groups is the same as one pass over all L tables (a pair found in several
    groups is verified once per group: counted so in the candidates), at a fraction of the
    memory (codes, tables and candidate list exist for one group at a time)."""
    n = u.shape[0]
    times = {"fingerprint": 0.0, "tables": 0.0, "verify": 0.0}
    per = max(1, min(L, GROUP_ITEMS // max(n, 1)))
    un = u.numpy()
    found, n_cand = [], 0
    for gi, l0 in enumerate(range(0, L, per)):
        lg = min(per, L - l0)
        t0 = time.perf_counter()
        h = SimHash(u.shape[1], K, lg, seed=derive_seed(seed, gi, scale=SITE_MIX, weights=(1,)))
        codes = np.empty((n, lg), dtype=np.uint64)
        for s in range(0, n, FP_CHUNK):
            codes[s:s + FP_CHUNK] = h.fingerprint(u[s:s + FP_CHUNK])
        t1 = time.perf_counter()
        tab = clsh.LSHTables(lg, n_threads=1)
        tab.build(codes)
        del codes
        cand = tab.candidate_pairs(1)
        del tab
        t2 = time.perf_counter()
        keep = np.zeros(len(cand), dtype=bool)
        for s in range(0, len(cand), PAIR_CHUNK):  # np.take + einsum: the fastest gather measured here
            c = cand[s:s + PAIR_CHUNK]
            keep[s:s + len(c)] = np.einsum("ij,ij->i", np.take(un, c[:, 0], axis=0), np.take(un, c[:, 1], axis=0)) >= t
        found.append(cand[keep])
        n_cand += len(cand)
        del cand, keep
        t3 = time.perf_counter()
        times["fingerprint"] += t1 - t0
        times["tables"] += t2 - t1
        times["verify"] += t3 - t2
    t4 = time.perf_counter()
    f = np.concatenate(found) if len(found) > 1 else found[0]
    if len(found) > 1 and len(f):
        keys = np.unique(f[:, 0] * n + f[:, 1])
        f = np.stack([keys // n, keys % n], 1)
    times["verify"] += time.perf_counter() - t4
    times["groups"] = -(-L // per)
    return f, n_cand, times


def overlap(a: np.ndarray, b: np.ndarray, n: int) -> int:
    """Number of pairs in both (P, 2) arrays."""
    if len(a) == 0 or len(b) == 0:
        return 0
    ka = a[:, 0].astype(np.int64) * n + a[:, 1]
    kb = b[:, 0].astype(np.int64) * n + b[:, 1]
    return int(np.isin(ka, kb, assume_unique=True).sum())


# ----------------------------------------------------------------- one width
def bench_width(n: int, d: int, rounds: int, exact_mode: str, x=None, truth=None, threshold: float = 0.9,
                background_cos: float = 0.0) -> dict:
    """Both contenders on one site of width n (exact_mode: 'full', 'extrapolate' or 'both')."""
    if x is None:
        x, truth = planted(n, d, seed=0, threshold=threshold)
    u = x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))  # in place: one copy of the data (1 GiB at 1e6)
    K, L = choose_bits_tables(threshold, n, recall=RECALL, dim=d, background_cos=background_cos)
    res = {"n": n, "d": d, "K": K, "L": L, "true": len(truth), "lsh_mem": 0, "exact_mem": 0,
           "recalls": [], "precisions": [], "cands": []}
    lsh_pairs(u[:2000], threshold, K, L)  # warm-up (first calls allocate and load code)
    exact_pairs(u[:2000], threshold)

    def lsh(r: int) -> float:
        with PeakRSS() as m:
            t0 = time.perf_counter()
            found, n_cand, res["phases"] = lsh_pairs(u, threshold, K, L, seed=1000 + r)
            dt = time.perf_counter() - t0
        res["lsh_mem"] = max(res["lsh_mem"], m.delta)
        res["recalls"].append(overlap(found, truth, n) / max(1, len(truth)))
        res["precisions"].append(len(found) / max(1, n_cand))
        res["cands"].append(n_cand)
        return dt

    def exact(r: int) -> float:
        with PeakRSS() as m:
            t0 = time.perf_counter()
            ex = exact_pairs(u, threshold)
            dt = time.perf_counter() - t0
        res["exact_mem"] = max(res["exact_mem"], m.delta)
        res["exact_found"], res["exact_recall"] = len(ex), overlap(ex, truth, n) / max(1, len(truth))
        return dt

    t = interleave({"lsh": lsh, **({"exact": exact} if exact_mode != "extrapolate" else {})}, repeats=rounds, warmup=0)
    res["lsh_s"] = t["lsh"].times
    res["exact_s"] = t["exact"].times if "exact" in t.timings else []
    if "exact" in t.timings:
        res["ratio"] = t.ratio("exact", "lsh").median
    if exact_mode in ("extrapolate", "both"):
        with PeakRSS() as m:
            res["exact_extrap_s"] = exact_tiles_time(u, threshold)
        res["exact_mem"] = max(res["exact_mem"], m.delta)
        res.setdefault("ratio", res["exact_extrap_s"] / statistics.median(res["lsh_s"]))
    return res


def one_width(n: int, d: int, threshold: float) -> dict:
    """The measurement of one synthetic width, sized by n (run in its own process)."""
    rounds = 9 if n <= 3_000 else 5 if n <= 10_000 else (2 if n <= 100_000 else 1)
    mode = "full" if n <= 10_000 else ("both" if n <= 100_000 else "extrapolate")
    r = bench_width(n, d, rounds, mode, threshold=threshold)
    r["threshold"] = threshold
    r["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return r


def real_rows() -> list[dict]:
    """The trained layers, each at the cosines of its REAL_TOP most similar pairs."""
    out = []
    for name, w in trained_mlp_layers((2048, 1024), 300, 0).items():
        uu = unit(w)
        cos = (uu @ uu.T)[tuple(torch.triu_indices(len(uu), len(uu), 1))]
        bg = float(cos.mean())
        for q in REAL_TOP:  # threshold: the cosine of the q-th most similar pair, 2 decimals
            t = math.floor(float(torch.topk(cos, q).values[-1]) * 100) / 100
            r = bench_width(w.shape[0], w.shape[1], 5, "full", x=w.clone(), truth=exact_pairs(uu, t), threshold=t,
                            background_cos=bg)
            r.update(layer=name, threshold=t, bg=bg, cos_max=float(cos.max()))
            print(f"  {name} t={t}: {r}", flush=True)
            out.append(r)
    return out


def main(argv=None) -> int:
    """Each width in a fresh process, then the real layers here; writes the markdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="100,300,1000,3000,10000,100000,1000000", help="at the first threshold")
    p.add_argument("--thresholds", default="0.9,0.7", help="the first one is the goal's (all widths)")
    p.add_argument("--other-widths", default="100,300,1000,3000,10000,100000",
                   help="widths for the other thresholds (at 0.7 and 1e6, L ~ 1000 tables)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--no-real", action="store_true", help="skip the trained Fashion-MNIST layers")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    p.add_argument("--one-width", type=float, nargs=2, help=argparse.SUPPRESS)  # internal: N threshold -> JSON
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.one_width:
        print("RESULT " + json.dumps(one_width(int(a.one_width[0]), a.dim, a.one_width[1])), flush=True)
        return 0
    t_start, load0 = time.perf_counter(), load_average()
    rows: dict[float, list[dict]] = {}
    for ti, t in enumerate(float(t) for t in a.thresholds.split(",")):
        rows[t] = []
        for n in (int(float(w)) for w in (a.widths if ti == 0 else a.other_widths).split(",")):
            print(f"threshold {t} width {n:,}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one-width", str(n), str(t), "--dim", str(a.dim)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"width {n} failed:\n{proc.stderr[-3000:]}")
            rows[t].append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
            print(f"  {rows[t][-1]}", flush=True)
    real = [] if a.no_real else real_rows()
    body = report(rows, real, a.dim, (load0, load_average()), time.perf_counter() - t_start)
    print(write_markdown(a.out, "Crossover: LSH vs exact all-pairs candidate generation, one merge site", body))
    return 0


# ----------------------------------------------------------------- report
def fmt_s(s: float) -> str:
    """Seconds, as ms below one second."""
    return f"{s:,.0f}" if s >= 100 else f"{s:.2f}" if s >= 1 else f"{s * 1000:.1f} ms"


def mib(b: float) -> str:
    """Bytes in MiB."""
    return f"{b / 2**20:,.0f}"


def crossover(rows: list[dict]) -> str:
    """Width where LSH becomes faster: log-linear interpolation of the exact/LSH time ratio."""
    pts = [(r["n"], r["ratio"]) for r in rows]
    for (n0, q0), (n1, q1) in zip(pts, pts[1:]):
        if q0 < 1 <= q1:
            f = -math.log(q0) / (math.log(q1) - math.log(q0))
            return f"{10 ** (math.log10(n0) + f * (math.log10(n1) - math.log10(n0))):,.0f} neurons"
    if pts and pts[0][1] >= 1:
        return f"below {pts[0][0]:,} neurons (LSH already faster there)"
    return f"above {pts[-1][0]:,} neurons (exact faster at every width measured)" if pts else "n/a"


def synthetic_table(t: float, trows: list[dict], d: int) -> list[str]:
    """One threshold's table, its crossover and its goal line."""
    L = [f"## Synthetic: planted clusters, threshold {t}", "",
         "| N | K x L | true pairs | candidates | LSH recall | LSH precision | LSH s (last round: fingerprint / tables / verify) "
         "| exact s | exact / LSH | LSH peak MiB | exact peak MiB | process peak MiB |",
         "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in trows:
        ph = r["phases"]
        ex = fmt_s(statistics.median(r["exact_s"])) if r["exact_s"] else f"{fmt_s(r['exact_extrap_s'])} (extrapolated)"
        if r["exact_s"] and "exact_extrap_s" in r:
            ex += f" (extrapolated: {fmt_s(r['exact_extrap_s'])})"
        L.append(f"| {r['n']:,} | {r['K']}x{r['L']} | {r['true']:,} | {int(statistics.median(r['cands'])):,} | "
                 f"{min(r['recalls']):.4f} | {statistics.median(r['precisions']):.4f} | "
                 f"{fmt_s(statistics.median(r['lsh_s']))} ({fmt_s(ph['fingerprint'])} / {fmt_s(ph['tables'])} / "
                 f"{fmt_s(ph['verify'])}) | {ex} | **{r['ratio']:.2f}x** | {mib(r['lsh_mem'])} | {mib(r['exact_mem'])} | "
                 f"{mib(r['process_peak_rss'])} |")
    L += ["", f"**Crossover width at threshold {t}: {crossover(trows)}** (exact / LSH ratio interpolated log-linearly "
          f"between widths); the cost model of `hashexp.lsh.params` puts it at {crossover_width(t, dim=d):,} "
          f"(`crossover_width({t}, dim={d})`). LSH recall is the least over the rounds (at N <= 300 a site holds "
          "under 40 true pairs: one miss costs 3-12%); the model's recall at the threshold and its background "
          "candidates per width: " + ", ".join(
              f"{r['n']:,}: {collision_probability(t, r['K'], r['L']):.3f} / "
              f"{expected_background_pairs(r['n'], r['K'], r['L']):,.0f}" for r in trows) + ".", ""]
    return L


def report(rows: dict[float, list[dict]], real: list[dict], d: int, loads, total: float) -> list[str]:
    """The markdown body: setting, one table per threshold, the 1e6 goal, the real layers."""
    L = [f"One thread for both contenders (torch.set_num_threads(1), clsh n_threads=1); numpy {np.__version__}; "
         f"load average (1 min) at start / end {loads[0]:.1f} / {loads[1]:.1f}; total {total / 60:.1f} min.", "",
         f"Task: the pairs (i < j) of one site's N neuron vectors (d = {d}) with cosine >= the threshold; the "
         "contenders, data and measures are in the script's docstring. Times: medians over rounds that time both "
         "contenders in a rotated order; exact / LSH is the median per-round ratio (against the extrapolation "
         "where exact is not run in full). Memory: peak RSS above the phase's start (the data itself, N x d "
         "float32, is not counted: 1 GiB at 1e6); process peak: the width's own process.", ""]
    for t, trows in rows.items():
        L += synthetic_table(t, trows, d)
    big = [r for r in next(iter(rows.values()), []) if r["n"] >= 1_000_000]
    if big:
        r, ls = big[0], statistics.median(big[0]["lsh_s"])
        ok = ls < 60 and min(r["recalls"]) >= 0.95 and r["process_peak_rss"] < 4 * 2**30
        L += [f"Goal at 1e6 (LSH < 60 s, recall >= 0.95 of pairs >= 0.9, memory < 4 GB): {fmt_s(ls)} s, recall "
              f"{min(r['recalls']):.4f}, peak {mib(r['lsh_mem'])} MiB above the data ({mib(r['process_peak_rss'])} "
              f"MiB for the whole process) -> **{'met' if ok else 'not met'}** (one thread).", ""]
    if real:
        L += ["## Real layers: MLP 784-2048-1024-10, 300 Adam steps on Fashion-MNIST", "",
              f"Each layer at the cosine of its {REAL_TOP[0]}th and {REAL_TOP[1]}th most similar pair (trained neurons "
              "seldom reach 0.7); the mean pairwise cosine is the rule's `background_cos`.", "",
              "| layer | N | threshold | max cosine | mean cosine | K x L | true pairs | candidates | LSH recall (min) "
              "| LSH precision | LSH ms | exact ms | exact / LSH | modelled crossover N |",
              "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in real:
            L.append(f"| {r['layer']} | {r['n']:,} | {r['threshold']:.2f} | {r['cos_max']:.3f} | {r['bg']:.3f} | "
                     f"{r['K']}x{r['L']} | {r['true']:,} | {int(statistics.median(r['cands'])):,} | "
                     f"{min(r['recalls']):.3f} | {statistics.median(r['precisions']):.3f} | "
                     f"{statistics.median(r['lsh_s']) * 1000:.1f} | {statistics.median(r['exact_s']) * 1000:.1f} | "
                     f"**{r['ratio']:.2f}x** | {crossover_width(r['threshold'], dim=r['d'], background_cos=r['bg']):,} |")
        L += ["", "Trained layers are where hashing does not pay at these widths: their most similar pairs sit at "
              "cosine ~0.3, where 95% recall needs hundreds of tables, and the exact Gram of a few thousand neurons "
              "takes well under a second."]
    return L


if __name__ == "__main__":
    sys.exit(main())
