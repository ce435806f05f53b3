// See conv2d_sgemm.h. Three GEMMs per convolution, each over chunks of global output rows
// (several samples per chunk when the maps are small):
//   forward          y_chunk (Og x L)  = W (Og x K) * col (K x L)      or its transpose
//   input gradient   col (Kc x L)      = W^T[k rows] (Kc x Og) * gy    or its transpose; col2im
//   weight gradient  gw^T[k rows] (Kc x Og) += col (Kc x L) * gy^T (L x Og)
// Work items: forward (group, chunk, block of output channels); input gradient (group,
// block of input channels, block of samples), so no two items add to one element of gx;
// weight gradient (group, block of rows of gw^T) with every position reduced inside the
// item: no partial sums per thread, and the order of the sum is fixed by the shape.
#include "cpu/conv2d_sgemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/cpu_features.h"
#include "common/conv2d_phases.h"
#include "cpu/scratch.h"
#include "cpu/sgemm.h"
#include "paths.h"

namespace cnnext {
namespace cpu {
namespace conv_sgemm {
namespace {

CNNEXT_PATH_NEEDS(kPanels, "conv2d.sgemm.panels", kAvx512F);
CNNEXT_PATH_NEEDS(kImplicit, "conv2d.sgemm.implicit", kAvx512F);
CNNEXT_PATH_NEEDS(kImplicitPhases, "conv2d.sgemm.implicit_phases", kAvx512F);
CNNEXT_PATH_NEEDS(kGather, "conv2d.sgemm.gather", kAvx512F);
CNNEXT_PATH_NEEDS(kGatherT, "conv2d.sgemm.gather_transposed", kAvx512F);
CNNEXT_PATH_NEEDS(kSmallN, "conv2d.sgemm.small_n", kAvx512F);
CNNEXT_PATH_NEEDS(kLanes, "conv2d.sgemm.channel_lanes", kAvx512F);
// How the forward's columns are gathered (once per gather call that used it): vector copies
// of runs of positions at a stride of 1, of 2, or another; a hardware gather of 16 positions
// where runs are short; the scalar loop (no AVX-512, or a stride past int32). And whether
// the columns were read from the input itself (no padding) instead of a padded copy.
CNNEXT_PATH_NEEDS(kRunsUnit, "conv2d.sgemm.gather.runs_unit", kAvx512F);
CNNEXT_PATH_NEEDS(kRunsStride2, "conv2d.sgemm.gather.runs_stride2", kAvx512F);
CNNEXT_PATH_NEEDS(kRunsStrided, "conv2d.sgemm.gather.runs_strided", kAvx512F);
CNNEXT_PATH_NEEDS(kGatherHw, "conv2d.sgemm.gather.hw16", kAvx512F);
CNNEXT_PATH_NEEDS(kGatherScalar, "conv2d.sgemm.gather.scalar", kAvx512F);
CNNEXT_PATH_NEEDS(kUnpaddedSource, "conv2d.sgemm.gather.unpadded_source", kAvx512F);
CNNEXT_PATH_NEEDS(kInForward, "conv2d.input_grad.sgemm_as_forward", kAvx512F);
CNNEXT_PATH_NEEDS(kInCol2im, "conv2d.input_grad.sgemm_col2im", kAvx512F);
CNNEXT_PATH_NEEDS(kInCol2imT, "conv2d.input_grad.sgemm_col2im_transposed", kAvx512F);
CNNEXT_PATH_NEEDS(kInPhases, "conv2d.input_grad.sgemm_phases", kAvx512F);
CNNEXT_PATH_NEEDS(kInRows, "conv2d.input_grad.sgemm_rows", kAvx512F);
CNNEXT_PATH_NEEDS(kWImplicit, "conv2d.weight_grad.sgemm_implicit", kAvx512F);
CNNEXT_PATH_NEEDS(kWImplicitPhases, "conv2d.weight_grad.sgemm_implicit_phases", kAvx512F);
CNNEXT_PATH_NEEDS(kWGather, "conv2d.weight_grad.sgemm_gather", kAvx512F);
// Gather-path weight gradients whose packed gy was made once and shared by the tap blocks.
CNNEXT_PATH_NEEDS(kWSharedA, "conv2d.weight_grad.sgemm_gather_shared_gy", kAvx512F);
CNNEXT_PATH_NEEDS(kWLanes, "conv2d.weight_grad.sgemm_lanes", kAvx512F);

using sgemm::kMR;
using sgemm::kNR;

// Output positions (over the whole batch) up to which the forward multiplies the weight in
// place (forward_small_n): three GEMM column tiles.
constexpr int64_t kSmallMaxPositions = 3 * sgemm::kSmallNR;

// Column-buffer floats a chunk aims for (1 MiB).
constexpr int64_t kColBudget = int64_t(1) << 18;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Scratch memory of the calling thread, kept between calls: slot 0 per-item buffers,
// slot 1 the packed weights the caller shares with its workers, slot 2 the flipped weight
// of the input gradient, slot 3 the zero-padded input of the implicit forward.
float* scratch(int slot, int64_t elems) { return thread_scratch(ScratchPool::Sgemm, slot, elems); }

// Fraction of a GEMM tile grid that holds real elements.
double fill(int64_t m, int64_t n, int64_t mr, int64_t nr) {
  return double(m) / double(round_up(m, mr)) * double(n) / double(round_up(n, nr));
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
#include <immintrin.h>
#define CNNEXT_CONV_AVX512 CNNEXT_TARGET("avx512f")
#else
#define CNNEXT_CONV_AVX512
#endif

// d[q] = src[q] for q in [a, b), 0 elsewhere in [0, seg); src is only read in [a, b).
CNNEXT_CONV_AVX512 inline void copy_segment(float* d, int64_t seg, int64_t a, int64_t b,
                                            const float* src) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  // These paths run only where sgemm::available() (AVX-512F). Masked loads read no lane
  // outside [a, b).
  for (int64_t v = 0; v < seg; v += 16) {
    const int64_t cnt = std::min<int64_t>(16, seg - v);
    const int64_t lo = std::clamp<int64_t>(a - v, 0, 16), hi = std::clamp<int64_t>(b - v, lo, 16);
    const __mmask16 st = __mmask16((1u << cnt) - 1);
    const __mmask16 ld = __mmask16(((1u << hi) - 1) & ~((1u << lo) - 1));
    const __m512 val = _mm512_maskz_loadu_ps(ld, reinterpret_cast<const float*>(
                                                     reinterpret_cast<uintptr_t>(src) + v * sizeof(float)));
    _mm512_mask_storeu_ps(d + v, st, val);
  }
#else
  for (int64_t q = 0; q < a; ++q) d[q] = 0.f;
  for (int64_t q = a; q < b; ++q) d[q] = src[q];
  for (int64_t q = b; q < seg; ++q) d[q] = 0.f;
#endif
}

// Columns of taps [k0, k1) (k = (c * KH + kh) * KW + kw; x points at the first channel of
// the group in sample 0) for global output rows [r0, r1): element (k - k0, l) goes to
//   out[(l / width) * (k1 - k0) * width + (k - k0) * width + l % width],
// panels of `width` positions (width >= L: plain rows of stride width). With pad_tail the
// positions from L to the end of the last panel are zero.
CNNEXT_CONV_AVX512 void im2col_panels(const float* x, const Strides4& xs, const Conv2dParams& p,
                                      int64_t k0, int64_t k1, int64_t r0, int64_t r1,
                                      int64_t width, float* out, bool pad_tail) {
  const int64_t pstride = (k1 - k0) * width, L = (r1 - r0) * p.OW;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t c = k / (p.KH * p.KW), kh = (k / p.KW) % p.KH, kw = k % p.KW;
    float* base = out + (k - k0) * width;
    int64_t lo, hi;
    conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &lo, &hi);
    const int64_t iw_lo = conv_in_coord(lo, kw, p.SW, p.PW, p.DW);
    const int64_t step = p.SW * xs.w;
    int64_t n = r0 / p.OH, oh = r0 % p.OH;
    int64_t pi = 0, j = 0;  // panel and offset in it of the row's first position
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
      const bool row_valid = ih >= 0 && ih < p.H;
      const float* src = x + n * xs.n + c * xs.c + ih * xs.h + iw_lo * xs.w;  // read when valid
      for (int64_t ow = 0; ow < p.OW;) {
        const int64_t seg = std::min(width - j, p.OW - ow);
        float* d = base + pi * pstride + j;
        const int64_t a = row_valid ? std::clamp(lo, ow, ow + seg) : ow + seg;
        const int64_t b = row_valid ? std::clamp(hi, a, ow + seg) : ow + seg;
        if (step == 1) {
          // src shifted so that element q - ow of the segment reads src_seg[q - ow]
          // (an address computed in integers: it may lie before src, but no lane outside
          // [a, b) is read).
          const float* src_seg = reinterpret_cast<const float*>(
              reinterpret_cast<uintptr_t>(src) + (ow - lo) * int64_t(sizeof(float)));
          copy_segment(d, seg, a - ow, b - ow, src_seg);
        } else {
          for (int64_t q = ow; q < a; ++q) d[q - ow] = 0.f;
          for (int64_t q = a; q < b; ++q) d[q - ow] = src[(q - lo) * step];
          for (int64_t q = b; q < ow + seg; ++q) d[q - ow] = 0.f;
        }
        ow += seg;
        j += seg;
        if (j == width) {
          j = 0;
          ++pi;
        }
      }
      if (++oh == p.OH) {
        oh = 0;
        ++n;
      }
    }
    if (pad_tail) {
      for (int64_t l = L; l < round_up(L, width); ++l) base[(l / width) * pstride + l % width] = 0.f;
    }
  }
}

// Channels [0, count) of grad_output (g points at the first) for global rows [r0, r1), in
// panels of `width` positions as im2col_panels writes them: a 1x1 unpadded convolution's columns.
void pack_positions(const float* g, const Strides4& gs, const Conv2dParams& p, int64_t count,
                    int64_t r0, int64_t r1, int64_t width, float* out) {
  Conv2dParams q = p;
  q.H = p.OH;
  q.W = p.OW;
  q.KH = q.KW = q.SH = q.SW = q.DH = q.DW = 1;
  q.PH = q.PW = 0;
  im2col_panels(g, gs, q, 0, count, r0, r1, width, out, true);
}

// Channels [0, Og) of grad_output (g points at the first) for global rows [r0, r1),
// channel-major in panels of `width` channels: out[(o / width) * L * width + l * width +
// o % width], zero-padded (sgemm's packed A of gy with width kMR, packed B of gy^T with kNR).
CNNEXT_CONV_AVX512 void pack_channels(const float* g, const Strides4& gs, const Conv2dParams& p, int64_t Og,
                   int64_t r0, int64_t r1, int64_t width, float* out) {
  const int64_t L = (r1 - r0) * p.OW;
  for (int64_t o0 = 0; o0 < Og; o0 += width) {
    float* panel = out + o0 * L;
    const int64_t nb = std::min(width, Og - o0);
    if (nb < width) {
      for (int64_t l = 0; l < L; ++l) std::fill(panel + l * width + nb, panel + (l + 1) * width, 0.f);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / p.OH, oh = r % p.OH;
      float* dst = panel + (r - r0) * p.OW * width;
      for (int64_t o = 0; o < nb; ++o) {
        const float* src = g + n * gs.n + (o0 + o) * gs.c + oh * gs.h;
        for (int64_t ow = 0; ow < p.OW; ++ow) dst[ow * width + o] = src[ow * gs.w];
      }
    }
  }
}

// Adds col (element (k - c0 * KH * KW, l) at col[k * ks + l * ls], channels [c0, c1) of x's
// group) back into the input positions it was read from, for global rows [r0, r1).
CNNEXT_CONV_AVX512 void col2im_add(const float* col, int64_t ks, int64_t ls, const Conv2dParams& p, int64_t c0,
                int64_t c1, int64_t r0, int64_t r1, float* x, const Strides4& xs) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t kh = 0; kh < p.KH; ++kh) {
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        const float* src_k = col + (((c - c0) * p.KH + kh) * p.KW + kw) * ks;
        int64_t lo, hi;
        conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &lo, &hi);
        const int64_t iw_lo = conv_in_coord(lo, kw, p.SW, p.PW, p.DW);
        const int64_t step = p.SW * xs.w;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / p.OH, oh = r % p.OH;
          const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
          if (ih < 0 || ih >= p.H) continue;
          float* dst = x + n * xs.n + c * xs.c + ih * xs.h + iw_lo * xs.w;
          const float* src = src_k + ((r - r0) * p.OW + lo) * ls;
          const int64_t cnt = hi - lo;
          if (step == 1 && ls == 1) {  // col and x never overlap
            _Pragma("omp simd")
            for (int64_t q = 0; q < cnt; ++q) dst[q] += src[q];
          } else {
            for (int64_t q = 0; q < cnt; ++q) dst[q * step] += src[q * ls];
          }
        }
      }
    }
  }
}

// Calls fn(item) for items [0, count) over the threads; on the calling thread alone when
// the whole work (`elems`, when given) is too small to pay for waking the others.
template <typename Fn>
void run_items(int64_t count, const Fn& fn, int64_t elems = -1) {
  if (count <= 0) return;
  if (count == 1 || at::get_num_threads() == 1 || (elems >= 0 && elems < (int64_t(1) << 15))) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

// (N, C) planes of x (H x W, strides xs) with zero borders of top, bottom, left, right
// (>= 0) into scratch slot 3, plus `slack` zero floats at the end.
float* pad_planes(const float* x, const Strides4& xs, int64_t N, int64_t C, int64_t H, int64_t W,
                  int64_t top, int64_t bottom, int64_t left, int64_t right, int64_t slack) {
  const int64_t Hp = H + top + bottom, Wp = W + left + right, plane = Hp * Wp;
  float* xp = scratch(3, N * C * plane + slack);
  run_items(N * C, [&](int64_t nc) {
    const int64_t n = nc / C, c = nc % C;
    float* dst = xp + nc * plane;
    const float* src = x + n * xs.n + c * xs.c;
    std::fill(dst, dst + top * Wp, 0.f);
    for (int64_t h = 0; h < H; ++h) {
      float* d = dst + (top + h) * Wp;
      const float* sr = src + h * xs.h;
      std::fill(d, d + left, 0.f);
      if (xs.w == 1) {
        std::memcpy(d + left, sr, size_t(W) * sizeof(float));
      } else {
        for (int64_t w = 0; w < W; ++w) d[left + w] = sr[w * xs.w];
      }
      std::fill(d + left + W, d + Wp, 0.f);
    }
    std::fill(dst + (top + H) * Wp, dst + plane, 0.f);
  }, N * C * plane);
  std::fill(xp + N * C * plane, xp + N * C * plane + slack, 0.f);
  return xp;
}

// The input with its zero padding: (N, C) planes of Hp x Wp (Hp = H + 2 PH, Wp = W + 2 PW)
// in scratch slot 3, plus kNR zero floats of slack at the end.
float* pad_input(const float* x, const Strides4& xs, const Conv2dParams& p) {
  return pad_planes(x, xs, p.N, p.C, p.H, p.W, p.PH, p.PH, p.PW, p.PW, kNR);
}

// Element strides of pad_input's copy.
Strides4 padded_strides(const Conv2dParams& p) {
  const int64_t Wp = p.W + 2 * p.PW, plane = (p.H + 2 * p.PH) * Wp;
  return {p.C * plane, plane, Wp, 1};
}

// Offsets in a source of strides s (the padded input, or an unpadded input itself) of the
// taps [0, K) of one group (from its first channel).
std::vector<int64_t> tap_offsets(const Strides4& s, const Conv2dParams& p) {
  const int64_t taps = p.KH * p.KW, K = p.in_per_group() * taps;
  std::vector<int64_t> off(K);
  for (int64_t k = 0; k < K; ++k)
    off[k] = (k / taps) * s.c + ((k / p.KW) % p.KH) * p.DH * s.h + (k % p.KW) * p.DW * s.w;
  return off;
}
std::vector<int64_t> tap_offsets(const Conv2dParams& p) { return tap_offsets(padded_strides(p), p); }

// Offsets in a source of strides s (from sample 0, channel 0) of the top-left tap of each
// output position of global rows [r0, r1).
void position_offsets(const Strides4& s, const Conv2dParams& p, int64_t r0, int64_t r1, int64_t* idx) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = (r / p.OH) * s.n + (r % p.OH) * p.SH * s.h;
    int64_t* d = idx + (r - r0) * p.OW;
    for (int64_t ow = 0; ow < p.OW; ++ow) d[ow] = base + ow * p.SW * s.w;
  }
}
void position_offsets(const Conv2dParams& p, int64_t r0, int64_t r1, int64_t* idx) {
  position_offsets(padded_strides(p), p, r0, r1, idx);
}

// Where the forward gathers its columns from: the zero-padded copy of the input or, with no
// padding, the input itself through its strides (a strided 1x1 convolution then reads only
// the positions it uses, and nothing is copied first).
struct GatherSrc {
  const float* x;
  Strides4 s;
};
GatherSrc gather_source(const float* x, const Strides4& xs, const Conv2dParams& p) {
  if (p.PH == 0 && p.PW == 0) {
    kUnpaddedSource.hit();
    return {x, xs};
  }
  return {pad_input(x, xs, p), padded_strides(p)};
}

// im2col as gathers from the padded input (or any strided source): element (k, l) =
// xp[off[k] + idx[l]] into panels of `width` (<= kNR) positions, out[(l / width) * K * width
// + k * width + l % width], the positions past L up to a whole panel zero. `step` is the
// distance in xp between neighbouring positions of one output row (SW times the source's
// w stride): positions are copied as runs of that stride, one vector copy per run (unit
// stride: masked loads; stride 2: two loads and a permute; else a hardware gather), or,
// where the runs are short (maps of a few columns), one hardware gather per 16 positions.
CNNEXT_CONV_AVX512 void gather_panels(const float* xp, const int64_t* off, int64_t K,
                                      const int64_t* idx, int64_t L, int64_t width, int64_t step,
                                      float* out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  if (width <= kNR && step > 0 && step < (int64_t(1) << 26)) {
    struct Run {
      int64_t j, len, src;
    };
    Run runs[kNR];
    alignas(64) int32_t vidx[kNR];
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i strided = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(int32_t(step)));
    const __m512 zero = _mm512_setzero_ps();
    bool used_runs = false, used_hw = false;
    for (int64_t l0 = 0; l0 < L; l0 += width) {
      const int64_t n = std::min(width, L - l0);
      float* panel = out + (l0 / width) * K * width;
      const int64_t* id = idx + l0;
      int64_t nruns = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (nruns > 0 && runs[nruns - 1].len < 16 && id[j] - id[j - 1] == step) {
          ++runs[nruns - 1].len;
        } else {
          runs[nruns++] = {j, 1, id[j]};
        }
      }
      // Short runs: one gather of up to 16 positions (offsets from id[0] in int32).
      bool gather = 4 * nruns > n;
      if (gather) {
        for (int64_t j = 0; j < kNR; ++j) {
          const int64_t d = j < n ? id[j] - id[0] : 0;
          gather = gather && d > -(int64_t(1) << 31) && d < (int64_t(1) << 31);
          vidx[j] = int32_t(d);
        }
      }
      const __mmask16 tail_lo = n >= 16 ? __mmask16(0) : __mmask16(~((1u << n) - 1));
      const __mmask16 tail_hi =
          n >= 32 ? __mmask16(0) : n <= 16 ? __mmask16(0xFFFF) : __mmask16(~((1u << (n - 16)) - 1));
      const __mmask16 wmask_lo = width >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
      const __mmask16 wmask_hi = width >= 32 ? __mmask16(0xFFFF) : width <= 16 ? __mmask16(0) : __mmask16((1u << (width - 16)) - 1);
      used_hw |= gather;
      used_runs |= !gather;
      if (gather) {
        const __m512i v0 = _mm512_load_si512(vidx), v1 = _mm512_load_si512(vidx + 16);
        const __mmask16 m0 = __mmask16(wmask_lo & ~tail_lo), m1 = __mmask16(wmask_hi & ~tail_hi);
        for (int64_t k = 0; k < K; ++k) {
          const float* src = xp + off[k] + id[0];
          float* d = panel + k * width;
          _mm512_mask_storeu_ps(d, wmask_lo, _mm512_mask_i32gather_ps(zero, m0, v0, src, 4));
          if (width > 16)
            _mm512_mask_storeu_ps(d + 16, wmask_hi, _mm512_mask_i32gather_ps(zero, m1, v1, src, 4));
        }
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        const uintptr_t src = reinterpret_cast<uintptr_t>(xp + off[k]);
        float* d = panel + k * width;
        for (int64_t r = 0; r < nruns; ++r) {
          const Run& run = runs[r];
          const __mmask16 m = __mmask16((1u << run.len) - 1);
          const float* s = reinterpret_cast<const float*>(src + run.src * int64_t(sizeof(float)));
          __m512 v;
          if (step == 1) {
            v = _mm512_maskz_loadu_ps(m, s);
          } else if (step == 2) {
            const int64_t span = 2 * run.len - 1;
            const __mmask16 mlo = span >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << span) - 1);
            const __mmask16 mhi = span > 16 ? __mmask16((1u << (span - 16)) - 1) : __mmask16(0);
            const __m512 lo = _mm512_maskz_loadu_ps(mlo, s);
            const __m512 hi = _mm512_maskz_loadu_ps(
                mhi, reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(s) + 16 * sizeof(float)));
            v = _mm512_permutex2var_ps(lo, even, hi);
          } else {
            v = _mm512_mask_i32gather_ps(zero, m, strided, s, 4);
          }
          _mm512_mask_storeu_ps(d + run.j, m, v);
        }
        if (n < width) {
          _mm512_mask_storeu_ps(d, __mmask16(wmask_lo & tail_lo), zero);
          if (width > 16) _mm512_mask_storeu_ps(d + 16, __mmask16(wmask_hi & tail_hi), zero);
        }
      }
    }
    if (used_hw) kGatherHw.hit();
    if (used_runs) (step == 1 ? kRunsUnit : step == 2 ? kRunsStride2 : kRunsStrided).hit();
    return;
  }
#endif
  kGatherScalar.hit();
  for (int64_t l0 = 0; l0 < L; l0 += width) {
    const int64_t n = std::min(width, L - l0);
    float* panel = out + (l0 / width) * K * width;
    const int64_t* id = idx + l0;
    for (int64_t k = 0; k < K; ++k) {
      const float* src = xp + off[k];
      float* d = panel + k * width;
      for (int64_t j = 0; j < n; ++j) d[j] = src[id[j]];
      for (int64_t j = n; j < width; ++j) d[j] = 0.f;
    }
  }
}

// col^T as gathers: element (l, k - k0) = xp[off[k] + idx[l]] in sgemm's packed-B layout,
// out[((k - k0) / kNR) * L * kNR + l * kNR + (k - k0) % kNR], zero-padded to a whole panel.
CNNEXT_CONV_AVX512 void gather_t(const float* xp, const int64_t* off, int64_t k0, int64_t k1,
                                 const int64_t* idx, int64_t L, float* out) {
  for (int64_t kp = k0; kp < k1; kp += kNR) {
    const int64_t n = std::min(kNR, k1 - kp);
    float* panel = out + (kp - k0) * L;
    const int64_t* o = off + kp;
    for (int64_t l = 0; l < L; ++l) {
      const float* src = xp + idx[l];
      float* d = panel + l * kNR;
      for (int64_t j = 0; j < n; ++j) d[j] = src[o[j]];
      for (int64_t j = n; j < kNR; ++j) d[j] = 0.f;
    }
  }
}

// gy^T of one sample (g points at its group's first channel) for output rows [oh0, oh1) in
// padded-width coordinates l = (oh - oh0) * Wp + ow, l < Lp, in sgemm's packed-B layout
// (panels of kNR channels); zero in the columns ow >= OW and the channels past Og.
void pack_gy_padded(const float* g, const Strides4& gs, const Conv2dParams& p, int64_t Og,
                    int64_t oh0, int64_t oh1, int64_t Wp, int64_t Lp, float* out) {
  if (gs.w == 1 && gs.h == p.OW && sgemm::available()) {
    // Planes of gy flatten: blocks of 16 channels x 16 positions of the band (runs across
    // its rows) by 16 x 16 vector transposes, each transposed row (a position's 16
    // channels) stored at its padded-width place; the scalar loop below stores one float
    // 128 bytes from the last, a cache line each.
    alignas(64) float in[16 * 16], tr[16 * 16];
    const int64_t P = (oh1 - oh0) * p.OW;
    for (int64_t o0 = 0; o0 < Og; o0 += kNR) {
      float* panel = out + o0 * Lp;
      const int64_t nb = std::min(kNR, Og - o0);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        float* dst = panel + (oh - oh0) * Wp * kNR;
        const int64_t ncol = std::min(Wp, Lp - (oh - oh0) * Wp);
        if (ncol > p.OW) std::fill(dst + p.OW * kNR, dst + ncol * kNR, 0.f);
      }
      for (int64_t j0 = 0; j0 < kNR; j0 += 16) {
        const int64_t nj = std::clamp<int64_t>(nb - j0, 0, 16);
        for (int64_t q0 = 0; q0 < P; q0 += 16) {
          const int64_t nq = std::min<int64_t>(16, P - q0);
          if (nj == 0) {
            std::fill(tr, tr + 16 * 16, 0.f);
          } else {
            const float* src = g + (o0 + j0) * gs.c + oh0 * gs.h + q0;
            if (nj == 16 && nq == 16) {
              sgemm::transpose16(src, gs.c, tr, 16);
            } else {
              std::fill(in, in + 16 * 16, 0.f);
              for (int64_t j = 0; j < nj; ++j) std::memcpy(in + j * 16, src + j * gs.c, sizeof(float) * nq);
              sgemm::transpose16(in, 16, tr, 16);
            }
          }
          for (int64_t q = 0; q < nq; ++q) {
            const int64_t oh = (q0 + q) / p.OW, ow = (q0 + q) % p.OW;
            std::memcpy(panel + (oh * Wp + ow) * kNR + j0, tr + q * 16, sizeof(float) * 16);
          }
        }
      }
    }
    return;
  }
  for (int64_t o0 = 0; o0 < Og; o0 += kNR) {
    float* panel = out + o0 * Lp;
    const int64_t nb = std::min(kNR, Og - o0);
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      float* dst = panel + (oh - oh0) * Wp * kNR;
      const int64_t ncol = std::min(Wp, Lp - (oh - oh0) * Wp);
      for (int64_t j = 0; j < nb; ++j) {
        const float* src = g + (o0 + j) * gs.c + oh * gs.h;
        for (int64_t ow = 0; ow < p.OW; ++ow) dst[ow * kNR + j] = src[ow * gs.w];
      }
      if (nb < kNR) {
        for (int64_t ow = 0; ow < p.OW; ++ow) std::fill(dst + ow * kNR + nb, dst + (ow + 1) * kNR, 0.f);
      }
      if (ncol > p.OW) std::fill(dst + p.OW * kNR, dst + ncol * kNR, 0.f);
    }
  }
}

// The source an implicit forward's GEMM reads B from in place: per (sample, channel) a
// block of `csize` floats at x, in which tap k of position (oh, ow) of the group's first
// channel is x[off[k] + oh * Wq + ow] (padded-width coordinates: the Wq - OW columns past
// each output row are computed and dropped); kNR + Wq zero floats of slack at the end.
struct ImplicitSrc {
  const float* x;
  int64_t csize, Wq;
  std::vector<int64_t> off;
};

// Stride 1: the input copied once with its zero padding, read at the taps' offsets.
ImplicitSrc implicit_source(const float* x, const Strides4& xs, const Conv2dParams& p) {
  const int64_t Wp = p.W + 2 * p.PW;
  return {pad_planes(x, xs, p.N, p.C, p.H, p.W, p.PH, p.PH, p.PW, p.PW, kNR + Wp),
          (p.H + 2 * p.PH) * Wp, Wp, tap_offsets(p)};
}

// Other strides, dilation 1: the padded input split into its SH x SW stride phases
// (space to depth), phase (a, b) = the padded positions (a + SH i, b + SW j), a plane of
// Hq x Wq (Hq = ceil(Hp / SH), Wq = ceil(Wp / SW); zero past the padded map). Output (oh,
// ow) reads tap (kh, kw) at phase (kh % SH, kw % SW), position (oh + kh / SH, ow + kw /
// SW): a stride-1 read of the phase, so the GEMM reads it in place as at stride 1, with
// no im2col. Only the phases some tap reads are stored.
// One (sample, channel) plane of phase_source: phase (a, b) < (PA, PB), row i, column j
// = the input at (a + SH i - PH, b + SW j - PW), zero outside the input.
CNNEXT_CONV_AVX512 void phase_copy_plane(const float* src, int64_t sh, int64_t sw,
                                         const Conv2dParams& p, int64_t PA, int64_t PB,
                                         int64_t Hq, int64_t Wq, float* dst) {
  const int64_t qplane = Hq * Wq;
  for (int64_t b = 0; b < PB; ++b) {
    // Columns j whose input column b + SW j - PW lies in [0, W).
    const int64_t lo_num = p.PW - b, hi_num = p.W - 1 + p.PW - b;
    const int64_t jhi = hi_num < 0 ? 0 : std::min(Wq, hi_num / p.SW + 1);
    const int64_t jlo = std::min(jhi, lo_num <= 0 ? int64_t(0) : ceil_div(lo_num, p.SW));
    for (int64_t a = 0; a < PA; ++a) {
      for (int64_t i = 0; i < Hq; ++i) {
        float* d = dst + (a * PB + b) * qplane + i * Wq;
        const int64_t h = a + p.SH * i - p.PH;
        if (h < 0 || h >= p.H) {
          std::fill(d, d + Wq, 0.f);
          continue;
        }
        std::fill(d, d + jlo, 0.f);
        const float* s = src + h * sh + (b + p.SW * jlo - p.PW) * sw;
        float* dj = d + jlo;
        const int64_t n = jhi - jlo;
        if (sw == 1 && p.SW == 2) {
          for (int64_t j = 0; j < n; ++j) dj[j] = s[2 * j];
        } else if (sw == 1 && p.SW == 4) {
          for (int64_t j = 0; j < n; ++j) dj[j] = s[4 * j];
        } else {
          const int64_t step = p.SW * sw;
          for (int64_t j = 0; j < n; ++j) dj[j] = s[j * step];
        }
        std::fill(d + jhi, d + Wq, 0.f);
      }
    }
  }
}

ImplicitSrc phase_source(const float* x, const Strides4& xs, const Conv2dParams& p) {
  const int64_t Hp = p.H + 2 * p.PH, Wp = p.W + 2 * p.PW;
  const int64_t PA = std::min(p.SH, p.KH), PB = std::min(p.SW, p.KW);
  const int64_t Hq = ceil_div(Hp, p.SH), Wq = ceil_div(Wp, p.SW), qplane = Hq * Wq;
  const int64_t csize = PA * PB * qplane, slack = kNR + Wq;
  float* xq = scratch(3, p.N * p.C * csize + slack);
  run_items(p.N * p.C, [&](int64_t nc) {
    phase_copy_plane(x + (nc / p.C) * xs.n + (nc % p.C) * xs.c, xs.h, xs.w, p, PA, PB, Hq, Wq,
                     xq + nc * csize);
  }, p.N * p.C * csize);
  std::fill(xq + p.N * p.C * csize, xq + p.N * p.C * csize + slack, 0.f);
  const int64_t taps = p.KH * p.KW, K = p.in_per_group() * taps;
  std::vector<int64_t> off(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t c = k / taps, kh = (k / p.KW) % p.KH, kw = k % p.KW;
    off[k] = c * csize + ((kh % p.SH) * PB + kw % p.SW) * qplane + (kh / p.SH) * Wq + kw / p.SW;
  }
  return {xq, csize, Wq, std::move(off)};
}

// Whether phase_source serves p: other strides, dilation 1, a kernel past 1x1, and
// `columns` output columns or more (few columns waste the extra ones).
bool phases_apply(const Conv2dParams& p, int64_t columns) {
  return (p.SH > 1 || p.SW > 1) && p.DH == 1 && p.DW == 1 && (p.KH > 1 || p.KW > 1) &&
         p.OW >= columns;
}

// Whether the forward of p reads its input in place, through implicit_source (stride 1)
// or phase_source (>= 16 columns at a stride of 3 or more across). At a stride of 2 across
// the gather (two loads and a permute per run) stays cheaper than what the GEMM loses
// reading its B rows from the SH x SW phase planes instead of one packed panel (ResNet's
// 56 -> 28 layer, 1 thread: 10.4 -> 11.0 ms by phases), so stride 2 keeps im2col; stride 4
// (AlexNet's 11x11 first layer: hardware gathers) gains 7.6 -> 6.8 ms.
bool implicit_applies(const Conv2dParams& p) {
  if (p.SH == 1 && p.SW == 1) return p.OW >= 16 || p.W + 2 * p.PW == p.OW;
  return p.SW > 2 && phases_apply(p, 16);
}

// The forward without im2col: the GEMM reads B(k, l) = src.x[off[k] + l] in place.
void forward_implicit(const float* x, const Strides4& xs, const float* wp, int64_t w_size,
                      const float* bias, float* y, const Strides4& ys, const Conv2dParams& p,
                      bool relu, const RowsDoneFn& rows_done) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), taps = p.KH * p.KW, K = Cg * taps;
  const int64_t T = at::get_num_threads();
  const ImplicitSrc src = p.SH == 1 && p.SW == 1 ? implicit_source(x, xs, p) : phase_source(x, xs, p);
  const int64_t Wp = src.Wq;
  // Bands of about 384 positions; output-channel blocks when there are few bands.
  const int64_t rows = std::clamp<int64_t>(ceil_div(384, Wp), 1, p.OH);
  const int64_t bands = ceil_div(p.OH, rows);
  int64_t ob = Og;
  if (!rows_done && p.N * p.G * bands < T)
    ob = round_up(ceil_div(Og, std::min(ceil_div(T, p.N * p.G * bands), ceil_div(Og, 32))), kMR);
  const int64_t oblocks = ceil_div(Og, ob);
  run_items(p.N * p.G * bands * oblocks, [&](int64_t item) {
    const int64_t ob_i = item % oblocks, band = (item / oblocks) % bands;
    const int64_t g = (item / (oblocks * bands)) % p.G, n = item / (oblocks * bands * p.G);
    const int64_t o0 = ob_i * ob, M = std::min(ob, Og - o0);
    const int64_t oh0 = band * rows, oh1 = std::min(p.OH, oh0 + rows);
    const int64_t Lp = (oh1 - oh0) * Wp - (Wp - p.OW);
    float* cbuf = scratch(0, ob * rows * Wp);
    sgemm::gemm_rows(wp + g * w_size + o0 * K, src.x + (n * p.C + g * Cg) * src.csize + oh0 * Wp,
                     src.off.data(), M, Lp, K, cbuf, Lp, bias ? bias + g * Og + o0 : nullptr, relu);
    for (int64_t o = 0; o < M; ++o) {
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const float* s = cbuf + o * Lp + (oh - oh0) * Wp;
        float* dst = y + n * ys.n + (g * Og + o0 + o) * ys.c + oh * ys.h;
        if (ys.w == 1) {
          std::memcpy(dst, s, size_t(p.OW) * sizeof(float));
        } else {
          for (int64_t ow = 0; ow < p.OW; ++ow) dst[ow * ys.w] = s[ow];
        }
      }
    }
    if (rows_done) rows_done(n, oh0, oh1);
  });
}

// Output rows [r0, r1) (global n * OH + oh) of M channels from the transposed GEMM
// result c (positions x M, row-major) into y (channel 0 of the block at yg), plus the
// bias b (or none), then the ReLU.
void store_transposed(const float* c, int64_t M, int64_t r0, int64_t r1, const Conv2dParams& p,
                      float* yg, const Strides4& ys, const float* b, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    float* yr = yg + (r / p.OH) * ys.n + (r % p.OH) * ys.h;
    const float* cr = c + (r - r0) * p.OW * M;
    for (int64_t o = 0; o < M; ++o) {
      const float bo = b ? b[o] : 0.f;
      float* dst = yr + o * ys.c;
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        float v = cr[ow * M + o] + bo;
        if (relu && v < 0.f) v = 0.f;  // NaN stays NaN
        dst[ow * ys.w] = v;
      }
    }
  }
}

// The transposed forward when every output position fits one column buffer and the
// weight is large (deep layers on small maps: ResNet-18's 3x3 and 6x6 maps): the
// columns are gathered once, and each item takes a panel of 32 output channels, packs
// its weight rows into the thread's scratch and multiplies them at once, while the panel
// is in L2. The weight is read once instead of being packed to memory whole and read
// back by the GEMMs.
void forward_panels(const float* x, const Strides4& xs, const float* w, bool w_t, const float* bias,
                    float* y, const Strides4& ys, const Conv2dParams& p, bool relu) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t R = p.N * p.OH, L = R * p.OW;
  const GatherSrc src = gather_source(x, xs, p);
  const std::vector<int64_t> off = tap_offsets(src.s, p);
  const int64_t gstride = Cg * src.s.c;
  const int64_t col_size = round_up(L, kMR) * K, cols = round_up(p.G * col_size, 16);
  float* col = scratch(1, cols + 2 * L);
  int64_t* idx = reinterpret_cast<int64_t*>(col + cols);
  position_offsets(src.s, p, 0, R, idx);
  run_items(p.G, [&](int64_t g) {
    gather_panels(src.x + g * gstride, off.data(), K, idx, L, kMR, p.SW * src.s.w, col + g * col_size);
  }, p.G * col_size);
  const int64_t panels = ceil_div(Og, kNR);
  run_items(p.G * panels, [&](int64_t item) {
    const int64_t g = item / panels, o0 = (item % panels) * kNR, m = std::min(kNR, Og - o0);
    float* pb = scratch(0, K * kNR + L * kNR);
    float* cbuf = pb + K * kNR;
    if (w_t) {  // element (o, k) at w[g K Og + k Og + o]
      sgemm::pack_b(w + g * K * Og + o0, Og, 1, K, m, pb);
    } else {
      sgemm::pack_b(w + (g * Og + o0) * K, 1, K, K, m, pb);
    }
    sgemm::gemm(col + g * col_size, pb, L, m, K, cbuf, m, false, nullptr, false);
    store_transposed(cbuf, m, 0, R, p, y + (g * Og + o0) * ys.c, ys, bias ? bias + g * Og + o0 : nullptr,
                     relu);
  }, p.O * K);
}


// Columns of taps [k0, k1) as plain rows: out[k * ldb + l] = xp[off[k] + idx[l]] for l < L,
// zero for l in [L, ldb) (ldb a multiple of 16). One hardware gather per 16 positions where
// the offsets fit int32, else element by element.
CNNEXT_CONV_AVX512 void gather_rows_plain(const float* xp, const int64_t* off, int64_t k0, int64_t k1,
                                          const int64_t* idx, int64_t L, int64_t ldb, float* out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  bool fits = true;
  for (int64_t l = 0; l < L; ++l) fits = fits && idx[l] >= 0 && idx[l] < (int64_t(1) << 31);
  if (fits && sgemm::available()) {
    std::vector<int32_t> vidx(ldb, 0);
    for (int64_t l = 0; l < L; ++l) vidx[l] = int32_t(idx[l]);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const float* src = xp + off[k];
      float* d = out + k * ldb;
      for (int64_t l = 0; l < ldb; l += 16) {
        const int64_t n = std::clamp<int64_t>(L - l, 0, 16);
        const __mmask16 m = __mmask16((uint32_t(1) << n) - 1);
        const __m512i vi = _mm512_loadu_si512(vidx.data() + l);
        _mm512_storeu_ps(d + l, _mm512_mask_i32gather_ps(zero, m, vi, src, 4));
      }
    }
    return;
  }
#endif
  for (int64_t k = k0; k < k1; ++k) {
    const float* src = xp + off[k];
    float* d = out + k * ldb;
    for (int64_t l = 0; l < L; ++l) d[l] = src[idx[l]];
    for (int64_t l = L; l < ldb; ++l) d[l] = 0.f;
  }
}

// Every output position of the batch in one GEMM per group, the weight read in place:
// y_g (Og x L) = W_g (Og x K, row-major as given) * col (K x L), L = N OH OW of at most
// kSmallMaxPositions. Deep layers on small maps (ResNet-18's 3x3 and 6x6 maps: 36 or 144
// positions against a weight of up to 9 MiB): packing the weight into GEMM panels costs
// about as much as multiplying it once, so it is not packed; the few positions fill the
// GEMM's columns (panels of 48). Items: the gather over blocks of taps, then the GEMM over
// blocks of output channels, each owning its rows of y (no sums shared between threads).
void forward_small_n(const float* x, const Strides4& xs, const float* w, const float* bias,
                     float* y, const Strides4& ys, const Conv2dParams& p, bool relu,
                     const RowsDoneFn& rows_done) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t R = p.N * p.OH, L = R * p.OW, ldb = round_up(L, 16), T = at::get_num_threads();
  const GatherSrc src = gather_source(x, xs, p);
  const std::vector<int64_t> off = tap_offsets(src.s, p);
  const int64_t gstride = Cg * src.s.c;
  const int64_t col_size = K * ldb, cols = round_up(p.G * col_size, 16);
  float* col = scratch(1, cols + 2 * L + p.O * ldb);
  int64_t* idx = reinterpret_cast<int64_t*>(col + cols);
  float* cbuf = col + cols + 2 * L;
  position_offsets(src.s, p, 0, R, idx);
  const int64_t kparts = std::min(ceil_div(K, 64), std::max<int64_t>(1, ceil_div(T, p.G)));
  const int64_t kpb = ceil_div(K, kparts);
  run_items(p.G * kparts, [&](int64_t item) {
    const int64_t g = item / kparts, k0 = (item % kparts) * kpb, k1 = std::min(K, k0 + kpb);
    if (k0 < k1) gather_rows_plain(src.x + g * gstride, off.data(), k0, k1, idx, L, ldb, col + g * col_size);
  }, p.G * col_size);
  const int64_t oparts = std::min(ceil_div(Og, kMR), std::max<int64_t>(1, ceil_div(T, p.G)));
  const int64_t ob = round_up(ceil_div(Og, oparts), kMR), oblocks = ceil_div(Og, ob);
  const bool planes = ys.w == 1 && ys.h == p.OW;
  run_items(p.G * oblocks, [&](int64_t item) {
    const int64_t g = item / oblocks, o0 = (item % oblocks) * ob, M = std::min(ob, Og - o0);
    const int64_t go = g * Og + o0;
    float* c = cbuf + go * ldb;
    sgemm::gemm_small_n(w + go * K, K, col + g * col_size, ldb, M, L, K, c, ldb,
                        bias ? bias + go : nullptr, relu);
    const int64_t hw = p.OH * p.OW;
    for (int64_t o = 0; o < M; ++o) {
      for (int64_t n = 0; n < p.N; ++n) {
        const float* s = c + o * ldb + n * hw;
        float* d = y + n * ys.n + (go + o) * ys.c;
        if (planes) {
          std::memcpy(d, s, sizeof(float) * hw);
        } else {
          for (int64_t oh = 0; oh < p.OH; ++oh)
            for (int64_t ow = 0; ow < p.OW; ++ow) d[oh * ys.h + ow * ys.w] = s[oh * p.OW + ow];
        }
      }
    }
  }, p.O * K * L);
  if (rows_done) run_items(p.N, [&](int64_t n) { rows_done(n, 0, p.OH); });
}


#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
// P neighbouring positions of one output row (unit step in the source, the first at src),
// all output channels of a group in the 16 lanes: acc[p] = sum_k wt[k][:] * src[off[k] + p].
template <int P>
CNNEXT_TARGET("avx512f,fma") void lanes_tile(int64_t K, const float* src, const int64_t* off,
                                             const float* wt, float* out) {
  __m512 acc[P];
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 wv = _mm512_loadu_ps(wt + k * 16);
    const float* s = src + off[k];
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(s[q]), wv, acc[q]);
  }
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) _mm512_storeu_ps(out + q * 16, acc[q]);
}

using LanesTileFn = void (*)(int64_t, const float*, const int64_t*, const float*, float*);
constexpr int kLanesMaxTile = 14;
constexpr LanesTileFn kLanesTiles[kLanesMaxTile + 1] = {
    nullptr,         lanes_tile<1>,  lanes_tile<2>,  lanes_tile<3>,  lanes_tile<4>,
    lanes_tile<5>,   lanes_tile<6>,  lanes_tile<7>,  lanes_tile<8>,  lanes_tile<9>,
    lanes_tile<10>,  lanes_tile<11>, lanes_tile<12>, lanes_tile<13>, lanes_tile<14>};
#endif

// Few output channels (12 to 16 per group) on narrow maps (LeNet's second layer: 6 -> 16
// channels, 10x10 output; NiN's late layers): the output channels of a group fill the 16
// lanes of one vector and each position of an output row has its own accumulator, so no
// lane of the GEMM tile is padding and nothing is gathered: a tap's input value is
// broadcast straight from the (padded) input, read at unit stride along the row. The
// weight is transposed once per call (K x 16 per group, zero past Og). Items: (sample,
// group), each writing its own part of y; every output is one sum over k in order.
void forward_lanes(const float* x, const Strides4& xs, const float* w, const float* bias, float* y,
                   const Strides4& ys, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const GatherSrc src = gather_source(x, xs, p);
  const std::vector<int64_t> off = tap_offsets(src.s, p);
  float* wt = scratch(1, p.G * K * 16);
  for (int64_t g = 0; g < p.G; ++g) {
    float* d = wt + g * K * 16;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t o = 0; o < 16; ++o) d[k * 16 + o] = o < Og ? w[(g * Og + o) * K + k] : 0.f;
    }
  }
  run_items(p.N * p.G, [&](int64_t item) {
    const int64_t n = item / p.G, g = item % p.G;
    alignas(64) float tile[kLanesMaxTile * 16];
    const float* wg = wt + g * K * 16;
    const float* xg = src.x + n * src.s.n + g * Cg * src.s.c;
    float bo[16];
    for (int64_t o = 0; o < Og; ++o) bo[o] = bias ? bias[g * Og + o] : 0.f;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const float* row = xg + oh * p.SH * src.s.h;
      float* yr = y + n * ys.n + g * Og * ys.c + oh * ys.h;
      for (int64_t ow0 = 0; ow0 < p.OW; ow0 += kLanesMaxTile) {
        const int64_t P = std::min<int64_t>(kLanesMaxTile, p.OW - ow0);
        kLanesTiles[P](K, row + ow0, off.data(), wg, tile);
        for (int64_t o = 0; o < Og; ++o) {
          float* d = yr + o * ys.c + ow0 * ys.w;
          for (int64_t q = 0; q < P; ++q) {
            float v = tile[q * 16 + o] + bo[o];
            if (relu && v < 0.f) v = 0.f;  // NaN stays NaN
            d[q * ys.w] = v;
          }
        }
      }
    }
  }, p.N * p.OH * p.OW * K * 16);
  if (rows_done) run_items(p.N, [&](int64_t n) { rows_done(n, 0, p.OH); });
#else
  (void)x; (void)xs; (void)w; (void)bias; (void)y; (void)ys; (void)p; (void)relu; (void)rows_done;
#endif
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
// KB taps of one group, the output channels in the lanes: acc[j] += x[off[j] + position] *
// gyt[position] over the positions of N samples (x at sample stride xn, rows at xh, a step
// of xw along a row; gyt: 16 floats a position, samples gn apart), acc read from and
// written back to io (KB x 16).
template <int KB>
CNNEXT_TARGET("avx512f,fma") void lanes_wgrad_tile(const float* x, int64_t xn, int64_t xh, int64_t xw,
                                                   int64_t N, int64_t OH, int64_t OW, const int64_t* off,
                                                   const float* gyt, int64_t gn, float* io) {
  __m512 acc[KB];
#pragma GCC unroll 32
  for (int j = 0; j < KB; ++j) acc[j] = _mm512_loadu_ps(io + j * 16);
  for (int64_t n = 0; n < N; ++n) {
    const float* g = gyt + n * gn;
    for (int64_t oh = 0; oh < OH; ++oh) {
      const float* row = x + n * xn + oh * xh;
      for (int64_t ow = 0; ow < OW; ++ow, g += 16) {
        const __m512 gv = _mm512_loadu_ps(g);
        const float* s = row + ow * xw;
#pragma GCC unroll 32
        for (int j = 0; j < KB; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(s[off[j]]), gv, acc[j]);
      }
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < KB; ++j) _mm512_storeu_ps(io + j * 16, acc[j]);
}

using LanesWgradFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              const int64_t*, const float*, int64_t, float*);
constexpr int kLanesWgradTaps = 24;  // accumulators: 24 + gy's vector + a broadcast of 32 registers
template <int... I>
constexpr std::array<LanesWgradFn, sizeof...(I)> lanes_wgrad_table(std::integer_sequence<int, I...>) {
  return {lanes_wgrad_tile<I + 1>...};
}
constexpr std::array<LanesWgradFn, kLanesWgradTaps> kLanesWgrad =
    lanes_wgrad_table(std::make_integer_sequence<int, kLanesWgradTaps>());
#endif

// The weight gradient where the forward takes channel_lanes (12 to 16 output channels per
// group, narrow maps: LeNet's second layer): gy transposed once into position-major
// vectors of 16 channels (zero past Og), then each item (group, block of up to 24 taps)
// keeps a vector of 16 output channels per tap and adds, over every position of the batch
// in order, x at the tap (broadcast straight from the (padded) input) times gy's vector.
// No column matrix, no GEMM tile lanes of padding beyond Og; each weight element is one
// sum in a fixed order.
void weight_backward_lanes(const float* gy, const Strides4& gs, const float* x, const Strides4& xs,
                           float* gw, const Conv2dParams& p) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t L = p.OH * p.OW;  // positions of one sample
  const GatherSrc src = gather_source(x, xs, p);
  const std::vector<int64_t> off = tap_offsets(src.s, p);
  float* gyt = scratch(1, p.G * p.N * L * 16);
  run_items(p.G * p.N, [&](int64_t item) {
    const int64_t g = item / p.N, n = item % p.N;
    float* d = gyt + item * L * 16;
    for (int64_t o = 0; o < 16; ++o) {
      if (o >= Og) {
        for (int64_t l = 0; l < L; ++l) d[l * 16 + o] = 0.f;
        continue;
      }
      const float* plane = gy + n * gs.n + (g * Og + o) * gs.c;
      for (int64_t oh = 0; oh < p.OH; ++oh)
        for (int64_t ow = 0; ow < p.OW; ++ow) d[(oh * p.OW + ow) * 16 + o] = plane[oh * gs.h + ow * gs.w];
    }
  }, p.G * p.N * L * 16);
  const int64_t kblocks = ceil_div(K, kLanesWgradTaps);
  run_items(p.G * kblocks, [&](int64_t item) {
    const int64_t g = item / kblocks, k0 = (item % kblocks) * kLanesWgradTaps;
    const int64_t kb = std::min<int64_t>(kLanesWgradTaps, K - k0);
    alignas(64) float acc[kLanesWgradTaps * 16] = {};
    kLanesWgrad[kb - 1](src.x + g * Cg * src.s.c, src.s.n, p.SH * src.s.h, p.SW * src.s.w, p.N, p.OH,
                        p.OW, off.data() + k0, gyt + g * p.N * L * 16, L * 16, acc);
    for (int64_t o = 0; o < Og; ++o)
      for (int64_t j = 0; j < kb; ++j) gw[(g * Og + o) * K + k0 + j] = acc[j * 16 + o];
  }, p.N * L * K * 16);
#else
  (void)gy; (void)gs; (void)x; (void)xs; (void)gw; (void)p;
#endif
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
// Two rows (ih, ih + 1) of CG input channels of gx, the positions of a row (W <= 16) in the
// lanes: acc[r][c] = sum over (o, kh, kw) of wr[o][kh][kw][c] * gyp[o][ih + r + KH - 1 - kh]
// [KW - 1 - kw + lane], gyp being gy with KH - 1 - PH / KW - 1 - PW zero borders (rows of
// Wq floats, planes of `plane`); written to gx (channel c at gxc + c * cs, rows ch apart,
// unit step) in the first W lanes, the second row only when `two`.
template <int CG>
CNNEXT_TARGET("avx512f,fma") void input_rows_tile(const float* gyp, int64_t plane, int64_t Wq, int64_t Og,
                                                  int64_t KH, int64_t KW, const float* wr, float* gxc,
                                                  int64_t cs, int64_t ch, __mmask16 mask, bool two) {
  __m512 acc[2][CG];
#pragma GCC unroll 8
  for (int c = 0; c < CG; ++c) acc[0][c] = acc[1][c] = _mm512_setzero_ps();
  for (int64_t o = 0; o < Og; ++o) {
    for (int64_t kh = 0; kh < KH; ++kh) {
      const float* r0 = gyp + o * plane + (KH - 1 - kh) * Wq + KW - 1;
      for (int64_t kw = 0; kw < KW; ++kw, wr += CG) {
        const __m512 g0 = _mm512_loadu_ps(r0 - kw);
        const __m512 g1 = _mm512_loadu_ps(r0 + Wq - kw);
#pragma GCC unroll 8
        for (int c = 0; c < CG; ++c) {
          const __m512 wv = _mm512_set1_ps(wr[c]);
          acc[0][c] = _mm512_fmadd_ps(wv, g0, acc[0][c]);
          acc[1][c] = _mm512_fmadd_ps(wv, g1, acc[1][c]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < CG; ++c) {
    _mm512_mask_storeu_ps(gxc + c * cs, mask, acc[0][c]);
    if (two) _mm512_mask_storeu_ps(gxc + c * cs + ch, mask, acc[1][c]);
  }
}

using InputRowsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                             float*, int64_t, int64_t, __mmask16, bool);
constexpr InputRowsFn kInputRows[9] = {nullptr,
                                       input_rows_tile<1>, input_rows_tile<2>, input_rows_tile<3>,
                                       input_rows_tile<4>, input_rows_tile<5>, input_rows_tile<6>,
                                       input_rows_tile<7>, input_rows_tile<8>};
#endif

// The stride-1 input gradient of few input channels on narrow maps (LeNet's second layer:
// 16 -> 6 channels, 10x10 -> 14x14): gx's rows in the lanes of a vector, a pair of rows of
// every input channel of the group per tile, the (flipped) weight broadcast and gy's rows
// read straight from a zero-bordered copy of gy. No column matrix, no col2im, no zeroing
// of gx: each element written once, one sum over (o, kh, kw) in order. Items: (sample,
// group).
bool input_backward_rows_applies(const Conv2dParams& p, const Strides4& xs) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  return p.SH == 1 && p.SW == 1 && p.DH == 1 && p.DW == 1 && p.PH <= p.KH - 1 && p.PW <= p.KW - 1 &&
         p.W >= 8 && p.W <= 16 && p.in_per_group() <= 8 && p.out_per_group() * p.KH * p.KW >= 16 && xs.w == 1 &&
         p.N * p.C * p.H * p.W > 0;
#else
  (void)p; (void)xs;
  return false;
#endif
}

void input_backward_rows(const float* gy, const Strides4& gs, const float* w, float* gx,
                         const Strides4& xs, const Conv2dParams& p) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), taps = p.KH * p.KW;
  const int64_t bh = p.KH - 1 - p.PH, bw = p.KW - 1 - p.PW;
  const int64_t Wq = p.OW + 2 * bw, plane = (p.OH + 2 * bh) * Wq;
  // Slack: the tile's second row past the last plane, and 16 lanes from its last column.
  const float* gyp = pad_planes(gy, gs, p.N, p.O, p.OH, p.OW, bh, bh, bw, bw, 2 * Wq + 32);
  // wr[g][o][kh][kw][c] = w[g Og + o][c][kh][kw]: Cg contiguous broadcasts per tap.
  float* wr = scratch(2, p.G * Og * taps * Cg);
  for (int64_t go = 0; go < p.O; ++go)
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t t = 0; t < taps; ++t) wr[(go * taps + t) * Cg + c] = w[(go * Cg + c) * taps + t];
  const __mmask16 mask = __mmask16((1u << p.W) - 1);
  run_items(p.N * p.G, [&](int64_t item) {
    const int64_t n = item / p.G, g = item % p.G;
    const float* gyg = gyp + (n * p.O + g * Og) * plane;
    const float* wg = wr + g * Og * taps * Cg;
    float* gxg = gx + n * xs.n + g * Cg * xs.c;
    for (int64_t ih = 0; ih < p.H; ih += 2)
      kInputRows[Cg](gyg + ih * Wq, plane, Wq, Og, p.KH, p.KW, wg, gxg + ih * xs.h, xs.c, xs.h, mask,
                     ih + 1 < p.H);
  }, p.N * p.C * p.H * 16 * Og * taps);
#else
  (void)gy; (void)gs; (void)w; (void)gx; (void)xs; (void)p;
#endif
}

}  // namespace

void forward_impl(const float* x, const Strides4& xs, const float* w, bool w_t, const float* bias,
                  float* y, const Strides4& ys, const Conv2dParams& p, bool relu,
                  const RowsDoneFn& rows_done);

bool small_n_applies(const Conv2dParams& p) {
  const int64_t L = p.N * p.OH * p.OW;
  return L > 0 && L <= kSmallMaxPositions && p.out_per_group() >= kMR &&
         p.in_per_group() * p.KH * p.KW >= 64;
}

bool channel_lanes_applies(const Conv2dParams& p, const Strides4& xs) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  const bool unit = p.SW == 1 && (p.PH != 0 || p.PW != 0 || xs.w == 1);  // the source's row step
  return sgemm::available() && unit && p.out_per_group() >= 12 && p.out_per_group() <= 16 &&
         p.in_per_group() * p.KH * p.KW >= 16 && p.OW < 16 && p.N * p.OH * p.OW > 0;
#else
  (void)p; (void)xs;
  return false;
#endif
}

bool positions_on_m(int64_t positions, int64_t channels) {
  // The transposed form costs a transposing copy of its result: ask it to win clearly.
  return fill(positions, channels, kMR, kNR) > 1.15 * fill(channels, positions, kMR, kNR);
}

void forward(const float* x, const Strides4& xs, const float* w, const float* bias, float* y,
             const Strides4& ys, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done) {
  forward_impl(x, xs, w, false, bias, y, ys, p, relu, rows_done);
}

// Rows per chunk of the gathered forward on a small map, at most `most`: the count whose
// chunks cost least on `threads` threads, by a model of the work each item does (its GEMM's
// tile grid, padding included, in the better orientation, plus its gather) times the
// waves of items a thread runs. Positions per chunk that fill whole GEMM panels (a 12x12
// map: 8 or 16 rows, not 9) and chunk counts that keep every thread busy win.
int64_t gather_rows(const Conv2dParams& p, int64_t K, int64_t most, int64_t threads) {
  const int64_t R = p.N * p.OH, Og = p.out_per_group();
  double best = 0;
  int64_t best_rows = most;
  for (int64_t r = most; r >= std::max<int64_t>(1, most - 4096); --r) {
    const int64_t chunks = ceil_div(R, r), L = r * p.OW;
    const bool trans = positions_on_m(L, Og);
    const int64_t mr = trans ? kNR : kMR;
    int64_t ob = Og;
    if (p.G * chunks < threads) {
      const int64_t oblocks = std::min(ceil_div(threads, p.G * chunks), ceil_div(Og, std::max<int64_t>(mr, 32)));
      ob = round_up(ceil_div(Og, oblocks), mr);
    }
    const int64_t items = p.G * chunks * ceil_div(Og, ob);
    const double area = trans ? 1.15 * double(round_up(L, kMR) * round_up(ob, kNR))
                              : double(round_up(ob, kMR) * round_up(L, kNR));
    const double cost = double(ceil_div(items, threads)) * (area / 16.0 + L / 1.5) * double(K);
    if (r == most || cost < best) {
      best = cost;
      best_rows = r;
    }
  }
  return best_rows;
}

// w_t: the weight given transposed per group, (K x Og) row-major at w + g * K * Og.
void forward_impl(const float* x, const Strides4& xs, const float* w, bool w_t, const float* bias,
                  float* y, const Strides4& ys, const Conv2dParams& p, bool relu,
                  const RowsDoneFn& rows_done) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t R = p.N * p.OH, T = at::get_num_threads();
  if (!w_t && small_n_applies(p)) {
    kSmallN.hit();
    forward_small_n(x, xs, w, bias, y, ys, p, relu, rows_done);
    return;
  }
  if (!w_t && channel_lanes_applies(p, xs)) {
    kLanes.hit();
    forward_lanes(x, xs, w, bias, y, ys, p, relu, rows_done);
    return;
  }
  // Chunks of global output rows, each within the column budget. A large map (>= 512
  // positions) is cut into equal bands of one sample each, so the GEMM writes straight into
  // y; small maps into equal runs of rows across samples, as many as a multiple of the
  // threads where the bands are free to depend on them (no rows_done): a short last chunk
  // would leave a thread waiting.
  int64_t rows = std::clamp<int64_t>(kColBudget / std::max<int64_t>(1, K * p.OW), 1, R);
  const bool by_sample = p.OH * p.OW >= 512;
  int64_t bands = 1;  // per sample, when by_sample
  int64_t chunks;
  if (by_sample) {
    bands = ceil_div(p.OH, std::min(rows, p.OH));
    rows = ceil_div(p.OH, bands);
    bands = ceil_div(p.OH, rows);
    chunks = p.N * bands;
  } else {
    chunks = ceil_div(R, rows);
    const bool implicit_shape = implicit_applies(p);
    const bool panels_shape = chunks == 1 && !rows_done && Og > kNR && positions_on_m(rows * p.OW, Og);
    if (implicit_shape || panels_shape) {
      if (!rows_done && T > 1 && chunks > 1) chunks = std::min(R, round_up(chunks, T));
      rows = ceil_div(R, chunks);
    } else {
      rows = gather_rows(p, K, rows, rows_done ? 1 : T);
    }
    chunks = ceil_div(R, rows);
  }
  const bool trans = positions_on_m(rows * p.OW, Og);
  if (trans && chunks == 1 && !rows_done && Og > kNR) {
    kPanels.hit();
    forward_panels(x, xs, w, w_t, bias, y, ys, p, relu);
    return;
  }
  const int64_t mr = trans ? kNR : kMR;  // output-channel granularity
  int64_t ob = Og;
  if (!rows_done && p.G * chunks < T) {
    // Few chunks: split the output channels (blocks of >= 32), then the rows.
    const int64_t oblocks = std::min(ceil_div(T, p.G * chunks), ceil_div(Og, std::max<int64_t>(mr, 32)));
    ob = round_up(ceil_div(Og, oblocks), mr);
    const int64_t got = p.G * chunks * ceil_div(Og, ob);
    if (got < T) {
      const int64_t want = ceil_div(T, p.G * ceil_div(Og, ob));
      if (by_sample) {
        bands = std::min(p.OH, std::max(bands, ceil_div(want, p.N)));
        rows = ceil_div(p.OH, bands);
        bands = ceil_div(p.OH, rows);
        chunks = p.N * bands;
      } else {
        chunks = std::min(R, want);
        rows = ceil_div(R, chunks);
        chunks = ceil_div(R, rows);
      }
    }
  }
  const int64_t oblocks = ceil_div(Og, ob);
  const int64_t Lmax = rows * p.OW;

  // Packed weight of every group, shared by the items: A (panels of 8 channels) or, for
  // the transposed form, B (panels of 32 channels).
  const int64_t w_size = trans ? sgemm::packed_b_size(K, Og) : sgemm::packed_a_size(Og, K);
  float* wp = scratch(1, p.G * w_size);
  const int64_t panels = ceil_div(Og, mr);
  run_items(p.G * panels, [&](int64_t item) {
    const int64_t g = item / panels, o0 = (item % panels) * mr, m = std::min(mr, Og - o0);
    float* dst = wp + g * w_size + o0 * K;
    if (w_t) {  // element (o, k) at w[g K Og + k Og + o]
      const float* src = w + g * K * Og + o0;
      if (trans) {
        sgemm::pack_b(src, Og, 1, K, m, dst);
      } else {
        sgemm::pack_a(src, 1, Og, m, K, dst);
      }
    } else {
      const float* src = w + (g * Og + o0) * K;
      if (trans) {
        sgemm::pack_b(src, 1, K, K, m, dst);
      } else {
        sgemm::pack_a(src, K, 1, m, K, dst);
      }
    }
  }, p.O * K);

  // Stride 1 and >= 16 output columns, or no extra columns at all (1 x 1 unpadded); or
  // strided by stride phases.
  if (!trans && implicit_applies(p)) {
    (p.SH == 1 && p.SW == 1 ? kImplicit : kImplicitPhases).hit();
    forward_implicit(x, xs, wp, w_size, bias, y, ys, p, relu, rows_done);
    return;
  }

  (trans ? kGatherT : kGather).hit();
  const GatherSrc xsrc = gather_source(x, xs, p);
  const std::vector<int64_t> off = tap_offsets(xsrc.s, p);
  const int64_t gstride = Cg * xsrc.s.c;
  const int64_t col_size = round_up(Lmax, trans ? kMR : kNR) * K;
  const bool planes = ys.w == 1 && (p.OH == 1 || ys.h == p.OW);
  run_items(p.G * chunks * oblocks, [&](int64_t item) {
    const int64_t g = item / (chunks * oblocks), chunk = (item / oblocks) % chunks;
    const int64_t o0 = (item % oblocks) * ob, M = std::min(ob, Og - o0);
    int64_t r0, r1;
    if (by_sample) {
      const int64_t n = chunk / bands;
      r0 = n * p.OH + (chunk % bands) * rows;
      r1 = std::min((n + 1) * p.OH, r0 + rows);
    } else {
      r0 = chunk * rows;
      r1 = std::min(R, r0 + rows);
    }
    const int64_t L = (r1 - r0) * p.OW;
    float* col = scratch(0, round_up(col_size + ob * Lmax, 16) + Lmax * 2);
    float* cbuf = col + col_size;
    int64_t* idx = reinterpret_cast<int64_t*>(col + round_up(col_size + ob * Lmax, 16));
    position_offsets(xsrc.s, p, r0, r1, idx);
    gather_panels(xsrc.x + g * gstride, off.data(), K, idx, L, trans ? kMR : kNR, p.SW * xsrc.s.w, col);
    const float* b = bias ? bias + g * Og + o0 : nullptr;
    float* yg = y + (g * Og + o0) * ys.c;
    if (!trans) {
      const float* a = wp + g * w_size + o0 * K;
      if (planes && r0 / p.OH == (r1 - 1) / p.OH) {  // one sample: straight into y
        sgemm::gemm(a, col, M, L, K, yg + (r0 / p.OH) * ys.n + (r0 % p.OH) * ys.h, ys.c, false, b,
                    relu);
      } else {
        sgemm::gemm(a, col, M, L, K, cbuf, L, false, b, relu);
        for (int64_t r = r0; r < r1; ++r) {
          float* yr = yg + (r / p.OH) * ys.n + (r % p.OH) * ys.h;
          for (int64_t o = 0; o < M; ++o) {
            const float* src = cbuf + o * L + (r - r0) * p.OW;
            float* dst = yr + o * ys.c;
            for (int64_t ow = 0; ow < p.OW; ++ow) dst[ow * ys.w] = src[ow];
          }
        }
      }
    } else {
      sgemm::gemm(col, wp + g * w_size + o0 * K, L, M, K, cbuf, M, false, nullptr, false);
      store_transposed(cbuf, M, r0, r1, p, yg, ys, b, relu);
    }
    if (rows_done) {
      for (int64_t r = r0; r < r1;) {
        const int64_t n = r / p.OH, end = std::min(r1, (n + 1) * p.OH);
        rows_done(n, r - n * p.OH, end - n * p.OH);
        r = end;
      }
    }
  });
}

// Strided input gradient (and so conv_transpose2d's forward) without col2im, dilation 1:
// the input positions split into SH x SW stride phases (conv_input_grad_phase), each a
// stride-1 correlation of grad_output with the phase's taps of the weight, flipped and
// transposed. Each phase runs as forward_implicit does: grad_output is copied once with
// zero borders wide enough for every phase, and the GEMM (M = input channels of the group,
// K = output channels x the phase's taps) reads it in place, in padded-width coordinates
// (the Wp - Wb extra columns computed and dropped); the result is stored at stride (SH, SW)
// into gx. Every element of gx is written once (zero where no tap reaches it).
bool input_backward_phases_apply(const Conv2dParams& p) {
  // Thin groups would fill a few rows of each 8-row panel (AlexNet's 1-channel first layer
  // stays with col2im); small batches of small maps are the small-map paths' business.
  // A kernel smaller than its stride (ResNet's 1x1/2 shortcut) leaves phases no tap reaches,
  // only zero-filled here by strided stores, slower at 2 threads than col2im's path
  // (resnet_shortcut forward + backward 3.8 -> 5.3 ms): every phase must receive a tap.
  return (p.SH > 1 || p.SW > 1) && p.DH == 1 && p.DW == 1 && p.KH >= p.SH && p.KW >= p.SW &&
         p.in_per_group() >= 16 && p.N * p.OH * p.OW >= 1024 && p.OW >= 8;
}

void input_backward_phases(const float* gy, const Strides4& gs, const float* w, float* gx,
                           const Strides4& xs, const Conv2dParams& p) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), taps = p.KH * p.KW;
  const int64_t nph = std::min(p.SH, p.H), npw = std::min(p.SW, p.W);
  std::vector<ConvGradPhase> ph(nph), pw(npw);
  // Zero borders of grad_output that cover every phase's reads: rows j - pad + u for j <
  // count, u < taps.
  int64_t top = 0, bottom = 0, left = 0, right = 0;
  for (int64_t a = 0; a < nph; ++a) {
    ph[a] = conv_input_grad_phase(p.H, p.KH, p.SH, p.PH, a);
    if (ph[a].taps == 0 || ph[a].count == 0) continue;
    top = std::max(top, ph[a].pad);
    bottom = std::max(bottom, ph[a].count - 1 + ph[a].taps - 1 - ph[a].pad - (p.OH - 1));
  }
  for (int64_t b = 0; b < npw; ++b) {
    pw[b] = conv_input_grad_phase(p.W, p.KW, p.SW, p.PW, b);
    if (pw[b].taps == 0 || pw[b].count == 0) continue;
    left = std::max(left, pw[b].pad);
    right = std::max(right, pw[b].count - 1 + pw[b].taps - 1 - pw[b].pad - (p.OW - 1));
  }
  const int64_t Hp = p.OH + top + bottom, Wp = p.OW + left + right, plane = Hp * Wp;
  // Slack past the last plane: a panel's extra columns read up to a row and a panel on.
  const float* gyp = pad_planes(gy, gs, p.N, p.O, p.OH, p.OW, top, bottom, left, right, Wp + 2 * kNR);
  // Packed weight of each (group, phase): A (Cg x Og * taps_h * taps_w), element (c, (o, u,
  // v)) = w[g Og + o][c][first_h - SH u][first_w - SW v]; and the B offsets of its rows.
  std::vector<int64_t> a_at(p.G * nph * npw + 1, 0), off_at(nph * npw + 1, 0);
  for (int64_t i = 0; i < p.G * nph * npw; ++i) {
    const int64_t f = i % (nph * npw), kq = Og * ph[f / npw].taps * pw[f % npw].taps;
    a_at[i + 1] = a_at[i] + sgemm::packed_a_size(Cg, kq);
    if (i < nph * npw) off_at[i + 1] = off_at[i] + kq;
  }
  std::vector<int64_t> off(off_at.back());
  for (int64_t f = 0; f < nph * npw; ++f) {
    const int64_t th = ph[f / npw].taps, tw = pw[f % npw].taps;
    int64_t* o_f = off.data() + off_at[f];
    for (int64_t o = 0; o < Og; ++o)
      for (int64_t u = 0; u < th; ++u)
        for (int64_t v = 0; v < tw; ++v) o_f[(o * th + u) * tw + v] = o * plane + u * Wp + v;
  }
  float* wp = scratch(2, a_at.back());
  run_items(p.G * nph * npw, [&](int64_t i) {
    const int64_t g = i / (nph * npw), f = i % (nph * npw);
    const ConvGradPhase& a = ph[f / npw];
    const ConvGradPhase& b = pw[f % npw];
    const int64_t kq = Og * a.taps * b.taps;
    if (kq == 0) return;
    float* rows = scratch(0, Cg * kq);  // (Cg x kq) row-major, then packed
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t o = 0; o < Og; ++o) {
        const float* src = w + ((g * Og + o) * Cg + c) * taps;
        float* d = rows + c * kq + o * a.taps * b.taps;
        for (int64_t u = 0; u < a.taps; ++u)
          for (int64_t v = 0; v < b.taps; ++v)
            d[u * b.taps + v] = src[(a.first - p.SH * u) * p.KW + b.first - p.SW * v];
      }
    sgemm::pack_a(rows, kq, 1, Cg, kq, wp + a_at[i]);
  }, p.C * Og * taps);
  // Items: (sample, group, phase, band of about 384 positions of the phase).
  int64_t rows_max = 1;
  for (int64_t a = 0; a < nph; ++a) rows_max = std::max(rows_max, ph[a].count);
  const int64_t rows = std::clamp<int64_t>(ceil_div(384, Wp), 1, rows_max);
  const int64_t bands = ceil_div(rows_max, rows);
  run_items(p.N * p.G * nph * npw * bands, [&](int64_t item) {
    const int64_t band = item % bands, f = (item / bands) % (nph * npw);
    const int64_t g = (item / (bands * nph * npw)) % p.G, n = item / (bands * nph * npw * p.G);
    const int64_t fa = f / npw, fb = f % npw;
    const ConvGradPhase& a = ph[fa];
    const ConvGradPhase& b = pw[fb];
    const int64_t j0 = band * rows, j1 = std::min(a.count, j0 + rows);
    if (j0 >= j1 || b.count == 0) return;
    float* xg = gx + n * xs.n + g * Cg * xs.c;  // every phase has taps (KH >= SH, KW >= SW)
    const int64_t kq = Og * a.taps * b.taps, Lp = (j1 - j0 - 1) * Wp + b.count;
    const float* src = gyp + (n * p.O + g * Og) * plane + (top - a.pad + j0) * Wp + (left - b.pad);
    float* cbuf = scratch(0, Cg * rows * Wp);
    sgemm::gemm_rows(wp + a_at[g * nph * npw + f], src, off.data() + off_at[f], Cg, Lp, kq, cbuf,
                     Lp, nullptr, false);
    for (int64_t c = 0; c < Cg; ++c) {
      for (int64_t j = j0; j < j1; ++j) {
        const float* s = cbuf + c * Lp + (j - j0) * Wp;
        float* d = xg + c * xs.c + (fa + p.SH * j) * xs.h + fb * xs.w;
        const int64_t step = p.SW * xs.w;
        for (int64_t i = 0; i < b.count; ++i) d[i * step] = s[i];
      }
    }
  });
}

bool input_backward_overwrites(const Conv2dParams& p, const Strides4& xs) {
  if (input_backward_phases_apply(p) || input_backward_rows_applies(p, xs)) return true;
  if (!(p.SH == 1 && p.SW == 1 && p.PH <= p.DH * (p.KH - 1) && p.PW <= p.DW * (p.KW - 1))) return false;
  // Its columns (O x KH x KW by H x W) must not outnumber col2im's (C x KH x KW by OH x OW)
  // by much: LeNet's 6 -> 16 channels, 14x14 -> 10x10 stays with col2im. (AlexNet's 96 ->
  // 256 channels 5x5 by the implicit forward, which has no columns, measured no faster
  // than its col2im: 207 -> 213 ms forward + backward, 1 thread.)
  return 4 * p.O * p.H * p.W <= 5 * p.C * p.OH * p.OW;
}

void input_backward(const float* gy, const Strides4& gs, const float* w, float* gx,
                    const Strides4& xs, const Conv2dParams& p) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t taps = p.KH * p.KW, T = at::get_num_threads();
  if (input_backward_rows_applies(p, xs)) {
    kInRows.hit();
    input_backward_rows(gy, gs, w, gx, xs, p);
    return;
  }
  if (input_backward_phases_apply(p)) {
    kInPhases.hit();
    input_backward_phases(gy, gs, w, gx, xs, p);
    return;
  }
  if (input_backward_overwrites(p, xs)) {
    kInForward.hit();
    // Stride 1: gx is the convolution of gy, padded by d (k - 1) - p, with the weight
    // flipped in space and transposed in channels (w'[g Cg + c][o][kh][kw] =
    // w[g Og + o][c][KH - 1 - kh][KW - 1 - kw]): a forward, which overwrites gx, no col2im.
    const Conv2dParams q = conv_input_grad_as_forward(p);
    // (Winograd's version of this, winograd::input_backward_tensor in conv2d.cpp, runs
    // first where it applies; it comes here when a value is not finite.)
    if (small_n_applies(q)) {
      // The small-map forward reads its weight in place, row-major: w' as it is,
      // wf[g Cg + c][(o, t)] = w[g Og + o][c][taps - 1 - t].
      float* wf = scratch(2, p.C * Og * taps);
      run_items(p.C, [&](int64_t gc) {
        const int64_t g = gc / Cg, c = gc % Cg;
        float* dst = wf + gc * Og * taps;
        for (int64_t o = 0; o < Og; ++o) {
          const float* src = w + ((g * Og + o) * Cg + c) * taps;
          for (int64_t t = 0; t < taps; ++t) dst[o * taps + t] = src[taps - 1 - t];
        }
      }, p.O * Cg * taps);
      forward_impl(gy, gs, wf, false, nullptr, gx, xs, q, false, RowsDoneFn());
      return;
    }
    // w' transposed per group: wf[g][(o, t)][c] = w[g Og + o][c][taps - 1 - t], read in order.
    float* wf = scratch(2, p.C * Og * taps);
    run_items(p.O, [&](int64_t go) {
      const int64_t g = go / Og, o = go % Og;
      const float* src = w + go * Cg * taps;
      float* dst = wf + g * Og * taps * Cg + o * taps * Cg;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t c = 0; c < Cg; ++c) dst[t * Cg + c] = src[c * taps + taps - 1 - t];
    }, p.O * Cg * taps);
    forward_impl(gy, gs, wf, true, nullptr, gx, xs, q, false, RowsDoneFn());
    return;
  }
  // Items: (group, block of channels, block of samples); none shares an element of gx.
  int64_t cpb = ceil_div(Cg, std::min(Cg, ceil_div(T, p.G)));
  const int64_t cblocks = ceil_div(Cg, cpb);
  int64_t spb = p.N;
  if (p.G * cblocks < T) spb = ceil_div(p.N, std::min(p.N, ceil_div(T, p.G * cblocks)));
  const int64_t nblocks = ceil_div(p.N, spb);
  const int64_t Kc_max = cpb * taps;
  const int64_t rows = std::clamp<int64_t>(kColBudget / std::max<int64_t>(1, Kc_max * p.OW), 1,
                                           spb * p.OH);
  const int64_t Lmax = rows * p.OW;
  const bool trans = positions_on_m(Lmax, Kc_max);
  const int64_t w_size = trans ? sgemm::packed_b_size(Og, Kc_max) : sgemm::packed_a_size(Kc_max, Og);
  const int64_t g_size = trans ? sgemm::packed_a_size(Lmax, Og) : sgemm::packed_b_size(Og, Lmax);
  (trans ? kInCol2imT : kInCol2im).hit();
  run_items(p.G * cblocks * nblocks, [&](int64_t item) {
    const int64_t g = item / (cblocks * nblocks), cb = (item / nblocks) % cblocks;
    const int64_t nb = item % nblocks;
    const int64_t c0 = cb * cpb, c1 = std::min(Cg, c0 + cpb), Kc = (c1 - c0) * taps;
    float* wpk = scratch(0, w_size + g_size + Kc_max * Lmax);
    float* gpk = wpk + w_size;
    float* col = gpk + g_size;
    const float* wg = w + g * Og * K + c0 * taps;  // element (o, k) at wg[o * K + k]
    if (trans) {
      sgemm::pack_b(wg, K, 1, Og, Kc, wpk);
    } else {
      sgemm::pack_a(wg, 1, K, Kc, Og, wpk);
    }
    const int64_t rend = std::min(p.N, (nb + 1) * spb) * p.OH;
    for (int64_t r0 = nb * spb * p.OH; r0 < rend; r0 += rows) {
      const int64_t r1 = std::min(rend, r0 + rows), L = (r1 - r0) * p.OW;
      pack_positions(gy + g * Og * gs.c, gs, p, Og, r0, r1, trans ? kMR : kNR, gpk);
      if (trans) {
        sgemm::gemm(gpk, wpk, L, Kc, Og, col, Kc, false, nullptr);
        col2im_add(col, 1, Kc, p, g * Cg + c0, g * Cg + c1, r0, r1, gx, xs);
      } else {
        sgemm::gemm(wpk, gpk, Kc, L, Og, col, L, false, nullptr);
        col2im_add(col, L, 1, p, g * Cg + c0, g * Cg + c1, r0, r1, gx, xs);
      }
    }
  });
}

void weight_backward(const float* gy, const Strides4& gs, const float* x, const Strides4& xs,
                     float* gw, const Conv2dParams& p) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const int64_t R = p.N * p.OH, T = at::get_num_threads();
  if (R == 0 || p.OW == 0) {
    std::fill(gw, gw + p.O * K, 0.f);
    return;
  }
  if (channel_lanes_applies(p, xs)) {
    kWLanes.hit();
    weight_backward_lanes(gy, gs, x, xs, gw, p);
    return;
  }
  const bool unit = p.SH == 1 && p.SW == 1;
  // Strided: phases where the input has a few channels per group at least (AlexNet's
  // one-channel 11x11 stride 4 layer keeps the gather: 25.0 -> 26.6 ms forward + backward
  // by phases, 1 thread).
  if (unit ? p.OW >= 12 : phases_apply(p, 12) && Cg >= 4) {
    (unit ? kWImplicit : kWImplicitPhases).hit();
    // gw_g^T (K x Og) = A (K x L) * gy_g^T with A read in place from the padded input (or,
    // strided, its stride phases: phase_source), A(k, l) = xpad[off[k] + l] in padded-width
    // coordinates l = oh * Wp + ow; gy^T is packed in the same coordinates, zero in the Wp -
    // OW extra columns, which so add nothing. Items: (group, block of rows of gw^T), each
    // reducing every position itself.
    const ImplicitSrc src = unit ? implicit_source(x, xs, p) : phase_source(x, xs, p);
    const int64_t Wp = src.Wq, plane = src.csize;
    const float* xp = src.x;
    const std::vector<int64_t>& off = src.off;
    const int64_t rows = std::clamp<int64_t>(ceil_div(1536, Wp), 1, p.OH);
    const int64_t bands = ceil_div(p.OH, rows);
    // Items: with more threads than groups and >= 2 panels of output channels for each,
    // (group, block of whole panels of output channels): each packs only its own channels of
    // gy and reads all of A (the threads read the same input, from the shared cache); else
    // (group, block of rows of gw^T), every item packing all of its group's gy.
    const int64_t jsplit = std::min(ceil_div(T, p.G), Og / (2 * kNR));
    const int64_t jpb = jsplit >= 2 ? round_up(ceil_div(Og, jsplit), kNR) : Og;
    const int64_t jblocks = ceil_div(Og, jpb);
    const int64_t kpb = jblocks > 1 ? K : round_up(ceil_div(K, std::min(ceil_div(K, kMR), ceil_div(T, p.G))), kMR);
    const int64_t kblocks = ceil_div(K, kpb);
    float* gwt = scratch(1, p.G * K * Og);
    const int64_t b_size = sgemm::packed_b_size(rows * Wp, jpb);
    run_items(p.G * kblocks * jblocks, [&](int64_t item) {
      const int64_t g = item / (kblocks * jblocks), kb = (item / jblocks) % kblocks, jb = item % jblocks;
      const int64_t k0 = kb * kpb, k1 = std::min(K, k0 + kpb);
      const int64_t j0 = jb * jpb, nj = std::min(Og, j0 + jpb) - j0;
      float* bpk = scratch(0, b_size);
      for (int64_t n = 0; n < p.N; ++n) {
        for (int64_t band = 0; band < bands; ++band) {
          const int64_t oh0 = band * rows, oh1 = std::min(p.OH, oh0 + rows);
          const int64_t Lp = (oh1 - oh0) * Wp - (Wp - p.OW);
          pack_gy_padded(gy + n * gs.n + (g * Og + j0) * gs.c, gs, p, nj, oh0, oh1, Wp, Lp, bpk);
          sgemm::gemm_arows(xp + (n * p.C + g * Cg) * plane + oh0 * Wp, off.data() + k0, bpk,
                            k1 - k0, nj, Lp, gwt + (g * K + k0) * Og + j0, Og, n > 0 || band > 0);
        }
      }
    });
    run_items(std::min<int64_t>(T, p.O), [&](int64_t t) {
      const int64_t per = ceil_div(p.O, std::min<int64_t>(T, p.O));
      for (int64_t o = t * per; o < std::min(p.O, (t + 1) * per); ++o) {
        const float* src = gwt + (o / Og) * K * Og + o % Og;
        float* dst = gw + o * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = src[k * Og];
      }
    }, p.O * K);
    // The Wp - OW extra columns read x where gy is zero: a NaN or Inf of x there gives
    // 0 * NaN = NaN in entries that do not depend on it. gw is finite unless x (or gy)
    // holds such a value, so a check of the small gw is all the common case pays; the
    // rare non-finite gw is recomputed below, reading only the positions each tap uses.
    if (std::all_of(gw, gw + p.O * K, [](float v) { return std::isfinite(v); })) return;
  }
  // gw_g (Og x K) = gy_g (Og x L) * col^T (L x K), summed over chunks of positions. Items:
  // (group, block of taps, a multiple of kNR): each owns its columns of gw and reduces
  // every position itself.
  kWGather.hit();
  const int64_t kpb = round_up(ceil_div(K, std::min(ceil_div(K, kNR), ceil_div(T, p.G))), kNR);
  const int64_t kblocks = ceil_div(K, kpb);
  const int64_t rows = std::clamp<int64_t>(kColBudget / std::max<int64_t>(1, kpb * p.OW), 1, R);
  const int64_t Lmax = rows * p.OW;
  const int64_t a_size = sgemm::packed_a_size(Og, Lmax), b_size = sgemm::packed_b_size(Lmax, kpb);
  // The input itself where there is no padding (a strided 1x1 shortcut reads a quarter of
  // it), else its padded copy.
  const GatherSrc src = gather_source(x, xs, p);
  const float* xp = src.x;
  const std::vector<int64_t> off = tap_offsets(src.s, p);
  const int64_t gstride = Cg * src.s.c;
  // Where the taps are split over items, gy is packed once, its panels of output channels
  // over the threads, into a buffer the items share (up to 64 MiB; each item packed all of
  // it before). The products and their order are unchanged.
  const int64_t nchunks = ceil_div(R, rows), a_total = p.G * nchunks * a_size;
  const bool share_a = kblocks > 1 && a_total <= (int64_t(1) << 24);
  float* ash = nullptr;
  if (share_a) {
    ash = scratch(1, a_total);
    const int64_t panels = ceil_div(Og, kMR);
    const int64_t psplit = std::min(panels, std::max<int64_t>(1, ceil_div(2 * T, p.G * nchunks)));
    const int64_t ppb = ceil_div(panels, psplit);
    run_items(p.G * nchunks * psplit, [&](int64_t item) {
      const int64_t gc = item / psplit, g = gc / nchunks, c = gc % nchunks;
      const int64_t o0 = (item % psplit) * ppb * kMR, o1 = std::min(Og, o0 + ppb * kMR);
      const int64_t r0 = c * rows, r1 = std::min(R, r0 + rows), L = (r1 - r0) * p.OW;
      if (o0 < o1) pack_channels(gy + (g * Og + o0) * gs.c, gs, p, o1 - o0, r0, r1, kMR, ash + gc * a_size + o0 * L);
    }, a_total);
    kWSharedA.hit();
  }
  run_items(p.G * kblocks, [&](int64_t item) {
    const int64_t g = item / kblocks, k0 = (item % kblocks) * kpb, k1 = std::min(K, k0 + kpb);
    float* apk = scratch(0, (share_a ? 0 : a_size) + b_size + 2 * Lmax);
    float* bpk = apk + (share_a ? 0 : a_size);
    int64_t* idx = reinterpret_cast<int64_t*>(bpk + b_size);
    for (int64_t r0 = 0; r0 < R; r0 += rows) {
      const int64_t r1 = std::min(R, r0 + rows), L = (r1 - r0) * p.OW;
      const float* a = apk;
      if (share_a) a = ash + (g * nchunks + r0 / rows) * a_size;
      else pack_channels(gy + g * Og * gs.c, gs, p, Og, r0, r1, kMR, apk);
      position_offsets(src.s, p, r0, r1, idx);
      gather_t(xp + g * gstride, off.data(), k0, k1, idx, L, bpk);
      sgemm::gemm(a, bpk, Og, k1 - k0, L, gw + g * Og * K + k0, K, r0 > 0, nullptr);
    }
  });
}

}  // namespace conv_sgemm
}  // namespace cpu
}  // namespace cnnext
