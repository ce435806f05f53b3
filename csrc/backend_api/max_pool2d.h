// The max-pooling and unpooling entry points that each backend provides, as function
// types: csrc/cpu/max_pool2d.h and csrc/cuda/max_pool2d_launch.h declare
// `backend_api::max_pool2d_forward max_pool2d_forward;` and so on, so the two agree by
// construction. The callers (csrc/ops/max_pool2d.cpp) check the arguments and fill
// Pool2dParams; the backends trust them, except the values of index tensors, which each
// function checks as it reads them (an index outside its plane is an error, never a read
// or write out of bounds). Every tensor is 4-D; indices are int64, flat positions
// h * W + w within a plane. Torch-side, backend-neutral.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/pool2d.h"

namespace cnnext {
namespace backend_api {

// (output, indices), both (N, C, OH, OW) in out_format; torch's choice of maximum.
using max_pool2d_forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& input,
                                                             const Pool2dParams& p,
                                                             at::MemoryFormat out_format);
// grad_input (N, C, H, W): each input element gets the sum of grad_output over the
// windows whose index is it. Windows without a tap inside the input pass nothing.
using max_pool2d_backward = at::Tensor(const at::Tensor& grad_output, const at::Tensor& indices,
                                       const Pool2dParams& p, at::MemoryFormat out_format);
// out (N, C, OH, OW) = src (N, C, H, W) at indices, per plane; zero for windows without
// a tap inside the input (the adjoint of max_pool2d_backward).
using max_pool2d_select = at::Tensor(const at::Tensor& src, const at::Tensor& indices,
                                     const Pool2dParams& p, at::MemoryFormat out_format);
// out (N, C, OH, OW), zero but out[indices[o]] = input[o] per plane; input and indices
// (N, C, H, W).
using max_unpool2d_forward = at::Tensor(const at::Tensor& input, const at::Tensor& indices,
                                        int64_t OH, int64_t OW, at::MemoryFormat out_format);
// out of indices' shape (N, C, H, W) = grad_output (N, C, OH, OW) at indices.
using max_unpool2d_backward = at::Tensor(const at::Tensor& grad_output, const at::Tensor& indices,
                                         at::MemoryFormat out_format);

}  // namespace backend_api
}  // namespace cnnext
