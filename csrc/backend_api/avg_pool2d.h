// The average-pooling entry points that each backend provides (avg_pool2d and
// adaptive_avg_pool2d share them), as function types: csrc/cpu/avg_pool2d.h and
// csrc/cuda/avg_pool2d_launch.h declare `backend_api::avg_pool2d_forward
// avg_pool2d_forward;` and so on, so the two agree by construction. The callers
// (csrc/ops/avg_pool2d.cpp) check the arguments and fill AvgPool2dParams; the backends
// trust them. Every tensor is 4-D. Torch-side, backend-neutral.
#pragma once

#include <ATen/ATen.h>

#include "common/avg_pool2d.h"

namespace cnnext {
namespace backend_api {

// out (N, C, OH, OW) in out_format: each output the average of its window of input.
using avg_pool2d_forward = at::Tensor(const at::Tensor& input, const AvgPool2dParams& a,
                                      at::MemoryFormat out_format);
// grad_input (N, C, H, W) in out_format: each input element the sum, over the windows
// that contain it, of grad_output / divisor. Deterministic.
using avg_pool2d_backward = at::Tensor(const at::Tensor& grad_output, const AvgPool2dParams& a,
                                       at::MemoryFormat out_format);

}  // namespace backend_api
}  // namespace cnnext
