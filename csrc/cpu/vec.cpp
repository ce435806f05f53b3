// The out-of-line conversions and dot product of csrc/cpu/vec.h, each choosing its
// instructions from cpu_features().
#include "cpu/vec.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip these on their own _mm512_undefined_* (as in
// csrc/cpu/max_pool2d_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace cnnext {
namespace cpu {
namespace vec {
namespace {

#ifdef CNNEXT_VEC_X86

// torch's rounding of 16 floats to bfloat16 in integer arithmetic: round to nearest
// even on the bits, NaN to 0xFFFF (what torch's vectorised .to(torch.bfloat16) gives).
CNNEXT_TARGET("avx512f,avx512bw,avx512vl")
inline __m256i bf16_round_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0xFFFF)));
}

// 16 floats to 16 bfloat16 with vcvtneps2bf16 (round to nearest even). It reads float
// subnormals as zero and keeps a NaN's payload, where torch rounds subnormals and writes
// 0xFFFF: vectors holding either take bf16_round_bits instead.
CNNEXT_TARGET("avx512f,avx512bw,avx512vl,avx512bf16")
inline __m256i bf16_bits(__m512 x) {
  const __m512i exp = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7F800000));
  const __mmask16 zero_exp = _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512());
  const __mmask16 nonzero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  const __mmask16 max_exp = _mm512_cmpeq_epi32_mask(exp, _mm512_set1_epi32(0x7F800000));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  if ((zero_exp & nonzero) | (max_exp & nan)) return bf16_round_bits(x);
  const __m256bh b = _mm512_cvtneps_pbh(x);
  return reinterpret_cast<const __m256i&>(b);
}

CNNEXT_TARGET("avx512f,avx512bw,avx512vl,avx512bf16")
void float_to_bf16_avx512(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), bf16_bits(_mm512_loadu_ps(in + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(out + i, m, bf16_bits(_mm512_maskz_loadu_ps(m, in + i)));
  }
}

// bfloat16 to float is exact: the bits shifted up by 16.
CNNEXT_TARGET("avx512f,avx512bw")
void bf16_to_float_avx512(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) out[i] = bf16_to_float(in[i]);
}

CNNEXT_TARGET("avx2,f16c")
void float_to_fp16_f16c(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = float_to_fp16(in[i]);
}

CNNEXT_TARGET("avx2,f16c")
void fp16_to_float_f16c(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = fp16_to_float(in[i]);
}

// AVX2: bf16_bits_avx2, with NaN as 0xFFFF (torch's bits, its vectorised conversion's).
CNNEXT_AVX2 __attribute__((always_inline)) inline __m256i bf16_round8_avx2(__m256 v) {
  return _mm256_blendv_epi8(bf16_bits_avx2(v), _mm256_set1_epi32(0xFFFF),
                            _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

CNNEXT_AVX2
void float_to_bf16_avx2(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = bf16_round8_avx2(_mm256_loadu_ps(in + i)), b = bf16_round8_avx2(_mm256_loadu_ps(in + i + 8));
    // packus interleaves the 128-bit halves (a.lo, b.lo, a.hi, b.hi): put them back in order
    // (the values are below 2^16: no saturation).
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
  }
  for (; i < n; ++i) out[i] = in[i] != in[i] ? uint16_t(0xFFFF) : float_to_bf16(in[i]);
}

CNNEXT_AVX2
void bf16_to_float_avx2(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) out[i] = bf16_to_float(in[i]);
}

// vdpbf16ps: each float lane accumulates the products of one pair of bfloat16 lanes.
CNNEXT_TARGET("avx512f,avx512bw,avx512vl,avx512bf16")
float dot_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i x = _mm512_loadu_si512(a + i), y = _mm512_loadu_si512(b + i);
    acc = _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(x), reinterpret_cast<const __m512bh&>(y));
  }
  if (i < n) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t(1) << (n - i)) - 1);
    const __m512i x = _mm512_maskz_loadu_epi16(m, a + i), y = _mm512_maskz_loadu_epi16(m, b + i);
    acc = _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(x), reinterpret_cast<const __m512bh&>(y));
  }
  return _mm512_reduce_add_ps(acc);
}

#endif  // CNNEXT_VEC_X86

}  // namespace

void float_to_bf16(const float* in, uint16_t* out, int64_t n) {
#ifdef CNNEXT_VEC_X86
  if (cpu_features().avx512_bf16) return float_to_bf16_avx512(in, out, n);
  if (cpu_features().avx2) return float_to_bf16_avx2(in, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] != in[i] ? uint16_t(0xFFFF) : float_to_bf16(in[i]);
}

void bf16_to_float(const uint16_t* in, float* out, int64_t n) {
#ifdef CNNEXT_VEC_X86
  if (cpu_features().avx512bw) return bf16_to_float_avx512(in, out, n);
  if (cpu_features().avx2) return bf16_to_float_avx2(in, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(in[i]);
}

void float_to_fp16(const float* in, uint16_t* out, int64_t n) {
#ifdef CNNEXT_VEC_X86
  if (cpu_features().f16c && cpu_features().avx2) return float_to_fp16_f16c(in, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_fp16(in[i]);
}

void fp16_to_float(const uint16_t* in, float* out, int64_t n) {
#ifdef CNNEXT_VEC_X86
  if (cpu_features().f16c && cpu_features().avx2) return fp16_to_float_f16c(in, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(in[i]);
}

float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t n) {
#ifdef CNNEXT_VEC_X86
  if (cpu_features().avx512_bf16) return dot_bf16_avx512(a, b, n);
#endif
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += bf16_to_float(a[i]) * bf16_to_float(b[i]);
  return acc;
}

}  // namespace vec
}  // namespace cpu
}  // namespace cnnext
