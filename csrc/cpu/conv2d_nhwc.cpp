// float32 channels_last conv2d forward on our sgemm: see csrc/cpu/conv2d_nhwc.h.
#include "cpu/conv2d_nhwc.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/sgemm.h"
#include "paths.h"

namespace cnnext {
namespace cpu {
namespace conv_nhwc {
namespace {

CNNEXT_PATH_NEEDS(kNhwc, "conv2d.fwd.sgemm_nhwc", kAvx512F);
CNNEXT_PATH_NEEDS(kNhwcSamples, "conv2d.fwd.sgemm_nhwc.sample_blocks", kAvx512F);
CNNEXT_PATH_NEEDS(kUnfolded, "conv2d.fwd.sgemm_nhwc.unfolded", kAvx512F);
CNNEXT_PATH_NEEDS(kKernelRows, "conv2d.fwd.sgemm_nhwc.kernel_rows", kAvx512F);
CNNEXT_PATH_NEEDS(kTaps, "conv2d.fwd.sgemm_nhwc.taps", kAvx512F);
CNNEXT_PATH_NEEDS(kInPlace, "conv2d.fwd.sgemm_nhwc.in_place", kAvx512F);

// Output positions per work item: enough rows of A per GEMM to reuse each packed B panel
// (the weight of one tap, C x 32 floats) over many micro-tiles.
constexpr int64_t kTargetPositions = 256;
// The largest zero-padded input copy of one item, in bytes (the GEMMs read it in
// slices of sgemm's K block, which stay in the core's L2).
constexpr int64_t kBufBytes = 2 * 1024 * 1024;
// Channels in a kernel row below which the block is unfolded into one GEMM.
constexpr int64_t kUnfoldBelow = 96;

// Input rows / columns the windows of `rows` output rows / all output columns read.
int64_t rows_read(const Conv2dParams& p, int64_t rows) { return (rows - 1) * p.SH + conv_dilated_kernel(p.KH, p.DH); }
int64_t cols_read(const Conv2dParams& p) { return (p.OW - 1) * p.SW + conv_dilated_kernel(p.KW, p.DW); }

// The work items: `samples` whole samples each (maps with fewer positions than
// kTargetPositions), or bands of `rows` output rows of one sample.
struct Blocks {
  int64_t samples = 1, rows = 1, per_sample = 1, count = 0;
};

Blocks plan(const Conv2dParams& p) {
  Blocks b;
  const int64_t positions = p.OH * p.OW;
  const int64_t row_bytes = cols_read(p) * p.C * int64_t(sizeof(float));
  if (positions < kTargetPositions && p.N > 1) {
    b.rows = p.OH;
    b.samples = std::min(p.N, std::max<int64_t>(1, kTargetPositions / positions));
    while (b.samples > 1 && b.samples * rows_read(p, p.OH) * row_bytes > kBufBytes) --b.samples;
    b.count = (p.N + b.samples - 1) / b.samples;
    if (b.samples > 1) return b;
    b.samples = 1;
  }
  b.rows = std::min(p.OH, std::max<int64_t>(1, (kTargetPositions + p.OW - 1) / p.OW));
  while (b.rows > 1 && rows_read(p, b.rows) * row_bytes > kBufBytes) --b.rows;
  b.per_sample = (p.OH + b.rows - 1) / b.rows;
  b.count = p.N * b.per_sample;
  return b;
}

enum class Form { kUnfolded, kKernelRows, kTaps };

Form form_of(const Conv2dParams& p) {
  if (p.KW * p.C < kUnfoldBelow && p.KH * p.KW > 1) return Form::kUnfolded;
  return p.DW == 1 ? Form::kKernelRows : Form::kTaps;
}

}  // namespace

bool applies(const Conv2dParams& p, const Strides4& xs, const Strides4& ys) {
  return p.G == 1 && xs.c == 1 && xs.w == p.C && ys.c == 1 && ys.w == p.O && ys.h == p.OW * p.O &&
         ys.n == p.OH * p.OW * p.O;
}

void forward(const float* x, const Strides4& xs, const float* w, const Strides4& ws, const float* bias,
             float* y, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done) {
  kNhwc.hit();
  const Blocks blocks = plan(p);
  if (blocks.samples > 1) kNhwcSamples.hit();
  const int64_t C = p.C, O = p.O, KW = p.KW, K = p.KH * KW * C;
  const int64_t R = rows_read(p, blocks.rows), WC = cols_read(p) * C;

  // The reduction index k runs over (kh, kw, channel), split into `groups` GEMMs of Kg
  // each, whose A rows are contiguous in the buffer: one GEMM over an unfolded block when
  // a kernel row holds few channels (the stem's 3), a GEMM per kernel row when the taps
  // of a row are adjacent pixels (dilation 1 across), a GEMM per tap otherwise.
  const Form form = form_of(p);
  (form == Form::kUnfolded ? kUnfolded : form == Form::kKernelRows ? kKernelRows : kTaps).hit();
  const int64_t groups = form == Form::kUnfolded ? 1 : form == Form::kKernelRows ? p.KH : p.KH * KW;
  const int64_t Kg = K / groups;
  // Without padding the GEMMs read x itself (its pixels are dense: C floats apart), with
  // padding the item's zero-padded copy. A row of it, and a sample, are row_stride and
  // sample_stride floats apart.
  const bool in_place = p.PH == 0 && p.PW == 0;
  if (in_place) kInPlace.hit();
  const int64_t row_stride = in_place ? xs.h : WC, sample_stride = in_place ? xs.n : R * WC;
  // A's offset of group g from a window's first pixel (not used unfolded).
  auto group_offset = [&](int64_t g) {
    return form == Form::kKernelRows ? g * p.DH * row_stride
                                     : (g / KW) * p.DH * row_stride + (g % KW) * p.DW * C;
  };

  // The weight of each group as B (Kg x O), packed in panels of kNR columns.
  const int64_t group_size = sgemm::packed_b_size(Kg, O);
  const int64_t panels = (O + sgemm::kNR - 1) / sgemm::kNR;
  std::vector<float> packed(groups * group_size);
  at::parallel_for(0, groups * panels, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t g = item / panels, jp = item % panels;
      float* dst = packed.data() + g * group_size + jp * Kg * sgemm::kNR;
      const int64_t o0 = jp * sgemm::kNR, no = std::min(sgemm::kNR, O - o0);
      for (int64_t kk = 0; kk < Kg; ++kk, dst += sgemm::kNR) {
        const int64_t k = g * Kg + kk, ci = k % C, kw = (k / C) % KW, kh = k / (C * KW);
        const float* src = w + o0 * ws.n + ci * ws.c + kh * ws.h + kw * ws.w;
        for (int64_t j = 0; j < no; ++j) dst[j] = src[j * ws.n];
        for (int64_t j = no; j < sgemm::kNR; ++j) dst[j] = 0.f;
      }
    }
  });

  at::parallel_for(0, blocks.count, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(in_place ? 0 : blocks.samples * R * WC);
    std::vector<int64_t> base(blocks.samples * blocks.rows * p.OW);
    std::vector<float> col(form == Form::kUnfolded ? base.size() * K : 0);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n0 = (item / blocks.per_sample) * blocks.samples;
      const int64_t n1 = std::min(p.N, n0 + blocks.samples);
      const int64_t oh0 = (item % blocks.per_sample) * blocks.rows;
      const int64_t oh1 = std::min(p.OH, oh0 + blocks.rows);
      const int64_t ns = n1 - n0, nr = oh1 - oh0;
      // The input under the item's windows, zero-padded: sample s, row r, column c at
      // buf[(s * R + r) * WC + c * C], input row oh0 * SH - PH + r, column c - PW.
      const int64_t rows_in = rows_read(p, nr);
      const int64_t c_lo = std::min(cols_read(p), std::max<int64_t>(0, p.PW));  // first column in the input
      const int64_t c_hi = std::max(c_lo, std::min(cols_read(p), p.W + p.PW));  // one past the last
      for (int64_t s = 0; s < ns && !in_place; ++s) {
        for (int64_t r = 0; r < rows_in; ++r) {
          float* dst = buf.data() + (s * R + r) * WC;
          const int64_t ih = oh0 * p.SH - p.PH + r;
          if (ih < 0 || ih >= p.H || c_hi == c_lo) {
            std::fill(dst, dst + WC, 0.f);
            continue;
          }
          std::fill(dst, dst + c_lo * C, 0.f);
          std::memcpy(dst + c_lo * C, x + (n0 + s) * xs.n + ih * xs.h + (c_lo - p.PW) * C,
                      sizeof(float) * (c_hi - c_lo) * C);
          std::fill(dst + c_hi * C, dst + WC, 0.f);
        }
      }
      // Row m of the item's GEMMs: output (sample s, row oh0 + r, column ow), its window
      // at a + base[m] (+ the group's offset).
      const float* a = in_place ? x + n0 * xs.n + oh0 * p.SH * xs.h : buf.data();
      const int64_t M = ns * nr * p.OW;
      for (int64_t s = 0, m = 0; s < ns; ++s)
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t ow = 0; ow < p.OW; ++ow, ++m)
            base[m] = s * sample_stride + r * p.SH * row_stride + ow * p.SW * C;
      if (form == Form::kUnfolded) {
        // Row m = the window's KH x KW pixels of C channels, in k's order: a kernel row is
        // KW x C contiguous floats where its taps are adjacent pixels.
        for (int64_t m = 0; m < M; ++m) {
          float* dst = col.data() + m * K;
          for (int64_t kh = 0; kh < p.KH; ++kh) {
            const float* src = a + base[m] + kh * p.DH * row_stride;
            if (p.DW == 1) {
              std::memcpy(dst, src, sizeof(float) * KW * C);
              dst += KW * C;
            } else {
              for (int64_t kw = 0; kw < KW; ++kw, dst += C) std::memcpy(dst, src + kw * p.DW * C, sizeof(float) * C);
            }
          }
          base[m] = m * K;
        }
        a = col.data();
      }
      float* yb = y + (n0 * p.OH + oh0) * p.OW * O;
      if (bias) {
        for (int64_t m = 0; m < M; ++m) std::memcpy(yb + m * O, bias, sizeof(float) * O);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t off = form == Form::kUnfolded ? 0 : group_offset(g);
        sgemm::gemm_arows(a + off, base.data(), packed.data() + g * group_size, M, O, Kg, yb, O,
                          bias != nullptr || g > 0);
      }
      if (relu) {
        for (int64_t i = 0; i < M * O; ++i) yb[i] = yb[i] < 0.f ? 0.f : yb[i];
      }
      if (rows_done) {
        for (int64_t n = n0; n < n1; ++n) rows_done(n, oh0, oh1);
      }
    }
  });
}

}  // namespace conv_nhwc
}  // namespace cpu
}  // namespace cnnext
