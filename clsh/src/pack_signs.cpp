// Fused sign + bit packing of a projection matrix: the CPU twin of hashexp/lsh/cuda.py.
//
// SimHash (Charikar 2002) bits are the signs of x @ R. Packing them with array ops writes
// a bool or int64 temporary many times the size of the codes; this reads each projection
// once and writes one uint64 per (row, table), so fingerprinting costs about the matmul.
#include <algorithm>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "lsh_tables.hpp"
#include "parallel.hpp"

namespace clsh {

namespace {

template <class T>
void pack_rows(const T* proj, int64_t r0, int64_t r1, int K, int64_t L, uint64_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = proj + r * K * L;
    for (int64_t l = 0; l < L; ++l, p += K) {
      uint64_t code = 0;
      // v >= 0 (not the sign bit): -0.0 gives 1 and NaN gives 0, exactly as torch's `>= 0`.
      for (int k = 0; k < K; ++k) code |= static_cast<uint64_t>(p[k] >= T(0)) << k;
      out[r * L + l] = code;
    }
  }
}

#if defined(__SSE2__)
// float32, four lanes per compare: _mm_cmpge_ps is an ordered IEEE compare (NaN -> 0,
// -0.0 >= 0 -> 1), the same predicate as the scalar loop; SSE2 is baseline on x86-64.
template <>
void pack_rows<float>(const float* proj, int64_t r0, int64_t r1, int K, int64_t L, uint64_t* out) {
  const __m128 zero = _mm_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const float* p = proj + r * K * L;
    for (int64_t l = 0; l < L; ++l, p += K) {
      uint64_t code = 0;
      int k = 0;
      for (; k + 4 <= K; k += 4)
        code |= static_cast<uint64_t>(_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(p + k), zero))) << k;
      for (; k < K; ++k) code |= static_cast<uint64_t>(p[k] >= 0.0f) << k;
      out[r * L + l] = code;
    }
  }
}
#endif

template <class T>
void pack_signs_impl(const T* proj, int64_t n, int64_t n_cols, int K, uint64_t* out,
                     int n_threads) {
  if (K < 1 || K > 64)
    throw std::invalid_argument("pack_signs: K must be in 1..64, got " + std::to_string(K));
  if (n_cols % K != 0)
    throw std::invalid_argument("pack_signs: the number of columns (" + std::to_string(n_cols) +
                                ") is not a multiple of K=" + std::to_string(K));
  const int64_t L = n_cols / K;
  // Threads only for work worth more than their start-up (~1M projections per chunk).
  const int64_t nch = n_chunks_for(n, resolve_threads(n_threads), std::max<int64_t>(1, (1 << 20) / n_cols));
  parallel_for(nch, resolve_threads(n_threads), [&](int64_t c) {
    pack_rows(proj, c * n / nch, (c + 1) * n / nch, K, L, out);
  });
}

}  // namespace

void pack_signs(const float* proj, int64_t n, int64_t n_cols, int K, uint64_t* out, int n_threads) {
  pack_signs_impl(proj, n, n_cols, K, out, n_threads);
}

void pack_signs(const double* proj, int64_t n, int64_t n_cols, int K, uint64_t* out, int n_threads) {
  pack_signs_impl(proj, n, n_cols, K, out, n_threads);
}

}  // namespace clsh
