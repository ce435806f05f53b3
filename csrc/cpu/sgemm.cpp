// See sgemm.h. The micro-kernel keeps a kMR x kNR tile of C in 16 AVX-512 registers
// and adds one rank-1 product per k: two vector loads of B, kMR broadcasts of A.
// K is cut into blocks of kKC so the B panel of a block (kKC x kNR floats, 48 KiB)
// stays close (L1/L2) while every A panel passes it. The tile and block sizes were
// measured on Zen 4 (8 x 32 and 384 beat 12 x 32, 14 x 32, 8 x 48, 6 x 64 and
// blocks of 128 to 512 there).
#include "cpu/sgemm.h"

#include <algorithm>
#include <type_traits>

#include "cpu/cpu_features.h"
#include "cpu/transpose16.h"
#include "paths.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
#include <immintrin.h>
#define CNNEXT_SGEMM_AVX512 1
#endif

namespace cnnext {
namespace cpu {
namespace sgemm {

// One count per GEMM call, per micro-kernel variant (packed B, B read in place by rows,
// A read in place by rows).
CNNEXT_PATH_NEEDS(kGemm, "sgemm.gemm", kAvx512F);
CNNEXT_PATH_NEEDS(kGemmRows, "sgemm.gemm_rows", kAvx512F);
CNNEXT_PATH_NEEDS(kGemmArows, "sgemm.gemm_arows", kAvx512F);
CNNEXT_PATH_NEEDS(kGemmSmallN, "sgemm.gemm_small_n", kAvx512F);
// gemm() on a CPU with AVX2 and FMA but no AVX-512F (the same packed panels).
CNNEXT_PATH_NEEDS(kGemmAvx2, "sgemm.gemm_avx2", kAvx2);

namespace {

// Packs a (extent x K) matrix, element (i, k) at src[i * s_i + k * s_k], into panels of
// `width` rows of i: out[(i / width) * K * width + k * width + i % width], zero-padded.
void pack_panels(const float* src, int64_t s_i, int64_t s_k, int64_t extent, int64_t K,
                 int64_t width, float* out) {
  for (int64_t i0 = 0; i0 < extent; i0 += width) {
    const int64_t n = std::min(width, extent - i0);
    float* panel = out + i0 * K;
    for (int64_t k = 0; k < K; ++k) {
      float* dst = panel + k * width;
      const float* from = src + i0 * s_i + k * s_k;
      int64_t i = 0;
      if (s_i == 1) {
        for (; i < n; ++i) dst[i] = from[i];
      } else {
        for (; i < n; ++i) dst[i] = from[i * s_i];
      }
      for (; i < width; ++i) dst[i] = 0.f;
    }
  }
}

}  // namespace

// dst[k * ld + i] = src[i * cs + k] for i, k in [0, 16): a 16 x 16 transpose (AVX-512).
// Returns false where the CPU or the build has no AVX-512.
bool transpose16(const float* src, int64_t cs, float* dst, int64_t ld);

// out[k * 8 + i] = src[i * rs + k] for i in [0, 8), k in [0, 16): one 8 x 16 block of a
// row-major A into its packed panel (AVX-512). Returns false where the CPU or the build
// has no AVX-512.
bool transpose8x16(const float* src, int64_t rs, float* out);

void pack_a(const float* a, int64_t rs, int64_t cs, int64_t M, int64_t K, float* out) {
  // Rows contiguous (a weight read in place): whole panels of 8 rows in blocks of 16 k, by
  // vector transposes; the rest (a partial panel, the last K % 16) element by element.
  const int64_t full = cs == 1 ? M / kMR * kMR : 0, kb = K / 16 * 16;
  int64_t i0 = 0;
  for (; i0 < full; i0 += kMR) {
    const float* src = a + i0 * rs;
    float* panel = out + i0 * K;
    int64_t k0 = 0;
    for (; k0 < kb; k0 += 16)
      if (!transpose8x16(src + k0, rs, panel + k0 * kMR)) break;
    for (int64_t k = k0; k < K; ++k)
      for (int64_t i = 0; i < kMR; ++i) panel[k * kMR + i] = src[i * rs + k];
  }
  if (i0 < M) pack_panels(a + i0 * rs, rs, cs, M - i0, K, kMR, out + i0 * K);
}

void pack_b(const float* b, int64_t rs, int64_t cs, int64_t K, int64_t N, float* out) {
  if (rs != 1 || cs == 1) {
    pack_panels(b, cs, rs, N, K, kNR, out);
    return;
  }
  // Columns of B contiguous (B^T row-major, as a weight read transposed): blocks of 16 k
  // x kNR columns, so each cache line read is used whole while it is in L1.
  constexpr int64_t kKB = 16;
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    const int64_t n = std::min(kNR, N - j0);
    float* panel = out + j0 * K;
    for (int64_t k0 = 0; k0 < K; k0 += kKB) {
      const int64_t kb = std::min(kKB, K - k0);
      int64_t j = 0;
      if (kb == kKB) {
        for (; j + 16 <= n; j += 16)
          if (!transpose16(b + (j0 + j) * cs + k0, cs, panel + k0 * kNR + j, kNR)) break;
      }
      for (; j < n; ++j) {
        const float* src = b + (j0 + j) * cs + k0;
        float* dst = panel + k0 * kNR + j;
        for (int64_t k = 0; k < kb; ++k) dst[k * kNR] = src[k];
      }
      for (int64_t k = 0; k < kb; ++k)
        for (int64_t j = n; j < kNR; ++j) panel[(k0 + k) * kNR + j] = 0.f;
    }
  }
}

// gemm() without vector instructions (a CPU with neither AVX-512F nor AVX2 + FMA, or a
// build without them): the same sums, element by element.
static void gemm_plain(const float* a_packed, const float* b_packed, int64_t M, int64_t N, int64_t K,
          float* c, int64_t ldc, bool accumulate, const float* bias, bool relu) {
  for (int64_t i = 0; i < M; ++i) {
    const float* ap = a_packed + (i / kMR) * K * kMR + i % kMR;
    for (int64_t j = 0; j < N; ++j) {
      const float* bp = b_packed + (j / kNR) * K * kNR + j % kNR;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += ap[k * kMR] * bp[k * kNR];
      float& out = c[i * ldc + j];
      out = accumulate ? out + acc : acc + (bias ? bias[i] : 0.f);
      if (relu && out < 0.f) out = 0.f;
    }
  }
}

#ifdef CNNEXT_SGEMM_AVX512

namespace {

constexpr int64_t kKC = 384;

// One kMR x kNR tile: acc = A_panel(kc) * B_panel(kc), then stored into C rows
// [0, rows) and columns [0, cols) (masked), added to C when `add`, clamped at 0 when `relu`.
static_assert(kNR == 32, "the micro-kernel holds a tile row in two 16-float vectors");

// Stores a kMR x 16 NV tile of accumulators into C rows [0, rows) and columns [0, cols)
// (masked): added to C when `add`, else plus bias[r] when given; then max(., 0) when `relu`
// (NaN stays NaN: the ordered compare is false for it). Inlined into each micro-kernel, with
// constant trip counts throughout, so acc stays in registers.
template <int NV>
CNNEXT_TARGET("avx512f,fma") __attribute__((always_inline)) inline void store_tile(
    __m512 (&acc)[kMR][NV], float* c, int64_t ldc, int64_t rows, int64_t cols, bool add,
    const float* bias, bool relu) {
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t left = cols - 16 * v;
    mask[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  }
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    if (r < rows) {
      float* cr = c + r * ldc;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        __m512 val = acc[r][v];
        if (add) {
          val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(mask[v], cr + 16 * v));
        } else if (bias) {
          val = _mm512_add_ps(val, _mm512_set1_ps(bias[r]));
        }
        if (relu) {
          const __m512 zero = _mm512_setzero_ps();
          val = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(val, zero, _CMP_LT_OQ), val, zero);
        }
        _mm512_mask_storeu_ps(cr + 16 * v, mask[v], val);
      }
    }
  }
}

// kOff: row k of B is b + off[k] (B read in place, rows anywhere), else the packed panel.
// kNV: 16-float vectors of B per k (2: the whole kNR panel; 1: its first 16 columns, for a
// last panel of at most 16 columns, which so costs about half a panel instead of one).
template <bool kOff, bool kARows = false, int kNV = 2>
CNNEXT_TARGET("avx512f,fma") void micro_kernel(int64_t kc, const float* a,
                                                          const float* const* arows,
                                                          const float* b, const int64_t* off,
                                                          float* c, int64_t ldc,
                                                          int64_t rows, int64_t cols, bool add,
                                                          const float* bias, bool relu) {
  __m512 acc[kMR][kNV];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) bv[v] = _mm512_loadu_ps((kOff ? b + off[k] : b + k * kNR) + 16 * v);
    const float* ak = a + k * kMR;
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const __m512 av = _mm512_set1_ps(kARows ? arows[r][k] : ak[r]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  store_tile<kNV>(acc, c, ldc, rows, cols, add, bias, relu);
}


// One tile of gemm_small_n: kMR rows of A read in place (arows[r][k]) by 16 * NV columns of
// the row-major B (b + k * ldb), plus TW (0, 4 or 8) columns after them in a 128- or 256-bit
// register, into C rows [0, rows) and columns [0, cols), K blocks after the first added to C
// (`add`), the bias on the first, the ReLU on the last. The narrow tail: 36 positions (a
// ResNet's 3x3 maps over a batch of 4) are two 512-bit vectors and a 128-bit one, which on
// a CPU that runs 512-bit FMAs as two 256-bit halves costs 5 halves per row and k instead
// of the 6 of three 512-bit vectors. Every column's sum takes the same FMAs in the same
// order whichever register holds it: the tail changes no bit.
template <int NV, int TW>
CNNEXT_TARGET("avx512f,fma") void small_n_kernel(int64_t kc, const float* const* arows,
                                                 const float* b, int64_t ldb, float* c,
                                                 int64_t ldc, int64_t rows, int64_t cols, bool add,
                                                 const float* bias, bool relu) {
  static_assert(TW == 0 || TW == 4 || TW == 8, "tail of 0, 4 or 8 columns");
  using Tail = std::conditional_t<TW == 8, __m256, __m128>;
  __m512 acc[kMR][NV > 0 ? NV : 1];
  Tail tacc[kMR];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    if constexpr (TW == 8) tacc[r] = _mm256_setzero_ps();
    else if constexpr (TW == 4) tacc[r] = _mm_setzero_ps();
  }
  const float* a0 = arows[0];
  const float* a1 = arows[1];
  const float* a2 = arows[2];
  const float* a3 = arows[3];
  const float* a4 = arows[4];
  const float* a5 = arows[5];
  const float* a6 = arows[6];
  const float* a7 = arows[7];
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NV > 0 ? NV : 1];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bk + 16 * v);
    Tail bt;
    if constexpr (TW == 8) bt = _mm256_loadu_ps(bk + 16 * NV);
    else if constexpr (TW == 4) bt = _mm_loadu_ps(bk + 16 * NV);
    const float av[kMR] = {a0[k], a1[k], a2[k], a3[k], a4[k], a5[k], a6[k], a7[k]};
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const __m512 ab = _mm512_set1_ps(av[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ab, bv[v], acc[r][v]);
      if constexpr (TW == 8) tacc[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(ab), bt, tacc[r]);
      else if constexpr (TW == 4) tacc[r] = _mm_fmadd_ps(_mm512_castps512_ps128(ab), bt, tacc[r]);
    }
  }
  if constexpr (NV > 0) store_tile<NV>(acc, c, ldc, rows, std::min<int64_t>(cols, 16 * NV), add, bias, relu);
  if constexpr (TW > 0) {
    // The tail's few columns element by element, as store_tile does each lane: C added
    // (later K blocks) or the bias (the first), then the ReLU (x < 0 -> 0, NaN kept).
    const int64_t tcols = std::min<int64_t>(cols - 16 * NV, TW);
    for (int r = 0; r < kMR; ++r) {
      if (r >= rows) break;
      alignas(32) float t[8];
      if constexpr (TW == 8) _mm256_store_ps(t, tacc[r]);
      else _mm_store_ps(t, tacc[r]);
      float* cr = c + r * ldc + 16 * NV;
      for (int64_t j = 0; j < tcols; ++j) {
        float val = t[j];
        if (add) val += cr[j];
        else if (bias) val += bias[r];
        if (relu && val < 0.f) val = 0.f;
        cr[j] = val;
      }
    }
  }
}

}  // namespace

CNNEXT_TARGET("avx512f") void transpose16_avx512(const float* src, int64_t cs, float* dst, int64_t ld) {
  __m512 t[16];
  transpose16_regs(src, cs, t);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld, t[i]);
}

bool transpose16(const float* src, int64_t cs, float* dst, int64_t ld) {
  if (!available()) return false;
  transpose16_avx512(src, cs, dst, ld);
  return true;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
CNNEXT_TARGET("avx512f") void transpose8x16_avx512(const float* src, int64_t rs, float* out) {
  __m512 r[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_ps(src + i * rs);
  // t: 128-bit lane L of unpack{lo,hi}(r[2p], r[2p + 1]) = rows 2p, 2p + 1 interleaved at
  // k = 4L + {0, 1} (lo) or 4L + {2, 3} (hi).
  __m512 t[8];
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
  }
  // u[m] (rows 0-3) and v[m] (rows 4-7): lane L = those rows at k = 4L + m.
  __m512 u[4], v[4];
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m512d a = _mm512_castps_pd(t[h]), b = _mm512_castps_pd(t[2 + h]);
    const __m512d c = _mm512_castps_pd(t[4 + h]), d = _mm512_castps_pd(t[6 + h]);
    u[2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    v[2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    v[2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // Output vector q = 2L + h holds k = 2q (rows 0-7) then k = 2q + 1: the 128-bit lanes
  // u[2h].L, v[2h].L, u[2h + 1].L, v[2h + 1].L.
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m512 ab_lo = _mm512_shuffle_f32x4(u[2 * h], v[2 * h], 0x44);
    const __m512 ab_hi = _mm512_shuffle_f32x4(u[2 * h], v[2 * h], 0xEE);
    const __m512 cd_lo = _mm512_shuffle_f32x4(u[2 * h + 1], v[2 * h + 1], 0x44);
    const __m512 cd_hi = _mm512_shuffle_f32x4(u[2 * h + 1], v[2 * h + 1], 0xEE);
    _mm512_storeu_ps(out + (0 + h) * 16, _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88));
    _mm512_storeu_ps(out + (2 + h) * 16, _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD));
    _mm512_storeu_ps(out + (4 + h) * 16, _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88));
    _mm512_storeu_ps(out + (6 + h) * 16, _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD));
  }
}
#pragma GCC diagnostic pop

bool transpose8x16(const float* src, int64_t rs, float* out) {
  if (!available()) return false;
  transpose8x16_avx512(src, rs, out);
  return true;
}

bool available() {
  return cpu_features().avx512f_fma();
}

namespace {

// The AVX2 micro-kernel on the same packed panels: an R x 16 tile of C (R = 6: 12
// accumulators of the 16 ymm registers, 2 for B, 1 for A's broadcast) over the whole kc.
// The tile's rows are any R rows of A, each read through its own pointer into its panel
// (row i at a + (i / kMR) * K * kMR + i % kMR, kMR floats a k): six rows cross the 8-row
// panels. 12 independent FMA chains cover the FMA latency (4 cycles) of two FMA pipes with
// room to spare; the earlier 4 x 16 tiles had exactly the 8 chains that takes, and ran at
// about 55% of the FMA peak on Zen 3 (Winograd's element-wise GEMMs). Each C element is
// one chain of FMAs over k in order, as in the AVX-512 kernel: the tile's shape changes
// no bit.
CNNEXT_TARGET("avx2,fma") __attribute__((always_inline)) inline __m256i lane_mask8(int64_t left) {
  const int32_t n = int32_t(std::max<int64_t>(0, std::min<int64_t>(8, left)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int R>
CNNEXT_TARGET("avx2,fma") void tile_avx2(int64_t kc, const float* const* arow, const float* b,
                                         float* c, int64_t ldc, int64_t rows, int64_t cols,
                                         bool add, const float* bias, bool relu) {
  __m256 acc[R][2];
  const float* ap[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    ap[r] = arow[r];
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kNR), b1 = _mm256_loadu_ps(b + k * kNR + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(ap[r] + k * kMR);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  // Stored as the AVX-512 kernel's store_tile: C added (`add`), else the bias; then
  // max(., 0) (NaN kept: the ordered compare is false for it).
  const bool full = cols >= 16;
  const __m256i m0 = lane_mask8(cols), m1 = lane_mask8(cols - 8);
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    float* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __m256i m = v == 0 ? m0 : m1;
      __m256 val = acc[r][v];
      if (add) {
        val = _mm256_add_ps(val, full ? _mm256_loadu_ps(cr + 8 * v) : _mm256_maskload_ps(cr + 8 * v, m));
      } else if (bias) {
        val = _mm256_add_ps(val, _mm256_set1_ps(bias[r]));
      }
      if (relu) val = _mm256_blendv_ps(val, zero, _mm256_cmp_ps(val, zero, _CMP_LT_OQ));
      if (full) _mm256_storeu_ps(cr + 8 * v, val);
      else _mm256_maskstore_ps(cr + 8 * v, m, val);
    }
  }
}

// gemm() on AVX2: for each K block and 16-column half of a B panel (kc x 16 floats, kept in
// L1), every row tile of A passes it: tiles of 6 rows, the last 1-5 rows as a tile of 2, 4
// or 6 whose rows past M repeat row M - 1 (computed, not stored).
void gemm_avx2(const float* a_packed, const float* b_packed, int64_t M, int64_t N, int64_t K,
               float* c, int64_t ldc, bool accumulate, const float* bias, bool relu) {
  constexpr int64_t kRows = 6;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool add = accumulate || k0 > 0;
    const bool rl = relu && k0 + kc >= K;  // the ReLU sees only final values
    for (int64_t j0 = 0; j0 < N; j0 += kNR) {
      for (int64_t h = j0; h < std::min(N, j0 + kNR); h += 16) {
        const float* bp = b_packed + j0 * K + k0 * kNR + (h - j0);
        const int64_t cols = std::min<int64_t>(16, N - h);
        for (int64_t i0 = 0; i0 < M; i0 += kRows) {
          const int64_t rows = std::min(kRows, M - i0);
          const float* arow[kRows];
          for (int64_t r = 0; r < kRows; ++r) {
            const int64_t i = std::min(i0 + r, M - 1);
            arow[r] = a_packed + (i / kMR) * K * kMR + k0 * kMR + i % kMR;
          }
          float* ct = c + i0 * ldc + h;
          const float* bi = bias ? bias + i0 : nullptr;
          if (rows > 4) tile_avx2<6>(kc, arow, bp, ct, ldc, rows, cols, add, bi, rl);
          else if (rows > 2) tile_avx2<4>(kc, arow, bp, ct, ldc, rows, cols, add, bi, rl);
          else tile_avx2<2>(kc, arow, bp, ct, ldc, rows, cols, add, bi, rl);
        }
      }
    }
  }
}

}  // namespace

void gemm(const float* a_packed, const float* b_packed, int64_t M, int64_t N, int64_t K,
          float* c, int64_t ldc, bool accumulate, const float* bias, bool relu) {
  const bool wide = available();
  if (!wide && !cpu_features().avx2_fma()) {
    gemm_plain(a_packed, b_packed, M, N, K, c, ldc, accumulate, bias, relu);
    return;
  }
  if (!wide) {
    kGemmAvx2.hit();
    gemm_avx2(a_packed, b_packed, M, N, K, c, ldc, accumulate, bias, relu);
    return;
  }
  kGemm.hit();
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool add = accumulate || k0 > 0;
    const bool last = k0 + kc >= K;  // the ReLU sees only final values
    for (int64_t j0 = 0; j0 < N; j0 += kNR) {
      const float* bp = b_packed + j0 * K + k0 * kNR;
      const int64_t cols = std::min(kNR, N - j0);
      for (int64_t i0 = 0; i0 < M; i0 += kMR) {
        (cols <= 16 ? micro_kernel<false, false, 1> : micro_kernel<false, false, 2>)(
            kc, a_packed + i0 * K + k0 * kMR, nullptr, bp, nullptr, c + i0 * ldc + j0, ldc,
            std::min(kMR, M - i0), cols, add, bias ? bias + i0 : nullptr, relu && last);
      }
    }
  }
}

void gemm_rows(const float* a_packed, const float* b, const int64_t* off, int64_t M, int64_t N,
               int64_t K, float* c, int64_t ldc, const float* bias, bool relu) {
  kGemmRows.hit();
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool last = k0 + kc >= K;
    for (int64_t j0 = 0; j0 < N; j0 += kNR) {
      const int64_t cols = std::min(kNR, N - j0);
      for (int64_t i0 = 0; i0 < M; i0 += kMR) {
        (cols <= 16 ? micro_kernel<true, false, 1> : micro_kernel<true, false, 2>)(
            kc, a_packed + i0 * K + k0 * kMR, nullptr, b + j0, off + k0, c + i0 * ldc + j0, ldc,
            std::min(kMR, M - i0), cols, k0 > 0, bias ? bias + i0 : nullptr, relu && last);
      }
    }
  }
}

void gemm_arows(const float* a, const int64_t* a_off, const float* b_packed, int64_t M,
                int64_t N, int64_t K, float* c, int64_t ldc, bool accumulate) {
  kGemmArows.hit();
  // K blocks of equal size (at most kKC): no short last block that loads and stores the
  // whole of C for a few k. Within a block, column blocks of up to kArowsJB panels (their
  // B, kc x 128 floats, stays in L2) with the row tiles outside the panels: the 8 rows of A
  // a tile reads in place (kMR x kc floats) are used from L1 by every panel of the block,
  // instead of streaming all of A past each panel once (the weight gradient's A is the
  // input itself, megabytes, read N / kNR times over).
  constexpr int64_t kArowsJB = 4;
  const int64_t kblocks = (K + kKC - 1) / kKC;
  const int64_t kcb = (K + kblocks - 1) / kblocks;
  for (int64_t k0 = 0; k0 < K; k0 += kcb) {
    const int64_t kc = std::min(kcb, K - k0);
    for (int64_t jb = 0; jb < N; jb += kArowsJB * kNR) {
      const int64_t jend = std::min(N, jb + kArowsJB * kNR);
      for (int64_t i0 = 0; i0 < M; i0 += kMR) {
        const float* rows[kMR];
        for (int64_t r = 0; r < kMR; ++r) rows[r] = a + a_off[std::min(i0 + r, M - 1)] + k0;
        for (int64_t j0 = jb; j0 < jend; j0 += kNR) {
          const float* bp = b_packed + j0 * K + k0 * kNR;
          const int64_t cols = std::min(kNR, N - j0);
          (cols <= 16 ? micro_kernel<false, true, 1> : micro_kernel<false, true, 2>)(
              kc, nullptr, rows, bp, nullptr, c + i0 * ldc + j0, ldc, std::min(kMR, M - i0), cols,
              accumulate || k0 > 0, nullptr, false);
        }
      }
    }
  }
}

void gemm_small_n(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t M, int64_t N,
                  int64_t K, float* c, int64_t ldc, const float* bias, bool relu) {
  kGemmSmallN.hit();
  // K blocks of kKC: the B block (kKC x N) stays in L2 while every row block of A streams
  // past it once; each A block (kMR x kKC) is then reused from L1 by every column tile.
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool last = k0 + kc >= K;
    for (int64_t i0 = 0; i0 < M; i0 += kMR) {
      const float* rows[kMR];
      for (int64_t r = 0; r < kMR; ++r) rows[r] = a + std::min(i0 + r, M - 1) * lda + k0;
      const int64_t nr = std::min(kMR, M - i0);
      for (int64_t j0 = 0; j0 < N; j0 += kSmallNR) {
        const int64_t cols = std::min(kSmallNR, N - j0);
        const float* bk = b + k0 * ldb + j0;
        float* cc = c + i0 * ldc + j0;
        const float* bi = bias ? bias + i0 : nullptr;
        // The fewest 512-bit vectors, and a 128- or 256-bit tail where the last few
        // columns past a multiple of 16 number at most 4 or 8.
        const bool add = k0 > 0, rl = relu && last;
#define CNNEXT_SMALL_N(NV, TW) small_n_kernel<NV, TW>(kc, rows, bk, ldb, cc, ldc, nr, cols, add, bi, rl)
        if (cols > 40) CNNEXT_SMALL_N(3, 0);
        else if (cols > 36) CNNEXT_SMALL_N(2, 8);
        else if (cols > 32) CNNEXT_SMALL_N(2, 4);
        else if (cols > 24) CNNEXT_SMALL_N(2, 0);
        else if (cols > 20) CNNEXT_SMALL_N(1, 8);
        else if (cols > 16) CNNEXT_SMALL_N(1, 4);
        else if (cols > 8) CNNEXT_SMALL_N(1, 0);
        else if (cols > 4) CNNEXT_SMALL_N(0, 8);
        else CNNEXT_SMALL_N(0, 4);
#undef CNNEXT_SMALL_N
      }
    }
  }
}

#else  // not x86-64 (or CNNEXT_NO_AVX512): available() is false and the convolution uses at::mm; this
       // plain version keeps gemm() correct for any other caller.

bool available() { return false; }

bool transpose16(const float*, int64_t, float*, int64_t) { return false; }

bool transpose8x16(const float*, int64_t, float*) { return false; }

void gemm(const float* a_packed, const float* b_packed, int64_t M, int64_t N, int64_t K,
          float* c, int64_t ldc, bool accumulate, const float* bias, bool relu) {
  gemm_plain(a_packed, b_packed, M, N, K, c, ldc, accumulate, bias, relu);
}

void gemm_rows(const float* a_packed, const float* b, const int64_t* off, int64_t M, int64_t N,
               int64_t K, float* c, int64_t ldc, const float* bias, bool relu) {
  kGemmRows.hit();
  for (int64_t i = 0; i < M; ++i) {
    const float* ap = a_packed + (i / kMR) * K * kMR + i % kMR;
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += ap[k * kMR] * b[off[k] + j];
      float& out = c[i * ldc + j];
      out = acc + (bias ? bias[i] : 0.f);
      if (relu && out < 0.f) out = 0.f;
    }
  }
}

void gemm_arows(const float* a, const int64_t* a_off, const float* b_packed, int64_t M,
                int64_t N, int64_t K, float* c, int64_t ldc, bool accumulate) {
  kGemmArows.hit();
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      const float* bp = b_packed + (j / kNR) * K * kNR + j % kNR;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += a[a_off[i] + k] * bp[k * kNR];
      float& out = c[i * ldc + j];
      out = accumulate ? out + acc : acc;
    }
  }
}

void gemm_small_n(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t M, int64_t N,
                  int64_t K, float* c, int64_t ldc, const float* bias, bool relu) {
  kGemmSmallN.hit();
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += a[i * lda + k] * b[k * ldb + j];
      float& out = c[i * ldc + j];
      out = acc + (bias ? bias[i] : 0.f);
      if (relu && out < 0.f) out = 0.f;
    }
  }
}

#endif

}  // namespace sgemm
}  // namespace cpu
}  // namespace cnnext
