// conv2d on the CPU: im2col / col2im (ours) around a matrix multiply (at::mm).
//
// The output is cut into work items (one sample, a band of output rows); each item
// unfolds its band into a thread-local column buffer small enough to stay in cache
// and multiplies it with the weight of each group. Items run in parallel over the
// cores; a single item runs alone and lets the matrix multiply use every core.
// Tensors of any strides are read and written through their strides, so
// channels_last and non-contiguous inputs need no copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/ConvUtils.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
#include <immintrin.h>
#endif

#include "cpu/conv2d.h"
#include "cpu/conv2d_half.h"
#include "cpu/cpu_features.h"
#include "cpu/items.h"
#include "cpu/half.h"
#include "tensors.h"
#include "cpu/conv2d_nhwc.h"
#include "cpu/conv2d_sgemm.h"
#include "cpu/conv2d_tinyc.h"
#include "cpu/conv2d_winograd.h"
#include "cpu/output_alloc.h"
#include "cpu/scratch.h"
#include "cpu/sgemm.h"
#include "cpu/vec.h"
#include "paths.h"

namespace cnnext {
namespace cpu {
namespace {

CNNEXT_PATH_NEEDS(kFwdSgemm, "conv2d.fwd.sgemm", kAvx512F);
CNNEXT_PATH(kFwdDirect, "conv2d.fwd.direct");
CNNEXT_PATH(kFwdMm, "conv2d.fwd.mm");
CNNEXT_PATH_NEEDS(kInSgemm, "conv2d.input_grad.sgemm", kAvx512F);
CNNEXT_PATH(kInDirect, "conv2d.input_grad.direct");
CNNEXT_PATH(kInMm, "conv2d.input_grad.mm");
CNNEXT_PATH(kWDirect, "conv2d.weight_grad.direct");
// A padded float32 convolution's weight gradient came out not finite and was recomputed by
// the direct loops (stock's terms only: conv2d_weight_backward).
CNNEXT_PATH(kWNonFiniteRedo, "conv2d.weight_grad.nonfinite_direct");
// A padded float32 forward with a non-finite weight, recomputed by the direct loops
// (stock's taps only: match_stock_padding).
CNNEXT_PATH(kFwdNonFiniteDirect, "conv2d.fwd.nonfinite_direct");
CNNEXT_PATH_NEEDS(kWSgemm, "conv2d.weight_grad.sgemm", kAvx512F);
CNNEXT_PATH(kWMm, "conv2d.weight_grad.mm");
CNNEXT_PATH(kFwdMmBlocks, "conv2d.fwd.mm_sample_blocks");
CNNEXT_PATH(kFwdMmRowsCl, "conv2d.fwd.mm_rows_channels_last");
CNNEXT_PATH(kInMmBlocks, "conv2d.input_grad.mm_sample_blocks");
CNNEXT_PATH(kWMmBlocks, "conv2d.weight_grad.mm_sample_blocks");
// conv2d_and_weight_backward: one unfolding of the input serves both GEMMs (conv_transpose2d's
// backward: grad_input and grad_weight unfold grad_output alike).
CNNEXT_PATH(kSharedColumns, "conv2d.fwd_and_weight_grad.shared_columns");
// conv2d_forward_bf16_unfolded: bfloat16 input unfolded straight into float columns, the
// output rounded from the GEMM's band (no float copies of input and output), AVX2.
CNNEXT_PATH_NEEDS(kFwdMmBf16, "conv2d.fwd.mm_bf16_unfolded_avx2", kAvx2);
// sample_blocks chose one block for every thread (a weight-bound GEMM, below).
CNNEXT_PATH(kBlocksWeightBound, "conv2d.sample_blocks.weight_bound");
// im2col of float rows read at a stride of 2, by AVX2 vectors (gather_even_avx2).
CNNEXT_PATH_NEEDS(kIm2colEven, "conv2d.im2col.stride2_avx2", kAvx2);
CNNEXT_PATH_NEEDS(kCol2imEven, "conv2d.col2im.stride2_avx2", kAvx2);

// Column buffer elements a work item aims for: about 4 MiB of floats. Bands of one
// sample are made equal, so no band is a sliver.
constexpr int64_t kColBudget = int64_t(1) << 20;

struct Bands {
  int64_t rows;   // output rows per band
  int64_t count;  // bands per sample
};

Bands bands_for(const Conv2dParams& p) {
  const int64_t per_row = std::max<int64_t>(1, p.in_per_group() * p.KH * p.KW * p.OW);
  const int64_t OH = std::max<int64_t>(p.OH, 1);
  const int64_t count = std::clamp<int64_t>((per_row * OH + kColBudget - 1) / kColBudget, 1, OH);
  const int64_t rows = (OH + count - 1) / count;
  return {rows, (OH + rows - 1) / rows};
}

// Few output positions a sample (ResNet's 7x7 and smaller maps): one at::mm per sample of
// a few dozen columns costs about a pass over the weight (up to 9 MiB) per sample. Such
// samples are multiplied in blocks instead: the columns of `per` samples side by side,
// one GEMM a block and group (ResNet-18 at 96x96, batch 4, layer 4's 3x3 forward: 10.9 ->
// 2.4 ms on a 2-core Zen 3). From 144 positions a sample on (12x12 maps), blocks were slower
// than one GEMM a sample there (AlexNet's 3x3: 1.2x the time), hence the limit.
constexpr int64_t kFewPositions = 64;   // positions a sample below which samples are blocked
constexpr int64_t kBlockColumns = 512;  // columns a block aims for
constexpr int64_t kTinyGemm = int64_t(1) << 20;  // MACs below which a sample's GEMM is tiny
constexpr int64_t kWeightBoundColumns = 32;  // columns a thread's block at most, and
constexpr int64_t kWeightBoundFloats = int64_t(1) << 17;  // a group's weight (512 KiB) at least:
                                                         // one block for all threads (below)

struct SampleBlocks {
  int64_t per;    // samples a block (1: no blocking)
  int64_t count;  // blocks
  // Block blk's samples [first, last) of N.
  int64_t first(int64_t blk) const { return blk * per; }
  int64_t last(int64_t blk, int64_t N) const { return std::min(N, (blk + 1) * per); }
  // A block's scratch, for_each_item's buffer of scratch_size(K, rows, L) elements: the
  // K x c column matrix of its c = samples * L columns, then a rows x c matrix (the
  // output's or grad_output's planes side by side). One layout for every block loop.
  int64_t scratch_size(int64_t K, int64_t rows, int64_t L) const { return (K + rows) * per * L; }
  at::Tensor columns(at::Tensor& buf, int64_t K, int64_t c) const { return buf.narrow(0, 0, K * c).view({K, c}); }
  at::Tensor planes(at::Tensor& buf, int64_t K, int64_t rows, int64_t L, int64_t c) const {
    return buf.narrow(0, K * per * L, rows * c).view({rows, c});
  }
};

SampleBlocks sample_blocks(const Conv2dParams& p) {
  const int64_t L = p.OH * p.OW;
  const int64_t K = p.in_per_group() * p.KH * p.KW;
  // MACs of one sample's GEMM (a group's): below kTinyGemm at::mm's fixed cost per call
  // is a good part of the call, so samples are blocked up to about kTinyGemm a GEMM
  // (LeNet's second layer, 16 x 150 x 100 a sample, batch 64: 1.12 -> 0.67 ms forward).
  const int64_t macs = p.out_per_group() * K * L;
  const bool tiny = macs < kTinyGemm;
  if (p.N < 2 || L == 0 || (L >= kFewPositions && !tiny)) return {1, p.N};
  // The column matrix of a block stays within the budget of a band.
  const int64_t by_budget = std::max<int64_t>(1, kColBudget / std::max<int64_t>(1, K * L));
  // At least a block a thread: each block's GEMM runs on one thread (at::mm's own
  // threading gains little at these sizes: 1.5-1.9 ms on two threads against 2.0 on one
  // for 128 x 1152 x 576 on this 2-core Zen 3).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t target = (kBlockColumns + L - 1) / L;
  if (tiny) target = std::max(target, (kTinyGemm + macs - 1) / std::max<int64_t>(1, macs));
  // Except where a block a thread would be a few columns against a weight past L2: each
  // such GEMM is bound by reading the weight, and every thread reads all of it (and, for
  // the weight gradient, writes a partial sum as large). One block then, at::mm threading
  // over the weight's rows (ResNet-18 at 96x96, batch 4, 512 -> 512 at 3x3, 18 columns a
  // thread: forward 2.86 -> 2.53 ms, forward + backward 10.7 -> 7.4 ms on a 2-core Zen 3;
  // 256 -> 512 stride 2: 1.10 -> 0.88, 3.79 -> 2.92 ms. At 72 columns a thread, 128 -> 256
  // stride 2 with a 1.2 MB weight, one block was slower: 0.67 -> 0.70, 2.44 -> 2.73 ms).
  const int64_t per_thread = (p.N + threads - 1) / threads;
  const bool weight_bound = per_thread * L <= kWeightBoundColumns && p.out_per_group() * K >= kWeightBoundFloats;
  const int64_t per = std::min({weight_bound ? p.N : per_thread, target, by_budget});
  if (per < 2) return {1, p.N};
  if (weight_bound && per > per_thread) kBlocksWeightBound.hit();
  return {per, (p.N + per - 1) / per};
}

// A 1x1, stride-1, unpadded convolution reads its input as the column matrix itself.
bool is_pointwise(const Conv2dParams& p) {
  return p.KH == 1 && p.KW == 1 && p.SH == 1 && p.SW == 1 && p.PH == 0 && p.PW == 0;
}

// (rows, cols) matrix view of channels [c0, c0 + rows) of sample n, output rows
// [r0, r1) of a 4-D tensor whose (h, w) dims flatten (stride h == W * stride w).
at::Tensor plane_matrix(const at::Tensor& t, int64_t n, int64_t c0, int64_t rows, int64_t r0,
                        int64_t r1) {
  const Strides4 s = strides_of(t);
  const int64_t W = t.size(3);
  return t.as_strided({rows, (r1 - r0) * W}, {s.c, s.w},
                      t.storage_offset() + n * s.n + c0 * s.c + r0 * s.h);
}

// dst (rows, (n1 - n0) * H * W) = channels [c0, c0 + rows) of samples [n0, n1) of t, each
// sample's planes as plane_matrix views them, side by side.
void gather_planes(at::Tensor& dst, const at::Tensor& t, int64_t n0, int64_t n1, int64_t c0, int64_t rows) {
  const int64_t L = t.size(2) * t.size(3);
  for (int64_t n = n0; n < n1; ++n) dst.narrow(1, (n - n0) * L, L).copy_(plane_matrix(t, n, c0, rows, 0, t.size(2)));
}

bool planes_flatten(const at::Tensor& t) { return t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3); }

// grad_output as plane_matrix needs it: most gradients already are.
at::Tensor flattenable(const at::Tensor& t) { return planes_flatten(t) ? t : t.contiguous(); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
// dst[i] = src[2 * i] for i in [0, n), 8 at a time: two loads, an in-lane shuffle of the
// even elements and a cross-lane permute. Reads src[0, 2n - 1) only: a vector of 8 needs 16
// values, so the last vector is taken only where its 16th value is still below 2n - 1; the
// rest element by element. (GCC leaves the plain loop scalar: a stride-2 im2col row, for a
// stride-2 layer's taps, cost about as much as a third of its GEMM.)
CNNEXT_TARGET("avx2") void gather_even_avx2(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 9 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(src + 2 * i), b = _mm256_loadu_ps(src + 2 * i + 8);
    const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // a0 a2 b0 b2 | a4 a6 b4 b6
    _mm256_storeu_ps(dst + i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
  }
  for (; i < n; ++i) dst[i] = src[2 * i];
}

// dst[2 * i] += src[i] for i in [0, n), the adjoint of gather_even_avx2: 8 values spread
// over 16 lanes between -0.0s (x + -0.0 == x for every x, signed zeros and NaNs included,
// so the odd lanes come back unchanged); touches dst[0, 2n - 1) only, as gather_even_avx2.
CNNEXT_TARGET("avx2") void scatter_add_even_avx2(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  const __m256 nz = _mm256_set1_ps(-0.f);
  for (; i + 9 <= n; i += 8) {
    // s0 s1 s4 s5 | s2 s3 s6 s7, then interleaved with -0.0: s0 . s1 . | s2 . s3 . and
    // s4 . s5 . | s6 . s7 . (the 128-bit lanes as the memory order needs them).
    const __m256 sp = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_loadu_ps(src + i)),
                                                             _MM_SHUFFLE(3, 1, 2, 0)));
    float* d = dst + 2 * i;
    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), _mm256_unpacklo_ps(sp, nz)));
    _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), _mm256_unpackhi_ps(sp, nz)));
  }
  for (; i < n; ++i) dst[2 * i] += src[i];
}
// dst[i] = float(src[2 * i]) for bfloat16 bits src, 8 at a time: one load of 16 values, whose
// even ones are the low halves of the 32-bit lanes, shifted up into float bits (exact).
// Reads src[0, 2n - 1) only, as gather_even_avx2.
CNNEXT_TARGET("avx2") void gather_even_bf16_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 9 <= n; i += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
  for (; i < n; ++i) dst[i] = vec::bf16_to_float(src[2 * i]);
}
constexpr bool kGatherEven = true;
#else
void gather_even_avx2(const float*, float*, int64_t) {}
void scatter_add_even_avx2(const float*, float*, int64_t) {}
void gather_even_bf16_avx2(const uint16_t*, float*, int64_t) {}
constexpr bool kGatherEven = false;
#endif

// Whether im2col / col2im move T's rows by gather_even_avx2 / scatter_add_even_avx2 (im2col of
// bfloat16 bits, uint16_t, by gather_even_bf16_avx2): rows at a stride of exactly 2 values,
// on a CPU with AVX2.
template <typename T>
bool stride2_vectors(const Conv2dParams& p, const Strides4& xs) {
  return (std::is_same_v<T, float> || std::is_same_v<T, uint16_t>) && kGatherEven && p.SW * xs.w == 2 &&
         cpu_features().avx2_fma();
}

// One row of taps: dst[i] = src[i * step] for i in [0, n), widened to float where S holds
// bfloat16 bits (uint16_t); `even`: stride2_vectors<S>.
template <typename S, typename T>
void copy_taps(const S* src, T* dst, int64_t n, int64_t step, bool even) {
  if constexpr (std::is_same_v<S, uint16_t>) {
    static_assert(std::is_same_v<T, float>, "bfloat16 bits unfold into float columns");
    if (step == 1) {
      vec::bf16_to_float(src, dst, n);
    } else if (even) {
      gather_even_bf16_avx2(src, dst, n);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = vec::bf16_to_float(src[i * step]);
    }
  } else {
    static_assert(std::is_same_v<S, T>, "float and double unfold into their own type");
    if (step == 1) {
      std::memcpy(dst, src, sizeof(T) * n);
    } else if (even) {
      if constexpr (std::is_same_v<T, float>) gather_even_avx2(src, dst, n);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i * step];
    }
  }
}

// Unfolds channels [0, Cg) (x points at the group's first channel of one sample) for
// output rows [oh0, oh1) into col, laid out (Cg * KH * KW, (oh1 - oh0) * OW), rows ld
// apart (0: (oh1 - oh0) * OW, the rows back to back). S is T, or bfloat16 bits (uint16_t)
// unfolded into float columns.
template <typename S, typename T>
void im2col(const S* x, const Strides4& xs, const Conv2dParams& p, int64_t Cg, int64_t oh0,
            int64_t oh1, T* col, int64_t ld = 0) {
  const int64_t L = ld > 0 ? ld : (oh1 - oh0) * p.OW;
  // rows read at a stride of 2 (a stride-2 layer, unit-stride rows): by vectors.
  const bool even = stride2_vectors<S>(p, xs);
  if (even) kIm2colEven.hit();
  for (int64_t c = 0; c < Cg; ++c) {
    for (int64_t kh = 0; kh < p.KH; ++kh) {
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        T* dst = col + ((c * p.KH + kh) * p.KW + kw) * L;
        int64_t lo, hi;
        conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &lo, &hi);
        const int64_t iw_lo = conv_in_coord(lo, kw, p.SW, p.PW, p.DW);
        for (int64_t oh = oh0; oh < oh1; ++oh, dst += p.OW) {
          const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
          if (ih < 0 || ih >= p.H) {
            std::fill(dst, dst + p.OW, T(0));
            continue;
          }
          std::fill(dst, dst + lo, T(0));
          std::fill(dst + hi, dst + p.OW, T(0));
          copy_taps(x + c * xs.c + ih * xs.h + iw_lo * xs.w, dst + lo, hi - lo, p.SW * xs.w, even);
        }
      }
    }
  }
}

// im2col transposed, for channels_last: output positions of rows [oh0, oh1) of samples
// [n0, n1), one row of K = KH * KW * Cg per position, ordered (kh, kw, c) (x points at the
// group's first channel of sample 0; its channels at unit stride, so each tap is one copy
// of Cg contiguous values, or zeros in the padding).
template <typename T>
void im2row_channels_last(const T* x, const Strides4& xs, const Conv2dParams& p, int64_t Cg,
                          int64_t n0, int64_t n1, int64_t oh0, int64_t oh1, T* rows) {
  T* r = rows;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        for (int64_t kh = 0; kh < p.KH; ++kh) {
          const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
          for (int64_t kw = 0; kw < p.KW; ++kw, r += Cg) {
            const int64_t iw = conv_in_coord(ow, kw, p.SW, p.PW, p.DW);
            if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) {
              std::fill(r, r + Cg, T(0));
            } else {
              std::memcpy(r, x + n * xs.n + ih * xs.h + iw * xs.w, sizeof(T) * Cg);
            }
          }
        }
      }
    }
  }
}

// The adjoint of im2col: adds col back into the input positions it was read from.
template <typename T>
void col2im_add(const T* col, const Conv2dParams& p, int64_t Cg, int64_t oh0, int64_t oh1,
                T* x, const Strides4& xs, int64_t ld = 0) {
  const int64_t L = ld > 0 ? ld : (oh1 - oh0) * p.OW;
  // float rows added at a stride of 2: by vectors, as im2col reads them.
  const bool even = stride2_vectors<T>(p, xs);
  if (even) kCol2imEven.hit();
  for (int64_t c = 0; c < Cg; ++c) {
    for (int64_t kh = 0; kh < p.KH; ++kh) {
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        const T* src = col + ((c * p.KH + kh) * p.KW + kw) * L;
        int64_t lo, hi;
        conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &lo, &hi);
        const int64_t iw_lo = conv_in_coord(lo, kw, p.SW, p.PW, p.DW);
        const int64_t step = p.SW * xs.w;
        for (int64_t oh = oh0; oh < oh1; ++oh, src += p.OW) {
          const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
          if (ih < 0 || ih >= p.H) continue;
          T* dst = x + c * xs.c + ih * xs.h + iw_lo * xs.w;
          if (step == 1) {  // unit stride: a vectorised row add (col and x never overlap)
            const T* srow = src + lo;
            _Pragma("omp simd")
            for (int64_t q = 0; q < hi - lo; ++q) dst[q] += srow[q];
          } else if (even) {
            if constexpr (std::is_same_v<T, float>) scatter_add_even_avx2(src + lo, dst, hi - lo);
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) dst[(ow - lo) * step] += src[ow];
          }
        }
      }
    }
  }
}

// Scratch memory of the calling thread, kept between calls and grown as needed:
// buffers of megabytes allocated afresh on every call cost page faults comparable to
// the arithmetic of a small layer. Slot 0 holds per-item buffers, slot 1 packed weights.
void* conv_scratch(int slot, int64_t elems, int64_t elem_size) {
  return thread_scratch_bytes(ScratchPool::Conv2d, slot, size_t(std::max<int64_t>(elems, 1)) * size_t(elem_size));
}

at::Tensor scratch_tensor(int slot, int64_t elems, const at::Tensor& like) {
  return at::from_blob(conv_scratch(slot, elems, like.element_size()), {elems}, like.options());
}

// Runs fn(item, buffer) over items; in parallel with a buffer per thread when there
// are several items, else once with the matrix multiply free to use every core.
template <typename Fn>
void for_each_item(int64_t items, const at::Tensor& like, int64_t buf_elems, const Fn& fn) {
  if (items == 0) return;
  if (items == 1 || at::get_num_threads() == 1) {
    at::Tensor buf = scratch_tensor(0, buf_elems, like);
    for (int64_t i = 0; i < items; ++i) fn(i, buf);
    return;
  }
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep the at:: calls
    // below (at::mm) out of autograd, as they are on the calling thread.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor buf = scratch_tensor(0, buf_elems, like);
    for (int64_t i = begin; i < end; ++i) fn(i, buf);
  });
}

// Thin groups (depthwise and the like: few channels in and out per group) make
// matrices too small for a GEMM to pay; these direct loops compute them instead.
bool use_direct(const Conv2dParams& p) { return p.in_per_group() * p.out_per_group() <= 8; }

// y[n, o, :, :] = bias[o] + sum over the group's channels and taps (then max(., 0) with relu).
template <typename T>
void direct_forward(const T* x, const Strides4& xs, const T* w, const T* bias, T* y,
                    const Strides4& ys, const Conv2dParams& p, bool relu) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group();
  at::parallel_for(0, p.N * p.O, 1, [&](int64_t b, int64_t e) {
    std::vector<T> row(p.OW);
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / p.O, o = item % p.O, c0 = (o / Og) * Cg;
      for (int64_t oh = 0; oh < p.OH; ++oh) {
        std::fill(row.begin(), row.end(), bias ? bias[o] : T(0));
        for (int64_t c = 0; c < Cg; ++c) {
          for (int64_t kh = 0; kh < p.KH; ++kh) {
            const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
            if (ih < 0 || ih >= p.H) continue;
            const T* xr = x + n * xs.n + (c0 + c) * xs.c + ih * xs.h;
            for (int64_t kw = 0; kw < p.KW; ++kw) {
              const T wv = w[((o * Cg + c) * p.KH + kh) * p.KW + kw];
              int64_t lo, hi;
              conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &lo, &hi);
              const T* src = xr + conv_in_coord(lo, kw, p.SW, p.PW, p.DW) * xs.w;
              const int64_t step = p.SW * xs.w;
              for (int64_t ow = lo; ow < hi; ++ow) row[ow] += wv * src[(ow - lo) * step];
            }
          }
        }
        T* yr = y + n * ys.n + o * ys.c + oh * ys.h;
        if (relu) {
          for (int64_t ow = 0; ow < p.OW; ++ow) yr[ow * ys.w] = row[ow] < T(0) ? T(0) : row[ow];
        } else {
          for (int64_t ow = 0; ow < p.OW; ++ow) yr[ow * ys.w] = row[ow];
        }
      }
    }
  });
}

// gx[n, c] = sum over the group's output channels of gy[n, o] spread back through w[o, c].
// gx must be zero on entry; each (n, c) plane is written by one thread.
template <typename T>
void direct_input_backward(const T* gy, const Strides4& gs, const T* w, T* gx,
                           const Strides4& xs, const Conv2dParams& p) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group();
  at::parallel_for(0, p.N * p.C, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / p.C, c = item % p.C, o0 = (c / Cg) * Og, cl = c % Cg;
      T* gxp = gx + n * xs.n + c * xs.c;
      for (int64_t o = o0; o < o0 + Og; ++o) {
        for (int64_t kh = 0; kh < p.KH; ++kh) {
          for (int64_t kw = 0; kw < p.KW; ++kw) {
            const T wv = w[((o * Cg + cl) * p.KH + kh) * p.KW + kw];
            int64_t lo, hi;
            conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &lo, &hi);
            const int64_t iw_lo = conv_in_coord(lo, kw, p.SW, p.PW, p.DW);
            const int64_t step = p.SW * xs.w;
            for (int64_t oh = 0; oh < p.OH; ++oh) {
              const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
              if (ih < 0 || ih >= p.H) continue;
              const T* g = gy + n * gs.n + o * gs.c + oh * gs.h;
              T* dst = gxp + ih * xs.h + iw_lo * xs.w;
              for (int64_t ow = lo; ow < hi; ++ow) dst[(ow - lo) * step] += wv * g[ow * gs.w];
            }
          }
        }
      }
    }
  });
}

// gw[o, c, kh, kw] = sum over n, oh, ow of gy[n, o, oh, ow] * x[n, c', ih, iw], each
// weight element summed by one thread (rows in T, rows added up in double).
template <typename T>
void direct_weight_backward(const T* gy, const Strides4& gs, const T* x, const Strides4& xs,
                            T* gw, const Conv2dParams& p) {
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group();
  const int64_t taps = p.KH * p.KW;
  at::parallel_for(0, p.O * Cg * taps, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t o = item / (Cg * taps), cl = (item / taps) % Cg;
      const int64_t kh = (item % taps) / p.KW, kw = item % p.KW;
      const int64_t c = (o / Og) * Cg + cl;
      int64_t lo, hi;
      conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &lo, &hi);
      const int64_t iw_lo = conv_in_coord(lo, kw, p.SW, p.PW, p.DW);
      const int64_t step = p.SW * xs.w;
      double acc = 0;
      for (int64_t n = 0; n < p.N; ++n) {
        for (int64_t oh = 0; oh < p.OH; ++oh) {
          const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
          if (ih < 0 || ih >= p.H) continue;
          const T* g = gy + n * gs.n + o * gs.c + oh * gs.h;
          const T* src = x + n * xs.n + c * xs.c + ih * xs.h + iw_lo * xs.w;
          T row = 0;
          for (int64_t ow = lo; ow < hi; ++ow) row += g[ow * gs.w] * src[(ow - lo) * step];
          acc += static_cast<double>(row);
        }
      }
      gw[item] = static_cast<T>(acc);
    }
  });
}


// float32 multiplies with our sgemm where the CPU has AVX-512F, with at::mm elsewhere.
bool use_sgemm(const at::Tensor& t) { return t.scalar_type() == at::kFloat && sgemm::available(); }

// Thin groups go to the direct loops, except a plain convolution with a few output
// channels and enough taps (LeNet's first layer: 1 -> 6 channels, 5x5), which a GEMM runs
// faster than the scalar loops: our float32 GEMM, or at::mm in sample blocks (LeNet's first
// layer forward, batch 64, on a 2-core Zen 3: 4.25 -> 0.90 ms).
bool use_direct_loops(const Conv2dParams& p) {
  return use_direct(p) && !(p.G == 1 && p.out_per_group() >= 4 && p.in_per_group() * p.KH * p.KW >= 9);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
// sum of r[0, n) in double: four vectors of 8 partial sums (the build's baseline ISA would
// add two doubles at a time on one dependency chain).
CNNEXT_TARGET("avx512f") double sum_run_avx512(const float* r, int64_t n) {
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 v0 = _mm512_loadu_ps(r + i), v1 = _mm512_loadu_ps(r + i + 16);
    a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(v0)));
    a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v0), 1))));
    a2 = _mm512_add_pd(a2, _mm512_cvtps_pd(_mm512_castps512_ps256(v1)));
    a3 = _mm512_add_pd(a3, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v1), 1))));
  }
  for (; i + 8 <= n; i += 8) a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm256_loadu_ps(r + i)));
  double tail = 0;
  for (; i < n; ++i) tail += static_cast<double>(r[i]);
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3))) + tail;
}
#endif

// sum of a run of n unit-stride values in double.
template <typename T>
double sum_run(const T* r, int64_t n) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm::available()) return sum_run_avx512(r, n);
  }
#endif
  double rs = 0;
  _Pragma("omp simd reduction(+ : rs)")
  for (int64_t w = 0; w < n; ++w) rs += static_cast<double>(r[w]);
  return rs;
}

}  // namespace

namespace {

// Whether stock torch would run this float32 convolution on oneDNN, whose kernels sum only
// the taps inside the input (its other CPU backends, like every path here, multiply the
// padding's zeros too: a non-finite weight, or grad_output value, then gives NaN there).
// Asked of torch's own backend choice (batch, kernel and map sizes, threads decide it); only
// called once a non-finite value is there.
bool stock_skips_padding(const at::Tensor& input, const at::Tensor& weight, const Conv2dParams& p) {
  const std::vector<c10::SymInt> stride{p.SH, p.SW}, pad{p.PH, p.PW}, dil{p.DH, p.DW}, outpad{0, 0};
  return at::native::select_conv_backend(input, weight, c10::nullopt, stride, pad, dil, false, outpad, p.G,
                                         c10::nullopt) == at::native::ConvBackend::Mkldnn;
}

// Stock's float32 forward on oneDNN sums only the taps inside the input; every path here
// multiplies the padding's zeros by the weight too, so a non-finite weight gives NaN where
// stock's output is finite (or Inf). Whether out can hold such a NaN is probed cheaply: a
// non-finite weight of channel o makes out[0][o] non-finite wherever the window lies inside
// the input, so O values at one such position (or, with none, the whole output, which is
// then small) clear the common case. Otherwise, if the weight itself is not finite and
// stock would take oneDNN, the direct loops recompute out with its taps.
void match_stock_padding(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const Conv2dParams& p, at::Tensor& out, bool relu) {
  if (out.scalar_type() != at::kFloat || (p.PH == 0 && p.PW == 0) || use_direct_loops(p) || out.numel() == 0) return;
  const Strides4 ys = strides_of(out);
  const float* y = out.const_data_ptr<float>();
  const int64_t oh = conv_first_inside_out(p.OH, p.H, p.KH, p.SH, p.PH, p.DH);
  const int64_t ow = conv_first_inside_out(p.OW, p.W, p.KW, p.SW, p.PW, p.DW);
  // With ReLU an Inf weight can leave 0 at the probe (max(-Inf, 0)): the weight is scanned
  // (the fused eval op's, folded per call: a pass like the fold).
  bool suspect = relu;
  if (relu) {
  } else if (oh >= 0 && ow >= 0) {
    for (int64_t o = 0; o < p.O; ++o) suspect |= !std::isfinite(y[o * ys.c + oh * ys.h + ow * ys.w]);
  } else {
    suspect = !at::isfinite(out).all().item<bool>();
  }
  if (!suspect) return;
  const at::Tensor w = weight.contiguous();
  if (all_finite(w.const_data_ptr<float>(), w.numel()) || !stock_skips_padding(input, weight, p)) return;
  kFwdNonFiniteDirect.hit();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  direct_forward(input.const_data_ptr<float>(), strides_of(input), w.const_data_ptr<float>(),
                 has_bias ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), ys, p, relu);
}

}  // namespace

at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                          at::MemoryFormat out_format, bool relu) {
  at::Tensor out = empty_output({p.N, p.O, p.OH, p.OW}, input.options().memory_format(out_format));
  conv2d_forward_rows(input, weight, bias, p, out, relu, RowsDone());
  match_stock_padding(input, weight, bias, p, out, relu);
  return out;
}

bool conv2d_forward_bf16_unfolded(const at::Tensor& input, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const Conv2dParams& p, at::Tensor& out,
                                  bool relu) {
  // Where the float forward on float copies would take its fwd.mm path: no AVX-512 GEMM,
  // no direct loops, no pointwise or few-channel kernel, no Winograd shape (3 x 3 stride 1:
  // the bfloat16 Winograd's or, declined there, the float Winograd's), no sample blocks, an
  // NCHW output, and a finite weight next to padding (match_stock_padding otherwise).
  if (input.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16 || sgemm::available() ||
      !cpu_features().avx2 || out.numel() == 0 || !out.is_contiguous())
    return false;
  if (use_direct_loops(p) || is_pointwise(p) || conv_tinyc::applies(p)) return false;
  if (p.KH == 3 && p.KW == 3 && p.SH == 1 && p.SW == 1 && p.DH == 1 && p.DW == 1) return false;
  const Bands bands = bands_for(p);
  if (bands.count == 1 && sample_blocks(p).per > 1) return false;
  const at::Tensor wf = weight.to(at::kFloat).contiguous();
  if ((p.PH > 0 || p.PW > 0) && !all_finite(wf.const_data_ptr<float>(), wf.numel())) return false;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  kFwdMm.hit();
  kFwdMmBf16.hit();
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const at::Tensor w = wf.view({p.G, Og, K});
  const Strides4 xs = strides_of(input), ys = strides_of(out);
  const uint16_t* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  uint16_t* y = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const int64_t col_max = K * bands.rows * p.OW;
  // The float path's items and GEMMs on the same float columns: the same float sums, each
  // rounded once into out (as its out.copy_ of the float output).
  for_each_item(p.N * bands.count, wf, col_max + Og * bands.rows * p.OW, [&](int64_t item, at::Tensor& buf) {
    const int64_t n = item / bands.count;
    const int64_t oh0 = (item % bands.count) * bands.rows;
    const int64_t oh1 = std::min(p.OH, oh0 + bands.rows);
    const int64_t L = (oh1 - oh0) * p.OW;
    for (int64_t g = 0; g < p.G; ++g) {
      float* colp = buf.data_ptr<float>();
      im2col(x + n * xs.n + g * Cg * xs.c, xs, p, Cg, oh0, oh1, colp);
      const at::Tensor col = buf.narrow(0, 0, K * L).view({K, L});
      at::Tensor prod = buf.narrow(0, col_max, Og * L).view({Og, L});
      if (has_bias) {
        at::addmm_out(prod, b.narrow(0, g * Og, Og).unsqueeze(1).expand({Og, L}), w[g], col);
      } else {
        at::mm_out(prod, w[g], col);
      }
      if (relu) prod.clamp_min_(0);
      const float* pr = prod.const_data_ptr<float>();
      for (int64_t o = 0; o < Og; ++o)
        vec::float_to_bf16(pr + o * L, y + n * ys.n + (g * Og + o) * ys.c + oh0 * ys.h, L);
    }
  });
  return true;
}

void conv2d_forward_rows(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                         at::Tensor& out, bool relu, const RowsDone& rows_done) {
  if (is_half(input)) return half::conv2d_forward_rows(input, weight, bias, p, out, relu, rows_done);
  if (out.numel() == 0) return;
  const at::MemoryFormat out_format =
      out.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const at::Tensor w = weight.contiguous().view({p.G, Og, K});
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const bool pointwise = is_pointwise(p) && planes_flatten(input);
  const Bands bands = pointwise ? Bands{p.OH, 1} : bands_for(p);
  const Strides4 xs = strides_of(input);
  const bool gemm = use_sgemm(input) && !use_direct_loops(p);
  // Few input channels under a large kernel (stems; on AVX2 also LeNet's layers): output
  // channels in the vector lanes, no unfolding, either output layout.
  if (input.scalar_type() == at::kFloat && conv_tinyc::applies(p)) {
    conv_tinyc::forward(input.const_data_ptr<float>(), xs, w.const_data_ptr<float>(),
                        has_bias ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(),
                        strides_of(out), p, relu, rows_done);
    return;
  }
  // Winograd where the shape pays, whatever the layouts (it gathers the input and scatters
  // the output through their strides).
  if (input.scalar_type() == at::kFloat && !use_direct_loops(p) && winograd::forward_tensor(input, weight, has_bias ? b.const_data_ptr<float>() : nullptr, out, p,
                                       relu, rows_done))
    return;
  if (gemm && out_format == at::MemoryFormat::Contiguous) {
    kFwdSgemm.hit();
    conv_sgemm::forward(input.const_data_ptr<float>(), xs, w.const_data_ptr<float>(),
                        has_bias ? b.const_data_ptr<float>() : nullptr,
                        out.mutable_data_ptr<float>(), strides_of(out), p, relu, rows_done);
    return;
  }
  if (gemm && out_format == at::MemoryFormat::ChannelsLast && conv_nhwc::applies(p, xs, strides_of(out))) {
    kFwdSgemm.hit();
    conv_nhwc::forward(input.const_data_ptr<float>(), xs, weight.const_data_ptr<float>(), strides_of(weight),
                       has_bias ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), p, relu,
                       rows_done);
    return;
  }

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnext_conv2d_forward", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    if (use_direct_loops(p)) {
      kFwdDirect.hit();
      direct_forward(x, xs, w.const_data_ptr<scalar_t>(),
                     has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                     out.mutable_data_ptr<scalar_t>(), strides_of(out), p, relu);
      // Planes are computed per (n, o); the bands are whole samples.
      if (rows_done) {
        at::parallel_for(0, p.N, 1, [&](int64_t n0, int64_t n1) {
          for (int64_t n = n0; n < n1; ++n) rows_done(n, 0, p.OH);
        });
      }
      return;
    }
    const SampleBlocks blocks = sample_blocks(p);
    // channels_last in and out, >= 8 channels a group: a row of taps per output position
    // and one GEMM (positions x K) x (K x Og) writing the output's own rows (channels
    // contiguous), instead of an im2col reading the input at a stride of C values per
    // element (ResNet-18's 64 -> 64 3x3 at 56x56, batch 8, Zen 3: 22.7 -> 14.5 ms; the
    // 128 -> 128 at 28x28: 18.2 -> 11.4 ms). Fewer channels (an RGB stem) keep im2col.
    if (!pointwise && xs.c == 1 && Cg >= 8 && out.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      kFwdMmRowsCl.hit();
      const bool blocked = blocks.per > 1 && bands.count == 1;
      const int64_t items = blocked ? blocks.count : p.N * bands.count;
      const int64_t max_rows = blocked ? blocks.per * p.OH * p.OW : bands.rows * p.OW;
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      // The weight's K in the rows' (kh, kw, c) order: a copy of O x K values per call.
      const at::Tensor w_taps = weight.permute({0, 2, 3, 1}).contiguous().view({p.G, Og, K});
      for_each_item(items, input, K * max_rows, [&](int64_t item, at::Tensor& buf) {
        int64_t n0, n1, oh0, oh1;
        if (blocked) {
          n0 = blocks.first(item), n1 = blocks.last(item, p.N), oh0 = 0, oh1 = p.OH;
        } else {
          n0 = item / bands.count, n1 = n0 + 1;
          oh0 = (item % bands.count) * bands.rows, oh1 = std::min(p.OH, oh0 + bands.rows);
        }
        // Consecutive samples' rows follow one another in a channels_last output.
        const int64_t R = (n1 - n0) * (oh1 - oh0) * p.OW;
        at::Tensor rows = buf.narrow(0, 0, R * K).view({R, K});
        for (int64_t g = 0; g < p.G; ++g) {
          im2row_channels_last(x + g * Cg, xs, p, Cg, n0, n1, oh0, oh1, rows.data_ptr<scalar_t>());
          at::Tensor dst = at::from_blob(y + (n0 * p.OH + oh0) * p.OW * p.O + g * Og, {R, Og}, {p.O, 1},
                                         out.options());
          if (has_bias) {
            at::addmm_out(dst, b.narrow(0, g * Og, Og).unsqueeze(0).expand({R, Og}), rows, w_taps[g].t());
          } else {
            at::mm_out(dst, rows, w_taps[g].t());
          }
          if (relu) dst.clamp_min_(0);
        }
        if (rows_done)
          for (int64_t n = n0; n < n1; ++n) rows_done(n, oh0, oh1);
      });
      return;
    }
    if (blocks.per > 1 && bands.count == 1) {
      kFwdMmBlocks.hit();
      const int64_t L = p.OH * p.OW;
      for_each_item(blocks.count, input, blocks.scratch_size(K, Og, L), [&](int64_t blk, at::Tensor& buf) {
        const int64_t n0 = blocks.first(blk), n1 = blocks.last(blk, p.N), c = (n1 - n0) * L;
        at::Tensor col = blocks.columns(buf, K, c);
        at::Tensor prod = blocks.planes(buf, K, Og, L, c);
        for (int64_t g = 0; g < p.G; ++g) {
          for (int64_t n = n0; n < n1; ++n)
            im2col(x + n * xs.n + g * Cg * xs.c, xs, p, Cg, 0, p.OH, col.data_ptr<scalar_t>() + (n - n0) * L, c);
          if (has_bias) {
            at::addmm_out(prod, b.narrow(0, g * Og, Og).unsqueeze(1).expand({Og, c}), w[g], col);
          } else {
            at::mm_out(prod, w[g], col);
          }
          for (int64_t n = n0; n < n1; ++n) {
            at::Tensor dst = plane_matrix(out, n, g * Og, Og, 0, p.OH);
            dst.copy_(prod.narrow(1, (n - n0) * L, L));
            if (relu) dst.clamp_min_(0);
          }
        }
        if (rows_done)
          for (int64_t n = n0; n < n1; ++n) rows_done(n, 0, p.OH);
      });
      return;
    }
    kFwdMm.hit();
    for_each_item(p.N * bands.count, input, pointwise ? 0 : K * bands.rows * p.OW,
                  [&](int64_t item, at::Tensor& buf) {
      const int64_t n = item / bands.count;
      const int64_t oh0 = (item % bands.count) * bands.rows;
      const int64_t oh1 = std::min(p.OH, oh0 + bands.rows);
      const int64_t L = (oh1 - oh0) * p.OW;
      for (int64_t g = 0; g < p.G; ++g) {
        at::Tensor col;
        if (pointwise) {
          col = plane_matrix(input, n, g * Cg, Cg, 0, p.H);
        } else {
          im2col(x + n * xs.n + g * Cg * xs.c, xs, p, Cg, oh0, oh1, buf.data_ptr<scalar_t>());
          col = buf.narrow(0, 0, K * L).view({K, L});
        }
        at::Tensor dst = plane_matrix(out, n, g * Og, Og, oh0, oh1);
        if (has_bias) {
          at::addmm_out(dst, b.narrow(0, g * Og, Og).unsqueeze(1).expand({Og, L}), w[g], col);
        } else {
          at::mm_out(dst, w[g], col);
        }
        if (relu) dst.clamp_min_(0);  // while the band is in cache
      }
      if (rows_done) rows_done(n, oh0, oh1);
    });
  });
}

at::Tensor conv2d_input_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format) {
  if (is_half(grad_out)) return half::conv2d_input_backward(grad_out, weight, p, out_format);
  const at::Tensor grad_output = flattenable(grad_out);
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const bool sgemm = use_sgemm(grad_output) && !use_direct_loops(p);
  // Only at::mm on a pointwise conv writes every element of gx; every other path adds.
  const bool pointwise = is_pointwise(p) && !use_direct_loops(p) && !sgemm;
  at::Tensor gx = empty_output({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format));
  if (gx.numel() == 0) return gx;
  // 3 x 3 stride 1: Winograd on the flipped, transposed weight (overwrites gx).
  if (grad_output.scalar_type() == at::kFloat && !use_direct_loops(p) &&
      winograd::input_backward_tensor(grad_output, weight, gx, p))
    return gx;
  // Few channels under a large kernel, AVX2: a direct convolution of grad_output (overwrites gx).
  if (grad_output.scalar_type() == at::kFloat && conv_tinyc::grad_applies(p)) {
    const at::Tensor w = weight.contiguous();
    if (conv_tinyc::input_backward(grad_output.const_data_ptr<float>(), strides_of(grad_output),
                                   w.const_data_ptr<float>(), gx.mutable_data_ptr<float>(), strides_of(gx), p))
      return gx;
  }
  if (!pointwise && !(sgemm && conv_sgemm::input_backward_overwrites(p, strides_of(gx)))) gx.zero_();
  if (sgemm) {
    kInSgemm.hit();
    const at::Tensor w = weight.contiguous();
    conv_sgemm::input_backward(grad_output.const_data_ptr<float>(), strides_of(grad_output),
                               w.const_data_ptr<float>(), gx.mutable_data_ptr<float>(),
                               strides_of(gx), p);
    return gx;
  }
  const at::Tensor wt = weight.contiguous().view({p.G, Og, K}).transpose(1, 2);  // (G, K, Og)
  const Bands bands = pointwise ? Bands{p.OH, 1} : bands_for(p);
  const Strides4 xs = strides_of(gx);

  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnnext_conv2d_input_backward", [&] {
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    if (use_direct_loops(p)) {
      kInDirect.hit();
      direct_input_backward(grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
                            weight.contiguous().const_data_ptr<scalar_t>(), gxp, xs, p);
      return;
    }
    const SampleBlocks blocks = sample_blocks(p);
    if (blocks.per > 1 && bands.count == 1) {
      kInMmBlocks.hit();
      // grad_output's planes of a block side by side, times the transposed weight: the
      // columns of every sample, added back (col2im) or, pointwise, copied into gx.
      const int64_t L = p.OH * p.OW;
      for_each_item(blocks.count, grad_output, blocks.scratch_size(K, Og, L), [&](int64_t blk, at::Tensor& buf) {
        const int64_t n0 = blocks.first(blk), n1 = blocks.last(blk, p.N), c = (n1 - n0) * L;
        at::Tensor col = blocks.columns(buf, K, c);
        at::Tensor gyc = blocks.planes(buf, K, Og, L, c);
        for (int64_t g = 0; g < p.G; ++g) {
          gather_planes(gyc, grad_output, n0, n1, g * Og, Og);
          at::mm_out(col, wt[g], gyc);
          for (int64_t n = n0; n < n1; ++n) {
            if (pointwise) {
              plane_matrix(gx, n, g * Cg, Cg, 0, p.H).copy_(col.narrow(1, (n - n0) * L, L));
            } else {
              col2im_add(col.const_data_ptr<scalar_t>() + (n - n0) * L, p, Cg, 0, p.OH,
                         gxp + n * xs.n + g * Cg * xs.c, xs, c);
            }
          }
        }
      });
      return;
    }
    kInMm.hit();
    // One item per sample: the bands of a sample overlap in the input they add to.
    for_each_item(p.N, grad_output, pointwise ? 0 : K * bands.rows * p.OW,
                  [&](int64_t n, at::Tensor& buf) {
      for (int64_t band = 0; band < bands.count; ++band) {
        const int64_t oh0 = band * bands.rows, oh1 = std::min(p.OH, oh0 + bands.rows);
        const int64_t L = (oh1 - oh0) * p.OW;
        for (int64_t g = 0; g < p.G; ++g) {
          const at::Tensor gy = plane_matrix(grad_output, n, g * Og, Og, oh0, oh1);
          if (pointwise) {
            at::Tensor dst = plane_matrix(gx, n, g * Cg, Cg, 0, p.H);
            at::mm_out(dst, wt[g], gy);
          } else {
            at::Tensor col = buf.narrow(0, 0, K * L).view({K, L});
            at::mm_out(col, wt[g], gy);
            col2im_add(col.const_data_ptr<scalar_t>(), p, Cg, oh0, oh1,
                       gxp + n * xs.n + g * Cg * xs.c, xs);
          }
        }
      }
    });
  });
  return gx;
}

namespace {

// The weight gradient by the fastest path that takes p (float32 / float64).
at::Tensor weight_backward_paths(const at::Tensor& grad_out, const at::Tensor& input, const Conv2dParams& p) {
  const at::Tensor grad_output = flattenable(grad_out);
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  const bool pointwise = is_pointwise(p) && planes_flatten(input);
  if (use_direct_loops(p)) {
    kWDirect.hit();
    at::Tensor gw = at::empty({p.O, Cg, p.KH, p.KW}, grad_output.options());
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnnext_conv2d_weight_backward", [&] {
      direct_weight_backward(grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
                             input.const_data_ptr<scalar_t>(), strides_of(input), gw.mutable_data_ptr<scalar_t>(), p);
    });
    return gw;
  }
  if (grad_output.scalar_type() == at::kFloat) {
    // Winograd where it applies (AVX-512F or AVX2), then the AVX-512 GEMM.
    at::Tensor gw = at::empty({p.O, Cg, p.KH, p.KW}, grad_output.options());
    if (winograd::weight_backward_tensor(grad_output, input, gw, p)) return gw;
    // Few channels under a large kernel, AVX2 (hands a non-finite value over to the paths below).
    if (conv_tinyc::grad_applies(p) &&
        conv_tinyc::weight_backward(grad_output.const_data_ptr<float>(), strides_of(grad_output),
                                    input.const_data_ptr<float>(), strides_of(input), gw.mutable_data_ptr<float>(), p))
      return gw;
    if (use_sgemm(grad_output)) {
      kWSgemm.hit();
      conv_sgemm::weight_backward(grad_output.const_data_ptr<float>(), strides_of(grad_output),
                                  input.const_data_ptr<float>(), strides_of(input),
                                  gw.mutable_data_ptr<float>(), p);
      return gw;
    }
  }
  const Bands bands = pointwise ? Bands{p.OH, 1} : bands_for(p);
  const SampleBlocks blocks = bands.count == 1 ? sample_blocks(p) : SampleBlocks{1, p.N};
  (blocks.per > 1 ? kWMmBlocks : kWMm).hit();
  const int64_t items = blocks.per > 1 ? blocks.count : p.N * bands.count;
  const int64_t threads = items > 1 ? at::get_num_threads() : 1;
  // One partial sum per thread, added up at the end: no two threads write one place.
  at::Tensor partial = at::zeros({threads, p.G, Og, K}, grad_output.options());
  const Strides4 xs = strides_of(input);

  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnnext_conv2d_weight_backward", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    if (blocks.per > 1) {
      // A block's unfolded inputs and grad_output's planes side by side: one GEMM a group.
      const int64_t L = p.OH * p.OW;
      for_each_item(items, input, blocks.scratch_size(K, Og, L), [&](int64_t blk, at::Tensor& buf) {
        at::Tensor acc = partial[threads > 1 ? at::get_thread_num() : 0];
        const int64_t n0 = blocks.first(blk), n1 = blocks.last(blk, p.N), c = (n1 - n0) * L;
        at::Tensor col = blocks.columns(buf, K, c);
        at::Tensor gyc = blocks.planes(buf, K, Og, L, c);
        for (int64_t g = 0; g < p.G; ++g) {
          for (int64_t n = n0; n < n1; ++n)
            im2col(x + n * xs.n + g * Cg * xs.c, xs, p, Cg, 0, p.OH, col.data_ptr<scalar_t>() + (n - n0) * L, c);
          gather_planes(gyc, grad_output, n0, n1, g * Og, Og);
          at::Tensor dst = acc[g];
          at::addmm_out(dst, dst, gyc, col.t());
        }
      });
      return;
    }
    for_each_item(items, input, pointwise ? 0 : K * bands.rows * p.OW,
                  [&](int64_t item, at::Tensor& buf) {
      at::Tensor acc = partial[threads > 1 ? at::get_thread_num() : 0];
      const int64_t n = item / bands.count;
      const int64_t oh0 = (item % bands.count) * bands.rows;
      const int64_t oh1 = std::min(p.OH, oh0 + bands.rows);
      const int64_t L = (oh1 - oh0) * p.OW;
      for (int64_t g = 0; g < p.G; ++g) {
        at::Tensor col;
        if (pointwise) {
          col = plane_matrix(input, n, g * Cg, Cg, 0, p.H);
        } else {
          im2col(x + n * xs.n + g * Cg * xs.c, xs, p, Cg, oh0, oh1, buf.data_ptr<scalar_t>());
          col = buf.narrow(0, 0, K * L).view({K, L});
        }
        const at::Tensor gy = plane_matrix(grad_output, n, g * Og, Og, oh0, oh1);
        at::Tensor dst = acc[g];
        at::addmm_out(dst, dst, gy, col.t());
      }
    });
  });
  at::Tensor gw = partial[0];
  for (int64_t t = 1; t < threads; ++t) gw.add_(partial[t]);
  return gw.view({p.O, Cg, p.KH, p.KW});
}

}  // namespace

namespace {

// Stock's float32 weight gradient on oneDNN sums only the terms inside the input. The
// unfolding, Winograd and GEMM paths multiply grad_output by the zeros that pad the input
// too (as stock's other backends and its float64 path do), so an Inf in grad_output next
// to the padding gives them NaN where oneDNN has Inf or a finite value. Such a value
// shows in gw (never less finite than oneDNN's): a non-finite float32 gw of a padded
// convolution that stock would run on oneDNN is recomputed by the direct loops, which sum
// its terms.
void match_stock_padding_gw(const at::Tensor& grad_out, const at::Tensor& input, at::Tensor& gw,
                            const Conv2dParams& p) {
  if (gw.scalar_type() == at::kFloat && (p.PH > 0 || p.PW > 0) && !use_direct_loops(p) &&
      !all_finite(gw.const_data_ptr<float>(), gw.numel()) &&
      stock_skips_padding(input, at::empty({p.O, p.in_per_group(), p.KH, p.KW}, input.options()), p)) {
    kWDirect.hit();
    kWNonFiniteRedo.hit();
    const at::Tensor gy = flattenable(grad_out);
    direct_weight_backward(gy.const_data_ptr<float>(), strides_of(gy), input.const_data_ptr<float>(), strides_of(input),
                           gw.mutable_data_ptr<float>(), p);
  }
}

}  // namespace

at::Tensor conv2d_weight_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                  const Conv2dParams& p) {
  if (is_half(grad_out)) return half::conv2d_weight_backward(grad_out, input, p);
  at::Tensor gw = weight_backward_paths(grad_out, input, p).contiguous();
  match_stock_padding_gw(grad_out, input, gw, p);
  return gw;
}

bool conv2d_and_weight_backward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& other,
                                const Conv2dParams& p, at::Tensor& out, at::Tensor& grad_weight) {
  // Where conv2d_forward and weight_backward_paths would both take their at::mm paths on
  // unfolded bands of input (fwd.mm, weight_grad.mm): a float dtype without our GEMM
  // (AVX-512 runs conv_sgemm's paths), NCHW tensors, a stride past 1 (no Winograd, no
  // few-channel kernels: those are stride 1) and one band a work item per sample or more
  // (no sample blocks).
  const auto dt = input.scalar_type();
  if (!(dt == at::kFloat || dt == at::kDouble) || weight.scalar_type() != dt || other.scalar_type() != dt)
    return false;
  if (use_sgemm(input) || use_direct_loops(p) || is_pointwise(p) || (p.SH == 1 && p.SW == 1) ||
      conv_tinyc::applies(p) || p.N * p.OH * p.OW == 0)
    return false;
  if (!input.is_contiguous() || !weight.is_contiguous() || !other.is_contiguous()) return false;
  const Bands bands = bands_for(p);
  if (bands.count == 1 && sample_blocks(p).per > 1) return false;
  // A non-finite weight meets the padding's zeros (match_stock_padding): the two ops then.
  if (dt == at::kFloat && (p.PH > 0 || p.PW > 0) && !all_finite(weight.const_data_ptr<float>(), weight.numel()))
    return false;
  kFwdMm.hit();
  kWMm.hit();
  kSharedColumns.hit();
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group(), K = Cg * p.KH * p.KW;
  out = empty_output({p.N, p.O, p.OH, p.OW}, input.options());
  const at::Tensor w = weight.view({p.G, Og, K});
  const int64_t items = p.N * bands.count;
  const int64_t threads = items > 1 ? at::get_num_threads() : 1;
  // The same items, GEMMs and per-thread partial sums as the two paths: each result is
  // bitwise the one its own op gives.
  at::Tensor partial = at::zeros({threads, p.G, Og, K}, input.options());
  const Strides4 xs = strides_of(input);
  AT_DISPATCH_FLOATING_TYPES(dt, "cnnext_conv2d_and_weight_backward", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    for_each_item(items, input, K * bands.rows * p.OW, [&](int64_t item, at::Tensor& buf) {
      at::Tensor acc = partial[threads > 1 ? at::get_thread_num() : 0];
      const int64_t n = item / bands.count;
      const int64_t oh0 = (item % bands.count) * bands.rows;
      const int64_t oh1 = std::min(p.OH, oh0 + bands.rows);
      const int64_t L = (oh1 - oh0) * p.OW;
      for (int64_t g = 0; g < p.G; ++g) {
        im2col(x + n * xs.n + g * Cg * xs.c, xs, p, Cg, oh0, oh1, buf.data_ptr<scalar_t>());
        const at::Tensor col = buf.narrow(0, 0, K * L).view({K, L});
        at::Tensor dst = plane_matrix(out, n, g * Og, Og, oh0, oh1);
        at::mm_out(dst, w[g], col);
        const at::Tensor gy = plane_matrix(other, n, g * Og, Og, oh0, oh1);
        at::Tensor a = acc[g];
        at::addmm_out(a, a, gy, col.t());
      }
    });
  });
  at::Tensor gw = partial[0];
  for (int64_t t = 1; t < threads; ++t) gw.add_(partial[t]);
  grad_weight = gw.view({p.O, Cg, p.KH, p.KW});
  match_stock_padding_gw(other, input, grad_weight, p);
  return true;
}

at::Tensor channel_sum(const at::Tensor& t) {
  if (is_half(t)) return half::channel_sum(t);
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  at::Tensor out = at::empty({C}, t.options());
  if (C == 0) return out;
  if (N * H * W == 0) return out.zero_();
  const Strides4 s = strides_of(t);
  // Accumulates in double (vectorised along rows); channels_last sums each image row
  // in the tensor's dtype first.
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "cnnext_channel_sum", [&] {
    const scalar_t* x = t.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (s.c == 1 && C > 1) {
      // Channels innermost (channels_last): each thread sums whole pixel rows into a
      // per-channel partial; the partials are added in thread order.
      const int64_t rows = N * H;
      const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
      std::vector<double> partial(threads * C, 0.0);
      at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
        std::vector<scalar_t> row_sum(C);
        for (int64_t tid = t0; tid < t1; ++tid) {
          double* acc = partial.data() + tid * C;
          for (int64_t r = tid * rows / threads; r < (tid + 1) * rows / threads; ++r) {
            const scalar_t* row = x + (r / H) * s.n + (r % H) * s.h;
            std::fill(row_sum.begin(), row_sum.end(), scalar_t(0));
            scalar_t* rs = row_sum.data();
            for (int64_t w = 0; w < W; ++w) {
              const scalar_t* px = row + w * s.w;
              for (int64_t c = 0; c < C; ++c) rs[c] += px[c];
            }
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<double>(rs[c]);
          }
        }
      });
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0;
        for (int64_t tid = 0; tid < threads; ++tid) sum += partial[tid * C + c];
        o[c] = static_cast<scalar_t>(sum);
      }
      return;
    }
    // A plane that flattens (rows W apart) is summed as one run of H * W: a vectorised
    // reduction per plane instead of one per row (a 14x14 map's rows are 14 floats).
    const bool flat = s.w == 1 && (H == 1 || s.h == W);
    const int64_t run = flat ? H * W : W, runs = flat ? 1 : H;
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double acc = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = 0; h < runs; ++h) {
            const scalar_t* row = x + n * s.n + c * s.c + h * s.h;
            double rs = 0;
            if (s.w == 1) {
              rs = sum_run(row, run);
            } else {
              for (int64_t w = 0; w < run; ++w) rs += static_cast<double>(row[w * s.w]);
            }
            acc += rs;
          }
        o[c] = static_cast<scalar_t>(acc);
      }
    });
  });
  return out;
}

void add_channel_bias_(at::Tensor& out, const at::Tensor& bias) {
  if (is_half(out)) return half::add_channel_bias_(out, bias);
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  if (out.numel() == 0) return;
  const at::Tensor b = bias.contiguous();
  const Strides4 s = strides_of(out);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "cnnext_add_channel_bias", [&] {
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    // One (n, c) plane per item: each element is written by one thread.
    at::parallel_for(0, N * C, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t item = b0; item < b1; ++item) {
        const int64_t n = item / C, c = item % C;
        const scalar_t v = bp[c];
        scalar_t* plane = y + n * s.n + c * s.c;
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* row = plane + h * s.h;
          for (int64_t w = 0; w < W; ++w) row[w * s.w] += v;
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace cnnext
