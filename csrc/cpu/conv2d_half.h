// float16 / bfloat16 convolutions on the CPU (csrc/cpu/conv2d_half.cpp): what
// csrc/cpu/conv2d.cpp's entry points hand over when their tensors are half. Same
// contracts as the entry points of csrc/cpu/conv2d.h; float accumulation, each output
// rounded once.
#pragma once

#include <ATen/ATen.h>

#include "cpu/conv2d.h"

namespace cnnext {
namespace cpu {
namespace half {

void conv2d_forward_rows(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                         at::Tensor& out, bool relu, const RowsDone& rows_done);
at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format);
at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const Conv2dParams& p);
at::Tensor channel_sum(const at::Tensor& t);
void add_channel_bias_(at::Tensor& out, const at::Tensor& bias);

}  // namespace half
}  // namespace cpu
}  // namespace cnnext
