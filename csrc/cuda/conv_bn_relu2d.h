// CUDA launchers of conv_bn_relu2d's batch-norm (+ ReLU) part in training mode: raw
// pointers, a stream. Torch-free; csrc/cuda/conv_bn_relu2d_launch.cpp is the torch side
// (the convolution itself is conv2d_forward of csrc/cuda/conv2d.h).
//
// Shapes: y, out, g, dy are (N, C, H, W) with the element strides `s` (one set for all:
// the ops layer makes them dense in one layout). Per-channel vectors are contiguous (C,).
// Statistics (mean, var, sums) have the accumulation type S: float for float16, bfloat16
// and float32, double for float64; gamma and beta have the element type T.
// Every launcher returns cudaSuccess without launching when N * H * W == 0 or C == 0,
// else cudaGetLastError() after its launch. No atomics: every reduction is one block per
// channel with a fixed order, so results are bitwise reproducible.
#pragma once

#include <cuda_runtime.h>

#include "common/conv2d.h"
#include "launch.h"

namespace cnnext {
namespace cuda {
namespace kernels {

// mean[c] = sum of y[:, c] / M, var[c] = sum of (y[:, c] - mean[c])^2 / M (biased),
// M = N * H * W; two sweeps over the channel by one block.
cudaError_t bn_batch_stats(DType dt, const void* y, int64_t N, int64_t C, int64_t H, int64_t W,
                           Strides4 s, void* mean, void* var, cudaStream_t stream);

// out = [relu]((y - mean) / sqrt(var + eps) * gamma + beta); gamma, beta may be nullptr
// (1 and 0). One thread per element. out has the strides s too.
cudaError_t bn_normalize(DType dt, const void* y, int64_t N, int64_t C, int64_t H, int64_t W,
                         Strides4 s, const void* mean, const void* var, const void* gamma,
                         const void* beta, double eps, bool relu, void* out, cudaStream_t stream);

// sums (2, C), type S: sums[0][c] = sum gm * (y - mean) / sqrt(var + eps) (the bn_weight
// gradient), sums[1][c] = sum gm (the bn_bias gradient), gm = g masked by out > 0 when out
// is not nullptr, else g.
cudaError_t bn_backward_reduce(DType dt, const void* g, const void* out, const void* y,
                               int64_t N, int64_t C, int64_t H, int64_t W, Strides4 s,
                               const void* mean, const void* var, double eps, void* sums,
                               cudaStream_t stream);

// dy = gamma * invstd * (gm - sums[1] / M - xhat * sums[0] / M), xhat = (y - mean) * invstd;
// gamma may be nullptr (1). One thread per element. dy has the strides s too.
cudaError_t bn_backward_apply(DType dt, const void* g, const void* out, const void* y,
                              int64_t N, int64_t C, int64_t H, int64_t W, Strides4 s,
                              const void* mean, const void* var, const void* gamma,
                              const void* sums, double eps, void* dy, cudaStream_t stream);

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
