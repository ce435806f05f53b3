// CUDA launchers of avg_pool2d and adaptive_avg_pool2d (one pair serves both: the
// AvgPool2dParams say which windows). Torch-free; csrc/cuda/avg_pool2d_launch.cpp is
// the torch side that calls them.
//
// Like the conv2d launchers (csrc/cuda/conv2d.h), every launcher trusts its arguments
// (csrc/ops/avg_pool2d.cpp checked them), reads and writes 4-D tensors through their
// element strides (pointers at element (0, 0, 0, 0)), launches on `stream` only,
// returns cudaSuccess without launching when there is nothing to write and otherwise
// cudaGetLastError() after its launch, writes every element of its output and is
// deterministic (no atomics, a fixed summation order). float16 and bfloat16
// accumulate in float, float32 in float, float64 in double.
#pragma once

#include <cuda_runtime.h>

#include "common/avg_pool2d.h"
#include "common/conv2d.h"
#include "launch.h"

namespace cnnext {
namespace cuda {
namespace kernels {

// y (N, C, OH, OW), strides ys: each element the average of its window of x
// (N, C, H, W), strides xs.
cudaError_t avg_pool2d_forward(const AvgPool2dParams& a, DType dt, const void* x, Strides4 xs,
                               void* y, Strides4 ys, cudaStream_t stream);

// grad_input (N, C, H, W), strides gxs: a gather, each element the sum of
// gy / divisor over the windows (outputs of gy (N, C, OH, OW), strides gys) that
// contain it; zero where none does.
cudaError_t avg_pool2d_backward(const AvgPool2dParams& a, DType dt, const void* gy, Strides4 gys,
                                void* gx, Strides4 gxs, cudaStream_t stream);

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
