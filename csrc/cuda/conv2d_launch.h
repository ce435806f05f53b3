// Torch-side entry points of csrc/cuda/conv2d_launch.cpp beyond the backend functions
// csrc/ops/conv2d.h declares. CUDA builds only.
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {
namespace cuda {

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
