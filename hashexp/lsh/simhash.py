"""SimHash: random-hyperplane LSH for cosine similarity (Charikar, STOC 2002).

Bit k of vector x is the sign of <r_k, x> for a Gaussian r_k, so two vectors at angle theta
agree on a bit with probability 1 - theta/pi, and on all K bits of a table with
(1 - theta/pi)^K. L tables of K bits each give the classic amplified scheme: neurons whose
weight vectors point the same way share a bucket in at least one table with high
probability, unrelated ones rarely do. Norms are ignored: x and 3x get the same code.

Fingerprinting is one matmul, ``x @ projections`` (dim, K*L), followed by sign and bit
packing into one uint64 per table, the layout :class:`clsh.LSHTables` takes. On CUDA tensors
the sign+pack step runs as one CuPy kernel (:mod:`hashexp.lsh.cuda`) when CuPy is installed,
else as torch ops; both give the same codes.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.lsh import cuda as _cuda
from hashexp.utils.checks import check_bits


def _bit_weights(K: int, device) -> torch.Tensor:
    # 1 << 63 wraps to int64's minimum: summing distinct powers then yields the exact bit pattern.
    return torch.ones(K, dtype=torch.int64, device=device) << torch.arange(K, device=device)


def _pack_bits_torch(bits: torch.Tensor, K: int) -> torch.Tensor:
    n = bits.shape[0]
    return (bits.reshape(n, -1, K).to(torch.int64) * _bit_weights(K, bits.device)).sum(-1)


def _pack_bits_numpy(bits: np.ndarray, K: int) -> np.ndarray:
    """(N, L*K) bool -> (N, L) uint64 via np.packbits over the flat array (fast path for CPU)."""
    n = bits.shape[0]
    L = bits.shape[1] // K
    width = -(-K // 8) * 8  # each code padded to whole bytes so codes never share a byte
    if width != K:
        padded = np.zeros((n, L, width), dtype=bool)
        padded[:, :, :K] = bits.reshape(n, L, K)
        bits = padded
    packed = np.packbits(np.ascontiguousarray(bits).reshape(-1), bitorder="little").reshape(n, L, width // 8)
    if width != 64:
        wide = np.zeros((n, L, 8), dtype=np.uint8)
        wide[:, :, : width // 8] = packed
        packed = wide
    return packed.view("<u8").reshape(n, L).astype(np.uint64, copy=False)


def _pack_signs_cpu(proj: torch.Tensor, K: int) -> np.ndarray:
    try:
        import clsh  # fused, threaded sign + pack in C++
    except ImportError:  # extension not built: same codes, slower
        return _pack_bits_numpy((proj >= 0).numpy(), K)
    p = proj.contiguous()
    if p.dtype not in (torch.float32, torch.float64):
        p = p.float()
    return clsh.pack_signs(p.numpy(), K, n_threads=torch.get_num_threads())


def pack_bits(bits: torch.Tensor, K: int) -> torch.Tensor:
    """Pack sign bits into one integer per table.

    Args:
        bits: bool tensor (N, L*K); bits[:, l*K + k] becomes bit k of table l's code.
        K: bits per table, 1..64.

    Returns:
        int64 tensor (N, L) on the same device (reinterpret as uint64 for K = 64).
    """
    K = check_bits("bits per table", K)
    if isinstance(bits, np.ndarray):
        bits = torch.from_numpy(bits)
    if not torch.is_tensor(bits) or bits.dtype != torch.bool:
        raise ConfigError(f"pack_bits: bits must be a bool tensor, got {getattr(bits, 'dtype', type(bits))}")
    if bits.ndim != 2 or bits.shape[1] % K:
        raise ConfigError(f"pack_bits: bits must have shape (N, L*K) with K={K}, got {tuple(bits.shape)}")
    if bits.device.type == "cpu":
        return torch.from_numpy(_pack_bits_numpy(bits.numpy(), K).view(np.int64))
    return _pack_bits_torch(bits, K)


class SimHash(nn.Module):
    """K sign bits in each of L tables from random Gaussian hyperplanes.

    ``projections`` is a buffer here; a learnable hash subclasses this and makes it an
    ``nn.Parameter``. :meth:`project` is the only place it is used.

    Args:
        dim: input dimension d.
        bits: K bits per table, 1..64 (one uint64 code per table).
        tables: L >= 1 tables.
        seed: seeds a CPU ``torch.Generator``: the same seed gives the same projections on
            every device.
        device: where the projections live.
    """

    def __init__(self, dim: int, bits: int, tables: int, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ConfigError(f"SimHash: dim must be a positive integer, got {dim!r}")
        if isinstance(tables, bool) or not isinstance(tables, numbers.Integral) or tables < 1:
            raise ConfigError(f"SimHash: tables must be an integer >= 1, got {tables!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"SimHash: seed must be an integer, got {seed!r}")
        self.dim, self.bits, self.tables, self.seed = int(dim), check_bits("bits per table", bits), int(tables), int(seed)
        # Generated on the CPU, then moved: device RNGs differ, seeds must not.
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        p = torch.randn(self.dim, self.bits * self.tables, generator=g, dtype=torch.float32)
        self.register_buffer("projections", p.to(device))

    def extra_repr(self) -> str:
        """The shape of the hash in ``repr``."""
        return f"dim={self.dim}, bits={self.bits}, tables={self.tables}, seed={self.seed}"

    def _check_input(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not torch.is_tensor(x):
            raise ConfigError(f"SimHash: x must be a tensor (N, {self.dim}), got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"SimHash: x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ConfigError(f"SimHash: x must be real-valued, got {x.dtype}")
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K*L) projections ``x @ projections``: the one matmul, on x's device."""
        x = self._check_input(x)
        p = self.projections
        if p.device != x.device:
            p = p.to(x.device)
        return x.to(p.dtype) @ p

    def signs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K*L) bool sign bits; bit l*K + k is bit k of table l."""
        return self.project(x) >= 0

    @torch.no_grad()
    def fingerprint(self, x: torch.Tensor, backend: str = "auto") -> np.ndarray:
        """(N, L) uint64 codes, C-contiguous: bit k of table l is sign bit l*K + k.

        Args:
            x: (N, dim) real tensor (or numpy array).
            backend: ``auto`` (CuPy kernel for CUDA tensors when CuPy imports, else torch),
                ``torch``, or ``cupy`` (error if it cannot run).
        """
        if backend not in ("auto", "torch", "cupy"):
            raise ConfigError(f"SimHash.fingerprint: backend must be auto, torch or cupy, got {backend!r}")
        proj = self.project(x)
        K = self.bits
        if backend == "cupy" and not (proj.is_cuda and _cuda.available()):
            raise ConfigError("SimHash.fingerprint: backend='cupy' needs a CUDA tensor and CuPy "
                              "(pip install hashexp[gpu]); use backend='auto' to fall back to torch")
        if proj.is_cuda and backend != "torch" and proj.dtype == torch.float32 and _cuda.available():
            codes = _cuda.pack_signs(proj, K)
        elif proj.is_cuda:
            codes = _pack_bits_torch(proj >= 0, K)
        else:
            return _pack_signs_cpu(proj, K)
        return np.ascontiguousarray(codes.cpu().numpy().view(np.uint64))
