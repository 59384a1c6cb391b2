"""How many bits per table (K) and tables (L): a rule from the threshold and the width.

SimHash (Charikar 2002) makes two vectors at angle theta agree on one random-hyperplane bit
with probability 1 - theta/pi, so on all K bits of a table with

    p(theta) = (1 - theta/pi)^K

and, with L independent tables, they share a bucket in at least one table with

    P(theta) = 1 - (1 - p(theta))^L                                    (Indyk & Motwani 1998)

The rule (:func:`choose_bits_tables`) has two steps:

1. **Recall fixes L given K.** Every pair at cosine >= ``threshold`` must collide with
   probability >= ``recall``; the least similar such pair (cosine == threshold) is the worst
   case, so ``L(K) = ceil(log(1 - recall) / log(1 - p(arccos threshold)))``.
2. **Cost picks K.** Larger K means fewer background collisions (pairs of unrelated neurons,
   at angle ~pi/2 in high dimension: p = 2^-K) but more tables. The modelled cost of one site,
   in units of one multiply-add of the fingerprint matmul, is

       L(K) * N * (d * K                        fingerprints: (N, d) @ (d, K*L)
                   + TABLE_COST                 clsh: one bucket entry per neuron and table
                   + VERIFY_COST * d * N/2 * p_bg^K)   exact cosine of each false candidate

   and K is the cheapest one in 1..max_bits. The constants are measured on one core of this
   machine (benchmarks/bench_crossover.md, phase times at 1e5 and 1e6 neurons): a bucket
   entry (clsh build + candidate listing) costs about as much as 2500 multiply-adds of the
   fingerprint matmul, and a verified candidate pair, two gathered rows, about 40 per
   dimension (memory-bound, where the matmul is compute-bound). The modelled cost times
   ~0.06 ns per multiply-add came within 15% of the measured wall time at 1e5 and 1e6.

:func:`crossover_width` compares that cost with the exact alternative, a blocked Gram matrix of
all N(N-1)/2 pairs (``EXACT_COST`` per pair and dimension: it runs at matmul speed), and
returns the width above which LSH is modelled to be cheaper: 883 neurons at cosine 0.9 and
14,817 at 0.7 (d = 256). Measured side by side (bench_crossover.md): ~330 and ~18,000.

At cosine 0.9, recall 0.95 and d = 256 this gives K x L = 11 x 15 at 1e3 neurons, 14 x 25 at
1e4, 18 x 48 at 1e5 and 21 x 77 at 1e6 (see the tests). The rule assumes one shared bucket
suffices (``min_tables = 1``) and unrelated neurons at cosine ``background_cos``; a layer
whose neurons are all alike (trained layers often sit at cosine 0.1-0.3) makes more
background candidates than modelled: pass its typical cosine.
"""

from __future__ import annotations

import math

from hashexp.errors import ConfigError
from hashexp.utils.checks import check_bits

# Cost of one bucket entry (one neuron in one table) and of one dimension of one verified
# candidate pair, each in multiply-adds of the fingerprint matmul; see the module docstring.
TABLE_COST = 2500.0
VERIFY_COST = 40.0
# Cost of one dimension of one pair of the exact blocked Gram matrix, in the same units.
EXACT_COST = 1.0


def bit_agreement(cos: float) -> float:
    """Probability 1 - theta/pi that one SimHash bit agrees for two vectors at cosine ``cos``."""
    c = min(1.0, max(-1.0, float(cos)))
    return 1.0 - math.acos(c) / math.pi


def collision_probability(cos: float, bits: int, tables: int = 1) -> float:
    """Probability that two vectors at cosine ``cos`` share a bucket in >= 1 of ``tables``
    tables of ``bits`` bits: ``1 - (1 - (1 - theta/pi)^K)^L``."""
    p = bit_agreement(cos) ** int(bits)
    return 1.0 - (1.0 - p) ** int(tables)


def tables_for_recall(threshold: float, bits: int, recall: float = 0.95) -> int:
    """Fewest tables of ``bits`` bits with which a pair at cosine ``threshold`` collides with
    probability >= ``recall`` (pairs more alike collide more often)."""
    if not 0.0 < recall < 1.0:
        raise ConfigError(f"recall must be in (0, 1), got {recall}")
    p = bit_agreement(threshold) ** int(bits)
    if p >= 1.0:
        return 1
    if p <= 0.0:
        raise ConfigError(f"pairs at cosine {threshold} never collide; choose a threshold above -1")
    # guard against float rounding right at an integer
    return max(1, math.ceil(math.log1p(-recall) / math.log1p(-p) - 1e-9))


def expected_background_pairs(width: int, bits: int, tables: int, background_cos: float = 0.0) -> float:
    """Expected candidate pairs among ``width`` mutually unrelated neurons (cosine
    ``background_cos``): ``N (N - 1) / 2 * P(background)``."""
    n = int(width)
    return n * (n - 1) / 2 * collision_probability(background_cos, bits, tables)


def lsh_cost(threshold: float, width: int, bits: int, recall: float = 0.95, dim: int = 256,
             background_cos: float = 0.0) -> float:
    """Modelled cost (multiply-adds of the fingerprint matmul) of hashing one site of
    ``width`` neurons of dimension ``dim`` with ``bits``-bit tables (L from the recall)."""
    L = tables_for_recall(threshold, bits, recall)
    n = float(width)
    p_bg = bit_agreement(background_cos) ** int(bits)
    return L * n * (dim * bits + TABLE_COST + VERIFY_COST * dim * (n - 1) / 2 * p_bg)


def choose_bits_tables(threshold: float, width: int, recall: float = 0.95, dim: int = 256,
                       background_cos: float = 0.0, max_bits: int = 64) -> tuple[int, int]:
    """Bits per table K and tables L for one site, by the rule in the module docstring.

    Args:
        threshold: cosine of the least similar pair that must be found.
        width: neurons N in the site.
        recall: least probability with which a pair at ``threshold`` becomes a candidate.
        dim: length d of a neuron vector (fingerprint and verification cost scale with it).
        background_cos: typical cosine of unrelated neurons (0: random directions).
        max_bits: largest K (codes are uint64: at most 64).

    Returns:
        (K, L): with L tables of K bits, a pair at cosine >= ``threshold`` collides in at
        least one table with probability >= ``recall``, at the least modelled cost.
    """
    if not -1.0 < float(threshold) < 1.0:
        raise ConfigError(f"threshold must be a cosine in (-1, 1), got {threshold}")
    if int(width) < 2:
        raise ConfigError(f"width must be >= 2 neurons, got {width}")
    check_bits("max_bits", max_bits)
    if float(background_cos) >= float(threshold):
        raise ConfigError(f"background_cos ({background_cos}) must be below the threshold ({threshold})")
    best = min(range(1, int(max_bits) + 1),
               key=lambda k: (lsh_cost(threshold, width, k, recall, dim, background_cos), k))
    return best, tables_for_recall(threshold, best, recall)


def exact_cost(width: int, dim: int = 256) -> float:
    """Modelled cost of the exact alternative: every pair's cosine by a blocked Gram matrix."""
    n = float(width)
    return n * (n - 1) / 2 * dim * EXACT_COST


def crossover_width(threshold: float, dim: int = 256, recall: float = 0.95, background_cos: float = 0.0,
                    max_width: int = 1 << 40) -> int:
    """Smallest width N at which LSH with :func:`choose_bits_tables`' K and L is modelled to be
    cheaper than the exact all-pairs Gram matrix (:func:`exact_cost`): use exact below it.

    The modelled cost ratio LSH / exact falls with N (LSH grows ~N^1+rho, exact N^2); the
    width is found by doubling, then bisection. Returns ``max_width`` if LSH never wins below it.
    """

    def lsh_wins(n: int) -> bool:
        k, _ = choose_bits_tables(threshold, n, recall, dim, background_cos)
        return lsh_cost(threshold, n, k, recall, dim, background_cos) < exact_cost(n, dim)

    hi = 2
    while not lsh_wins(hi):
        if hi >= max_width:
            return int(max_width)
        hi *= 2
    lo = max(2, hi // 2)
    if lsh_wins(lo):
        return lo
    while hi - lo > 1:  # lsh_wins(hi) and not lsh_wins(lo)
        mid = (lo + hi) // 2
        if lsh_wins(mid):
            hi = mid
        else:
            lo = mid
    return hi
