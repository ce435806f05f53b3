// CUDA launchers of the max-pooling ops: raw pointers, Pool2dParams, a stream.
// Torch-free; csrc/cuda/max_pool2d_launch.cpp is the torch side that calls them.
//
// As in csrc/cuda/conv2d.h, every launcher trusts its shapes, reads and writes 4-D
// tensors through their strides (Strides4), launches on `stream` only, returns
// cudaSuccess without launching when there is nothing to do and cudaGetLastError()
// after its launch. No atomics on data: each output element is written by one thread
// (except max_unpool2d's scatter, where repeated indices race as in torch). Launchers
// that read indices into another tensor take `bad`, two int64 in device memory set to
// {0, 0} by the caller: a thread that meets an index outside its plane skips it and
// the first such thread sets bad = {1, index}.
#pragma once

#include <cuda_runtime.h>

#include "common/conv2d.h"
#include "common/pool2d.h"
#include "launch.h"

namespace cnnext {
namespace cuda {
namespace kernels {

// y, yi (N, C, OH, OW) = max and its flat index over the windows of x (N, C, H, W).
cudaError_t max_pool2d_forward(const Pool2dParams& p, DType dt, const void* x, Strides4 xs,
                               void* y, Strides4 ys, int64_t* yi, Strides4 is,
                               cudaStream_t stream);

// gx (N, C, H, W) = gather: each element sums gy over the windows (in tap order) whose
// index names it. Indices naming nothing in their window are ignored.
cudaError_t max_pool2d_backward(const Pool2dParams& p, DType dt, const void* gy, Strides4 gys,
                                const int64_t* idx, Strides4 is, void* gx, Strides4 gxs,
                                cudaStream_t stream);

// out (N, C, h, w) = src (N, C, Hs, Ws) at idx (N, C, h, w). With pool != nullptr (its
// OH = h, OW = w, H = Hs, W = Ws), windows without a tap inside the input give zero.
cudaError_t gather_planes(const Pool2dParams* pool, DType dt, const void* src, Strides4 ss,
                          int64_t Hs, int64_t Ws, const int64_t* idx, Strides4 is, int64_t N,
                          int64_t C, int64_t h, int64_t w, void* out, Strides4 os,
                          int64_t* bad, cudaStream_t stream);

// out (N, C, OH, OW), already zero: out[idx[o]] = x[o] for x, idx (N, C, H, W).
cudaError_t max_unpool2d(DType dt, const void* x, Strides4 xs, const int64_t* idx, Strides4 is,
                         int64_t N, int64_t C, int64_t H, int64_t W, void* out, Strides4 os,
                         int64_t OH, int64_t OW, int64_t* bad, cudaStream_t stream);

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
