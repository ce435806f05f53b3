// float16 / bfloat16 on the CPU backend: the helpers every op's half path shares.
//
// The half types are stored in 16 bits and computed in float: kernels either read them
// natively with float accumulation (max pooling, the bf16 GEMM of csrc/cpu/gemm_bf16.cpp,
// conv_bn_relu2d's batch-norm sweeps), or run the float kernel on a float copy and round
// its result once (the other convolution and pooling paths). Either way every sum is
// taken in float (or double) and each output is rounded to the half type once, as torch's
// CPU kernels do (their accumulate type, at::opmath_type, is float for both).
#pragma once

#include <ATen/ATen.h>

namespace cnnext {
namespace cpu {

inline bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
inline bool is_half(const at::Tensor& t) { return t.defined() && is_half(t.scalar_type()); }

// A float copy of t in t's layout (dense tensors keep their strides); undefined stays so.
inline at::Tensor to_float(const at::Tensor& t) {
  return t.defined() ? t.to(at::kFloat) : t;
}
inline c10::optional<at::Tensor> to_float(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return to_float(*t);
}

}  // namespace cpu
}  // namespace cnnext
