// The conv_bn_relu2d (training mode) entry points that each backend provides, as function
// types: csrc/cpu/conv_bn_relu2d.h and csrc/cuda/conv_bn_relu2d_launch.h declare
// `backend_api::conv_bn_relu2d_train conv_bn_relu2d_train;` and so on, so the two agree
// by construction. The callers (csrc/ops/conv_bn_relu2d.cpp) check the arguments; the
// backends trust them. Torch-side, backend-neutral.
//
// Layouts: the tensors of one call that have the convolution's output shape (conv_out,
// out, grad) are dense in one memory format, contiguous or channels_last, which the
// kernels read from conv_out (the op layer makes grad and out dense in it).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/conv2d.h"

namespace cnnext {
namespace backend_api {

using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Training mode. conv_out = conv2d(input, weight, bias), in layout out_format; mean,
// var: its per-channel batch mean and biased variance over (n, h, w) (stats_dtype);
// out = [relu]((conv_out - mean) / sqrt(var + eps) * bn_weight + bn_bias). Returns
// (out, conv_out, mean, var). p.N * p.OH * p.OW may be 0 (zeros for mean and var).
using conv_bn_relu2d_train = Tensors4(const at::Tensor& input, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& bn_weight,
                                      const c10::optional<at::Tensor>& bn_bias, double eps,
                                      const Conv2dParams& p, at::MemoryFormat out_format, bool relu);

// The batch-norm (+ ReLU) part of the backward pass. gm = grad masked by out > 0 (relu)
// or grad; xhat = (conv_out - mean) * invstd. Returns (grad_conv_out, grad_bn_weight =
// sum gm * xhat, grad_bn_bias = sum gm, grad_conv_bias = the channel sums of
// grad_conv_out); grad_conv_out = bn_weight * invstd * (gm - sum gm / M - xhat *
// sum(gm * xhat) / M), M = N * H * W.
using conv_bn_relu2d_train_backward = Tensors4(const at::Tensor& grad, const c10::optional<at::Tensor>& out,
                                               const at::Tensor& conv_out, const at::Tensor& mean,
                                               const at::Tensor& var,
                                               const c10::optional<at::Tensor>& bn_weight, double eps,
                                               bool relu);

}  // namespace backend_api
}  // namespace cnnext
