// Entry points of the CUDA conv_bn_relu2d backend (csrc/cuda/conv_bn_relu2d_launch.cpp),
// training mode, with the contract of csrc/cpu/conv_bn_relu2d.h (inference folds the
// batch norm with at:: ops and runs conv2d_forward). Compiled only in CUDA builds; never
// included by a .cu file.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/conv2d.h"

namespace cnnext {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    double eps, const Conv2dParams& p, at::MemoryFormat out_format, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_backward(
    const at::Tensor& grad, const c10::optional<at::Tensor>& out, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_weight,
    double eps, bool relu);

}  // namespace cuda
}  // namespace cnnext
