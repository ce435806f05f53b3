// The CPU vector layer: Vec<T, I>, a small vector of T for instruction set I (AVX-512,
// AVX2 or scalar), and the bfloat16 / float16 conversions and bfloat16 dot product the
// kernels build on. Thin inline wrappers over the intrinsics: a kernel compiled for I
// (CNNEXT_TARGET, csrc/cpu/cpu_features.h) and written with Vec<T, I> compiles to the
// intrinsics themselves. float and double share every template. The AVX-512 vectors
// also have masked loads and stores and an even-lane gather, and index vectors of
// IntOf<T> lanes beside them (csrc/cpu/max_pool2d_avx512.cpp).
//
// bfloat16 and float16 are stored as uint16_t bits and computed in float. Narrowing
// rounds to nearest even, as torch does (c10::BFloat16, c10::Half): through the
// AVX512_BF16 (vcvtneps2bf16) and F16C (vcvtps2ph) instructions where
// cpu_features() has them, the scalar c10 conversions otherwise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CNNEXT_VEC_X86 1
#endif

#include "cpu/cpu_features.h"

namespace cnnext {
namespace cpu {
namespace vec {

template <typename T, Isa I>
struct Vec;

// Every member of every Vec is always inlined (see CNNEXT_VEC_AVX2 below): kernels weigh
// as if written with the intrinsics, and no vector passes through a call.
#if defined(__GNUC__) || defined(__clang__)
#define CNNEXT_VEC_INLINE __attribute__((always_inline))
#else
#define CNNEXT_VEC_INLINE
#endif

// The signed integer type as wide as T (int32_t for float, int64_t for double): the
// lanes that carry an index beside a value, one per value lane, under the same mask.
template <typename T>
using IntOf = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// ---- scalar ------------------------------------------------------------------------

template <typename T>
struct Vec<T, Isa::kScalar> {
  static constexpr int size = 1;
  using Mask = bool;
  T v;
  CNNEXT_VEC_INLINE static Vec load(const T* p) { return {*p}; }
  CNNEXT_VEC_INLINE static Vec set1(T x) { return {x}; }
  CNNEXT_VEC_INLINE static Vec zero() { return {T(0)}; }
  CNNEXT_VEC_INLINE void store(T* p) const { *p = v; }
  CNNEXT_VEC_INLINE friend Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
  CNNEXT_VEC_INLINE friend Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
  CNNEXT_VEC_INLINE static Vec fmadd(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  // max_pool_takes's rule per lane: v > best, or v is NaN.
  CNNEXT_VEC_INLINE static Mask takes(Vec v, Vec best) { return v.v > best.v || v.v != v.v; }
  CNNEXT_VEC_INLINE static Vec select(Mask m, Vec if_true, Vec if_false) { return m ? if_true : if_false; }
};

#ifdef CNNEXT_VEC_X86

// ---- AVX2 --------------------------------------------------------------------------

// CNNEXT_AVX2 / CNNEXT_AVX512: the target of kernels written with these vectors.
// Every Vec member is also always inlined (CNNEXT_VEC_*): GCC 12 returns a struct of one
// AVX vector from an out-of-line target("avx2") function with its upper lanes cleared
// (a vzeroupper before the ret), so no Vec may pass through a call; and a caller not
// compiled for the instruction set then fails to build instead of calling one.
#define CNNEXT_AVX2 CNNEXT_TARGET("avx2,fma")
#define CNNEXT_VEC_AVX2 CNNEXT_AVX2 CNNEXT_VEC_INLINE

template <>
struct Vec<float, Isa::kAvx2> {
  static constexpr int size = 8;
  using Mask = __m256;
  __m256 v;
  CNNEXT_VEC_AVX2 static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  CNNEXT_VEC_AVX2 static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  CNNEXT_VEC_AVX2 static Vec zero() { return {_mm256_setzero_ps()}; }
  CNNEXT_VEC_AVX2 void store(float* p) const { _mm256_storeu_ps(p, v); }
  CNNEXT_VEC_AVX2 friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  CNNEXT_VEC_AVX2 friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  CNNEXT_VEC_AVX2 static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  CNNEXT_VEC_AVX2 static Mask takes(Vec x, Vec best) {
    return _mm256_or_ps(_mm256_cmp_ps(x.v, best.v, _CMP_GT_OQ), _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  }
  CNNEXT_VEC_AVX2 static Vec select(Mask m, Vec t, Vec f) { return {_mm256_blendv_ps(f.v, t.v, m)}; }
};

template <>
struct Vec<double, Isa::kAvx2> {
  static constexpr int size = 4;
  using Mask = __m256d;
  __m256d v;
  CNNEXT_VEC_AVX2 static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  CNNEXT_VEC_AVX2 static Vec set1(double x) { return {_mm256_set1_pd(x)}; }
  CNNEXT_VEC_AVX2 static Vec zero() { return {_mm256_setzero_pd()}; }
  CNNEXT_VEC_AVX2 void store(double* p) const { _mm256_storeu_pd(p, v); }
  CNNEXT_VEC_AVX2 friend Vec operator+(Vec a, Vec b) { return {_mm256_add_pd(a.v, b.v)}; }
  CNNEXT_VEC_AVX2 friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_pd(a.v, b.v)}; }
  CNNEXT_VEC_AVX2 static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  CNNEXT_VEC_AVX2 static Mask takes(Vec x, Vec best) {
    return _mm256_or_pd(_mm256_cmp_pd(x.v, best.v, _CMP_GT_OQ), _mm256_cmp_pd(x.v, x.v, _CMP_UNORD_Q));
  }
  CNNEXT_VEC_AVX2 static Vec select(Mask m, Vec t, Vec f) { return {_mm256_blendv_pd(f.v, t.v, m)}; }
};

// ---- AVX-512 -----------------------------------------------------------------------

#define CNNEXT_AVX512 CNNEXT_TARGET("avx512f,avx512bw,fma")
#define CNNEXT_VEC_AVX512 CNNEXT_AVX512 CNNEXT_VEC_INLINE

template <>
struct Vec<float, Isa::kAvx512> {
  static constexpr int size = 16;
  using Mask = __mmask16;
  __m512 v;
  CNNEXT_VEC_AVX512 static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  CNNEXT_VEC_AVX512 static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  CNNEXT_VEC_AVX512 static Vec zero() { return {_mm512_setzero_ps()}; }
  CNNEXT_VEC_AVX512 void store(float* p) const { _mm512_storeu_ps(p, v); }
  CNNEXT_VEC_AVX512 friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  CNNEXT_VEC_AVX512 friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  CNNEXT_VEC_AVX512 static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  CNNEXT_VEC_AVX512 static Mask takes(Vec x, Vec best) {
    return _mm512_cmp_ps_mask(x.v, best.v, _CMP_GT_OQ) | _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q);
  }
  CNNEXT_VEC_AVX512 static Vec select(Mask m, Vec t, Vec f) { return {_mm512_mask_blend_ps(m, f.v, t.v)}; }
  // Lanes in m from p, the others from fill or zero (lanes off m are not read: no fault).
  CNNEXT_VEC_AVX512 static Vec mask_load(Vec fill, Mask m, const float* p) { return {_mm512_mask_loadu_ps(fill.v, m, p)}; }
  CNNEXT_VEC_AVX512 static Vec maskz_load(Mask m, const float* p) { return {_mm512_maskz_loadu_ps(m, p)}; }
  CNNEXT_VEC_AVX512 void mask_store(float* p, Mask m) const { _mm512_mask_storeu_ps(p, m, v); }
  // The even lanes of the concatenation a, b (a's lanes first).
  CNNEXT_VEC_AVX512 static Vec even(Vec a, Vec b) {
    const __m512i e = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return {_mm512_permutex2var_ps(a.v, e, b.v)};
  }
};

template <>
struct Vec<double, Isa::kAvx512> {
  static constexpr int size = 8;
  using Mask = __mmask8;
  __m512d v;
  CNNEXT_VEC_AVX512 static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  CNNEXT_VEC_AVX512 static Vec set1(double x) { return {_mm512_set1_pd(x)}; }
  CNNEXT_VEC_AVX512 static Vec zero() { return {_mm512_setzero_pd()}; }
  CNNEXT_VEC_AVX512 void store(double* p) const { _mm512_storeu_pd(p, v); }
  CNNEXT_VEC_AVX512 friend Vec operator+(Vec a, Vec b) { return {_mm512_add_pd(a.v, b.v)}; }
  CNNEXT_VEC_AVX512 friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_pd(a.v, b.v)}; }
  CNNEXT_VEC_AVX512 static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  CNNEXT_VEC_AVX512 static Mask takes(Vec x, Vec best) {
    return _mm512_cmp_pd_mask(x.v, best.v, _CMP_GT_OQ) | _mm512_cmp_pd_mask(x.v, x.v, _CMP_UNORD_Q);
  }
  CNNEXT_VEC_AVX512 static Vec select(Mask m, Vec t, Vec f) { return {_mm512_mask_blend_pd(m, f.v, t.v)}; }
  CNNEXT_VEC_AVX512 static Vec mask_load(Vec fill, Mask m, const double* p) { return {_mm512_mask_loadu_pd(fill.v, m, p)}; }
  CNNEXT_VEC_AVX512 static Vec maskz_load(Mask m, const double* p) { return {_mm512_maskz_loadu_pd(m, p)}; }
  CNNEXT_VEC_AVX512 void mask_store(double* p, Mask m) const { _mm512_mask_storeu_pd(p, m, v); }
  CNNEXT_VEC_AVX512 static Vec even(Vec a, Vec b) {
    return {_mm512_permutex2var_pd(a.v, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b.v)};
  }
};

// Index lanes (IntOf<T>) beside Vec<T, kAvx512>: as many lanes, the same Mask type.
// mask_store_i64 writes the lanes in m widened to int64 (torch's index type).
template <>
struct Vec<int32_t, Isa::kAvx512> {
  static constexpr int size = 16;
  using Mask = __mmask16;
  __m512i v;
  CNNEXT_VEC_AVX512 static Vec load(const int32_t* p) { return {_mm512_loadu_si512(p)}; }
  CNNEXT_VEC_AVX512 static Vec set1(int32_t x) { return {_mm512_set1_epi32(x)}; }
  CNNEXT_VEC_AVX512 static Vec zero() { return {_mm512_setzero_si512()}; }
  CNNEXT_VEC_AVX512 friend Vec operator+(Vec a, Vec b) { return {_mm512_add_epi32(a.v, b.v)}; }
  CNNEXT_VEC_AVX512 static Vec select(Mask m, Vec t, Vec f) { return {_mm512_mask_blend_epi32(m, f.v, t.v)}; }
  // Per lane, entry idx (0-31) of the 32-entry table lo, hi.
  CNNEXT_VEC_AVX512 static Vec lookup(Vec lo, Vec idx, Vec hi) { return {_mm512_permutex2var_epi32(lo.v, idx.v, hi.v)}; }
  // Lanes 0-7 widened to int64.
  CNNEXT_VEC_AVX512 Vec<int64_t, Isa::kAvx512> low_i64() const;
  CNNEXT_VEC_AVX512 void mask_store_i64(int64_t* p, Mask m) const {
    _mm512_mask_storeu_epi64(p, static_cast<__mmask8>(m & 0xff), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)));
    _mm512_mask_storeu_epi64(p + 8, static_cast<__mmask8>(m >> 8), _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
  }
};

template <>
struct Vec<int64_t, Isa::kAvx512> {
  static constexpr int size = 8;
  using Mask = __mmask8;
  __m512i v;
  CNNEXT_VEC_AVX512 static Vec load(const int64_t* p) { return {_mm512_loadu_si512(p)}; }
  CNNEXT_VEC_AVX512 static Vec set1(int64_t x) { return {_mm512_set1_epi64(x)}; }
  CNNEXT_VEC_AVX512 friend Vec operator+(Vec a, Vec b) { return {_mm512_add_epi64(a.v, b.v)}; }
  CNNEXT_VEC_AVX512 static Vec select(Mask m, Vec t, Vec f) { return {_mm512_mask_blend_epi64(m, f.v, t.v)}; }
  CNNEXT_VEC_AVX512 void mask_store_i64(int64_t* p, Mask m) const { _mm512_mask_storeu_epi64(p, m, v); }
};

CNNEXT_VEC_AVX512 inline Vec<int64_t, Isa::kAvx512> Vec<int32_t, Isa::kAvx512>::low_i64() const {
  return {_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))};
}

// The bfloat16 bits (in the low 16 bits of each lane) of 8 floats, rounded to nearest even
// as torch rounds (subnormals too). A NaN comes out a NaN, but not with torch's bits: a
// caller that may meet one blends 0xFFFF in (float_to_bf16 does).
CNNEXT_VEC_AVX2 inline __m256i bf16_bits_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
}

#endif  // CNNEXT_VEC_X86

// ---- bfloat16 / float16 <-> float ------------------------------------------------------

// Scalar conversions, torch's own (round to nearest even; NaN to a quiet NaN).
inline float bf16_to_float(uint16_t b) { return c10::detail::f32_from_bits(b); }
inline uint16_t float_to_bf16(float f) { return c10::detail::round_to_nearest_even(f); }
inline float fp16_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline uint16_t float_to_fp16(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }

// Converts n values, each with the widest instructions cpu_features() allows
// (csrc/cpu/vec.cpp): out = the float16 / bfloat16 bits of in, or back, bit for bit as
// torch's tensor .to() (NaN narrows to 0xFFFF in bfloat16, as torch's vectorised
// conversion writes; float_to_bf16(float) above gives c10's 0x7FC0).
void float_to_bf16(const float* in, uint16_t* out, int64_t n);
void bf16_to_float(const uint16_t* in, float* out, int64_t n);
void float_to_fp16(const float* in, uint16_t* out, int64_t n);
void fp16_to_float(const uint16_t* in, float* out, int64_t n);

// sum_i a[i] * b[i] over n bfloat16 values, accumulated in float: vdpbf16ps (pairs of
// products per float lane) on CPUs with AVX512_BF16, a scalar float loop otherwise. The
// order of the sum differs between the two: compare with a tolerance.
float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t n);

}  // namespace vec
}  // namespace cpu
}  // namespace cnnext
