// bfloat16 forward convolution on AVX512_BF16 (csrc/cpu/conv2d_bf16.cpp).
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {
namespace cpu {
namespace bf16 {

// Whether the vdpbf16ps GEMM can run here (AVX512_BF16 present and not capped by
// CNNEXT_CPU_ISA).
bool available();

// out (allocated, N x O x OH x OW, contiguous or channels_last) = [relu](conv2d(input,
// weight) + bias) for bfloat16 tensors, through the vdpbf16ps GEMM with float
// accumulation. Returns false, having written nothing, where it does not apply (another
// dtype, no AVX512_BF16, or a shape it does not take); the caller then runs another path.
bool conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const Conv2dParams& p, at::Tensor& out,
                    bool relu);

}  // namespace bf16
}  // namespace cpu
}  // namespace cnnext
