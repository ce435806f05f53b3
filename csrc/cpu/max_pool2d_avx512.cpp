// max_pool2d forward with indices on AVX-512 (csrc/cpu/vec.h's Vec<T, Isa::kAvx512>,
// one template for float and double; bfloat16 widened to float): NCHW rows with column strides 1 and 2 (any
// kernel, padding, dilation, ceil_mode), and channels_last pixels.
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

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"

#ifdef CNNEXT_VEC_X86
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace cnnext {
namespace cpu {

#ifdef CNNEXT_VEC_X86
namespace {

bool has_avx512() { return cpu_features().has(Isa::kAvx512); }

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

// One plane: L = V::size outputs per vector (16 float / 8 double), the indices in
// IntOf<T> lanes (int32 / int64) beside them.
template <typename T, int S>
CNNEXT_AVX512 void plane(const T* xp, int64_t xh, const Pool2dParams& p,
                         const RowPlan<vec::IntOf<T>>& plan, T* y, int64_t* yi) {
  using V = vec::Vec<T, Isa::kAvx512>;
  using I = vec::IntOf<T>;
  using VI = vec::Vec<I, Isa::kAvx512>;
  using M = typename V::Mask;
  constexpr int L = V::size;
  const V ninf = V::set1(-std::numeric_limits<T>::infinity());
  I steps[L];
  for (int j = 0; j < L; ++j) steps[j] = static_cast<I>(j * S);
  const VI iota = VI::load(steps);
  const int64_t W = p.W, OW = p.OW, KW = p.KW;
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    int64_t hlo, hhi;
    max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &hlo, &hhi);
    T* yr = y + oh * OW;
    int64_t* ir = yi + oh * OW;
    for (int64_t b = 0; b < plan.nb; ++b) {
      const int64_t ow0 = b * L;
      const M om = static_cast<M>(lane_range(0, std::min<int64_t>(L, OW - ow0)));
      V acc = ninf;
      VI idx = VI::load(plan.col_lo.data() + ow0) + VI::set1(static_cast<I>(hlo * W));
      const uint32_t* mk = plan.masks.data() + b * KW * 2;
      for (int64_t ih = hlo; ih < hhi; ih += p.DH) {
        const T* row = xp + ih * xh;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t c0 = ow0 * S - p.PW + kw * p.DW;
          V v = V::mask_load(ninf, static_cast<M>(mk[2 * kw]), row + c0);
          if constexpr (S == 2) v = V::even(v, V::mask_load(ninf, static_cast<M>(mk[2 * kw + 1]), row + c0 + L));
          const M take = V::takes(v, acc);
          acc = V::select(take, v, acc);
          idx = VI::select(take, iota + VI::set1(static_cast<I>(ih * W + c0)), idx);
        }
      }
      acc.mask_store(yr + ow0, om);
      idx.mask_store_i64(ir + ow0, om);
    }
  }
}

// Every plane of x, in parallel; S the column stride (1 or 2).
template <typename T, int S>
void run(const T* x, int64_t xn, int64_t xc, int64_t xh, const Pool2dParams& p, T* y, int64_t* yi) {
  const RowPlan<vec::IntOf<T>> plan(p, vec::Vec<T, Isa::kAvx512>::size);
  const int64_t OHW = p.OH * p.OW;
  at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.C, c = item % p.C;
      plane<T, S>(x + n * xn + c * xc, xh, p, plan, y + item * OHW, yi + item * OHW);
    }
  });
}

// bfloat16 planes: plane()'s scan on 16 float lanes, each tap's bfloat16 values widened
// to float exactly (the 16 bits moved to the top of a dword), the maximum stored back by
// the inverse move (bit-exact: it is one of the inputs). Stride 1: one masked load of 16
// values, widened; stride 2: one masked load of 32 values whose even elements sit in the
// low halves of the dwords, so the shift alone widens them. Lanes whose tap column lies
// outside the input (evens[b * KW + kw] for stride 2) are -inf, which never takes.
template <int S>
CNNEXT_AVX512 void plane_bf16(const uint16_t* xp, int64_t xh, const Pool2dParams& p,
                              const RowPlan<int32_t>& plan, const uint16_t* evens, uint16_t* y,
                              int64_t* yi) {
  using V = vec::Vec<float, Isa::kAvx512>;
  using VI = vec::Vec<int32_t, Isa::kAvx512>;
  using M = V::Mask;
  constexpr int L = 16;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int32_t steps[L];
  for (int j = 0; j < L; ++j) steps[j] = j * S;
  const VI iota = VI::load(steps);
  const int64_t W = p.W, OW = p.OW, KW = p.KW;
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    int64_t hlo, hhi;
    max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &hlo, &hhi);
    uint16_t* yr = y + oh * OW;
    int64_t* ir = yi + oh * OW;
    for (int64_t b = 0; b < plan.nb; ++b) {
      const int64_t ow0 = b * L;
      const M om = static_cast<M>(lane_range(0, std::min<int64_t>(L, OW - ow0)));
      V acc{ninf};
      VI idx = VI::load(plan.col_lo.data() + ow0) + VI::set1(static_cast<int32_t>(hlo * W));
      const uint32_t* mk = plan.masks.data() + b * KW * 2;
      const uint16_t* ev = evens + b * KW;
      for (int64_t ih = hlo; ih < hhi; ih += p.DH) {
        const uint16_t* row = xp + ih * xh;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t c0 = ow0 * S - p.PW + kw * p.DW;
          __m512 w;
          M valid;
          if constexpr (S == 1) {
            valid = static_cast<M>(mk[2 * kw]);
            const __m512i raw = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(valid), row + c0);
            w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
          } else {
            valid = static_cast<M>(ev[kw]);
            const __mmask32 lm = static_cast<__mmask32>(mk[2 * kw] | (mk[2 * kw + 1] << 16));
            w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_maskz_loadu_epi16(lm, row + c0), 16));
          }
          const V v{_mm512_mask_blend_ps(valid, ninf, w)};
          const M take = V::takes(v, acc);
          acc = V::select(take, v, acc);
          idx = VI::select(take, iota + VI::set1(static_cast<int32_t>(ih * W + c0)), idx);
        }
      }
      _mm512_mask_cvtepi32_storeu_epi16(yr + ow0, om, _mm512_srli_epi32(_mm512_castps_si512(acc.v), 16));
      idx.mask_store_i64(ir + ow0, om);
    }
  }
}

template <int S>
void run_bf16(const uint16_t* x, int64_t xn, int64_t xc, int64_t xh, const Pool2dParams& p,
              uint16_t* y, int64_t* yi) {
  const RowPlan<int32_t> plan(p, 16);
  // Stride 2: lane j of (b, kw) reads column c0 + 2j, bit 2j of the 32-lane load mask.
  std::vector<uint16_t> evens(plan.nb * p.KW, 0);
  if (S == 2)
    for (int64_t i = 0; i < plan.nb * p.KW; ++i) {
      const uint32_t m = plan.masks[2 * i] | (plan.masks[2 * i + 1] << 16);
      uint16_t e = 0;
      for (int j = 0; j < 16; ++j) e |= static_cast<uint16_t>(((m >> (2 * j)) & 1u) << j);
      evens[i] = e;
    }
  const int64_t OHW = p.OH * p.OW;
  at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.C, c = item % p.C;
      plane_bf16<S>(x + n * xn + c * xc, xh, p, plan, evens.data(), y + item * OHW, yi + item * OHW);
    }
  });
}

// channels_last, one output pixel: channels [0, C) of the taps at xp + off[t], t < nt
// (1 <= nt <= 32), in scan order; the winning tap number per lane (int32) becomes the
// flat index through a 32-entry table. Blocks of NV vectors, then single vectors, the
// last one masked (m: its lanes).
using Taps = vec::Vec<int32_t, Isa::kAvx512>;

template <typename T, int NV>
CNNEXT_AVX512 inline void cl_block(const T* __restrict__ xp, int64_t c, uint32_t m,
                                   const int64_t* off, int64_t nt, Taps tab0, Taps tab1,
                                   T* __restrict__ y, int64_t* __restrict__ yi) {
  using V = vec::Vec<T, Isa::kAvx512>;
  using M = typename V::Mask;
  constexpr int L = V::size;
  const M lanes = static_cast<M>(m);
  V acc[NV];
  Taps tn[NV];
  for (int k = 0; k < NV; ++k) {
    acc[k] = V::maskz_load(lanes, xp + off[0] + c + k * L);
    tn[k] = Taps::zero();
  }
  for (int64_t t = 1; t < nt; ++t) {
    const T* r = xp + off[t] + c;
    const Taps tt = Taps::set1(static_cast<int32_t>(t));
    for (int k = 0; k < NV; ++k) {
      const V v = V::maskz_load(lanes, r + k * L);
      const M take = V::takes(v, acc[k]);
      acc[k] = V::select(take, v, acc[k]);
      tn[k] = Taps::select(take, tt, tn[k]);  // double: the low 8 of the 16 int32 lanes
    }
  }
  for (int k = 0; k < NV; ++k) {
    const Taps id = Taps::lookup(tab0, tn[k], tab1);
    acc[k].mask_store(y + c + k * L, lanes);
    if constexpr (L == Taps::size) {
      id.mask_store_i64(yi + c + k * L, lanes);
    } else {
      id.low_i64().mask_store_i64(yi + c + k * L, lanes);
    }
  }
}

template <typename T>
CNNEXT_AVX512 void cl_pixel(const T* xp, int64_t C, const int64_t* off, const int32_t* tidx,
                            int64_t nt, T* y, int64_t* yi) {
  constexpr int L = vec::Vec<T, Isa::kAvx512>::size;
  const Taps tab0 = Taps::load(tidx), tab1 = Taps::load(tidx + 16);
  const uint32_t full = lane_range(0, L);
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L) cl_block<T, 4>(xp, c, full, off, nt, tab0, tab1, y, yi);
  for (; c + L <= C; c += L) cl_block<T, 1>(xp, c, full, off, nt, tab0, tab1, y, yi);
  if (c < C) cl_block<T, 1>(xp, c, lane_range(0, C - c), off, nt, tab0, tab1, y, yi);
}

}  // namespace

bool max_pool2d_nchw_avx512_ok(const Pool2dParams& p, bool is_float) {
  if (!has_avx512() || (p.SW != 1 && p.SW != 2)) return false;
  return !is_float || p.H * p.W < (int64_t(1) << 31) - (p.KW * p.DW + 64);
}

void max_pool2d_nchw_avx512(const float* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, float* y, int64_t* yi) {
  (p.SW == 1 ? run<float, 1> : run<float, 2>)(x, xn, xc, xh, p, y, yi);
}

void max_pool2d_nchw_avx512(const double* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, double* y, int64_t* yi) {
  (p.SW == 1 ? run<double, 1> : run<double, 2>)(x, xn, xc, xh, p, y, yi);
}

void max_pool2d_nchw_avx512_bf16(const uint16_t* x, int64_t xn, int64_t xc, int64_t xh,
                                 const Pool2dParams& p, uint16_t* y, int64_t* yi) {
  (p.SW == 1 ? run_bf16<1> : run_bf16<2>)(x, xn, xc, xh, p, y, yi);
}

bool max_pool2d_cl_avx512_ok(const Pool2dParams& p) {
  return has_avx512() && p.KH * p.KW <= 32 && p.H * p.W < (int64_t(1) << 31);
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
void max_pool2d_nchw_avx512_bf16(const uint16_t*, int64_t, int64_t, int64_t, const Pool2dParams&,
                                 uint16_t*, int64_t*) {}
bool max_pool2d_cl_avx512_ok(const Pool2dParams&) { return false; }
void max_pool2d_cl_pixel_avx512(const float*, int64_t, const int64_t*, const int32_t*, int64_t,
                                float*, int64_t*) {}
void max_pool2d_cl_pixel_avx512(const double*, int64_t, const int64_t*, const int32_t*, int64_t,
                                double*, int64_t*) {}

#endif

}  // namespace cpu
}  // namespace cnnext
