// float16 / bfloat16 convolutions on the CPU: the half paths of csrc/cpu/conv2d.cpp's
// entry points. bfloat16 forward convolutions take the AVX512_BF16 GEMM
// (csrc/cpu/conv2d_bf16.cpp) where the CPU has it and the shape suits it; every other
// half convolution runs the float kernels on float copies and rounds the result once
// (float accumulation, one rounding per output: torch's own accumulate type). bfloat16
// gradients take the same GEMM's backward kernels where they apply.
#include "cpu/conv2d_half.h"

#include <ATen/Parallel.h>

#include "cpu/conv2d_bf16.h"
#include "cpu/conv2d_winograd.h"
#include "cpu/half.h"

namespace cnnext {
namespace cpu {
namespace half {

void conv2d_forward_rows(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                         at::Tensor& out, bool relu, const RowsDone& rows_done) {
  if (out.numel() == 0) return;
  // bfloat16 3 x 3 stride 1 on wide layers: the float Winograd, where it beats the GEMM.
  if (winograd::forward_bf16_tensor(input, weight, bias, out, p, relu)) {
  } else if (!bf16::conv2d_forward(input, weight, bias, p, out, relu) &&
             !cpu::conv2d_forward_bf16_unfolded(input, weight, bias, p, out, relu)) {
    const at::MemoryFormat fmt =
        out.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
    out.copy_(cpu::conv2d_forward(to_float(input), to_float(weight), to_float(bias), p, fmt, relu));
  }
  // Every row is final: one band per sample.
  if (rows_done) at::parallel_for(0, p.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) rows_done(n, 0, p.OH);
  });
}

at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format) {
  // bfloat16, 3 x 3 stride 1 on wide layers: the float Winograd, where it beats the GEMM.
  at::Tensor gx = winograd::input_backward_bf16_tensor(grad_output, weight, p, out_format);
  if (gx.defined()) return gx;
  gx = bf16::conv2d_input_backward(grad_output, weight, p, out_format);
  if (gx.defined()) return gx;
  return cpu::conv2d_input_backward(to_float(grad_output), to_float(weight), p, out_format)
      .to(grad_output.scalar_type());
}

at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const Conv2dParams& p) {
  at::Tensor gw = bf16::conv2d_weight_backward(grad_output, input, p);
  if (gw.defined()) return gw;
  return cpu::conv2d_weight_backward(to_float(grad_output), to_float(input), p)
      .to(grad_output.scalar_type());
}

at::Tensor channel_sum(const at::Tensor& t) {
  return cpu::channel_sum(to_float(t)).to(t.scalar_type());
}

void add_channel_bias_(at::Tensor& out, const at::Tensor& bias) {
  at::Tensor f = to_float(out);
  cpu::add_channel_bias_(f, to_float(bias));
  out.copy_(f);
}

}  // namespace half
}  // namespace cpu
}  // namespace cnnext
