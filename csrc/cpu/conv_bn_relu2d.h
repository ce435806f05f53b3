// Entry points of the CPU conv_bn_relu2d backend (csrc/cpu/conv_bn_relu2d.cpp): training
// mode as csrc/backend_api/conv_bn_relu2d.h has it (types and contract), and the CPU-only
// inference fold and running-statistics update.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "backend_api/conv_bn_relu2d.h"

namespace cnnext {
namespace cpu {

backend_api::conv_bn_relu2d_train conv_bn_relu2d_train;
backend_api::conv_bn_relu2d_train_backward conv_bn_relu2d_train_backward;

// Inference: the batch norm folded into the convolution, per output channel in the
// weight's dtype: scale = bn_weight / sqrt(running_var + eps), returns (weight * scale
// (contiguous, (O, C / groups, KH, KW)), (bias - running_mean) * scale + bn_bias). The
// pair comes from the weight cache (csrc/cpu/derived_cache.h) while all six tensors are
// unchanged, so in evaluation the fold (and the Winograd transform of the folded weight)
// runs once per parameter value; treat it as read-only.
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
