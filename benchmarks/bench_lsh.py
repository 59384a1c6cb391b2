"""Benchmark: SimHash fingerprinting and clsh grouping, side by side with their peers.

Command (writes benchmarks/bench_lsh.md):

    .venv/bin/python benchmarks/bench_lsh.py

Two measurements, each in one run with every contender interleaved round by round and the
best of the rounds kept (the machine is shared; the minimum is the least disturbed run;
cells of a few milliseconds get more rounds):

1. Fingerprinting (N, d) float32 -> (N, L) codes of K bits: ``SimHash.fingerprint`` against a
   bare matmul of the same shape (``x @ P``, the floor: fingerprinting is that matmul plus
   sign and packing) and against faiss-cpu's ``IndexLSH(d, K*L).sa_encode`` (a random
   rotation to K*L dims, then sign bits).
2. Grouping (L tables of K-bit codes -> candidate pairs i < j colliding in >= m tables,
   deduplicated): clsh (``LSHTables.build`` + ``candidate_pairs``) against
   (a) numpy: per table one stable argsort of the codes (what ``np.unique`` does), pairs
       within each bucket enumerated with ``np.repeat``, then all tables' pair keys sorted
       and run-length counted; same sorted output as clsh;
   (b) faiss: ``IndexBinaryMultiHash(K*L, L, K)`` over the same codes (one hash map per
       K-bit chunk), ``add`` + ``range_search`` with a radius above K*L (every item sharing a
       bucket in any table), then the i < j pairs; m = 1 only, output left unsorted.
   All contenders get the same thread count (torch, faiss OpenMP, clsh); numpy is single-
   threaded by nature, so clsh on one thread is reported too.

Data: clusters of 8 near-duplicate vectors (Gaussian centres, members = centre + 0.25 * noise,
about 14 degrees from the centre), the situation the merge engine hashes for. Grouping uses
the SimHash codes of the d = 256 data. At N = 1e5 with 8-bit tables, random collisions alone
give ~N^2/2 * L/256 pairs (~8e7): that row is the large-output stress case, and m = 2 rows
show the same tables at a realistic candidate rate.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import clsh
from hashexp.lsh import SimHash

try:
    import faiss
except ImportError:  # reported as n/a
    faiss = None

HERE = Path(__file__).resolve().parent
LOAD = os.getloadavg()
FAISS_MAX_PAIRS = 2 * 10**7  # faiss range_search beyond this would dominate the run time


# ----------------------------------------------------------------- data and contenders


def clustered(n: int, d: int, seed: int, cluster: int = 8, noise: float = 0.25) -> torch.Tensor:
    """n float32 vectors in clusters of `cluster`, generated in chunks (d=4096, n=1e5 is 1.6 GB)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(-(-n // cluster), d, generator=g)
    x = torch.empty(n, d)
    step = 8192
    for s in range(0, n, step):
        e = min(n, s + step)
        x[s:e] = centres[torch.arange(s, e) // cluster] + noise * torch.randn(e - s, d, generator=g)
    return x


def numpy_pairs(codes: np.ndarray, m: int) -> np.ndarray:
    """Pairs colliding in >= m tables, the vectorized-numpy way (sorted, deduplicated)."""
    n, L = codes.shape
    keys = []
    for l in range(L):
        col = codes[:, l]
        order = np.argsort(col, kind="stable")
        s = col[order]
        start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        size = np.diff(np.r_[start, n])
        after = np.repeat(start + size, size) - np.arange(n) - 1  # bucket members after each position
        total = int(after.sum())
        if total == 0:
            continue
        a = np.repeat(np.arange(n), after)
        b = a + 1 + np.arange(total) - np.repeat(np.cumsum(after) - after, after)
        i, j = order[a], order[b]
        keys.append(np.minimum(i, j) * n + np.maximum(i, j))
    if not keys:
        return np.empty((0, 2), np.int64)
    k = np.sort(np.concatenate(keys))
    first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    if m > 1:
        count = np.diff(np.r_[first, len(k)])
        first = first[count >= m]
    u = k[first]
    return np.stack([u // n, u % n], 1)


def faiss_pairs(codes: np.ndarray, K: int) -> np.ndarray:
    """Pairs colliding in >= 1 table with faiss' multi-table binary hash (unsorted)."""
    n, L = codes.shape
    packed = np.ascontiguousarray(codes.astype(f"<u{K // 8}")).view(np.uint8).reshape(n, L * K // 8)
    index = faiss.IndexBinaryMultiHash(K * L, L, K)
    index.add(packed)
    lims, _, ids = index.range_search(packed, K * L + 1)
    q = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    keep = q < ids
    return np.stack([q[keep], ids[keep]], 1)


def clsh_pairs(codes: np.ndarray, m: int, threads: int) -> np.ndarray:
    t = clsh.LSHTables(codes.shape[1], n_threads=threads)
    t.build(codes)
    return t.candidate_pairs(m)


def interleaved_best(fns: dict, rounds: int, check=None, budget_s: float = 1.5, slow_s: float = 8.0) -> dict:
    """Best time (s) of each contender, contenders alternating within each round.

    At least `rounds` rounds; fast cells get more (up to 10x), so that a cell spends about
    `budget_s` per contender: millisecond timings need many samples on a shared machine. A
    contender whose run took longer than slow_s is not repeated (keeps the total bounded).
    check(name, output) validates each contender's first output (outside the timing).
    """
    best = {k: float("inf") for k in fns}
    r, planned = 0, rounds
    gc.collect()  # once per cell: a full collection with torch loaded takes tens of ms
    while r < planned:
        for k, fn in fns.items():
            if r > 0 and best[k] > slow_s:
                continue
            t0 = time.perf_counter()
            out = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
            if r == 0 and check is not None:
                check(k, out)
            del out
        if r == 0:
            planned = int(min(10 * rounds, max(rounds, budget_s / max(best.values()))))
        r += 1
    return best


# ----------------------------------------------------------------- the runs


def bench_fingerprint(ns, ds, configs, threads, rounds, datasets):
    rows = []
    for d in ds:
        for n in ns:
            x = datasets[(n, d)]
            for K, L in configs:
                h = SimHash(d, K, L, seed=1)
                P = h.projections
                fns = {"matmul": lambda: x @ P, "fingerprint": lambda: h.fingerprint(x)}
                if faiss is not None:
                    index = faiss.IndexLSH(d, K * L, True, False)
                    index.train(x[: max(1000, K * L)].numpy())
                    xn = x.numpy()
                    fns["faiss"] = lambda: index.sa_encode(xn)
                best = interleaved_best(fns, rounds)
                row = dict(n=n, d=d, K=K, L=L, **{k: v * 1e3 for k, v in best.items()})
                rows.append(row)
                print(f"fingerprint n={n} d={d} {K}x{L}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()),
                      flush=True)
    return rows


def bench_grouping(ns, configs, threads, rounds, datasets):
    rows = []
    for n in ns:
        x = datasets[(n, 256)]
        for K, L in configs:
            codes = SimHash(256, K, L, seed=1).fingerprint(x)
            t = clsh.LSHTables(L, n_threads=threads)
            t.build(codes)
            stats = t.stats()
            for m in (1, 2):
                ref = {}

                def check(name, out):
                    # every contender must produce the same pairs as clsh (the first contender)
                    if not ref:
                        ref["pairs"], ref["keys"] = len(out), out[:, 0] * n + out[:, 1]
                    elif name == "faiss":  # unsorted
                        assert len(out) == ref["pairs"], "faiss and clsh disagree"
                        if len(out) <= 2 * 10**7:
                            assert np.array_equal(np.sort(out[:, 0] * n + out[:, 1]), ref["keys"])
                    else:
                        assert np.array_equal(out[:, 0] * n + out[:, 1], ref["keys"]), f"{name} and clsh disagree"

                fns = {
                    "clsh": lambda: clsh_pairs(codes, m, threads),
                    "clsh_1t": lambda: clsh_pairs(codes, m, 1),
                    "numpy": lambda: numpy_pairs(codes, m),
                }
                # faiss' range search on ~1e8 results takes minutes: skipped there (noted in the table)
                if faiss is not None and m == 1 and sum(stats["pairs_per_table"]) <= FAISS_MAX_PAIRS:
                    fns["faiss"] = lambda: faiss_pairs(codes, K)
                best = interleaved_best(fns, rounds, check)
                row = dict(n=n, K=K, L=L, m=m, pairs=ref["pairs"], mean_bucket=stats["mean_bucket"],
                           max_bucket=stats["max_bucket"], **{k: v * 1e3 for k, v in best.items()})
                rows.append(row)
                ref.clear()
                print(f"grouping n={n} {K}x{L} m={m} pairs={row['pairs']}: "
                      + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()), flush=True)
    return rows


# ----------------------------------------------------------------- report


def fmt_ms(v):
    return "n/a" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def fmt_x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def markdown(fp_rows, grp_rows, threads, rounds, wall_s, command) -> str:
    out = ["# LSH core: fingerprinting and grouping vs peers", ""]
    out.append(f"Command: `{command}`")
    out.append("")
    out.append(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads for every contender "
        f"(torch.set_num_threads, faiss.omp_set_num_threads, clsh n_threads); best of {rounds} to {10 * rounds} interleaved rounds; "
        f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, "
        f"faiss {getattr(faiss, '__version__', 'n/a') if faiss else 'n/a'}; total {wall_s / 60:.1f} min."
    )
    out.append("")
    out.append(f"Load average (1 min) at start / end of the run: {LOAD[0]:.1f} / {os.getloadavg()[0]:.1f} "
               "(the machine is shared; ratios come from interleaved runs, absolute times do not transfer).")
    out.append("")
    out.append("Data: clusters of 8 near-duplicate float32 vectors (centre + 0.25 noise, ~14 degrees), see the script's "
               "docstring. Times in ms.")
    out.append("")
    out.append("## Fingerprinting: SimHash.fingerprint vs a bare matmul of the same shape and faiss IndexLSH")
    out.append("")
    out.append("| N | d | K x L | matmul `x @ P` | SimHash.fingerprint | fingerprint / matmul | faiss IndexLSH.sa_encode | faiss / fingerprint |")
    out.append("|---:|---:|:---:|---:|---:|---:|---:|---:|")
    for r in fp_rows:
        fa = r.get("faiss")
        out.append(f"| {r['n']:,} | {r['d']} | {r['K']}x{r['L']} | {fmt_ms(r['matmul'])} | {fmt_ms(r['fingerprint'])} | "
                   f"**{fmt_x(r['fingerprint'] / r['matmul'])}** | {fmt_ms(fa)} | "
                   f"{fmt_x(fa / r['fingerprint'] if fa else None)} |")
    ratios = [r["fingerprint"] / r["matmul"] for r in fp_rows]
    big = [r["fingerprint"] / r["matmul"] for r in fp_rows if r["n"] >= 10**4] or [float("nan")]
    out.append("")
    out.append(f"fingerprint / matmul: median {np.median(ratios):.2f}x, max {max(ratios):.2f}x over all rows; "
               f"max {max(big):.2f}x at N >= 1e4 (goal: within 1.5x). Small-N rows take a millisecond or less, "
               "where the fixed cost of a call shows.")
    out.append("")
    out.append("## Grouping: L tables of K-bit codes -> candidate pairs colliding in >= m tables")
    out.append("")
    out.append("clsh = `LSHTables.build` + `candidate_pairs` (sorted, deduplicated). numpy = stable argsort per table, "
               "pairs per bucket, sort + run-length count over tables (same output). faiss = "
               "`IndexBinaryMultiHash` add + range_search, i < j pairs, unsorted (m = 1 only; skipped beyond "
               f"{FAISS_MAX_PAIRS:.0e} collisions, where it takes minutes). 8x4 at N = 1e5 is the large-output "
               "stress case (random collisions alone: ~N^2/2 * L/256 pairs); m = 2 is the same tables at a "
               "realistic candidate count.")
    out.append("")
    out.append("| N | K x L | m | pairs | mean / max bucket | clsh | clsh 1 thread | numpy | faiss | numpy / clsh | faiss / clsh | numpy / clsh 1 thread |")
    out.append("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in grp_rows:
        fa = r.get("faiss")
        out.append(f"| {r['n']:,} | {r['K']}x{r['L']} | {r['m']} | {r['pairs']:,} | {r['mean_bucket']:.1f} / {r['max_bucket']} | "
                   f"{fmt_ms(r['clsh'])} | {fmt_ms(r['clsh_1t'])} | {fmt_ms(r['numpy'])} | "
                   f"{'skipped' if fa is None and r['m'] == 1 and faiss is not None else fmt_ms(fa)} | "
                   f"**{fmt_x(r['numpy'] / r['clsh'])}** | {fmt_x(fa / r['clsh'] if fa else None)} | "
                   f"{fmt_x(r['numpy'] / r['clsh_1t'])} |")
    at_max = [r for r in grp_rows if r["n"] == max(x["n"] for x in grp_rows)]
    if at_max:
        sp = [r["numpy"] / r["clsh"] for r in at_max]
        out.append("")
        out.append(f"At N = {at_max[0]['n']:,}: clsh is {min(sp):.1f}x to {max(sp):.1f}x faster than the numpy baseline "
                   "(goal: at least 5x).")
    out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--d", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=HERE / "bench_lsh.md")
    args = ap.parse_args(argv)
    configs = [(8, 4), (16, 8)]
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    fp_rows, grp_rows = [], []
    for d in args.d:
        datasets = {(n, d): clustered(n, d, seed=n + d) for n in args.n}
        if d == 256:
            grp_rows = bench_grouping(args.n, configs, args.threads, args.rounds, datasets)
        fp_rows += bench_fingerprint(args.n, [d], configs, args.threads, args.rounds, datasets)
        del datasets
        gc.collect()
    command = ".venv/bin/python benchmarks/bench_lsh.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = markdown(fp_rows, grp_rows, args.threads, args.rounds, time.perf_counter() - t0, command.strip())
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
