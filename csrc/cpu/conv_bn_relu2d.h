// Entry points of the CPU conv_bn_relu2d backend (csrc/cpu/conv_bn_relu2d.cpp).
// csrc/ops/conv_bn_relu2d.cpp checks the arguments and calls these; they trust them.
//
// Layouts: the tensors of one call that have the convolution's output shape (conv_out,
// out, grad) are dense in one memory format, contiguous or channels_last, which the
// kernels read from conv_out (the op layer makes grad and out dense in it).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>

#include "common/conv2d.h"

namespace cnnext {
namespace cpu {

// Training mode. conv_out = conv2d(input, weight, bias), in layout out_format; mean,
// var: its per-channel batch mean and biased variance over (n, h, w) (stats_dtype);
// out = [relu]((conv_out - mean) / sqrt(var + eps) * bn_weight + bn_bias). Returns
// (out, conv_out, mean, var). p.N * p.OH * p.OW may be 0 (zeros for mean and var).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    double eps, const Conv2dParams& p, at::MemoryFormat out_format, bool relu);

// The batch-norm (+ ReLU) part of the backward pass. gm = grad masked by out > 0 (relu)
// or grad; xhat = (conv_out - mean) * invstd. Returns (grad_conv_out, grad_bn_weight =
// sum gm * xhat, grad_bn_bias = sum gm, grad_conv_bias = the channel sums of
// grad_conv_out); grad_conv_out = bn_weight * invstd * (gm - sum gm / M - xhat *
// sum(gm * xhat) / M), M = N * H * W.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_backward(
    const at::Tensor& grad, const c10::optional<at::Tensor>& out, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_weight,
    double eps, bool relu);

// Inference: the batch norm folded into the convolution, per output channel in the
// weight's dtype: scale = bn_weight / sqrt(running_var + eps), returns (weight * scale
// (contiguous, (O, C / groups, KH, KW)), (bias - running_mean) * scale + bn_bias).
std::pair<at::Tensor, at::Tensor> bn_fold(const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const c10::optional<at::Tensor>& bn_weight,
                                          const c10::optional<at::Tensor>& bn_bias,
                                          const at::Tensor& running_mean,
                                          const at::Tensor& running_var, double eps,
                                          const Conv2dParams& p);

// running_mean / running_var (1-D of size C, any floating dtype, any stride) updated in
// place with momentum from mean and var (1-D of size C, floating) and count values per
// channel (> 1): per channel in double, stored in the buffers' dtype.
void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& mean, const at::Tensor& var, double momentum,
                              int64_t count);

}  // namespace cpu
}  // namespace cnnext
