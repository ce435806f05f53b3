// See conv2d_winograd.h. Transform matrices (Toom-Cook, interpolation points 0, +-1, +-2,
// +-1/2 and infinity, generated exactly with rational arithmetic):
//   F(2x2, 3x3): points 0, 1, -1        F(4x4, 3x3): 0, 1, -1, 2, -2
//   F(6x6, 3x3): 0, 1, -1, 2, -2, 1/2, -1/2
// The transforms run 16 tiles (input, output) or 16 (channel, output-channel) pairs
// (weight) per AVX-512 vector: gathers from the padded input, scatters into the output;
// on CPUs with AVX2 but no AVX-512F, 8 per AVX2 vector (the "AVX2" sections below).
#include "cpu/conv2d_winograd.h"
#include "cpu/conv2d_bf16.h"
#include "cpu/derived_cache.h"
#include "cpu/items.h"
#include "cpu/output_alloc.h"
#include "cpu/scratch.h"
#include "cpu/vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/sgemm.h"
#include "paths.h"
#include "tensors.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
#include <immintrin.h>
#define CNNEXT_WINO_AVX512 1
#endif

namespace cnnext {
namespace cpu {
namespace winograd {
namespace {

// The float32 forward, input gradient and weight gradient, and the bfloat16 forward and
// input gradient, run on AVX-512F or AVX2 + FMA.
CNNEXT_PATH_NEEDS(kF2, "conv2d.winograd.f2x2", kAvx2);
CNNEXT_PATH_NEEDS(kF4, "conv2d.winograd.f4x4", kAvx2);
CNNEXT_PATH_NEEDS(kF6, "conv2d.winograd.f6x6", kAvx2);
CNNEXT_PATH_NEEDS(kNonFinite, "conv2d.winograd.nonfinite_fallback", kAvx2);
CNNEXT_PATH_NEEDS(kCacheHit, "conv2d.winograd.weight_cache_hit", kAvx2);
CNNEXT_PATH_NEEDS(kCacheMiss, "conv2d.winograd.weight_cache_miss", kAvx2);
CNNEXT_PATH_NEEDS(kInputGrad, "conv2d.input_grad.winograd", kAvx2);
// One count per forward or weight-gradient call that ran the AVX2 transforms (no AVX-512F).
CNNEXT_PATH_NEEDS(kAvx2Kernels, "conv2d.winograd.avx2", kAvx2);
// Calls of the AVX2 input / output transform that loaded / stored some group of 8 tiles as
// whole rows (load_row8, store_row8) instead of by gathers / lane stores.
CNNEXT_PATH_NEEDS(kAvx2RowLoads, "conv2d.winograd.avx2_row_loads", kAvx2);
CNNEXT_PATH_NEEDS(kAvx2RowStores, "conv2d.winograd.avx2_row_stores", kAvx2);
CNNEXT_PATH_NEEDS(kWeightGrad, "conv2d.weight_grad.winograd", kAvx2);
// Forward calls whose output channels were split over items, the input transformed once
// per chunk of tiles and shared by the blocks.
CNNEXT_PATH_NEEDS(kSharedInput, "conv2d.winograd.shared_input", kAvx2);
// 5x5 stride-1 kernels as four 3x3 ones (split5 below): the forward and the input gradient.
CNNEXT_PATH_NEEDS(kSplit5, "conv2d.winograd.split5x5", kAvx2);
CNNEXT_PATH_NEEDS(kSplit5InputGrad, "conv2d.input_grad.winograd_split5x5", kAvx2);
CNNEXT_PATH_NEEDS(kSplit5WeightGrad, "conv2d.weight_grad.winograd_split5x5", kAvx2);
CNNEXT_PATH_NEEDS(kBf16Fwd, "conv2d.fwd.winograd_bf16", kAvx2);
CNNEXT_PATH_NEEDS(kBf16InputGrad, "conv2d.input_grad.winograd_bf16", kAvx2);

std::atomic<bool> g_enabled{true};
std::atomic<int> g_forced{0};

using sgemm::kMR;
using sgemm::kNR;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <int M>
struct Mat;

template <>
struct Mat<2> {
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{-1, 0, 1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, -1, 0, 1}};
  static constexpr float G[4][3] = {{-1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, 1}};
};

template <>
struct Mat<4> {
  static constexpr int A = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[6][3] = {{1.f / 4, 0, 0},
                                    {-1.f / 6, -1.f / 6, -1.f / 6},
                                    {-1.f / 6, 1.f / 6, -1.f / 6},
                                    {1.f / 24, 1.f / 12, 1.f / 6},
                                    {1.f / 24, -1.f / 12, 1.f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

template <>
struct Mat<6> {
  static constexpr int A = 8;
  static constexpr float BT[8][8] = {
      {-1, 0, 21.f / 4, 0, -21.f / 4, 0, 1, 0},      {0, 1, 1, -17.f / 4, -17.f / 4, 1, 1, 0},
      {0, -1, 1, 17.f / 4, -17.f / 4, -1, 1, 0},     {0, 0.5f, 0.25f, -2.5f, -1.25f, 2, 1, 0},
      {0, -0.5f, 0.25f, 2.5f, -1.25f, -2, 1, 0},     {0, 2, 4, -2.5f, -5, 0.5f, 1, 0},
      {0, -2, 4, 2.5f, -5, -0.5f, 1, 0},             {0, -1, 0, 21.f / 4, 0, -21.f / 4, 0, 1}};
  static constexpr float G[8][3] = {{-1, 0, 0},
                                    {-2.f / 9, -2.f / 9, -2.f / 9},
                                    {-2.f / 9, 2.f / 9, -2.f / 9},
                                    {1.f / 90, 1.f / 45, 2.f / 45},
                                    {1.f / 90, -1.f / 45, 2.f / 45},
                                    {32.f / 45, 16.f / 45, 8.f / 45},
                                    {32.f / 45, -16.f / 45, 8.f / 45},
                                    {0, 0, 1}};
  static constexpr float AT[6][8] = {{1, 1, 1, 1, 1, 1, 1, 0},
                                     {0, 1, -1, 2, -2, 0.5f, -0.5f, 0},
                                     {0, 1, 1, 4, 4, 0.25f, 0.25f, 0},
                                     {0, 1, -1, 8, -8, 0.125f, -0.125f, 0},
                                     {0, 1, 1, 16, 16, 0.0625f, 0.0625f, 0},
                                     {0, 1, -1, 32, -32, 0.03125f, -0.03125f, 1}};
};

// Scratch of the calling thread, kept between calls: slot 0 the per-item V and M
// buffers, slot 1 the padded input, slot 2 the transformed weight of an uncached call,
// slot 3 the forward's shared V (output channels split over items); for the weight
// gradient, slot 3 its transformed input and gradient, slot 4 its sums.
float* scratch(int slot, int64_t elems) { return thread_scratch(ScratchPool::Winograd, slot, elems); }

#ifdef CNNEXT_WINO_AVX512

#define WINO_TARGET __attribute__((target("avx512f,fma")))

// sum_k c(k) * v[k * stride] with the constants folded at compile time (zero terms
// skipped, +-1 as an add / subtract); every loop here has constant bounds and unrolls.
// c(k) reads a row of a constant matrix (lin) or a column (lin_col).
template <int N, typename Coef>
WINO_TARGET inline __m512 lin_terms(const Coef& c, const __m512* v, int stride) {
  __m512 acc = _mm512_setzero_ps();
  bool first = true;
#pragma GCC unroll 8
  for (int k = 0; k < N; ++k) {
    const float ck = c(k);
    if (ck == 0.f) continue;
    const __m512 x = v[k * stride];
    if (first) {
      acc = ck == 1.f ? x : ck == -1.f ? _mm512_sub_ps(_mm512_setzero_ps(), x) : _mm512_mul_ps(_mm512_set1_ps(ck), x);
      first = false;
    } else if (ck == 1.f) {
      acc = _mm512_add_ps(acc, x);
    } else if (ck == -1.f) {
      acc = _mm512_sub_ps(acc, x);
    } else {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(ck), x, acc);
    }
  }
  return acc;
}

template <int N>
struct Row {
  const float (&c)[N];
  float operator()(int k) const { return c[k]; }
};

template <int N, int W>
struct Col {
  const float (&c)[N][W];
  int col;
  float operator()(int k) const { return c[k][col]; }
};

// sum_k c[k] * v[k * stride].
template <int N>
WINO_TARGET inline __m512 lin(const float (&c)[N], const __m512* v, int stride) {
  return lin_terms<N>(Row<N>{c}, v, stride);
}

// sum_k c[k][col] * v[k * stride] (over a column of c).
template <int N, int W>
WINO_TARGET inline __m512 lin_col(const float (&c)[N][W], int col, const __m512* v, int stride) {
  return lin_terms<N>(Col<N, W>{c, col}, v, stride);
}

// U[xi] (packed A: panels of kMR output channels over K = C) for output-channel panels
// [p0, p1): 16 lanes = 2 input channels x 8 output channels of one panel.
template <int M>
WINO_TARGET void weight_panels(const float* w, int64_t wso, int64_t wsc, int64_t wst, int64_t O,
                               int64_t C, int64_t p0, int64_t p1, float* u) {
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t u_size = round_up(O, kMR) * C;
  alignas(64) int32_t lane_off[16];
  for (int64_t pn = p0; pn < p1; ++pn) {
    for (int64_t c0 = 0; c0 < C; c0 += 2) {
      __mmask16 valid = 0;
      for (int l = 0; l < 16; ++l) {
        const int64_t o = pn * kMR + l % 8, c = c0 + l / 8;
        const bool ok = o < O && c < C;
        lane_off[l] = ok ? int32_t(o * wso + c * wsc) : 0;
        if (ok) valid |= __mmask16(1u << l);
      }
      const __m512i idx = _mm512_load_si512(lane_off);
      __m512 g[9];
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t)
        g[t] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, w + t * wst, 4);
      // tmp[i][k] = sum_j G[i][j] g[j][k] (rows of the kernel), then U[i][l] = sum_k tmp[i][k] G[l][k].
      __m512 tmp[A * 3];
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 3
        for (int k = 0; k < 3; ++k) tmp[i * 3 + k] = lin<3>(T::G[i], g + k, 3);
      const __mmask16 st = c0 + 1 < C ? __mmask16(0xFFFF) : __mmask16(0x00FF);
      float* dst = u + pn * kMR * C + c0 * kMR;
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int l = 0; l < A; ++l)
          _mm512_mask_storeu_ps(dst + (i * A + l) * u_size, st, lin<3>(T::G[l], tmp + i * 3, 1));
    }
  }
}

struct Layout {
  int64_t tH, tW, T;  // tiles per column, per row, in all
  int64_t Hq, Wq;     // the padded input's planes
};

// Zero-padded input planes (n, c) of Hq x Wq: element (i, j) = x[n, c, i - PH, j - PW].
// bfloat16 (its bits in a uint16_t) to float: exact.
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// X: float, or uint16_t for bfloat16 (converted here, exactly: no separate pass).
template <typename X>
void pad_planes(const X* x, const Strides4& xs, const Conv2dParams& p, const Layout& L,
                float* xp) {
  const int64_t plane = L.Hq * L.Wq;
  run_items(p.N * p.C, [&](int64_t nc) {
    const int64_t n = nc / p.C, c = nc % p.C;
    float* dst = xp + nc * plane;
    const X* src = x + n * xs.n + c * xs.c;
    for (int64_t i = 0; i < L.Hq; ++i) {
      float* d = dst + i * L.Wq;
      const int64_t h = i - p.PH;
      if (h < 0 || h >= p.H) {
        std::fill(d, d + L.Wq, 0.f);
        continue;
      }
      const int64_t w0 = std::min(p.PW, L.Wq), w1 = std::min(L.Wq, p.PW + p.W);
      std::fill(d, d + w0, 0.f);
      const X* s = src + h * xs.h;
      if (xs.w == 1) {
        for (int64_t j = 0; j < w1 - w0; ++j) d[w0 + j] = to_f32(s[j]);
      } else {
        for (int64_t j = w0; j < w1; ++j) d[j] = to_f32(s[(j - p.PW) * xs.w]);
      }
      std::fill(d + w1, d + L.Wq, 0.f);
    }
  });
}

// Per lane of the 16 tiles [t0, t0 + 16): the offset of its top-left input in the padded
// input (from sample 0, channel 0), the offset of its first output (n, oh0, ow0) in y
// (channel 0), its first output row and column; lanes past `tend` are invalid.
struct TileLanes {
  alignas(64) int32_t in[16];
  alignas(64) int32_t out[16];
  alignas(64) int32_t oh[16];
  alignas(64) int32_t ow[16];
  __mmask16 valid;
};

void tile_lanes(int64_t t0, int64_t tend, int m, const Conv2dParams& p, const Layout& L,
                const Strides4& ys, TileLanes* tl) {
  const int64_t plane = L.Hq * L.Wq, TS = L.tH * L.tW;
  tl->valid = 0;
  for (int l = 0; l < 16; ++l) {
    const int64_t t = t0 + l;
    if (t >= tend) {
      tl->in[l] = tl->out[l] = 0;
      tl->oh[l] = tl->ow[l] = int32_t(1) << 30;
      continue;
    }
    const int64_t n = t / TS, th = (t % TS) / L.tW, tw = t % L.tW;
    tl->in[l] = int32_t(n * p.C * plane + th * m * L.Wq + tw * m);
    tl->out[l] = int32_t(n * ys.n + th * m * ys.h + tw * m * ys.w);
    tl->oh[l] = int32_t(th * m);
    tl->ow[l] = int32_t(tw * m);
    tl->valid |= __mmask16(1u << l);
  }
}

// V[xi] for the tiles [t0, t0 + tc) (tc rounded up to kNR, the padding tiles zero) in
// packed-B panels: V + xi * v_size + (t / kNR) * C * kNR + c * kNR + t % kNR, for the input
// channels [c0, c1).
template <int M>
WINO_TARGET void input_transform(const float* xp, const Conv2dParams& p, const Layout& L,
                                 const Strides4& ys, int64_t t0, int64_t tc, float* v,
                                 int64_t v_size, int64_t c0, int64_t c1) {
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t plane = L.Hq * L.Wq, tcp = round_up(tc, kNR);
  TileLanes tl;
  for (int64_t tg = 0; tg < tcp; tg += 16) {
    tile_lanes(t0 + tg, t0 + tc, M, p, L, ys, &tl);
    const __m512i idx = _mm512_load_si512(tl.in);
    float* vbase = v + (tg / kNR) * p.C * kNR + tg % kNR;
    for (int64_t c = c0; c < c1; ++c) {
      const float* src = xp + c * plane;
      __m512 tmp[A * A];  // tmp[r][j] = sum_s d[r][s] B[s][j] = sum_s BT[j][s] d[r][s]
#pragma GCC unroll 8
      for (int r = 0; r < A; ++r) {
        __m512 d[A];
#pragma GCC unroll 8
        for (int s = 0; s < A; ++s)
          d[s] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), tl.valid, idx, src + r * L.Wq + s, 4);
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) tmp[r * A + j] = lin<A>(T::BT[j], d, 1);
      }
      float* dst = vbase + c * kNR;
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) _mm512_storeu_ps(dst + (i * A + j) * v_size, lin<A>(T::BT[i], tmp + j, A));
    }
  }
}

// y for output channels [o0, o0 + ob) and tiles [t0, t0 + tc) from M (M + xi * m_size +
// (o - o0) * tc + (t - t0)), plus bias, then ReLU. Returns false when a value is not finite.
// Y: float, or uint16_t for bfloat16 (each output rounded once, to nearest even, from
// its float value; stored lane by lane: there is no 16-bit scatter).
template <int M, typename Y>
WINO_TARGET bool output_transform(const float* mbuf, int64_t m_size, const Conv2dParams& p,
                                  const Layout& L, const Strides4& ys, int64_t t0, int64_t tc,
                                  int64_t o0, int64_t ob, const float* bias, bool relu, Y* y) {
  using T = Mat<M>;
  constexpr int A = T::A;
  TileLanes tl;
  __mmask16 bad = 0;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t tg = 0; tg < tc; tg += 16) {
    tile_lanes(t0 + tg, t0 + tc, M, p, L, ys, &tl);
    const __m512i oidx = _mm512_load_si512(tl.out);
    const __m512i ohv = _mm512_load_si512(tl.oh), owv = _mm512_load_si512(tl.ow);
    __mmask16 rowok[M], colok[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      rowok[i] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(ohv, _mm512_set1_epi32(i)), _mm512_set1_epi32(int32_t(p.OH)));
      colok[i] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(owv, _mm512_set1_epi32(i)), _mm512_set1_epi32(int32_t(p.OW)));
    }
    for (int64_t o = 0; o < ob; ++o) {
      const float* src = mbuf + o * tc + tg;
      __m512 mv[A * A];
#pragma GCC unroll 64
      for (int x = 0; x < A * A; ++x) mv[x] = _mm512_maskz_loadu_ps(tl.valid, src + x * m_size);
      __m512 tmp[M * A];  // tmp[i][b] = sum_a AT[i][a] M[a][b]
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int b = 0; b < A; ++b) tmp[i * A + b] = lin<A>(T::AT[i], mv + b, A);
      const __m512 bv = _mm512_set1_ps(bias ? bias[o0 + o] : 0.f);
      Y* yo = y + (o0 + o) * ys.c;
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          __m512 val = lin<A>(T::AT[j], tmp + i * A, 1);
          if (bias) val = _mm512_add_ps(val, bv);
          const __m512 dz = _mm512_sub_ps(val, val);  // NaN exactly where val is not finite
          bad |= _mm512_cmp_ps_mask(dz, dz, _CMP_UNORD_Q);
          if (relu) val = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(val, zero, _CMP_LT_OQ), val, zero);
          const __mmask16 st = tl.valid & rowok[i] & colok[j];
          if constexpr (std::is_same<Y, float>::value) {
            _mm512_mask_i32scatter_ps(yo + i * ys.h + j * ys.w, st, oidx, val, 4);
          } else {
            // Round to nearest even (finite values: a non-finite one fails the call).
            const __m512i bits = _mm512_castps_si512(val);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
            alignas(64) uint32_t hv[16];
            _mm512_store_si512(hv, r);
            Y* base = yo + i * ys.h + j * ys.w;
            for (uint32_t mm = st; mm; mm &= mm - 1) {
              const int l = __builtin_ctz(mm);
              base[tl.out[l]] = static_cast<Y>(hv[l]);
            }
          }
        }
      }
    }
  }
  return bad == 0;  // lanes past the tiles hold the bias only
}

// ---- AVX2 (8 lanes): the forward's transforms on CPUs without AVX-512F ----
// The same steps as above, 8 tiles a vector: 8 whole tiles side by side in a row of
// tiles loaded and stored as rows (load_row8 / store_row8), other groups gathered (AVX2's
// vgatherdps, masked: lanes past the tiles read nothing and hold 0) and stored lane by
// lane (AVX2 has no scatter). The GEMMs between them run sgemm::gemm's AVX2 kernel on the
// same packed panels, and the weight is transformed 8 output channels a vector into the
// same packed-A layout, so the driver (forward_m) and the tile choice are shared. The
// weight gradient's AVX2 transforms follow further below.

#define WINO_AVX2 __attribute__((target("avx2,fma")))

// lin_terms of 8 lanes: sum_k c(k) * v[k * stride], constants folded, zero terms skipped.
template <int N, typename Coef>
WINO_AVX2 __attribute__((always_inline)) inline __m256 lin_terms8(const Coef& c, const __m256* v, int stride) {
  __m256 acc = _mm256_setzero_ps();
  bool first = true;
#pragma GCC unroll 8
  for (int k = 0; k < N; ++k) {
    const float ck = c(k);
    if (ck == 0.f) continue;
    const __m256 x = v[k * stride];
    if (first) {
      acc = ck == 1.f ? x : ck == -1.f ? _mm256_sub_ps(_mm256_setzero_ps(), x) : _mm256_mul_ps(_mm256_set1_ps(ck), x);
      first = false;
    } else if (ck == 1.f) {
      acc = _mm256_add_ps(acc, x);
    } else if (ck == -1.f) {
      acc = _mm256_sub_ps(acc, x);
    } else {
      acc = _mm256_fmadd_ps(_mm256_set1_ps(ck), x, acc);
    }
  }
  return acc;
}

template <int N>
WINO_AVX2 __attribute__((always_inline)) inline __m256 lin8(const float (&c)[N], const __m256* v, int stride) {
  return lin_terms8<N>(Row<N>{c}, v, stride);
}

// All-ones in the lanes whose bit is set in the low 8 bits of `bits`.
WINO_AVX2 __attribute__((always_inline)) inline __m256i lanes8(unsigned bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int32_t(bits)), bit), bit);
}

// d[s] (s < M + 2) of 8 tiles side by side in one row of the padded input: d[s][l] =
// x[l * M + s], for M = 2 or 4: whole-vector loads de-interleaved by lane shuffles (the
// inverse of store_row8), the last two columns from loads 2 or 4 floats further on. Reads
// up to x[8 * M + M + 3]: past the tiles by at most 4 floats (the padded planes have that
// slack at their end).
template <int M>
WINO_AVX2 __attribute__((always_inline)) inline void load_row8(const float* x, __m256* d) {
  static_assert(M == 2 || M == 4, "tiles of 2 or 4 columns");
  if constexpr (M == 2) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // h = 1: columns 2, 3 (the next tile's 0, 1)
      const __m256 q0 = _mm256_loadu_ps(x + 2 * h), q1 = _mm256_loadu_ps(x + 2 * h + 8);
      // shuffle: per 128-bit lane (q0's evens, q1's evens); permute4x64 puts the lanes' halves in order.
      const __m256 ev = _mm256_shuffle_ps(q0, q1, 0x88), od = _mm256_shuffle_ps(q0, q1, 0xDD);
      d[2 * h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8));
      d[2 * h + 1] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8));
    }
  } else {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // h = 1: columns 4, 5 (the next tile's 0, 1)
      const float* b = x + 4 * h;
      const __m256 q0 = _mm256_loadu_ps(b), q1 = _mm256_loadu_ps(b + 8);
      const __m256 q2 = _mm256_loadu_ps(b + 16), q3 = _mm256_loadu_ps(b + 24);
      // a_k: tiles k and k + 4 (a 128-bit lane each), then a 4 x 4 transpose per lane.
      const __m256 a0 = _mm256_permute2f128_ps(q0, q2, 0x20), a1 = _mm256_permute2f128_ps(q0, q2, 0x31);
      const __m256 a2 = _mm256_permute2f128_ps(q1, q3, 0x20), a3 = _mm256_permute2f128_ps(q1, q3, 0x31);
      const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
      const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
      if (h == 0) {
        d[0] = _mm256_shuffle_ps(t0, t2, 0x44);
        d[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
        d[2] = _mm256_shuffle_ps(t1, t3, 0x44);
        d[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
      } else {
        d[4] = _mm256_shuffle_ps(t0, t2, 0x44);
        d[5] = _mm256_shuffle_ps(t0, t2, 0xEE);
      }
    }
  }
}

// input_transform with 8 tiles a vector (the padding tiles of the last panel stored 0):
// 8 whole tiles side by side in a row of tiles are loaded (load_row8), others gathered.
template <int M>
WINO_AVX2 void input_transform_avx2(const float* xp, const Conv2dParams& p, const Layout& L,
                                    const Strides4& ys, int64_t t0, int64_t tc, float* v,
                                    int64_t v_size, int64_t c0, int64_t c1) {
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t plane = L.Hq * L.Wq, tcp = round_up(tc, kNR);
  TileLanes tl;
  bool any_rows = false;
  for (int64_t tg = 0; tg < tcp; tg += 8) {
    float* vbase = v + (tg / kNR) * p.C * kNR + tg % kNR;
    if (tg >= tc) {
      for (int64_t c = c0; c < c1; ++c)
        for (int x = 0; x < A * A; ++x) _mm256_storeu_ps(vbase + c * kNR + x * v_size, _mm256_setzero_ps());
      continue;
    }
    tile_lanes(t0 + tg, t0 + tc, M, p, L, ys, &tl);
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(tl.in));
    const __m256 vm = _mm256_castsi256_ps(lanes8(tl.valid & 0xFFu));
    bool row_run = (M == 2 || M == 4) && (tl.valid & 0xFFu) == 0xFFu;
    for (int l = 1; row_run && l < 8; ++l) row_run = tl.in[l] == tl.in[0] + l * M && tl.oh[l] == tl.oh[0];
    any_rows |= row_run;
    for (int64_t c = c0; c < c1; ++c) {
      const float* src = xp + c * plane;
      __m256 tmp[A * A];  // tmp[r][j] = sum_s BT[j][s] d[r][s]
#pragma GCC unroll 8
      for (int r = 0; r < A; ++r) {
        __m256 d[A];
        bool loaded = false;
        if constexpr (M == 2 || M == 4) {
          if (row_run) {
            load_row8<M>(src + tl.in[0] + r * L.Wq, d);
            loaded = true;
          }
        }
        if (!loaded) {
#pragma GCC unroll 8
          for (int s = 0; s < A; ++s)
            d[s] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), src + r * L.Wq + s, idx, vm, 4);
        }
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) tmp[r * A + j] = lin8<A>(T::BT[j], d, 1);
      }
      float* dst = vbase + c * kNR;
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) _mm256_storeu_ps(dst + (i * A + j) * v_size, lin8<A>(T::BT[i], tmp + j, A));
    }
  }
  if (any_rows) kAvx2RowLoads.hit();
}

// Stores row i of 8 tiles side by side in a row of y (unit column stride): y[l * M + j] =
// v[j][l], for M = 2 or 4 (an interleave by unpacks and lane shuffles, then M whole-vector
// stores).
template <int M>
WINO_AVX2 __attribute__((always_inline)) inline void store_row8(const __m256* v, float* y) {
  static_assert(M == 2 || M == 4, "tiles of 2 or 4 columns");
  if constexpr (M == 2) {
    const __m256 lo = _mm256_unpacklo_ps(v[0], v[1]), hi = _mm256_unpackhi_ps(v[0], v[1]);
    _mm256_storeu_ps(y, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(y + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  } else {
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    // s_k: tiles k and k + 4, their 4 columns each.
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    _mm256_storeu_ps(y, _mm256_permute2f128_ps(s0, s1, 0x20));
    _mm256_storeu_ps(y + 8, _mm256_permute2f128_ps(s2, s3, 0x20));
    _mm256_storeu_ps(y + 16, _mm256_permute2f128_ps(s0, s1, 0x31));
    _mm256_storeu_ps(y + 24, _mm256_permute2f128_ps(s2, s3, 0x31));
  }
}

// Stores row i of 8 tiles side by side as bfloat16 (y[l * M + j] = the bits in the low
// half of v[j]'s lane l, vec::bf16_bits_avx2's): store_row8's interleave on the 32-bit lanes,
// then the 8 * M values narrowed to 16 bits (they are below 2^16: packus does not
// saturate) and stored as whole vectors.
template <int M>
WINO_AVX2 __attribute__((always_inline)) inline void store_row8_bf16(const __m256* v, uint16_t* y) {
  alignas(32) float tmp[8 * M];
  store_row8<M>(v, tmp);
#pragma GCC unroll 2
  for (int k = 0; k < 8 * M; k += 16) {
    const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp + k));
    const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp + k + 8));
    // packus interleaves the 128-bit halves (a.lo, b.lo, a.hi, b.hi): put them back in order.
    const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + k), h);
  }
}

// A stored lane: the float, or (bfloat16) the rounded bits in its low half.
template <typename Y>
inline Y lane_value(float v) {
  if constexpr (std::is_same<Y, float>::value) {
    return v;
  } else {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    return static_cast<Y>(bits);
  }
}

// output_transform with 8 tiles a vector; returns false when a value is not finite. Y:
// float, or uint16_t for bfloat16 (each output rounded once, to nearest even, from its
// float value, as output_transform). Where the 8 tiles are whole, side by side in one row
// of tiles, and y's rows are contiguous (NCHW), each output row of them is stored as 8 * m
// contiguous values; else lane by lane.
template <int M, typename Y>
WINO_AVX2 bool output_transform_avx2(const float* mbuf, int64_t m_size, const Conv2dParams& p,
                                     const Layout& L, const Strides4& ys, int64_t t0, int64_t tc,
                                     int64_t o0, int64_t ob, const float* bias, bool relu, Y* y) {
  constexpr bool kBf16 = std::is_same<Y, uint16_t>::value;
  static_assert(kBf16 || std::is_same<Y, float>::value, "float or bfloat16 bits");
  using T = Mat<M>;
  constexpr int A = T::A;
  TileLanes tl;
  unsigned bad = 0;
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float lane[8];
  bool any_rows = false;
  for (int64_t tg = 0; tg < tc; tg += 8) {
    tile_lanes(t0 + tg, t0 + tc, M, p, L, ys, &tl);
    const unsigned valid = tl.valid & 0xFFu;
    const __m256i vm = lanes8(valid);
    unsigned rowok[M], colok[M];
    for (int i = 0; i < M; ++i) {
      rowok[i] = colok[i] = 0;
      for (int l = 0; l < 8; ++l) {
        if (tl.oh[l] + i < p.OH) rowok[i] |= 1u << l;
        if (tl.ow[l] + i < p.OW) colok[i] |= 1u << l;
      }
    }
    bool row_run = (M == 2 || M == 4) && ys.w == 1 && valid == 0xFFu && colok[M - 1] == 0xFFu;
    for (int l = 1; row_run && l < 8; ++l) row_run = tl.out[l] == tl.out[0] + l * M && tl.oh[l] == tl.oh[0];
    any_rows |= row_run;
    for (int64_t o = 0; o < ob; ++o) {
      const float* src = mbuf + o * tc + tg;
      __m256 mv[A * A];
#pragma GCC unroll 64
      for (int x = 0; x < A * A; ++x) mv[x] = _mm256_maskload_ps(src + x * m_size, vm);
      __m256 tmp[M * A];  // tmp[i][b] = sum_a AT[i][a] M[a][b]
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int b = 0; b < A; ++b) tmp[i * A + b] = lin8<A>(T::AT[i], mv + b, A);
      const __m256 bv = _mm256_set1_ps(bias ? bias[o0 + o] : 0.f);
      Y* yo = y + (o0 + o) * ys.c;
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        __m256 row[M];
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          __m256 val = lin8<A>(T::AT[j], tmp + i * A, 1);
          if (bias) val = _mm256_add_ps(val, bv);
          const __m256 dz = _mm256_sub_ps(val, val);  // NaN exactly where val is not finite
          bad |= unsigned(_mm256_movemask_ps(_mm256_cmp_ps(dz, dz, _CMP_UNORD_Q)));
          if (relu) val = _mm256_blendv_ps(val, zero, _mm256_cmp_ps(val, zero, _CMP_LT_OQ));
          // bfloat16: each lane's rounded bits, carried in the float lanes to the stores.
          // The output's values are finite here (a non-finite one fails the call before it
          // is stored): vec::bf16_bits_avx2's rounding is torch's.
          if constexpr (kBf16) val = _mm256_castsi256_ps(vec::bf16_bits_avx2(val));
          row[j] = val;
        }
        if constexpr (M == 2 || M == 4) {
          if (row_run && (rowok[i] & 1u)) {
            if constexpr (kBf16) store_row8_bf16<M>(row, yo + tl.out[0] + i * ys.h);
            else store_row8<M>(row, yo + tl.out[0] + i * ys.h);
            continue;
          }
        }
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          _mm256_store_ps(lane, row[j]);
          Y* base = yo + i * ys.h + j * ys.w;
          for (unsigned st = valid & rowok[i] & colok[j]; st; st &= st - 1) {
            const int l = __builtin_ctz(st);
            base[tl.out[l]] = lane_value<Y>(lane[l]);
          }
        }
      }
    }
  }
  if (any_rows) kAvx2RowStores.hit();
  return (bad & 0xFFu) == 0;  // lanes past the tiles hold the bias only
}

// weight_panels with 8 lanes = the kMR output channels of a panel at one input channel
// (one 8-float store per transformed element; rows past O gathered as 0).
template <int M>
WINO_AVX2 void weight_panels_avx2(const float* w, int64_t wso, int64_t wsc, int64_t wst, int64_t O,
                                  int64_t C, int64_t p0, int64_t p1, float* u) {
  static_assert(kMR == 8, "a panel's rows are one 8-lane vector");
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t u_size = round_up(O, kMR) * C;
  alignas(32) int32_t lane_off[8];
  for (int64_t pn = p0; pn < p1; ++pn) {
    unsigned valid = 0;
    for (int l = 0; l < 8; ++l) {
      const int64_t o = pn * kMR + l;
      lane_off[l] = o < O ? int32_t(o * wso) : 0;
      if (o < O) valid |= 1u << l;
    }
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_off));
    const __m256 vm = _mm256_castsi256_ps(lanes8(valid));
    for (int64_t c = 0; c < C; ++c) {
      __m256 g[9];
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t)
        g[t] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), w + c * wsc + t * wst, idx, vm, 4);
      __m256 tmp[A * 3];  // tmp[i][k] = sum_j G[i][j] g[j][k]; then U[i][l] = sum_k tmp[i][k] G[l][k]
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 3
        for (int k = 0; k < 3; ++k) tmp[i * 3 + k] = lin8<3>(T::G[i], g + k, 3);
      float* dst = u + pn * kMR * C + c * kMR;
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int l = 0; l < A; ++l) _mm256_storeu_ps(dst + (i * A + l) * u_size, lin8<3>(T::G[l], tmp + i * 3, 1));
    }
  }
}

// kWide: the AVX-512 transforms (16 tiles a vector), else the AVX2 ones (8 tiles a vector).
// X, Y: float, or uint16_t for bfloat16 (the input converted while padded, each output
// rounded as stored).
template <int M, bool kWide, typename X = float, typename Y = float>
bool forward_m(const X* x, const Strides4& xs, const float* w, int64_t wso, int64_t wsc,
               int64_t wst, const float* u, const float* bias, Y* y, const Strides4& ys,
               const Conv2dParams& p, bool relu) {
  constexpr int A = Mat<M>::A;
  Layout L;
  L.tH = ceil_div(p.OH, M);
  L.tW = ceil_div(p.OW, M);
  L.T = p.N * L.tH * L.tW;
  L.Hq = L.tH * M + 2;
  L.Wq = L.tW * M + 2;
  const int64_t plane = L.Hq * L.Wq;
  // 32-bit gather / scatter offsets.
  const int64_t lim = int64_t(1) << 31;
  if (p.N * p.C * plane + 2 * L.Wq + 2 >= lim) return false;
  const int64_t y_extent = (p.N - 1) * ys.n + (p.O - 1) * ys.c + (p.OH - 1) * ys.h + (p.OW - 1) * ys.w;
  if (y_extent >= lim || p.O * p.C * 9 >= lim) return false;
  const int64_t T_threads = at::get_num_threads();

  // The transformed weight.
  const int64_t u_size = round_up(p.O, kMR) * p.C;
  if (!u) {
    float* ub = scratch(2, int64_t(A) * A * u_size);
    transform_weight(w, wso, wsc, wst, p.O, p.C, M, ub);
    u = ub;
  }
  // (+ 8: slack for the AVX2 row loads, load_row8, which read up to 4 floats past a tile.)
  float* xp = scratch(1, p.N * p.C * plane + 8);
  pad_planes(x, xs, p, L, xp);

  // Chunks of tiles (a multiple of kNR) sized so V and M of a chunk stay near 1 MiB; then
  // blocks of output channels when the chunks are too few for the threads. The split
  // changes which item computes an element, never how: results do not depend on it.
  const int64_t budget = int64_t(1) << 18;  // floats
  int64_t tc = round_up(std::max<int64_t>(kNR, budget / (int64_t(A) * A * (p.C + p.O))), kNR);
  tc = std::min<int64_t>(tc, std::max<int64_t>(kNR, std::min<int64_t>(256, round_up(L.T, kNR))));
  int64_t chunks = ceil_div(L.T, tc);
  int64_t ob = p.O;
  if (chunks < 2 * T_threads) {
    const int64_t want = std::min(ceil_div(2 * T_threads, chunks), ceil_div(p.O, 32));
    ob = round_up(ceil_div(p.O, std::max<int64_t>(want, 1)), kMR);
  }
  const int64_t oblocks = ceil_div(p.O, ob);
  const int64_t tcp = round_up(tc, kNR);
  // The (m + 2)^2 planes of V and of M, one per transformed element, are read and written
  // together by the transforms: 36 (F(4x4)) streams at a stride of v_size / m_size floats.
  // A stride that is a multiple of 4 KiB (64 x 64 floats: ResNet's 64 -> 64) puts every
  // stream in the same L1 set (8 ways): on the AVX2 path one cache line of padding between
  // planes took ResNet's 64 -> 64 at 56x56 from 17.0 to 11.2 ms (Zen 3, 1 thread). The
  // AVX-512 path keeps its layout (not measured there).
  const int64_t plane_pad = kWide ? 0 : 16;
  const int64_t v_size = tcp * p.C + plane_pad, m_size = ob * tc + plane_pad;
  auto transform_input = [&](int64_t t0, int64_t n_t, float* v, int64_t c0, int64_t c1) {
    if constexpr (kWide) {
      input_transform<M>(xp, p, L, ys, t0, n_t, v, v_size, c0, c1);
    } else {
      input_transform_avx2<M>(xp, p, L, ys, t0, n_t, v, v_size, c0, c1);
    }
  };
  // Where the output channels are split, each chunk's V is made once, in a buffer the
  // blocks share, its input channels over the threads; else each item makes its own.
  float* v_shared = nullptr;
  if (oblocks > 1) {
    const int64_t v_chunk = int64_t(A) * A * v_size;
    v_shared = scratch(3, chunks * v_chunk);
    const int64_t csplit = std::min(p.C, ceil_div(2 * T_threads, chunks));
    const int64_t cper = ceil_div(p.C, csplit);
    run_items(chunks * csplit, [&](int64_t item) {
      const int64_t chunk = item / csplit, c0 = (item % csplit) * cper, c1 = std::min(p.C, c0 + cper);
      const int64_t t0 = chunk * tc;
      if (c0 < c1) transform_input(t0, std::min(tc, L.T - t0), v_shared + chunk * v_chunk, c0, c1);
    });
    kSharedInput.hit();
  }
  std::atomic<bool> ok{true};
  run_items(chunks * oblocks, [&](int64_t item) {
    const int64_t chunk = item / oblocks, o0 = (item % oblocks) * ob;
    const int64_t t0 = chunk * tc, n_t = std::min(tc, L.T - t0), n_o = std::min(ob, p.O - o0);
    float* v;
    float* mb;
    if (v_shared) {
      v = v_shared + chunk * int64_t(A) * A * v_size;
      mb = scratch(0, int64_t(A) * A * m_size);
    } else {
      v = scratch(0, int64_t(A) * A * (v_size + m_size));
      mb = v + int64_t(A) * A * v_size;
      transform_input(t0, n_t, v, 0, p.C);
    }
    for (int xi = 0; xi < A * A; ++xi)
      sgemm::gemm(u + xi * u_size + o0 * p.C, v + xi * v_size, n_o, n_t, p.C, mb + xi * m_size, n_t,
                  false, nullptr, false);
    bool done;
    if constexpr (kWide) done = output_transform<M, Y>(mb, m_size, p, L, ys, t0, n_t, o0, n_o, bias, relu, y);
    else done = output_transform_avx2<M, Y>(mb, m_size, p, L, ys, t0, n_t, o0, n_o, bias, relu, y);
    if (!done) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}


// ---- weight gradient ----
// gw = sum over tiles of G^T (Z (.) V) G, the adjoint of the forward's y = A^T (U (.) V) A
// in U = G g G^T: Z = A gy A^T of each m x m tile of gy ((m + 2)^2 values, zero past the
// output), V = B^T d B of its input tile as in the forward. Per element xi of the
// transformed tile, Ug[xi] (O x C) = Z[xi] (O x tiles) * V[xi]^T (tiles x C): (m + 2)^2
// GEMMs over all tiles (K = tiles, in chunks of a size fixed by the shape), then
// gw = G^T Ug G per (o, c).

// V[xi] of the chunk's tiles [ta, tb) (chunk-relative; the chunk starts at tile t0 and
// holds tc) in packed-B panels of kNR input channels over K = tiles:
// v + xi * v_size + (c / kNR) * tc * kNR + t * kNR + c % kNR; channels past C are zero.
template <int M>
WINO_TARGET void wg_input_transform(const float* xp, const Conv2dParams& p, const Layout& L, int64_t t0,
                                    int64_t tc, int64_t ta, int64_t tb, float* v, int64_t v_size) {
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t plane = L.Hq * L.Wq, TS = L.tH * L.tW;
  alignas(64) int32_t lane_off[16];
  for (int64_t cg = 0; cg < round_up(p.C, kNR); cg += 16) {
    __mmask16 valid = 0;
    for (int l = 0; l < 16; ++l) {
      const bool ok = cg + l < p.C;
      lane_off[l] = ok ? int32_t((cg + l) * plane) : 0;
      if (ok) valid |= __mmask16(1u << l);
    }
    const __m512i idx = _mm512_load_si512(lane_off);
    float* vb = v + (cg / kNR) * tc * kNR + cg % kNR;
    for (int64_t t = ta; t < tb; ++t) {
      const int64_t tt = t0 + t, n = tt / TS, th = (tt % TS) / L.tW, tw = tt % L.tW;
      const float* src = xp + (n * p.C * plane + th * M * L.Wq + tw * M);
      __m512 tmp[A * A];
#pragma GCC unroll 8
      for (int r = 0; r < A; ++r) {
        __m512 d[A];
#pragma GCC unroll 8
        for (int s = 0; s < A; ++s)
          d[s] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, src + r * L.Wq + s, 4);
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) tmp[r * A + j] = lin<A>(T::BT[j], d, 1);
      }
      float* dst = vb + t * kNR;
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) _mm512_storeu_ps(dst + (i * A + j) * v_size, lin<A>(T::BT[i], tmp + j, A));
    }
  }
}

// Z[xi] of the chunk's tiles [ta, tb) (ta even; tb even unless it ends the chunk) in
// packed-A panels of kMR (8) output channels over K = tiles:
// z + xi * z_size + (o / kMR) * tc * kMR + t * kMR + o % kMR; 16 lanes = 8 channels x 2
// tiles. Rows past O and outputs past OH x OW read as zero.
template <int M>
WINO_TARGET void wg_grad_transform(const float* gy, const Strides4& gs, const Conv2dParams& p,
                                   const Layout& L, int64_t t0, int64_t tc, int64_t ta, int64_t tb,
                                   float* z, int64_t z_size) {
  static_assert(kMR == 8, "two tiles of kMR channels per vector");
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t TS = L.tH * L.tW;
  alignas(64) int32_t off[16], ohs[16], ows[16];
  for (int64_t og = 0; og < round_up(p.O, kMR); og += kMR) {
    for (int64_t t = ta; t < tb; t += 2) {
      __mmask16 valid = 0;
      for (int l = 0; l < 16; ++l) {
        const int64_t o = og + l % 8, tl = t + l / 8, tt = t0 + tl;
        const bool ok = o < p.O && tl < tb;
        const int64_t n = tt / TS, th = (tt % TS) / L.tW, tw = tt % L.tW;
        off[l] = ok ? int32_t(n * gs.n + o * gs.c + th * M * gs.h + tw * M * gs.w) : 0;
        ohs[l] = ok ? int32_t(th * M) : int32_t(1) << 30;
        ows[l] = ok ? int32_t(tw * M) : int32_t(1) << 30;
        if (ok) valid |= __mmask16(1u << l);
      }
      const __m512i idx = _mm512_load_si512(off);
      const __m512i ohv = _mm512_load_si512(ohs), owv = _mm512_load_si512(ows);
      __mmask16 rowok[M], colok[M];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        rowok[i] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(ohv, _mm512_set1_epi32(i)), _mm512_set1_epi32(int32_t(p.OH)));
        colok[i] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(owv, _mm512_set1_epi32(i)), _mm512_set1_epi32(int32_t(p.OW)));
      }
      __m512 g[M * M];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j)
          g[i * M + j] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid & rowok[i] & colok[j], idx,
                                                  gy + i * gs.h + j * gs.w, 4);
      // tmp[i][b] = sum_j g[i][j] AT[j][b], then Z[a][b] = sum_i AT[i][a] tmp[i][b].
      __m512 tmp[M * A];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int b = 0; b < A; ++b) tmp[i * A + b] = lin_col<M, A>(T::AT, b, g + i * M, 1);
      const __mmask16 st = t + 1 < tb ? __mmask16(0xFFFF) : __mmask16(0x00FF);
      float* dst = z + (og / kMR) * tc * kMR + t * kMR;
#pragma GCC unroll 8
      for (int a = 0; a < A; ++a)
#pragma GCC unroll 8
        for (int b = 0; b < A; ++b)
          _mm512_mask_storeu_ps(dst + (a * A + b) * z_size, st, lin_col<M, A>(T::AT, a, tmp + b, A));
    }
  }
}

// gw[e * 9 + k * 3 + l] = sum_ab G[a][k] Ug[ab][e] G[b][l] for e in [e0, e1) (e = o * C + c).
// Returns false when a value is not finite.
template <int M>
WINO_TARGET bool wg_weight_transform(const float* ug, int64_t ug_size, int64_t e0, int64_t e1, float* gw) {
  using T = Mat<M>;
  constexpr int A = T::A;
  __mmask16 bad = 0;
  alignas(64) int32_t lane9[16];
  for (int l = 0; l < 16; ++l) lane9[l] = 9 * l;
  const __m512i idx = _mm512_load_si512(lane9);
  for (int64_t e = e0; e < e1; e += 16) {
    const __mmask16 valid = e + 16 <= e1 ? __mmask16(0xFFFF) : __mmask16((1u << (e1 - e)) - 1);
    __m512 u[A * A];
#pragma GCC unroll 64
    for (int x = 0; x < A * A; ++x) u[x] = _mm512_maskz_loadu_ps(valid, ug + x * ug_size + e);
    __m512 tmp[3 * A];  // tmp[k][b] = sum_a G[a][k] Ug[a][b]
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k)
#pragma GCC unroll 8
      for (int b = 0; b < A; ++b) tmp[k * A + b] = lin_col<A, 3>(T::G, k, u + b, A);
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k)
#pragma GCC unroll 3
      for (int l = 0; l < 3; ++l) {
        const __m512 val = lin_col<A, 3>(T::G, l, tmp + k * A, 1);
        const __m512 dz = _mm512_sub_ps(val, val);
        bad |= _mm512_mask_cmp_ps_mask(valid, dz, dz, _CMP_UNORD_Q);
        _mm512_mask_i32scatter_ps(gw + e * 9 + k * 3 + l, valid, idx, val, 4);
      }
  }
  return bad == 0;
}

// ---- AVX2 weight-gradient transforms (8 lanes) ----

// wg_input_transform with 8 lanes = 8 input channels of one tile (gathers across planes).
template <int M>
WINO_AVX2 void wg_input_transform_avx2(const float* xp, const Conv2dParams& p, const Layout& L, int64_t t0,
                                       int64_t tc, int64_t ta, int64_t tb, float* v, int64_t v_size) {
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t plane = L.Hq * L.Wq, TS = L.tH * L.tW;
  alignas(32) int32_t lane_off[8];
  for (int64_t cg = 0; cg < round_up(p.C, kNR); cg += 8) {
    unsigned valid = 0;
    for (int l = 0; l < 8; ++l) {
      const bool ok = cg + l < p.C;
      lane_off[l] = ok ? int32_t((cg + l) * plane) : 0;
      if (ok) valid |= 1u << l;
    }
    float* vb = v + (cg / kNR) * tc * kNR + cg % kNR;
    if (valid == 0) {  // a panel's padding channels
      for (int64_t t = ta; t < tb; ++t)
        for (int x = 0; x < A * A; ++x) _mm256_storeu_ps(vb + t * kNR + x * v_size, _mm256_setzero_ps());
      continue;
    }
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_off));
    const __m256 vm = _mm256_castsi256_ps(lanes8(valid));
    for (int64_t t = ta; t < tb; ++t) {
      const int64_t tt = t0 + t, n = tt / TS, th = (tt % TS) / L.tW, tw = tt % L.tW;
      const float* src = xp + (n * p.C * plane + th * M * L.Wq + tw * M);
      __m256 tmp[A * A];
#pragma GCC unroll 8
      for (int r = 0; r < A; ++r) {
        __m256 d[A];
#pragma GCC unroll 8
        for (int s = 0; s < A; ++s)
          d[s] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), src + r * L.Wq + s, idx, vm, 4);
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) tmp[r * A + j] = lin8<A>(T::BT[j], d, 1);
      }
      float* dst = vb + t * kNR;
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) _mm256_storeu_ps(dst + (i * A + j) * v_size, lin8<A>(T::BT[i], tmp + j, A));
    }
  }
}

// sum_k c[k][col] * v[k * stride] (over a column of c), 8 lanes.
template <int N, int W>
WINO_AVX2 __attribute__((always_inline)) inline __m256 lin_col8(const float (&c)[N][W], int col, const __m256* v,
                                                                int stride) {
  return lin_terms8<N>(Col<N, W>{c, col}, v, stride);
}

// wg_grad_transform with 8 lanes = the kMR output channels of a panel, one tile at a time.
template <int M>
WINO_AVX2 void wg_grad_transform_avx2(const float* gy, const Strides4& gs, const Conv2dParams& p,
                                      const Layout& L, int64_t t0, int64_t tc, int64_t ta, int64_t tb,
                                      float* z, int64_t z_size) {
  static_assert(kMR == 8, "a panel's channels are one 8-lane vector");
  using T = Mat<M>;
  constexpr int A = T::A;
  const int64_t TS = L.tH * L.tW;
  alignas(32) int32_t off[8];
  for (int64_t og = 0; og < round_up(p.O, kMR); og += kMR) {
    unsigned valid = 0;
    for (int l = 0; l < 8; ++l) {
      const bool ok = og + l < p.O;
      off[l] = ok ? int32_t((og + l) * gs.c) : 0;
      if (ok) valid |= 1u << l;
    }
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(off));
    const __m256 vm = _mm256_castsi256_ps(lanes8(valid));
    for (int64_t t = ta; t < tb; ++t) {
      const int64_t tt = t0 + t, n = tt / TS, th = (tt % TS) / L.tW, tw = tt % L.tW;
      const float* base = gy + n * gs.n + th * M * gs.h + tw * M * gs.w;
      __m256 g[M * M];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j)
          g[i * M + j] = th * M + i < p.OH && tw * M + j < p.OW
                             ? _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base + i * gs.h + j * gs.w, idx, vm, 4)
                             : _mm256_setzero_ps();
      // tmp[i][b] = sum_j g[i][j] AT[j][b], then Z[a][b] = sum_i AT[i][a] tmp[i][b].
      __m256 tmp[M * A];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int b = 0; b < A; ++b) tmp[i * A + b] = lin_col8<M, A>(T::AT, b, g + i * M, 1);
      float* dst = z + (og / kMR) * tc * kMR + t * kMR;
#pragma GCC unroll 8
      for (int a = 0; a < A; ++a)
#pragma GCC unroll 8
        for (int b = 0; b < A; ++b) _mm256_storeu_ps(dst + (a * A + b) * z_size, lin_col8<M, A>(T::AT, a, tmp + b, A));
    }
  }
}

// wg_weight_transform with 8 lanes = 8 consecutive (o, c) pairs, stored lane by lane.
template <int M>
WINO_AVX2 bool wg_weight_transform_avx2(const float* ug, int64_t ug_size, int64_t e0, int64_t e1, float* gw) {
  using T = Mat<M>;
  constexpr int A = T::A;
  unsigned bad = 0;
  alignas(32) float lane[8];
  for (int64_t e = e0; e < e1; e += 8) {
    const int64_t n = std::min<int64_t>(8, e1 - e);
    const unsigned valid = (1u << n) - 1;
    const __m256i vm = lanes8(valid);
    __m256 u[A * A];
#pragma GCC unroll 64
    for (int x = 0; x < A * A; ++x) u[x] = _mm256_maskload_ps(ug + x * ug_size + e, vm);
    __m256 tmp[3 * A];  // tmp[k][b] = sum_a G[a][k] Ug[a][b]
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k)
#pragma GCC unroll 8
      for (int b = 0; b < A; ++b) tmp[k * A + b] = lin_col8<A, 3>(T::G, k, u + b, A);
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k)
#pragma GCC unroll 3
      for (int l = 0; l < 3; ++l) {
        const __m256 val = lin_col8<A, 3>(T::G, l, tmp + k * A, 1);
        const __m256 dz = _mm256_sub_ps(val, val);
        bad |= unsigned(_mm256_movemask_ps(_mm256_cmp_ps(dz, dz, _CMP_UNORD_Q))) & valid;
        _mm256_store_ps(lane, val);
        for (int64_t q = 0; q < n; ++q) gw[(e + q) * 9 + k * 3 + l] = lane[q];
      }
  }
  return bad == 0;
}

// kWide: the AVX-512 transforms, else the AVX2 ones.
template <int M, bool kWide>
bool weight_grad_m(const float* gy, const Strides4& gs, const float* x, const Strides4& xs, float* gw,
                   const Conv2dParams& p) {
  constexpr int A = Mat<M>::A;
  Layout L;
  L.tH = ceil_div(p.OH, M);
  L.tW = ceil_div(p.OW, M);
  L.T = p.N * L.tH * L.tW;
  L.Hq = L.tH * M + 2;
  L.Wq = L.tW * M + 2;
  const int64_t plane = L.Hq * L.Wq;
  const int64_t lim = int64_t(1) << 31;
  if (p.N * p.C * plane + 2 * L.Wq + 2 >= lim || p.C * plane >= lim) return false;
  const int64_t g_extent = (p.N - 1) * gs.n + (p.O - 1) * gs.c + (p.OH - 1) * gs.h + (p.OW - 1) * gs.w;
  if (g_extent >= lim || p.O * p.C * 9 >= lim) return false;
  // (+ 8: slack for the AVX2 row loads, load_row8, which read up to 4 floats past a tile.)
  float* xp = scratch(1, p.N * p.C * plane + 8);
  pad_planes(x, xs, p, L, xp);

  // Chunks of tiles (a size fixed by the shape: the sums do not depend on the threads)
  // with Z and V of a chunk near 16 MiB, and at least 256 tiles (the GEMMs' K).
  const int64_t Op = round_up(p.O, kMR), Cp = round_up(p.C, kNR);
  const int64_t budget = int64_t(1) << 22;  // floats
  const int64_t tc = std::min(L.T, round_up(std::max<int64_t>(256, budget / (int64_t(A) * A * (Op + Cp))), 2));
  // (AVX2: a cache line between planes, as in forward_m: their strides are often multiples
  // of 4 KiB.)
  const int64_t plane_pad = kWide ? 0 : 16;
  const int64_t z_size = Op * tc + plane_pad, v_size = Cp * tc + plane_pad, ug_size = p.O * p.C + plane_pad;
  float* z = scratch(3, int64_t(A) * A * (z_size + v_size));
  float* v = z + int64_t(A) * A * z_size;
  float* ug = scratch(4, int64_t(A) * A * ug_size);
  const int64_t T_threads = at::get_num_threads();
  for (int64_t t0 = 0; t0 < L.T; t0 += tc) {
    const int64_t n_t = std::min(tc, L.T - t0);
    // The transforms: items of an even number of tiles, each all channels.
    const int64_t per = round_up(std::max<int64_t>(2, ceil_div(n_t, 4 * T_threads)), 2);
    run_items(ceil_div(n_t, per), [&](int64_t item) {
      const int64_t ta = item * per, tb = std::min(n_t, ta + per);
      // Panels of n_t tiles (the GEMMs' K), the last chunk's shorter.
      if constexpr (kWide) {
        wg_input_transform<M>(xp, p, L, t0, n_t, ta, tb, v, v_size);
        wg_grad_transform<M>(gy, gs, p, L, t0, n_t, ta, tb, z, z_size);
      } else {
        wg_input_transform_avx2<M>(xp, p, L, t0, n_t, ta, tb, v, v_size);
        wg_grad_transform_avx2<M>(gy, gs, p, L, t0, n_t, ta, tb, z, z_size);
      }
    });
    // (m + 2)^2 GEMMs, each one item: Ug[xi] (+)= Z[xi] V[xi]^T.
    run_items(A * A, [&](int64_t xi) {
      sgemm::gemm(z + xi * z_size, v + xi * v_size, p.O, p.C, n_t, ug + xi * ug_size, p.C, t0 > 0, nullptr);
    });
  }
  const int64_t OC = p.O * p.C;
  const int64_t per = round_up(std::max<int64_t>(16, ceil_div(OC, 4 * T_threads)), 16);
  std::atomic<bool> ok{true};
  run_items(ceil_div(OC, per), [&](int64_t item) {
    const int64_t e0 = item * per, e1 = std::min(OC, (item + 1) * per);
    bool done;
    if constexpr (kWide) done = wg_weight_transform<M>(ug, ug_size, e0, e1, gw);
    else done = wg_weight_transform_avx2<M>(ug, ug_size, e0, e1, gw);
    if (!done) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

#endif  // CNNEXT_WINO_AVX512

// The choice by shape. The machine these were written on was too busy (6 users on 2
// cores) for timings to separate tiles reliably, so the choice follows the element-wise
// stage's multiply count, GEMM padding included: (m + 2)^2 * (tiles rounded up to a
// panel of 32) per channel pair against 9 * N * OH * OW for the GEMM path, with 20% of
// margin for the transforms. F(2x2) (error ~20x smaller) is kept unless F(4x4) saves
// 20% more. Thin layers (< 16 channels in or out) keep the GEMM: their transforms cost
// as much as the products. F(6x6) is never chosen: on the deep layers its error
// (1.5e-5 of max |y| on 256 x 14 x 14) leaves too little room under the 2e-5 promise.
//
//
// `cols`: the columns (tiles) the element-wise GEMMs are padded to: a panel of kNR (32).
// On AVX2 the micro-kernel computes a panel in 16-column halves and skips a half past the
// tiles, so there, once Winograd is chosen for the forward (or the input gradient, a
// forward), F(2x2) or F(4x4) is picked again on 16-column costs. On small maps that moved
// the choice to the tile the timings favour (2-core Zen 3, interleaved medians, forward /
// forward + backward): 128 x 12 x 12 at batch 4 0.95 -> 0.79 / 2.86 -> 2.49 ms; 256 x 6 x 6
// 1.12 -> 0.88 / 3.46 -> 3.41; 256 x 14 x 14 at batch 1 1.44 -> 1.23 / 4.71 -> 4.34. Letting
// the 16-column costs also choose Winograd over the GEMM path (512 x 3 x 3) or pick the
// weight gradient's tile made forward + backward 5-20% slower on those maps.
int64_t wino_cost(const Conv2dParams& p, int m, int64_t cols = kNR) {
  const int64_t tiles = p.N * ceil_div(p.OH, m) * ceil_div(p.OW, m);
  return int64_t(m + 2) * (m + 2) * round_up(tiles, cols);
}

int tile_for(const Conv2dParams& p, int64_t cols) {
  if (p.C < 16 || p.O < 16) return 0;
  const int64_t direct = 9 * p.N * p.OH * p.OW;
  const int64_t c2 = wino_cost(p, 2, cols), c4 = wino_cost(p, 4, cols);
  const int m = 10 * c4 < 8 * c2 ? 4 : 2;
  const int64_t cost = m == 4 ? c4 : c2;
  return 12 * cost <= 10 * direct ? m : 0;
}

// AVX-512, once tile_for chose Winograd for a forward: F(2x2) or F(4x4) again, on the
// micro-kernel's 16-column halves (it skips a half past the tiles, as on AVX2) plus 8
// columns a transformed element for streaming the transformed weight, (m + 2)^2 C O floats a
// call, which on small maps is read for few tiles. F(4x4) where it saves 10%. Timed on a
// 2-core Zen 4 (forward, 2 threads, F(2x2) / F(4x4) ms, chosen before -> now): ResNet-18 at
// 96x96, batch 4: 128 x 12 x 12 0.69 / 0.55 (F(2x2) -> F(4x4)); 256 x 6 x 6 0.78 / 0.80-1.04
// (F(2x2) kept); 256 x 14 x 14 at batch 1 0.80 / 0.77 (F(2x2) -> F(4x4)); unchanged where
// the tiles are many (F(4x4) at 56, 28, 14 and 7 at batch 8).
int wide_tile(const Conv2dParams& p) {
  const int64_t c2 = wino_cost(p, 2, 16) + 16 * 8, c4 = wino_cost(p, 4, 16) + 36 * 8;
  return 10 * c4 < 9 * c2 ? 4 : 2;
}

}  // namespace

bool enabled() { return g_enabled.load(std::memory_order_relaxed); }
void set_enabled(bool on) { g_enabled.store(on, std::memory_order_relaxed); }
void set_forced_tile(int m) { g_forced.store(m, std::memory_order_relaxed); }
int forced_tile() { return g_forced.load(std::memory_order_relaxed); }

bool available() {
#ifdef CNNEXT_WINO_AVX512
  return sgemm::available() || cpu_features().avx2_fma();
#else
  return false;
#endif
}

std::vector<int> allowed_tiles() { return {2, 4}; }

int choose_tile(const Conv2dParams& p, bool weight_grad) {
#ifdef CNNEXT_WINO_AVX512
  if (!enabled() || !available()) return 0;
  if (p.KH != 3 || p.KW != 3 || p.SH != 1 || p.SW != 1 || p.DH != 1 || p.DW != 1 || p.G != 1)
    return 0;
  if (p.N == 0 || p.OH <= 0 || p.OW <= 0 || p.C == 0 || p.O == 0) return 0;
  const int forced = forced_tile();
  if (forced > 0) return forced;
  const int m = tile_for(p, kNR);
  if (m == 0 || weight_grad) return m;
  if (sgemm::available()) return wide_tile(p);
  return tile_for(p, 16) == 4 ? 4 : m;  // AVX2: F(2x2) or F(4x4) by the 16-column halves
#else
  (void)p;
  (void)weight_grad;
  return 0;
#endif
}

// ---- 5 x 5 kernels as four 3 x 3 ones ----
// A 5x5 kernel, zero-extended to 6x6, is four 3x3 kernels w_ab = w[3a .. 3a + 2][3b .. 3b + 2]
// (a, b in {0, 1}), and a stride-1 5x5 convolution is the sum of the four 3x3 ones, each
// reading the input shifted by (3a, 3b): one 3x3 convolution over 4 C input channels, the
// four shifted copies of the (padded) input side by side (split5_params, shifted_copies).
// Winograd F(4x4, 3x3) on it multiplies 4 x 36 / 16 = 9 times per output and input channel
// against the direct 25; the seven taps that w_ab holds past the 5x5 are zeros.
namespace {

Conv2dParams split5_params(const Conv2dParams& p) {
  Conv2dParams q = p;
  q.C = 4 * p.C;
  q.H = p.OH + 2;
  q.W = p.OW + 2;
  q.KH = q.KW = 3;
  q.PH = q.PW = 0;
  return q;
}

// fn(ab, c, i, j, kh, kw) for every tap (i, j) of the split kernel w_ab at input channel c
// that lies inside the 5x5 (kh = 3a + i, kw = 3b + j, ab = 2a + b): the one map between
// the 5x5 weight and the split's O x 4C x 3 x 3 one, read by the forward's weight and
// written back by the weight gradient.
template <typename Fn>
void for_each_split_tap(int64_t C, const Fn& fn) {
  for (int64_t ab = 0; ab < 4; ++ab)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < 3; ++i)
        for (int64_t j = 0; j < 3; ++j) {
          const int64_t kh = 3 * (ab / 2) + i, kw = 3 * (ab % 2) + j;
          if (kh < 5 && kw < 5) fn(ab, c, i, j, kh, kw);
        }
}

// Whether the split's copies of the input (4 C planes padded to whole tiles of m) stay
// within the transforms' 32-bit offsets; else the split declines before copying.
bool split5_planes_fit(const Conv2dParams& p, int m) {
  return p.N * 4 * p.C * (ceil_div(p.OH, m) * m + 2) * (ceil_div(p.OW, m) * m + 2) < (int64_t(1) << 31);
}

int choose_tile5(const Conv2dParams& p) {
#ifdef CNNEXT_WINO_AVX512
  if (!enabled() || !available()) return 0;
  if (p.KH != 5 || p.KW != 5 || p.SH != 1 || p.SW != 1 || p.DH != 1 || p.DW != 1 || p.G != 1) return 0;
  if (p.N == 0 || p.OH <= 0 || p.OW <= 0 || p.C == 0 || p.O == 0) return 0;
  const int forced = forced_tile();
  if (forced > 0) return forced;
  // As tile_for, with 4 transformed products per (input, output) channel pair against 25
  // multiplications per output of the direct convolution, under stricter conditions: the
  // split's transforms run on 4 C channels and its input is copied twice, so it lost to the
  // GEMM path wherever the tiles were few or the channels thin (Zen 3, 2 threads, forward,
  // split / GEMM path: GoogLeNet's 5x5 layers at 12x12, batch 4: 1.26-1.33x; 128 -> 256 at
  // 12x12, 36 tiles: 1.24x; 32 -> 64 at 24x24, 144 tiles: 1.14x) and won on 26x26 maps
  // (batch 8, 392 tiles: AlexNet's 96 -> 256 0.67x, 64 -> 64 0.79x, 48 -> 128 0.72x,
  // 32 -> 256 0.76x; batch 4, 196 tiles: NiN's 96 -> 256 0.74x, 48 -> 128 0.76x, 32 -> 256
  // 0.85x, 64 -> 64 0.98x; batch 2, 98 tiles: 96 -> 256 0.89x). At least 32 input and 64
  // output channels, 96 tiles of 4 x 4 outputs with 128 output channels or more, else 256,
  // and half the direct multiplications.
  const int64_t tiles4 = p.N * ceil_div(p.OH, 4) * ceil_div(p.OW, 4);
  if (p.C < 32 || p.O < 64 || tiles4 < (p.O >= 128 ? 96 : 256)) return 0;
  // AVX-512: not where the input channels outnumber twice the output channels. The split's
  // transforms and its shifted copies of the input grow with 4 C, its products with 4 C O:
  // with few outputs a channel they cost more than the products save. Zen 4, 2 threads,
  // interleaved medians, split / GEMM path: AlexNet's 5x5 input gradient (a 256 -> 96
  // forward at 26x26, batch 8) 43.7-52.9 / 36.3-38.2 ms, the same as a forward 46.7 / 36.3;
  // kept: 96 -> 256 forward 22.5-28.1 / 31.8-35.1, 64 -> 64 9.0 / 11.8, 128 -> 128 22.6 /
  // 24.2 (its input gradient 25.7 / 23.6, within the noise). AVX2 keeps the rule above (not
  // measured there).
  if (sgemm::available() && p.C > 2 * p.O) return 0;
  const Conv2dParams q = split5_params(p);
  const int64_t direct = 25 * p.N * p.OH * p.OW;
  const int64_t c2 = 4 * wino_cost(q, 2), c4 = 4 * wino_cost(q, 4);
  const int m = 10 * c4 < 8 * c2 ? 4 : 2;
  const int64_t cost = m == 4 ? c4 : c2;
  return 2 * cost <= direct ? m : 0;
#else
  (void)p;
  return 0;
#endif
}

}  // namespace

int64_t transformed_weight_size(int64_t O, int64_t C, int m) {
  return int64_t(m + 2) * (m + 2) * round_up(O, kMR) * C;
}

void transform_weight(const float* w, int64_t wso, int64_t wsc, int64_t wst, int64_t O, int64_t C,
                      int m, float* u) {
#ifdef CNNEXT_WINO_AVX512
  const int64_t panels = ceil_div(O, kMR);
  const int64_t per = std::max<int64_t>(1, ceil_div(panels, 4 * at::get_num_threads()));
  run_items(ceil_div(panels, per), [&](int64_t b) {
    const int64_t p0 = b * per, p1 = std::min(panels, p0 + per);
    if (sgemm::available()) {
      if (m == 2) weight_panels<2>(w, wso, wsc, wst, O, C, p0, p1, u);
      if (m == 4) weight_panels<4>(w, wso, wsc, wst, O, C, p0, p1, u);
      if (m == 6) weight_panels<6>(w, wso, wsc, wst, O, C, p0, p1, u);
    } else {
      if (m == 2) weight_panels_avx2<2>(w, wso, wsc, wst, O, C, p0, p1, u);
      if (m == 4) weight_panels_avx2<4>(w, wso, wsc, wst, O, C, p0, p1, u);
      if (m == 6) weight_panels_avx2<6>(w, wso, wsc, wst, O, C, p0, p1, u);
    }
  });
#else
  (void)w, (void)wso, (void)wsc, (void)wst, (void)O, (void)C, (void)m, (void)u;
#endif
}

bool forward(const float* x, const Strides4& xs, const float* w, int64_t wso, int64_t wsc,
             int64_t wst, const float* u, const float* bias, float* y, const Strides4& ys,
             const Conv2dParams& p, bool relu, int m) {
#ifdef CNNEXT_WINO_AVX512
  if (!available()) return false;
  const bool wide = sgemm::available();
  if (!wide) kAvx2Kernels.hit();
  bool ok = false;
#define CNNEXT_WINO_FWD(MM) \
  (wide ? forward_m<MM, true>(x, xs, w, wso, wsc, wst, u, bias, y, ys, p, relu) \
        : forward_m<MM, false>(x, xs, w, wso, wsc, wst, u, bias, y, ys, p, relu))
  if (m == 2) {
    kF2.hit();
    ok = CNNEXT_WINO_FWD(2);
  } else if (m == 4) {
    kF4.hit();
    ok = CNNEXT_WINO_FWD(4);
  } else if (m == 6) {
    kF6.hit();
    ok = CNNEXT_WINO_FWD(6);
  }
#undef CNNEXT_WINO_FWD
  if (!ok) kNonFinite.hit();
  return ok;
#else
  (void)x, (void)xs, (void)w, (void)wso, (void)wsc, (void)wst, (void)u, (void)bias, (void)y;
  (void)ys, (void)p, (void)relu, (void)m;
  return false;
#endif
}

// ---- the transformed-weight cache ----
namespace {

// The transformed weight of `weight` (O x C x 3 x 3 float32 for the forward) for tile m,
// from the weight cache (csrc/cpu/derived_cache.h: reused only while the weight is provably
// unchanged) or computed. flipped: the input gradient's weight instead, w'[c][o][kh][kw] =
// w[o][c][2 - kh][2 - kw] (a C -> O forward's transposed by flipped), under its own tag. O
// and C are the dims of the transformed problem: (out, in) of the weight for the forward,
// (in, out) when flipped.
at::Tensor cached_weight(const at::Tensor& weight, int64_t O, int64_t C, int m, bool flipped) {
  bool hit = false;
  const at::Tensor u = weight_cache().get(
      {weight}, {flipped ? kFlippedTransformedWeightTag : kTransformedWeightTag, O, C, m},
      [&](const std::vector<at::Tensor>& reuse) {
        // A bfloat16 weight in float (exact); a float32 one as it is.
        const at::Tensor wc = weight.to(at::kFloat).contiguous();
        at::Tensor out = reuse.empty() ? DerivedCache::empty({transformed_weight_size(O, C, m)},
                                                             weight.options().dtype(at::kFloat))
                                       : reuse[0];
        const float* w = wc.const_data_ptr<float>();
        if (flipped) {
          // Element (o', c', t) of the flipped weight (o' an input channel of the weight, c'
          // an output channel) is w[c'][o'][8 - t].
          transform_weight(w + 8, 9, O * 9, -1, O, C, m, out.mutable_data_ptr<float>());
        } else {
          transform_weight(w, C * 9, 9, 1, O, C, m, out.mutable_data_ptr<float>());
        }
        return std::vector<at::Tensor>{out};
      },
      &hit)[0];
  (hit ? kCacheHit : kCacheMiss).hit();
  return u;
}

}  // namespace

namespace {

// The input of split5_params(p) for a 5x5 stride-1 convolution p of x: (N, 4C, OH + 2,
// OW + 2), channel (2a + b) C + c holding x[n][c] shifted by (3a - PH, 3b - PW), zeros
// outside x.
at::Tensor shifted_copies(const at::Tensor& x, const Conv2dParams& p) {
  const int64_t Hs = p.OH + 2, Ws = p.OW + 2;
  at::Tensor out = at::empty({p.N, 4 * p.C, Hs, Ws}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const Strides4 xs = strides_of(x);
  const float* src = x.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  run_items(p.N * 4 * p.C, [&](int64_t plane) {
    const int64_t n = plane / (4 * p.C), k = plane % (4 * p.C), ab = k / p.C, c = k % p.C;
    const int64_t h0 = 3 * (ab / 2) - p.PH, w0 = 3 * (ab % 2) - p.PW;
    const float* s = src + n * xs.n + c * xs.c;
    float* d = dst + plane * Hs * Ws;
    const int64_t j0 = std::clamp<int64_t>(-w0, 0, Ws), j1 = std::clamp<int64_t>(p.W - w0, j0, Ws);
    for (int64_t i = 0; i < Hs; ++i, d += Ws) {
      const int64_t h = h0 + i;
      if (h < 0 || h >= p.H) {
        std::fill(d, d + Ws, 0.f);
        continue;
      }
      std::fill(d, d + j0, 0.f);
      const float* r = s + h * xs.h;
      if (xs.w == 1) {
        std::memcpy(d + j0, r + (w0 + j0), size_t(j1 - j0) * sizeof(float));
      } else {
        for (int64_t j = j0; j < j1; ++j) d[j] = r[(w0 + j) * xs.w];
      }
      std::fill(d + j1, d + Ws, 0.f);
    }
  });
  return out;
}

// The transformed split weight (split5_params' O x 4C x 3 x 3) of a 5x5 `weight`, from the
// weight cache or computed. flipped: of the input gradient's weight w'[c][o][kh][kw] =
// w[o][c][4 - kh][4 - kw]; O and C are the dims of the problem as a forward (see
// cached_weight).
at::Tensor cached_split_weight(const at::Tensor& weight, int64_t O, int64_t C, int m, bool flipped) {
  bool hit = false;
  const at::Tensor u = weight_cache().get(
      {weight}, {flipped ? kSplit5FlippedTransformedWeightTag : kSplit5TransformedWeightTag, O, C, m},
      [&](const std::vector<at::Tensor>& reuse) {
        const at::Tensor wc = weight.contiguous();
        const float* w = wc.const_data_ptr<float>();
        at::Tensor w4 = at::zeros({O, 4 * C, 3, 3}, weight.options().memory_format(at::MemoryFormat::Contiguous));
        float* d = w4.mutable_data_ptr<float>();
        for (int64_t o = 0; o < O; ++o)
          for_each_split_tap(C, [&](int64_t ab, int64_t c, int64_t i, int64_t j, int64_t kh, int64_t kw) {
            // The weight is (O, C, 5, 5) for the forward, (C, O, 5, 5) when flipped.
            const float v = flipped ? w[((c * O + o) * 5 + 4 - kh) * 5 + 4 - kw] : w[((o * C + c) * 5 + kh) * 5 + kw];
            d[((o * 4 * C + ab * C + c) * 3 + i) * 3 + j] = v;
          });
        at::Tensor out = reuse.empty() ? DerivedCache::empty({transformed_weight_size(O, 4 * C, m)}, weight.options())
                                       : reuse[0];
        transform_weight(d, 4 * C * 9, 9, 1, O, 4 * C, m, out.mutable_data_ptr<float>());
        return std::vector<at::Tensor>{out};
      },
      &hit)[0];
  (hit ? kCacheHit : kCacheMiss).hit();
  return u;
}

// y = the 5x5 stride-1 convolution q of x (float32) by the split, transformed weight u.
bool split5_forward(const at::Tensor& x, const at::Tensor& u, const float* bias, at::Tensor& y,
                    const Conv2dParams& q, bool relu, int m) {
  // forward() declines planes past 32-bit offsets: decline before copying the input.
  if (!split5_planes_fit(q, m)) return false;
  const at::Tensor x4 = shifted_copies(x, q);
  return forward(x4.const_data_ptr<float>(), strides_of(x4), nullptr, 0, 0, 0, u.const_data_ptr<float>(), bias,
                 y.mutable_data_ptr<float>(), strides_of(y), split5_params(q), relu, m);
}

}  // namespace

bool forward_tensor(const at::Tensor& input, const at::Tensor& weight, const float* bias,
                    at::Tensor& out, const Conv2dParams& p, bool relu,
                    const std::function<void(int64_t, int64_t, int64_t)>& rows_done) {
  if (input.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return false;
  if (p.KH == 5 && p.KW == 5) {
    const int m = choose_tile5(p);
    if (m == 0 || !split5_forward(input, cached_split_weight(weight, p.O, p.C, m, false), bias, out, p, relu, m))
      return false;
    kSplit5.hit();
  } else {
    const int m = choose_tile(p);
    if (m == 0) return false;
    const at::Tensor u = cached_weight(weight, p.O, p.C, m, false);
    if (!forward(input.const_data_ptr<float>(), strides_of(input), nullptr, 0, 0, 0,
                 u.const_data_ptr<float>(), bias, out.mutable_data_ptr<float>(), strides_of(out), p,
                 relu, m))
      return false;
  }
  if (rows_done) {
    run_items(p.N, [&](int64_t n) { rows_done(n, 0, p.OH); });
  }
  return true;
}

bool bf16_pays(const Conv2dParams& p) {
  // Against the vdpbf16ps GEMM (AVX512_BF16; measured 1 thread, at about 3.3 G vdpbf16ps a
  // second): VGG's 128 -> 256 at 56 x 56, batch 8, 62 vs 70 ms; ResNet's 64 -> 64 at 56 x 56,
  // 14 vs 10.8 ms; AlexNet's 256 -> 384 at 12 x 12, 11.0 vs 10.2 ms: wide layers on wide maps
  // only (or wherever a tile is forced, for tests). Without AVX512_BF16 the alternative is the
  // float32 path on float copies, which itself takes this Winograd where choose_tile picks
  // it: converting while gathering and rounding while storing saves the copies, so it pays
  // wherever a tile is chosen.
  return forced_tile() > 0 || !bf16::available() || (p.C >= 128 && p.O >= 128 && p.OW >= 48 && p.OH >= 48);
}

#ifdef CNNEXT_WINO_AVX512
namespace {

// The bfloat16 forward of forward_bf16_tensor / input_backward_bf16_tensor with tile m and
// the transformed weight u on this CPU's transforms (AVX-512F: 16 tiles a vector, else
// AVX2: 8).
bool forward_bf16(const uint16_t* x, const Strides4& xs, const float* u, const float* bias, uint16_t* y,
                  const Strides4& ys, const Conv2dParams& p, bool relu, int m) {
  const bool wide = sgemm::available();
  if (!wide) kAvx2Kernels.hit();
#define CNNEXT_WINO_BF16(MM)                                                                           \
  (wide ? forward_m<MM, true, uint16_t, uint16_t>(x, xs, nullptr, 0, 0, 0, u, bias, y, ys, p, relu) \
        : forward_m<MM, false, uint16_t, uint16_t>(x, xs, nullptr, 0, 0, 0, u, bias, y, ys, p, relu))
  bool ok = false;
  if (m == 2) {
    kF2.hit();
    ok = CNNEXT_WINO_BF16(2);
  } else if (m == 4) {
    kF4.hit();
    ok = CNNEXT_WINO_BF16(4);
  } else if (m == 6) {
    kF6.hit();
    ok = CNNEXT_WINO_BF16(6);
  }
#undef CNNEXT_WINO_BF16
  if (!ok) kNonFinite.hit();
  return ok;
}

}  // namespace
#endif  // CNNEXT_WINO_AVX512

bool forward_bf16_tensor(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::Tensor& out, const Conv2dParams& p, bool relu) {
#ifdef CNNEXT_WINO_AVX512
  const int m = choose_tile(p);  // 0 where Winograd does not run here (the switch, the CPU, the shape)
  if (m == 0 || !bf16_pays(p) || input.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16 ||
      out.scalar_type() != at::kBFloat16)
    return false;
  // The weight's transform (of its float values, exact) from the weight cache, under the
  // bfloat16 weight itself: computed once per weight value, as float32's.
  const at::Tensor u = cached_weight(weight, p.O, p.C, m, false);
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  const uint16_t* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  uint16_t* y = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const float* b = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  if (!forward_bf16(x, strides_of(input), u.const_data_ptr<float>(), b, y, strides_of(out), p, relu, m))
    return false;
  kBf16Fwd.hit();
  return true;
#else
  (void)input, (void)weight, (void)bias, (void)out, (void)p, (void)relu;
  return false;
#endif
}

at::Tensor input_backward_bf16_tensor(const at::Tensor& grad_output, const at::Tensor& weight,
                                      const Conv2dParams& p, at::MemoryFormat out_format) {
#ifdef CNNEXT_WINO_AVX512
  if (grad_output.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16) return at::Tensor();
  if (p.PH < 0 || p.PW < 0 || p.PH > 2 || p.PW > 2) return at::Tensor();
  const Conv2dParams q = conv_input_grad_as_forward(p);
  const int m = choose_tile(q);
  if (m == 0 || !bf16_pays(q)) return at::Tensor();
  at::Tensor gx = empty_output({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format));
  // The flipped weight's transform, cached under the bfloat16 weight like the forward's.
  const at::Tensor u = cached_weight(weight, q.O, q.C, m, true);
  const uint16_t* gy = reinterpret_cast<const uint16_t*>(grad_output.const_data_ptr<at::BFloat16>());
  uint16_t* out = reinterpret_cast<uint16_t*>(gx.mutable_data_ptr<at::BFloat16>());
  if (!forward_bf16(gy, strides_of(grad_output), u.const_data_ptr<float>(), nullptr, out, strides_of(gx), q, false, m))
    return at::Tensor();
  kBf16InputGrad.hit();
  return gx;
#else
  (void)grad_output, (void)weight, (void)p, (void)out_format;
  return at::Tensor();
#endif
}

bool input_backward_tensor(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& gx,
                           const Conv2dParams& p) {
  if (p.KH == 5 && p.KW == 5) {
    if (grad_output.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat ||
        gx.scalar_type() != at::kFloat)
      return false;
    // The forward's padding is 4 - p per side.
    if (p.PH < 0 || p.PW < 0 || p.PH > 4 || p.PW > 4) return false;
    const Conv2dParams q = conv_input_grad_as_forward(p);
    const int m = choose_tile5(q);
    if (m == 0) return false;
    if (!split5_forward(grad_output, cached_split_weight(weight, q.O, q.C, m, true), nullptr, gx, q, false, m))
      return false;
    kSplit5InputGrad.hit();
    kInputGrad.hit();
    return true;
  }
  if (grad_output.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat ||
      gx.scalar_type() != at::kFloat)
    return false;
  // The forward's padding is 2 - p per side: a padding past 2 would crop gy instead.
  if (p.PH < 0 || p.PW < 0 || p.PH > 2 || p.PW > 2) return false;
  const Conv2dParams q = conv_input_grad_as_forward(p);
  const int m = choose_tile(q);  // 3 x 3, stride 1, dilation 1, one group, switch on
  if (m == 0) return false;
  const at::Tensor u = cached_weight(weight, q.O, q.C, m, true);
  if (!forward(grad_output.const_data_ptr<float>(), strides_of(grad_output), nullptr, 0, 0, 0,
               u.const_data_ptr<float>(), nullptr, gx.mutable_data_ptr<float>(), strides_of(gx), q,
               false, m))
    return false;
  kInputGrad.hit();
  return true;
}

bool weight_backward_tensor(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& gw,
                            const Conv2dParams& p) {
#ifdef CNNEXT_WINO_AVX512
  if (!available()) return false;
  if (grad_output.scalar_type() != at::kFloat || input.scalar_type() != at::kFloat ||
      gw.scalar_type() != at::kFloat || !gw.is_contiguous())
    return false;
  // 5x5, stride 1: the weight gradient of the split's 3x3 convolution (split5_params: 4 C
  // inputs, the shifted copies of x), whose taps past the 5x5 are dropped (gw4 below). Taken
  // where the forward takes the split and the output channels number at least twice the
  // input channels, on AVX-512 (a forced tile takes it wherever the forward's rule would).
  // Zen 4, 2 threads, interleaved medians, split / GEMM path / stock, ms: AlexNet's 96 -> 256
  // at 26x26 batch 8 30.0 / 38.2 / 34.0, at batch 4 18.0 / 20.6 / 17.5; it lost on 64 -> 64
  // (10.9 / 7.7) and 128 -> 128 (29.0 / 26.1), whose 4 C inputs' transforms cost more. Not
  // measured on AVX2, which keeps the GEMM path.
  const bool split = p.KH == 5 && p.KW == 5;
  const Conv2dParams q = split ? split5_params(p) : p;
  const bool split_pays = forced_tile() > 0 || (sgemm::available() && p.O >= 2 * p.C);
  const int m = split ? (choose_tile5(p) == 0 || !split_pays ? 0 : choose_tile(q, /*weight_grad=*/true))
                      : choose_tile(p, /*weight_grad=*/true);
  if (m == 0) return false;
  if (split && !split5_planes_fit(p, m)) return false;
  at::Tensor x4, gw4;
  if (split) {
    x4 = shifted_copies(input, p);
    gw4 = at::empty({q.O, q.C, 3, 3}, gw.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const float* gy = grad_output.const_data_ptr<float>();
  const float* x = split ? x4.const_data_ptr<float>() : input.const_data_ptr<float>();
  float* g = split ? gw4.mutable_data_ptr<float>() : gw.mutable_data_ptr<float>();
  const Strides4 gs = strides_of(grad_output), xs = strides_of(split ? x4 : input);
  const bool wide = sgemm::available();
  if (!wide) kAvx2Kernels.hit();
  bool ok = false;
#define CNNEXT_WINO_WG(MM) \
  (wide ? weight_grad_m<MM, true>(gy, gs, x, xs, g, q) : weight_grad_m<MM, false>(gy, gs, x, xs, g, q))
  if (m == 2) {
    kF2.hit();
    ok = CNNEXT_WINO_WG(2);
  } else if (m == 4) {
    kF4.hit();
    ok = CNNEXT_WINO_WG(4);
  } else if (m == 6) {
    kF6.hit();
    ok = CNNEXT_WINO_WG(6);
  }
#undef CNNEXT_WINO_WG
  if (!ok) {
    kNonFinite.hit();
    return false;
  }
  if (split) {
    // gw[o][c][3a + i][3b + j] = gw4[o][(2a + b) C + c][i][j] for the taps inside the 5x5.
    const float* s4 = gw4.const_data_ptr<float>();
    float* d = gw.mutable_data_ptr<float>();
    run_items(p.O, [&](int64_t o) {
      for_each_split_tap(p.C, [&](int64_t ab, int64_t c, int64_t i, int64_t j, int64_t kh, int64_t kw) {
        d[((o * p.C + c) * 5 + kh) * 5 + kw] = s4[((o * q.C + ab * p.C + c) * 3 + i) * 3 + j];
      });
    });
    kSplit5WeightGrad.hit();
  }
  kWeightGrad.hit();
  return true;
#else
  (void)grad_output, (void)input, (void)gw, (void)p;
  return false;
#endif
}

}  // namespace winograd
}  // namespace cpu
}  // namespace cnnext
