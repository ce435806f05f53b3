// max_pool2d forward (with indices) on the CPU.
//
// Forward: where the CPU has AVX-512, NCHW rows (float, double, bfloat16) with column stride 1 or 2 and
// channels_last windows of at most 32 taps take the kernels of max_pool2d_avx512.cpp.
// Otherwise three loops, each parallel (at::parallel_for) over independent outputs:
//   - NCHW planes (input rows contiguous, output contiguous): one plane at a time,
//     one output row at a time, split in two passes. The vertical pass takes, for
//     every input column, the maximum over the window's rows (torch's rule in scan
//     order); it reads the row with the stride of the pooling, one "phase" array per
//     residue of the column modulo the stride, so that the horizontal pass, which
//     combines the window's columns, reads each tap as one contiguous run. The
//     horizontal pass chooses between candidates by value and flat index
//     (max_pool_prefers), which gives torch's row-major first maximum / last NaN.
//     Indices are carried in the value type (exact for planes below 2^24 elements in
//     float32; larger planes take the generic loop). The loops are plain, branch-free
//     C++ that the compiler vectorises, built for AVX-512, AVX2 and baseline x86-64
//     (target attributes, picked per call from cpu_features()).
//   - channels_last (channels contiguous, output channels_last): per output pixel, the
//     taps in scan order, on blocks of channels in AVX2 registers (values and the tap
//     number per lane; indices looked up once per pixel), scalar tail / fallback.
//   - anything else: a scalar loop through the strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>

#include <limits>
#include <type_traits>
#include <vector>

#include "common/pool2d.h"
#include "cpu/max_pool2d.h"
#include "cpu/max_pool2d_avx512.h"
#include "cpu/cpu_features.h"
#include "cpu/max_pool2d_common.h"
#include "cpu/output_alloc.h"
#include "cpu/vec.h"
#include "paths.h"
#include "tensors.h"


namespace cnnext {
namespace cpu {
namespace {

CNNEXT_PATH_NEEDS(kAvx512Rows, "max_pool2d.fwd.avx512_rows", kAvx512);
CNNEXT_PATH_NEEDS(kAvx512RowsBf16, "max_pool2d.fwd.avx512_rows_bf16", kAvx512);
CNNEXT_PATH(kNchwRows, "max_pool2d.fwd.nchw_rows");
CNNEXT_PATH_NEEDS(kClAvx512, "max_pool2d.fwd.channels_last_avx512", kAvx512);
CNNEXT_PATH_NEEDS(kClAvx2, "max_pool2d.fwd.channels_last_avx2", kAvx2);
CNNEXT_PATH(kClScalar, "max_pool2d.fwd.channels_last_scalar");
CNNEXT_PATH(kGeneric, "max_pool2d.fwd.generic");

// ---- NCHW row kernels -------------------------------------------------------------

// The row kernels are compiled without -ftrapping-math (GCC's default): under it GCC may
// not evaluate a floating-point operation or comparison the source does not evaluate on
// every path, so it left the selects below as scalar compares and branches (an
// unpredictable branch per element on random data: 3x3/2 over 4 x 64 x 48 x 48 took 7 ms
// on a Zen 3, as long as stock's scalar loop). No result changes: the kernels compute
// the same values; only FP exception flags, which nothing here reads, may differ.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// Storage to compare type and back. bfloat16 through its bits (c10's conversions were
// calls, not inlined under these options, and kept the bfloat16 loops scalar): a bfloat16
// is the top half of its float, and every value stored is one of the inputs (a maximum,
// or -inf for an empty window), so dropping the low half on the way back is exact.
template <typename T, typename S>
inline __attribute__((always_inline)) T load_as(S v) {
  return static_cast<T>(v);
}
template <>
inline __attribute__((always_inline)) float load_as<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename S, typename T>
inline __attribute__((always_inline)) S store_as(T v) {
  return static_cast<S>(v);
}
template <>
inline __attribute__((always_inline)) c10::BFloat16 store_as<c10::BFloat16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return c10::BFloat16(uint16_t(bits >> 16), c10::BFloat16::from_bits());
}

// Vertical pass over one phase: v[j], vi[j] = maximum (torch's rule) and its flat index
// over the rows x + ih * W, ih = lo, lo + d, ... < hi, of the columns base + s * j,
// j in [0, n). fi[j] holds the column index of entry j (as T).
template <typename T, typename S>
inline __attribute__((always_inline)) void vertical_body(const S* __restrict__ x, int64_t W,
                                                         int64_t base, int64_t s, int64_t n,
                                                         int64_t lo, int64_t hi, int64_t d,
                                                         const T* __restrict__ fi,
                                                         T* __restrict__ v, T* __restrict__ vi) {
  const S* row = x + lo * W + base;
  const T off0 = T(lo * W);
  for (int64_t j = 0; j < n; ++j) {
    v[j] = load_as<T>(row[j * s]);
    vi[j] = fi[j] + off0;
  }
  for (int64_t ih = lo + d; ih < hi; ih += d) {
    row = x + ih * W + base;
    const T off = T(ih * W);
    for (int64_t j = 0; j < n; ++j) {
      const T val = load_as<T>(row[j * s]);
      const bool take = (val > v[j]) | (val != val);
      v[j] = take ? val : v[j];
      vi[j] = take ? fi[j] + off : vi[j];
    }
  }
}

// Horizontal pass, one tap: acc / acci (n entries) take c / ci where max_pool_prefers.
template <typename T>
inline __attribute__((always_inline)) void horizontal_body(const T* __restrict__ c,
                                                           const T* __restrict__ ci, int64_t n,
                                                           T* __restrict__ acc,
                                                           T* __restrict__ acci) {
  for (int64_t j = 0; j < n; ++j) {
    const T a = acc[j], ai = acci[j], v = c[j], vi = ci[j];
    // A number v beats a by value, or ties it with a lower index; a NaN v beats a number a,
    // and a NaN a when its index is higher (both comparisons on v are false for a NaN v,
    // so one expression of bitwise ops covers both: GCC vectorises it, not a ?: of bools).
    const bool take = (v > a) | ((v == a) & (vi < ai)) | ((v != v) & ((a == a) | (vi > ai)));
    acc[j] = take ? v : a;
    acci[j] = take ? vi : ai;
  }
}

template <typename T, typename S>
inline __attribute__((always_inline)) void store_body(const T* __restrict__ acc,
                                                      const T* __restrict__ acci, int64_t n,
                                                      S* __restrict__ y, int64_t* __restrict__ yi) {
  for (int64_t j = 0; j < n; ++j) {
    y[j] = store_as<S>(acc[j]);
    yi[j] = static_cast<int64_t>(acci[j]);
  }
}

template <typename T, typename S>
inline __attribute__((always_inline)) void vertical_any(const S* x, int64_t W, int64_t base,
                                                        int64_t s, int64_t n, int64_t lo,
                                                        int64_t hi, int64_t d, const T* fi, T* v,
                                                        T* vi) {
  if (s == 1)
    vertical_body<T, S>(x, W, base, 1, n, lo, hi, d, fi, v, vi);
  else if (s == 2)
    vertical_body<T, S>(x, W, base, 2, n, lo, hi, d, fi, v, vi);
  else
    vertical_body<T, S>(x, W, base, s, n, lo, hi, d, fi, v, vi);
}

// The three row kernels compiled for one instruction set (ISA: a target attribute or
// nothing) from the bodies above, which the compiler vectorises for it.
#define CNNEXT_ROW_KERNEL_SET(NAME, ISA)                                                   \
  template <typename T, typename S>                                                        \
  struct NAME {                                                                            \
    ISA static void vertical(const S* x, int64_t W, int64_t base, int64_t s, int64_t n,    \
                             int64_t lo, int64_t hi, int64_t d, const T* fi, T* v, T* vi) { \
      vertical_any<T, S>(x, W, base, s, n, lo, hi, d, fi, v, vi);                          \
    }                                                                                      \
    ISA static void horizontal(const T* c, const T* ci, int64_t n, T* acc, T* acci) {      \
      horizontal_body<T>(c, ci, n, acc, acci);                                             \
    }                                                                                      \
    ISA static void store(const T* acc, const T* acci, int64_t n, S* y, int64_t* yi) {     \
      store_body<T, S>(acc, acci, n, y, yi);                                               \
    }                                                                                      \
  };
CNNEXT_ROW_KERNEL_SET(RowsBaseline, )
#if defined(__x86_64__) && defined(__GNUC__)
CNNEXT_ROW_KERNEL_SET(RowsAvx2, CNNEXT_TARGET("avx2"))
CNNEXT_ROW_KERNEL_SET(RowsAvx512, CNNEXT_TARGET("avx512f"))
#endif
#undef CNNEXT_ROW_KERNEL_SET
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The row kernels of one call, for the widest instruction set cpu_features() allows:
// values of storage type S compared in T (float for float16 / bfloat16, which convert
// exactly, so the maxima and indices are exact).
template <typename T, typename S>
struct RowKernels {
  decltype(&RowsBaseline<T, S>::vertical) vertical = &RowsBaseline<T, S>::vertical;
  decltype(&RowsBaseline<T, S>::horizontal) horizontal = &RowsBaseline<T, S>::horizontal;
  decltype(&RowsBaseline<T, S>::store) store = &RowsBaseline<T, S>::store;
  RowKernels() {
#if defined(__x86_64__) && defined(__GNUC__)
    const CpuFeatures& f = cpu_features();
    if (f.avx512f) {
      vertical = &RowsAvx512<T, S>::vertical;
      horizontal = &RowsAvx512<T, S>::horizontal;
      store = &RowsAvx512<T, S>::store;
    } else if (f.avx2) {
      vertical = &RowsAvx2<T, S>::vertical;
      horizontal = &RowsAvx2<T, S>::horizontal;
      store = &RowsAvx2<T, S>::store;
    }
#endif
  }
};

template <typename S>
void forward_nchw(const at::Tensor& input, const Pool2dParams& p, at::Tensor& out,
                  at::Tensor& idx) {
  using T = at::opmath_type<S>;  // the compare type (float for float16 / bfloat16)
  const S* x = input.const_data_ptr<S>();
  S* y = out.mutable_data_ptr<S>();
  int64_t* yi = idx.mutable_data_ptr<int64_t>();
  const Strides4 xs = strides_of(input);
  const int64_t planes = p.N * p.C, OHW = p.OH * p.OW;
  const int64_t s = p.SW;
  // Padded row: position u = iw + PW; output ow's taps at u = ow * s + kw * DW.
  const int64_t span = (p.OW - 1) * s + (p.KW - 1) * p.DW + 1;
  const int64_t L = (span + s - 1) / s + 1;  // entries per phase array
  const EmptyWindows empty(p);
  const RowKernels<T, S> rk;
  // Per phase r: entries j with iw = r + s * j - PW inside [0, W) are [jlo, jhi).
  std::vector<int64_t> jlo(s), jhi(s);
  for (int64_t r = 0; r < s; ++r) {
    const int64_t a = p.PW - r;  // iw >= 0  <=>  j >= a / s (rounded up)
    jlo[r] = a <= 0 ? 0 : (a + s - 1) / s;
    const int64_t b = p.W - 1 + p.PW - r;  // iw <= W - 1
    jhi[r] = b < 0 ? 0 : std::min<int64_t>(b / s + 1, L);
    if (jlo[r] > jhi[r]) jlo[r] = jhi[r];
  }
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    // Phase arrays of values and indices (padding: -inf with index +inf, which loses
    // every tie), column indices, and the accumulators of one output row.
    std::vector<T> pv(s * L, neg_inf<T>()), pi(s * L, std::numeric_limits<T>::infinity());
    std::vector<T> fi(s * L), acc(p.OW), acci(p.OW);
    for (int64_t r = 0; r < s; ++r)
      for (int64_t j = 0; j < L; ++j) fi[r * L + j] = T(r + s * j - p.PW);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / p.C, c = plane % p.C;
      const S* xp = x + n * xs.n + c * xs.c;
      S* yp = y + plane * OHW;
      int64_t* ip = yi + plane * OHW;
      for (int64_t oh = 0; oh < p.OH; ++oh) {
        S* yr = yp + oh * p.OW;
        int64_t* ir = ip + oh * p.OW;
        if (empty.row_empty[oh]) {
          for (int64_t ow = 0; ow < p.OW; ++ow) {
            yr[ow] = neg_inf<S>();
            ir[ow] = empty.row_lo[oh] * p.W + empty.col_lo[ow];
          }
          continue;
        }
        int64_t lo, hi;
        max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &lo, &hi);
        for (int64_t r = 0; r < s; ++r) {
          const int64_t j0 = jlo[r], n_r = jhi[r] - j0;
          if (n_r <= 0) continue;
          rk.vertical(xp, p.W, r + s * j0 - p.PW, s, n_r, lo, hi, p.DH, fi.data() + r * L + j0,
                   pv.data() + r * L + j0, pi.data() + r * L + j0);
        }
        for (int64_t kw = 0; kw < p.KW; ++kw) {
          const int64_t u = kw * p.DW, r = u % s, q = u / s;
          const T* cv = pv.data() + r * L + q;
          const T* ci = pi.data() + r * L + q;
          if (kw == 0) {
            std::copy(cv, cv + p.OW, acc.data());
            std::copy(ci, ci + p.OW, acci.data());
          } else {
            rk.horizontal(cv, ci, p.OW, acc.data(), acci.data());
          }
        }
        if (empty.any_col) {
          for (int64_t ow = 0; ow < p.OW; ++ow) {
            if (empty.col_empty[ow]) {
              acc[ow] = neg_inf<T>();
              acci[ow] = T(lo * p.W + empty.col_lo[ow]);
            }
          }
        }
        rk.store(acc.data(), acci.data(), p.OW, yr, ir);
      }
    }
  });
}

// channels_last: channels contiguous in input and output. Per output pixel, the
// window's taps in scan order, on blocks of channels held in registers: the running
// maximum and the number of the tap it came from (in the value type, the same lane
// width, so the selects vectorise; exact as the tap count is checked below 2^digits);
// the flat index is looked up from the tap number once per pixel and channel.
//
// AVX2 (csrc/cpu/vec.h's Vec<T, Isa::kAvx2>) where cpu_features() allows, else scalar.

// The scalar loop over channels [c, C).
template <typename T>
void cl_pixel_scalar(const T* __restrict__ xp, int64_t c, int64_t C, const int64_t* off,
                     const int64_t* tidx, int64_t ntaps, T* __restrict__ y,
                     int64_t* __restrict__ yi) {
  for (; c < C; ++c) {
    T best = xp[off[0] + c];
    int64_t bt = 0;
    for (int64_t t = 1; t < ntaps; ++t) {
      const T v = xp[off[t] + c];
      if (max_pool_takes(v, best)) {
        best = v;
        bt = t;
      }
    }
    y[c] = best;
    yi[c] = tidx[bt];
  }
}

#ifdef CNNEXT_VEC_X86
// NV vectors of channels from c: y = maximum over the taps (torch's rule in scan
// order), the tap number per lane; then the index looked up per channel. Starting from
// tap 0's value is torch's start from -inf: tap 0 is taken when it is greater than
// -inf or NaN, and a -inf keeps -inf with tap 0's index either way.
template <typename T, int NV>
CNNEXT_AVX2 inline __attribute__((always_inline)) void cl_block_avx2(const T* __restrict__ xp, int64_t c, const int64_t* off,
                                      const int64_t* tidx, int64_t ntaps, T* __restrict__ y,
                                      int64_t* __restrict__ yi) {
  using V = vec::Vec<T, Isa::kAvx2>;
  constexpr int L = V::size;
  V acc[NV], tn[NV];
  for (int k = 0; k < NV; ++k) {
    acc[k] = V::load(xp + off[0] + c + k * L);
    tn[k] = V::zero();
  }
  for (int64_t t = 1; t < ntaps; ++t) {
    const T* r = xp + off[t] + c;
    const V tt = V::set1(T(t));
    for (int k = 0; k < NV; ++k) {
      const V v = V::load(r + k * L);
      const typename V::Mask take = V::takes(v, acc[k]);
      acc[k] = V::select(take, v, acc[k]);
      tn[k] = V::select(take, tt, tn[k]);
    }
  }
  T tap[NV * L];
  for (int k = 0; k < NV; ++k) {
    acc[k].store(y + c + k * L);
    tn[k].store(tap + k * L);
  }
  for (int b = 0; b < NV * L; ++b) yi[c + b] = tidx[static_cast<int64_t>(tap[b])];
}

template <typename T>
CNNEXT_AVX2 void cl_pixel_avx2(const T* __restrict__ xp, int64_t C, const int64_t* off,
                               const int64_t* tidx, int64_t ntaps, T* __restrict__ y,
                               int64_t* __restrict__ yi) {
  constexpr int L = vec::Vec<T, Isa::kAvx2>::size;
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L) cl_block_avx2<T, 4>(xp, c, off, tidx, ntaps, y, yi);
  for (; c + L <= C; c += L) cl_block_avx2<T, 1>(xp, c, off, tidx, ntaps, y, yi);
  cl_pixel_scalar<T>(xp, c, C, off, tidx, ntaps, y, yi);
}
#endif

// One output pixel: C channels at xp + off[t] (t < ntaps, ntaps >= 1); tap t has flat
// index tidx[t].
template <typename T>
void cl_pixel(bool avx2, const T* xp, int64_t C, const int64_t* off, const int64_t* tidx,
              int64_t ntaps, T* y, int64_t* yi) {
#ifdef CNNEXT_VEC_X86
  if (avx2) return cl_pixel_avx2<T>(xp, C, off, tidx, ntaps, y, yi);
#endif
  cl_pixel_scalar<T>(xp, 0, C, off, tidx, ntaps, y, yi);
}


template <typename T>
void forward_channels_last(const at::Tensor& input, const Pool2dParams& p, at::Tensor& out,
                           at::Tensor& idx) {
  const T* x = input.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  int64_t* yi = idx.mutable_data_ptr<int64_t>();
  const Strides4 xs = strides_of(input);
  constexpr bool kWide = std::is_same_v<T, float> || std::is_same_v<T, double>;
  const bool avx2 = kWide && cpu_features().avx2_fma();
  const bool avx512 = kWide && max_pool2d_cl_avx512_ok(p);
  (avx512 ? kClAvx512 : avx2 ? kClAvx2 : kClScalar).hit();
  at::parallel_for(0, p.N * p.OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> off(p.KH * p.KW), id(p.KH * p.KW);
    int32_t id32[32] = {};
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.OH, oh = item % p.OH;
      int64_t hlo, hhi;
      max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &hlo, &hhi);
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        int64_t wlo, whi;
        max_window(ow, p.W, p.KW, p.SW, p.PW, p.DW, &wlo, &whi);
        int64_t nt = 0;
        for (int64_t ih = hlo; ih < hhi; ih += p.DH)
          for (int64_t iw = wlo; iw < whi; iw += p.DW, ++nt) {
            off[nt] = ih * xs.h + iw * xs.w;
            id[nt] = ih * p.W + iw;
          }
        const int64_t o = ((n * p.OH + oh) * p.OW + ow) * p.C;
        if (nt == 0) {  // no tap inside the input: -inf, torch's index
          for (int64_t c = 0; c < p.C; ++c) {
            y[o + c] = neg_inf<T>();
            yi[o + c] = hlo * p.W + wlo;
          }
          continue;
        }
        if constexpr (kWide) {
          if (avx512) {
            for (int64_t t = 0; t < nt; ++t) id32[t] = static_cast<int32_t>(id[t]);
            max_pool2d_cl_pixel_avx512(x + n * xs.n, p.C, off.data(), id32, nt, y + o, yi + o);
            continue;
          }
          cl_pixel<T>(avx2, x + n * xs.n, p.C, off.data(), id.data(), nt, y + o, yi + o);
        } else {
          cl_pixel_scalar<T>(x + n * xs.n, 0, p.C, off.data(), id.data(), nt, y + o, yi + o);
        }
      }
    }
  });
}

// Any strides: one output row of one plane at a time, scalar.
template <typename T>
void forward_generic(const at::Tensor& input, const Pool2dParams& p, at::Tensor& out,
                     at::Tensor& idx) {
  const T* x = input.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  int64_t* yi = idx.mutable_data_ptr<int64_t>();
  const Strides4 xs = strides_of(input), ys = strides_of(out), is = strides_of(idx);
  at::parallel_for(0, p.N * p.C * p.OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t oh = item % p.OH, nc = item / p.OH, c = nc % p.C, n = nc / p.C;
      const T* xp = x + n * xs.n + c * xs.c;
      int64_t hlo, hhi;
      max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &hlo, &hhi);
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        int64_t wlo, whi;
        max_window(ow, p.W, p.KW, p.SW, p.PW, p.DW, &wlo, &whi);
        T best = neg_inf<T>();
        int64_t best_i = hlo * p.W + wlo;
        for (int64_t ih = hlo; ih < hhi; ih += p.DH)
          for (int64_t iw = wlo; iw < whi; iw += p.DW) {
            const T val = xp[ih * xs.h + iw * xs.w];
            if (max_pool_takes(val, best)) {
              best = val;
              best_i = ih * p.W + iw;
            }
          }
        y[n * ys.n + c * ys.c + oh * ys.h + ow * ys.w] = best;
        yi[n * is.n + c * is.c + oh * is.h + ow * is.w] = best_i;
      }
    }
  });
}

// The AVX-512 rows kernel (float, double, bfloat16): whether it ran.
template <typename T>
bool avx512_rows(const at::Tensor& input, const Pool2dParams& p, at::Tensor& out, at::Tensor& idx) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (input.stride(3) == 1 && out.is_contiguous() && max_pool2d_nchw_avx512_ok(p, true)) {
      kAvx512RowsBf16.hit();
      max_pool2d_nchw_avx512_bf16(reinterpret_cast<const uint16_t*>(input.const_data_ptr<T>()),
                                  input.stride(0), input.stride(1), input.stride(2), p,
                                  reinterpret_cast<uint16_t*>(out.mutable_data_ptr<T>()),
                                  idx.mutable_data_ptr<int64_t>());
      return true;
    }
  }
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (input.stride(3) == 1 && out.is_contiguous() &&
        max_pool2d_nchw_avx512_ok(p, std::is_same_v<T, float>)) {
      kAvx512Rows.hit();
      max_pool2d_nchw_avx512(input.const_data_ptr<T>(), input.stride(0), input.stride(1),
                             input.stride(2), p, out.mutable_data_ptr<T>(),
                             idx.mutable_data_ptr<int64_t>());
      return true;
    }
  }
  return false;
}

bool is_nchw_rows(const at::Tensor& t) { return t.stride(3) == 1 && t.stride(2) == t.size(3); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input,
                                                      const Pool2dParams& p,
                                                      at::MemoryFormat out_format) {
  at::Tensor out = empty_output({p.N, p.C, p.OH, p.OW}, input.options().memory_format(out_format));
  at::Tensor idx = empty_output({p.N, p.C, p.OH, p.OW},
                             input.options().dtype(at::kLong).memory_format(out_format));
  if (out.numel() == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnext_max_pool2d_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const bool index_exact =
        p.H * p.W < (int64_t(1) << std::numeric_limits<opmath_t>::digits);
    if (avx512_rows<scalar_t>(input, p, out, idx)) {
    } else if (is_nchw_rows(input) && out.is_contiguous() && index_exact &&
               p.SW <= p.W + 64 && (p.KW - 1) * p.DW <= p.W + 64) {
      // (forward_nchw's phase arrays hold about span + 2 * stride entries, span the
      // padded row's used part: huge strides, kernels or padding, whose few windows
      // need no phases, go generic instead of allocating by the stride.)
      kNchwRows.hit();
      forward_nchw<scalar_t>(input, p, out, idx);
    } else if (out_format == at::MemoryFormat::ChannelsLast && input.stride(1) == 1 &&
               input.stride(3) == p.C && input.stride(2) == p.W * p.C &&
               p.KH * p.KW < (int64_t(1) << std::numeric_limits<opmath_t>::digits)) {
      forward_channels_last<scalar_t>(input, p, out, idx);
    } else {
      kGeneric.hit();
      forward_generic<scalar_t>(input, p, out, idx);
    }
  });
  return {out, idx};
}
}  // namespace cpu
}  // namespace cnnext
