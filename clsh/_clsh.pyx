# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# distutils: language = c++
"""Cython binding of clsh's C++ core (clsh/src/). Validates inputs, releases the GIL for the work.

Typed memoryviews instead of ``cimport numpy`` keep the build free of numpy headers, so the
extension builds from pyproject.toml alone.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy
from libcpp.vector cimport vector

import numbers

import numpy as np


cdef extern from "py_errors.hpp" namespace "clsh":
    int translate_error() except -1


cdef extern from "lsh_tables.hpp" namespace "clsh" nogil:
    cdef cppclass RankLists:
        int64_t n_rows()
        int64_t total()
        void write_offsets(int64_t* out)
        void write_ids(int64_t* out, int n_threads) except +translate_error
        void write_pairs(int64_t* out, int n_threads) except +translate_error

    cdef cppclass Stats:
        int64_t n_items
        int64_t n_tables
        vector[int64_t] buckets_per_table
        vector[int64_t] pairs_per_table
        int64_t max_bucket
        double mean_bucket

    int64_t default_output_limit()

    cdef cppclass CppLSHTables "clsh::LSHTables":
        CppLSHTables(int64_t n_tables, int n_threads) except +translate_error
        int64_t n_tables()
        int n_threads()
        int64_t size()
        void build(const uint64_t* codes, int64_t n) except +translate_error
        void clear() except +translate_error
        RankLists buckets(int64_t table) except +translate_error
        RankLists candidate_pairs(int64_t min_tables, int64_t max_pairs) except +translate_error
        Stats stats() except +translate_error

    void cpp_pack_signs_f32 "clsh::pack_signs"(const float* proj, int64_t n, int64_t n_cols, int K,
                                                uint64_t* out, int n_threads) except +translate_error
    void cpp_pack_signs_f64 "clsh::pack_signs"(const double* proj, int64_t n, int64_t n_cols, int K,
                                                uint64_t* out, int n_threads) except +translate_error

    vector[int64_t] cpp_union_groups "clsh::union_groups"(
        int64_t n, const int64_t* pairs, const double* scores, int64_t n_pairs,
        int64_t max_group_size, int64_t max_merges) except +translate_error


# ------------------------------------------------------------------ input checks

def _as_int(x, str name):
    # bool is an int subclass, but LSHTables(True) is surely a mistake.
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {x!r}")
    return int(x)


def _as_array(x, str what):
    """ndarray as given; anything else through np.asarray (lists of ints become int64)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)) and len(x) == 0:
        return np.empty(0, dtype=np.int64)
    try:
        return np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{what}: cannot convert {type(x).__name__} to an array ({e})") from None


def _codes(x, int64_t n_tables, str what):
    a = _as_array(x, what)
    if a.ndim == 1 and a.size == 0:
        a = a.reshape(0, n_tables)
    if a.dtype != np.uint64 and a.dtype != np.int64:
        raise ValueError(f"{what}: codes must be a uint64 or int64 array of packed hash bits, "
                         f"got dtype {a.dtype} (use SimHash.fingerprint or pack_bits)")
    if a.ndim != 2:
        raise ValueError(f"{what}: codes must be 2-D (n_items, n_tables), got shape {a.shape}")
    if a.shape[1] != n_tables:
        raise ValueError(f"{what}: codes have {a.shape[1]} columns but the tables have "
                         f"n_tables={n_tables}; one code per table is needed")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: codes must be C-contiguous; pass np.ascontiguousarray(codes)")
    return a.view(np.uint64)  # int64 codes: same bits


# ------------------------------------------------------------------ results

cdef inline int64_t* _ptr(a):
    # Address of a C-contiguous int64 numpy array (also valid for size 0: never dereferenced).
    return <int64_t*><size_t>a.ctypes.data


cdef object _vector_to_numpy(vector[int64_t]& v):
    a = np.empty(v.size(), dtype=np.int64)
    if v.size():
        memcpy(_ptr(a), v.data(), v.size() * sizeof(int64_t))
    return a


cdef object _csr_to_numpy(RankLists& r, int n_threads):
    offsets = np.empty(r.n_rows() + 1, dtype=np.int64)
    values = np.empty(r.total(), dtype=np.int64)
    cdef int64_t* po = _ptr(offsets)
    cdef int64_t* pv = _ptr(values)
    with nogil:
        r.write_offsets(po)
        r.write_ids(pv, n_threads)
    return offsets, values


cdef class LSHTables:
    """L hash tables over integer codes: each item is a row of L codes, one per table.

    Items sharing a code in table l share that table's bucket; candidates are the items
    sharing a bucket in at least one (or ``min_tables``) of the L tables. All heavy work
    runs in C++ with the GIL released, multi-threaded; results are identical for any
    ``n_threads``.

    Args:
        n_tables: number of tables L (columns of every codes array), 1..65536.
        n_threads: worker threads, 0 = all cores.

    ``build`` numbers the items 0..N-1, at most 2**31 - 1 of them.

    Memory: a bucket of size s yields s*(s-1)/2 pairs, so if nearly all codes are equal
    the output is ~N^2/2 pairs (5e9 at N = 1e5). ``candidate_pairs`` raises
    MemoryError, naming the count, when a result would exceed about a quarter of physical
    memory (or ``max_pairs``), before doing the work when a lower bound already does.
    ``stats()["pairs_per_table"]`` gives the exact per-table counts up front; raise K
    (bits per table) or ``min_tables`` when they are too large. Counts are 64-bit: nothing
    overflows.
    """

    cdef CppLSHTables* _t

    def __cinit__(self, n_tables, n_threads=0):
        cdef int64_t L = _as_int(n_tables, "n_tables")
        cdef int64_t T = _as_int(n_threads, "n_threads")
        if T < 0 or T > 1 << 16:
            raise ValueError(f"n_threads must be in 0..65536 (0 = all cores), got {T}")
        self._t = new CppLSHTables(L, <int>T)

    def __dealloc__(self):
        del self._t

    @property
    def n_tables(self):
        """Number of tables L."""
        return self._t.n_tables()

    @property
    def n_threads(self):
        """Worker threads actually used (0 at construction resolves to the core count)."""
        return self._t.n_threads()

    def __len__(self):
        return self._t.size()

    def __repr__(self):
        return f"LSHTables(n_tables={self.n_tables}, n_items={len(self)}, n_threads={self.n_threads})"

    def build(self, codes):
        """Replace the contents with items 0..N-1; ``codes`` is (N, L) uint64/int64, C-contiguous."""
        a = _codes(codes, self._t.n_tables(), "build")
        cdef const uint64_t[:, ::1] c = a
        cdef int64_t n = a.shape[0]
        cdef const uint64_t* p = &c[0, 0] if n > 0 else NULL
        with nogil:
            self._t.build(p, n)

    def clear(self):
        """Remove all items."""
        self._t.clear()

    def buckets(self, table):
        """Non-empty buckets of one table as CSR ``(offsets, members)``.

        Buckets are ordered by their smallest member; members ascend within a bucket.
        """
        cdef int64_t t = _as_int(table, "table")
        cdef RankLists res
        with nogil:
            res = self._t.buckets(t)
        return _csr_to_numpy(res, self._t.n_threads())

    def candidate_pairs(self, min_tables=1, max_pairs=None):
        """Pairs ``i < j`` that share a bucket in at least ``min_tables`` tables.

        Returns an int64 array (P, 2), deduplicated and sorted lexicographically.

        Args:
            min_tables: 1..L. Larger values keep only pairs that collide repeatedly.
            max_pairs: raise MemoryError instead of returning more pairs than this;
                default: what fits in about a quarter of physical memory.
        """
        cdef int64_t m = _as_int(min_tables, "min_tables")
        cdef int64_t cap = default_output_limit() // 2
        if max_pairs is not None:
            cap = _as_int(max_pairs, "max_pairs")
            if cap < 0:
                raise ValueError(f"max_pairs must be >= 0, got {cap}")
        cdef RankLists res
        with nogil:
            res = self._t.candidate_pairs(m, cap)
        pairs = np.empty((res.total(), 2), dtype=np.int64)
        cdef int64_t* pp = _ptr(pairs)
        with nogil:
            res.write_pairs(pp, self._t.n_threads())
        return pairs

    def stats(self):
        """Table statistics: n_items, n_tables, buckets_per_table, pairs_per_table, max_bucket, mean_bucket.

        ``pairs_per_table[l]`` = sum over table l's buckets of size*(size-1)/2: the work and
        an upper bound on the output of ``candidate_pairs`` (exact when L == 1).
        """
        cdef Stats s
        with nogil:
            s = self._t.stats()
        return dict(
            n_items=s.n_items,
            n_tables=s.n_tables,
            buckets_per_table=[int(b) for b in s.buckets_per_table],
            max_bucket=s.max_bucket,
            mean_bucket=s.mean_bucket,
            pairs_per_table=[int(p) for p in s.pairs_per_table],
        )


def union_groups(n, pairs, scores, max_group_size=0, max_merges=-1):
    """Greedy agglomeration of scored pairs into groups (union-find, in C++).

    Visits pairs by descending score (stable on ties) and unions their groups, skipping a
    union whose merged size would exceed ``max_group_size`` (0 = unlimited), and stops
    after ``max_merges`` successful unions (-1 = unlimited).

    Args:
        n: number of items.
        pairs: int array (P, 2) of item indices in 0..n-1.
        scores: float array (P,), higher merges first; NaN is rejected.

    Returns:
        int64 labels (n,), groups numbered 0..G-1 in order of their smallest member.
    """
    cdef int64_t N = _as_int(n, "n")
    cdef int64_t G = _as_int(max_group_size, "max_group_size")
    cdef int64_t M = _as_int(max_merges, "max_merges")
    p = _as_array(pairs, "union_groups")
    if p.ndim == 1 and p.size == 0:
        p = p.reshape(0, 2)
    if p.dtype.kind not in "iu":
        raise ValueError(f"union_groups: pairs must be an integer array, got dtype {p.dtype}")
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"union_groups: pairs must have shape (P, 2), got {p.shape}")
    if not p.flags.c_contiguous:
        raise ValueError("union_groups: pairs must be C-contiguous; pass np.ascontiguousarray(pairs)")
    if p.dtype != np.int64:
        if p.dtype == np.uint64 and p.size and p.max() > np.iinfo(np.int64).max:
            raise ValueError("union_groups: pair entries do not fit in int64")
        p = p.astype(np.int64)
    s = _as_array(scores, "union_groups")
    if s.dtype.kind not in "fiu":
        raise ValueError(f"union_groups: scores must be a real-valued array, got dtype {s.dtype}")
    if s.ndim != 1 or s.shape[0] != p.shape[0]:
        raise ValueError(f"union_groups: scores must have shape ({p.shape[0]},) to match pairs, "
                         f"got {s.shape}")
    if not s.flags.c_contiguous:
        raise ValueError("union_groups: scores must be C-contiguous; pass np.ascontiguousarray(scores)")
    s = s.astype(np.float64, copy=False)
    cdef int64_t P = p.shape[0]
    cdef int64_t* pp = _ptr(p)
    cdef const double* sp = <const double*><size_t>s.ctypes.data
    cdef vector[int64_t] labels
    with nogil:
        labels = cpp_union_groups(N, pp, sp, P, G, M)
    return _vector_to_numpy(labels)


def pack_signs(proj, bits, n_threads=0):
    """Sign bits of a projection matrix, packed: the fused CPU step of SimHash fingerprinting.

    Args:
        proj: float32 or float64 array (N, L*K), C-contiguous (e.g. ``(x @ R).numpy()``).
        bits: K, bits per table, 1..64.
        n_threads: worker threads, 0 = all cores.

    Returns:
        uint64 array (N, L): bit k of code l is set when ``proj[:, l*K + k] >= 0``
        (so -0.0 sets it and NaN does not, as torch's ``>= 0``).
    """
    cdef int64_t K = _as_int(bits, "bits")
    cdef int64_t T = _as_int(n_threads, "n_threads")
    if K < 1 or K > 64:
        raise ValueError(f"pack_signs: bits must be in 1..64, got {K}")
    if T < 0 or T > 1 << 16:
        raise ValueError(f"pack_signs: n_threads must be in 0..65536 (0 = all cores), got {T}")
    a = _as_array(proj, "pack_signs")
    if a.dtype != np.float32 and a.dtype != np.float64:
        raise ValueError(f"pack_signs: proj must be a float32 or float64 array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"pack_signs: proj must be 2-D (N, L*K), got shape {a.shape}")
    if a.shape[1] % K:
        raise ValueError(f"pack_signs: proj has {a.shape[1]} columns, not a multiple of bits={K}")
    if not a.flags.c_contiguous:
        raise ValueError("pack_signs: proj must be C-contiguous; pass np.ascontiguousarray(proj)")
    cdef int64_t n = a.shape[0], cols = a.shape[1]
    out = np.empty((n, cols // K), dtype=np.uint64)
    cdef uint64_t* po = <uint64_t*><size_t>out.ctypes.data
    cdef size_t addr = a.ctypes.data
    cdef bint single = a.dtype == np.float32
    if n == 0 or cols == 0:
        return out
    with nogil:
        if single:
            cpp_pack_signs_f32(<const float*>addr, n, cols, <int>K, po, <int>T)
        else:
            cpp_pack_signs_f64(<const double*>addr, n, cols, <int>K, po, <int>T)
    return out
