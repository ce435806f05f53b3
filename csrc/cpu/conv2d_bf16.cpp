// bfloat16 forward convolution on AVX512_BF16: an implicit-im2col GEMM whose
// micro-kernel is vdpbf16ps (each float lane adds the products of one pair of bfloat16
// values: two steps of K per instruction), accumulating in float; each output is rounded
// to bfloat16 once, after the bias and the ReLU.
//
//   out[n, g*Og + o, q] = sum_k W[g, o, k] * X_n[k, q],   k = (c, kh, kw), q = (oh, ow)
//
// A (the weight, Og x K per group) is packed once per call in panels of kMR rows, K in
// pairs: a[((g * panels + i / kMR) * Kp + kp) * kMR + i % kMR] = the 32-bit pair
// (W[o, 2kp], W[o, 2kp + 1]), zero beyond Og and K. B (the im2col of one sample) is packed
// per work item, one panel of kNR = 32 output pixels: b[kp * 64 + 2j + h] = X[2kp + h, q0 + j],
// built row by row of the im2col (a masked 512-bit load per output row touched where the
// stride is 1; two and the even lanes where it is 2; a scalar gather otherwise) and
// interleaved in pairs (vpermt2w). The kernel keeps a kMR x 32 tile of float accumulators
// in 16 registers over all of K.
//
// Work items are (sample, group, pixel panel): each thread packs its B panel once and runs
// every A panel over it. The result does not depend on the thread count.
//
// Used where the CPU has AVX512_BF16 (cpu_features(), so CNNEXT_CPU_ISA=avx2 turns it off)
// and the output is contiguous (NCHW); elsewhere conv2d_half.cpp runs the float kernels.
#include "cpu/conv2d_bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
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

CNNEXT_PATH(kFwdBf16Gemm, "conv2d.fwd.bf16_gemm");

constexpr int64_t kMR = 8;   // rows (output channels) per A panel
constexpr int64_t kNR = 32;  // columns (output pixels) per B panel: two zmm of 16 floats

#ifdef CNNEXT_BF16_GEMM
#define CNNEXT_BF16 CNNEXT_TARGET("avx512f,avx512bw,avx512vl,avx512bf16,fma,bmi2")

// One kMR x kNR tile: acc = sum over kp of a-pairs x b-pairs; then + bias, [relu],
// rounded to bfloat16, stored to rows [0, rows) and columns [0, cols) of c (row stride ldc).
CNNEXT_BF16 void micro_kernel(const uint32_t* __restrict__ a, const uint16_t* __restrict__ b,
                              int64_t Kp, const float* bias, bool relu, uint16_t* c, int64_t ldc,
                              int64_t rows, int64_t cols) {
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
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xFFFF) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1);
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
    uint16_t* row = c + i * ldc;
    _mm256_mask_storeu_epi16(row, m0, (__m256i)_mm512_cvtneps_pbh(v0));
    if (m1) _mm256_mask_storeu_epi16(row + 16, m1, (__m256i)_mm512_cvtneps_pbh(v1));
  }
}

// The im2col row of tap (c, kh, kw) over output pixels [q0, q0 + 32) of one sample, into
// seg (32 values, zero outside the input and beyond P).
CNNEXT_BF16 inline __m512i im2col_row(const uint16_t* x, const Strides4& xs, const Conv2dParams& p,
                                      int64_t c, int64_t kh, int64_t kw, int64_t q0, int64_t P,
                                      uint16_t* scratch) {
  const int64_t q1 = std::min(q0 + kNR, P);
  const uint16_t* plane = x + c * xs.c;
  if (p.SW == 1 && xs.w == 1) {
    __m512i seg = _mm512_setzero_si512();
    // One run per output row touched: positions [s, e) of the panel, all of row oh.
    for (int64_t q = q0; q < q1;) {
      const int64_t oh = q / p.OW, ow = q % p.OW;
      const int64_t e = std::min(q1, q + (p.OW - ow));
      const int64_t ih = oh * p.SH - p.PH + kh * p.DH;
      if (ih >= 0 && ih < p.H) {
        // Position t of the panel (q = q0 + t) reads iw = (q - oh * OW) - PW + kw * DW.
        const int64_t shift = q0 - oh * p.OW - p.PW + kw * p.DW;  // iw of position 0
        // Valid positions: t in [q - q0, e - q0) and 0 <= shift + t < W.
        const int64_t lo = std::max(q - q0, -shift), hi = std::min(e - q0, p.W - shift);
        if (lo < hi) {
          const __mmask32 m = static_cast<__mmask32>(
              ((hi >= 32 ? ~uint64_t(0) : ((uint64_t(1) << hi) - 1)) & ~((uint64_t(1) << lo) - 1)));
          // Masked-off lanes are not read, so the base may lie outside the row.
          const uint16_t* base = plane + ih * xs.h + shift;
          seg = _mm512_mask_loadu_epi16(seg, m, base);
        }
      }
      q = e;
    }
    return seg;
  }
  if (p.SW == 2 && xs.w == 1) {
    // Position t reads element 2t from the run's base: two masked 32-element loads,
    // then the even elements (vpermt2w); runs do not share lanes, so they are OR-ed.
    alignas(64) static const uint16_t even_idx[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                      22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                      44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
    const __m512i ie = _mm512_load_si512(even_idx);
    __m512i seg = _mm512_setzero_si512();
    for (int64_t q = q0; q < q1;) {
      const int64_t oh = q / p.OW, ow = q % p.OW;
      const int64_t e = std::min(q1, q + (p.OW - ow));
      const int64_t ih = oh * p.SH - p.PH + kh * p.DH;
      if (ih >= 0 && ih < p.H) {
        // Position t of the panel reads iw = 2 * (q0 + t - oh * OW) - PW + kw * DW.
        const int64_t shift = 2 * (q0 - oh * p.OW) - p.PW + kw * p.DW;
        // Valid positions: t in [q - q0, e - q0) and 0 <= shift + 2t < W.
        const int64_t lo = std::max(q - q0, (-shift + 1) / 2 > 0 ? (-shift + 1) / 2 : int64_t(0));
        const int64_t hi = std::min(e - q0, (p.W - shift + 1) / 2);
        if (lo < hi) {
          const uint32_t m = static_cast<uint32_t>(
              (hi >= 32 ? ~uint64_t(0) : ((uint64_t(1) << hi) - 1)) & ~((uint64_t(1) << lo) - 1));
          const uint64_t m64 = _pdep_u64(m, 0x5555555555555555ull);
          const uint16_t* base = plane + ih * xs.h + shift;
          const __m512i v0 = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m64), base);
          const __m512i v1 = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m64 >> 32), base + 32);
          seg = _mm512_or_si512(seg, _mm512_permutex2var_epi16(v0, ie, v1));
        }
      }
      q = e;
    }
    return seg;
  }
  for (int64_t t = 0; t < kNR; ++t) {
    const int64_t q = q0 + t;
    uint16_t v = 0;
    if (q < q1) {
      const int64_t oh = q / p.OW, ow = q % p.OW;
      const int64_t ih = oh * p.SH - p.PH + kh * p.DH, iw = ow * p.SW - p.PW + kw * p.DW;
      if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) v = plane[ih * xs.h + iw * xs.w];
    }
    scratch[t] = v;
  }
  return _mm512_loadu_si512(scratch);
}

// B panel of pixels [q0, q0 + 32) of sample x (group's channels from c0): Kp pairs of rows.
CNNEXT_BF16 void pack_b(const uint16_t* x, const Strides4& xs, const Conv2dParams& p, int64_t c0,
                        int64_t K, int64_t q0, int64_t P, uint16_t* b) {
  alignas(64) uint16_t scratch[kNR];
  alignas(64) static const uint16_t lo_idx[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                  11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                  53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                  27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  const int64_t KHW = p.KH * p.KW;
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
  (void)KHW;
  for (int64_t k = 0; k < K; k += 2) {
    const __m512i r0 = im2col_row(x, xs, p, c, kh, kw, q0, P, scratch);
    next();
    __m512i r1 = _mm512_setzero_si512();
    if (k + 1 < K) {
      r1 = im2col_row(x, xs, p, c, kh, kw, q0, P, scratch);
      next();
    }
    uint16_t* out = b + (k / 2) * 64;
    _mm512_storeu_si512(out, _mm512_permutex2var_epi16(r0, ilo, r1));
    _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(r0, ihi, r1));
  }
}
#endif  // CNNEXT_BF16_GEMM

}  // namespace

bool available() {
#ifdef CNNEXT_BF16_GEMM
  const CpuFeatures& f = cpu_features();
  return f.avx512_bf16 && f.avx512f && f.avx512bw;
#else
  return false;
#endif
}

bool conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const Conv2dParams& p, at::Tensor& out,
                    bool relu) {
#ifdef CNNEXT_BF16_GEMM
  if (input.scalar_type() != at::kBFloat16 || !available() || !out.is_contiguous()) return false;
  kFwdBf16Gemm.hit();
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t Kp = (K + 1) / 2, P = p.OH * p.OW;
  const int64_t a_panels = (Og + kMR - 1) / kMR, b_panels = (P + kNR - 1) / kNR;
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
  const int64_t items = p.N * p.G * b_panels;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint16_t> bpanel(static_cast<size_t>(Kp * 64));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t jb = item % b_panels, ng = item / b_panels, g = ng % p.G, n = ng / p.G;
      const int64_t q0 = jb * kNR, cols = std::min(kNR, P - q0);
      pack_b(x + n * xs.n, xs, p, g * Cg, K, q0, P, bpanel.data());
      for (int64_t ip = 0; ip < a_panels; ++ip) {
        const int64_t o0 = g * Og + ip * kMR;
        micro_kernel(a.data() + (g * a_panels + ip) * Kp * kMR, bpanel.data(), Kp,
                     bias_f.empty() ? nullptr : bias_f.data() + o0, relu,
                     y + (n * p.O + o0) * P + q0, P, std::min(kMR, Og - ip * kMR), cols);
      }
    }
  });
  return true;
#else
  (void)input; (void)weight; (void)bias; (void)p; (void)out; (void)relu;
  return false;
#endif
}

}  // namespace bf16
}  // namespace cpu
}  // namespace cnnext
