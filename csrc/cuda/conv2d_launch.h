// Entry points of the CUDA conv2d backend (csrc/cuda/conv2d_launch.cpp), with the
// contract of csrc/cpu/conv2d.h: the torch side of the kernels in csrc/cuda/conv2d.cu and
// the implicit GEMM. Compiled only in CUDA builds; never included by a .cu file.
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {
namespace cuda {

at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                          at::MemoryFormat out_format, bool relu = false);
at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format);
at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const Conv2dParams& p);
at::Tensor channel_sum(const at::Tensor& t);
// out[n, c, h, w] += bias[c], in place, through out's strides; bias 1-D of size C.
void add_channel_bias_(at::Tensor& out, const at::Tensor& bias);

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
