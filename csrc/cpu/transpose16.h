#pragma once
// A 16 x 16 float transpose in AVX-512 registers, shared by the GEMM's packing
// (sgemm::transpose16, which stores the rows) and the tiny-C kernel's NCHW stores (which
// add the bias and ReLU to each row first).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
#include <immintrin.h>

#include <cstdint>

#include "cpu/cpu_features.h"

namespace cnnext {
namespace cpu {

// GCC 12 warns about the undefined source operand inside its unpack intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// out[j] lane i = src[i * cs + j] for i, j in [0, 16).
CNNEXT_TARGET("avx512f") __attribute__((always_inline)) inline void transpose16_regs(const float* src,
                                                                                  int64_t cs,
                                                                                  __m512 (&out)[16]) {
  __m512 r[16];
  __m512 u[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * cs);
  // Within 128-bit lanes: u[4b + m] lane L = column 4L + m of rows 4b .. 4b + 3.
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {
    const __m512d ta = _mm512_castps_pd(_mm512_unpacklo_ps(r[4 * b], r[4 * b + 1]));
    const __m512d tb = _mm512_castps_pd(_mm512_unpackhi_ps(r[4 * b], r[4 * b + 1]));
    const __m512d tc = _mm512_castps_pd(_mm512_unpacklo_ps(r[4 * b + 2], r[4 * b + 3]));
    const __m512d td = _mm512_castps_pd(_mm512_unpackhi_ps(r[4 * b + 2], r[4 * b + 3]));
    u[4 * b + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(ta, tc));
    u[4 * b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(ta, tc));
    u[4 * b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(tb, td));
    u[4 * b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(tb, td));
  }
  // Then across lanes: column 4L + m = lane L of u[m], u[4 + m], u[8 + m], u[12 + m].
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    const __m512 v = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    const __m512 w = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xdd);
    out[m] = _mm512_shuffle_f32x4(v, v2, 0x88);
    out[8 + m] = _mm512_shuffle_f32x4(v, v2, 0xdd);
    out[4 + m] = _mm512_shuffle_f32x4(w, w2, 0x88);
    out[12 + m] = _mm512_shuffle_f32x4(w, w2, 0xdd);
  }
}
#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace cnnext
#endif
