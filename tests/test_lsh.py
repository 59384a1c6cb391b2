"""hashexp.lsh: SimHash statistics, bit packing, the MIPS transform, the CuPy kernel, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch

import clsh
from hashexp.errors import ConfigError
from hashexp.lsh import SimHash, mips_query_transform, mips_transform, pack_bits
from hashexp.lsh import cuda as lsh_cuda
from hashexp.lsh.simhash import _pack_bits_numpy, _pack_bits_torch


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _has_cupy(), reason="needs CUDA and CuPy")


def pairs_at_angle(theta: float, n: int, d: int, g: torch.Generator):
    """n random pairs (x, y) of unit vectors at exactly angle theta."""
    x = torch.randn(n, d, generator=g)
    x /= x.norm(dim=1, keepdim=True)
    z = torch.randn(n, d, generator=g)
    z -= (z * x).sum(1, keepdim=True) * x
    z /= z.norm(dim=1, keepdim=True)
    return x, math.cos(theta) * x + math.sin(theta) * z


# ----------------------------------------------------------------- SimHash


@pytest.mark.parametrize("K", [1, 4, 8])
def test_collision_rate_matches_charikar(K):
    """P[all K bits of a table agree] = (1 - theta/pi)^K (Charikar 2002)."""
    n, L = 4000, 64
    g = torch.Generator().manual_seed(K)
    h = SimHash(32, K, L, seed=100 + K)
    for theta in (math.pi / 8, math.pi / 4, math.pi / 2, 3 * math.pi / 4):
        x, y = pairs_at_angle(theta, n, 32, g)
        rate = (h.fingerprint(x) == h.fingerprint(y)).mean()
        p = (1 - theta / math.pi) ** K
        se = math.sqrt(p * (1 - p) / (n * L))
        assert abs(rate - p) <= 5 * se + 1e-3, (K, theta, rate, p)


def test_scale_invariance_and_determinism():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=g)
    a, b = SimHash(24, 16, 3, seed=7), SimHash(24, 16, 3, seed=7)
    assert torch.equal(a.projections, b.projections)
    assert a.projections.shape == (24, 48) and a.projections.dtype == torch.float32
    np.testing.assert_array_equal(a.fingerprint(x), b.fingerprint(3.5 * x))  # norms are ignored
    assert not torch.equal(a.projections, SimHash(24, 16, 3, seed=8).projections)
    assert SimHash(24, 16, 3, seed=2**62 + 5).projections.shape == (24, 48)  # large seeds are fine


@pytest.mark.parametrize("K", [1, 3, 8, 13, 16, 63, 64])
def test_fingerprint_equals_packed_signs(K):
    L = 3
    h = SimHash(20, K, L, seed=K)
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(K))
    x[0] = 0.0  # projections exactly 0: bit set (>= 0)
    signs = h.signs(x)
    assert signs.dtype == torch.bool and signs.shape == (300, K * L)
    codes = h.fingerprint(x)
    assert codes.dtype == np.uint64 and codes.shape == (300, L) and codes.flags.c_contiguous
    assert (codes[0] == np.uint64(2**K - 1)).all()
    packed = pack_bits(signs, K)
    assert packed.dtype == torch.int64 and packed.shape == (300, L)
    np.testing.assert_array_equal(packed.numpy().view(np.uint64), codes)
    np.testing.assert_array_equal(_pack_bits_torch(signs, K).numpy().view(np.uint64), codes)
    np.testing.assert_array_equal(_pack_bits_numpy(signs.numpy(), K), codes)
    # bit k of table l is sign bit l*K + k
    for l in range(L):
        for k in (0, K - 1):
            np.testing.assert_array_equal((codes[:, l] >> np.uint64(k)) & np.uint64(1), signs[:, l * K + k].numpy())
    if K == 64:
        assert (codes[:, 0] >> np.uint64(63)).any()  # the high bit is used


def test_pack_signs_matches_torch_comparison_on_edge_values():
    proj = torch.tensor([[0.0, -0.0, float("nan"), -1e-30, float("inf"), -float("inf"), 1e-45, 2.0]])
    expected = pack_bits(proj >= 0, 4)
    for dtype in (torch.float32, torch.float64):
        got = clsh.pack_signs(proj.to(dtype).numpy(), 4)
        np.testing.assert_array_equal(got, expected.numpy().view(np.uint64))


def test_fingerprint_input_types():
    h = SimHash(8, 4, 2)
    x = torch.randn(10, 8)
    ref = h.fingerprint(x)
    np.testing.assert_array_equal(h.fingerprint(x.double()), ref)  # cast to the projections' dtype
    np.testing.assert_array_equal(h.fingerprint(x.numpy()), ref)
    np.testing.assert_array_equal(h.fingerprint(x[:, :8].t().contiguous().t()), ref)  # non-contiguous ok
    np.testing.assert_array_equal(h.fingerprint(x, backend="torch"), ref)
    assert h.fingerprint(torch.empty(0, 8)).shape == (0, 2)
    assert h.fingerprint(torch.ones(3, 8, dtype=torch.int64)).dtype == np.uint64


def test_subclass_with_parameter_projections():
    class Learnable(SimHash):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.projections = torch.nn.Parameter(self.projections.clone())

    h, ref = Learnable(16, 8, 4, seed=1), SimHash(16, 8, 4, seed=1)
    assert isinstance(h.projections, torch.nn.Parameter)
    x = torch.randn(40, 16)
    np.testing.assert_array_equal(h.fingerprint(x), ref.fingerprint(x))
    h.project(x).square().sum().backward()  # project is the differentiable path
    assert h.projections.grad is not None and h.projections.grad.shape == (16, 32)


def test_planted_duplicates_are_found_end_to_end():
    """Neurons that are positive rescalings of each other collide in every table."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, 64, generator=g)
    x = torch.cat([w, w[:20] * (torch.rand(20, 1, generator=g) * 5 + 0.1)])
    h = SimHash(64, 16, 4, seed=0)
    t = clsh.LSHTables(4)
    t.build(h.fingerprint(x))
    pairs = t.candidate_pairs(min_tables=4)
    planted = {(i, 500 + i) for i in range(20)}
    assert planted <= set(map(tuple, pairs.tolist()))
    assert len(pairs) < 40  # 16-bit tables: unrelated random vectors almost never collide in all 4


# ----------------------------------------------------------------- MIPS


def test_mips_transform_embeds_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=g) * torch.rand(100, 1, generator=g) * 10
    p = mips_transform(x)
    assert p.shape == (100, 7)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(100))
    M = float(x.norm(dim=1).max())
    torch.testing.assert_close(p[:, :6], x / M)
    q = torch.randn(30, 6, generator=g)
    pq = mips_query_transform(q)
    torch.testing.assert_close(pq.norm(dim=1), torch.ones(30))
    assert (pq[:, 6] == 0).all()
    # <P(x), Q(q)> = <x, q> / (M |q|): the angle is monotone in the inner product
    torch.testing.assert_close(pq @ p.T, (q @ x.T) / (M * q.norm(dim=1, keepdim=True)))
    # explicit M, clamping rows beyond it, and the all-zero guard
    p2 = mips_transform(x, M=2 * M)
    torch.testing.assert_close(p2.norm(dim=1), torch.ones(100))
    p3 = mips_transform(x, M=1e-3)
    assert torch.isfinite(p3).all() and (p3[:, 6] == 0).all()
    z = mips_transform(torch.zeros(4, 3))
    assert torch.equal(z, torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 4))
    assert mips_transform(torch.zeros(0, 3)).shape == (0, 4)
    assert mips_query_transform(torch.zeros(2, 3)).abs().sum() == 0


def test_mips_finds_max_inner_product_more_often_than_simhash():
    """Items with norms spread over e^-2..e^2. Both hashes use the same K, L and a candidate
    budget of B items: the LSH candidates of each query ranked by the number of tables they
    collide in. Simple-LSH ranks by inner product, plain SimHash by angle, so the true
    max-inner-product item makes the cut far more often with the MIPS transform.

    (At a fixed budget, not "anywhere in the union": for an item with <x, q> > 0 the
    transformed angle arccos(|x|/M cos theta) >= theta, so simple-LSH never collides more
    often than SimHash does; its gain is in ranking.)
    """
    g = torch.Generator().manual_seed(0)
    n, d, nq, K, L, B = 2000, 32, 300, 6, 64, 20
    dirs = torch.randn(n, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    items = dirs * torch.exp(torch.rand(n, 1, generator=g) * 4 - 2)
    queries = torch.randn(nq, d, generator=g)
    truth = (queries @ items.T).argmax(1).numpy()

    def recall(x_items, x_queries, seed):
        h = SimHash(x_items.shape[1], K, L, seed=seed)
        codes, qcodes = h.fingerprint(x_items), h.fingerprint(x_queries)
        # each query's candidates: the items it collides with in >= 1 table, ascending
        hits = (qcodes[:, None, :] == codes[None, :, :]).sum(2)
        found = 0
        for r in range(nq):
            c = np.flatnonzero(hits[r])
            votes = hits[r, c]
            top = c[np.argsort(-votes, kind="stable")[:B]]
            found += truth[r] in top
        return found / nq

    for seed in (0, 1):
        plain = recall(items, queries, seed)
        mips = recall(mips_transform(items), mips_query_transform(queries), seed)
        assert mips > plain + 0.15, (seed, plain, mips)


# ----------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    for kw, msg in [
        (dict(dim=8, bits=0, tables=2), "1..64"),
        (dict(dim=8, bits=65, tables=2), "1..64"),
        (dict(dim=8, bits=4.0, tables=2), "1..64"),
        (dict(dim=8, bits=4, tables=0), "tables must be"),
        (dict(dim=0, bits=4, tables=2), "dim must be"),
        (dict(dim=8, bits=4, tables=2, seed=1.5), "seed must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SimHash(**kw)
    with pytest.raises(ConfigError):  # ConfigError is the ValueError subclass used throughout
        SimHash(8, 0, 1)
    h = SimHash(8, 4, 2)
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        h.fingerprint(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        h.signs(torch.randn(8))
    with pytest.raises(ValueError, match="must be a tensor"):
        h.fingerprint([[0.5] * 8])
    with pytest.raises(ValueError, match="real-valued"):
        h.fingerprint(torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        h.fingerprint(torch.randn(2, 8), backend="numba")
    if not lsh_cuda.available():
        with pytest.raises(ValueError, match="CuPy"):
            h.fingerprint(torch.randn(2, 8), backend="cupy")
    with pytest.raises(ValueError, match="bool tensor"):
        pack_bits(torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match="shape"):
        pack_bits(torch.zeros(2, 9, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="1..64"):
        pack_bits(torch.zeros(2, 65, dtype=torch.bool), 65)
    with pytest.raises(ValueError, match="M must be"):
        mips_transform(torch.randn(3, 2), M=0)
    with pytest.raises(ValueError, match="M must be"):
        mips_transform(torch.randn(3, 2), M=float("nan"))
    with pytest.raises(ValueError, match="2-D"):
        mips_transform(torch.randn(3))
    with pytest.raises(ValueError, match="2-D"):
        mips_query_transform([1.0, 2.0])
    with pytest.raises(ValueError, match="float32 or float64"):
        clsh.pack_signs(np.zeros((2, 8), np.int64), 4)
    with pytest.raises(ValueError, match="float32 or float64"):
        clsh.pack_signs(np.zeros((2, 8), np.float16), 4)
    with pytest.raises(ValueError, match="float32 or float64"):
        clsh.pack_signs([[1, 0]], 2)
    with pytest.raises(ValueError, match="multiple of bits"):
        clsh.pack_signs(np.zeros((2, 9), np.float32), 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        clsh.pack_signs(np.zeros((8, 4), np.float32).T, 4)
    with pytest.raises(ValueError, match="1..64"):
        clsh.pack_signs(np.zeros((2, 8), np.float32), 0)


def test_module_imports_without_cupy():
    # The module loads and reports availability without importing CuPy eagerly.
    assert isinstance(lsh_cuda.available(), bool)
    if not torch.cuda.is_available():
        assert lsh_cuda.available() is False


# ----------------------------------------------------------------- GPU (CuPy kernel)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("K", [1, 7, 16, 64])
def test_cupy_kernel_matches_torch_packing(K):
    g = torch.Generator().manual_seed(K)
    proj = torch.randn(1000, 5 * K, generator=g)
    proj[0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    proj = proj.cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated CuPy stream API
        got = lsh_cuda.pack_signs(proj, K)
    assert got.is_cuda and got.dtype == torch.int64 and got.shape == (1000, 5)
    assert torch.equal(got, _pack_bits_torch(proj >= 0, K))
    assert torch.equal(got.cpu(), pack_bits((proj >= 0).cpu(), K))
    assert lsh_cuda.pack_signs(proj[:0], K).shape == (0, 5)


@needs_cuda
@pytest.mark.gpu
def test_simhash_on_cuda_uses_kernel_and_matches_torch_path():
    assert lsh_cuda.available()
    cpu = SimHash(48, 16, 8, seed=5)
    gpu = SimHash(48, 16, 8, seed=5, device="cuda")
    assert torch.equal(cpu.projections, gpu.projections.cpu())  # seeded on the CPU
    x = torch.randn(4096, 48, generator=torch.Generator().manual_seed(0)).cuda()
    auto = gpu.fingerprint(x)
    assert auto.dtype == np.uint64 and auto.shape == (4096, 8) and auto.flags.c_contiguous
    np.testing.assert_array_equal(auto, gpu.fingerprint(x, backend="cupy"))
    np.testing.assert_array_equal(auto, gpu.fingerprint(x, backend="torch"))
    # the GPU and CPU matmuls round differently; signs agree except within rounding of 0
    agree = (auto == cpu.fingerprint(x.cpu())).mean()
    assert agree > 0.99
