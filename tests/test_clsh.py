"""clsh against brute force: buckets, candidate pairs, union_groups, bad input.

The references are deliberately naive (np.unique per table, an N x N collision count,
a Python union-find), so agreement on random inputs is the invariant the merge engine relies on.
"""

import numpy as np
import pytest

import clsh

# ----------------------------------------------------------------- references


def ref_buckets(col: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR buckets of one table from np.unique: members ascending, buckets by smallest member."""
    order = np.argsort(ids)
    col, ids = col[order], ids[order]
    if len(ids) == 0:
        return np.zeros(1, np.int64), np.empty(0, np.int64)
    _, first, inverse = np.unique(col, return_index=True, return_inverse=True)
    group = np.argsort(np.argsort(first))[inverse]  # groups renumbered by first (= smallest) member
    members = ids[np.argsort(group, kind="stable")].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(group))]).astype(np.int64)
    return offsets, members


def csr_pairs(offsets: np.ndarray, members: np.ndarray) -> np.ndarray:
    """All (a, b), a < b, within each bucket, as keys a * BIG + b (vectorized)."""
    sizes = np.diff(offsets)
    pos = np.arange(len(members))
    after = np.repeat(offsets[1:], sizes) - pos - 1  # members after each position
    a = np.repeat(pos, after)
    b = a + 1 + np.arange(len(a)) - np.repeat(np.cumsum(after) - after, after)
    return members[a] * (1 << 31) + members[b]


def ref_pairs(codes: np.ndarray, ids: np.ndarray, m: int) -> np.ndarray:
    """Pairs id_a < id_b equal in >= m tables, lexicographic: an N x N collision count."""
    order = np.argsort(ids)
    codes, ids = codes[order], ids[order]
    hits = (codes[:, None, :] == codes[None, :, :]).sum(-1)
    a, b = np.nonzero(np.triu(hits >= m, k=1))
    return np.stack([ids[a], ids[b]], 1).astype(np.int64).reshape(-1, 2)


def rows(offsets, values):
    return [values[offsets[r] : offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]


def ref_union_groups(n, pairs, scores, max_group_size=0, max_merges=-1):
    parent = list(range(n))
    size = [1] * n

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    merges = 0
    order = sorted(range(len(scores)), key=lambda p: -scores[p])  # sorted() is stable
    for p in order:
        if merges == max_merges:
            break
        a, b = find(pairs[p][0]), find(pairs[p][1])
        if a == b or (max_group_size and size[a] + size[b] > max_group_size):
            continue
        parent[b] = a
        size[a] += size[b]
        merges += 1
    labels, seen = [], {}
    for i in range(n):
        labels.append(seen.setdefault(find(i), len(seen)))
    return labels


def random_codes(rng, n, L, kind):
    """Codes with plenty of collisions, in the value ranges the tables treat differently."""
    if kind == "small":  # few distinct values: dense direct-address path
        return rng.integers(0, 4, size=(n, L)).astype(np.uint64)
    if kind == "k1":  # K = 1: codes in {0, 1}
        return rng.integers(0, 2, size=(n, L)).astype(np.uint64)
    if kind == "k64":  # full 64-bit values incl. the high bit: hashed radix path
        pool = rng.integers(0, 2**63, size=6, dtype=np.uint64) | np.uint64(1 << 63)
        return pool[rng.integers(0, len(pool), size=(n, L))]
    if kind == "k24":  # wider than the direct-address range, but below 2^32: radix on low bits
        pool = rng.integers(0, 2**24, size=5, dtype=np.uint64)
        return pool[rng.integers(0, len(pool), size=(n, L))]
    if kind == "equal":
        return np.full((n, L), 12345, dtype=np.uint64)
    raise ValueError(kind)


KINDS = ["small", "k1", "k64", "k24", "equal"]


# ----------------------------------------------------------------- build, buckets, pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [0, 1, 2, 57, 300])
@pytest.mark.parametrize("L", [1, 3])
def test_buckets_and_pairs_match_brute_force(kind, n, L):
    rng = np.random.default_rng(n * 10 + L)
    codes = random_codes(rng, n, L, kind)
    t = clsh.LSHTables(L, n_threads=2)
    t.build(codes)
    ids = np.arange(n)
    assert len(t) == n and t.n_tables == L
    for table in range(L):
        off, mem = t.buckets(table)
        ref_off, ref_mem = ref_buckets(codes[:, table], ids)
        np.testing.assert_array_equal(off, ref_off)
        np.testing.assert_array_equal(mem, ref_mem)
        assert off.dtype == mem.dtype == np.int64
    for m in range(1, L + 1):
        got = t.candidate_pairs(min_tables=m)
        assert got.dtype == np.int64 and got.shape[1] == 2
        np.testing.assert_array_equal(got, ref_pairs(codes, ids, m))


def test_int64_codes_are_the_same_bits():
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 200, 2, "k64")
    a, b = clsh.LSHTables(2), clsh.LSHTables(2)
    a.build(codes)
    b.build(codes.view(np.int64))
    np.testing.assert_array_equal(a.candidate_pairs(), b.candidate_pairs())
    for table in range(2):
        for x, y in zip(a.buckets(table), b.buckets(table)):
            np.testing.assert_array_equal(x, y)


def test_hash_collisions_of_wide_codes_are_split():
    """Wide codes sort by a 32-bit hash (high half of murmur3's fmix64); build codes that
    share it but differ, by inverting fmix64, and check they still land in different buckets."""
    M = 2**64 - 1
    c1, c2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53

    def inv_fmix(h):
        h ^= h >> 33
        h = (h * pow(c2, -1, 2**64)) & M
        h ^= h >> 33
        h = (h * pow(c1, -1, 2**64)) & M
        h ^= h >> 33
        return h

    rng = np.random.default_rng(3)
    highs = [int(x) for x in rng.integers(0, 2**32, size=3)]
    # three hash values per high half: same sort key, three different codes
    codes = [inv_fmix((h << 32) | low) for h in highs for low in (1, 2, 3)]
    col = np.array(codes * 4, dtype=np.uint64)  # each code 4 times
    rng.shuffle(col)
    t = clsh.LSHTables(1)
    t.build(col.reshape(-1, 1))
    off, mem = t.buckets(0)
    ref_off, ref_mem = ref_buckets(col, np.arange(len(col)))
    np.testing.assert_array_equal(off, ref_off)
    np.testing.assert_array_equal(mem, ref_mem)
    np.testing.assert_array_equal(t.candidate_pairs(), ref_pairs(col.reshape(-1, 1), np.arange(len(col)), 1))


def test_larger_random_sizes_match_numpy_grouping():
    """Tens of thousands of items: the sparse (hashed and low-bit) radix paths and the dense one."""
    rng = np.random.default_rng(7)
    n = 20000
    for bits in (12, 20, 40, 64):
        hi = np.uint64(2**bits - 1) if bits < 64 else np.uint64(2**64 - 1)
        codes = rng.integers(0, hi, size=(n, 2), dtype=np.uint64, endpoint=True)
        codes[: n // 2, 1] = codes[n // 2 :, 1]  # guaranteed collisions in table 1
        t = clsh.LSHTables(2)
        t.build(codes)
        for table in range(2):
            off, mem = t.buckets(table)
            ref_off, ref_mem = ref_buckets(codes[:, table], np.arange(n))
            np.testing.assert_array_equal(off, ref_off)
            np.testing.assert_array_equal(mem, ref_mem)
        # pairs from the reference buckets (an N x N brute force is too big here)
        keys = np.concatenate([csr_pairs(*ref_buckets(codes[:, table], np.arange(n))) for table in range(2)])
        u, cnt = np.unique(keys, return_counts=True)
        for m in (1, 2):
            k = u[cnt >= m]
            np.testing.assert_array_equal(t.candidate_pairs(m), np.stack([k >> 31, k & ((1 << 31) - 1)], 1))


def test_stats():
    codes = np.array([[1, 5], [1, 6], [2, 5], [1, 5]], dtype=np.uint64)
    t = clsh.LSHTables(2)
    t.build(codes)
    s = t.stats()
    assert s["n_items"] == 4 and s["n_tables"] == 2
    assert s["buckets_per_table"] == [2, 2]
    assert s["max_bucket"] == 3
    assert s["mean_bucket"] == pytest.approx(8 / 4)
    assert s["pairs_per_table"] == [3, 3]
    empty = clsh.LSHTables(3).stats()
    assert empty["n_items"] == 0 and empty["buckets_per_table"] == [0, 0, 0]
    assert empty["max_bucket"] == 0 and empty["mean_bucket"] == 0.0


def test_build_replaces_and_clear_empties():
    t = clsh.LSHTables(1)
    t.build(np.zeros((5, 1), np.uint64))
    t.build(np.array([[1], [2], [1]], np.uint64))
    assert len(t) == 3
    np.testing.assert_array_equal(t.candidate_pairs(), [[0, 2]])
    t.clear()
    assert len(t) == 0 and t.candidate_pairs().shape == (0, 2)


# ----------------------------------------------------------------- threads


@pytest.mark.parametrize("buckets", ["sparse", "dense"])
def test_results_identical_for_1_and_4_threads(buckets):
    """Big enough that every parallel step really runs on several threads."""
    rng = np.random.default_rng(9)
    n, L = 70000, 4
    if buckets == "sparse":  # near-duplicate clusters in 16-bit tables: table-major pair sort
        centers = rng.integers(0, 2**16, size=(n // 6, L), dtype=np.uint64)
        codes = centers[rng.integers(0, len(centers), n)]
        codes[rng.random((n, L)) < 0.3] ^= np.uint64(1)  # near-duplicates collide in some tables
        codes[:, 3] |= np.uint64(1 << 63)  # one table through the hashed path
    else:  # ~600 items per bucket: per-item rows (bitmaps, counters)
        codes = rng.integers(0, 120, size=(n, L)).astype(np.uint64)
    out = []
    for threads in (1, 4):
        t = clsh.LSHTables(L, n_threads=threads)
        t.build(codes)
        res = [t.candidate_pairs(m) for m in ((1, 2, 4) if buckets == "sparse" else (2, 4))]
        res += [a for table in range(L) for a in t.buckets(table)]
        out.append(res)
        assert t.n_threads == threads
    assert len(out[0][0]) > 1000
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_gil_is_released_for_concurrent_callers():
    import threading

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(10000, 2)).astype(np.uint64)
    t = clsh.LSHTables(2, n_threads=1)
    t.build(codes)
    expected = t.candidate_pairs()
    results = []
    threads = [threading.Thread(target=lambda: results.append(t.candidate_pairs())) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 3
    for r in results:
        np.testing.assert_array_equal(r, expected)


# ----------------------------------------------------------------- huge buckets


def test_huge_bucket_counts_do_not_overflow_and_refuse_cleanly():
    n = 100_000
    t = clsh.LSHTables(2)
    t.build(np.zeros((n, 2), np.uint64))  # one bucket of 1e5 per table
    s = t.stats()
    assert s["pairs_per_table"] == [n * (n - 1) // 2] * 2 and s["max_bucket"] == n
    with pytest.raises(MemoryError, match="pairs collide"):
        t.candidate_pairs(max_pairs=10**6)
    with pytest.raises(MemoryError, match="pairs collide"):
        t.candidate_pairs(min_tables=2, max_pairs=10**6)
    # the table stays usable
    off, mem = t.buckets(0)
    assert off.tolist() == [0, n] and mem[-1] == n - 1


def test_max_pairs_exact_boundary():
    t = clsh.LSHTables(1)
    t.build(np.zeros((5, 1), np.uint64))  # 10 pairs
    assert len(t.candidate_pairs(max_pairs=10)) == 10
    with pytest.raises(MemoryError):
        t.candidate_pairs(max_pairs=9)


# ----------------------------------------------------------------- union_groups


@pytest.mark.parametrize("seed", range(6))
def test_union_groups_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    P = int(rng.integers(0, 150))
    pairs = rng.integers(0, n, size=(P, 2))
    scores = rng.integers(0, 5, size=P).astype(np.float64)  # many ties: stability matters
    for max_group_size in (0, 1, 2, 3, 7):
        for max_merges in (-1, 0, 1, 5, 30):
            got = clsh.union_groups(n, pairs, scores, max_group_size=max_group_size, max_merges=max_merges)
            ref = ref_union_groups(n, pairs.tolist(), scores.tolist(), max_group_size, max_merges)
            assert got.dtype == np.int64
            assert got.tolist() == ref, (max_group_size, max_merges)
            if max_group_size:
                assert np.bincount(got).max() <= max_group_size


def test_union_groups_examples():
    pairs = np.array([[0, 1], [1, 2], [3, 4], [2, 3]])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert clsh.union_groups(6, pairs, scores).tolist() == [0, 0, 0, 0, 0, 1]
    assert clsh.union_groups(6, pairs, scores, max_group_size=3).tolist() == [0, 0, 0, 1, 1, 2]
    assert clsh.union_groups(6, pairs, scores, max_merges=1).tolist() == [0, 0, 1, 2, 3, 4]
    assert clsh.union_groups(0, np.empty((0, 2), np.int64), np.empty(0)).tolist() == []
    # lists are accepted; int scores too
    assert clsh.union_groups(3, [[2, 1]], [1]).tolist() == [0, 1, 1]


# ----------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    t = clsh.LSHTables(2)
    good = np.zeros((3, 2), np.uint64)
    t.build(good)
    with pytest.raises(ValueError, match="dtype float64"):
        t.build(good.astype(np.float64))
    with pytest.raises(ValueError, match="dtype float64"):
        t.build([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="dtype int32"):
        t.build(np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        t.build(np.zeros(6, np.uint64))
    with pytest.raises(ValueError, match="2-D"):
        t.build(np.zeros((1, 3, 2), np.uint64))
    with pytest.raises(ValueError, match="n_tables=2"):
        t.build(np.zeros((3, 3), np.uint64))
    with pytest.raises(ValueError, match="C-contiguous"):
        t.build(np.zeros((2, 3), np.uint64).T)
    with pytest.raises(ValueError, match="cannot convert"):
        t.build([[1, 2], [3]])
    # table / min_tables / constructor
    with pytest.raises(ValueError, match="table index 2 is out of range"):
        t.buckets(2)
    with pytest.raises(ValueError, match="table index -1 is out of range"):
        t.buckets(-1)
    with pytest.raises(ValueError, match="min_tables must be in 1..n_tables=2"):
        t.candidate_pairs(3)
    with pytest.raises(ValueError, match="min_tables must be in 1..n_tables=2"):
        t.candidate_pairs(0)
    with pytest.raises(ValueError, match="must be an integer"):
        t.candidate_pairs(1.5)
    with pytest.raises(ValueError, match="max_pairs must be >= 0"):
        t.candidate_pairs(1, max_pairs=-1)
    with pytest.raises(ValueError, match="n_tables must be in"):
        clsh.LSHTables(0)
    with pytest.raises(ValueError, match="must be an integer"):
        clsh.LSHTables(2.0)
    with pytest.raises(ValueError, match="n_threads must be"):
        clsh.LSHTables(2, n_threads=-1)
    assert len(t) == 3  # nothing above changed the table


def test_union_groups_bad_input():
    pairs = np.array([[0, 1]])
    with pytest.raises(ValueError, match="integer"):
        clsh.union_groups(2, [[0.0, 1.0]], [1.0])
    with pytest.raises(ValueError, match="shape \\(P, 2\\)"):
        clsh.union_groups(2, np.array([0, 1, 1]), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="outside 0..1"):
        clsh.union_groups(2, np.array([[0, 2]]), [1.0])
    with pytest.raises(ValueError, match="outside"):
        clsh.union_groups(2, np.array([[-1, 0]]), [1.0])
    with pytest.raises(ValueError, match="NaN"):
        clsh.union_groups(2, pairs, [np.nan])
    with pytest.raises(ValueError, match="shape \\(1,\\)"):
        clsh.union_groups(2, pairs, [1.0, 2.0])
    with pytest.raises(ValueError, match="real-valued"):
        clsh.union_groups(2, pairs, np.array(["a"]))
    with pytest.raises(ValueError, match="C-contiguous"):
        clsh.union_groups(2, np.array([[0, 0], [1, 1]]).T.copy().T, [1.0, 2.0])
    with pytest.raises(ValueError, match="max_group_size"):
        clsh.union_groups(2, pairs, [1.0], max_group_size=-1)
    with pytest.raises(ValueError, match="max_merges"):
        clsh.union_groups(2, pairs, [1.0], max_merges=-2)
    with pytest.raises(ValueError, match="n must be >= 0"):
        clsh.union_groups(-1, np.empty((0, 2), np.int64), [])
