// The conv2d entry points that each backend provides, as function types: the CPU backend
// (csrc/cpu/conv2d.h) and the CUDA one (csrc/cuda/conv2d_launch.h) declare
// `backend_api::conv2d_forward conv2d_forward;` and so on in their namespaces, so the
// two agree by construction and csrc/ops/dispatch.h can pick either. The contract, once:
// the callers (csrc/ops) check the arguments and fill Conv2dParams; the backends trust
// them. Every tensor is 4-D (the op layer turns unbatched input into a batch of one).
// Torch-side, backend-neutral: includes no header of csrc/ops, csrc/cpu or csrc/cuda.
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {
namespace backend_api {

// y (N, O, OH, OW) in out_format; with `relu`, each value is max(value + bias, 0),
// applied as it is written (conv_bn_relu2d's inference path).
using conv2d_forward = at::Tensor(const at::Tensor& input, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                                  at::MemoryFormat out_format, bool relu);
// grad_input (N, C, H, W) in out_format.
using conv2d_input_backward = at::Tensor(const at::Tensor& grad_output, const at::Tensor& weight,
                                         const Conv2dParams& p, at::MemoryFormat out_format);
// grad_weight (O, C / groups, KH, KW).
using conv2d_weight_backward = at::Tensor(const at::Tensor& grad_output, const at::Tensor& input,
                                          const Conv2dParams& p);
// The sums of t over every dim but dim 1 (the bias gradient).
using channel_sum = at::Tensor(const at::Tensor& t);
// out[n, c, h, w] += bias[c], in place, through out's strides; bias 1-D of size C.
using add_channel_bias_ = void(at::Tensor& out, const at::Tensor& bias);

}  // namespace backend_api
}  // namespace cnnext
