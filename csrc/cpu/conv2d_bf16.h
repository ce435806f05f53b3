// bfloat16 convolutions and their gradients on AVX512_BF16 (csrc/cpu/conv2d_bf16.cpp).
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {
namespace cpu {
namespace bf16 {

// Whether the vdpbf16ps GEMM can run here (AVX512_BF16 present and not capped by
// CNNEXT_CPU_ISA).
bool available();

// The direct forward (output channels in the vector lanes, csrc/cpu/conv2d_bf16.cpp) on or
// off (test hook: off, the GEMM path runs what it would take).
void set_direct_enabled(bool on);
bool direct_enabled();

// out (allocated, N x O x OH x OW, contiguous or channels_last) = [relu](conv2d(input,
// weight) + bias) for bfloat16 tensors, through the direct vdpbf16ps kernel or the
// vdpbf16ps GEMM, float accumulation. Returns false, having written nothing, where it
// does not apply (another dtype, no AVX512_BF16, or a shape it does not take); the caller
// then runs another path.
bool conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const Conv2dParams& p, at::Tensor& out,
                    bool relu);

// The gradients of conv2d for bfloat16 tensors on vdpbf16ps, float accumulation, each
// output rounded once. Each returns an undefined tensor, having done nothing, where it
// does not apply (another dtype, no AVX512_BF16, fewer than 8 output channels per group);
// the caller then runs the float kernels.
//   input gradient (N x C x H x W in out_format): stride 1 as the forward convolution of
//     grad_output with the flipped, transposed weight; other strides without dilation as
//     one such forward per stride phase, written into its positions; with dilation a GEMM
//     over output channels whose float tiles are added into a float input gradient.
//   weight gradient (O x C/G x KH x KW): the direct kernel (pairs of samples at a pixel),
//     else a GEMM reducing over samples and output pixels in pairs of pixels.
at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format);
at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const Conv2dParams& p);

}  // namespace bf16
}  // namespace cpu
}  // namespace cnnext
