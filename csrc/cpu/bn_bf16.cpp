// conv_bn_relu2d's bfloat16 batch-norm sweeps on AVX-512 (see csrc/cpu/bn_bf16.h).
#include "cpu/bn_bf16.h"

#include <algorithm>

#include "cpu/conv2d_bf16.h"
#include "cpu/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 reports its own _mm512_undefined_* placeholders inside the widening and
// reduction intrinsics as maybe-uninitialized: noise, silenced for this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define CNNEXT_BN_BF16 1
#endif

namespace cnnext {
namespace cpu {
namespace bn_bf16 {

bool available() { return bf16::available(); }

#ifdef CNNEXT_BN_BF16
namespace {

#define CNNEXT_BNK CNNEXT_TARGET("avx512f,avx512bw,avx512vl,avx512bf16,fma")

constexpr int64_t kChunk = 256;  // values summed in float before the sum goes to double

CNNEXT_BNK inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// 16 bfloat16 values (lanes off m read as 0) widened to float.
CNNEXT_BNK inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

CNNEXT_BNK inline void store16(uint16_t* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// gm of 16 lanes: g, zeroed where o <= 0 (ordered compare: NaN passes).
CNNEXT_BNK inline __m512 grad16(const uint16_t* g, const uint16_t* o, int64_t i, __mmask16 m) {
  const __m512 gv = load16(g + i, m);
  if (!o) return gv;
  const __mmask16 le = _mm512_cmp_ps_mask(load16(o + i, m), _mm512_setzero_ps(), _CMP_LE_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~le), gv);
}

}  // namespace

CNNEXT_BNK void moments(const uint16_t* v, int64_t n, double* mean, double* m2) {
  double s = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = i0; i < i1; i += 16) acc = _mm512_add_ps(acc, load16(v + i, tail_mask(i1 - i)));
    s += static_cast<double>(_mm512_reduce_add_ps(acc));
  }
  const double mu = n ? s / double(n) : 0.0;
  const __m512 mv = _mm512_set1_ps(static_cast<float>(mu));
  // Deviations from the float mean; the float mean's own error e adds n * e^2, far below
  // float rounding of m2.
  double q = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = i0; i < i1; i += 16) {
      const __mmask16 m = tail_mask(i1 - i);
      const __m512 d = _mm512_maskz_sub_ps(m, load16(v + i, m), mv);
      acc = _mm512_fmadd_ps(d, d, acc);
    }
    q += static_cast<double>(_mm512_reduce_add_ps(acc));
  }
  *mean = mu;
  *m2 = q;
}

CNNEXT_BNK void normalize(const uint16_t* v, uint16_t* out, int64_t n, float m, float s, float t, bool relu) {
  const __m512 mv = _mm512_set1_ps(m), sv = _mm512_set1_ps(s), tv = _mm512_set1_ps(t), z = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    __m512 r = _mm512_fmadd_ps(_mm512_sub_ps(load16(v + i, k), mv), sv, tv);
    // r < 0 ? 0 : r, as the generic loop (NaN stays NaN)
    if (relu) r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(r, z, _CMP_LT_OQ), z);
    store16(out + i, k, r);
  }
}

CNNEXT_BNK void sums(const uint16_t* g, const uint16_t* o, const uint16_t* y, int64_t n, float m, double* s0,
                     double* s1) {
  const __m512 mv = _mm512_set1_ps(m);
  double a0 = 0, a1 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
    for (int64_t i = i0; i < i1; i += 16) {
      const __mmask16 k = tail_mask(i1 - i);
      const __m512 gm = grad16(g, o, i, k);
      c0 = _mm512_add_ps(c0, gm);
      c1 = _mm512_fmadd_ps(gm, _mm512_maskz_sub_ps(k, load16(y + i, k), mv), c1);
    }
    a0 += static_cast<double>(_mm512_reduce_add_ps(c0));
    a1 += static_cast<double>(_mm512_reduce_add_ps(c1));
  }
  *s0 = a0;
  *s1 = a1;
}

CNNEXT_BNK double apply(const uint16_t* g, const uint16_t* o, const uint16_t* y, int64_t n, float m, float k,
                        float shift, float coef, uint16_t* dy) {
  const __m512 mv = _mm512_set1_ps(m), kv = _mm512_set1_ps(k), sv = _mm512_set1_ps(shift),
               cv = _mm512_set1_ps(coef);
  double a0 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    __m512 c0 = _mm512_setzero_ps();
    for (int64_t i = i0; i < i1; i += 16) {
      const __mmask16 mk = tail_mask(i1 - i);
      const __m512 gm = grad16(g, o, i, mk);
      const __m512 yc = _mm512_sub_ps(load16(y + i, mk), mv);
      // k * gm + shift - coef * (y - m), rounded once
      const __m512 r = _mm512_fnmadd_ps(cv, yc, _mm512_fmadd_ps(kv, gm, sv));
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(r);
      _mm256_mask_storeu_epi16(dy + i, mk, b);
      // the rounded values, widened back
      const __m512 rb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      c0 = _mm512_mask_add_ps(c0, mk, c0, rb);
    }
    a0 += static_cast<double>(_mm512_reduce_add_ps(c0));
  }
  return a0;
}

#else
void moments(const uint16_t*, int64_t, double*, double*) {}
void normalize(const uint16_t*, uint16_t*, int64_t, float, float, float, bool) {}
void sums(const uint16_t*, const uint16_t*, const uint16_t*, int64_t, float, double*, double*) {}
double apply(const uint16_t*, const uint16_t*, const uint16_t*, int64_t, float, float, float, float, uint16_t*) {
  return 0;
}
#endif

}  // namespace bn_bf16
}  // namespace cpu
}  // namespace cnnext
