// max_pool2d forward with indices on NCHW rows, AVX-512F, for column strides 1 and 2
// (any kernel, padding, dilation, ceil_mode).
//
// One output row is cut into vectors of L outputs (16 float / 8 double lanes, the last
// one masked). For each vector the window's taps are scanned in torch's order, rows
// outer, columns inner, each lane applying torch's rule (max_pool_takes: greater or NaN)
// to its own tap: the result is torch's scan exactly (first of equal maxima, last NaN).
// A tap's values for the L outputs are one masked load (stride 1) or two masked loads
// and a permute taking the even lanes (stride 2). Columns outside the input are masked
// off the load and read as -inf, which never takes, so the padding and the row ends need
// no other case. The running maximum's flat index rides in integer lanes beside it
// (int32 for float, int64 for double), starting from torch's index of an empty or all
// -inf window, lo_h * W + lo_w, and is widened to int64 at the store.
#include "cpu/max_pool2d_avx512.h"
#include "cpu/cpu_features.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define CNNEXT_MAXPOOL_AVX512 1
#define CNNEXT_TARGET_AVX512 __attribute__((target("avx512f")))
#endif

namespace cnnext {
namespace cpu {

#ifdef CNNEXT_MAXPOOL_AVX512
namespace {

bool has_avx512f() { return cpu_features().avx512f; }

// Lanes [lo, hi) of a mask of L lanes (empty when hi <= lo).
inline uint32_t lane_range(int64_t lo, int64_t hi) {
  if (hi <= lo) return 0;
  const uint32_t up = hi >= 32 ? ~0u : (1u << hi) - 1;
  return up & ~((1u << lo) - 1);
}

// Lanes j of L whose column c0 + j lies in [0, W).
inline uint32_t column_mask(int64_t c0, int64_t W, int L) {
  return lane_range(std::max<int64_t>(0, -c0), std::min<int64_t>(L, W - c0));
}

// Per call: for output vector b and tap column kw, the load masks (stride 1: one; stride 2:
// two, the even lanes of their concatenation being the tap's columns), and per output
// column the clipped window start lo_w.
template <typename IdxT>
struct RowPlan {
  int64_t L, nb, s;
  std::vector<uint32_t> masks;  // [b][kw][2]
  std::vector<IdxT> col_lo;     // nb * L entries
  RowPlan(const Pool2dParams& p, int64_t L_) : L(L_), nb((p.OW + L_ - 1) / L_), s(p.SW) {
    masks.assign(nb * p.KW * 2, 0);
    col_lo.assign(nb * L, 0);
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        const int64_t c0 = b * L * s - p.PW + kw * p.DW;
        masks[(b * p.KW + kw) * 2] = column_mask(c0, p.W, L);
        masks[(b * p.KW + kw) * 2 + 1] = s == 2 ? column_mask(c0 + L, p.W, L) : 0;
      }
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      int64_t lo, hi;
      max_window(ow, p.W, p.KW, p.SW, p.PW, p.DW, &lo, &hi);
      col_lo[ow] = static_cast<IdxT>(lo);
    }
  }
};

// One plane, float: 16 outputs per vector, int32 indices.
template <int S>
CNNEXT_TARGET_AVX512 void plane_f32(const float* xp, int64_t xh, const Pool2dParams& p,
                                    const RowPlan<int32_t>& plan, float* y, int64_t* yi) {
  constexpr int L = 16;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i iota = _mm512_setr_epi32(0, S, 2 * S, 3 * S, 4 * S, 5 * S, 6 * S, 7 * S, 8 * S,
                                         9 * S, 10 * S, 11 * S, 12 * S, 13 * S, 14 * S, 15 * S);
  const int64_t W = p.W, OW = p.OW, KW = p.KW;
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    int64_t hlo, hhi;
    max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &hlo, &hhi);
    float* yr = y + oh * OW;
    int64_t* ir = yi + oh * OW;
    for (int64_t b = 0; b < plan.nb; ++b) {
      const int64_t ow0 = b * L;
      const __mmask16 om = static_cast<__mmask16>(lane_range(0, std::min<int64_t>(L, OW - ow0)));
      __m512 acc = ninf;
      __m512i idx = _mm512_add_epi32(_mm512_loadu_si512(plan.col_lo.data() + ow0),
                                     _mm512_set1_epi32(static_cast<int32_t>(hlo * W)));
      const uint32_t* mk = plan.masks.data() + b * KW * 2;
      for (int64_t ih = hlo; ih < hhi; ih += p.DH) {
        const float* row = xp + ih * xh;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t c0 = ow0 * S - p.PW + kw * p.DW;
          __m512 v;
          if (S == 1) {
            v = _mm512_mask_loadu_ps(ninf, static_cast<__mmask16>(mk[2 * kw]), row + c0);
          } else {
            const __m512 a = _mm512_mask_loadu_ps(ninf, static_cast<__mmask16>(mk[2 * kw]), row + c0);
            const __m512 c = _mm512_mask_loadu_ps(ninf, static_cast<__mmask16>(mk[2 * kw + 1]), row + c0 + L);
            v = _mm512_permutex2var_ps(a, even, c);
          }
          const __mmask16 take = _mm512_cmp_ps_mask(v, acc, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          acc = _mm512_mask_mov_ps(acc, take, v);
          idx = _mm512_mask_mov_epi32(idx, take,
                                      _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(ih * W + c0))));
        }
      }
      _mm512_mask_storeu_ps(yr + ow0, om, acc);
      _mm512_mask_storeu_epi64(ir + ow0, static_cast<__mmask8>(om & 0xff),
                               _mm512_cvtepi32_epi64(_mm512_castsi512_si256(idx)));
      _mm512_mask_storeu_epi64(ir + ow0 + 8, static_cast<__mmask8>(om >> 8),
                               _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(idx, 1)));
    }
  }
}

// One plane, double: 8 outputs per vector, int64 indices.
template <int S>
CNNEXT_TARGET_AVX512 void plane_f64(const double* xp, int64_t xh, const Pool2dParams& p,
                                    const RowPlan<int64_t>& plan, double* y, int64_t* yi) {
  constexpr int L = 8;
  const __m512d ninf = _mm512_set1_pd(-std::numeric_limits<double>::infinity());
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i iota = _mm512_setr_epi64(0, S, 2 * S, 3 * S, 4 * S, 5 * S, 6 * S, 7 * S);
  const int64_t W = p.W, OW = p.OW, KW = p.KW;
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    int64_t hlo, hhi;
    max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &hlo, &hhi);
    double* yr = y + oh * OW;
    int64_t* ir = yi + oh * OW;
    for (int64_t b = 0; b < plan.nb; ++b) {
      const int64_t ow0 = b * L;
      const __mmask8 om = static_cast<__mmask8>(lane_range(0, std::min<int64_t>(L, OW - ow0)));
      __m512d acc = ninf;
      __m512i idx = _mm512_add_epi64(_mm512_loadu_si512(plan.col_lo.data() + ow0),
                                     _mm512_set1_epi64(hlo * W));
      const uint32_t* mk = plan.masks.data() + b * KW * 2;
      for (int64_t ih = hlo; ih < hhi; ih += p.DH) {
        const double* row = xp + ih * xh;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t c0 = ow0 * S - p.PW + kw * p.DW;
          __m512d v;
          if (S == 1) {
            v = _mm512_mask_loadu_pd(ninf, static_cast<__mmask8>(mk[2 * kw]), row + c0);
          } else {
            const __m512d a = _mm512_mask_loadu_pd(ninf, static_cast<__mmask8>(mk[2 * kw]), row + c0);
            const __m512d c = _mm512_mask_loadu_pd(ninf, static_cast<__mmask8>(mk[2 * kw + 1]), row + c0 + L);
            v = _mm512_permutex2var_pd(a, even, c);
          }
          const __mmask8 take = _mm512_cmp_pd_mask(v, acc, _CMP_GT_OQ) | _mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q);
          acc = _mm512_mask_mov_pd(acc, take, v);
          idx = _mm512_mask_mov_epi64(idx, take, _mm512_add_epi64(iota, _mm512_set1_epi64(ih * W + c0)));
        }
      }
      _mm512_mask_storeu_pd(yr + ow0, om, acc);
      _mm512_mask_storeu_epi64(ir + ow0, om, idx);
    }
  }
}

template <typename T, typename IdxT, typename PlaneFn>
void run(const T* x, int64_t xn, int64_t xc, int64_t xh, const Pool2dParams& p, T* y,
         int64_t* yi, int64_t L, PlaneFn plane) {
  const RowPlan<IdxT> plan(p, L);
  const int64_t OHW = p.OH * p.OW;
  at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.C, c = item % p.C;
      plane(x + n * xn + c * xc, xh, p, plan, y + item * OHW, yi + item * OHW);
    }
  });
}

// channels_last, one output pixel: channels [0, C) of the taps at xp + off[t], t < nt
// (1 <= nt <= 32), in scan order; the winning tap number per lane (int32) becomes the
// flat index through a 32-entry table (two permute sources). Blocks of NV vectors,
// then single vectors, the last one masked.
CNNEXT_TARGET_AVX512 inline __m512 mload(const float* ptr, uint32_t m) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), ptr);
}
CNNEXT_TARGET_AVX512 inline __m512d mload(const double* ptr, uint32_t m) {
  return _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), ptr);
}

template <typename T, int NV>
CNNEXT_TARGET_AVX512 inline void cl_block(const T* __restrict__ xp, int64_t c, uint32_t m,
                                          const int64_t* off, int64_t nt, __m512i tab0,
                                          __m512i tab1, T* __restrict__ y, int64_t* __restrict__ yi) {
  constexpr int L = 64 / sizeof(T);
  using V = decltype(mload(xp, 0));
  V acc[NV];
  __m512i tn[NV];
  for (int k = 0; k < NV; ++k) {
    acc[k] = mload(xp + off[0] + c + k * L, m);
    tn[k] = _mm512_setzero_si512();
  }
  for (int64_t t = 1; t < nt; ++t) {
    const T* r = xp + off[t] + c;
    const __m512i tt = _mm512_set1_epi32(static_cast<int32_t>(t));
    for (int k = 0; k < NV; ++k) {
      const V v = mload(r + k * L, m);
      __mmask16 take;
      if constexpr (sizeof(T) == 4) {
        take = _mm512_cmp_ps_mask(v, acc[k], _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        acc[k] = _mm512_mask_mov_ps(acc[k], take, v);
      } else {
        const __mmask8 t8 = _mm512_cmp_pd_mask(v, acc[k], _CMP_GT_OQ) | _mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q);
        acc[k] = _mm512_mask_mov_pd(acc[k], t8, v);
        take = t8;
      }
      tn[k] = _mm512_mask_mov_epi32(tn[k], take, tt);
    }
  }
  for (int k = 0; k < NV; ++k) {
    const __m512i id = _mm512_permutex2var_epi32(tab0, tn[k], tab1);
    if constexpr (sizeof(T) == 4) {
      _mm512_mask_storeu_ps(y + c + k * L, static_cast<__mmask16>(m), acc[k]);
      _mm512_mask_storeu_epi64(yi + c + k * L, static_cast<__mmask8>(m & 0xff),
                               _mm512_cvtepi32_epi64(_mm512_castsi512_si256(id)));
      _mm512_mask_storeu_epi64(yi + c + k * L + 8, static_cast<__mmask8>(m >> 8),
                               _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(id, 1)));
    } else {
      _mm512_mask_storeu_pd(y + c + k * L, static_cast<__mmask8>(m), acc[k]);
      _mm512_mask_storeu_epi64(yi + c + k * L, static_cast<__mmask8>(m),
                               _mm512_cvtepi32_epi64(_mm512_castsi512_si256(id)));
    }
  }
}

template <typename T>
CNNEXT_TARGET_AVX512 void cl_pixel(const T* xp, int64_t C, const int64_t* off, const int32_t* tidx,
                                   int64_t nt, T* y, int64_t* yi) {
  constexpr int L = 64 / sizeof(T);
  const __m512i tab0 = _mm512_loadu_si512(tidx), tab1 = _mm512_loadu_si512(tidx + 16);
  const uint32_t full = lane_range(0, L);
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L) cl_block<T, 4>(xp, c, full, off, nt, tab0, tab1, y, yi);
  for (; c + L <= C; c += L) cl_block<T, 1>(xp, c, full, off, nt, tab0, tab1, y, yi);
  if (c < C) cl_block<T, 1>(xp, c, lane_range(0, C - c), off, nt, tab0, tab1, y, yi);
}

}  // namespace

bool max_pool2d_nchw_avx512_ok(const Pool2dParams& p, bool is_float) {
  if (!has_avx512f() || (p.SW != 1 && p.SW != 2)) return false;
  return !is_float || p.H * p.W < (int64_t(1) << 31) - (p.KW * p.DW + 64);
}

void max_pool2d_nchw_avx512(const float* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, float* y, int64_t* yi) {
  if (p.SW == 1)
    run<float, int32_t>(x, xn, xc, xh, p, y, yi, 16, plane_f32<1>);
  else
    run<float, int32_t>(x, xn, xc, xh, p, y, yi, 16, plane_f32<2>);
}

void max_pool2d_nchw_avx512(const double* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, double* y, int64_t* yi) {
  if (p.SW == 1)
    run<double, int64_t>(x, xn, xc, xh, p, y, yi, 8, plane_f64<1>);
  else
    run<double, int64_t>(x, xn, xc, xh, p, y, yi, 8, plane_f64<2>);
}

bool max_pool2d_cl_avx512_ok(const Pool2dParams& p) {
  return has_avx512f() && p.KH * p.KW <= 32 && p.H * p.W < (int64_t(1) << 31);
}

void max_pool2d_cl_pixel_avx512(const float* xp, int64_t C, const int64_t* off,
                                const int32_t* tidx, int64_t nt, float* y, int64_t* yi) {
  cl_pixel<float>(xp, C, off, tidx, nt, y, yi);
}

void max_pool2d_cl_pixel_avx512(const double* xp, int64_t C, const int64_t* off,
                                const int32_t* tidx, int64_t nt, double* y, int64_t* yi) {
  cl_pixel<double>(xp, C, off, tidx, nt, y, yi);
}

#else  // no AVX-512 build: never selected

bool max_pool2d_nchw_avx512_ok(const Pool2dParams&, bool) { return false; }
void max_pool2d_nchw_avx512(const float*, int64_t, int64_t, int64_t, const Pool2dParams&, float*,
                            int64_t*) {}
void max_pool2d_nchw_avx512(const double*, int64_t, int64_t, int64_t, const Pool2dParams&,
                            double*, int64_t*) {}
bool max_pool2d_cl_avx512_ok(const Pool2dParams&) { return false; }
void max_pool2d_cl_pixel_avx512(const float*, int64_t, const int64_t*, const int32_t*, int64_t,
                                float*, int64_t*) {}
void max_pool2d_cl_pixel_avx512(const double*, int64_t, const int64_t*, const int32_t*, int64_t,
                                double*, int64_t*) {}

#endif

}  // namespace cpu
}  // namespace cnnext
