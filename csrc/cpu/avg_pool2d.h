// Entry points of the CPU average-pooling backend (csrc/cpu/avg_pool2d.cpp; avg_pool2d
// and adaptive_avg_pool2d share them). csrc/ops/avg_pool2d.cpp checks the arguments,
// fills AvgPool2dParams and calls these; they trust what they are given. Every tensor
// here is 4-D (the op layer turns unbatched input into a batch of one).
#pragma once

#include <ATen/ATen.h>

#include "common/avg_pool2d.h"

namespace cnnext {
namespace cpu {

// out (N, C, OH, OW) in out_format: each output the average of its window of input.
at::Tensor avg_pool2d_forward(const at::Tensor& input, const AvgPool2dParams& a,
                              at::MemoryFormat out_format);
// grad_input (N, C, H, W) in out_format: each input element the sum, over the windows
// that contain it, of grad_output / divisor. Deterministic.
at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, const AvgPool2dParams& a,
                               at::MemoryFormat out_format);

}  // namespace cpu
}  // namespace cnnext
