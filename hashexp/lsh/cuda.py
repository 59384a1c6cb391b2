"""Fused sign + bit packing on the GPU as a CuPy RawKernel.

After the projection matmul (N, K*L) on the GPU, packing its signs with torch ops writes an
(N, L, K) int64 temporary, 64x the bytes of the result; this kernel reads each float once
and writes one 64-bit code per (row, table). It is the GPU half of SimHash.fingerprint
(Charikar 2002); the bit order matches :func:`hashexp.lsh.pack_bits` (bit k of table l =
sign of column l*K + k, set when the projection is >= 0).

CuPy is optional: this module imports without it and without CUDA; :func:`available`
says whether the kernel can run.
"""

from __future__ import annotations

import functools

import torch

from hashexp.utils.checks import check_bits

_SOURCE = r"""
extern "C" __global__
void pack_signs(const float* __restrict__ proj, long long* __restrict__ out,
                const long long n, const int K, const int L) {
    // One thread per (row, table); grid-stride so any launch size covers any n.
    const long long total = n * (long long)L;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long row = idx / L;
        const int l = (int)(idx - row * L);
        const float* p = proj + row * (long long)K * L + (long long)l * K;
        unsigned long long code = 0ULL;
        for (int k = 0; k < K; ++k)
            code |= (unsigned long long)(p[k] >= 0.0f) << k;   // NaN -> 0, -0.0 -> 1, as torch's >=
        out[idx] = (long long)code;
    }
}
"""

_THREADS = 256


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when CuPy imports and sees a CUDA device (checked once)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, or a broken CUDA install: use the torch path
        return False


@functools.lru_cache(maxsize=None)
def _kernel():
    import cupy

    return cupy.RawKernel(_SOURCE, "pack_signs")


def pack_signs(proj: torch.Tensor, K: int) -> torch.Tensor:
    """(N, K*L) float32 CUDA tensor -> (N, L) int64 CUDA tensor of packed sign bits."""
    import cupy

    if not (proj.is_cuda and proj.dtype == torch.float32 and proj.ndim == 2 and proj.shape[1] % K == 0):
        raise ValueError(f"pack_signs: need a float32 CUDA tensor (N, L*K) with K={K}, "
                         f"got {proj.dtype} {tuple(proj.shape)} on {proj.device}")
    check_bits("pack_signs: K", K)
    proj = proj.contiguous()
    n, L = proj.shape[0], proj.shape[1] // K
    out = torch.empty((n, L), dtype=torch.int64, device=proj.device)
    if n == 0 or L == 0:
        return out
    blocks = min((n * L + _THREADS - 1) // _THREADS, 65535)
    with cupy.cuda.Device(proj.device.index):
        # Run on torch's current stream so the kernel is ordered after the matmul that made proj.
        ts = torch.cuda.current_stream(proj.device)
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(ts, "__cuda_stream__"):
            stream = cupy.cuda.Stream.from_external(ts)  # CuPy >= 14 (ExternalStream is deprecated there)
        else:
            stream = cupy.cuda.ExternalStream(ts.cuda_stream)
        with stream:
            _kernel()((blocks,), (_THREADS,),
                      (cupy.asarray(proj), cupy.asarray(out), cupy.int64(n), cupy.int32(K), cupy.int32(L)))
    return out
