// CUDA launchers of the conv2d ops: raw pointers, Conv2dParams, a stream. Torch-free;
// csrc/cuda/conv2d_launch.cpp is the torch side that calls them.
//
// Every launcher
//   - trusts its arguments (csrc/ops/conv2d.cpp has checked them),
//   - reads and writes 4-D tensors through their element strides (Strides4), so
//     contiguous, channels_last and other strided layouts need no copy; the pointers
//     point at element (0, 0, 0, 0), storage offset included,
//   - launches on `stream` only, returns cudaSuccess without launching when there is
//     nothing to compute, and otherwise returns cudaGetLastError() after its launch,
//   - writes every element of its output (no pre-zeroing needed) and is deterministic:
//     no atomics, a fixed summation order.
// float16 and bfloat16 accumulate in float, float32 in float, float64 in double.
#pragma once

#include <cuda_runtime.h>

#include "common/conv2d.h"
#include "launch.h"

namespace cnnext {
namespace cuda {
namespace kernels {

// y (N, O, OH, OW), strides ys  =  x (N, C, H, W), strides xs  (*)  w + bias, then
// max(y, 0) when relu (the epilogue of conv_bn_relu2d's inference path).
// w: contiguous (O, C / G, KH, KW); bias: contiguous (O,) or nullptr.
cudaError_t conv2d_forward(const Conv2dParams& p, DType dt, const void* x, Strides4 xs,
                           const void* w, const void* bias, void* y, Strides4 ys,
                           cudaStream_t stream, bool relu = false);

// grad_input (N, C, H, W), strides gxs  =  grad_output (N, O, OH, OW), strides gys,
// correlated with the transposed contiguous weight w (O, C / G, KH, KW).
cudaError_t conv2d_input_backward(const Conv2dParams& p, DType dt, const void* gy, Strides4 gys,
                                  const void* w, void* gx, Strides4 gxs, cudaStream_t stream);

// grad_weight, contiguous (O, C / G, KH, KW)  =  sum over n, oh, ow of
// grad_output (N, O, OH, OW), strides gys, times input (N, C, H, W), strides xs.
// With N == 0 it writes zeros.
cudaError_t conv2d_weight_backward(const Conv2dParams& p, DType dt, const void* gy,
                                   Strides4 gys, const void* x, Strides4 xs, void* gw,
                                   cudaStream_t stream);

// out, contiguous (C,)  =  sum of t (N, C, H, W), strides ts, over n, h, w.
// Writes zeros when N * H * W == 0.
cudaError_t channel_sum(DType dt, const void* t, int64_t N, int64_t C, int64_t H, int64_t W,
                        Strides4 ts, void* out, cudaStream_t stream);

// t (N, C, H, W), strides ts: t[n, c, h, w] += bias[c], in place; bias contiguous (C,).
// One thread per element (each written once), so it is deterministic too.
cudaError_t add_channel_bias(DType dt, void* t, int64_t N, int64_t C, int64_t H, int64_t W,
                             Strides4 ts, const void* bias, cudaStream_t stream);

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
