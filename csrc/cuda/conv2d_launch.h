// Entry points of the CUDA conv2d backend (csrc/cuda/conv2d_launch.cpp: the torch side of
// the kernels in csrc/cuda/conv2d.cu and the implicit GEMM): those of
// csrc/backend_api/conv2d.h (types and contract), and the forward with batch statistics
// the CUDA conv_bn_relu2d builds on. Compiled only in CUDA builds; never included by a .cu file.
#pragma once

#include <ATen/ATen.h>

#include "backend_api/conv2d.h"

namespace cnnext {
namespace cuda {

backend_api::conv2d_forward conv2d_forward;
backend_api::conv2d_input_backward conv2d_input_backward;
backend_api::conv2d_weight_backward conv2d_weight_backward;
backend_api::channel_sum channel_sum;
backend_api::add_channel_bias_ add_channel_bias_;

// conv2d forward (no ReLU) through the implicit GEMM with the batch-norm statistics of
// its output taken in the epilogue: on success *out is the output (N, O, OH, OW) in
// out_format and mean / var (float32, (O,)) its per-channel mean and biased variance.
// Returns false, having done nothing, where the GEMM path does not apply (float64, a
// problem it does not take or that the direct kernels serve, an empty output): the
// caller then runs conv2d_forward and its own statistics kernel.
bool conv2d_forward_bn_stats(const at::Tensor& input, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                             at::MemoryFormat out_format, at::Tensor* out, at::Tensor& mean,
                             at::Tensor& var);

}  // namespace cuda
}  // namespace cnnext
