// Entry points of the CUDA max-pooling backend (csrc/cuda/max_pool2d_launch.cpp), with
// the contract of csrc/cpu/max_pool2d.h (torch side of the kernels in csrc/cuda/max_pool2d.cu).
// Compiled only in CUDA builds; never included by a .cu file.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/pool2d.h"

namespace cnnext {
namespace cuda {

// (output, indices), both (N, C, OH, OW) in out_format; torch's choice of maximum.
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input,
                                                      const Pool2dParams& p,
                                                      at::MemoryFormat out_format);
// grad_input (N, C, H, W): each input element gets the sum of grad_output over the
// windows whose index is it. Windows without a tap inside the input pass nothing.
at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                               const Pool2dParams& p, at::MemoryFormat out_format);
// out (N, C, OH, OW) = src (N, C, H, W) at indices, per plane; zero for windows without
// a tap inside the input (the adjoint of max_pool2d_backward).
at::Tensor max_pool2d_select(const at::Tensor& src, const at::Tensor& indices,
                             const Pool2dParams& p, at::MemoryFormat out_format);
// out (N, C, OH, OW), zero but out[indices[o]] = input[o] per plane; input and indices
// (N, C, H, W).
at::Tensor max_unpool2d_forward(const at::Tensor& input, const at::Tensor& indices,
                                int64_t OH, int64_t OW, at::MemoryFormat out_format);
// out of indices' shape (N, C, H, W) = grad_output (N, C, OH, OW) at indices.
at::Tensor max_unpool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                 at::MemoryFormat out_format);

}  // namespace cuda
}  // namespace cnnext
