// Average pooling and adaptive average pooling on the CPU, forward and backward.
//
// Both ops reduce to per-dimension tables computed once per call: for each output
// row (column) the input range its window sums and its divisor factor, and for each
// output position 1 / divisor. The loops then depend on the layout of the tensor
// they write:
//   contiguous (NCHW)  one (n, c) plane per work item. Forward sums the window's
//                      input rows into a row buffer (vectorised along W), then each
//                      output adds its columns of the buffer. Backward zeroes the
//                      plane and, per output row, spreads grad / divisor along a row
//                      buffer and adds that buffer to the window's input rows: a
//                      scatter, but within one plane owned by one thread, in a fixed
//                      order, so the result is deterministic.
//   channels_last      one (n, output row) per item (forward) or (n, input row)
//                      (backward, a gather over the windows containing each pixel:
//                      avg_pool_windows_containing); the innermost loop runs over
//                      channels, contiguous in memory.
//   global pooling     (one window covering the whole plane: adaptive 1x1, or a
//                      kernel the size of an unpadded input) has its own loops: a
//                      plane sum (NCHW) or a sum of pixel vectors (channels_last),
//                      and a broadcast for the backward.
// Every tensor is read through its strides; the output is allocated in the layout the
// op asked for. The loops (csrc/cpu/avg_pool2d_kernels.h) are compiled twice, for AVX2 +
// FMA and for the baseline x86-64 / other CPUs, and the AVX2 build runs where
// cpu_features() has it: the extension is compiled without -march flags, and pooling is
// loads and adds on csrc/cpu/vec.h's vectors and plain loops the compiler vectorises
// only as wide as the target allows. Both builds add in the same order (the AVX2 one
// may fuse a multiply and an add: GCC contracts them under its default -ffp-contract).
// float32 accumulates in float (as torch's CPU kernels do): each sum has
// at most a window's terms, or for global pooling the plane's terms spread over vector
// lanes; float64 in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/avg_pool2d.h"
#include "cpu/half.h"
#include "cpu/cpu_features.h"
#include "cpu/output_alloc.h"
#include "cpu/vec.h"
#include "paths.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {

// The loops of window_channels (csrc/cpu/avg_pool2d_kernels.h), which returns one.
enum WindowPath : int { kClSmall, kClLarge, kClBlocks, kClStrided };

// x86-64 with GCC or clang: an AVX2 + FMA copy of the kernels besides the baseline one.
#ifdef CNNEXT_VEC_X86
#define CNNEXT_AVG_POOL_AVX2 1
namespace avx2 {
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace {
constexpr Isa kIsa = Isa::kAvx2;
#include "cpu/avg_pool2d_kernels.h"
}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
}  // namespace avx2
#endif

namespace baseline {
namespace {
constexpr Isa kIsa = Isa::kScalar;
#include "cpu/avg_pool2d_kernels.h"
}  // namespace
}  // namespace baseline

namespace {

CNNEXT_PATH_NEEDS(kFwdAvx2, "avg_pool2d.fwd.avx2", kAvx2);
CNNEXT_PATH(kFwdBaseline, "avg_pool2d.fwd.baseline");
CNNEXT_PATH(kFwdNchw, "avg_pool2d.fwd.nchw");
CNNEXT_PATH(kFwdCl, "avg_pool2d.fwd.channels_last");
CNNEXT_PATH(kBwdNchw, "avg_pool2d.bwd.nchw");
CNNEXT_PATH(kBwdCl, "avg_pool2d.bwd.channels_last");
// channels_last forward, per window loop (window_channels): windows of 1-4 pixels, of
// more than 16, register blocks (5-16), and strided channels.
CNNEXT_PATH(kClSmallPath, "avg_pool2d.fwd.cl_small_windows");
CNNEXT_PATH(kClLargePath, "avg_pool2d.fwd.cl_large_windows");
CNNEXT_PATH(kClBlocksPath, "avg_pool2d.fwd.cl_register_blocks");
CNNEXT_PATH(kClStridedPath, "avg_pool2d.fwd.cl_strided");

bool use_avx2() {
#ifdef CNNEXT_AVG_POOL_AVX2
  return cpu_features().has(Isa::kAvx2);
#else
  return false;
#endif
}

}  // namespace

at::Tensor avg_pool2d_forward(const at::Tensor& input, const AvgPool2dParams& a,
                              at::MemoryFormat out_format) {
  // float16 / bfloat16: the float kernels (float sums, double across chunks) on a float
  // copy, each output rounded once.
  if (is_half(input))
    return avg_pool2d_forward(to_float(input), a, out_format).to(input.scalar_type());
  const Pool2dParams& p = a.p;
  at::Tensor out = empty_output({p.N, p.C, p.OH, p.OW}, input.options().memory_format(out_format));
  if (out.numel() == 0) return out;
  const bool cl = out_format == at::MemoryFormat::ChannelsLast;
  unsigned ran = 0;
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnext_avg_pool2d", [&] {
#ifdef CNNEXT_AVG_POOL_AVX2
    if (avx2) {
      ran = avx2::forward<scalar_t>(a, input, out, cl);
      return;
    }
#endif
    ran = baseline::forward<scalar_t>(a, input, out, cl);
  });
  (avx2 ? kFwdAvx2 : kFwdBaseline).hit();
  (cl ? kFwdCl : kFwdNchw).hit();
  if (ran & (1u << kClSmall)) kClSmallPath.hit();
  if (ran & (1u << kClLarge)) kClLargePath.hit();
  if (ran & (1u << kClBlocks)) kClBlocksPath.hit();
  if (ran & (1u << kClStrided)) kClStridedPath.hit();
  return out;
}

at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, const AvgPool2dParams& a,
                               at::MemoryFormat out_format) {
  if (is_half(grad_output))
    return avg_pool2d_backward(to_float(grad_output), a, out_format).to(grad_output.scalar_type());
  const Pool2dParams& p = a.p;
  at::Tensor gx = empty_output({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format));
  if (gx.numel() == 0) return gx;
  if (p.OH * p.OW == 0) return gx.zero_();  // adaptive output_size 0: no window reads anything
  const bool cl = out_format == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnnext_avg_pool2d_backward", [&] {
#ifdef CNNEXT_AVG_POOL_AVX2
    if (use_avx2()) return avx2::backward<scalar_t>(a, grad_output, gx, cl);
#endif
    baseline::backward<scalar_t>(a, grad_output, gx, cl);
  });
  (cl ? kBwdCl : kBwdNchw).hit();
  return gx;
}

}  // namespace cpu
}  // namespace cnnext
