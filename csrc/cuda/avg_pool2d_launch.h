// Entry points of the CUDA average-pooling backend (csrc/cuda/avg_pool2d_launch.cpp), with
// the contract of csrc/cpu/avg_pool2d.h (torch side of the kernels in csrc/cuda/avg_pool2d.cu).
// Compiled only in CUDA builds; never included by a .cu file.
#pragma once

#include <ATen/ATen.h>

#include "common/avg_pool2d.h"

namespace cnnext {
namespace cuda {

// out (N, C, OH, OW) in out_format: each output the average of its window of input.
at::Tensor avg_pool2d_forward(const at::Tensor& input, const AvgPool2dParams& a,
                              at::MemoryFormat out_format);
// grad_input (N, C, H, W) in out_format: each input element the sum, over the windows
// that contain it, of grad_output / divisor. Deterministic.
at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, const AvgPool2dParams& a,
                               at::MemoryFormat out_format);

}  // namespace cuda
}  // namespace cnnext
