// bfloat16 convolutions on AVX512_BF16, on vdpbf16ps (each float lane adds the products of
// one pair of bfloat16 values: two steps of K per instruction), accumulating in float; each
// output is rounded to bfloat16 once, after the bias and the ReLU. Two families:
//   - the direct kernels (direct_forward, direct_weight_backward, below "The direct
//     forward" / "The direct weight gradient"): output channels in the vector lanes, input
//     pairs broadcast from a padded copy of the input, nothing packed per tile; they take
//     most shapes first (output channels >= 16 a group);
//   - the implicit-im2col GEMM described next, for what they leave (1x1 kernels, a few odd
//     channels, column strides past 2, thin groups) and the test hook's comparisons.
//
//   out[n, g*Og + o, q] = sum_k W[g, o, k] * X_n[k, q],   k = (c, kh, kw), q = (oh, ow)
//
// A (the weight, Og x K per group) is packed once per call in panels of kMR rows, K in
// pairs: a[((g * panels + i / kMR) * Kp + kp) * kMR + i % kMR] = the 32-bit pair
// (W[o, 2kp], W[o, 2kp + 1]), zero beyond Og and K. B (the im2col of one sample) is packed
// per work item, one panel of kNR = 32 output pixels (numbered across samples, so that a
// panel may span the end of one sample's map and the start of the next):
// b[kp * 64 + 2j + h] = X[2kp + h, q0 + j],
// built row by row of the im2col (a masked 512-bit load per output row touched where the
// stride is 1; two and the even lanes where it is 2; a scalar gather otherwise) and
// interleaved in pairs (vpermt2w). The kernel keeps a kMR x 32 tile of float accumulators
// in 16 registers over all of K. For stride-1 kernels with an even number of channels a
// group, K is ordered (tap, channel pair) instead and B read as dwords from a channel-pair
// copy of the input (pack_b_pairs).
//
// Work items are (group, pixel panel): each thread packs its B panel once and runs
// every A panel over it. The result does not depend on the thread count.
//
// Used where the CPU has AVX512_BF16 (cpu_features(), so CNNEXT_CPU_ISA=avx2 turns it off)
// and the output is contiguous (NCHW); elsewhere conv2d_half.cpp runs the float kernels.
#include "cpu/conv2d_bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/derived_cache.h"
#include "cpu/scratch.h"
#include "cpu/vec.h"
#include "paths.h"
#include "tensors.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CNNEXT_BF16_GEMM 1
#endif

namespace cnnext {
namespace cpu {
namespace bf16 {
namespace {

CNNEXT_PATH_NEEDS(kFwdBf16Gemm, "conv2d.fwd.bf16_gemm", kAvx512Bf16);
CNNEXT_PATH_NEEDS(kFwdBf16Pairs, "conv2d.fwd.bf16_gemm_pairs", kAvx512Bf16);

// Whether the direct forward may run (the test hook _set_bf16_direct turns it off, for
// comparisons with the GEMM path).
std::atomic<bool> g_direct{true};

constexpr int64_t kMR = 8;   // rows (output channels) per A panel
constexpr int64_t kNR = 32;  // columns (output pixels) per B panel: two zmm of 16 floats

#ifdef CNNEXT_BF16_GEMM
#define CNNEXT_BF16 CNNEXT_TARGET("avx512f,avx512bw,avx512vl,avx512bf16,fma,bmi2")

// vpermt2w indices of the even elements of two 32-element vectors (a stride-2 row).
alignas(64) constexpr uint16_t kEvenIdx[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                               22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                               44, 46, 48, 50, 52, 54, 56, 58, 60, 62};

// The output rows a panel of pixels [q0, q1) (q1 - q0 <= 32) touches, pixels numbered
// across samples (q = n * P + oh * OW + ow, q1 <= total), worked out once per panel (its
// integer divisions) and shared by every tap's im2col row: run r covers panel positions
// [lo[r], hi[r]), all of output row oh of sample n; xoff = n * xn (the sample's input);
// ih0 = oh * SH - PH; shift0 = the input column of position 0 for tap column 0:
// SW * (q0 - (n * P + oh * OW)) - PW. Segment s (one per sample touched) covers positions
// [slo[s], shi[s]) of sample sn[s], whose output pixel of position t is t - slo[s] + sq[s].
// With at most kMaxKW tap columns and column stride 1 or 2, mask[r][kw] is run r's load
// mask for tap column kw (stride 1: lanes; stride 2: the pairs of lanes of the two
// 32-element loads), and im2col_row only adds offsets.
constexpr int64_t kMaxKW = 8;
struct PanelRuns {
  int64_t q0 = 0, q1 = 0, n = 0, nseg = 0;
  bool masked = false;
  int64_t lo[kNR], hi[kNR], ih0[kNR], shift0[kNR], xoff[kNR];
  int64_t slo[kNR], shi[kNR], sn[kNR], sq[kNR];
  uint64_t mask[kNR][kMaxKW];
  PanelRuns() = default;
  // period (>= P, 0: P): the positions a sample spans; those past its P pixels (the
  // weight gradient's zero pixel after an odd P) read as zero.
  int64_t period = 0;
  PanelRuns(const Conv2dParams& p, int64_t q0_, int64_t total, int64_t xn, int64_t period_ = 0)
      : q0(q0_), q1(std::min(q0_ + kNR, total)) {
    const int64_t P = p.OH * p.OW;
    period = period_ ? period_ : P;
    for (int64_t q = q0; q < q1; ++n) {
      const int64_t smp = q / period, qq = q % period;
      if (qq >= P) {  // padding positions: no run
        q = std::min(q1, (smp + 1) * period);
        --n;
        continue;
      }
      const int64_t oh = qq / p.OW, ow = qq % p.OW;
      const int64_t e = std::min(q1, q + (p.OW - ow));
      if (nseg == 0 || sn[nseg - 1] != smp) {
        slo[nseg] = q - q0;
        sn[nseg] = smp;
        sq[nseg] = qq;
        ++nseg;
      }
      shi[nseg - 1] = e - q0;
      lo[n] = q - q0;
      hi[n] = e - q0;
      xoff[n] = smp * xn;
      ih0[n] = oh * p.SH - p.PH;
      shift0[n] = p.SW * (q0 - (smp * period + oh * p.OW)) - p.PW;
      q = e;
    }
    masked = p.KW <= kMaxKW && (p.SW == 1 || p.SW == 2);
    if (masked)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t kw = 0; kw < p.KW; ++kw) mask[r][kw] = lane_mask(p, r, shift0[r] + kw * p.DW);
  }
  // Run r's lanes whose input column (shift + SW * t) lies in [0, W): stride 1, bit t;
  // stride 2, bit 2t (the even elements of 64 loaded).
  uint64_t lane_mask(const Conv2dParams& p, int64_t r, int64_t shift) const {
    int64_t l, h;
    if (p.SW == 1) {
      l = std::max(lo[r], -shift);
      h = std::min(hi[r], p.W - shift);
    } else {
      l = std::max(lo[r], (-shift + 1) / 2 > 0 ? (-shift + 1) / 2 : int64_t(0));
      h = std::min(hi[r], (p.W - shift + 1) / 2);
    }
    if (l >= h) return 0;
    const uint32_t m = static_cast<uint32_t>(
        (h >= 32 ? ~uint64_t(0) : ((uint64_t(1) << h) - 1)) & ~((uint64_t(1) << l) - 1));
    if (p.SW == 1) return m;
    uint64_t spread = 0;  // bit t -> bit 2t
    for (uint32_t b = m; b; b &= b - 1) spread |= uint64_t(1) << (2 * __builtin_ctz(b));
    return spread;
  }
};

// One kMR x kNR tile: acc = sum over kp of a-pairs x b-pairs; then + bias, [relu],
// rounded to bfloat16, stored to rows [0, rows) of c (row stride ldc), the columns of
// each of the panel's segments (runs.nseg) at their seg_off.
CNNEXT_BF16 void micro_kernel(const uint32_t* __restrict__ a, const uint16_t* __restrict__ b,
                              int64_t Kp, const float* bias, bool relu, uint16_t* c, int64_t ldc,
                              int64_t rows, const PanelRuns& runs, const int64_t* seg_off) {
  __m512 acc[kMR][2];
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * 64 + 32);
    const uint32_t* ak = a + kp * kMR;
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(ak[i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int i = 0; i < kMR; ++i) {
    if (i >= rows) break;
    __m512 v0 = acc[i][0], v1 = acc[i][1];
    if (bias) {
      const __m512 bv = _mm512_set1_ps(bias[i]);
      v0 = _mm512_add_ps(v0, bv);
      v1 = _mm512_add_ps(v1, bv);
    }
    if (relu) {  // max(0, v): the second operand is returned for NaN, so NaN stays NaN
      v0 = _mm512_mask_max_ps(v0, __mmask16(0xFFFF), zero, v0);
      v1 = _mm512_mask_max_ps(v1, __mmask16(0xFFFF), zero, v1);
    }
    const __m256i h0 = (__m256i)_mm512_cvtneps_pbh(v0), h1 = (__m256i)_mm512_cvtneps_pbh(v1);
    // One masked store pair per sample the panel touches: position t of segment s goes
    // to c + i * ldc + seg_off[s] + t (masked-off lanes are not written: the base may
    // lie outside the tensor).
    for (int64_t sg = 0; sg < runs.nseg; ++sg) {
      const int64_t lo = runs.slo[sg], hi = runs.shi[sg];
      const uint32_t m = static_cast<uint32_t>(
          (hi >= 32 ? ~uint64_t(0) : ((uint64_t(1) << hi) - 1)) & ~((uint64_t(1) << lo) - 1));
      uint16_t* row = c + i * ldc + seg_off[sg];
      if (m & 0xFFFFu) _mm256_mask_storeu_epi16(row, static_cast<__mmask16>(m), h0);
      if (m >> 16) _mm256_mask_storeu_epi16(row + 16, static_cast<__mmask16>(m >> 16), h1);
    }
  }
}

// The im2col row of tap (c, kh, kw) over the panel's output pixels (runs) of one sample,
// into seg (32 values, zero outside the input and beyond the panel).
CNNEXT_BF16 inline __m512i im2col_row(const uint16_t* x, const Strides4& xs, const Conv2dParams& p,
                                      int64_t c, int64_t kh, int64_t kw, const PanelRuns& runs,
                                      uint16_t* scratch) {
  const uint16_t* plane = x + c * xs.c;
  const int64_t dh = kh * p.DH, dw = kw * p.DW;
  const int64_t P = p.OH * p.OW;
  if (p.SW == 1 && xs.w == 1) {
    __m512i seg = _mm512_setzero_si512();
    for (int64_t r = 0; r < runs.n; ++r) {
      const int64_t ih = runs.ih0[r] + dh;
      if (ih < 0 || ih >= p.H) continue;
      // Position t reads iw = shift + t; valid: t in [lo, hi) and 0 <= shift + t < W.
      const int64_t shift = runs.shift0[r] + dw;
      const __mmask32 m = static_cast<__mmask32>(runs.masked ? runs.mask[r][kw] : runs.lane_mask(p, r, shift));
      // Masked-off lanes are not read, so the base may lie outside the row.
      if (m) seg = _mm512_mask_loadu_epi16(seg, m, plane + runs.xoff[r] + ih * xs.h + shift);
    }
    return seg;
  }
  if (p.SW == 2 && xs.w == 1) {
    // Position t reads element 2t from the run's base: two masked 32-element loads,
    // then the even elements (vpermt2w); runs do not share lanes, so they are OR-ed.
    const __m512i ie = _mm512_load_si512(kEvenIdx);
    __m512i seg = _mm512_setzero_si512();
    for (int64_t r = 0; r < runs.n; ++r) {
      const int64_t ih = runs.ih0[r] + dh;
      if (ih < 0 || ih >= p.H) continue;
      // Position t reads iw = shift + 2t; valid: t in [lo, hi) and 0 <= shift + 2t < W.
      const int64_t shift = runs.shift0[r] + dw;
      const uint64_t m64 = runs.masked ? runs.mask[r][kw] : runs.lane_mask(p, r, shift);
      if (m64) {
        const uint16_t* base = plane + runs.xoff[r] + ih * xs.h + shift;
        const __m512i v0 = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m64), base);
        const __m512i v1 = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m64 >> 32), base + 32);
        seg = _mm512_or_si512(seg, _mm512_permutex2var_epi16(v0, ie, v1));
      }
    }
    return seg;
  }
  for (int64_t t = 0; t < kNR; ++t) {
    const int64_t q = runs.q0 + t;
    uint16_t v = 0;
    if (q < runs.q1) {
      const int64_t smp = q / runs.period, qq = q % runs.period, oh = qq / p.OW, ow = qq % p.OW;
      const int64_t ih = oh * p.SH - p.PH + dh, iw = ow * p.SW - p.PW + dw;
      if (qq < P && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) v = plane[smp * xs.n + ih * xs.h + iw * xs.w];
    }
    scratch[t] = v;
  }
  return _mm512_loadu_si512(scratch);
}

// vpermt2w indices interleaving two rows (a, b) of 32 bf16 into channel pairs: their low 16
// columns (kPairLo) and high 16 (kPairHi) as a0, b0, a1, b1, ...
alignas(64) constexpr uint16_t kPairLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                              37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                              11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t kPairHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                              53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                              27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// k (<= 32) values of a row from s, elements SW (1 or 2) apart, zero past k (masked loads:
// nothing past the row is read). ie: kEvenIdx loaded.
CNNEXT_BF16 inline __m512i load_row(const uint16_t* s, int64_t k, int64_t SW, __m512i ie) {
  const __mmask32 m = k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << k) - 1);
  if (SW == 1) return _mm512_maskz_loadu_epi16(m, s);
  const int64_t span = std::min<int64_t>(64, 2 * k - 1);  // elements read: 2(k-1) + 1
  const __mmask32 m0 = span >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << span) - 1);
  const __mmask32 m1 =
      span <= 32 ? __mmask32(0) : span >= 64 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (span - 32)) - 1);
  return _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi16(m0, s), ie, _mm512_maskz_loadu_epi16(m1, s + 32));
}

// dst[t] = the dword (a[t * step], b[t * step]) for t < cnt, step = SW * xw (b null: a zero
// high half): two rows interleaved into pairs, by vpermt2w where the row is contiguous
// (xw 1) and SW is 1 or 2.
CNNEXT_BF16 void pair_rows(const uint16_t* a, const uint16_t* b, int64_t cnt, int64_t SW, int64_t xw,
                           uint32_t* dst) {
  if (xw != 1 || SW > 2) {
    for (int64_t t = 0; t < cnt; ++t)
      dst[t] = uint32_t(a[t * SW * xw]) | (b ? uint32_t(b[t * SW * xw]) << 16 : 0u);
    return;
  }
  const __m512i ilo = _mm512_load_si512(kPairLo), ihi = _mm512_load_si512(kPairHi);
  const __m512i ie = _mm512_load_si512(kEvenIdx);
  for (int64_t t = 0; t < cnt; t += 32) {
    const int64_t k = std::min<int64_t>(32, cnt - t);
    const __m512i va = load_row(a + SW * t, k, SW, ie);
    const __m512i vb = b ? load_row(b + SW * t, k, SW, ie) : _mm512_setzero_si512();
    const __mmask32 m = k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << k) - 1);
    _mm512_mask_storeu_epi32(dst + t, static_cast<__mmask16>(m), _mm512_permutex2var_epi16(va, ilo, vb));
    if (k > 16)
      _mm512_mask_storeu_epi32(dst + t + 16, static_cast<__mmask16>(m >> 16), _mm512_permutex2var_epi16(va, ihi, vb));
  }
}

// B panel of the pixels of runs (group's channels from c0; x the batch's input): Kp pairs of rows.
CNNEXT_BF16 void pack_b(const uint16_t* x, const Strides4& xs, const Conv2dParams& p, int64_t c0,
                        int64_t K, const PanelRuns& runs, uint16_t* b) {
  alignas(64) uint16_t scratch[kNR];
  const __m512i ilo = _mm512_load_si512(kPairLo), ihi = _mm512_load_si512(kPairHi);
  int64_t c = c0, kh = 0, kw = 0;  // tap of k, stepped along
  auto next = [&]() {
    if (++kw == p.KW) {
      kw = 0;
      if (++kh == p.KH) {
        kh = 0;
        ++c;
      }
    }
  };
  for (int64_t k = 0; k < K; k += 2) {
    const __m512i r0 = im2col_row(x, xs, p, c, kh, kw, runs, scratch);
    next();
    __m512i r1 = _mm512_setzero_si512();
    if (k + 1 < K) {
      r1 = im2col_row(x, xs, p, c, kh, kw, runs, scratch);
      next();
    }
    uint16_t* out = b + (k / 2) * 64;
    _mm512_storeu_si512(out, _mm512_permutex2var_epi16(r0, ilo, r1));
    _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(r0, ihi, r1));
  }
}

// The channel-pair layout of the pair GEMM: xi[((n * G + g) * Cpg + cp) * HW + ih * W + iw]
// = the dword (x[n, g * Cg + 2cp, ih, iw], x[n, g * Cg + 2cp + 1, ih, iw]) (Cg even), one
// pass over the input (vpermt2w of two rows where its columns are contiguous).
// Items [b0, b1) of (sample, channel pair).
CNNEXT_BF16 void interleave_pairs(const uint16_t* x, const Strides4& xs, const Conv2dParams& p, uint32_t* xi,
                                  int64_t b0, int64_t b1) {
  const int64_t pairs = p.C / 2, HW = p.H * p.W;  // pairs of the whole batch's channels
  {
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t n = item / pairs, cp = item % pairs;
      const uint16_t* xa = x + n * xs.n + 2 * cp * xs.c;
      const uint16_t* xb = xa + xs.c;
      uint32_t* dst = xi + item * HW;
      for (int64_t ih = 0; ih < p.H; ++ih) {
        const uint16_t* ra = xa + ih * xs.h;
        const uint16_t* rb = xb + ih * xs.h;
        uint32_t* row = dst + ih * p.W;
        pair_rows(ra, rb, p.W, 1, xs.w, row);
      }
    }
  }
}

// The pair GEMM's B block of the pixels of runs: pairs kp in [kb, ke), kp = tap * Cpg + cp
// (the channel pair cp of group plane base xg, from xi, at tap (kh, kw)):
// b[(kp - kb) * 64 + 2j + h] = x[2cp + h, tap, pixel q0 + j]. Column stride 1: a row of
// pairs is a dword row of xi, one or two masked dword loads per output row touched; no
// interleaving.
CNNEXT_BF16 void pack_b_pairs(const uint32_t* xg, const Conv2dParams& p, int64_t Cpg, int64_t kb, int64_t ke,
                              const PanelRuns& runs, uint16_t* b) {
  const int64_t HW = p.H * p.W;
  int64_t tap = kb / Cpg, cp = kb % Cpg;
  for (int64_t kp = kb; kp < ke; ++kp) {
    const int64_t kh = tap / p.KW, kw = tap % p.KW;
    const uint32_t* plane = xg + cp * HW;
    const int64_t dh = kh * p.DH, dw = kw * p.DW;
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int64_t r = 0; r < runs.n; ++r) {
      const int64_t ih = runs.ih0[r] + dh;
      if (ih < 0 || ih >= p.H) continue;
      const int64_t shift = runs.shift0[r] + dw;
      const uint32_t m = static_cast<uint32_t>(runs.masked ? runs.mask[r][kw] : runs.lane_mask(p, r, shift));
      // Masked-off lanes are not read, so the base may lie outside the row.
      const uint32_t* base = plane + runs.xoff[r] + ih * p.W + shift;
      if (m & 0xFFFFu) s0 = _mm512_mask_loadu_epi32(s0, static_cast<__mmask16>(m), base);
      if (m >> 16) s1 = _mm512_mask_loadu_epi32(s1, static_cast<__mmask16>(m >> 16), base + 16);
    }
    uint16_t* out = b + (kp - kb) * 64;
    _mm512_storeu_si512(out, s0);
    _mm512_storeu_si512(out + 32, s1);
    if (++cp == Cpg) {
      cp = 0;
      ++tap;
    }
  }
}

// One kMR x kNR float tile over Kp pairs of the reduction, accumulated in float and left
// in float (c: kMR rows of kNR floats; load: start from c's values instead of zero).
// A's pair kp of row i is a[i * ars + kp * acs]; B as micro_kernel's.
CNNEXT_BF16 void tile_f32(const uint32_t* __restrict__ a, int64_t ars, int64_t acs,
                          const uint16_t* __restrict__ b, int64_t Kp, float* __restrict__ c, bool load) {
  __m512 acc[kMR][2];
  for (int i = 0; i < kMR; ++i) {
    acc[i][0] = load ? _mm512_loadu_ps(c + i * kNR) : _mm512_setzero_ps();
    acc[i][1] = load ? _mm512_loadu_ps(c + i * kNR + 16) : _mm512_setzero_ps();
  }
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * 64 + 32);
    const uint32_t* ak = a + kp * acs;
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(ak[i * ars]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
  }
  for (int i = 0; i < kMR; ++i) {
    _mm512_storeu_ps(c + i * kNR, acc[i][0]);
    _mm512_storeu_ps(c + i * kNR + 16, acc[i][1]);
  }
}

// The input gradient's B panel: pixels [q0, q0 + cols) of rows [0, rows) of gy (one
// sample's group, rows P apart, contiguous along pixels), in pairs of rows:
// b[op * 64 + 2j + h] = gy[2op + h, q0 + j], zero beyond rows and cols.
CNNEXT_BF16 void pack_gy_pixels(const uint16_t* gy, int64_t P, int64_t rows, int64_t q0, int64_t cols,
                                uint16_t* b) {
  const __m512i ilo = _mm512_load_si512(kPairLo), ihi = _mm512_load_si512(kPairHi);
  const __mmask32 m = cols >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << cols) - 1);
  for (int64_t o = 0; o < rows; o += 2) {
    const __m512i r0 = _mm512_maskz_loadu_epi16(m, gy + o * P + q0);
    const __m512i r1 = o + 1 < rows ? _mm512_maskz_loadu_epi16(m, gy + (o + 1) * P + q0) : _mm512_setzero_si512();
    uint16_t* out = b + (o / 2) * 64;
    _mm512_storeu_si512(out, _mm512_permutex2var_epi16(r0, ilo, r1));
    _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(r0, ihi, r1));
  }
}

// GCC 12 warns about the undefined source operand inside its unpack intrinsics (as
// cpu/transpose16.h, which says so too).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// out[c] (16 dwords) = column c of the 16 x 16 dword matrix whose rows are r[0..15]:
// 32-bit then 64-bit interleaves within 128-bit lanes, then two rounds of lane shuffles.
CNNEXT_BF16 inline void transpose16(const __m512i* r, __m512i* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + m], lane L: column 4L + m, rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i s1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44);
    const __m512i s2 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE);
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
    const __m512i s4 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
    out[0 + m] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    out[4 + m] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
    out[8 + m] = _mm512_shuffle_i32x4(s2, s4, 0x88);
    out[12 + m] = _mm512_shuffle_i32x4(s2, s4, 0xDD);
  }
}
#pragma GCC diagnostic pop

// The weight gradient's B panels of one sample's group: for each panel of 32 rows
// (output channels) and each pair qp of pixels, b[panel * panel_stride + qp * 64 + 2j + h]
// = gy[panel * 32 + j, 2qp + h] (rows P apart), zero beyond rows and P. A pixel pair is
// one dword, so 16 pairs of 32 rows are two 16 x 16 dword transposes of rows loaded as
// they lie (masked past P: an odd P's last pixel pairs with zero).
CNNEXT_BF16 void pack_gy_pairs(const uint16_t* gy, int64_t P, int64_t rows, uint16_t* b,
                               int64_t panel_stride) {
  const int64_t QP = (P + 1) / 2, panels = (rows + kNR - 1) / kNR;
  for (int64_t panel = 0; panel < panels; ++panel) {
    const int64_t r0 = panel * kNR, n = std::min(kNR, rows - r0);
    uint16_t* out = b + panel * panel_stride;
    for (int64_t qp0 = 0; qp0 < QP; qp0 += 16) {
      const int64_t px0 = 2 * qp0, npx = std::min<int64_t>(32, P - px0);
      const __mmask32 pm = npx >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << npx) - 1);
      __m512i r[32], lo[16], hi[16];
      for (int64_t j = 0; j < kNR; ++j)
        r[j] = j < n ? _mm512_maskz_loadu_epi16(pm, gy + (r0 + j) * P + px0) : _mm512_setzero_si512();
      transpose16(r, lo);
      transpose16(r + 16, hi);
      const int64_t nq = std::min<int64_t>(16, QP - qp0);
      for (int64_t q = 0; q < nq; ++q) {
        _mm512_storeu_si512(out + (qp0 + q) * 64, lo[q]);
        _mm512_storeu_si512(out + (qp0 + q) * 64 + 32, hi[q]);
      }
    }
  }
}

// The weight gradient's A block: rows [k0, k0 + kMR) of the im2col of the batch (taps
// k = (c, kh, kw) from channel c0) over the slots of segs (npix / kNR panels of 32),
// a[i * npix + t] = X[k0 + i, slot t]: zero beyond K and at padding slots. Read as
// dwords, each holds a pair of adjacent slots (a chunk starts at an even slot).
CNNEXT_BF16 void pack_taps(const uint16_t* x, const Strides4& xs, const Conv2dParams& p, int64_t c0,
                           int64_t K, int64_t k0, const PanelRuns* segs, int64_t npix, uint16_t* a) {
  alignas(64) uint16_t scratch[kNR];
  const int64_t KHW = p.KH * p.KW;
  for (int64_t i = 0; i < kMR; ++i) {
    const int64_t k = k0 + i;
    uint16_t* row = a + i * npix;
    if (k >= K) {
      std::memset(row, 0, npix * sizeof(uint16_t));
      continue;
    }
    const int64_t c = c0 + k / KHW, kh = (k % KHW) / p.KW, kw = k % p.KW;
    for (int64_t t = 0; t < npix; t += kNR)
      _mm512_storeu_si512(row + t, im2col_row(x, xs, p, c, kh, kw, segs[t / kNR], scratch));
  }
}

// ---- The direct forward: output channels in the vector lanes ----
//
// out[n, o, oh, ow] for a tile of NP consecutive pixels of one output row and 16 * V
// output channels: V * NP float accumulators; per pair (tap, channel pair) V loads of
// weight pairs and NP broadcasts of one input pair, nothing packed per tile. The input is
// read from xi, a channel-pair copy of it with the padding made explicit, laid out so that
// the NP pixels a step reads are SW dwords apart (an immediate displacement from one
// pointer): xi[((n * Hp + r) * Cp + cp) * Wp + s] = (x[n, c, ih, iw], x[n, c + 1, ih, iw]),
// ih = r + ih_lo, iw = s + iw_lo, c = g * Cg + 2 * (cp - g * Cpg), zero outside the input
// and for channel c + 1 = Cg (odd Cg). K runs (tap, channel pair), the pair GEMM's order,
// so each output is the same float sum as that GEMM's and the same rounding.
// Tiles: 4 vectors x 7 pixels where the group's channels come in 64s (one broadcast feeds
// four vdpbf16ps), else 2 x 14.
constexpr int kDirAcc = 28;  // accumulators a tile: V * NP <= 28, leaving V weight and 1-2 broadcast registers

// out + bias, [relu], rounded, stored at y0 + i * ldc + j * ldw for channel i of the tile
// and pixel j: cl (ldc = 1) one vector store per pixel; else a 16 x 16 transpose per 16
// channels and a row store per channel (ldw = 1), or its values ldw apart (an input
// gradient's stride phase written in place).
template <int NP, int SW, int V>
CNNEXT_BF16 void direct_tile(const uint32_t* __restrict__ xb, const int64_t* __restrict__ tap_off, int64_t taps,
                             int64_t Cp, int64_t Wp, const uint32_t* __restrict__ wa, const float* bias, bool relu,
                             int64_t ocn, bool cl, uint16_t* y0, int64_t ldc, int64_t ldw) {
  __m512 acc[NP][V];
#pragma GCC unroll 28
  for (int j = 0; j < NP; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < taps; ++t) {
    const uint32_t* xp = xb + tap_off[t];
    const uint32_t* wk = wa + t * Cp * 16 * V;
    for (int64_t cp = 0; cp < Cp; ++cp, xp += Wp, wk += 16 * V) {
      __m512bh w[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) w[v] = (__m512bh)_mm512_loadu_si512(wk + 16 * v);
#pragma GCC unroll 14
      for (int j = 0; j < NP; ++j) {
        const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[j * SW]));
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], b, w[v]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const __m512 bv = bias ? _mm512_loadu_ps(bias + 16 * v) : zero;
#pragma GCC unroll 14
    for (int j = 0; j < NP; ++j) {
      if (bias) acc[j][v] = _mm512_add_ps(acc[j][v], bv);
      // max(0, v): the second operand is returned for NaN, so NaN stays NaN
      if (relu) acc[j][v] = _mm512_mask_max_ps(acc[j][v], __mmask16(0xFFFF), zero, acc[j][v]);
    }
  }
  if (cl) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const int64_t left = ocn - 16 * v;
      if (left <= 0) break;
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
#pragma GCC unroll 14
      for (int j = 0; j < NP; ++j)
        _mm256_mask_storeu_epi16(y0 + j * ldw + 16 * v, m, (__m256i)_mm512_cvtneps_pbh(acc[j][v]));
    }
    return;
  }
  // NCHW: a 16 x 16 transpose per 16 channels turns pixel vectors into channel rows.
  const __mmask16 pm = static_cast<__mmask16>((1u << NP) - 1);
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    if (16 * v >= ocn) break;
    __m512i r[16], c[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) r[j] = j < NP ? _mm512_castps_si512(acc[j < NP ? j : 0][v]) : _mm512_setzero_si512();
    transpose16(r, c);
    const int64_t rows = std::min<int64_t>(16, ocn - 16 * v);
    for (int64_t i = 0; i < rows; ++i) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(c[i]));
      uint16_t* row = y0 + (16 * v + i) * ldc;
      if (ldw == 1) {
        _mm256_mask_storeu_epi16(row, pm, h);
      } else {
        alignas(32) uint16_t b[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(b), h);
        for (int j = 0; j < NP; ++j) row[j * ldw] = b[j];
      }
    }
  }
}

using DirectTile = void (*)(const uint32_t*, const int64_t*, int64_t, int64_t, int64_t, const uint32_t*,
                            const float*, bool, int64_t, bool, uint16_t*, int64_t, int64_t);

template <int SW, int V, int... NP>
constexpr std::array<DirectTile, sizeof...(NP)> direct_tiles(std::integer_sequence<int, NP...>) {
  return {&direct_tile<NP + 1, SW, V>...};
}

// The channel-pair copy's rows [r0, r1) of every sample (items n * Hp + r).
CNNEXT_BF16 void direct_copy_rows(const uint16_t* x, const Strides4& xs, const Conv2dParams& p, int64_t Hp,
                                  int64_t Wp, int64_t ih_lo, int64_t iw_lo, uint32_t* xi, int64_t i0, int64_t i1) {
  const int64_t Cg = p.in_per_group(), Cpg = (Cg + 1) / 2, Cp = p.G * Cpg;
  // Columns s of the copy that hold input: [s0, s1).
  const int64_t s0 = std::clamp<int64_t>(-iw_lo, 0, Wp), s1 = std::clamp<int64_t>(p.W - iw_lo, s0, Wp);
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t n = item / Hp, r = item % Hp, ih = r + ih_lo;
    uint32_t* dst = xi + item * Cp * Wp;
    if (ih < 0 || ih >= p.H || s0 == s1) {
      std::memset(dst, 0, Cp * Wp * sizeof(uint32_t));
      continue;
    }
    for (int64_t cp = 0; cp < Cp; ++cp) {
      const int64_t g = cp / Cpg, c = g * Cg + 2 * (cp % Cpg);
      const bool second = 2 * (cp % Cpg) + 1 < Cg;
      uint32_t* row = dst + cp * Wp;
      std::fill(row, row + s0, 0u);
      std::fill(row + s1, row + Wp, 0u);
      const uint16_t* ra = x + n * xs.n + c * xs.c + ih * xs.h + (s0 + iw_lo) * xs.w;
      const uint16_t* rb = ra + xs.c;
      pair_rows(ra, second ? rb : nullptr, s1 - s0, 1, xs.w, row + s0);
    }
  }
}

// ---- The direct weight gradient: output channels in the vector lanes ----
//
// gw[o, k] = sum over samples and output pixels of gy[o, q] * X[k, q], k = (c, kh, kw), in
// tiles of 7 taps x 16 * V output channels. The reduction runs over pairs of samples (2m,
// 2m + 1; an odd batch's last one paired with zeros) at one output pixel: per pixel V loads
// of grad_output pairs (gyp[((ob * rows + row) * OW + ow) * BW + l] = (gy[2m, o, oh, ow],
// gy[2m + 1, o, oh, ow]), o = ob * BW + l, row = m * OH + oh) and one broadcast per tap of
// the input pair that pixel reads in the two samples. The input is copied once, padded, split
// by column phase and with the two samples' values side by side (xc below), so that the pair
// is one dword and a row's pixels are consecutive dwords: nothing packed per tile.
//   xc[(((m * C + c) * Hp + r) * SW + ph) * Wh + i] = (x[2m, c, ih, iw], x[2m + 1, c, ih, iw]),
//   ih = r - PH, iw = ph + SW * i - PW (zero outside the input and for a sample past N):
// pixel (oh, ow) at tap (kh, kw) reads r = oh * SH + kh * DH, phase (kw * DW) % SW, index
// ow + (kw * DW) / SW.
constexpr int kGwRows = 7;  // taps a tile: 7 x V accumulators, V weight and one broadcast register

template <int V>
CNNEXT_BF16 void gw_tile(const uint32_t* __restrict__ xc, const int64_t* __restrict__ roff, int64_t xn, int64_t rs,
                         int64_t OH, int64_t OW, const uint32_t* __restrict__ gyp, int64_t row0, int64_t row1,
                         float* __restrict__ acc_mem) {
  __m512 acc[kGwRows][V];
#pragma GCC unroll 7
  for (int i = 0; i < kGwRows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_loadu_ps(acc_mem + (i * V + v) * 16);
  // (m, oh) of row stepped along: no division per row (7 x 7 maps have 7 pixels a row)
  int64_t m = row0 / OH, oh = row0 % OH;
  for (int64_t row = row0; row < row1; ++row, ++oh) {
    if (oh == OH) {
      oh = 0;
      ++m;
    }
    const uint32_t* base = xc + m * xn + oh * rs;
    const uint32_t* p0 = base + roff[0];
    const uint32_t* p1 = base + roff[1];
    const uint32_t* p2 = base + roff[2];
    const uint32_t* p3 = base + roff[3];
    const uint32_t* p4 = base + roff[4];
    const uint32_t* p5 = base + roff[5];
    const uint32_t* p6 = base + roff[6];
    const uint32_t* g = gyp + row * OW * 16 * V;
    for (int64_t j = 0; j < OW; ++j, g += 16 * V) {
      __m512bh w[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) w[v] = (__m512bh)_mm512_loadu_si512(g + 16 * v);
      const uint32_t* ps[kGwRows] = {p0, p1, p2, p3, p4, p5, p6};
#pragma GCC unroll 7
      for (int i = 0; i < kGwRows; ++i) {
        const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(ps[i][j]));
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], b, w[v]);
      }
    }
  }
#pragma GCC unroll 7
  for (int i = 0; i < kGwRows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc_mem + (i * V + v) * 16, acc[i][v]);
}

// xc's planes [i0, i1) (items m * C + c).
CNNEXT_BF16 void gw_copy_planes(const uint16_t* x, const Strides4& xs, const Conv2dParams& p, int64_t Hp, int64_t Wh,
                                uint32_t* xc, int64_t i0, int64_t i1) {
  const int64_t SW = p.SW;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t m = item / p.C, c = item % p.C;
    const bool second = 2 * m + 1 < p.N;
    uint32_t* plane = xc + item * Hp * SW * Wh;
    for (int64_t r = 0; r < Hp; ++r) {
      const int64_t ih = r - p.PH;
      uint32_t* dst = plane + r * SW * Wh;
      if (ih < 0 || ih >= p.H) {
        std::memset(dst, 0, SW * Wh * sizeof(uint32_t));
        continue;
      }
      const uint16_t* sa = x + 2 * m * xs.n + c * xs.c + ih * xs.h;
      for (int64_t ph = 0; ph < SW; ++ph) {
        uint32_t* d = dst + ph * Wh;
        // index i holds iw = ph + SW * i - PW: the ones inside [0, W) are [ilo, ihi).
        const int64_t first = ph - p.PW;  // iw of i = 0
        const int64_t ilo = std::min<int64_t>(first >= 0 ? 0 : (-first + SW - 1) / SW, Wh);
        const int64_t ihi = std::clamp<int64_t>(p.W - first > 0 ? (p.W - first + SW - 1) / SW : 0, ilo, Wh);
        std::fill(d, d + ilo, 0u);
        std::fill(d + ihi, d + Wh, 0u);
        const uint16_t* a = sa + (first + SW * ilo) * xs.w;  // iw of index ilo, sample 2m
        const uint16_t* b = a + xs.n;                        // sample 2m + 1
        pair_rows(a, second ? b : nullptr, ihi - ilo, SW, xs.w, d + ilo);
      }
    }
  }
}

// gyp for rows [r0, r1) (row = m * OH + oh) of every channel block: per 16 channels and 16
// pixels, the two samples' rows interleaved into dwords, then one dword transpose.
CNNEXT_BF16 void gw_pack_gy(const uint16_t* gy, const Conv2dParams& p, int64_t BW, int64_t rows, uint32_t* gyp,
                            int64_t r0, int64_t r1) {
  const int64_t ocbs = (p.O + BW - 1) / BW, P = p.OH * p.OW;
  const __m512i ilo = _mm512_load_si512(kPairLo);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t m = row / p.OH, oh = row % p.OH;
    const bool second = 2 * m + 1 < p.N;
    for (int64_t o0 = 0; o0 < ocbs * BW; o0 += 16) {
      const int64_t ob = o0 / BW, l0 = o0 % BW;
      uint32_t* dst = gyp + ((ob * rows + row) * p.OW) * BW + l0;
      for (int64_t j0 = 0; j0 < p.OW; j0 += 16) {
        const int64_t npx = std::min<int64_t>(16, p.OW - j0);
        const __mmask32 pm = static_cast<__mmask32>((1u << npx) - 1);
        __m512i r[16], t[16];
        for (int64_t i = 0; i < 16; ++i) {
          if (o0 + i >= p.O) {
            r[i] = _mm512_setzero_si512();
            continue;
          }
          const uint16_t* ga = gy + ((2 * m) * p.O + o0 + i) * P + oh * p.OW + j0;
          const __m512i va = _mm512_maskz_loadu_epi16(pm, ga);
          const __m512i vb = second ? _mm512_maskz_loadu_epi16(pm, ga + p.O * P) : _mm512_setzero_si512();
          r[i] = _mm512_permutex2var_epi16(va, ilo, vb);  // dword j = (a[j], b[j])
        }
        transpose16(r, t);
        for (int64_t j = 0; j < npx; ++j) _mm512_storeu_si512(dst + (j0 + j) * BW, t[j]);
      }
    }
  }
}
#endif  // CNNEXT_BF16_GEMM

}  // namespace

void set_direct_enabled(bool on) { g_direct.store(on); }
bool direct_enabled() { return g_direct.load(); }

bool available() {
#ifdef CNNEXT_BF16_GEMM
  const CpuFeatures& f = cpu_features();
  return f.avx512_bf16 && f.avx512f && f.avx512bw;
#else
  return false;
#endif
}

namespace {

CNNEXT_PATH_NEEDS(kFwdBf16Direct, "conv2d.fwd.bf16_direct", kAvx512Bf16);
CNNEXT_PATH_NEEDS(kDirectCacheHit, "conv2d.fwd.bf16_direct.weight_cache_hit", kAvx512Bf16);

// The direct forward's weight (direct_forward's wa), channel pair by channel pair so that
// the 9-or-so lines a pair's taps write stay in L1 while its BW output channels are read.
void pack_direct_weight(const at::Tensor& weight, const Conv2dParams& p, bool flipped, int64_t BW, uint32_t* wa) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), Cpg = (Cg + 1) / 2, KHW = p.KH * p.KW;
  const int64_t ocbs = (Og + BW - 1) / BW;
  const at::Tensor wc = weight.contiguous();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wc.const_data_ptr<at::BFloat16>());
  at::parallel_for(0, p.G * ocbs, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t gb = b0; gb < b1; ++gb) {
      const int64_t g = gb / ocbs, ob = gb % ocbs;
      uint32_t* dst = wa + gb * KHW * Cpg * BW;
      for (int64_t cp = 0; cp < Cpg; ++cp)
        for (int64_t l = 0; l < BW; ++l) {
          const int64_t o = ob * BW + l;
          for (int64_t h = 0; h < 2; ++h) {
            const int64_t c = 2 * cp + h;
            uint32_t* d = dst + cp * BW + l;
            if (o >= Og || c >= Cg) {
              if (h == 0 || o >= Og) for (int64_t t = 0; t < KHW; ++t) d[t * Cpg * BW] = 0;
              continue;
            }
            // W[o, c, t] (flipped: the other convolution's weight, its taps reversed).
            const uint16_t* src = flipped ? w + ((g * Cg + c) * Og + o) * KHW + (KHW - 1) : w + ((g * Og + o) * Cg + c) * KHW;
            const int64_t ts = flipped ? -1 : 1;
            if (h == 0)
              for (int64_t t = 0; t < KHW; ++t) d[t * Cpg * BW] = src[t * ts];
            else
              for (int64_t t = 0; t < KHW; ++t) d[t * Cpg * BW] |= uint32_t(src[t * ts]) << 16;
          }
        }
    }
  });
}

// The direct forward (direct_tile above), for output channels 16 or more a group, column
// stride 1 or 2, into out of any strides (NCHW, channels_last, or a strided view: an input
// gradient's stride phase). flipped as forward_gemm's; pointwise: take a 1x1 kernel too.
// Returns false, having written nothing, where it does not apply; the caller runs the GEMM
// then.
bool direct_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const Conv2dParams& p, at::Tensor& out, bool relu, bool flipped, bool pointwise = false) {
#ifdef CNNEXT_BF16_GEMM
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group();
  // Not for 1x1 kernels (the copy is a pass over the input that the GEMM, reading each
  // value once, does without: ResNet's 256 -> 64 1x1 at 56x56 took 7.5 against 5.9 ms, 1
  // thread) nor few odd channels (a pair's second half is zero: an RGB stem's K grows by
  // a third; 7.5 against 6.5 ms, 2 threads).
  if (!g_direct.load() || Og < 16 || (p.SW != 1 && p.SW != 2) || (p.KH * p.KW == 1 && !pointwise) ||
      (Cg % 2 == 1 && Cg < 15))
    return false;
  const Strides4 ys = strides_of(out);
  const bool cl = ys.c == 1;  // the channels side by side: one vector store per pixel
  const int64_t Cpg = (Cg + 1) / 2, Cp = p.G * Cpg, KHW = p.KH * p.KW;
  // The input rows and columns the output reads (padding included; a negative padding
  // crops): [ih_lo, ih_lo + Hp), [iw_lo, iw_lo + Wp).
  const int64_t ih_lo = -p.PH, iw_lo = -p.PW;
  const int64_t Hp = (p.OH - 1) * p.SH + conv_dilated_kernel(p.KH, p.DH);
  const int64_t Wp = (p.OW - 1) * p.SW + conv_dilated_kernel(p.KW, p.DW);
  // The copy may not outgrow the tensors by much (a large padding under a large stride
  // would make it mostly zeros): the GEMM then.
  const int64_t copy = p.N * Hp * Cp * Wp;
  if (copy > 4 * (input.numel() + out.numel()) + (int64_t(1) << 18)) return false;
  kFwdBf16Direct.hit();
  // Channel blocks of BW = 16 * V: 64 where the group's channels come in 64s, else 32.
  const int V = Og % 64 == 0 ? 4 : 2;
  const int64_t BW = 16 * V, ocbs = (Og + BW - 1) / BW;
  // wa[(((g * ocbs + ob) * KHW + t) * Cpg + cp) * BW + l] = (W[o, 2cp, t], W[o, 2cp + 1, t]),
  // o = g * Og + ob * BW + l; zero beyond Og and Cg. From the weight cache (reused only while
  // the weight is provably unchanged: csrc/cpu/derived_cache.h) or packed.
  bool hit = false;
  const at::Tensor wa_t = weight_cache().get(
      {weight}, {flipped ? kBf16DirectFlippedWeightTag : kBf16DirectWeightTag, p.G, Og, Cg, p.KH, p.KW, BW},
      [&](const std::vector<at::Tensor>& reuse) {
        at::Tensor t = reuse.empty() ? DerivedCache::empty({p.G * ocbs * KHW * Cpg * BW}, weight.options().dtype(at::kInt))
                                     : reuse[0];
        pack_direct_weight(weight, p, flipped, BW, reinterpret_cast<uint32_t*>(t.mutable_data_ptr<int32_t>()));
        return std::vector<at::Tensor>{t};
      },
      &hit)[0];
  if (hit) kDirectCacheHit.hit();
  const uint32_t* wa = reinterpret_cast<const uint32_t*>(wa_t.const_data_ptr<int32_t>());
  std::vector<float> bias_f(static_cast<size_t>(p.G * ocbs * BW), 0.f);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    const float* bp = bf.const_data_ptr<float>();
    for (int64_t g = 0; g < p.G; ++g)
      for (int64_t o = 0; o < Og; ++o) bias_f[(g * ocbs + o / BW) * BW + o % BW] = bp[g * Og + o];
  }
  const uint16_t* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  const Strides4 xs = strides_of(input);
  // The copy in the calling thread's scratch (kept between calls: no page faults for a
  // buffer of megabytes each call); the threads below fill and read it.
  uint32_t* xi = thread_scratch<uint32_t>(ScratchPool::Bf16, 0, copy);
  at::parallel_for(0, p.N * Hp, 1, [&](int64_t i0, int64_t i1) {
    direct_copy_rows(x, xs, p, Hp, Wp, ih_lo, iw_lo, xi, i0, i1);
  });
  std::vector<int64_t> tap_off(static_cast<size_t>(KHW));
  for (int64_t t = 0; t < KHW; ++t) tap_off[t] = (t / p.KW) * p.DH * Cp * Wp + (t % p.KW) * p.DW;
  static constexpr auto tiles12 = direct_tiles<1, 2>(std::make_integer_sequence<int, kDirAcc / 2>());
  static constexpr auto tiles22 = direct_tiles<2, 2>(std::make_integer_sequence<int, kDirAcc / 2>());
  static constexpr auto tiles14 = direct_tiles<1, 4>(std::make_integer_sequence<int, kDirAcc / 4>());
  static constexpr auto tiles24 = direct_tiles<2, 4>(std::make_integer_sequence<int, kDirAcc / 4>());
  const DirectTile* tiles = V == 4 ? (p.SW == 1 ? tiles14.data() : tiles24.data())
                                   : (p.SW == 1 ? tiles12.data() : tiles22.data());
  // Each output row in blocks of at most kDirAcc / V pixels, sizes within one of each other.
  const int64_t px = kDirAcc / V, nb = (p.OW + px - 1) / px;
  uint16_t* y = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const int64_t rows = p.N * p.OH, blocks = p.G * ocbs;
  // Work items (row, channel block): the channel blocks of a row in turn (the row's input
  // stays in L1) while all packed weights fit in L2; else the rows of a channel block in
  // turn (its weights stay in L2).
  const bool rows_outer = wa_t.numel() * int64_t(sizeof(uint32_t)) <= (int64_t(512) << 10);
  at::parallel_for(0, rows * blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t row = rows_outer ? item / blocks : item % rows;
      const int64_t gb = rows_outer ? item % blocks : item / rows;
      const int64_t n = row / p.OH, oh = row % p.OH, g = gb / ocbs, ob = gb % ocbs;
      const int64_t o0 = g * Og + ob * BW, ocn = std::min<int64_t>(BW, Og - ob * BW);
      const uint32_t* xrow = xi + ((n * Hp + oh * p.SH) * Cp + g * Cpg) * Wp;
      const uint32_t* wb = wa + gb * KHW * Cpg * BW;
      const float* bb = has_bias ? bias_f.data() + gb * BW : nullptr;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t ow0 = b * p.OW / nb, ow1 = (b + 1) * p.OW / nb;
        uint16_t* y0 = y + n * ys.n + o0 * ys.c + oh * ys.h + ow0 * ys.w;
        tiles[ow1 - ow0 - 1](xrow + ow0 * p.SW, tap_off.data(), KHW, Cpg, Wp, wb, bb, relu, ocn, cl, y0, ys.c,
                             ys.w);
      }
    }
  });
  return true;
#else
  (void)input; (void)weight; (void)bias; (void)p; (void)out; (void)relu; (void)flipped;
  return false;
#endif
}

// The forward GEMM. flipped: weight is not this convolution's but the one whose input
// gradient it computes (O' x C'/G x KH x KW, O' = p.C, C' = p.O): row o, tap (c, kh, kw)
// of this convolution's weight is weight[g * Cg + c, o, KH - 1 - kh, KW - 1 - kw], read
// while packing A (no flipped copy).
bool forward_gemm(const at::Tensor& input, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const Conv2dParams& p, at::Tensor& out,
                  bool relu, bool flipped) {
#ifdef CNNEXT_BF16_GEMM
  if (input.scalar_type() != at::kBFloat16 || !available()) return false;
  if (direct_forward(input, weight, bias, p, out, relu, flipped)) return true;
  if (!out.is_contiguous()) return false;
  kFwdBf16Gemm.hit();
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t Kp = (K + 1) / 2, P = p.OH * p.OW;
  // The pair GEMM: K ordered (tap, channel pair), its B rows read as dwords from a
  // channel-pair copy of the input (even channels a group, more than one tap: a 1x1
  // kernel reads each input value once in any case; column stride 1: at stride 2,
  // ResNet's 64 -> 128 at 56 x 56 measured 3% slower with it, 1 thread).
  const bool pairs = Cg % 2 == 0 && p.KH * p.KW > 1 && p.SW == 1;
  const int64_t Cpg = Cg / 2, HW = p.H * p.W;
  if (pairs) kFwdBf16Pairs.hit();
  const int64_t a_panels = (Og + kMR - 1) / kMR, b_panels = (p.N * P + kNR - 1) / kNR;
  // A: every group's weight in pairs.
  const at::Tensor wc = weight.contiguous();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wc.const_data_ptr<at::BFloat16>());
  std::vector<uint32_t> a(static_cast<size_t>(p.G * a_panels * Kp * kMR), 0u);
  at::parallel_for(0, p.G * a_panels, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t gp = b0; gp < b1; ++gp) {
      const int64_t g = gp / a_panels, panel = gp % a_panels;
      uint32_t* dst = a.data() + gp * Kp * kMR;
      for (int64_t i = 0; i < kMR; ++i) {
        const int64_t o = panel * kMR + i;
        if (o >= Og) break;
        if (pairs) {
          // Pair kp = tap * Cpg + cp: (W[o, 2cp, tap], W[o, 2cp + 1, tap]).
          // w0: row o's taps of channel 2cp, tap t at w0[t * ts] (flipped: the other
          // convolution's weight, read from its last tap down); channel 2cp + 1's are cs
          // further on. Pointer steps instead of an index product per value.
          const int64_t KHW = p.KH * p.KW;
          const uint16_t* w0 = flipped ? w + ((g * Cg) * Og + o) * KHW + (KHW - 1) : w + (g * Og + o) * Cg * KHW;
          const int64_t cs = flipped ? Og * KHW : KHW, ts = flipped ? -1 : 1;
          uint32_t* d = dst + i;
          for (int64_t cp = 0; cp < Cpg; ++cp, w0 += 2 * cs)
            for (int64_t tap = 0; tap < KHW; ++tap)
              d[(tap * Cpg + cp) * kMR] = uint32_t(w0[tap * ts]) | (uint32_t(w0[cs + tap * ts]) << 16);
          continue;
        }
        if (flipped) {
          // weight[(g * Cg + c) * Og + o, tap']: tap' = KHW - 1 - tap of k = c * KHW + tap,
          // walked in k order (no division per element).
          const int64_t KHW = p.KH * p.KW;
          int64_t k = 0;
          uint32_t lo = 0;
          for (int64_t c = 0; c < Cg; ++c) {
            const uint16_t* wr = w + ((g * Cg + c) * Og + o) * KHW + (KHW - 1);
            for (int64_t tap = 0; tap < KHW; ++tap, ++k) {
              const uint32_t v = wr[-tap];
              if (k & 1) dst[(k >> 1) * kMR + i] = lo | (v << 16);
              else lo = v;
            }
          }
          if (K & 1) dst[(K >> 1) * kMR + i] = lo;  // the last pair's second half: zero
          continue;
        }
        const uint16_t* wr = w + (g * Og + o) * K;
        for (int64_t kp = 0; kp < Kp; ++kp) {
          const uint32_t lo = wr[2 * kp], hi = 2 * kp + 1 < K ? wr[2 * kp + 1] : 0;
          dst[kp * kMR + i] = lo | (hi << 16);
        }
      }
    }
  });
  std::vector<float> bias_f;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    bias_f.assign(bf.const_data_ptr<float>(), bf.const_data_ptr<float>() + p.O);
  }
  const uint16_t* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  const Strides4 xs = strides_of(input);
  uint16_t* y = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  at::Tensor xi_t;
  const uint32_t* xi = nullptr;
  if (pairs) {
    xi_t = at::empty({p.N * p.C / 2 * HW}, input.options().dtype(at::kInt));
    uint32_t* xw = reinterpret_cast<uint32_t*>(xi_t.mutable_data_ptr<int32_t>());
    at::parallel_for(0, p.N * p.C / 2, 1, [&](int64_t b0, int64_t b1) { interleave_pairs(x, xs, p, xw, b0, b1); });
    xi = reinterpret_cast<const uint32_t*>(xi_t.const_data_ptr<int32_t>());
  }
  const int64_t run_xn = pairs ? p.C / 2 * HW : xs.n;  // a sample's stride in what B reads
  // Pixel panels run across samples (q = n * P + pixel): small maps (7 x 7 = 49 pixels)
  // fill the panels they share instead of leaving a part-empty one per sample.
  const int64_t items = p.G * b_panels;
  // (K in blocks of 128 pairs over groups of 16 panels, the B block in L1 and the A block
  // in L2, measured 2-3% slower than whole-K panels: ResNet's 64 -> 128 3x3/2, AlexNet's
  // 256 -> 384 at 12x12, 1 thread.)
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint16_t> bpanel(static_cast<size_t>(Kp * 64));
    int64_t seg_off[kNR];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t jb = item % b_panels, g = item / b_panels;
      const PanelRuns runs(p, jb * kNR, p.N * P, run_xn);
      // Segment s's position t is pixel t - slo + sq of sample sn: at y + sn * O * P + ...
      for (int64_t sg = 0; sg < runs.nseg; ++sg) seg_off[sg] = runs.sn[sg] * p.O * P + runs.sq[sg] - runs.slo[sg];
      if (pairs)
        pack_b_pairs(xi + g * Cpg * HW, p, Cpg, 0, Kp, runs, bpanel.data());
      else
        pack_b(x, xs, p, g * Cg, K, runs, bpanel.data());
      for (int64_t ip = 0; ip < a_panels; ++ip) {
        const int64_t o0 = g * Og + ip * kMR;
        micro_kernel(a.data() + (g * a_panels + ip) * Kp * kMR, bpanel.data(), Kp,
                     bias_f.empty() ? nullptr : bias_f.data() + o0, relu, y + o0 * P, P,
                     std::min(kMR, Og - ip * kMR), runs, seg_off);
      }
    }
  });
  return true;
#else
  (void)input; (void)weight; (void)bias; (void)p; (void)out; (void)relu; (void)flipped;
  return false;
#endif
}

}  // namespace

bool conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const Conv2dParams& p, at::Tensor& out,
                    bool relu) {
  return forward_gemm(input, weight, bias, p, out, relu, false);
}


namespace {
CNNEXT_PATH_NEEDS(kInBf16Flip, "conv2d.input_grad.bf16_flip", kAvx512Bf16);
CNNEXT_PATH_NEEDS(kInBf16Gemm, "conv2d.input_grad.bf16_gemm", kAvx512Bf16);
CNNEXT_PATH_NEEDS(kInBf16Phases, "conv2d.input_grad.bf16_phases", kAvx512Bf16);
CNNEXT_PATH_NEEDS(kWBf16Gemm, "conv2d.weight_grad.bf16_gemm", kAvx512Bf16);
}  // namespace

static bool backward_applies(const at::Tensor& grad_output, const Conv2dParams& p) {
  // Thin groups (depthwise) would fill one lane in 32 of the output-channel panels.
  return grad_output.scalar_type() == at::kBFloat16 && available() && p.out_per_group() >= 8;
}

at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format) {
#ifdef CNNEXT_BF16_GEMM
  if (!backward_applies(grad_output, p)) return at::Tensor();
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  if (p.SH == 1 && p.SW == 1) {
    // Stride 1: the input gradient is the forward convolution of grad_output with the
    // weight flipped in space and transposed per group (C x Og x KH x KW), padding
    // D * (K - 1) - P (negative: a crop, which the forward's bounds checks take).
    kInBf16Flip.hit();
    const Conv2dParams q = conv_input_grad_as_forward(p);
    at::Tensor gx = at::empty({p.N, p.C, p.H, p.W}, grad_output.options());
    if (gx.numel() != 0) {
      const bool ran = forward_gemm(grad_output, weight, c10::nullopt, q, gx, false, true);
      TORCH_INTERNAL_ASSERT(ran);
    }
    return out_format == at::MemoryFormat::Contiguous ? gx : gx.contiguous(out_format);
  }
  // (Under about a thousand output pixels in the batch, e.g. ResNet's 14 -> 7 layer, the
  // phases' small GEMMs lose to the col2im below: 1 thread, 8.0 -> 9.5 ms there, against
  // 11 -> 9 ms at 56 -> 28.)
  if (p.DH == 1 && p.DW == 1 && p.N * p.OH * p.OW >= 1024) {
    // Other strides, no dilation: the input rows ih = a + SH * i (phase a < SH) receive
    // taps kh = a + PH (mod SH) only, from output rows oh = i + (a + PH - kh) / SH, which
    // step by 1 as kh steps down by SH. So each phase (a, b) of the input gradient is a
    // stride-1 forward convolution of grad_output with the sub-kernel of those taps,
    // flipped and transposed (C x Og x KHa x KWa, kh descending), padding -(a + PH -
    // kh_max) / SH (negative: a crop), into the phase's (N, C, Ha, Wb) positions: every
    // input position is in one phase and is one float sum rounded once, and the GEMM
    // runs without the float col2im.
    kInBf16Phases.hit();
    at::Tensor gx = at::empty({p.N, p.C, p.H, p.W}, grad_output.options());
    if (gx.numel() == 0) return out_format == at::MemoryFormat::Contiguous ? gx : gx.contiguous(out_format);
    const at::Tensor gyc = grad_output.contiguous();
    // wt[g * Cg + c, o, kh, kw] = weight[g * Og + o, c, kh, kw].
    const at::Tensor wt =
        weight.reshape({p.G, Og, Cg, p.KH, p.KW}).transpose(1, 2).reshape({p.C, Og, p.KH, p.KW}).contiguous();
    auto taps = [](int64_t a, int64_t pad, int64_t S, int64_t Kn) {
      std::vector<int64_t> t;  // valid taps, descending
      for (int64_t k = Kn - 1; k >= 0; --k)
        if (((a + pad - k) % S + S) % S == 0) t.push_back(k);
      return t;
    };
    auto floor_div = [](int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
    for (int64_t a = 0; a < std::min(p.SH, p.H); ++a) {
      const std::vector<int64_t> th = taps(a, p.PH, p.SH, p.KH);
      const int64_t Ha = (p.H - a + p.SH - 1) / p.SH;
      for (int64_t b = 0; b < std::min(p.SW, p.W); ++b) {
        const std::vector<int64_t> tw = taps(b, p.PW, p.SW, p.KW);
        const int64_t Wb = (p.W - b + p.SW - 1) / p.SW;
        at::Tensor dst = gx.slice(2, a, p.H, p.SH).slice(3, b, p.W, p.SW);
        if (th.empty() || tw.empty()) {  // no tap reaches these positions
          dst.zero_();
          continue;
        }
        // sub[c, o, i, j] = wt[c, o, th[i], tw[j]] (a loop: index_select on the 4-D
        // weight took 13% of ResNet's 128 -> 256 3x3/2 input gradient).
        const int64_t nh = static_cast<int64_t>(th.size()), nw = static_cast<int64_t>(tw.size());
        at::Tensor sub = at::empty({p.C, Og, nh, nw}, wt.options());
        {
          const uint16_t* src = reinterpret_cast<const uint16_t*>(wt.const_data_ptr<at::BFloat16>());
          uint16_t* d = reinterpret_cast<uint16_t*>(sub.mutable_data_ptr<at::BFloat16>());
          for (int64_t co = 0; co < p.C * Og; ++co, src += p.KH * p.KW)
            for (int64_t i = 0; i < nh; ++i)
              for (int64_t j = 0; j < nw; ++j) *d++ = src[th[i] * p.KW + tw[j]];
        }
        Conv2dParams q = conv_input_grad_as_forward(p);  // then this phase's sizes and sub-kernel
        q.OH = Ha; q.OW = Wb;
        q.KH = static_cast<int64_t>(th.size()); q.KW = static_cast<int64_t>(tw.size());
        q.SH = q.SW = 1;
        q.PH = -floor_div(a + p.PH - th[0], p.SH);
        q.PW = -floor_div(b + p.PW - tw[0], p.SW);
        // The direct forward writes the phase's positions of gx in place (a 1x1 phase
        // too: its copy of grad_output costs less than the GEMM's output copied in).
        if (direct_forward(gyc, sub, c10::nullopt, q, dst, false, false, /*pointwise=*/true)) continue;
        at::Tensor part = at::empty({p.N, p.C, Ha, Wb}, grad_output.options());
        const bool ran = forward_gemm(gyc, sub, c10::nullopt, q, part, false, false);
        TORCH_INTERNAL_ASSERT(ran);
        dst.copy_(part);
      }
    }
    return out_format == at::MemoryFormat::Contiguous ? gx : gx.contiguous(out_format);
  }
  // Other strides (with dilation): per (sample, group) and panel of 32 output pixels, the float tile
  // col = W^T gy (taps x pixels, the reduction over output channels in pairs) is added
  // into a float copy of the sample's input gradient (col2im); rounded once at the end.
  kInBf16Gemm.hit();
  const int64_t Op = (Og + 1) / 2, P = p.OH * p.OW, HW = p.H * p.W;
  const int64_t k_panels = (K + kMR - 1) / kMR, q_panels = (P + kNR - 1) / kNR;
  const at::Tensor wc = weight.contiguous();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wc.const_data_ptr<at::BFloat16>());
  // a[((g * k_panels + kpanel) * Op + op) * kMR + i] = (W[g, 2op, k], W[g, 2op + 1, k]).
  std::vector<uint32_t> a(static_cast<size_t>(p.G * k_panels * Op * kMR), 0u);
  at::parallel_for(0, p.G * k_panels, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t gk = b0; gk < b1; ++gk) {
      const int64_t g = gk / k_panels, kpanel = gk % k_panels;
      uint32_t* dst = a.data() + gk * Op * kMR;
      for (int64_t i = 0; i < kMR; ++i) {
        const int64_t k = kpanel * kMR + i;
        if (k >= K) break;
        for (int64_t op = 0; op < Op; ++op) {
          const int64_t o = g * Og + 2 * op;
          const uint32_t lo = w[o * K + k], hi = 2 * op + 1 < Og ? w[(o + 1) * K + k] : 0;
          dst[op * kMR + i] = lo | (hi << 16);
        }
      }
    }
  });
  const at::Tensor gyc = grad_output.contiguous();
  const uint16_t* gy = reinterpret_cast<const uint16_t*>(gyc.const_data_ptr<at::BFloat16>());
  at::Tensor gx = at::empty({p.N, p.C, p.H, p.W}, grad_output.options());
  uint16_t* gxp = reinterpret_cast<uint16_t*>(gx.mutable_data_ptr<at::BFloat16>());
  at::parallel_for(0, p.N * p.G, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint16_t> bpanel(static_cast<size_t>(Op * 64));
    std::vector<float> acc(static_cast<size_t>(Cg * HW));
    alignas(64) float tile[kMR * kNR];
    std::vector<int64_t> ih0(kNR), iw0(kNR);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = item / p.G, g = item % p.G;
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint16_t* gyg = gy + (n * p.O + g * Og) * P;
      for (int64_t jb = 0; jb < q_panels; ++jb) {
        const int64_t q0 = jb * kNR, cols = std::min(kNR, P - q0);
        pack_gy_pixels(gyg, P, Og, q0, cols, bpanel.data());
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t q = q0 + j;
          ih0[j] = (q / p.OW) * p.SH - p.PH;
          iw0[j] = (q % p.OW) * p.SW - p.PW;
        }
        for (int64_t kpanel = 0; kpanel < k_panels; ++kpanel) {
          tile_f32(a.data() + (g * k_panels + kpanel) * Op * kMR, 1, kMR, bpanel.data(), Op, tile, false);
          for (int64_t i = 0; i < kMR; ++i) {
            const int64_t k = kpanel * kMR + i;
            if (k >= K) break;
            const int64_t c = k / (p.KH * p.KW), kh = (k / p.KW) % p.KH, kw = k % p.KW;
            float* plane = acc.data() + c * HW;
            const float* t = tile + i * kNR;
            const int64_t dh = kh * p.DH, dw = kw * p.DW;
            for (int64_t j = 0; j < cols; ++j) {
              const int64_t ih = ih0[j] + dh, iw = iw0[j] + dw;
              if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) plane[ih * p.W + iw] += t[j];
            }
          }
        }
      }
      vec::float_to_bf16(acc.data(), gxp + (n * p.C + g * Cg) * HW, Cg * HW);
    }
  });
  return out_format == at::MemoryFormat::Contiguous ? gx : gx.contiguous(out_format);
#else
  (void)grad_output; (void)weight; (void)p; (void)out_format;
  return at::Tensor();
#endif
}

namespace {
CNNEXT_PATH_NEEDS(kWBf16Direct, "conv2d.weight_grad.bf16_direct", kAvx512Bf16);

// The direct weight gradient (gw_tile above), for output channels 16 or more a group
// (in blocks of 64 or 32 that do not straddle groups). Returns an undefined tensor, having
// done nothing, where it does not apply; the caller runs the GEMM then.
at::Tensor direct_weight_backward(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dParams& p) {
#ifdef CNNEXT_BF16_GEMM
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), KHW = p.KH * p.KW, Kg = Cg * KHW;
  const int V = Og % 64 == 0 ? 4 : 2;
  const int64_t BW = 16 * V;
  if (!g_direct.load() || Og < 16 || (p.G > 1 && Og % BW != 0)) return at::Tensor();
  const int64_t M = (p.N + 1) / 2, rows = M * p.OH;  // sample pairs; rows of pairs
  const int64_t Hp = (p.OH - 1) * p.SH + conv_dilated_kernel(p.KH, p.DH);
  const int64_t Wh = p.OW + ((p.KW - 1) * p.DW) / p.SW;
  const int64_t xn = p.C * Hp * p.SW * Wh, rs = p.SH * p.SW * Wh;
  const int64_t copy = M * xn;  // dwords
  // The copy may not outgrow the tensors by much (a padding far past the kernel).
  if (copy > 2 * (input.numel() + grad_output.numel()) + (int64_t(1) << 17)) return at::Tensor();
  kWBf16Direct.hit();
  at::Tensor gw = at::empty({p.O, Cg, p.KH, p.KW}, grad_output.options());
  if (gw.numel() == 0) return gw;
  if (p.N * p.OH * p.OW == 0) return gw.zero_();
  const uint16_t* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  uint32_t* xc = thread_scratch<uint32_t>(ScratchPool::Bf16, 1, copy);
  at::parallel_for(0, M * p.C, 1, [&](int64_t i0, int64_t i1) {
    gw_copy_planes(x, strides_of(input), p, Hp, Wh, xc, i0, i1);
  });
  const int64_t ocbs = (p.O + BW - 1) / BW;
  const at::Tensor gyc = grad_output.contiguous();
  const uint16_t* gy = reinterpret_cast<const uint16_t*>(gyc.const_data_ptr<at::BFloat16>());
  uint32_t* gyp = thread_scratch<uint32_t>(ScratchPool::Bf16, 2, ocbs * rows * p.OW * BW);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) { gw_pack_gy(gy, p, BW, rows, gyp, r0, r1); });
  // Tiles (group, channel block, tap block of 7: consecutive tiles share a channel block's
  // grad_output); each thread sums its tiles over every row in order, a chunk of rows at a
  // time (the chunk's grad_output pairs, about 192 KiB a channel block, stay in L2 while
  // the thread's tiles pass over them), the float sums kept in memory between chunks: the
  // result does not depend on the thread count.
  const int64_t kblocks = (Kg + kGwRows - 1) / kGwRows, obs_g = (Og + BW - 1) / BW;
  const int64_t tiles = p.G * kblocks * obs_g;
  const int64_t chunk = std::max<int64_t>(1, (int64_t(192) << 10) / (p.OW * BW * 4));
  at::Tensor gwf = at::empty({p.O, Kg}, grad_output.options().dtype(at::kFloat));
  float* gwp = gwf.mutable_data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>((t1 - t0) * kGwRows * BW), 0.f);
    std::vector<int64_t> roffs(static_cast<size_t>((t1 - t0) * kGwRows));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / (kblocks * obs_g), kb = t % kblocks;
      for (int64_t i = 0; i < kGwRows; ++i) {
        const int64_t k = std::min(Kg - 1, kb * kGwRows + i);  // past K: a valid row, not stored
        const int64_t c = g * Cg + k / KHW, kh = (k % KHW) / p.KW, kw = k % p.KW;
        roffs[(t - t0) * kGwRows + i] =
            ((c * Hp + kh * p.DH) * p.SW + (kw * p.DW) % p.SW) * Wh + (kw * p.DW) / p.SW;
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t r1 = std::min(rows, r0 + chunk);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / (kblocks * obs_g), ob = g * obs_g + (t / kblocks) % obs_g;
        const uint32_t* gb = gyp + ob * rows * p.OW * BW;
        float* a = acc.data() + (t - t0) * kGwRows * BW;
        if (V == 4)
          gw_tile<4>(xc, roffs.data() + (t - t0) * kGwRows, xn, rs, p.OH, p.OW, gb, r0, r1, a);
        else
          gw_tile<2>(xc, roffs.data() + (t - t0) * kGwRows, xn, rs, p.OH, p.OW, gb, r0, r1, a);
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / (kblocks * obs_g), kb = t % kblocks, obg = (t / kblocks) % obs_g;
      const float* a = acc.data() + (t - t0) * kGwRows * BW;
      for (int64_t l = 0; l < BW; ++l) {
        const int64_t o = obg * BW + l;
        if (o >= Og) break;
        for (int64_t i = 0; i < kGwRows; ++i) {
          const int64_t k = kb * kGwRows + i;
          if (k >= Kg) break;
          gwp[(g * Og + o) * Kg + k] = a[i * BW + l];
        }
      }
    }
  });
  vec::float_to_bf16(gwp, reinterpret_cast<uint16_t*>(gw.mutable_data_ptr<at::BFloat16>()), p.O * Kg);
  return gw;
#else
  (void)grad_output; (void)input; (void)p;
  return at::Tensor();
#endif
}

}  // namespace

at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const Conv2dParams& p) {
#ifdef CNNEXT_BF16_GEMM
  if (!backward_applies(grad_output, p) || input.scalar_type() != at::kBFloat16) return at::Tensor();
  {
    at::Tensor gw = direct_weight_backward(grad_output, input, p);
    if (gw.defined()) return gw;
  }
  kWBf16Gemm.hit();
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t P = p.OH * p.OW, QP = (P + 1) / 2;
  const int64_t k_panels = (K + kMR - 1) / kMR, o_panels = (Og + kNR - 1) / kNR;
  at::Tensor gw = at::empty({p.O, Cg, p.KH, p.KW}, grad_output.options());
  if (gw.numel() == 0) return gw;
  if (p.N * P == 0) return gw.zero_();
  // B: grad_output in pairs of pixels, 32 output channels to a row, per (sample, group).
  const at::Tensor gyc = grad_output.contiguous();
  const uint16_t* gy = reinterpret_cast<const uint16_t*>(gyc.const_data_ptr<at::BFloat16>());
  // Pixel slots run across samples: sample n's pixel q is slot u = n * 2QP + q (an odd P
  // leaves one zero slot after each sample), so that small maps (7 x 7: 25 pairs) make
  // long reductions per tile instead of one short one per sample. Per (group, output
  // channel panel), the pairs of every sample in a row: b[((g * o_panels + op) * N + n)
  // * QP + qp] holds 64 values.
  const int64_t U = p.N * 2 * QP;
  std::vector<uint16_t> b(static_cast<size_t>(p.G * o_panels * p.N * QP * 64));
  at::parallel_for(0, p.N * p.G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = item / p.G, g = item % p.G;
      pack_gy_pairs(gy + (n * p.O + g * Og) * P, P, Og, b.data() + (g * o_panels * p.N + n) * QP * 64,
                    p.N * QP * 64);
    }
  });
  // Each thread owns a run of (group, tap panel) tiles and accumulates them in float
  // over every slot, a chunk of slots at a time (the chunk's B panels are reused by
  // every tap panel): the sums do not depend on the thread count.
  // Slots per chunk: a multiple of kNR (so even), no more than the panels U spans.
  const int64_t kChunk = std::min<int64_t>(256, (U + kNR - 1) / kNR * kNR);
  const uint16_t* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  const Strides4 xs = strides_of(input);
  at::Tensor gwf = at::empty({p.O, K}, grad_output.options().dtype(at::kFloat));
  float* gwp = gwf.mutable_data_ptr<float>();
  at::parallel_for(0, p.G * k_panels, 1, [&](int64_t t0, int64_t t1) {
    // Blocks of tiles whose float accumulators stay in L2 (256 KiB) while every chunk of
    // slots passes over them, then go to gw at once, from L2 (wide layers, e.g. 512 x
    // 4608, have megabytes of them); each tile sums the chunks in the same order.
    const int64_t block = std::max<int64_t>(1, (int64_t(256) << 10) / (o_panels * kMR * kNR * 4));
    std::vector<float> acc(static_cast<size_t>(std::min(block, t1 - t0) * o_panels * kMR * kNR));
    std::vector<uint16_t> abuf(static_cast<size_t>(kMR * kChunk));
    std::vector<PanelRuns> segs(static_cast<size_t>(kChunk / kNR));
    for (int64_t tb0 = t0; tb0 < t1; tb0 += block) {
      const int64_t tb1 = std::min(t1, tb0 + block);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = tb0 / k_panels; g <= (tb1 - 1) / k_panels; ++g) {
        const int64_t kp0 = std::max(tb0, g * k_panels) - g * k_panels;
        const int64_t kp1 = std::min(tb1, (g + 1) * k_panels) - g * k_panels;
        const uint16_t* bg = b.data() + g * o_panels * p.N * QP * 64;
        for (int64_t u0 = 0; u0 < U; u0 += kChunk) {
          const int64_t pairs = std::min(kChunk, U - u0) / 2;
          // The chunk's panels of 32 slots.
          for (int64_t t = 0; t < kChunk / kNR; ++t) new (&segs[t]) PanelRuns(p, u0 + t * kNR, U, xs.n, 2 * QP);
          for (int64_t kpanel = kp0; kpanel < kp1; ++kpanel) {
            pack_taps(x, xs, p, g * Cg, K, kpanel * kMR, segs.data(), kChunk, abuf.data());
            float* tacc = acc.data() + ((g * k_panels + kpanel - tb0) * o_panels) * kMR * kNR;
            for (int64_t op = 0; op < o_panels; ++op)
              tile_f32(reinterpret_cast<const uint32_t*>(abuf.data()), kChunk / 2, 1,
                       bg + (op * p.N * QP + u0 / 2) * 64, pairs, tacc + op * kMR * kNR, true);
          }
        }
      }
      // gw[g * Og + o, k] = the tile's (k, o) entry: per output row, runs of up to 8 tap
      // panels' contiguous taps (one float per row K apart missed the cache on every store).
      for (int64_t tb = tb0; tb < tb1; tb += 8) {
        const int64_t te = std::min(tb1, tb + 8);
        for (int64_t op = 0; op < o_panels; ++op)
          for (int64_t j = 0; j < kNR && op * kNR + j < Og; ++j)
            for (int64_t t = tb; t < te; ++t) {
              const int64_t g = t / k_panels, kpanel = t % k_panels;
              const float* tile = acc.data() + ((t - tb0) * o_panels + op) * kMR * kNR + j;
              float* dst = gwp + (g * Og + op * kNR + j) * K + kpanel * kMR;
              const int64_t rows = std::min(kMR, K - kpanel * kMR);
              for (int64_t i = 0; i < rows; ++i) dst[i] = tile[i * kNR];
            }
      }
    }
  });
  uint16_t* out = reinterpret_cast<uint16_t*>(gw.mutable_data_ptr<at::BFloat16>());
  vec::float_to_bf16(gwp, out, p.O * K);
  return gw;
#else
  (void)grad_output; (void)input; (void)p;
  return at::Tensor();
#endif
}

}  // namespace bf16
}  // namespace cpu
}  // namespace cnnext
