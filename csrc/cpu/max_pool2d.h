// Entry points of the CPU max-pooling backend (csrc/cpu/max_pool2d_*.cpp).
// csrc/ops/max_pool2d.cpp checks the arguments, fills Pool2dParams and calls these; they
// trust what they are given, except the values of index tensors, which each function
// checks as it reads them (an index outside its plane is an error naming `op`, never a
// read or write out of bounds). Every tensor here is 4-D (the op layer turns unbatched
// input into a batch of one); indices are int64, flat positions h * W + w within a plane.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/pool2d.h"

namespace cnnext {
namespace cpu {

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

}  // namespace cpu
}  // namespace cnnext
