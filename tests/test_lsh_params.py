"""K and L from the threshold and the width: the collision model's numbers, the rule's choices,
and SimHash + clsh recall on planted pairs against the model's binomial confidence band."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hashexp.errors import ConfigError
from hashexp.lsh import SimHash
from hashexp.lsh.params import (bit_agreement, choose_bits_tables, collision_probability, crossover_width,
                                exact_cost, expected_background_pairs, lsh_cost, tables_for_recall)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_collision_model_values():
    assert bit_agreement(1.0) == 1.0
    assert bit_agreement(0.0) == pytest.approx(0.5)
    assert bit_agreement(-1.0) == 0.0
    assert bit_agreement(0.9) == pytest.approx(1 - math.acos(0.9) / math.pi)  # 0.85645...
    assert bit_agreement(0.9) == pytest.approx(0.856434, abs=1e-6)
    # one table of K bits at cosine 0: 2^-K; L tables: 1 - (1 - 2^-K)^L
    assert collision_probability(0.0, 10, 1) == pytest.approx(2**-10)
    assert collision_probability(0.0, 10, 4) == pytest.approx(1 - (1 - 2**-10) ** 4)
    assert collision_probability(0.9, 21, 77) == pytest.approx(0.95173, abs=1e-5)
    # the background count: N(N-1)/2 pairs at 2^-K per table
    assert expected_background_pairs(1000, 11, 15) == pytest.approx(499500 * (1 - (1 - 2**-11) ** 15))


def test_tables_for_recall_is_the_fewest_that_reach_it():
    for t, K in [(0.9, 8), (0.9, 21), (0.7, 12), (0.95, 30)]:
        L = tables_for_recall(t, K, 0.95)
        assert collision_probability(t, K, L) >= 0.95
        assert L == 1 or collision_probability(t, K, L - 1) < 0.95
    assert tables_for_recall(0.9, 21, 0.95) == 77
    assert tables_for_recall(0.9, 8, 0.99) == 14


@pytest.mark.parametrize("width,dim,expected", [(1_000, 256, (11, 15)), (10_000, 256, (14, 25)),
                                                (100_000, 256, (18, 48)), (1_000_000, 256, (21, 77)),
                                                (1_000, 1024, (12, 18)), (1_000_000, 128, (20, 65))])
def test_rule_values(width, dim, expected):
    assert choose_bits_tables(0.9, width, recall=0.95, dim=dim) == expected


def test_rule_scales_with_width_and_threshold():
    ks = [choose_bits_tables(0.9, n)[0] for n in (10**3, 10**4, 10**5, 10**6)]
    assert ks == sorted(ks) and ks[0] < ks[-1]  # wider sites: more bits per table (fewer random collisions)
    for n in (10**3, 10**6):
        K, L = choose_bits_tables(0.9, n)
        # modelled random collisions grow slower than the N^2/2 pairs: at most a few dozen per neuron
        assert expected_background_pairs(n, K, L) < 30 * n
        K7, L7 = choose_bits_tables(0.7, n)
        assert L7 > L  # a looser threshold needs more tables for the same recall
        assert collision_probability(0.7, K7, L7) >= 0.95


def test_rule_rejects_bad_input():
    with pytest.raises(ConfigError, match="threshold"):
        choose_bits_tables(1.0, 1000)
    with pytest.raises(ConfigError, match="width"):
        choose_bits_tables(0.9, 1)
    with pytest.raises(ConfigError, match="recall"):
        choose_bits_tables(0.9, 1000, recall=1.0)
    with pytest.raises(ConfigError, match="background_cos"):
        choose_bits_tables(0.5, 1000, background_cos=0.6)


def planted_pairs(n_pairs: int, dim: int, cos: float, seed: int) -> torch.Tensor:
    """2 * n_pairs rows: row 2i and 2i+1 are at cosine exactly ``cos``, pairs in random directions."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_pairs, dim, generator=g)
    a = a / a.norm(dim=1, keepdim=True)
    w = torch.randn(n_pairs, dim, generator=g)
    w = w - (w * a).sum(1, keepdim=True) * a  # orthogonal to a
    w = w / w.norm(dim=1, keepdim=True)
    b = cos * a + math.sqrt(1 - cos * cos) * w
    return torch.stack([a, b], 1).reshape(-1, dim)


@pytest.mark.parametrize("cos,K,L", [(0.9, 11, 15), (0.9, 14, 25), (0.8, 8, 4), (0.95, 18, 10)])
def test_planted_recall_matches_collision_model(cos, K, L):
    """Fraction of planted pairs that share a clsh bucket == 1 - (1 - (1 - θ/π)^K)^L, within the
    99.99% binomial band (4 sigma), pooled over 3 hashers of 2000 pairs each."""
    import clsh

    n_pairs, hits = 2000, 0
    for seed in range(3):
        x = planted_pairs(n_pairs, 128, cos, seed)
        assert torch.allclose((x[0::2] * x[1::2]).sum(1), torch.full((n_pairs,), cos), atol=1e-5)
        t = clsh.LSHTables(L, n_threads=1)
        t.build(SimHash(128, K, L, seed=100 + seed).fingerprint(x))
        pairs = np.asarray(t.candidate_pairs(1))
        planted = pairs[(pairs[:, 0] % 2 == 0) & (pairs[:, 1] == pairs[:, 0] + 1)]
        hits += len(planted)
    n = 3 * n_pairs
    p = collision_probability(cos, K, L)
    band = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) <= band, (hits / n, p, band)


def test_chosen_parameters_reach_the_recall_on_pairs_at_the_threshold():
    """K, L from the rule for 4000 neurons: >= 95% of pairs exactly at cosine 0.9 collide (minus the band)."""
    import clsh

    K, L = choose_bits_tables(0.9, 4000, recall=0.95, dim=128)
    assert (K, L) == (13, 21)
    x = planted_pairs(2000, 128, 0.9, seed=7)
    t = clsh.LSHTables(L, n_threads=1)
    t.build(SimHash(128, K, L, seed=3).fingerprint(x))
    pairs = np.asarray(t.candidate_pairs(1))
    recall = int(((pairs[:, 0] % 2 == 0) & (pairs[:, 1] == pairs[:, 0] + 1)).sum()) / 2000
    p = collision_probability(0.9, K, L)
    assert p >= 0.95
    assert recall >= p - 4 * math.sqrt(p * (1 - p) / 2000)


def test_crossover_width_values_and_its_defining_property():
    assert exact_cost(1000, 256) == 499500 * 256
    cases = {(0.9, 256): 883, (0.7, 256): 14817, (0.9, 1024): 572, (0.5, 256): 757076}
    for (t, d), expected in cases.items():
        n = crossover_width(t, dim=d)
        assert n == expected
        for m, wins in ((n, True), (n - 1, False)):  # LSH is modelled cheaper at n, not at n - 1
            k, _ = choose_bits_tables(t, m, dim=d)
            assert (lsh_cost(t, m, k, dim=d) < exact_cost(m, d)) is wins
    # a looser threshold needs more tables, so exact stays cheaper up to far larger sites
    assert crossover_width(0.95) < crossover_width(0.9) < crossover_width(0.8) < crossover_width(0.7)
    assert crossover_width(0.3, max_width=1 << 12) == 1 << 12  # never below the cap: the cap
